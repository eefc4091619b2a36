"""The main job behind `receraser run`: load a dataset, fit the chosen model on all training data,
select it on validation, evaluate it on test, and print the metrics table.

(Later stages of the project turn this into the full RecEraser pipeline through Dagster; today it is the
Retrain baseline, the reference every unlearning method is compared with.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipelines.retrain import model_config, print_progress, retrain
from receraser_core.data.readers import load_dataset
from receraser_core.metrics import DEFAULT_KS, evaluate, popularity_scores
from receraser_core.models import MODELS

CHOICES = ("popularity", *MODELS)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="ml-1m", help="dataset name (default ml-1m)")
    p.add_argument("--model", default="wmf", choices=CHOICES, help="model to train (default wmf)")
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
        f"[1/3] loaded {c['dataset']}: {c['users']:,} users, {c['items']:,} items, "
        f"train {c['train']:,} / valid {c['valid']:,} / test {c['test']:,}",
        flush=True,
    )
    if args.model == "popularity":
        print("[2/3] popularity needs no training", flush=True)
        metrics = evaluate(popularity_scores(inter.train), inter.train, inter.test)
    else:
        print(f"[2/3] training {args.model} on all training data, early stopping on validation Recall@10", flush=True)
        result = retrain(
            inter, args.model, model_config(args.model, inter.name), callback=print_progress(f"      [{args.model}]")
        )
        metrics = result.metrics
    print(
        f"[3/3] evaluated {args.model} on {int(metrics['users']):,} test users "
        f"(full ranking over {inter.n_items:,} items, training items masked)",
        flush=True,
    )
    print(format_metrics(metrics))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"dataset": args.dataset, "model": args.model, **metrics}, indent=2))
    return metrics
