"""Every artifact is checked against the content hash recorded when it was written: a damaged file is
reported by name in one line, shown as corrupt by the asset status, and rebuilt by the main job (alone, with
what depends on it), to the same content. A damaged ledger is one line too."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from dagster import instance_for_test

from dagster_project.orchestrate import graph_status, run_graph
from dagster_project.settings import load_settings
from dagster_project.unlearn import ledger_for
from pipelines import steps
from pipelines.ledger import NewRequest
from pipelines.tracking import MemoryTracker
from receraser_core.data.interactions import DataError
from receraser_core.models import load_model
from receraser_core.state_file import checksum_path, load_state
from tests.test_dagster import K, _cli, _env, _resource


def _one_line_naming(path: Path, call: Callable[[], object]) -> None:
    with pytest.raises(DataError) as err:
        call()
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_damaged_artifacts_are_named_shown_corrupt_and_rebuilt(tmp_path: Path) -> None:
    rec, tracker = _resource(tmp_path), MemoryTracker()
    with instance_for_test() as instance:
        run_graph(instance, rec, tracker, log=lambda _: None)
        run = rec.run_dir()
        assert all(checksum_path(p).exists() for p in (run.interactions, run.serving, run.shard_model(0)))
        inter = steps.load_interactions(run.interactions)
        cases = [
            (run.shard_model(0), "shard_model[0]", lambda: load_model(run.shard_model(0)), ["shard_model[0]"]),
            (run.shard_data(1), "shard_data[1]", lambda: steps.load_shard_data(run, 1), ["shard_model[1]"]),
            (run.serving, "aggregator", lambda: steps.load_serving(run), ["aggregator"]),
            (run.interactions, "interactions", lambda: steps.load_interactions(run.interactions), []),
        ]
        # a file without its recorded hash (an older version wrote it) is not read, and is rebuilt
        checksum_path(run.shard_model(2)).unlink()
        assert graph_status(instance, rec, run=run)["shard_model[2]"] == "unverified"
        _one_line_naming(run.shard_model(2), lambda: load_model(run.shard_model(2)))
        run_graph(instance, rec, tracker, log=lambda _: None)
        assert checksum_path(run.shard_model(2)).exists() and load_model(run.shard_model(2)) is not None
        for path, label, load, rebuilt in cases:
            raw = path.read_bytes()
            weights = load_state(path)["state"] if path == run.serving else None
            models = {k: run.shard_model(k).read_bytes() for k in range(K)}
            path.write_bytes(raw[: len(raw) // 2])  # truncated
            assert graph_status(instance, rec, run=run)[label] == "corrupt"
            _one_line_naming(path, load)
            n = len(tracker.runs)
            run_graph(instance, rec, tracker, log=lambda _: None)
            assert set(graph_status(instance, rec, run=run).values()) == {"fresh"}, label
            load()  # readable again
            if weights is not None:  # the snapshot also records fit seconds: compare the weights
                assert all(torch.equal(v, load_state(path)["state"][k]) for k, v in weights.items())
            elif path.suffix == ".pt":
                assert path.read_bytes() == raw, f"{label} rebuilt to other content"
            else:  # .npz stores its write time: compare the arrays
                again = steps.load_interactions(run.interactions)
                assert (again.train != inter.train).nnz == 0 and (again.valid != inter.valid).nnz == 0
            names = [r["name"] for r in tracker.runs[n:]]
            assert all(name in names for name in rebuilt), (label, names)
            untouched = [k for k in range(K) if f"shard_model[{k}]" not in names]
            assert len(untouched) >= K - 1 and all(run.shard_model(k).read_bytes() == models[k] for k in untouched)


def test_a_damaged_ledger_is_one_line_and_nothing_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _resource(tmp_path)
    ledger = ledger_for(rec)
    ledger.add([NewRequest("interaction", f"u{i}", f"i{i}", "x" * 200) for i in range(300)])
    with sqlite3.connect(ledger.path) as con:  # everything into the main file, then cut it in half
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    truncated = ledger.path.read_bytes()[: ledger.path.stat().st_size // 2]
    ledger.path.write_bytes(truncated)
    _one_line_naming(ledger.path, lambda: ledger_for(rec).get())
    assert ledger.path.read_bytes() == truncated
    garbage = b"this is not an SQLite database" * 100
    ledger.path.write_bytes(garbage)
    for name in ("-wal", "-shm"):
        Path(str(ledger.path) + name).unlink(missing_ok=True)
    _one_line_naming(ledger.path, lambda: ledger_for(rec).get())
    assert ledger.path.read_bytes() == garbage

    (tmp_path / "cli").mkdir()
    env = _env(tmp_path / "cli")  # the command line: one line, exit 2, the file left as it was
    for name, value in env.items():
        if name.startswith("RECERASER_"):
            monkeypatch.setenv(name, value)
    assert _cli(["run"], env).returncode == 0
    path = load_settings().run_dir().root / "ledger.sqlite"  # where the command line finds it
    path.write_bytes(garbage)
    for name in ("-wal", "-shm"):
        Path(str(path) + name).unlink(missing_ok=True)
    proc = _cli(["status"], env)
    assert proc.returncode == 2 and "the deletion ledger is damaged" in proc.stderr and str(path) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert path.read_bytes() == garbage
