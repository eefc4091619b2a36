"""MLflow Model Registry: every aggregator build is a version of one registered model per configuration.

The version is an MLflow pyfunc model (`pipelines/mlflow_model.py`, logged as code, no pickle) holding the
serving snapshot and the id maps, so `mlflow models serve -m models:/<name>@production --env-manager local`
answers with the same top-N as `receraser recommend`. The alias ``production`` follows the serving model.
When a build forgets requests, every older version still holding artifacts contains forgotten records: it
is tagged ``contains_forgotten_requests`` and its artifacts are deleted, so the registry keeps no copy of
what was forgotten (the version entries, with their tags, stay as an audit trail).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.steps import RunDir
from receraser_core.data.interactions import Interactions

ALIAS = "production"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")


def model_name(run: RunDir) -> str:
    """The registered model of a configuration: its run directory's name (dataset, method, K, seed, hash)."""
    return "receraser-" + re.sub(r"[^A-Za-z0-9._-]+", "-", run.root.name)


def save_pyfunc(run: RunDir, inter: Interactions, out: Path) -> Path:
    """Write the MLflow model of the current serving snapshot under ``out``; returns its folder."""
    import mlflow.pyfunc

    out.mkdir(parents=True, exist_ok=True)
    ids = out / "ids.npz"  # fixed-width unicode arrays: they load with allow_pickle=False
    np.savez(ids, user_ids=np.asarray(inter.user_ids).astype(str), item_ids=np.asarray(inter.item_ids).astype(str))
    model = out / "model"
    mlflow.pyfunc.save_model(
        str(model),
        python_model=str(MODEL_CODE),
        # the snapshot's content hash travels with it: loading checks it (`state_file.check`)
        artifacts={"serving": str(run.serving), "serving_hash": f"{run.serving}.sha256", "ids": str(ids)},
        pip_requirements=["receraser"],  # served with --env-manager local: the project's own environment
    )
    return model


def _artifact_repo(uri: str) -> Any:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(uri)


def register(client: Any, name: str, run_id: str, model_dir: Path, tags: dict[str, str], forgotten: str) -> str:
    """Log ``model_dir`` under run ``run_id`` as ``model``, make it a new version of ``name`` and move the
    alias to it; then, with ``forgotten`` (the request ids this build forgot), purge the older versions."""
    from mlflow.exceptions import MlflowException

    client.log_artifacts(run_id, str(model_dir), "model")
    try:
        client.create_registered_model(name, description="RecEraser serving model of one configuration")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/model"
    version = client.create_model_version(name, source, run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, ALIAS, version.version)
    if forgotten:
        for old in client.search_model_versions(f"name='{name}'"):
            if int(old.version) >= int(version.version) or old.tags.get("artifacts") == "deleted":
                continue
            client.set_model_version_tag(name, old.version, "contains_forgotten_requests", forgotten)
            _artifact_repo(old.source).delete_artifacts()
            client.set_model_version_tag(name, old.version, "artifacts", "deleted")
    return str(version.version)
