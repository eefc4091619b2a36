"""The one place `Definitions` is built: assets, resources, executor.

`build_definitions` makes them for a configuration (the CLI passes the one its options and the config file
give); the module's `defs`, which `dagster dev` / `dagster asset materialize` / Celery workers load, is built from
the config file and the environment (`dagster_project.settings.load_settings`)."""

from __future__ import annotations

from dagster import AssetSelection, Definitions, JobDefinition, define_asset_job, in_process_executor
from dagster_celery import celery_executor

from dagster_project.assets import all_assets
from dagster_project.resources import ReceraserResource
from dagster_project.sensors import deletion_sensor
from dagster_project.settings import celery_config, executor, load_settings

JOB_NAME = "receraser_assets"


def build_definitions(rec: ReceraserResource) -> Definitions:
    """Assets of ``rec``'s configuration and of the configurations compared with it (key-prefixed groups),
    its resources, and one job of every asset (a run selects its assets and partition).
    ``RECERASER_EXECUTOR=celery`` runs every step on dagster-celery workers (`docs/deploy.md`); the default
    runs them in the process that starts the run."""
    exe = celery_executor.configured(celery_config()) if executor() == "celery" else in_process_executor
    return Definitions(
        assets=all_assets(rec),
        jobs=[define_asset_job(JOB_NAME, selection=AssetSelection.all(), executor_def=exe)],
        sensors=[deletion_sensor],
        resources={"receraser": rec, "tracker": rec.tracker()},
        executor=exe,
    )


defs = build_definitions(load_settings())


def asset_job() -> JobDefinition:
    """The asset job of these definitions, for `dagster.reconstructable`: how a run whose steps execute in other
    processes (Celery workers) finds the code."""
    return defs.resolve_job_def(JOB_NAME)
