"""Applying the deletion ledger through the asset graph (DESIGN.md section 3).

All outstanding requests are applied together (batched unlearning): their records are redacted from the
stored training data, every shard that held one is retrained once, the other shards' data is re-checked
(same content, same data version, no retraining), then the aggregator and evaluation are rebuilt. A request
becomes ``applied`` only after all of that succeeded; on any failure it is marked ``failed`` with the reason
and the next `unlearn` retries it. The serving snapshot is replaced only by the aggregator step, so until
then the previous model keeps serving.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from dagster_project.orchestrate import materialize_names
from dagster_project.partitions import shard_partitions
from dagster_project.resources import ReceraserResource, ledger_for
from pipelines.forget import finish_interrupted_redaction, locate, redact, split_counts, validation_shards
from pipelines.ledger import Ledger
from pipelines.steps import load_interactions, load_partition
from pipelines.tracking import Tracker


@dataclass
class _Recording:
    """Wraps a tracker and remembers the run ids it logged."""

    inner: Tracker
    ids: list[str] = field(default_factory=list)

    def log_run(self, *args: Any, **kwargs: Any) -> str:
        rid = self.inner.log_run(*args, **kwargs)
        self.ids.append(rid)
        return rid


@dataclass
class UnlearnReport:
    request_ids: list[int]
    records: int
    shards: list[int]
    dagster_runs: list[str]
    seconds: dict[str, float]


def unlearn_pending(
    instance: DagsterInstance,
    rec: ReceraserResource,
    tracker: Tracker,
    log: Callable[[str], None] = print,
    wait: float = 0.0,
    owner: str = "receraser unlearn",
) -> UnlearnReport | None:
    """Apply every outstanding request of the ledger; None when there is nothing to do.

    Holds the ledger's applier lock throughout (`Ledger.applier`; waits up to ``wait`` seconds for another
    applier, then raises `ApplierBusy`), so two appliers never redact the same state."""
    ledger = ledger_for(rec)
    with ledger.applier(owner, wait=wait):
        fail_abandoned_runs(instance, log)
        return _apply_outstanding(instance, rec, tracker, ledger, log)


def fail_abandoned_runs(instance: DagsterInstance, log: Callable[[str], None] = print) -> list[str]:
    """Mark failed the deletion runs (tagged ``receraser/deletions``) that Dagster still shows as started or
    starting: called while holding the applier lock, so no live process can own them (a killed applier left
    them). Returns their run ids."""
    stuck = instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED, DagsterRunStatus.STARTING]))
    ids = []
    for dagster_run in stuck:
        if "receraser/deletions" in dagster_run.tags:
            instance.report_run_failed(
                dagster_run, "abandoned: the process applying this deletion ended before the run finished"
            )
            ids.append(dagster_run.run_id)
    if ids:
        log(f"marked {len(ids)} abandoned deletion run(s) failed: {', '.join(i[:8] for i in ids)}")
    return ids


def _apply_outstanding(
    instance: DagsterInstance, rec: ReceraserResource, tracker: Tracker, ledger: Ledger, log: Callable[[str], None]
) -> UnlearnReport | None:
    todo = ledger.outstanding()
    if not todo:
        log("no outstanding deletion requests")
        return None
    run = rec.run_dir()
    ids = [r.id for r in todo]
    t0 = time.perf_counter()
    try:
        if finish_interrupted_redaction(run, todo):
            log("finished a redaction that an interrupted unlearn had started")
        loc = locate(run, todo)
        inter, assignment = load_interactions(run.interactions), load_partition(run).assignment
        scope = rec.pipeline_config().shard_valid
        shards_by_id = {  # the shards holding a training record, and those early-stopping on a validation record
            r.id: sorted(
                set(r.shards)
                | set(loc.shards[np.isin(loc.positions, loc.by_request[r.id])].tolist())
                | set(validation_shards(inter, assignment, [r], scope))
            )
            for r in todo
        }
        counts = {r.id: sum(split_counts(inter, r).values()) for r in todo}
        ledger.mark_applying(shards_by_id, counts)  # durable before any data changes
        affected = sorted({k for s in shards_by_id.values() for k in s})
        _, removed = redact(run, todo)
        log(
            f"applying {len(ids)} request(s): {removed} training record(s) removed, "
            f"shard(s) {affected or 'none'} to retrain"
        )
        seconds = {"redact": time.perf_counter() - t0}
        recorder = _Recording(tracker)
        tags = {"receraser/keep_interactions": "1", "receraser/deletions": ",".join(map(str, ids))}
        runs = [
            materialize_names(
                instance, ["interactions", "wmf_embeddings", "shard_assignment"], rec, recorder, tags=tags
            )
        ]
        seconds["upstream"] = time.perf_counter() - t0 - seconds["redact"]
        t1 = time.perf_counter()
        for key in shard_partitions.get_partition_keys():
            retrain = int(key) in affected
            names = ["shard_data", "shard_model"] if retrain else ["shard_data"]
            if retrain:
                log(f"  retraining shard {key} ...")
            tk = time.perf_counter()
            runs.append(materialize_names(instance, names, rec, recorder, partition=key, tags=tags))
            if retrain:
                log(f"  shard {key} retrained in {time.perf_counter() - tk:.1f} s")
        seconds["shards"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        log("  retraining the aggregator over all shards ...")
        runs.append(materialize_names(instance, ["aggregator"], rec, recorder, tags=tags))
        seconds["aggregator"] = time.perf_counter() - t2
        log(f"  aggregator done in {seconds['aggregator']:.1f} s; the new model serves")
    except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised
        ledger.mark_failed(ids, f"{type(exc).__name__}: {exc}")
        raise
    # applied: the serving snapshot (written by the aggregator step) no longer holds the records; evaluation
    # follows and is logged, but is not part of the latency of a deletion
    ledger.mark_applied(ids, runs, recorder.ids)
    seconds["applied"] = time.perf_counter() - t0
    log(f"applied request(s) {', '.join(map(str, ids))} in {seconds['applied']:.1f} s; evaluating ...")
    t3 = time.perf_counter()
    try:
        runs.append(materialize_names(instance, ["evaluation"], rec, recorder, tags=tags))
    except Exception as exc:  # noqa: BLE001 - the deletion stands; `receraser run` re-evaluates
        log(f"  evaluation failed ({type(exc).__name__}: {exc}); the deletion is applied, rerun `receraser run`")
    seconds["evaluation"] = time.perf_counter() - t3
    seconds["total"] = time.perf_counter() - t0
    log(f"  evaluation done in {seconds['evaluation']:.1f} s")
    return UnlearnReport(ids, int(len(loc.positions)), affected, runs, seconds)
