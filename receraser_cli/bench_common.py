"""What the `receraser bench` commands share: their state directory and threads, and writing their JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch


def bench_settings(args: argparse.Namespace, name: str) -> None:
    """A benchmark's own state directory (``state/bench-<name>/<dataset>-<model>`` unless --state-dir), its
    pipeline settings, and torch's threads (--threads; 0 leaves torch's choice)."""
    if args.state_dir is None:
        args.state_dir = Path("state") / f"bench-{name}" / f"{args.dataset or 'ml-1m'}-{args.model or 'wmf'}"
    if args.threads:
        torch.set_num_threads(args.threads)


def write_record(path: Path | None, record: Any, announce: bool = True) -> None:
    """Write a benchmark's record as JSON (nothing when no path was asked for)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    if announce:
        print(f"wrote {path}")
