"""`receraser bench scale` end to end on two tiny synthetic tables, and its section of the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.report import build_report


@pytest.mark.slow  # two main jobs, deletions and Retrains in child processes: about a minute
def test_bench_scale_records_each_size_and_the_report_plots_them(tmp_path: Path) -> None:
    out = tmp_path / "results" / "scale-synth-wmf.json"
    argv = ["bench", "scale", "--sizes", "3k,4.5k", "--users", "300", "--items", "200", "--shards", "3"]
    argv += ["--requests", "1", "--work", str(tmp_path / "work"), "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECERASER_", "DAGSTER_HOME"))}
    proc = subprocess.run(
        [sys.executable, "-m", "receraser_cli.main", *argv], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads(out.read_text())
    assert [r["interactions"] for r in records] == [3000, 4500]
    for r in records:
        assert r["dataset"].startswith("parquet:") and r["shards"] == 3 and r["requests"] == 1
        # the build's per-asset seconds come from Dagster's step statistics, one entry per asset
        assert set(r["build_stage_seconds"]) == {
            "interactions",
            "wmf_embeddings",
            "shard_assignment",
            "shard_data",
            "shard_model",
            "aggregator",
            "evaluation",
        }
        assert 0 < sum(r["build_stage_seconds"].values()) <= r["build_seconds"]
        assert r["peak_rss_mib"] > 100 and r["wall_seconds"] > r["build_seconds"]
        assert r["retrain_seconds"] > 0 and r["unlearning_seconds_median"] > 0
    # each size kept its own table and state directory; a second call reuses the tables
    assert len(list((tmp_path / "work" / "data").glob("*.parquet"))) == 2
    assert "[4,500] build" in proc.stdout
    docs = tmp_path / "docs"
    text = build_report(out.parent, docs).read_text()
    assert "## Growth with data size" in text and "| wmf | 4,500 |" in text
    assert (docs / "fig_scale.png").stat().st_size > 1000
