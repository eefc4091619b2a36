"""`receraser bench ...`: benchmarks that print figures and write JSON."""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

from receraser_cli.bench_common import write_record
from receraser_core.models import MODELS


def cmd_bench_retrain(args: argparse.Namespace) -> int:
    from pipelines.retrain import model_config, parse_overrides, print_progress, retrain
    from receraser_core.data.readers import load_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    inter = load_dataset(args.dataset, args.data_dir, args.seed, args.user_col, args.item_col)
    overrides = parse_overrides(args.model, args.set)
    if args.model_seed is not None:
        overrides["seed"] = args.model_seed
    config = model_config(args.model, args.dataset, overrides)
    print(f"retrain {args.model} on {inter.name}: {inter.train.nnz:,} training interactions", flush=True)
    result = retrain(inter, args.model, config, callback=print_progress(f"[{args.model}]"))
    rec = result.record
    rec.update(
        {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": platform.platform(),
            "cpu_count": torch.get_num_threads(),
        }
    )
    print(
        f"{args.model}: Recall@20 {rec['recall@20']:.4f}  NDCG@20 {rec['ndcg@20']:.4f}  "
        f"fit {rec['fit_seconds']:.1f} s, {rec['epochs']} epochs (best {rec['best_epoch']}), "
        f"peak RSS {rec['peak_rss_mb']:.0f} MiB"
    )
    if args.model == "wmf":
        from receraser_cli.bench_unlearning import implicit_refit_seconds

        rec["implicit_fit_seconds"] = round(implicit_refit_seconds(inter, rec), 3)
        rec["fit_ratio_to_implicit"] = round(rec["fit_seconds"] / rec["implicit_fit_seconds"], 3)
        print(
            f"implicit's own ALS, same {rec['epochs']} sweeps, factors and threads: "
            f"{rec['implicit_fit_seconds']:.2f} s "
            f"(ours / implicit = {rec['fit_ratio_to_implicit']:.2f}; ours includes validation every "
            f"{rec['config']['eval_every']} sweeps)"
        )
    write_record(args.json, rec)
    return 0


def cmd_bench_compare(args: argparse.Namespace) -> int:
    from pipelines.compare import run_compare
    from pipelines.config import PipelineConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    base = PipelineConfig.from_dict(
        {
            "dataset": args.dataset,
            "model": args.model,
            "seed": args.model_seed,
            "split_seed": args.seed,
            "n_shards": args.shards,
        }
    )
    records: list[dict] = []

    def save(rec: dict) -> None:
        records.append(rec)
        print(f"   -> {rec['method']}: Recall@20 {rec['recall@20']:.4f}  NDCG@20 {rec['ndcg@20']:.4f}", flush=True)
        write_record(args.json, records, announce=False)

    work = args.work or Path("state") / "bench" / f"{args.dataset}-{args.model}"
    shards = tuple(int(k) for k in args.shard_counts.split(","))
    run_compare(
        base,
        work,
        methods,
        args.ablations,
        shards,
        args.workers,
        args.data_dir,
        log=lambda m: print(m, flush=True),
        on_record=save,
    )
    print(f"{'method':32} {'Recall@20':>9} {'NDCG@20':>8} {'fit s':>8} {'unlearn s':>9}")
    for r in records:
        unlearn = r.get("unlearning_seconds_estimate", r.get("fit_seconds"))
        print(f"{r['method']:32} {r['recall@20']:9.4f} {r['ndcg@20']:8.4f} {r['fit_seconds']:8.1f} {unlearn:9.1f}")
    return 0


def cmd_bench_report(args: argparse.Namespace) -> int:
    from pipelines.report import build_report

    print(f"wrote {build_report(args.results, args.out)}")
    return 0


def add_bench_parser(sub: argparse._SubParsersAction, add_data_args: Callable[[argparse.ArgumentParser], None]) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print figures and write JSON")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    rt = bench_sub.add_parser(
        "retrain",
        help="train one model on the full training set (the exact-unlearning baseline) and evaluate it",
        description="Fit the model on all training data, early-stop on validation Recall@10, evaluate on "
        "test with full ranking, and write {dataset, model, method, recall@N, ndcg@N, fit_seconds, epochs, "
        "peak_rss_mb, seed, config, history} as JSON.",
    )
    rt.add_argument("--dataset", default="ml-1m", help="dataset name (default ml-1m)")
    rt.add_argument("--model", required=True, choices=list(MODELS))
    rt.add_argument("--json", type=Path, default=None, help="write the result record here")
    rt.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model config field, e.g. --set lr=0.005 --set epochs=50 (repeatable)",
    )
    rt.add_argument("--model-seed", type=int, default=None, help="seed of the model (default: config's, 0)")
    rt.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    add_data_args(rt)
    rt.set_defaults(func=cmd_bench_retrain)

    cp = bench_sub.add_parser(
        "compare",
        help="Retrain, SISA, GraphEraser and RecEraser (and ablations) on one dataset and base model",
        description="Runs Retrain, SISA (random + mean), GraphEraser (graph_eraser + static) and RecEraser "
        "(inbp + attention) with K shards, writing one record per method (retrain format plus method, "
        "partitioner, aggregator, shards, per-step seconds). --ablations adds partitioners (random, ubp, ibp, "
        "inbp) with attention, aggregators (mean, static, attention) with inbp, and K in --shard-counts.",
    )
    cp.add_argument("--dataset", default="ml-1m")
    cp.add_argument("--model", required=True, choices=list(MODELS))
    cp.add_argument("--json", type=Path, default=None, help="write the records here (rewritten after each method)")
    cp.add_argument("--methods", default="retrain,sisa,graph_eraser,receraser", help="comma-separated subset")
    cp.add_argument("--shards", type=int, default=10, help="K for the methods (default 10)")
    cp.add_argument("--ablations", action="store_true", help="also run the ablations")
    cp.add_argument("--shard-counts", default="5,10,20,50", help="K values of the shards ablation")
    cp.add_argument("--workers", type=int, default=1, help="train shards in this many processes (default 1)")
    cp.add_argument("--work", type=Path, default=None, help="run directories (default state/bench/DATASET-MODEL)")
    cp.add_argument("--model-seed", type=int, default=0, help="seed of partition, models and aggregator")
    cp.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    add_data_args(cp)
    cp.set_defaults(func=cmd_bench_compare)

    from receraser_cli.bench_unlearning import add_unlearning_parser

    add_unlearning_parser(bench_sub)

    from receraser_cli.bench_audit import add_audit_parser

    add_audit_parser(bench_sub)

    from receraser_cli.bench_scale import add_scale_parser

    add_scale_parser(bench_sub)

    from receraser_cli.bench_serve import add_serve_bench_parser

    add_serve_bench_parser(bench_sub)

    rp = bench_sub.add_parser("report", help="regenerate docs/results.md and its figures from the committed JSON")
    rp.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    rp.add_argument("--out", type=Path, default=Path("docs"))
    rp.set_defaults(func=cmd_bench_report)
