"""Experiment tracking behind a small interface: MLflow for real runs, in-memory for tests.

A `Tracker` records one run per materialization: params, per-step metrics, final metrics, tags.
Runs of one pipeline configuration (dataset + base model) share an experiment, so RecEraser, SISA,
GraphEraser and Retrain runs sit side by side in the MLflow UI.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def log_run(
        self,
        experiment: str,
        name: str,
        params: dict[str, Any],
        metrics: dict[str, float],
        history: list[dict[str, float]],
        tags: dict[str, str],
    ) -> str:
        """Record one finished run; returns its id."""
        ...


@dataclass
class MemoryTracker:
    """Keeps runs in a list (for tests)."""

    runs: list[dict[str, Any]] = field(default_factory=list)

    def log_run(
        self,
        experiment: str,
        name: str,
        params: dict[str, Any],
        metrics: dict[str, float],
        history: list[dict[str, float]],
        tags: dict[str, str],
    ) -> str:
        run_id = f"mem-{len(self.runs)}"
        self.runs.append(
            {
                "id": run_id,
                "experiment": experiment,
                "name": name,
                "params": params,
                "metrics": metrics,
                "history": history,
                "tags": tags,
            }
        )
        return run_id


def _name(key: str) -> str:
    """MLflow metric names may not contain '@': recall@20 -> recall_at_20."""
    return key.replace("@", "_at_")


class MlflowTracker:
    """MLflow through `MlflowClient` (no global state). Default store: SQLite file + local artifact folder."""

    def __init__(self, tracking_uri: str, artifact_root: Path) -> None:
        self.tracking_uri = tracking_uri
        self.artifact_root = Path(artifact_root)
        self._client: Any = None
        self._experiments: dict[str, str] = {}  # name -> id, looked up once per process

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> MlflowTracker:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(state_dir) / 'mlflow.db').resolve()}"
        return cls(uri, Path(state_dir) / "mlartifacts")

    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def prepare(self, experiment: str) -> None:
        """Create the store and the experiment now (before parallel workers race to create them)."""
        self._experiment(experiment)

    def _experiment(self, name: str) -> str:
        if name not in self._experiments:
            self._experiments[name] = self._find_or_create(name)
        return self._experiments[name]

    def _find_or_create(self, name: str) -> str:
        client = self.client()
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return str(exp.experiment_id)
        self.artifact_root.mkdir(parents=True, exist_ok=True)
        # a short folder name: MLflow keeps a run's artifact location in 200 characters (enforced by Postgres)
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[-40:] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
        return str(client.create_experiment(name, artifact_location=(self.artifact_root / folder).resolve().as_uri()))

    def log_run(
        self,
        experiment: str,
        name: str,
        params: dict[str, Any],
        metrics: dict[str, float],
        history: list[dict[str, float]],
        tags: dict[str, str],
    ) -> str:
        from mlflow.entities import Metric, Param, RunTag

        client = self.client()
        try:
            run = client.create_run(self._experiment(experiment), run_name=name, tags=tags)
        except Exception:  # noqa: BLE001 - the cached experiment may have been deleted since: look it up again
            self._experiments.pop(experiment, None)
            run = client.create_run(self._experiment(experiment), run_name=name, tags=tags)
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        batch = [Metric(_name(k), float(v), now, 0) for k, v in metrics.items()]
        for i, row in enumerate(history):
            step = int(row.get("epoch", i + 1))
            batch += [Metric(f"epoch/{_name(k)}", float(v), now, step) for k, v in row.items() if k != "epoch"]
        client.log_batch(
            run_id,
            metrics=batch,
            params=[Param(k, str(v)[:6000]) for k, v in params.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        client.set_terminated(run_id, status="FINISHED")
        return str(run_id)
