"""`receraser bench compare`: Retrain, SISA, GraphEraser and RecEraser side by side, plus ablations.

Every method runs the same pipeline steps (`pipelines.steps`) on the same prepared data and pretrained
embeddings; each record follows the retrain benchmark's format plus method, partitioner, aggregator,
shards and per-step seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.config import PipelineConfig
from pipelines.retrain import model_config, peak_rss_mb, retrain
from pipelines.steps import (
    RunDir,
    aggregate,
    evaluate_run,
    load_interactions,
    partition,
    prepare,
    pretrain,
    progress,
    train_shards,
)

METHODS: dict[str, tuple[str, str]] = {
    "sisa": ("random", "mean"),
    "graph_eraser": ("graph_eraser", "static"),
    "receraser": ("inbp", "attention"),
}


def method_configs(
    base: PipelineConfig, methods: list[str], ablations: bool, shards: list[int]
) -> list[tuple[str, PipelineConfig]]:
    """(label, config) pairs to run; duplicates are dropped."""
    out: list[tuple[str, PipelineConfig]] = []
    for m in methods:
        if m != "retrain":
            p, a = METHODS[m]
            out.append((m, base.replace(partitioner=p, aggregator=a)))
    if ablations:
        for p in ("random", "ubp", "ibp", "inbp"):
            out.append((f"ablation-partitioner-{p}", base.replace(partitioner=p, aggregator="attention")))
        for a in ("mean", "static", "attention"):
            out.append((f"ablation-aggregator-{a}", base.replace(partitioner="inbp", aggregator=a)))
        for k in shards:
            out.append(
                (
                    f"ablation-shards-{k}",
                    base.replace(partitioner="inbp", aggregator="attention", n_shards=k),
                )
            )
    return out


def run_compare(
    base: PipelineConfig,
    work: Path,
    methods: list[str],
    ablations: bool = False,
    shards: tuple[int, ...] = (5, 10, 20, 50),
    workers: int = 1,
    data_dir: Path | None = None,
    log: Callable[[str], None] = print,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the methods; returns one record per (method or ablation) run."""
    shared = RunDir(work / "shared")
    t0 = time.perf_counter()
    inter = prepare(shared, base, data_dir, log)
    pretrain(shared, base, log)
    pretrain_seconds = time.perf_counter() - t0
    records: list[dict[str, Any]] = []
    if "retrain" in methods:
        log(f"== retrain {base.model}")
        config = model_config(base.model, inter.name, {**base.model_overrides, "seed": base.seed})
        with progress(f"retrain {base.model}", int(config.get("epochs", 0)) or None, log=log) as shown:
            res = retrain(inter, base.model, config, callback=shown)
        rec = {**res.record, "method": "retrain", "partitioner": None, "aggregator": None, "shards": 1}
        rec.pop("history", None)
        records.append(rec)
        if on_record:
            on_record(rec)
    done: dict[str, dict[str, Any]] = {}
    for label, cfg in method_configs(base, methods, ablations, list(shards)):
        key = cfg.fingerprint()
        if key in done:
            rec = {**done[key], "method": label}
        else:
            log(f"== {label}: {cfg.partitioner} + {cfg.aggregator}, K = {cfg.n_shards}")
            rec = run_one(cfg, work / key, shared, workers, log)
            rec.update(pretrain_seconds=round(pretrain_seconds, 3))
            done[key] = rec
        rec = {**rec, "method": label}
        records.append(rec)
        if on_record:
            on_record(rec)
    return records


def run_one(
    cfg: PipelineConfig, root: Path, shared: RunDir, workers: int, log: Callable[[str], None]
) -> dict[str, Any]:
    run = RunDir(root)
    run.root.mkdir(parents=True, exist_ok=True)
    for base_name in ("interactions.npz", "wmf_embeddings.npz"):  # reuse the shared data and embeddings
        for name in (base_name, base_name + ".sha256"):  # with the content hash it is checked against
            target = run.root / name
            if not target.exists():
                target.unlink(missing_ok=True)  # a dangling link
                target.symlink_to((shared.root / name).resolve())
    t = time.perf_counter()
    part = partition(run, cfg, log)
    t_part = time.perf_counter() - t
    t = time.perf_counter()
    per_shard = train_shards(run, cfg, workers=workers, log=log)
    t_shards = time.perf_counter() - t
    t = time.perf_counter()
    agg = aggregate(run, cfg, log)
    t_agg = time.perf_counter() - t
    metrics = evaluate_run(run, cfg, log, agg=agg)
    inter = load_interactions(run.interactions)
    return {
        "dataset": inter.name,
        "model": cfg.model,
        "partitioner": cfg.partitioner,
        "aggregator": cfg.aggregator,
        "shards": cfg.n_shards,
        **{k: metrics[k] for k in metrics if k.startswith(("recall@", "ndcg@"))},
        "valid_recall@20": metrics["valid_recall@20"],
        "partition_seconds": round(t_part, 3),
        "shard_seconds_total": round(t_shards, 3),
        "shard_seconds_mean": round(sum(per_shard.values()) / len(per_shard), 3),
        "shard_seconds_max": round(max(per_shard.values()), 3),
        "aggregate_seconds": round(t_agg, 3),
        "eval_seconds": round(metrics["seconds"], 3),
        # one deletion retrains one shard and the aggregator: the paper's unlearning time
        "unlearning_seconds_estimate": round(sum(per_shard.values()) / len(per_shard) + t_agg, 3),
        "fit_seconds": round(t_part + t_shards + t_agg, 3),
        "partition_sizes": part.diagnostics["sizes"],
        "partition_balance": part.diagnostics["balance"],
        "partition_iterations": part.diagnostics.get("iterations"),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "seed": cfg.seed,
        "config": cfg.to_dict(),
    }
