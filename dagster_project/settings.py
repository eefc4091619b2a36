"""Where the project keeps its state and which pipeline configuration the Dagster assets build.

Read once, at code-location load: the number of shards fixes the shard partitions. Sources, later ones win:
the defaults (the paper's: ML-1M, WMF, InBP, attention, K = 10), the JSON file named by
``$RECERASER_CONFIG`` (or ``receraser.json`` in the state directory), and ``RECERASER_<FIELD>``
environment variables (``RECERASER_MODEL=bpr``, ``RECERASER_N_SHARDS=20``, ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from pipelines.config import PipelineConfig
from receraser_core.data.readers import PROJECT_ROOT
from receraser_core.models.base import ConfigError


def state_dir() -> Path:
    """``$RECERASER_HOME``, default ``state/`` in the project root."""
    return Path(os.environ.get("RECERASER_HOME", PROJECT_ROOT / "state")).resolve()


def data_dir() -> Path | None:
    env = os.environ.get("RECERASER_DATA_DIR")
    return Path(env) if env else None


def load_pipeline_config() -> PipelineConfig:
    """The configuration from the file and the environment; a bad value is one `ConfigError` line naming the
    file or the variable it came from."""
    values: dict[str, Any] = {}
    path = Path(os.environ.get("RECERASER_CONFIG", state_dir() / "receraser.json"))
    if path.exists():
        try:
            values.update(json.loads(path.read_text()))
            PipelineConfig.from_dict(values)
        except (ValueError, TypeError, AttributeError) as exc:  # JSON, a field's value, or not an object
            raise ConfigError(f"{path}: {exc}") from None
    for f in dataclasses.fields(PipelineConfig):
        name = f"RECERASER_{f.name.upper()}"
        env = os.environ.get(name)
        if env is None:
            continue
        try:
            if f.type in ("int", int):
                values[f.name] = int(env)
            elif f.type in ("str", str):
                values[f.name] = env
            else:
                values[f.name] = json.loads(env)
            PipelineConfig.from_dict(values)
        except (ValueError, TypeError) as exc:
            want = "an integer" if f.type in ("int", int) else "a string" if f.type in ("str", str) else "JSON"
            detail = str(exc) if isinstance(exc, ConfigError) else f"expected {want}"
            raise ConfigError(f"{name}={env!r}: {detail}") from None
    return PipelineConfig.from_dict(values)


def run_root(cfg: PipelineConfig) -> Path:
    """The pipeline's run directory: one per configuration, under the state directory."""
    name = f"{cfg.dataset.replace(':', '_').replace('/', '_')}-{cfg.model}-{cfg.partitioner}-{cfg.aggregator}"
    return state_dir() / "pipeline" / f"{name}-K{cfg.n_shards}-s{cfg.seed}-{cfg.fingerprint()[:8]}"


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
