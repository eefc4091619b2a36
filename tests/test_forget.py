"""Forgetting: the ledger, request validation, exact per-shard unlearning, and crash / failure recovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from dagster import DagsterInstance, RunsFilter, instance_for_test

from dagster_project.erasure_report import erasure_report, format_report
from dagster_project.orchestrate import graph_status, materialize_names, run_graph
from dagster_project.resources import ReceraserResource
from dagster_project.unlearn import ledger_for, unlearn_pending
from pipelines.config import SHARD_DEFAULTS
from pipelines.forget import ForgetError, check_request, locate, read_request_file, redact
from pipelines.ledger import ApplierBusy, Ledger, NewRequest
from pipelines.retrain import model_config
from pipelines.steps import (
    TRAIN_THREADS,
    RunDir,
    load_interactions,
    load_partition,
    load_serving,
    read_json,
    shard_stack,
    training_threads,
    validation_routes,
)
from pipelines.tracking import MemoryTracker
from receraser_core.aggregate import AGGREGATORS
from receraser_core.data.interactions import DataError, pairs_to_csr
from receraser_core.data.readers import PROJECT_ROOT
from receraser_core.models import build_model, load_model
from receraser_core.partition import route_validation, routed_validation
from receraser_core.state_file import load_state
from tests.test_dagster import K, _cli, _env, _resource


def test_ledger_is_idempotent_and_all_or_nothing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    [(a, new_a)] = ledger.add([NewRequest("interaction", "1", "10", "gdpr")])
    [(b, new_b)] = ledger.add([NewRequest("interaction", "1", "10", "again")])
    assert new_a and not new_b and a == b and len(ledger.get()) == 1
    with pytest.raises(ValueError):
        ledger.add([NewRequest("user", "2"), NewRequest("bogus", "3")])
    assert [r.user_id for r in ledger.get()] == ["1"]  # the valid first row was rolled back too
    ledger.mark_applying({a: [2, 0]})
    assert ledger.get([a])[0].status == "applying" and ledger.get([a])[0].shards == [0, 2]
    ledger.mark_failed([a], "boom")
    assert ledger.outstanding()[0].error == "boom"
    ledger.add([NewRequest("interaction", "1", "10")])  # a repeated request re-queues a failed one
    assert ledger.get([a])[0].status == "pending"
    ledger.mark_applied([a], ["run1"], ["ml1"])
    row = ledger.get([a])[0]
    assert row.status == "applied" and row.dagster_runs == ["run1"] and row.applied_at
    assert Ledger(tmp_path / "l.sqlite").get([a])[0].status == "applied"  # durable


def test_request_validation(tmp_path: Path) -> None:
    rec = _resource(tmp_path)
    from pipelines.steps import prepare

    inter = prepare(rec.run_dir(), rec.pipeline_config())
    u = 0
    train_item = inter.item_ids[inter.train.indices[inter.train.indptr[u]]]
    test_item = inter.item_ids[inter.test.indices[inter.test.indptr[u]]]
    uid = str(inter.user_ids[u])
    assert check_request(inter, NewRequest("interaction", uid, str(train_item))) == 1
    assert check_request(inter, NewRequest("interaction", uid, str(test_item))) == 1  # a test record too
    every = inter.train[u].nnz + inter.valid[u].nnz + inter.test[u].nnz
    assert check_request(inter, NewRequest("user", uid)) == every  # all splits
    unseen = next(
        str(inter.item_ids[i]) for i in range(inter.n_items) if not (inter.train + inter.valid + inter.test)[u, i]
    )
    with pytest.raises(ForgetError, match="never interacted with item"):
        check_request(inter, NewRequest("interaction", uid, unseen))
    with pytest.raises(ForgetError, match="unknown user 'nobody'"):
        check_request(inter, NewRequest("user", "nobody"))
    with pytest.raises(ForgetError, match="unknown item '424242'"):
        check_request(inter, NewRequest("interaction", uid, "424242"))
    (tmp_path / "r.csv").write_text("user,item,reason\nu1,1001,x\nu2,*,erase\n")
    reqs = read_request_file(tmp_path / "r.csv")
    assert [(r.kind, r.user_id, r.item_id) for r in reqs] == [("interaction", "u1", "1001"), ("user", "u2", "")]
    (tmp_path / "bad.csv").write_text("who,what\n1,2\n")
    with pytest.raises(ForgetError, match="expected a header"):
        read_request_file(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("user,item\n,3\n")
    with pytest.raises(ForgetError, match="bad2.csv:2: empty user"):
        read_request_file(tmp_path / "bad2.csv")


def _pick_records(run: RunDir, shard: int, n: int) -> list[tuple[str, str]]:
    inter = load_interactions(run.interactions)
    part = load_partition(run)
    users = np.repeat(np.arange(inter.n_users), np.diff(inter.train.indptr))
    pos = np.flatnonzero(part.assignment == shard)[:n]
    return [(str(inter.user_ids[users[p]]), str(inter.item_ids[inter.train.indices[p]])) for p in pos]


@pytest.mark.parametrize("model", ["bpr", "wmf", "lightgcn"])
def test_forgetting_is_exact(tmp_path: Path, model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built with shards in parallel processes, unlearned in this process at another torch thread count: the
    retrained shard and the aggregator equal fits from scratch on a shard table built here, independently of
    the redaction code (the original training pairs of the stored assignment minus the deleted pairs)."""
    rec, tracker = _resource(tmp_path, model), MemoryTracker()
    cfg, run = rec.pipeline_config(), rec.run_dir()
    with instance_for_test() as instance:
        monkeypatch.setenv("DAGSTER_HOME", instance.root_directory)  # the shard worker processes open it
        run_graph(instance, rec, tracker, workers=2, log=lambda _: None)
        before = {k: run.shard_model(k).read_bytes() for k in range(K)}
        doomed = _pick_records(run, 1, 2)
        inter0 = load_interactions(run.interactions)
        assignment0 = load_partition(run).assignment
        ledger = ledger_for(rec)
        ledger.add([NewRequest("interaction", u, i, "zz-reason-7f3a") for u, i in doomed])
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            report = unlearn_pending(instance, rec, tracker, log=lambda _: None)
        finally:
            torch.set_num_threads(threads)
        assert report is not None and report.shards == [1] and report.records == 2
        assert all(r.status == "applied" and r.shards == [1] for r in ledger.get())
        assert set(graph_status(instance, rec).values()) == {"fresh"}

        inter = load_interactions(run.interactions)
        assert inter.train.nnz == inter0.train.nnz - 2
        for u, i in doomed:
            assert inter.train[inter.user_index(u), inter.item_index(i)] == 0
        # untouched shards: not retrained, files byte-identical
        assert all(run.shard_model(k).read_bytes() == before[k] for k in range(K) if k != 1)
        assert run.shard_model(1).read_bytes() != before[1]
        assert read_json(run.shard_fit(1))["torch_threads"] == TRAIN_THREADS
        # the shard table built independently: original pairs of shard 1, minus the deleted (user, item) pairs
        rows = np.repeat(np.arange(inter0.n_users), np.diff(inter0.train.indptr))
        cols = inter0.train.indices
        gone = {(inter0.user_index(u), inter0.item_index(i)) for u, i in doomed}
        keep = (assignment0 == 1) & np.array([(r, c) not in gone for r, c in zip(rows, cols, strict=True)])
        assert int((assignment0 == 1).sum() - keep.sum()) == 2
        remaining = pairs_to_csr(rows[keep], cols[keep], inter0.n_users, inter0.n_items)
        overrides = {**SHARD_DEFAULTS.get(cfg.model, {}), **cfg.model_overrides, "seed": cfg.seed + 1}
        fresh = build_model(cfg.model, inter.n_users, inter.n_items, **model_config(cfg.model, inter.name, overrides))
        # its validation pairs: routed over the remaining training pairs and their stored shards
        alive = np.array([(r, c) not in gone for r, c in zip(rows, cols, strict=True)])
        all_remaining = pairs_to_csr(rows[alive], cols[alive], inter0.n_users, inter0.n_items)
        routes = route_validation(inter.valid, all_remaining, assignment0[alive], K, cfg.seed)
        with training_threads():
            fresh_fit = fresh.fit(remaining, routed_validation(inter.valid, routes, 1))
        stored = load_model(run.shard_model(1))
        assert all(torch.equal(stored.params[n], fresh.params[n]) for n in fresh.params)
        assert read_json(run.shard_fit(1))["best_valid_recall@10"] == fresh_fit.best_valid_recall
        # and so does the aggregator, retrained from its seeded initialisation on the remaining data
        remaining_train = pairs_to_csr(*_pairs_without(inter0.train, gone), inter0.n_users, inter0.n_items)
        assert (remaining_train != inter.train).nnz == 0
        with training_threads():
            agg = AGGREGATORS[cfg.aggregator](shard_stack(run, cfg, inter, load_partition(run)), cfg.agg_config())
            agg.fit(remaining_train, inter.valid)
        stored_agg = load_state(run.aggregator)["state"]
        assert all(torch.equal(stored_agg[n], agg.state_dict()[n]) for n in stored_agg)
        # the serving model no longer masks the forgotten item: it is a candidate again
        serving, train = load_serving(run)
        u, i = doomed[0]
        assert train[inter.user_index(u), inter.item_index(i)] == 0
        assert serving.score(torch.tensor([inter.user_index(u)])).shape == (1, inter.n_items)
        # derived metadata follows the data
        diag = read_json(run.diagnostics)
        assert diag["sizes"][1] == int(keep.sum()) and sum(diag["sizes"]) == inter.train.nnz
        assert diag["users_per_shard"][1] == len(np.unique(rows[keep]))
        # the erasure report names the request, its shard, the runs that rebuilt it and what changed
        rep = erasure_report(instance, ledger, 1)
        assert rep["status"] == "applied" and rep["records_removed"] == 1 and rep["shards_retrained"] == [1]
        assert rep["rebuilt_and_why"]["shard 1"] == "held its training record" and len(rep["rebuilt_and_why"]) == 3
        assert rep["statement"].startswith("The serving model now equals a model trained from scratch")
        rebuilt = {m["asset"]: m for run_ in rep["dagster_runs"] for m in run_["rebuilt"]}
        assert {"shard_data[1]", "shard_model[1]", "aggregator"} <= set(rebuilt)
        assert rebuilt["shard_data[1]"]["data_version_before"] != rebuilt["shard_data[1]"]["data_version_after"]
        assert not any(f"shard_{a}[{k}]" in rebuilt for a in ("data", "model") for k in range(K) if k != 1)
        assert len(rep["dagster_runs"]) == 1  # one run: shard 1's data and model, the aggregator (evaluation after)
        text = format_report(rep)
        assert (
            "Deletion request #1" in text and "shard_model[1]" in text and "shard 1: held its training record" in text
        )
        # no trace of the request in the model files
        for path in [run.aggregator, run.serving, *(run.shard_model(k) for k in range(K)), run.shard_fit(1)]:
            assert b"zz-reason-7f3a" not in path.read_bytes() and b"receraser/deletions" not in path.read_bytes()


