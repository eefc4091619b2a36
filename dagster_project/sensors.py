"""Forgetting inside Dagster: the ledger as an observable source, a job that applies it, and a sensor
(on by default) that launches the job whenever requests are outstanding."""

import hashlib

from dagster import (
    DataVersion,
    DefaultSensorStatus,
    OpExecutionContext,
    ResourceParam,
    RunRequest,
    SensorEvaluationContext,
    SkipReason,
    job,
    observable_source_asset,
    op,
    sensor,
)

from dagster_project.resources import ReceraserResource, ledger_for
from dagster_project.unlearn import unlearn_pending
from pipelines.tracking import Tracker


@observable_source_asset(group_name="receraser", description="The deletion ledger (requests and their status).")
def deletion_requests(receraser: ReceraserResource) -> DataVersion:
    rows = ledger_for(receraser).get()
    digest = hashlib.sha256("|".join(f"{r.id}:{r.status}" for r in rows).encode()).hexdigest()[:16]
    return DataVersion(digest)


@op
def apply_deletion_requests(
    context: OpExecutionContext, receraser: ReceraserResource, tracker: ResourceParam[Tracker]
) -> None:
    """Apply every outstanding request: redact, retrain the affected shards, rebuild the aggregator."""
    report = unlearn_pending(
        context.instance, receraser, tracker, log=context.log.info, wait=600.0, owner=f"dagster run {context.run_id}"
    )
    if report is not None:
        context.log.info(f"applied {report.request_ids}: shards {report.shards}, {report.seconds['total']:.1f} s")


@job(description="Apply the outstanding deletion requests of the ledger (batched unlearning).")
def unlearn_job() -> None:
    apply_deletion_requests()


@sensor(job=unlearn_job, minimum_interval_seconds=15, default_status=DefaultSensorStatus.RUNNING)
def deletion_sensor(context: SensorEvaluationContext, receraser: ReceraserResource) -> RunRequest | SkipReason:
    """Launch `unlearn_job` when the ledger has pending requests (failed ones wait for `receraser unlearn`)."""
    pending = ledger_for(receraser).get(statuses=["pending"])
    if not pending:
        return SkipReason("no pending deletion requests")
    key = "unlearn-" + ",".join(str(r.id) for r in pending)
    return RunRequest(run_key=key, tags={"receraser/deletions": ",".join(str(r.id) for r in pending)})
