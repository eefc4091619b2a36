"""Applying the deletion ledger through the asset graph (DESIGN.md section 3).

All outstanding requests are applied together (batched unlearning). `prepare_batch` redacts their records from
the stored data and records in Dagster a new deletion version for each shard that held one (only those
partitions go stale); `Batch.runs` lays the rebuild out as Dagster runs: one run per affected shard
(`shard_data` + `shard_model`), the last of them also rebuilding the aggregator, so a batch touching m shards
takes m runs, plus one for evaluation; then each compared configuration (`ReceraserResource.compared`) gets a
run per shard of its whose data changed, the last with its aggregator and evaluation (`Batch.phases`).
`receraser unlearn` executes them in this process; the deletion sensor
(`sensors.py`) turns the same batch into `RunRequest`s. A request becomes ``applied`` once the aggregator over
the rebuilt shards serves; on any failure it is marked ``failed`` with the reason and the next `unlearn`
retries it. The serving snapshot is replaced only by the aggregator step, so until then the previous model
keeps serving.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from dagster_project.orchestrate import follow_main, materialize_names, observe_deletions
from dagster_project.resources import ReceraserResource, ledger_for
from pipelines.forget import (
    affected_entries,
    finish_interrupted_redaction,
    locate,
    redact,
    rerouted_shards,
    split_counts,
    validation_shards,
)
from pipelines.ledger import ApplierBusy, Ledger, Request
from pipelines.steps import load_interactions, load_partition, validation_routes
from pipelines.tracking import PARENT_TAG, Tracker

DELETIONS_TAG = "receraser/deletions"  # request ids: MLflow runs are tagged with them, nothing computes from it
LAUNCHED_BY_TAG = "receraser/launched_by"  # "unlearn" (this process) or "sensor" (the Dagster daemon)
IN_FLIGHT = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
]


@dataclass(frozen=True)
class RunSpec:
    """One Dagster run of a batch: the assets it materializes, the shard partition (None: unpartitioned) and the
    configuration ("" the main one, else a compared configuration's name)."""

    assets: tuple[str, ...]
    partition: str | None
    config: str = ""

    @property
    def stage(self) -> str:
        """The run's stage in its batch (a run key and a tag): ``shard-3``, ``final``, ``sisa/final``."""
        last = "aggregator" in self.assets or "evaluation" in self.assets
        own = "final" if last else f"shard-{self.partition}"
        return f"{self.config}/{own}" if self.config else own


def _runs(config: str, shards: list[int], aggregator: bool, evaluation: bool) -> tuple[list[RunSpec], RunSpec | None]:
    """A configuration's runs for a batch: every affected shard but the last (its data and model), then the last
    shard with the aggregator (and evaluation, if asked); None when nothing but evaluation is asked."""
    first = [RunSpec(("shard_data", "shard_model"), str(k), config) for k in shards[:-1]]
    tail: tuple[str, ...] = ("aggregator",) if aggregator else ()
    tail += ("evaluation",) if evaluation else ()
    if shards:
        return first, RunSpec(("shard_data", "shard_model", *tail), str(shards[-1]), config)
    return first, RunSpec(tail, None, config) if tail else None


@dataclass
class Batch:
    """The outstanding requests being applied together, after their redaction."""

    ids: list[int]
    shards: list[int]
    records: int
    aggregator: bool  # False only when every request named test records alone (only evaluation read them)
    seconds: dict[str, float] = field(default_factory=dict)
    #: compared configurations (name -> their shards whose data changed), rebuilt after the main one
    compared: dict[str, list[int]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return "unlearn-" + ",".join(map(str, self.ids))

    def tags(self, launched_by: str) -> dict[str, str]:
        return {DELETIONS_TAG: ",".join(map(str, self.ids)), LAUNCHED_BY_TAG: launched_by}

    def shard_runs(self) -> list[RunSpec]:
        """Every affected shard but the last: its data and model."""
        return _runs("", self.shards, self.aggregator, False)[0]

    def final_run(self, evaluation: bool) -> RunSpec | None:
        """The last shard with the aggregator (and evaluation, if asked); None when nothing but evaluation."""
        return _runs("", self.shards, self.aggregator, evaluation)[1]

    def phases(self, evaluation: bool) -> list[list[RunSpec]]:
        """The batch's runs in the order they may start: the main configuration's shards, its final run, then
        every compared configuration's shards, then their final runs (with evaluation: the main one's comes
        after the request is applied, theirs with their aggregators)."""
        main = [self.shard_runs(), [r for r in [self.final_run(evaluation)] if r]]
        compared = [_runs(name, shards, self.aggregator, True) for name, shards in self.compared.items()]
        return [*main, [r for first, _ in compared for r in first], [last for _, last in compared if last]]


@dataclass
class _Recording:
    """Wraps a tracker and remembers the run ids it logged."""

    inner: Tracker
    ids: list[str] = field(default_factory=list)

    def log_run(self, *args: Any, **kwargs: Any) -> str:
        rid = self.inner.log_run(*args, **kwargs)
        self.ids.append(rid)
        return rid

    def start_parent(self, experiment: str, name: str, tags: dict[str, str]) -> str:
        rid = self.inner.start_parent(experiment, name, tags)
        self.ids.append(rid)
        return rid

    def end_parent(self, run_id: str, failed: bool = False) -> None:
        self.inner.end_parent(run_id, failed)

    def register_model(self, name: str, run_id: str, model_dir: Path, tags: dict[str, str], forgotten: str) -> str:
        return self.inner.register_model(name, run_id, model_dir, tags, forgotten)


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
    """Apply every outstanding request of the ledger in this process; None when there is nothing to do.

    Holds the ledger's applier lock throughout (`Ledger.applier`; waits up to ``wait`` seconds for another
    applier, then raises `ApplierBusy`), so two appliers never redact the same state; refuses while runs the
    deletion sensor launched are still applying a batch."""
    ledger = ledger_for(rec)
    with ledger.applier(owner, wait=wait):
        busy = sensor_runs_in_flight(instance)
        if busy:
            raise ApplierBusy(
                f"Dagster run(s) {', '.join(r[:8] for r in busy)} launched by the deletion sensor are applying "
                "requests; wait for them to finish (the Dagster UI shows them)"
            )
        fail_abandoned_runs(instance, log)
        return _apply_outstanding(instance, rec, tracker, ledger, log)


def sensor_runs_in_flight(instance: DagsterInstance) -> list[str]:
    runs = instance.get_runs(filters=RunsFilter(statuses=IN_FLIGHT, tags={LAUNCHED_BY_TAG: "sensor"}))
    return [r.run_id for r in runs]


def fail_abandoned_runs(instance: DagsterInstance, log: Callable[[str], None] = print) -> list[str]:
    """Mark failed the deletion runs `unlearn` started (tagged ``receraser/launched_by=unlearn``) that Dagster
    still shows as started or starting: called while holding the applier lock, so no live process can own them
    (a killed applier left them). Returns their run ids."""
    stuck = instance.get_runs(
        filters=RunsFilter(
            statuses=[DagsterRunStatus.STARTED, DagsterRunStatus.STARTING], tags={LAUNCHED_BY_TAG: "unlearn"}
        )
    )
    for dagster_run in stuck:
        instance.report_run_failed(
            dagster_run, "abandoned: the process applying this deletion ended before the run finished"
        )
    ids = [r.run_id for r in stuck]
    if ids:
        log(f"marked {len(ids)} abandoned deletion run(s) failed: {', '.join(i[:8] for i in ids)}")
    return ids


def prepare_batch(
    instance: DagsterInstance, rec: ReceraserResource, ledger: Ledger, todo: list[Request], log: Callable[[str], None]
) -> Batch:
    """Redact the requests' records (marking them ``applying`` first, with the shards they touch) and record
    the affected shards' new deletion versions in Dagster. Call with the applier lock held."""
    t0 = time.perf_counter()
    run = rec.run_dir()
    if finish_interrupted_redaction(run, todo):
        log("finished a redaction that an interrupted unlearn had started")
    inter = load_interactions(run.interactions)
    assignment = load_partition(run, inter).assignment
    loc = locate(run, todo, inter, assignment)
    cfg = rec.pipeline_config()
    # the routes of the validation entries the batch can move (its users' and items'), not of all of them
    only = affected_entries(inter, todo) if cfg.shard_valid == "routed" else None
    routes = validation_routes(inter, cfg, assignment, only) if only is not None else None
    held = {r.id: loc.shards[np.isin(loc.positions, loc.by_request[r.id])].tolist() for r in todo}
    stopped = {r.id: validation_shards(inter, assignment, [r], cfg.shard_valid, routes) for r in todo}
    # validation pairs of others that the batch's training removals move to another shard (one list for the
    # batch: a move can follow from several requests' records together)
    moved = rerouted_shards(inter, assignment, todo, routes, cfg, only) if routes is not None else []
    # the shards holding a training record, and those early-stopping on a validation record
    moved_by = {r.id: moved if held[r.id] else [] for r in todo}  # named for the requests that removed training
    shards_by_id = {r.id: sorted({*r.shards, *held[r.id], *stopped[r.id], *moved_by[r.id]}) for r in todo}
    counts = {r.id: split_counts(inter, r) for r in todo}
    rebuilt = {r.id: _why(held[r.id], stopped[r.id], moved_by[r.id], counts[r.id]) for r in todo}
    ledger.mark_applying(shards_by_id, {rid: sum(c.values()) for rid, c in counts.items()}, rebuilt)  # first
    _, removed = redact(run, todo)
    shards = sorted({k for s in shards_by_id.values() for k in s})
    observe_deletions(instance, rec, [str(k) for k in shards])
    test_only = all(c["test"] and not c["train"] and not c["valid"] for c in counts.values())
    log(f"applying {len(todo)} request(s): {removed} record(s) removed, shard(s) {shards or 'none'} to retrain")
    compared = {}
    for name, other in rec.compared().items():  # their stores drop the records too; changed shards go stale
        if other.run_dir().assignment.exists():
            compared[name] = sorted(int(k) for k in follow_main(instance, other))
            log(f"  compared configuration {name}: shard(s) {compared[name] or 'none'} to retrain")
    seconds = {"redact": time.perf_counter() - t0}
    return Batch([r.id for r in todo], shards, int(len(loc.positions)), not test_only, seconds, compared)


def _why(held: list[int], stopped: list[int], moved: list[int], counts: dict[str, int]) -> dict[str, str]:
    """What a request makes rebuild and why, for the erasure report ({} when its records are already gone)."""
    if not any(counts.values()):
        return {}
    out: dict[str, list[str]] = {}
    for k in sorted(set(held)):
        n = held.count(k)
        out.setdefault(f"shard {k}", []).append(
            f"held {n} of its training records" if n > 1 else "held its training record"
        )
    for k in stopped:
        out.setdefault(f"shard {k}", []).append("early-stopped on its validation record(s)")
    for k in sorted(set(moved) - set(held)):
        out.setdefault(f"shard {k}", []).append(
            "its validation pairs changed: the batch removed a shard's last training record of a user or item, "
            "and the validation pairs routed there moved"
        )
    why = {key: "; ".join(reasons) for key, reasons in out.items()}
    if counts["train"] or counts["valid"]:
        selected = " and selects on validation without it" if counts["valid"] else ""
        why["aggregator"] = f"trains on all remaining training data{selected}: retrained from its seeded start"
    tested = f"{counts['test']} test record(s) removed; " if counts["test"] else ""
    why["evaluation"] = f"{tested}rerun on the new model and the remaining test data"
    return why


def _apply_outstanding(
    instance: DagsterInstance, rec: ReceraserResource, tracker: Tracker, ledger: Ledger, log: Callable[[str], None]
) -> UnlearnReport | None:
    todo = ledger.outstanding()
    if not todo:
        log("no outstanding deletion requests")
        return None
    ids = [r.id for r in todo]
    t0 = time.perf_counter()
    recorder = _Recording(tracker)
    runs: list[str] = []
    # one MLflow parent run per batch: the runs of the deletion nest under it in the UI
    joined = ",".join(map(str, ids))
    parent = recorder.start_parent(rec.experiment(), f"unlearn {joined}", {"deletion_requests": joined})
    try:
        batch = prepare_batch(instance, rec, ledger, todo, log)
        tags = {**batch.tags("unlearn"), PARENT_TAG: parent}
        configs = {"": rec, **rec.compared()}
        for spec in [spec for phase in batch.phases(evaluation=False) for spec in phase]:
            what = f"shard {spec.partition}" if spec.partition is not None else ""
            what += (" and " if what else "") + "the aggregator" if "aggregator" in spec.assets else ""
            what = f"{spec.config}: {what or 'evaluation'}" if spec.config else what
            log(f"  retraining {what} ...")
            tk = time.perf_counter()
            own = configs[spec.config]
            runs.append(materialize_names(instance, spec.assets, own, recorder, partition=spec.partition, tags=tags))
            log(f"  {what} done in {time.perf_counter() - tk:.1f} s")
        seconds = {**batch.seconds, "runs": time.perf_counter() - t0 - batch.seconds["redact"]}
    except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised
        ledger.mark_failed(ids, f"{type(exc).__name__}: {exc}")
        recorder.end_parent(parent, failed=True)
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
    recorder.end_parent(parent)
    seconds["total"] = time.perf_counter() - t0
    log(f"  evaluation done in {seconds['evaluation']:.1f} s")
    return UnlearnReport(ids, batch.records, batch.shards, runs, seconds)
