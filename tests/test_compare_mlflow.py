"""`receraser compare`: the configurations of a dataset side by side, read back from their MLflow runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dagster import instance_for_test

from dagster_project.orchestrate import materialize_names, run_graph
from pipelines.tracking import MlflowTracker
from receraser_cli.main import main
from tests.test_dagster import _resource


def test_compare_reads_each_configuration_from_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    uri = f"sqlite:///{state / 'mlflow.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sisa = _resource(tmp_path, partitioner="random")
    recs = {"RecEraser": _resource(tmp_path), "SISA": type(sisa)(**{**sisa.model_dump(), "aggregator": "mean"})}
    state.mkdir(parents=True, exist_ok=True)
    tracker = MlflowTracker(uri, state / "mlartifacts")
    with instance_for_test() as instance:
        for rec in recs.values():
            run_graph(instance, rec, tracker, log=lambda _: None)
        materialize_names(instance, ["retrain_model"], recs["RecEraser"], tracker)
        materialize_names(instance, ["retrain_model"], recs["SISA"], tracker)  # the same model: shown once
    rec = recs["RecEraser"]
    argv = ["compare", "--dataset", rec.dataset, "--state-dir", str(state)]
    assert main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["method"] for r in rows) == ["RecEraser", "Retrain", "SISA"]
    for r in rows:
        if r["method"] == "Retrain":
            assert r["fit_seconds"] > 0 and r["recall@20"] is not None
            continue
        built = recs[r["method"]]
        assert (r["partitioner"], r["aggregator"], r["shards"]) == (built.partitioner, built.aggregator, 3)
        assert r["config"] == built.fingerprint()
        measured = json.loads(built.run_dir().evaluation.read_text())  # what the evaluation asset wrote
        assert r["recall@20"] == pytest.approx(measured["recall@20"], abs=1e-12)
        assert r["ndcg@20"] == pytest.approx(measured["ndcg@20"], abs=1e-12)
        assert r["fit_seconds"] > 0
    assert [r["recall@20"] for r in rows] == sorted((r["recall@20"] for r in rows), reverse=True)
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "RecEraser" in table and "SISA" in table and "Retrain" in table and rows[0]["run_id"] in table
    # another dataset has no runs: one line, not an error
    assert main(["compare", "--dataset", "csv:/nowhere.csv", "--state-dir", str(state)]) == 0
    assert "no evaluation or Retrain runs" in capsys.readouterr().out
