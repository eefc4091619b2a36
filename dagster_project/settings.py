"""Reading the settings: the one place where the CLI options, the config file and the environment become the
typed configuration (`ReceraserResource`, whose fields and validation are `pipelines.config.PipelineConfig`'s).

Sources, later ones win: the defaults (the paper's: ML-1M, WMF, InBP, attention, K = 10), the JSON file named by
``$RECERASER_CONFIG`` (or ``receraser.json`` in the state directory), ``RECERASER_<FIELD>`` environment variables
(``RECERASER_MODEL=bpr``, ``RECERASER_N_SHARDS=20``, ``RECERASER_MODEL_OVERRIDES='{"lr": 0.01}'``), and the
command line. The file's ``"compare"`` (or ``RECERASER_COMPARE``, or ``--compare``) names configurations
built beside the main one (``["sisa", "graph_eraser"]`` or ``{"ubp": {"partitioner": "ubp"}}``). Nothing here
writes the environment: the result reaches the assets as their resource (or as run config:
`dagster_project.orchestrate`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagster_project.resources import ReceraserResource
from pipelines.config import PipelineConfig, compare_configs
from receraser_core.data.readers import PROJECT_ROOT
from receraser_core.models.base import ConfigError


def state_dir(cli: Path | str | None = None) -> Path:
    """The state directory: ``--state-dir``, else ``$RECERASER_HOME``, else ``state/`` in the project root."""
    return Path(cli or os.environ.get("RECERASER_HOME") or PROJECT_ROOT / "state").resolve()


def data_dir(cli: Path | str | None = None) -> Path | None:
    """``--data-dir``, else ``$RECERASER_DATA_DIR``, else None (the readers' default search)."""
    value = cli or os.environ.get("RECERASER_DATA_DIR")
    return Path(value).resolve() if value else None


def _env_value(name: str, kind: Any, text: str) -> Any:
    if kind in ("int", int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{name}={text!r}: expected an integer") from None
    if kind in ("str", str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r}: expected JSON") from None


def load_settings(
    cli: Mapping[str, Any] | None = None, state: Path | str | None = None, data: Path | str | None = None
) -> ReceraserResource:
    """The configuration from defaults, file, environment and ``cli`` (field -> value; None = not given). A bad
    value is one `ConfigError` line naming where it came from."""
    home = state_dir(state)
    values: dict[str, Any] = {}
    compare: Any = {}  # configurations beside the main one (`pipelines.config.compare_configs`)
    compare_source = "compare"
    path = Path(os.environ.get("RECERASER_CONFIG") or home / "receraser.json")
    if path.exists():
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a JSON object of pipeline fields")
        if "compare" in loaded:
            compare, compare_source = loaded.pop("compare"), f"{path}: compare"
        values.update(loaded)
        PipelineConfig.from_dict(values, str(path))
    for name, field in PipelineConfig.model_fields.items():
        var = f"RECERASER_{name.upper()}"
        if var in os.environ:
            values[name] = _env_value(var, field.annotation, os.environ[var])
            PipelineConfig.from_dict(values, f"{var}={os.environ[var]!r}")
    if "RECERASER_COMPARE" in os.environ:
        text = os.environ["RECERASER_COMPARE"].strip()
        compare_source = f"RECERASER_COMPARE={text!r}"
        compare = _env_value(compare_source, "json", text) if text.startswith(("{", "[")) else text
    given = {k: v for k, v in (cli or {}).items() if v is not None}
    if "compare" in given:
        compare, compare_source = given.pop("compare"), "--compare"
    values.update(given)
    cfg = PipelineConfig.from_dict(values, "command line" if given else "")
    compare_configs(cfg, compare, compare_source)  # one line naming a bad one, before anything runs
    return ReceraserResource.from_pipeline_config(cfg, home, data_dir(data), compare)


EXECUTORS = ("in_process", "celery")


def executor() -> str:
    """``$RECERASER_EXECUTOR``: ``in_process`` (default: every step in the process that starts the run) or
    ``celery`` (steps run on dagster-celery workers listening on ``$RECERASER_CELERY_BROKER``)."""
    name = os.environ.get("RECERASER_EXECUTOR", "in_process")
    if name not in EXECUTORS:
        raise ConfigError(f"RECERASER_EXECUTOR={name!r}: expected one of {', '.join(EXECUTORS)}")
    return name


def celery_config() -> dict[str, str]:
    """The dagster-celery executor's config: broker and result backend (a Redis-protocol server by default)."""
    broker = os.environ.get("RECERASER_CELERY_BROKER", "redis://127.0.0.1:6379/0")
    return {"broker": broker, "backend": os.environ.get("RECERASER_CELERY_BACKEND", broker)}
