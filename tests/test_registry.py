"""MLflow as its users expect: runs that span their work and name their data, parent runs per job and per
deletion, model-training experiments, and a Model Registry whose `production` alias follows the serving
model while the versions that hold forgotten records lose their artifacts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
from dagster import AssetKey, instance_for_test

from dagster_project.orchestrate import run_graph
from dagster_project.unlearn import ledger_for, unlearn_pending
from pipelines import registry
from pipelines.ledger import NewRequest
from pipelines.steps import load_interactions, load_serving, top_items
from pipelines.tracking import MlflowTracker
from tests.test_dagster import _resource
from tests.test_dagster_dev import _free_port


def _top(run_dir: Path, user: str, n: int) -> list[str]:
    from pipelines.steps import RunDir

    run = RunDir(run_dir)
    inter = load_interactions(run.interactions)
    agg, train = load_serving(run)
    return [str(inter.item_ids[i]) for i in top_items(agg.scorer(), train, inter.user_index(user), n)[0]]


def test_runs_registry_and_forgotten_versions(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, tmp_path / "mlartifacts")
    rec = _resource(tmp_path)
    run = rec.run_dir()
    with instance_for_test() as instance:
        t0 = time.time()
        run_graph(instance, rec, tracker, log=lambda _: None)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(rec.experiment())
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
        runs = client.search_runs([exp.experiment_id])
        parents = [r for r in runs if r.info.run_name == "run"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
        assert {r.info.run_name for r in children} >= {"aggregator", "shard_model[0]", "interactions"} - {
            "interactions"
        }
        for r in children:  # a run lasts as long as the work it records, and names the data it read
            assert t0 * 1000 <= r.info.start_time <= r.info.end_time
        shard = next(r for r in children if r.info.run_name == "shard_model[0]")
        assert (shard.info.end_time - shard.info.start_time) / 1000 >= shard.data.metrics["wall_seconds"] - 0.05
        assert shard.inputs.dataset_inputs[0].dataset.name.endswith("/shard-0")
        agg_run = next(r for r in children if r.info.run_name == "aggregator")
        assert agg_run.inputs.dataset_inputs[0].dataset.name.endswith("/train")

        name = registry.model_name(run)
        v1 = client.get_model_version_by_alias(name, registry.ALIAS)
        assert str(v1.version) == "1" and v1.run_id == agg_run.info.run_id and v1.tags["dagster_run_id"]
        v1_dir = Path(v1.source.removeprefix("file://"))
        assert (v1_dir / "MLmodel").exists()

        inter = load_interactions(run.interactions)
        user = str(inter.user_ids[3])
        expected = _top(run.root, user, 5)
        os.environ["MLFLOW_TRACKING_URI"] = uri
        try:
            import mlflow.pyfunc

            model = mlflow.pyfunc.load_model(f"models:/{name}@{registry.ALIAS}")
            assert model.predict(pd.DataFrame({"user": [user, "nobody"], "n": [5, 5]})) == [expected, []]
        finally:
            del os.environ["MLFLOW_TRACKING_URI"]

        # a deletion: a new version becomes production; the old one is marked and its artifacts are gone
        item = str(inter.item_ids[inter.train[3].indices[0]])
        ledger_for(rec).add([NewRequest("interaction", user, item)])
        unlearn_pending(instance, rec, tracker, log=lambda _: None)
        v2 = client.get_model_version_by_alias(name, registry.ALIAS)
        assert str(v2.version) == "2" and v2.tags["deletion_requests"] == "1"
        old = client.get_model_version(name, "1")
        assert old.tags["contains_forgotten_requests"] == "1" and old.tags["artifacts"] == "deleted"
        assert not v1_dir.exists() and Path(v2.source.removeprefix("file://"), "MLmodel").exists()
        meta = instance.get_latest_materialization_event(AssetKey("aggregator")).asset_materialization.metadata
        assert meta["registered_model"].value == f"{name} version 2" and meta["register_seconds"].value > 0
        batch = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "unlearn 1"]
        assert len(batch) == 1 and batch[0].info.status == "FINISHED"
        nested = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{batch[0].info.run_id}'")
        assert {r.info.run_name for r in nested} >= {"aggregator", "evaluation inbp+attention"}
        assert all(r.data.tags["deletion_requests"] == "1" for r in nested)

        # `mlflow models serve` on 127.0.0.1 answers what `recommend` ranks
        expected = _top(run.root, user, 5)
        port = _free_port()
        # mlflow starts `uvicorn` from PATH: the environment's bin folder, as when it is activated
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
        cmd = [mlflow_bin, "models", "serve", "-m", f"models:/{name}@{registry.ALIAS}", "--env-manager", "local"]
        proc = subprocess.Popen(
            [*cmd, "-h", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: mlflow runs uvicorn under a shell
        )
        try:
            body = json.dumps({"dataframe_records": [{"user": user, "n": 5}]}).encode()
            deadline, answer = time.time() + 90, None
            while answer is None and time.time() < deadline and proc.poll() is None:
                try:
                    req = urllib.request.Request(
                        f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
                    )
                    with urllib.request.urlopen(req, timeout=5) as resp:
                        answer = json.loads(resp.read())
                except OSError:
                    time.sleep(0.5)
            assert answer is not None, proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timeout"
            assert answer["predictions"] == [expected]
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
