"""The one place `Definitions` is built: assets, resources, executor."""

from __future__ import annotations

from dagster import Definitions, in_process_executor

from dagster_project.assets import ASSETS
from dagster_project.resources import ReceraserResource, default_tracker

defs = Definitions(
    assets=ASSETS,
    resources={"receraser": ReceraserResource.from_settings(), "tracker": default_tracker()},
    executor=in_process_executor,
)
