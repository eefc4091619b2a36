"""`receraser bench scale`: how building and forgetting grow with the data, on seeded synthetic tables.

For each size: a synthetic table with MovieLens-10M's shape (`receraser data synth`, reused when present), then
`receraser bench unlearning` on it in a child process (so each size's peak memory is its own), which builds
the pipeline through Dagster, applies single deletions and retrains one model on the remaining data. The
record per size adds the table's shape, the child's wall time and peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from receraser_cli.bench_common import write_record
from receraser_core.data.interactions import DataError


def _sizes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        scale = 1_000_000 if part.endswith("m") else 1_000 if part.endswith("k") else 1
        try:
            out.append(int(float(part.rstrip("mk")) * scale))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a size: {part!r} (use e.g. 1m,2.5m or 250k)") from None
    return out


def _table(size: int, args: argparse.Namespace, work: Path) -> Path:
    """The synthetic table of ``size`` interactions (written once, then reused)."""
    from receraser_core.data.synth import SynthConfig, write_table

    path = work / "data" / f"synth-{size}-u{args.users}-i{args.items}-s{args.seed}.parquet"
    if path.exists():
        return path
    print(f"[{size:,}] drawing the synthetic table ...", flush=True)
    try:
        write_table(SynthConfig(size, args.seed, args.users, args.items), path)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    return path


def _child(argv: list[str], log: Path, prefix: str) -> tuple[int, float, float]:
    """Run a `receraser` command, echoing its lines with ``prefix`` and keeping them in ``log``; returns its
    exit status, wall seconds and peak resident memory in MiB (its own, from wait4)."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "receraser_cli.main", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            print(f"{prefix} {line.rstrip()}", flush=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024


def cmd_bench_scale(args: argparse.Namespace) -> int:
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for size in args.sizes:
        table = _table(size, args, work)
        tag = table.stem
        child_json = work / f"unlearning-{tag}.json"
        argv = [
            "bench",
            "unlearning",
            "--dataset",
            f"parquet:{table}",
            "--model",
            args.model,
            "--requests",
            str(args.requests),
            "--sample-seed",
            str(args.sample_seed),
            "--retrain-seeds",
            "1",
            "--shards",
            str(args.n_shards),
            "--threads",
            str(args.threads),
            "--state-dir",
            str(work / f"state-{tag}"),
            "--json",
            str(child_json),
        ]
        status, wall, rss = _child(argv, work / f"unlearning-{tag}.log", f"[{size:,}]")
        if status != 0:
            raise DataError(f"bench unlearning on {table} exited with {status}; see {work / f'unlearning-{tag}.log'}")
        record = json.loads(child_json.read_text())
        record.update({"kind_of_data": "synthetic", "interactions": size, "synth_seed": args.seed})
        record.update({"synth_users": args.users, "synth_items": args.items})
        record.update({"wall_seconds": wall, "peak_rss_mib": rss})
        records.append(record)
        print(
            f"[{size:,}] build {record['build_seconds']:.0f} s, one deletion "
            f"{record['unlearning_seconds_median']:.1f} s (median), Retrain {record['retrain_seconds']:.1f} s, "
            f"peak memory {rss:,.0f} MiB",
            flush=True,
        )
        write_record(args.json, records, announce=False)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def add_scale_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "scale",
        help="build, deletion and Retrain cost against data size, on seeded synthetic tables",
        description="For each size, writes (or reuses) a synthetic table with MovieLens-10M's shape (69,878 "
        "users, 10,677 items; `receraser data synth`) and runs `receraser bench unlearning` on it in its own "
        "process and state directory: the main job through Dagster (per-asset seconds from Dagster's step "
        "statistics), --requests single deletions, one Retrain. Records per size: those figures plus wall time "
        "and peak resident memory.",
    )
    p.add_argument("--sizes", type=_sizes, default=_sizes("1m,2.5m"), help="interactions, e.g. 1m,2.5m,10m")
    p.add_argument("--model", choices=["wmf", "bpr", "lightgcn"], default="wmf")
    p.add_argument("--requests", type=int, default=3, help="single deletions per size (default 3)")
    p.add_argument("--sample-seed", type=int, default=7, help="seed of the sampled deletions (default 7)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic tables (default 0)")
    p.add_argument("--users", type=int, default=69_878, help="users of the tables (default 69,878)")
    p.add_argument("--items", type=int, default=10_677, help="items of the tables (default 10,677)")
    p.add_argument("--shards", dest="n_shards", type=int, default=10, help="K (default 10)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--work", type=Path, default=Path("state/bench-scale"), help="tables, state, logs")
    p.add_argument("--json", type=Path, default=None)
    p.set_defaults(func=cmd_bench_scale)
