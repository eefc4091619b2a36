"""`receraser run` and `receraser materialize`: the asset graph through Dagster, from the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pipelines.config import MAX_SHARDS, MIN_SHARDS
from pipelines.run import format_metrics

CONFIG_FLAGS = {
    "dataset": str,
    "model": str,
    "partitioner": str,
    "aggregator": str,
    "n_shards": int,
    "seed": int,
    "compare": str,
}


def _shards(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not MIN_SHARDS <= k <= MAX_SHARDS:
        raise argparse.ArgumentTypeError(f"must be between {MIN_SHARDS} and {MAX_SHARDS}, got {k}")
    return k


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", help="dataset (default ml-1m)")
    p.add_argument("--model", choices=["wmf", "bpr", "lightgcn"], help="base model (default wmf)")
    p.add_argument(
        "--partitioner", choices=["random", "ubp", "ibp", "inbp", "graph_eraser"], help="partitioner (default inbp)"
    )
    p.add_argument("--aggregator", choices=["mean", "static", "attention"], help="aggregator (default attention)")
    p.add_argument(
        "--shards",
        dest="n_shards",
        type=_shards,
        help=f"number of shards K, {MIN_SHARDS} to {MAX_SHARDS} and at most the users (UBP), items (IBP) or "
        "interactions (others) the partitioner deals out (default 10)",
    )
    p.add_argument("--seed", type=int, help="seed of pretraining, partition, submodels, aggregator (default 0)")
    p.add_argument(
        "--compare",
        metavar="NAMES",
        help="configurations built beside this one on its data and pretraining, as key-prefixed asset groups: "
        "sisa, graph_eraser, receraser (comma-separated); others, with their own fields, in the config file "
        '("compare": {"ubp": {"partitioner": "ubp"}}) or $RECERASER_COMPARE',
    )
    p.add_argument("--state-dir", type=Path, help="project state directory (default ./state or $RECERASER_HOME)")
    p.add_argument("--data-dir", type=Path, help="dataset directory (default: see `receraser --help`)")


def settings_from(args: argparse.Namespace):  # noqa: ANN201
    """The typed configuration for a command: its options over the config file, the environment and the
    defaults (`dagster_project.settings.load_settings`, the one place they are read)."""
    from dagster_project.settings import load_settings

    flags = {name: getattr(args, name, None) for name in CONFIG_FLAGS}
    return load_settings(flags, getattr(args, "state_dir", None), getattr(args, "data_dir", None))


def pipeline_argv(args: argparse.Namespace) -> list[str]:
    """The pipeline options of ``args`` as command-line arguments, for a `receraser` child process."""
    out: list[str] = []
    for name in CONFIG_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            out += ["--shards" if name == "n_shards" else f"--{name}", str(value)]
    for name in ("state_dir", "data_dir"):
        if getattr(args, name, None):
            out += [f"--{name.replace('_', '-')}", str(Path(getattr(args, name)).resolve())]
    return out


def _context(args: argparse.Namespace):  # noqa: ANN202
    import logging
    import warnings

    if not os.environ.get("RECERASER_VERBOSE"):  # Dagster's step events stay in the instance and the UI
        logging.getLogger("dagster").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", module="dagster")
    shown = logging.getLogger("receraser.progress")  # long steps' epochs, at most one line every 5 s per step
    if not shown.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("    %(message)s"))
        shown.addHandler(handler)
        shown.setLevel(logging.INFO)
        shown.propagate = False
    from dagster_project.orchestrate import get_instance

    rec = settings_from(args)
    return get_instance(rec.state_path()), rec, rec.tracker()


def cmd_run(args: argparse.Namespace) -> int:
    from dagster_project.orchestrate import run_graph
    from dagster_project.resources import ledger_for
    from dagster_project.unlearn import unlearn_pending
    from pipelines import registry

    t0 = time.perf_counter()
    instance, rec, tracker = _context(args)
    cfg = rec.pipeline_config()
    print(
        f"RecEraser on {cfg.dataset}: {cfg.model} submodels, {cfg.partitioner} partition into K = "
        f"{cfg.n_shards} shards, {cfg.aggregator} aggregation (executor: {args.executor})",
        flush=True,
    )
    workers = 2 if args.executor == "multiprocess" else 1
    interrupted = [r.id for r in ledger_for(rec).outstanding() if r.status == "applying"]
    if interrupted:  # finish them first: a rebuild alone would leave them "applying" though applied
        print(f"  finishing interrupted deletion request(s) {', '.join(map(str, interrupted))} first", flush=True)
        unlearn_pending(instance, rec, tracker, log=lambda m: print(f"  {m}", flush=True))
    runs = run_graph(
        instance, rec, tracker, workers=workers, log=lambda m: print(f"  {m}", flush=True), rebuild=args.rebuild
    )
    run_dir = rec.run_dir()
    metrics = json.loads(run_dir.evaluation.read_text())
    print(f"\ntest metrics ({cfg.partitioner} + {cfg.aggregator}, K = {cfg.n_shards}):")
    print(format_metrics(metrics))
    for name, other in rec.compared().items():
        theirs = json.loads(other.run_dir().evaluation.read_text())
        print(
            f"compared {name:14} ({other.partitioner} + {other.aggregator}, K = {other.n_shards}): Recall@20 "
            f"{theirs['recall@20']:.4f}, NDCG@20 {theirs['ndcg@20']:.4f}   (asset group {name})"
        )
    print(f"\n{len(runs)} Dagster run(s) in {time.perf_counter() - t0:.1f} s")
    print(f"Dagster instance : {os.environ['DAGSTER_HOME']}   (UI: dagster dev -w workspace.yaml)")
    print(f"MLflow store     : {tracker.tracking_uri if hasattr(tracker, 'tracking_uri') else tracker}")
    print(f"                   (UI: mlflow ui --backend-store-uri {getattr(tracker, 'tracking_uri', '')} --workers 1)")
    if hasattr(tracker, "tracking_uri"):  # MLflow's Model Registry: the version now serving
        print(f"registered model : models:/{registry.model_name(run_dir)}@{registry.ALIAS}")
    print(f"run directory    : {run_dir.root}")
    print(f"state directory  : {rec.state_path()}")
    return 0


def cmd_materialize(args: argparse.Namespace) -> int:
    from dagster_project.orchestrate import materialize_target, parse_target, shard_keys
    from receraser_core.data.interactions import DataError

    instance, rec, tracker = _context(args)
    selection = args.selection
    if "/" in selection:  # NAME/ASSET...: an asset of a compared configuration
        name, selection = selection.split("/", 1)
        if name.strip() not in rec.compared():
            known = ", ".join(rec.compared()) or "none (see --compare)"
            raise DataError(f"no compared configuration {name.strip()!r}; configured: {known}")
        rec = rec.compared()[name.strip()]
    try:
        target = parse_target(selection, shard_keys(rec))
    except ValueError as exc:
        raise DataError(str(exc)) from None
    workers = 2 if args.executor == "multiprocess" else 1
    runs = materialize_target(instance, target, rec, tracker, workers, log=lambda m: print(m, flush=True))
    print(f"{len(runs)} Dagster run(s): {', '.join(r[:8] for r in runs)}")
    return 0


def cmd_assets(args: argparse.Namespace) -> int:
    from dagster_project.assets import SHARED_NAMES
    from dagster_project.orchestrate import graph_status

    instance, rec, _ = _context(args)
    state = graph_status(instance, rec, include_retrain=True, run=rec.run_dir())
    for name, other in rec.compared().items():
        theirs = graph_status(instance, other, run=other.run_dir())
        state.update({f"{name}/{label}": v for label, v in theirs.items() if label not in SHARED_NAMES})
    if args.json:
        print(json.dumps(state, indent=2))
    else:
        for key, value in state.items():
            print(f"{key:24} {value}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pipelines.mlflow_compare import compare_table, format_table

    rec = settings_from(args)
    tracker = rec.tracker()
    rows = compare_table(tracker.client(), rec.experiment())
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no evaluation or Retrain runs in MLflow experiment {rec.experiment()!r} ({tracker.tracking_uri})")
        return 0
    print(f"MLflow experiment {rec.experiment()!r} ({tracker.tracking_uri}): the latest run of each configuration")
    print(format_table(rows))
    return 0


def add_dagster_parsers(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run",
        help="the main job: materialize the whole RecEraser asset graph through Dagster (idempotent)",
        description="Materializes interactions -> wmf_embeddings -> shard_assignment -> shard_data[k] -> "
        "shard_model[k] -> aggregator -> evaluation on the project's Dagster instance (SQLite under the state "
        "directory), logging every model to MLflow. Only missing or stale assets run: a second run with nothing "
        "changed trains nothing. Ends with the test metrics and where the Dagster and MLflow data are.",
    )
    add_pipeline_arguments(run)
    run.add_argument(
        "--executor",
        choices=["in_process", "multiprocess"],
        default="in_process",
        help="multiprocess trains shards in 2 parallel processes (default in_process)",
    )
    run.add_argument(
        "--rebuild",
        action="store_true",
        help="rebuild everything from the remaining data, including the WMF partition embeddings and the "
        "partition itself (after deletions: the full-rebuild job of DESIGN.md 3.6)",
    )
    run.set_defaults(func=cmd_run)

    mat = sub.add_parser(
        "materialize",
        help="materialize a selection such as 'shard_model[3]+' (shard 3 and everything downstream)",
        description="SELECTION is ASSET, ASSET+ (with everything downstream) or ASSET[K,...]+ for shard "
        "partitions, e.g. 'shard_model[3]+', 'shard_data[3]+', 'shard_model[0,4]+', prefixed NAME/ for a compared "
        "configuration's (--compare), e.g. 'sisa/shard_model[3]+'. The same runs as the native "
        "`dagster asset materialize -m dagster_project.definitions --select 'shard_model+' --partition 3`.",
    )
    mat.add_argument("selection")
    add_pipeline_arguments(mat)
    mat.add_argument("--executor", choices=["in_process", "multiprocess"], default="in_process")
    mat.set_defaults(func=cmd_materialize)

    assets = sub.add_parser(
        "assets",
        help="status of every asset and shard partition: missing, corrupt (content differs from its "
        "recorded hash), unverified (no hash: an older version wrote it), stale or fresh",
    )
    add_pipeline_arguments(assets)
    assets.add_argument("--json", action="store_true")
    assets.set_defaults(func=cmd_assets)

    cmp = sub.add_parser(
        "compare",
        help="the configurations built for a dataset side by side, read from their MLflow runs",
        description="Reads MLflow experiment receraser/<dataset> (the same runs the MLflow UI shows) and "
        "prints, per configuration, the latest evaluation (RecEraser, SISA, GraphEraser, or any partitioner + "
        "aggregator) and Retrain run: test Recall@20 / NDCG@20 and the seconds its training runs logged. Build "
        "the configurations first, e.g. `receraser run --partitioner random --aggregator mean` (SISA), "
        "`receraser run --partitioner graph_eraser --aggregator static` (GraphEraser), `receraser materialize "
        "retrain_model` (Retrain).",
    )
    add_pipeline_arguments(cmp)
    cmp.add_argument("--json", action="store_true", help="every field of every row, as JSON")
    cmp.set_defaults(func=cmd_compare)