def _pairs_without(train: sp.csr_matrix, gone: set[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    rows = np.repeat(np.arange(train.shape[0]), np.diff(train.indptr))
    keep = np.array([(r, c) not in gone for r, c in zip(rows, train.indices, strict=True)])
    return rows[keep], train.indices[keep]


def test_user_erasure_and_batching(tmp_path: Path) -> None:
    rec, tracker = _resource(tmp_path), MemoryTracker()
    run = rec.run_dir()
    with instance_for_test() as instance:
        run_graph(instance, rec, tracker, log=lambda _: None)
        inter = load_interactions(run.interactions)
        uid = str(inter.user_ids[4])
        n = inter.train[4].nnz
        doomed = _pick_records(run, 0, 1)
        ledger_for(rec).add([NewRequest("user", uid), NewRequest("interaction", *doomed[0])])
        n_runs = len(tracker.runs)
        report = unlearn_pending(instance, rec, tracker, log=lambda _: None)
        assert report is not None and report.records == n + 1
        inter = load_interactions(run.interactions)
        assert inter.train[4].nnz == 0
        # one batch: each affected shard retrained once, one aggregator, one evaluation
        names = [r["name"] for r in tracker.runs[n_runs:]]
        assert names.count("aggregator") == 1
        assert sorted(n for n in names if n.startswith("shard_model")) == sorted(
            f"shard_model[{k}]" for k in report.shards
        )
        assert ledger_for(rec).outstanding() == []
        # applied once the aggregator serves; evaluation ran after, outside the deletion's latency
        assert names[-1].startswith("evaluation") and report.seconds["applied"] < report.seconds["total"]
        assert tracker.runs[-1]["id"] not in ledger_for(rec).get()[0].mlflow_runs
        # a full rebuild from source (store lost, embeddings and partition recomputed) never resurrects them
        run.interactions.unlink()
        run_graph(instance, rec, tracker, log=lambda _: None, rebuild=True)
        rebuilt = load_interactions(run.interactions)
        assert rebuilt.train[4].nnz == 0 and rebuilt.train.nnz == inter.train.nnz
        assert set(graph_status(instance, rec).values()) == {"fresh"}


def test_cli_forget_kill_and_fail_then_recover(tmp_path: Path) -> None:
    env = _env(tmp_path)
    assert _cli(["run"], env).returncode == 0
    status = json.loads(_cli(["status", "--json"], env).stdout)
    assert status["requests"] == []
    bad = _cli(["forget", "--user", "u0", "--item", "999999"], env)
    assert bad.returncode == 2 and "unknown item '999999'" in bad.stderr and "Traceback" not in bad.stderr
    out = _cli(["forget", "--user", "u3", "--all", "--reason", "gdpr"], env)
    assert out.returncode == 0, out.stderr
    again = _cli(["forget", "--user", "u3", "--all"], env)
    assert "already recorded (pending)" in again.stdout

    (run_root_dir,) = (tmp_path / "state" / "pipeline").iterdir()
    run = RunDir(run_root_dir)
    serving_before = run.serving.read_bytes()

    # killed mid-apply: the request stays 'applying', the previous model keeps serving
    proc = subprocess.Popen(
        [sys.executable, "-m", "receraser_cli.main", "unlearn"],
        env={**env, "RECERASER_FAULT_INJECTION": "hang_shard"},
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker = run.root / "fault-hang-started"
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists()
    # a second applier while the first holds the lock: one clear line, nothing applied twice
    busy = _cli(["unlearn"], env)
    assert busy.returncode == 2 and "another applier is applying deletion requests" in busy.stderr
    assert "Traceback" not in busy.stderr and len(busy.stderr.strip().splitlines()) == 1
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    marker.unlink()
    rows = json.loads(_cli(["status", "--json"], env).stdout)["requests"]
    assert [r["status"] for r in rows] == ["applying"]
    assert run.serving.read_bytes() == serving_before

    # a failing shard run marks the request failed, with the reason
    failed = _cli(["unlearn"], {**env, "RECERASER_FAULT_INJECTION": "fail_shard"})
    assert failed.returncode != 0
    rows = json.loads(_cli(["status", "--json"], env).stdout)["requests"]
    assert rows[0]["status"] == "failed" and "injected failure" in rows[0]["error"]
    assert run.serving.read_bytes() == serving_before

    # the next unlearn completes it
    ok = _cli(["unlearn", "--threads", "1"], env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "retraining shard" in ok.stdout and "aggregator done" in ok.stdout  # progress shown
    assert ok.stdout.index("applied request(s)") < ok.stdout.index("evaluation done")  # evaluation comes after
    rows = json.loads(_cli(["status", "--json"], env).stdout)["requests"]
    assert rows[0]["status"] == "applied" and rows[0]["records"] > 0 and rows[0]["dagster_runs"]
    assert run.serving.read_bytes() != serving_before
    rec_out = _cli(["recommend", "--user", "u3", "-n", "3"], env)  # an erased user's id is gone from the store
    assert rec_out.returncode == 2 and "unknown user id 'u3'" in rec_out.stderr
    # -n beyond what is left to rank lists only rankable items; -n below 1 is refused in one line
    many = _cli(["recommend", "--user", "u0", "-n", "1000000000"], env)
    masked = int(many.stdout.split("(")[1].split()[0])
    listed = [line for line in many.stdout.splitlines()[1:] if line.strip()]
    n_items = load_interactions(run.interactions).n_items
    assert many.returncode == 0 and masked > 0 and len(listed) == n_items - masked and "-inf" not in many.stdout
    for bad in ("0", "-1", "x"):
        refused = _cli(["recommend", "--user", "u0", "-n", bad], env)
        assert refused.returncode == 2 and "argument -n" in refused.stderr and "Traceback" not in refused.stderr


def _execute(instance: DagsterInstance, rec: ReceraserResource, tracker: MemoryTracker, request: Any) -> None:
    """What the Dagster daemon does with a sensor's run request: one run of its assets and partition."""
    names = [k.path[-1] for k in request.asset_selection]
    materialize_names(instance, names, rec, tracker, partition=request.partition_key, tags=request.tags)


def test_sensor_turns_a_batch_into_runs_of_the_affected_shards(tmp_path: Path) -> None:
    from dagster import build_sensor_context

    from dagster_project.sensors import deletion_sensor

    rec, tracker = _resource(tmp_path), MemoryTracker()
    run = rec.run_dir()
    with instance_for_test() as instance:
        run_graph(instance, rec, tracker, log=lambda _: None)

        def tick(cursor: str | None = None) -> Any:
            context = build_sensor_context(instance=instance, cursor=cursor)
            return deletion_sensor(context, receraser=rec, tracker=tracker)

        assert tick().__class__.__name__ == "SkipReason"
        before = {k: run.shard_model(k).read_bytes() for k in range(K)}
        doomed = _pick_records(run, 0, 1) + _pick_records(run, 2, 1)
        ledger_for(rec).add([NewRequest("interaction", u, i) for u, i in doomed])
        first = tick()  # redacts, records shard 0's and 2's deletion versions, requests shard 0's run
        assert [(r.partition_key, r.run_key) for r in first.run_requests] == [("0", "unlearn-1,2-shard-0")]
        assert [k.path[-1] for k in first.run_requests[0].asset_selection] == ["shard_data", "shard_model"]
        stale = {k for k, v in graph_status(instance, rec).items() if v != "fresh"}
        assert stale == {
            "shard_data[0]",
            "shard_data[2]",
            "shard_model[0]",
            "shard_model[2]",
            "aggregator",
            "evaluation",
        }
        assert all(r.status == "applying" for r in ledger_for(rec).get())
        assert tick(first.cursor).__class__.__name__ == "SkipReason"  # its run has not finished
        _execute(instance, rec, tracker, first.run_requests[0])
        second = tick(first.cursor)  # the last shard, the aggregator and evaluation in one run
        (final,) = second.run_requests
        assert final.partition_key == "2" and final.run_key == "unlearn-1,2-final"
        assert [k.path[-1] for k in final.asset_selection] == ["shard_data", "shard_model", "aggregator", "evaluation"]
        _execute(instance, rec, tracker, final)
        third = tick(first.cursor)
        assert not third.run_requests and third.cursor == ""
        assert all(r.status == "applied" and len(r.dagster_runs) == 2 for r in ledger_for(rec).get())
        assert set(graph_status(instance, rec).values()) == {"fresh"}
        # the batch's MLflow runs nest under one parent run, ended by the tick that saw the last run succeed
        parent = tracker.parents[-1]
        assert parent["name"] == "unlearn 1,2" and parent["tags"]["parent"] == "finished"
        nested = {r["name"] for r in tracker.runs if r["tags"].get("mlflow.parentRunId") == parent["id"]}
        assert {"shard_model[0]", "shard_model[2]", "aggregator"} <= nested
        assert run.shard_model(1).read_bytes() == before[1]  # the untouched shard: not retrained
        assert all(run.shard_model(k).read_bytes() != before[k] for k in (0, 2))
        assert len(instance.get_runs(filters=RunsFilter(tags={"receraser/deletions": "1,2"}))) == 2
        assert tick().__class__.__name__ == "SkipReason"


def _prepared_run(tmp_path: Path) -> tuple[RunDir, Ledger, list[tuple[str, str]]]:
    """A run directory with stored interactions and a partition (no models), a ledger, and 3 training records
    of shard 0 from one user with more records (so a wrong position hits another record of the same user)."""
    from pipelines.steps import partition, prepare, pretrain

    rec = _resource(tmp_path)
    run, cfg = rec.run_dir(), rec.pipeline_config()
    inter = prepare(run, cfg)
    pretrain(run, cfg)
    partition(run, cfg)
    u = int(np.argmax(np.diff(inter.train.indptr)))
    items = inter.train.indices[inter.train.indptr[u] : inter.train.indptr[u + 1]][:3]
    doomed = [(str(inter.user_ids[u]), str(inter.item_ids[i])) for i in items]
    return run, ledger_for(rec), doomed


def _remaining_pairs(run: RunDir) -> set[tuple[str, str]]:
    inter = load_interactions(run.interactions)
    coo = inter.train.tocoo()
    return {(str(inter.user_ids[r]), str(inter.item_ids[c])) for r, c in zip(coo.row, coo.col, strict=True)}


def test_redaction_is_idempotent_under_the_racy_interleaving(tmp_path: Path) -> None:
    run, ledger, doomed = _prepared_run(tmp_path)
    before = _remaining_pairs(run)
    ledger.add([NewRequest("interaction", u, i) for u, i in doomed])
    todo = ledger.outstanding()
    first, second = locate(run, todo), locate(run, todo)  # two appliers read the same state
    assert np.array_equal(first.positions, second.positions) and len(first.positions) == 3
    _, n1 = redact(run, todo)
    _, n2 = redact(run, todo)  # the second applier's redaction finds nothing left to remove
    assert (n1, n2) == (3, 0)
    assert _remaining_pairs(run) == before - set(doomed)
    assert len(np.load(run.assignment)["assignment"]) == len(before) - 3


_RACER = """
import sys, time, json
from pathlib import Path
import numpy as np
from pipelines.forget import locate, redact
from pipelines.ledger import Ledger
from pipelines.steps import RunDir
run, ledger = RunDir(Path(sys.argv[1])), Ledger(Path(sys.argv[2]))
with ledger.applier("racer " + sys.argv[3], wait=120, poll=0.05):
    t0 = time.time()
    todo = ledger.outstanding()
    loc = locate(run, todo)
    time.sleep(1.0)  # the window in which an unserialised second applier would locate the same records
    _, n = redact(run, todo)
    ledger.mark_applied([r.id for r in todo], [], [])
    t1 = time.time()
print(json.dumps({"start": t0, "end": t1, "located": int(len(loc.positions)), "removed": n}))
"""


def test_two_applier_processes_are_serialised(tmp_path: Path) -> None:
    run, ledger, doomed = _prepared_run(tmp_path)
    before = _remaining_pairs(run)
    ledger.add([NewRequest("interaction", u, i) for u, i in doomed])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(run.root), str(ledger.path), str(n)],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    outs = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    a, b = sorted(outs, key=lambda o: o["start"])
    assert a["end"] <= b["start"]  # one applier at a time
    assert sorted(o["removed"] for o in outs) == [0, 3]
    assert _remaining_pairs(run) == before - set(doomed)  # exactly the requested records are gone


def test_applier_lock_names_its_holder_and_survives_a_crash(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from pipelines.ledger import Ledger\n"
            "with Ledger(Path(sys.argv[1])).applier('holder'):\n"
            "    print('held', flush=True); time.sleep(600)",
            str(ledger.path),
        ],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(ApplierBusy, match=f"holder, pid {holder.pid} on"), ledger.applier("second", wait=0.3):
        pass
    holder.kill()  # kill -9: the lock row stays, but its holder is dead
    holder.wait()
    # taken over at once, no waiting for the lease; held, it turns a second taker away
    with ledger.applier("after the crash"), pytest.raises(ApplierBusy, match="after the crash"), ledger.applier("x"):
        pass
    with ledger.applier("free again"):
        pass
    # a holder on another machine that stopped refreshing its lease is replaced; a fresh one is honoured
    import sqlite3

    from pipelines.ledger import LEASE_SECONDS

    for age, busy in ((LEASE_SECONDS + 5, False), (1.0, True)):
        con = sqlite3.connect(ledger.path)
        con.execute(
            "INSERT OR REPLACE INTO applier_lock VALUES (1, 'remote', 'other-host', 1, '', 'then', ?)",
            (time.time() - age,),
        )
        con.commit()
        con.close()
        if busy:
            with pytest.raises(ApplierBusy, match="other-host"), ledger.applier("local"):
                pass
        else:
            with ledger.applier("local"):
                pass


@pytest.mark.slow
def test_killed_at_three_points_the_next_command_finishes_the_request(tmp_path: Path) -> None:
    """kill -9 during the redaction (between its two writes), a shard fit and the aggregator fit: the next
    `unlearn` or `run` completes the request (applied, the records gone), and the abandoned Dagster run is
    marked failed instead of showing as running forever."""
    from dagster import DagsterInstance, DagsterRunStatus

    env = _env(tmp_path)
    assert _cli(["run"], env).returncode == 0
    (run_root_dir,) = (tmp_path / "state" / "pipeline").iterdir()
    run = RunDir(run_root_dir)
    marker = run.root / "fault-hang-started"

    # bad request files: one line each, nothing recorded
    inter = load_interactions(run.interactions)
    good = f"{inter.user_ids[0]},{inter.item_ids[inter.train.indices[inter.train.indptr[0]]]}"
    bad_files = {
        "binary.csv": (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 20, "not UTF-8 text"),
        "latin1.csv": ("user,item\nJosé,1001\n".encode("latin-1"), "not UTF-8 text"),
        "nul.csv": (b"user,item\nu1,10\x0001\n", "unknown item"),
        "header.csv": (b"user,item,reason\n", "no requests in file"),
        "unknown.csv": (f"user,item\n{good}\nnobody-here,1001\n".encode(), "unknown user 'nobody-here'"),
    }
    (tmp_path / "a-directory").mkdir()
    checks = [(tmp_path / "a-directory", "not a file")]
    for name, (content, needle) in bad_files.items():
        (tmp_path / name).write_bytes(content)
        checks.append((tmp_path / name, needle))
    for path, needle in checks:
        bad = _cli(["forget", "--file", str(path)], env)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in bad.stderr, (
            path.name,
            bad.stderr[-500:],
        )
    assert json.loads(_cli(["status", "--json"], env).stdout)["requests"] == []

    for n, (point, recover) in enumerate((("redact", "unlearn"), ("shard", "run"), ("aggregator", "unlearn"))):
        user = f"u{10 * n + 1}"
        u = load_interactions(run.interactions).user_index(user)
        assert _cli(["forget", "--user", user, "--all"], env).returncode == 0
        proc = subprocess.Popen(
            [sys.executable, "-m", "receraser_cli.main", "unlearn"],
            env={**env, "RECERASER_FAULT_INJECTION": f"hang_{point}"},
            cwd=PROJECT_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.read_text() == point
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        marker.unlink()
        assert json.loads(_cli(["status", "--json"], env).stdout)["requests"][-1]["status"] == "applying"

        done = _cli([recover], env)
        assert done.returncode == 0, (point, done.stderr[-2000:])
        rows = json.loads(_cli(["status", "--json"], env).stdout)["requests"]
        assert [r["status"] for r in rows] == ["applied"] * (n + 1), point
        inter = load_interactions(run.interactions)
        assert inter.train[u].nnz == 0 and str(inter.user_ids[u]).startswith("erased:"), point  # id gone too
        instance = DagsterInstance.from_config(env["DAGSTER_HOME"])
        stuck = [r for r in instance.get_runs() if r.status in (DagsterRunStatus.STARTED, DagsterRunStatus.STARTING)]
        assert stuck == [], point
        if point != "redact":  # a Dagster run was under way when the applier died: now marked failed
            assert "abandoned deletion run(s) failed" in done.stdout, point
            failed = [r for r in instance.get_runs() if r.status == DagsterRunStatus.FAILURE]
            assert any("receraser/deletions" in r.tags for r in failed), point
        instance.dispose()
    report = _cli(["status", "--request", "3"], env)  # the erasure report, as printed and as JSON
    assert report.returncode == 0 and "Deletion request #3" in report.stdout and "shard_model[" in report.stdout
    assert "The serving model now equals a model trained from scratch" in report.stdout
    as_json = json.loads(_cli(["status", "--request", "3", "--json"], env).stdout)
    assert as_json["status"] == "applied" and as_json["records_removed"] > 0 and as_json["asked"]["kind"] == "user"
    assert as_json["asked"]["ids_erased"] and as_json["asked"]["user"] is None  # only the keyed hash is left
    missing = _cli(["status", "--request", "99"], env)
    assert missing.returncode == 2 and "no request #99" in missing.stderr


def test_validation_and_test_records_are_forgotten_and_their_shards_rebuilt(tmp_path: Path) -> None:
    """A validation record is removed from storage and every shard whose early stopping read it is retrained
    (exactly: equal to a fit on its shard with the remaining validation pairs); a test record only leaves the
    evaluation; a user request clears all three splits."""
    from pipelines.forget import validation_shards

    rec, tracker = _resource(tmp_path, "bpr", partitioner="random"), MemoryTracker()  # users in several shards
    cfg, run = rec.pipeline_config(), rec.run_dir()
    with instance_for_test() as instance:
        run_graph(instance, rec, tracker, log=lambda _: None)
        inter0, part0 = load_interactions(run.interactions), load_partition(run)
        shards0 = [part0.shard_matrix(inter0.train, k) for k in range(K)]
        v = inter0.valid.tocoo()
        # a validation pair that several shards hold both ends of: it early-stops exactly one (its route)
        routes0 = route_validation(inter0.valid, inter0.train, part0.assignment, K, cfg.seed)
        local = [
            (int(u), int(i), [k for k in range(K) if shards0[k][u].nnz and shards0[k][:, i].nnz], int(route))
            for u, i, route in zip(v.row, v.col, routes0, strict=True)
        ]
        u, i, candidates, routed = next(x for x in local if len(x[2]) >= 2)
        expected = [routed]
        assert routed in candidates
        t = inter0.test.tocoo()
        tu, ti = int(t.row[0]), int(t.col[0])
        before = {k: run.shard_model(k).read_bytes() for k in range(K)}
        uid, iid = str(inter0.user_ids[u]), str(inter0.item_ids[i])
        reqs = [
            NewRequest("interaction", uid, iid),
            NewRequest("interaction", str(inter0.user_ids[tu]), str(inter0.item_ids[ti])),
        ]
        ledger = ledger_for(rec)
        ledger.add(reqs)
        assert validation_shards(inter0, part0.assignment, ledger.get()[:1], "local") == candidates
        assert validation_shards(inter0, part0.assignment, ledger.get()[:1], "routed", routes0) == expected
        report = unlearn_pending(instance, rec, tracker, log=lambda _: None)
        assert report is not None and report.shards == expected and report.records == 0  # no training record
        rows = ledger.get()
        assert (
            [r.status for r in rows] == ["applied", "applied"] and rows[0].shards == expected and rows[1].shards == []
        )
        assert [r.records for r in rows] == [1, 1]
        # what each request made rebuild, and why (the erasure report prints it)
        assert rows[0].rebuilt == {
            **{f"shard {k}": "early-stopped on its validation record(s)" for k in expected},
            "aggregator": "trains on all remaining training data and selects on validation without it: retrained "
            "from its seeded start",
            "evaluation": "rerun on the new model and the remaining test data",
        }
        assert rows[1].rebuilt == {
            "evaluation": "1 test record(s) removed; rerun on the new model and the remaining test data"
        }
        inter = load_interactions(run.interactions)
        assert inter.valid[u, i] == 0 and inter.valid.nnz == inter0.valid.nnz - 1
        assert inter.test[tu, ti] == 0 and inter.test.nnz == inter0.test.nnz - 1
        assert (inter.train != inter0.train).nnz == 0
        assert all(run.shard_model(k).read_bytes() == before[k] for k in range(K) if k not in expected)
        k = expected[0]
        overrides = {**SHARD_DEFAULTS.get(cfg.model, {}), **cfg.model_overrides, "seed": cfg.seed + k}
        fresh = build_model(cfg.model, inter.n_users, inter.n_items, **model_config(cfg.model, inter.name, overrides))
        routes = route_validation(inter.valid, inter.train, part0.assignment, K, cfg.seed)
        assert np.array_equal(
            routes, np.delete(routes0, inter0.valid.indptr[u] + np.flatnonzero(inter0.valid[u].indices == i))
        )
        with training_threads():
            fresh_fit = fresh.fit(shards0[k], routed_validation(inter.valid, routes, k))
        assert all(torch.equal(load_model(run.shard_model(k)).params[n], fresh.params[n]) for n in fresh.params)
        assert read_json(run.shard_fit(k))["best_valid_recall@10"] == fresh_fit.best_valid_recall
        assert set(graph_status(instance, rec).values()) == {"fresh"}

        # a user's erasure clears the user from train, validation and test
        ledger.add([NewRequest("user", uid)])
        unlearn_pending(instance, rec, tracker, log=lambda _: None)
        inter = load_interactions(run.interactions)
        assert inter.train[u].nnz == inter.valid[u].nnz == inter.test[u].nnz == 0


def test_a_training_deletion_that_moves_validation_routes_retrains_both_shards(tmp_path: Path) -> None:
    """Each validation pair early-stops one shard. Deleting a user's last training record in shard k moves the
    user's validation pairs routed to k to another shard holding both ends: that shard is retrained too, and
    every retrained shard equals a fit on its remaining data with the validation pairs routed from scratch."""
    rec, tracker = _resource(tmp_path, "bpr", partitioner="random"), MemoryTracker()  # users in several shards
    cfg, run = rec.pipeline_config(), rec.run_dir()
    with instance_for_test() as instance:
        run_graph(instance, rec, tracker, log=lambda _: None)
        inter0, a = load_interactions(run.interactions), load_partition(run).assignment
        n_u, n_i = inter0.n_users, inter0.n_items
        rows, cols = np.repeat(np.arange(n_u), np.diff(inter0.train.indptr)), inter0.train.indices
        vrows = np.repeat(np.arange(n_u), np.diff(inter0.valid.indptr))
        routes0 = route_validation(inter0.valid, inter0.train, a, K, cfg.seed)
        found = None
        for p in range(len(a)):
            u, k = rows[p], a[p]
            if ((rows == u) & (a == k)).sum() != 1 or not ((vrows == u) & (routes0 == k)).any():
                continue  # not the user's last record in k, or none of the user's validation pairs is routed to k
            keep = np.arange(len(a)) != p
            routes1 = route_validation(
                inter0.valid, pairs_to_csr(rows[keep], cols[keep], n_u, n_i), a[keep], K, cfg.seed
            )
            moved = routes1 != routes0
            if set(routes1[moved].tolist()) - {-1, int(k)}:
                found = (p, int(k), keep, routes1, moved)
                break
        assert found is not None, "the test data has no deletion that moves a validation route"
        p, k, keep, routes1, moved = found
        expected = sorted({k, *routes0[moved].tolist(), *routes1[moved].tolist()} - {-1})
        before = {s: run.shard_model(s).read_bytes() for s in range(K)}
        ledger = ledger_for(rec)
        ledger.add([NewRequest("interaction", str(inter0.user_ids[rows[p]]), str(inter0.item_ids[cols[p]]))])
        report = unlearn_pending(instance, rec, tracker, log=lambda _: None)
        assert report is not None and report.shards == expected and len(expected) >= 2
        why = ledger.get()[0].rebuilt
        assert why[f"shard {k}"] == "held its training record"
        for s in set(routes1[moved].tolist()) - {-1, k}:
            assert "validation pairs changed" in why[f"shard {s}"]
        assert all(run.shard_model(s).read_bytes() == before[s] for s in range(K) if s not in expected)
        for s in expected:
            mine = keep & (a == s)
            overrides = {**SHARD_DEFAULTS.get(cfg.model, {}), **cfg.model_overrides, "seed": cfg.seed + s}
            fresh = build_model(cfg.model, n_u, n_i, **model_config(cfg.model, inter0.name, overrides))
            with training_threads():
                fit = fresh.fit(
                    pairs_to_csr(rows[mine], cols[mine], n_u, n_i), routed_validation(inter0.valid, routes1, s)
                )
            assert all(torch.equal(load_model(run.shard_model(s)).params[n], fresh.params[n]) for n in fresh.params)
            assert read_json(run.shard_fit(s))["best_valid_recall@10"] == fit.best_valid_recall
        assert set(graph_status(instance, rec).values()) == {"fresh"}


ERASED_USER, OTHER_ITEM = "zz-subject-5f1e", "zz-item-9c2b"


def _holds(path: Path, needle: str) -> bool:
    """Whether a file holds the text in any common encoding, looking inside zip archives (npz, torch files) too."""
    import zipfile

    forms = [needle.encode(enc) for enc in ("utf-8", "utf-16-le", "utf-32-le")]
    blobs = [path.read_bytes()]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            blobs += [z.read(name) for name in z.namelist()]
    return any(form in blob for form in forms for blob in blobs)


def test_no_copy_left_behind_in_any_store(tmp_path: Path) -> None:
    """After a user's erasure and a record's deletion are applied, no file under the state directory (data,
    shards, models, serving snapshot, ledger, Dagster's storage, MLflow's) holds the user's id or the record's
    ids in the ledger; a rebuild from the source, which still has them, removes them again by keyed hash."""
    env = _env(tmp_path)
    csv = tmp_path / "blocks.csv"
    text = csv.read_text().replace("\nu7,", f"\n{ERASED_USER},").replace(",1003\n", f",{OTHER_ITEM}\n")
    csv.write_text(text)
    other = next(line.split(",")[0] for line in text.splitlines() if line.endswith(OTHER_ITEM))
    assert _cli(["run"], env).returncode == 0
    state = Path(env["RECERASER_HOME"])
    assert any(_holds(p, ERASED_USER) for p in state.rglob("*") if p.is_file())  # the search finds it before
    forget = _cli(["forget", "--user", ERASED_USER, "--all", "--reason", "gdpr art. 17"], env)
    assert forget.returncode == 0, forget.stderr
    assert _cli(["forget", "--user", other, "--item", OTHER_ITEM], env).returncode == 0
    applied = _cli(["unlearn"], env)
    assert applied.returncode == 0, applied.stderr
    holders = [str(p) for p in state.rglob("*") if p.is_file() and _holds(p, ERASED_USER)]
    assert holders == []
    (ledger,) = state.rglob("ledger.sqlite")
    assert not _holds(ledger, OTHER_ITEM) and not _holds(ledger, other)
    # the erased user is unknown now; repeating either request is recognised, not re-applied
    assert "unknown user" in _cli(["recommend", "--user", ERASED_USER], env).stderr
    again = _cli(["forget", "--user", ERASED_USER, "--all"], env)
    assert again.returncode == 0 and "already recorded (applied)" in again.stdout, again.stderr
    status = _cli(["status"], env).stdout
    assert "(erased)" in status and ERASED_USER not in status
    report = _cli(["status", "--request", "1"], env).stdout
    assert "ids erased once applied" in report and "gdpr art. 17" in report
    # the store lost and rebuilt from the source (which still holds the user): removed again, by keyed hash
    (interactions,) = state.rglob("interactions.npz")
    before = load_interactions(interactions)
    interactions.unlink()
    assert _cli(["run"], env).returncode == 0
    rebuilt = load_interactions(interactions)
    assert not _holds(interactions, ERASED_USER)
    for split in ("train", "valid", "test"):
        assert (getattr(rebuilt, split) != getattr(before, split)).nnz == 0, split
    assert list(rebuilt.user_ids) == list(before.user_ids)


def test_an_older_ledger_is_upgraded_and_a_lost_key_is_one_line(tmp_path: Path) -> None:
    """A ledger from before keyed hashes gets them (and a key) on open, and its applied requests' ids are
    erased; once hashed, opening it without its key refuses in one line instead of making a new key."""
    import sqlite3

    path = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as con:  # the first release's table
        con.execute(
            "CREATE TABLE requests (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, user_id TEXT NOT NULL, "
            "item_id TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '', received_at TEXT NOT NULL, "
            "status TEXT NOT NULL DEFAULT 'pending', records INTEGER NOT NULL DEFAULT 0, shards TEXT NOT NULL "
            "DEFAULT '[]', dagster_runs TEXT NOT NULL DEFAULT '[]', mlflow_runs TEXT NOT NULL DEFAULT '[]', error TEXT "
            "NOT NULL DEFAULT '', applied_at TEXT NOT NULL DEFAULT '', UNIQUE (kind, user_id, item_id))"
        )
        con.execute(
            "INSERT INTO requests (kind, user_id, received_at, status) VALUES ('user', 'zz-old-77', 'x', 'applied')"
        )
        con.execute("INSERT INTO requests (kind, user_id, item_id, received_at) VALUES ('interaction', 'u2', '5', 'x')")
    ledger = Ledger(path)
    old, pending = ledger.get()
    assert old.erased and old.subject == ledger.subject("user", "zz-old-77") and not _holds(path, "zz-old-77")
    assert (
        not pending.erased and pending.user_id == "u2" and pending.subject == ledger.subject("interaction", "u2", "5")
    )
    assert ledger.find(NewRequest("user", "zz-old-77")) == old  # a repeat is still recognised
    (tmp_path / "ledger.key").unlink()
    with pytest.raises(DataError, match="ledger.key is missing") as err:
        Ledger(path)
    assert "\n" not in str(err.value)


def test_a_batch_routes_only_the_validation_entries_it_can_move(tmp_path: Path) -> None:
    """`prepare_batch` routes only the validation entries of the batch's users and items (`affected_entries`):
    the routes of those entries, and the shards whose routed pairs move, are what routing every entry gives."""
    from pipelines.config import PipelineConfig
    from pipelines.forget import affected_entries, rerouted_shards
    from receraser_core.data.interactions import Interactions

    rng = np.random.default_rng(5)
    n_users, n_items, k = 300, 120, 4

    def table(n: int) -> sp.csr_matrix:
        return pairs_to_csr(rng.integers(0, n_users, n), rng.integers(0, n_items, n), n_users, n_items)

    ids = np.array([str(u) for u in range(n_users)]), np.array([str(100 + i) for i in range(n_items)])
    inter = Interactions("synthetic", table(3000), table(600), table(600), *ids)
    assignment = rng.integers(0, k, inter.train.nnz)
    cfg = PipelineConfig(n_shards=k)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    users = np.repeat(np.arange(n_users), np.diff(inter.train.indptr))
    full = validation_routes(inter, cfg, assignment)
    # records that are their shard's only one of their item: removing them moves validation pairs routed there
    key = assignment * n_items + inter.train.indices
    lone = np.flatnonzero(np.bincount(key, minlength=k * n_items)[key] == 1)
    every_move: set[int] = set()
    for trial in range(6):
        picks = rng.choice(lone if trial % 2 else np.arange(inter.train.nnz), size=1 + trial, replace=False)
        new = [NewRequest("interaction", ids[0][users[p]], ids[1][inter.train.indices[p]]) for p in picks]
        if trial == 5:
            new = [NewRequest("user", ids[0][users[picks[0]]])]
        added = [rid for rid, _ in ledger.add(new)]
        todo = [r for r in ledger.get() if r.id in added]
        only = affected_entries(inter, todo)
        assert 0 < only.sum() < inter.valid.nnz
        part = validation_routes(inter, cfg, assignment, only)
        assert np.array_equal(part[only], full[only]) and (part[~only] == -1).all()
        moved = rerouted_shards(inter, assignment, todo, part, cfg, only)
        assert moved == rerouted_shards(inter, assignment, todo, full, cfg)
        every_move |= set(moved)
    assert every_move  # some trial did move routed pairs


def test_removing_entries_cuts_the_csr_arrays_to_the_rebuilt_matrix() -> None:
    from pipelines.forget import _without
    from receraser_core.data.interactions import csr_to_pairs

    rng = np.random.default_rng(0)
    for _ in range(100):
        n_users, n_items = int(rng.integers(1, 30)), int(rng.integers(1, 30))
        m = pairs_to_csr(rng.integers(0, n_users, 100), rng.integers(0, n_items, 100), n_users, n_items)
        positions = rng.choice(m.nnz, size=int(rng.integers(0, m.nnz + 1)), replace=False)
        rows, cols = csr_to_pairs(m)
        keep = np.ones(m.nnz, dtype=bool)
        keep[positions] = False
        rebuilt = pairs_to_csr(rows[keep], cols[keep], n_users, n_items)
        cut = _without(m, positions)
        assert np.array_equal(cut.indptr, rebuilt.indptr) and np.array_equal(cut.indices, rebuilt.indices)
        assert cut.dtype == rebuilt.dtype and cut.has_sorted_indices
