"""`receraser bench audit`: deleted records before unlearning, after it, and in a Retrain without them."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from receraser_cli.bench_common import bench_settings, write_record
from receraser_cli.dagster_jobs import _context, add_pipeline_arguments


def _summary(ranks: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    return {
        "median_rank": float(np.median(ranks)),
        "mean_rank": float(ranks.mean()),
        "top20_share": float((ranks <= 20).mean()),
        "mean_score": float(scores.mean()),
    }


def cmd_bench_audit(args: argparse.Namespace) -> int:
    bench_settings(args, "audit")
    from dagster_project.orchestrate import run_graph
    from dagster_project.unlearn import ledger_for, unlearn_pending
    from pipelines.audit import auc, bootstrap_auc, interval, pair_ranks
    from pipelines.ledger import NewRequest
    from pipelines.retrain import model_config, retrain
    from pipelines.steps import load_interactions, load_serving

    instance, rec, tracker = _context(args)
    cfg, run = rec.pipeline_config(), rec.run_dir()
    print(f"building {cfg.partitioner}+{cfg.aggregator} K={cfg.n_shards} {cfg.model} on {cfg.dataset}", flush=True)
    run_graph(instance, rec, tracker, log=lambda m: print(f"  {m}", flush=True))
    inter = load_interactions(run.interactions)
    rng = np.random.default_rng(args.sample_seed)
    owners = np.repeat(np.arange(inter.n_users), np.diff(inter.train.indptr))
    picks = rng.choice(inter.train.nnz, size=args.requests, replace=False)
    deleted = (owners[picks], inter.train.indices[picks].astype(np.int64))
    test = inter.test.tocoo()
    unseen_picks = rng.choice(test.nnz, size=args.requests, replace=False)
    unseen = (test.row[unseen_picks].astype(np.int64), test.col[unseen_picks].astype(np.int64))

    results: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    def measure(name: str, scorer: Any, train: Any) -> None:
        results[name] = {"deleted": pair_ranks(scorer, train, *deleted), "unseen": pair_ranks(scorer, train, *unseen)}
        d = results[name]["deleted"][1]
        print(f"  {name}: deleted records' median rank {np.median(d):.0f}, top-20 share {(d <= 20).mean():.3f}")

    agg, train = load_serving(run)
    measure("before", agg.scorer(), train)
    print(f"forgetting {args.requests} random training records (seed {args.sample_seed}) in one batch", flush=True)
    ledger = ledger_for(rec)
    ledger.add(
        [
            NewRequest("interaction", str(inter.user_ids[u]), str(inter.item_ids[i]), "audit")
            for u, i in zip(*deleted, strict=True)
        ]
    )
    t0 = time.perf_counter()
    report = unlearn_pending(instance, rec, tracker, log=lambda _: None)
    assert report is not None
    unlearn_seconds = time.perf_counter() - t0
    agg, train = load_serving(run)
    assert train[deleted[0], deleted[1]].sum() == 0  # none of them is trained on any more
    measure("after", agg.scorer(), train)
    remaining = load_interactions(run.interactions)
    seeds = [cfg.seed + n for n in range(args.retrain_seeds)]
    for seed in seeds:
        settings = model_config(cfg.model, remaining.name, {**cfg.model_overrides, "seed": seed})
        res = retrain(remaining, cfg.model, settings)
        measure(f"retrain seed {seed}", res.model.scorer(), remaining.train)

    if args.rebuild:  # RecEraser from scratch on the remaining data: pretraining and partition recomputed too
        print("rebuilding everything on the remaining data (embeddings and partition recomputed)", flush=True)
        run_graph(instance, rec, tracker, log=lambda _: None, rebuild=True)
        agg, train = load_serving(run)
        measure("full rebuild", agg.scorer(), train)

    # the attack: a lower rank says "member"; AUC over deleted (members before) vs never-seen test records
    members = {name: -r["deleted"][1].astype(np.float64) for name, r in results.items()}
    others = {name: -r["unseen"][1].astype(np.float64) for name, r in results.items()}
    boot = bootstrap_auc(members, others, seed=args.sample_seed)
    aucs = {name: auc(members[name], others[name]) for name in results}
    reference = f"retrain seed {seeds[0]}"
    diff = np.asarray(boot["after"]) - np.asarray(boot[reference])
    diff_ci = interval(diff)
    retrain_aucs = [aucs[f"retrain seed {s}"] for s in seeds]
    record: dict[str, Any] = {
        "dataset": cfg.dataset,
        "model": cfg.model,
        "method": f"{cfg.partitioner}+{cfg.aggregator}",
        "shards": cfg.n_shards,
        "requests": args.requests,
        "sample_seed": args.sample_seed,
        "retrain_seeds": seeds,
        "unlearn_seconds": unlearn_seconds,
        "shards_retrained": report.shards,
        "attack": "rank of the record among all items for its user (other training items masked); members: the "
        "deleted records, non-members: as many random test records (never trained on by any model)",
        "models": {
            name: {
                "deleted": _summary(r["deleted"][1], r["deleted"][0]),
                "unseen": _summary(r["unseen"][1], r["unseen"][0]),
                "mia_auc": aucs[name],
                "mia_auc_ci95": list(interval(boot[name])),
            }
            for name, r in results.items()
        },
        "auc_after_minus_retrain_ci95": list(diff_ci),
        "auc_after_minus_full_rebuild_ci95": (
            list(interval(np.asarray(boot["after"]) - np.asarray(boot["full rebuild"]))) if args.rebuild else None
        ),
        "indistinguishable_from_retrain": bool(diff_ci[0] <= 0.0 <= diff_ci[1]),
        "ranks_deleted": {name: r["deleted"][1].tolist() for name, r in results.items()},
        "ranks_unseen": {name: r["unseen"][1].tolist() for name, r in results.items()},
        "torch_threads": torch.get_num_threads(),
    }
    for name in results:
        lo, hi = record["models"][name]["mia_auc_ci95"]
        print(f"membership-inference AUC {name}: {aucs[name]:.3f} (95% CI {lo:.3f}-{hi:.3f})")
    print(
        f"after - retrain: 95% CI {diff_ci[0]:+.3f} to {diff_ci[1]:+.3f}: "
        f"{'indistinguishable' if record['indistinguishable_from_retrain'] else 'DIFFERENT'}; Retrain seeds span "
        f"{min(retrain_aucs):.3f}-{max(retrain_aucs):.3f}"
    )
    if args.rebuild:
        lo, hi = record["auc_after_minus_full_rebuild_ci95"]
        print(f"after - full rebuild: 95% CI {lo:+.3f} to {hi:+.3f}")
    write_record(args.json, record)
    return 0


def add_audit_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "audit",
        help="deleted records before unlearning, after it and in a Retrain: ranks and a membership-inference AUC",
        description="Builds the pipeline (in its own state directory unless --state-dir), draws --requests random "
        "training records and as many test records (seeded), measures every record's score and rank for its user "
        "(other training items masked) in the serving model, forgets the training records in one batch through "
        "the ledger and Dagster, measures again, then in Retrains on the remaining data (--retrain-seeds). "
        "Reports the deleted records' ranks and the AUC of a rank-based membership-inference test (deleted vs "
        "never-seen) with bootstrap intervals, and whether after-unlearning is indistinguishable from Retrain.",
    )
    add_pipeline_arguments(p)
    p.add_argument("--requests", type=int, default=200, help="training records to delete (default 200)")
    p.add_argument("--sample-seed", type=int, default=11, help="seed of the drawn records and the bootstrap")
    p.add_argument("--retrain-seeds", type=int, default=3, help="Retrain model seeds (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="also rebuild RecEraser from scratch on the remaining data (pretraining and partition recomputed) "
        "and compare with it: separates what the kept partition remembers from what the model family does",
    )
    p.add_argument("--json", type=Path, default=None)
    p.set_defaults(func=cmd_bench_audit)
