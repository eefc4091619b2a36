"""Experiment tracking behind a small interface: MLflow for real runs, in-memory for tests.

A `Tracker` records one run per materialization: params, per-step metrics, final metrics, tags, the data
it trained on (MLflow dataset tracking) and, with ``started``, the time the work began, so that a run lasts
as long as the training it records. Runs of one pipeline configuration (dataset + base model) share an
experiment (a model-training experiment in the MLflow UI), so RecEraser, SISA, GraphEraser and Retrain runs sit
side by side. A parent run groups the runs of one main job or one deletion batch (tag
``mlflow.parentRunId``), and every aggregator build is a version of a registered model (`pipelines.registry`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

#: Dagster run tag carrying the MLflow parent run (main job or deletion batch) of the runs it logs.
PARENT_TAG = "receraser/mlflow_parent"


@dataclass(frozen=True)
class DatasetRef:
    """What a run read: a name, the content hash of that version of it, where it lives and in what role."""

    name: str
    digest: str
    source: str
    context: str = "training"


class Tracker(Protocol):
    def log_run(
        self,
        experiment: str,
        name: str,
        params: dict[str, Any],
        metrics: dict[str, float],
        history: list[dict[str, float]],
        tags: dict[str, str],
        started: float | None = None,
        dataset: DatasetRef | None = None,
    ) -> str:
        """Record one finished run that began at ``started`` (epoch seconds; default: now); returns its id."""
        ...

    def start_parent(self, experiment: str, name: str, tags: dict[str, str]) -> str:
        """Open a run that groups the runs logged with ``mlflow.parentRunId`` set to its id."""
        ...

    def end_parent(self, run_id: str, failed: bool = False) -> None: ...

    def register_model(self, name: str, run_id: str, model_dir: Path, tags: dict[str, str], forgotten: str) -> str:
        """Log ``model_dir`` (an MLflow model) under run ``run_id``, register it as a new version of ``name``,
        point the ``production`` alias at it and return the version. With ``forgotten`` (request ids), every
        older version still holding artifacts contains forgotten records: it is tagged so, and its artifacts
        are deleted."""
        ...


@dataclass
class MemoryTracker:
    """Keeps runs in a list (for tests)."""

    runs: list[dict[str, Any]] = field(default_factory=list)
    versions: list[dict[str, Any]] = field(default_factory=list)
    parents: list[dict[str, Any]] = field(default_factory=list)  # the runs that group a job's or a batch's runs

    def log_run(
        self,
        experiment: str,
        name: str,
        params: dict[str, Any],
        metrics: dict[str, float],
        history: list[dict[str, float]],
        tags: dict[str, str],
        started: float | None = None,
        dataset: DatasetRef | None = None,
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
                "started": started,
                "ended": time.time(),
                "dataset": dataset,
            }
        )
        return run_id

    def start_parent(self, experiment: str, name: str, tags: dict[str, str]) -> str:
        run_id = f"mem-parent-{len(self.parents)}"
        self.parents.append({"id": run_id, "experiment": experiment, "name": name, "tags": {**tags, "parent": "open"}})
        return run_id

    def end_parent(self, run_id: str, failed: bool = False) -> None:
        run = next(r for r in self.parents if r["id"] == run_id)
        run["tags"]["parent"] = "failed" if failed else "finished"
        run["ended"] = time.time()

    def register_model(self, name: str, run_id: str, model_dir: Path, tags: dict[str, str], forgotten: str) -> str:
        if forgotten:
            for v in self.versions:
                if v["name"] == name and not v.get("deleted"):
                    v.update(deleted=True, forgotten=forgotten)
        version = str(1 + sum(v["name"] == name for v in self.versions))
        self.versions.append({"name": name, "version": version, "run_id": run_id, "tags": tags})
        return version


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
        # opens in the UI as a model-training experiment (runs, metrics), not on the GenAI overview
        return str(
            client.create_experiment(
                name,
                artifact_location=(self.artifact_root / folder).resolve().as_uri(),
                tags={"mlflow.experimentKind": "custom_model_development"},
            )
        )

    def _create_run(self, experiment: str, name: str, tags: dict[str, str], started: float | None) -> str:
        client, start = self.client(), int((started if started is not None else time.time()) * 1000)
        try:
            run = client.create_run(self._experiment(experiment), start_time=start, run_name=name, tags=tags)
        except Exception:  # noqa: BLE001 - the cached experiment may have been deleted since: look it up again
            self._experiments.pop(experiment, None)
            run = client.create_run(self._experiment(experiment), start_time=start, run_name=name, tags=tags)
        return str(run.info.run_id)

    def log_run(
        self,
        experiment: str,
        name: str,
        params: dict[str, Any],
        metrics: dict[str, float],
        history: list[dict[str, float]],
        tags: dict[str, str],
        started: float | None = None,
        dataset: DatasetRef | None = None,
    ) -> str:
        from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

        client = self.client()
        run_id = self._create_run(experiment, name, tags, started)
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
        if dataset is not None:
            data = Dataset(dataset.name, dataset.digest, "local", json.dumps({"uri": dataset.source}))
            client.log_inputs(run_id, [DatasetInput(data, [InputTag("mlflow.data.context", dataset.context)])])
        client.set_terminated(run_id, status="FINISHED", end_time=now)
        return run_id

    def start_parent(self, experiment: str, name: str, tags: dict[str, str]) -> str:
        return self._create_run(experiment, name, tags, None)

    def end_parent(self, run_id: str, failed: bool = False) -> None:
        self.client().set_terminated(run_id, status="FAILED" if failed else "FINISHED")

    def register_model(self, name: str, run_id: str, model_dir: Path, tags: dict[str, str], forgotten: str) -> str:
        from pipelines.registry import register

        return register(self.client(), name, run_id, model_dir, tags, forgotten)
