"""The `receraser` command line. Run `receraser --help` or `receraser COMMAND --help`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from receraser_core.data.interactions import DataError
from receraser_core.models.base import ConfigError

EPILOG = """\
datasets: ml-1m (the RecEraser authors' split), ml-1m-full (all of ML-1M, seeded 80/20 + 10% validation),
yelp2018 (LightGCN's split, seeded 10% of train as validation), csv:PATH, parquet:PATH (your own table).
Data is read from $RECERASER_DATA_DIR, else ../shared/data beside the checkout, else ~/.cache/receraser/data.
"""


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None, help="dataset directory (default: see below)")
    p.add_argument("--seed", type=int, default=0, help="seed of the protocol / validation split (default 0)")
    p.add_argument("--user-col", default="user", help="user column of a csv:/parquet: table (default 'user')")
    p.add_argument("--item-col", default="item", help="item column of a csv:/parquet: table (default 'item')")


def _load(args: argparse.Namespace):  # noqa: ANN202 - returns Interactions
    from receraser_core.data.readers import load_dataset

    return load_dataset(args.dataset, args.data_dir, args.seed, args.user_col, args.item_col)


def cmd_data_info(args: argparse.Namespace) -> int:
    counts = _load(args).counts()
    if args.json:
        print(json.dumps(counts, indent=2))
        return 0
    print(f"dataset      {counts['dataset']}  ({counts['split']})")
    print(f"users        {counts['users']:,}")
    print(f"items        {counts['items']:,}")
    print(f"train        {counts['train']:,}")
    print(f"valid        {counts['valid']:,}")
    print(f"test         {counts['test']:,}  ({counts['test_users']:,} test users)")
    print(f"total        {counts['interactions']:,}")
    print(f"density      {counts['density']:.4%}")
    if "published_train" in counts:
        print(f"published train (before validation was carved out)  {counts['published_train']:,}")
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from receraser_core.data.download import FETCHERS
    from receraser_core.data.readers import default_data_dir

    data_dir = args.data_dir or default_data_dir()
    FETCHERS[args.name](data_dir, progress=lambda msg: print(msg, file=sys.stderr))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from receraser_core.data.synth import SynthConfig, write_table

    cfg = SynthConfig(args.interactions, args.seed, args.users, args.items)
    out = args.out or Path("state") / "data" / f"synth-{args.interactions}-s{args.seed}.parquet"
    t0 = time.perf_counter()
    print(f"drawing {cfg.interactions:,} interactions for {cfg.users:,} users and {cfg.items:,} items ...", flush=True)
    try:
        users, _ = write_table(cfg, out)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    per_user = np.bincount(users, minlength=cfg.users)
    print(
        f"wrote {out} in {time.perf_counter() - t0:.1f} s: {len(users):,} interactions, records per user "
        f"median {int(np.median(per_user))} / max {per_user.max():,}; use it as --dataset parquet:{out}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="receraser",
        description="RecEraser: exact recommendation unlearning with sharded training and attention aggregation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser(
        "data", help="inspect or download datasets", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data_sub = data.add_subparsers(dest="data_command", required=True)
    info = data_sub.add_parser(
        "info",
        help="users, items, train/valid/test counts and density of a dataset",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument("dataset", help="dataset name (see below)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_data_args(info)
    info.set_defaults(func=cmd_data_info)

    fetch = data_sub.add_parser(
        "fetch",
        help="download a dataset from its original source, verify checksums, convert it",
        description="Download ml-1m (GroupLens archive + the RecEraser authors' split) or yelp2018 "
        "(LightGCN's files). Every file's checksum is verified before anything is written.",
    )
    fetch.add_argument("name", choices=["ml-1m", "yelp2018"])
    fetch.add_argument("--data-dir", type=Path, default=None, help="where to write (default: the data directory)")
    fetch.set_defaults(func=cmd_data_fetch)

    synth = data_sub.add_parser(
        "synth",
        help="write a seeded synthetic table with MovieLens-10M's shape (for measuring growth with data size)",
        description="Log-normal user activity, Zipf item popularity and latent-factor taste (so models learn "
        "something), MovieLens-10M's 69,878 users and 10,677 items unless --users / --items. The same arguments "
        "write the same table, a Parquet file the parquet: reader takes.",
    )
    synth.add_argument("--interactions", type=int, required=True, help="number of (user, item) pairs")
    synth.add_argument("--seed", type=int, default=0, help="seed of everything drawn (default 0)")
    synth.add_argument("--users", type=int, default=69_878, help="number of users (default 69,878)")
    synth.add_argument("--items", type=int, default=10_677, help="number of items (default 10,677)")
    synth.add_argument("--out", type=Path, default=None, help="default state/data/synth-N-sS.parquet")
    synth.set_defaults(func=cmd_data_synth)

    from receraser_cli.dagster_jobs import add_dagster_parsers

    add_dagster_parsers(sub)

    from receraser_cli.forget_cmds import add_forget_parsers

    add_forget_parsers(sub)

    from receraser_cli.serve import add_serve_parser

    add_serve_parser(sub)

    from receraser_cli.bench import add_bench_parser

    add_bench_parser(sub, _add_data_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # MLflow's INFO lines (creating its database tables) and its progress bars (copying the registered model's
    # three files at every aggregator build) are noise on the command line; the user's own settings win
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except DataError as exc:
        print(f"receraser: error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"receraser: error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:  # unknown original ids
        print(f"receraser: error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("receraser: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # Dagster's interrupt error is a BaseException, like KeyboardInterrupt
        if type(exc).__name__ == "DagsterExecutionInterruptedError":  # Ctrl-C inside a Dagster step
            print("receraser: interrupted; `receraser run` resumes from what is built", file=sys.stderr)
            return 130
        raise


if __name__ == "__main__":
    sys.exit(main())
