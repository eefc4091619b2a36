"""The main job behind `receraser run`: load a dataset, fit the chosen model, evaluate it on test."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from receraser_core.data.readers import load_dataset
from receraser_core.metrics import DEFAULT_KS, evaluate, popularity_scores

MODELS = ("popularity",)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="ml-1m", help="dataset name (default ml-1m)")
    p.add_argument("--model", default="popularity", choices=MODELS, help="model to train (default popularity)")
    p.add_argument("--json", type=Path, default=None, help="also write the metrics to this JSON file")


def format_metrics(metrics: dict[str, float], ks: tuple[int, ...] = DEFAULT_KS) -> str:
    """A small table: one row per cut-off with Recall and NDCG."""
    lines = ["   N   Recall@N   NDCG@N"]
    lines += [f"{k:>4}   {metrics[f'recall@{k}']:.4f}     {metrics[f'ndcg@{k}']:.4f}" for k in ks]
    return "\n".join(lines)


def run_main_job(args: argparse.Namespace) -> dict[str, float]:
    t0 = time.perf_counter()
    inter = load_dataset(args.dataset, args.data_dir, args.seed, args.user_col, args.item_col)
    c = inter.counts()
    print(
        f"[1/2] loaded {c['dataset']}: {c['users']:,} users, {c['items']:,} items, "
        f"train {c['train']:,} / valid {c['valid']:,} / test {c['test']:,}",
        flush=True,
    )
    metrics = evaluate(popularity_scores(inter.train), inter.train, inter.test)
    print(
        f"[2/2] evaluated {args.model} on {int(metrics['users']):,} test users (full ranking, training items masked)",
        flush=True,
    )
    print(format_metrics(metrics))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"dataset": args.dataset, "model": args.model, **metrics}, indent=2))
    return metrics
