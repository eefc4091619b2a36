"""`receraser bench unlearning`: time from request to applied, next to a full Retrain in the same run."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from receraser_cli.bench_common import bench_settings, write_record
from receraser_cli.dagster_jobs import _context, add_pipeline_arguments
from receraser_core.data.interactions import DataError
from receraser_core.state_file import load_state


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _inner_seconds(run: Any, shards: list[int]) -> dict[str, float]:
    """Compute time inside the steps (shard fits, the aggregator's start and fit, evaluation) of the last apply."""
    from pipelines.steps import read_json

    shard = sum(float(read_json(run.shard_fit(k))["seconds"]) for k in shards)
    fit = load_state(run.aggregator, "aggregator file")["fit"]
    agg = float(fit["seconds"]) + float(fit.get("init_seconds", 0.0))  # its start is part of training it
    ev = float(read_json(run.evaluation)["seconds"])
    return {"shard_training": shard, "aggregator_training": agg, "evaluation": ev}


def most_active(train: Any, share: float) -> np.ndarray:
    """The ``share`` of users with the most training interactions (CURE4Rec's "active" group)."""
    counts = np.diff(train.indptr)
    users = np.flatnonzero(counts)
    return np.sort(users[np.argsort(-counts[users], kind="stable")[: max(1, round(share * len(users)))]])


def choose_users(train: Any, amount: float, select: str, rng: np.random.Generator) -> np.ndarray:
    """Users to erase: ``amount`` of them (a count, or a share of the users with training data when below 1),
    the most active, the least active or at random (CURE4Rec's three selections; ties broken by ``rng``)."""
    counts = np.diff(train.indptr)
    users = np.flatnonzero(counts)
    n = int(round(amount * len(users))) if amount < 1 else int(amount)
    if not 1 <= n <= len(users):
        raise DataError(f"cannot erase {n} users: {len(users):,} users have training data")
    tie = rng.random(len(users))
    if select == "random":
        return np.sort(rng.choice(users, size=n, replace=False))
    order = np.lexsort((tie, -counts[users] if select == "active" else counts[users]))
    return np.sort(users[order[:n]])


def group_quality(score: Any, train: Any, test: Any, top_users: np.ndarray) -> dict[str, float]:
    """NDCG@20 and HR@20 over all test users, and NDCG@20 of the active group and of the others (CURE4Rec)."""
    from receraser_core.metrics import evaluate

    others = np.setdiff1d(np.arange(train.shape[0]), top_users)
    every = evaluate(score, train, test, ks=(20,), batch_size=256, hit_ratio=True)
    top = evaluate(score, train, test, ks=(20,), batch_size=256, users=top_users)
    rest = evaluate(score, train, test, ks=(20,), batch_size=256, users=others)
    return {
        "ndcg@20": every["ndcg@20"],
        "hit@20": every["hit@20"],
        "recall@20": every["recall@20"],
        "ndcg@20_active": top["ndcg@20"],
        "ndcg@20_other": rest["ndcg@20"],
        "ndcg@20_gap": top["ndcg@20"] - rest["ndcg@20"],
        "active_users_evaluated": top["users"],
    }


def stage_seconds(instance: Any, run_ids: list[str]) -> dict[str, float]:
    """Seconds each asset's steps took in these Dagster runs (Dagster's own step statistics; a partitioned
    asset's partitions summed)."""
    out: dict[str, float] = {}
    for run_id in run_ids:
        for step in instance.get_run_step_stats(run_id):
            if step.start_time is not None and step.end_time is not None:
                out[step.step_key] = out.get(step.step_key, 0.0) + step.end_time - step.start_time
    return out


def implicit_refit_seconds(inter: Any, retrain_record: dict[str, Any]) -> float:
    """Wall time of `implicit`'s own ALS fit (its fast CG path) on ``inter.train`` with the sweeps, factors,
    regularisation and threads of a WMF Retrain record: the library a user would reach for instead."""
    import warnings

    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    cfg = retrain_record["config"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        als = AlternatingLeastSquares(
            factors=cfg["dim"],
            regularization=cfg["reg"] / cfg["c0"],
            alpha=1.0 / cfg["c0"],
            iterations=int(retrain_record["epochs"]),
            use_cg=True,
            calculate_training_loss=False,
            num_threads=cfg.get("threads", 0),
            random_state=cfg["seed"],
        )
    t = time.perf_counter()
    with threadpool_limits(1, "blas"):
        als.fit(inter.train, show_progress=False)
    return time.perf_counter() - t


def cmd_bench_unlearning(args: argparse.Namespace) -> int:
    bench_settings(args, "unlearning")
    from dagster_project.orchestrate import run_graph
    from dagster_project.unlearn import ledger_for, unlearn_pending
    from pipelines.ledger import NewRequest
    from pipelines.retrain import model_config, retrain
    from pipelines.steps import load_interactions, load_serving

    instance, rec, tracker = _context(args)
    cfg = rec.pipeline_config()
    run = rec.run_dir()
    print(
        f"building {cfg.partitioner}+{cfg.aggregator} K={cfg.n_shards} {cfg.model} on {cfg.dataset} "
        "(skipped if already built)",
        flush=True,
    )
    t = time.perf_counter()
    build_runs = run_graph(instance, rec, tracker, log=lambda m: print(f"  {m}", flush=True))
    build_seconds = time.perf_counter() - t
    build_stages = stage_seconds(instance, build_runs)
    before = json.loads(run.evaluation.read_text())
    inter = load_interactions(run.interactions)
    rng = np.random.default_rng(args.sample_seed)
    top_users = most_active(inter.train, 0.05)  # CURE4Rec's active group
    groups_before = group_quality(load_serving(run)[0].scorer(), inter.train, inter.test, top_users)
    if args.kind == "user":  # whole users (GDPR erasure): every record in train, validation and test
        chosen = choose_users(inter.train, args.requests if args.share is None else args.share, args.select, rng)
        args.requests = len(chosen)
        reqs = [NewRequest("user", str(inter.user_ids[u]), "", "benchmark") for u in chosen]
    else:
        picks = rng.choice(inter.train.nnz, size=args.requests, replace=False)
        users = np.repeat(np.arange(inter.n_users), np.diff(inter.train.indptr))
        reqs = [
            NewRequest(
                "interaction", str(inter.user_ids[users[p]]), str(inter.item_ids[inter.train.indices[p]]), "benchmark"
            )
            for p in picks
        ]
    ledger = ledger_for(rec)
    times: list[float] = []
    breakdowns: list[dict[str, float]] = []
    args.batch = args.batch or len(reqs)  # 0: every request in one batch
    groups = [reqs[i : i + args.batch] for i in range(0, len(reqs), args.batch)]
    for n, group in enumerate(groups, start=1):
        t = time.perf_counter()
        ledger.add(group)
        report = unlearn_pending(instance, rec, tracker, log=lambda _: None)
        elapsed = time.perf_counter() - t
        assert report is not None
        inner = _inner_seconds(run, report.shards)
        applied = report.seconds["applied"] + (elapsed - report.seconds["total"])  # + ledger.add
        inner["dagster_and_io_overhead"] = applied - inner["shard_training"] - inner["aggregator_training"]
        times.append(applied)
        breakdowns.append(
            {**inner, "shards_retrained": float(len(report.shards)), "dagster_runs": float(len(report.dagster_runs))}
        )
        print(
            f"[{n}/{len(groups)}] {len(group)} request(s) applied in {applied:.1f} s "
            f"(shards {report.shards}: shard {inner['shard_training']:.1f} s, aggregator "
            f"{inner['aggregator_training']:.1f} s, overhead {inner['dagster_and_io_overhead']:.1f} s; then "
            f"evaluation {inner['evaluation']:.1f} s)",
            flush=True,
        )
    after = json.loads(run.evaluation.read_text())
    remaining = load_interactions(run.interactions)
    top_users = most_active(remaining.train, 0.05)  # the active group of the remaining users
    groups_after = group_quality(load_serving(run)[0].scorer(), remaining.train, remaining.test, top_users)
    seeds = [cfg.seed + n for n in range(args.retrain_seeds)]
    print(f"retraining one model on the same remaining data, model seeds {seeds} (the exact baseline)", flush=True)
    retrains = []
    for seed in seeds:
        res = retrain(
            remaining, cfg.model, model_config(cfg.model, remaining.name, {**cfg.model_overrides, "seed": seed})
        )
        retrains.append(res)
        print(
            f"  seed {seed}: fit {res.record['fit_seconds']:.1f} s, {res.record['epochs']} epochs (best "
            f"{res.record['best_epoch']}), Recall@20 {res.metrics['recall@20']:.4f}",
            flush=True,
        )
    fits = [float(r.record["fit_seconds"]) for r in retrains]
    median_fit = statistics.median(fits)
    res = retrains[fits.index(median_fit)] if median_fit in fits else retrains[0]
    groups_retrain = group_quality(res.model.scorer(), remaining.train, remaining.test, top_users)
    retrain_seconds = median_fit
    mean_breakdown = {k: statistics.fmean(b[k] for b in breakdowns) for k in breakdowns[0]}
    record: dict[str, Any] = {
        "dataset": cfg.dataset,
        "model": cfg.model,
        "method": "receraser",
        "partitioner": cfg.partitioner,
        "aggregator": cfg.aggregator,
        "shards": cfg.n_shards,
        "requests": args.requests,
        "batch": args.batch,
        "kind": args.kind,
        "select": args.select if args.kind == "user" else "random",
        # CURE4Rec's measures: NDCG@20, HR@20, and the NDCG@20 of the 5% most active users (by training
        # interactions, among the users the data holds then: before, or after the deletions) minus the others
        "groups": {"before": groups_before, "after": groups_after, "retrain": groups_retrain},
        "unlearning_seconds_mean": statistics.fmean(times),
        "unlearning_seconds_median": statistics.median(times),
        "unlearning_seconds_p95": _percentile(times, 95),
        "unlearning_seconds_all": times,
        "breakdown_mean_seconds": mean_breakdown,
        "bookkeeping_seconds_median": statistics.median(b["dagster_and_io_overhead"] for b in breakdowns),
        "bookkeeping_seconds_p95": _percentile([b["dagster_and_io_overhead"] for b in breakdowns], 95),
        "bookkeeping_definition": "request recorded to applied, minus the shard fits and the aggregator fit "
        "(timers inside the fits): ledger, redaction, Dagster runs and events, loading and saving",
        "dagster_runs_per_request_mean": statistics.fmean(b["dagster_runs"] for b in breakdowns),
        "retrain_seconds": retrain_seconds,
        "retrain_seconds_definition": "median over model seeds of the Retrain fit (same code, same early stopping)",
        "retrain_fit_seconds_all": fits,
        "retrain_epochs_all": [r.record["epochs"] for r in retrains],
        "retrain_recall@20_all": [r.metrics["recall@20"] for r in retrains],
        "unlearning_seconds_definition": "request recorded to applied (shard + aggregator rebuilt); evaluation after",
        "speedup_mean": retrain_seconds / statistics.fmean(times),
        "speedup_median": retrain_seconds / statistics.median(times),
        "compute_fraction_of_retrain": (mean_breakdown["shard_training"] + mean_breakdown["aggregator_training"])
        / retrain_seconds,
        "quality_before": {k: before[k] for k in before if k.startswith(("recall@", "ndcg@"))},
        "quality_after": {k: after[k] for k in after if k.startswith(("recall@", "ndcg@"))},
        "retrain_quality_on_remaining": {k: v for k, v in res.metrics.items() if k != "users"},
        "recall@20_change_pct": 100 * (after["recall@20"] / before["recall@20"] - 1),
        "build_seconds": build_seconds,
        "build_stage_seconds": build_stages,  # empty when the state was already built
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "seed": cfg.seed,
        "sample_seed": args.sample_seed,
    }
    print(
        f"unlearning: mean {record['unlearning_seconds_mean']:.1f} s, median "
        f"{record['unlearning_seconds_median']:.1f} s, p95 {record['unlearning_seconds_p95']:.1f} s; retrain "
        f"{retrain_seconds:.1f} s (median of {len(fits)} seeds); speedup {record['speedup_median']:.2f}x (median), "
        f"{record['speedup_mean']:.2f}x (mean); shard + aggregator = "
        f"{record['compute_fraction_of_retrain']:.2f} of the Retrain fit; bookkeeping median "
        f"{record['bookkeeping_seconds_median']:.2f} s (p95 {record['bookkeeping_seconds_p95']:.2f} s), "
        f"{record['dagster_runs_per_request_mean']:.1f} Dagster runs per apply"
    )
    if cfg.model == "wmf":
        record["implicit_full_refit_seconds"] = implicit_refit_seconds(remaining, res.record)
        print(f"implicit's own ALS on the same data, same sweeps: {record['implicit_full_refit_seconds']:.2f} s")
    print(
        f"Recall@20 before {before['recall@20']:.4f}, after {after['recall@20']:.4f} "
        f"({record['recall@20_change_pct']:+.2f}%), retrain on remaining {res.metrics['recall@20']:.4f}"
    )
    for name, g in record["groups"].items():
        print(
            f"{name:8} NDCG@20 {g['ndcg@20']:.4f}  HR@20 {g['hit@20']:.4f}  NDCG@20 active 5% {g['ndcg@20_active']:.4f}"
            f" / others {g['ndcg@20_other']:.4f} (gap {g['ndcg@20_gap']:+.4f})"
        )
    write_record(args.json, record)
    return 0


def add_unlearning_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "unlearning",
        help="unlearning time per request vs a full Retrain measured in the same run, and quality after",
        description="Builds the pipeline through Dagster (in its own state directory unless --state-dir), "
        "samples --requests random training interactions (seeded), applies them --batch at a time through the "
        "ledger and the asset graph (shard retrain + aggregator + evaluation), then retrains one model on the "
        "same remaining data. Writes mean / median / p95 unlearning time, the breakdown, the Retrain time, the "
        "speedup and quality before / after / Retrain.",
    )
    add_pipeline_arguments(p)
    p.add_argument(
        "--requests", type=int, default=100, help="how many random training interactions, or users (default 100)"
    )
    p.add_argument(
        "--kind",
        choices=["interaction", "user"],
        default="interaction",
        help="forget single training records, or whole users (all their records, every split)",
    )
    p.add_argument(
        "--share",
        type=float,
        default=None,
        help="with --kind user: erase this share of the users with training data instead of --requests "
        "(CURE4Rec: 0.05)",
    )
    p.add_argument(
        "--select",
        choices=["random", "active", "inactive"],
        default="random",
        help="with --kind user: which users, at random (seeded), the most or the least active (CURE4Rec)",
    )
    p.add_argument(
        "--batch", type=int, default=1, help="requests applied together (default 1: one at a time; 0: all at once)"
    )
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the sampled requests")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--retrain-seeds", type=int, default=3, help="Retrain this many model seeds; report the median")
    p.add_argument("--json", type=Path, default=None)
    p.set_defaults(func=cmd_bench_unlearning)
