"""The one place `Definitions` is built: assets, resources, executor."""

from __future__ import annotations

from dagster import AssetSelection, Definitions, JobDefinition, define_asset_job, in_process_executor
from dagster_celery import celery_executor

from dagster_project.assets import ASSETS
from dagster_project.resources import ReceraserResource, default_tracker
from dagster_project.sensors import deletion_sensor
from dagster_project.settings import celery_config, executor

#: ``RECERASER_EXECUTOR=celery`` runs every step on dagster-celery workers (`docs/deploy.md`); the default runs
#: them in the process that starts the run.
EXECUTOR = celery_executor.configured(celery_config()) if executor() == "celery" else in_process_executor

#: Every asset of the graph as one job (a run selects its assets and partition), for runs started from code
ASSET_JOB = define_asset_job("receraser_assets", selection=AssetSelection.all(), executor_def=EXECUTOR)

defs = Definitions(
    assets=ASSETS,
    jobs=[ASSET_JOB],
    sensors=[deletion_sensor],
    resources={"receraser": ReceraserResource.from_settings(), "tracker": default_tracker()},
    executor=EXECUTOR,
)


def asset_job() -> JobDefinition:
    """The asset job of these definitions, for `dagster.reconstructable`: how a run whose steps execute in other
    processes (Celery workers) finds the code."""
    return defs.resolve_job_def(ASSET_JOB.name)
