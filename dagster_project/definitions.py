"""The one place `Definitions` is built: assets, resources, executor."""

from __future__ import annotations

from dagster import Definitions, in_process_executor

from dagster_project.assets import ASSETS
from dagster_project.resources import ReceraserResource, default_tracker
from dagster_project.sensors import deletion_sensor

defs = Definitions(
    assets=ASSETS,
    sensors=[deletion_sensor],
    resources={"receraser": ReceraserResource.from_settings(), "tracker": default_tracker()},
    executor=in_process_executor,
)
