"""Forgetting inside Dagster: a sensor (on by default) that turns outstanding deletion requests into runs.

Each tick does one of three things, from the ledger and the runs it launched:
- pending requests and no batch under way: take the applier lock, redact them and record the affected shards'
  new deletion versions (`unlearn.prepare_batch`, the code `receraser unlearn` runs), then request one run per
  affected shard but the last (`shard_data` + `shard_model` of that partition);
- those runs succeeded: request the last shard's run, which also rebuilds the aggregator and evaluation, then
  (with compared configurations) their changed shards' runs and their final runs (`Batch.phases`);
- the last of them succeeded: mark the requests applied (a failed run marks them failed; `receraser unlearn`
  retries).
Run keys make every request idempotent: a tick that repeats one does not start a second run. As with `receraser
unlearn`, the batch's MLflow runs nest under one parent run, `unlearn <request ids>`, which the last tick ends.
"""

from __future__ import annotations

import json

from dagster import (
    AssetSelection,
    DagsterRunStatus,
    DefaultSensorStatus,
    ResourceParam,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from dagster_project.assets import asset_key
from dagster_project.resources import ReceraserResource, ledger_for
from dagster_project.unlearn import DELETIONS_TAG, Batch, RunSpec, prepare_batch, sensor_runs_in_flight
from pipelines.ledger import ApplierBusy
from pipelines.tracking import PARENT_TAG, Tracker

STAGE_TAG = "receraser/stage"


def _request(rec: ReceraserResource, batch: Batch, spec: RunSpec, parent: str) -> RunRequest:
    own = rec.compared()[spec.config] if spec.config else rec
    return RunRequest(
        run_key=f"{batch.key}-{spec.stage}",
        asset_selection=[asset_key(own, name) for name in spec.assets],
        partition_key=spec.partition,
        tags={**batch.tags("sensor"), STAGE_TAG: spec.stage, PARENT_TAG: parent},
    )


def _next(rec: ReceraserResource, batch: Batch, done: set[str | None], parent: str) -> list[RunRequest]:
    """The runs of the first phase of the batch not yet done, once every earlier phase is (run keys make a
    repeated request a no-op)."""
    for phase in batch.phases(evaluation=True):
        if not {spec.stage for spec in phase} <= done:
            return [_request(rec, batch, spec, parent) for spec in phase]
    return []


def _start(context: SensorEvaluationContext, rec: ReceraserResource, tracker: Tracker) -> SensorResult | SkipReason:
    ledger = ledger_for(rec)
    pending = ledger.get(statuses=["pending"])
    if not pending:
        return SkipReason("no pending deletion requests")
    try:
        with ledger.applier("dagster deletion sensor", wait=0):
            if sensor_runs_in_flight(context.instance):
                return SkipReason("runs of an earlier batch are still in flight")
            batch = prepare_batch(context.instance, rec, ledger, pending, context.log.info)
    except ApplierBusy as exc:
        return SkipReason(str(exc))
    joined = ",".join(map(str, batch.ids))
    parent = tracker.start_parent(rec.experiment(), f"unlearn {joined}", {"deletion_requests": joined})
    state = {"ids": batch.ids, "shards": batch.shards, "records": batch.records, "agg": batch.aggregator}
    state["compared"] = batch.compared
    # one shard (or none) and no compared configuration: the whole batch is one run
    return SensorResult(run_requests=_next(rec, batch, set(), parent), cursor=json.dumps({**state, "parent": parent}))


def _follow(
    context: SensorEvaluationContext, rec: ReceraserResource, tracker: Tracker, batch: Batch, parent: str
) -> SensorResult | SkipReason:
    ledger = ledger_for(rec)
    runs = context.instance.get_runs(filters=RunsFilter(tags={DELETIONS_TAG: ",".join(map(str, batch.ids))}))
    failed = [r for r in runs if r.status in (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)]
    if failed:
        ledger.mark_failed(batch.ids, f"Dagster run {failed[0].run_id} failed; `receraser unlearn` retries")
        if parent:
            tracker.end_parent(parent, failed=True)
        return SensorResult(skip_reason=f"run {failed[0].run_id[:8]} failed; requests marked failed", cursor="")
    done = {r.tags.get(STAGE_TAG) for r in runs if r.status == DagsterRunStatus.SUCCESS}
    requests = _next(rec, batch, done, parent)
    if not requests:
        ledger.mark_applied(batch.ids, [r.run_id for r in runs], [])
        if parent:
            tracker.end_parent(parent)
        return SensorResult(skip_reason=f"applied request(s) {batch.ids}", cursor="")
    # the first phase was requested with the batch; a later one once, when the phase before it succeeded
    first = next((phase for phase in batch.phases(evaluation=True) if phase), [])
    requested = {r.tags.get(STAGE_TAG) for r in runs} | {spec.stage for spec in first}
    if any(r.tags[STAGE_TAG] not in requested for r in requests):
        return SensorResult(run_requests=requests)
    return SkipReason(f"applying request(s) {batch.ids}: waiting for their runs")


@sensor(
    target=AssetSelection.all(),
    minimum_interval_seconds=15,
    default_status=DefaultSensorStatus.RUNNING,
)
def deletion_sensor(
    context: SensorEvaluationContext, receraser: ReceraserResource, tracker: ResourceParam[Tracker]
) -> SensorResult | SkipReason:
    """Apply pending deletion requests through runs of the affected shards (failed ones wait for
    `receraser unlearn`)."""
    state = json.loads(context.cursor) if context.cursor else None
    applying = [r.id for r in ledger_for(receraser).get(statuses=["applying"])]
    if state and state["ids"] == applying:
        batch = Batch(state["ids"], state["shards"], state["records"], state["agg"], {}, state.get("compared", {}))
        return _follow(context, receraser, tracker, batch, state.get("parent", ""))
    if applying:
        return SkipReason(
            f"request(s) {applying} are being applied outside this sensor (or were interrupted: run "
            "`receraser unlearn`)"
        )
    return _start(context, receraser, tracker)
