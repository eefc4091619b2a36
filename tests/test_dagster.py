"""Dagster, three tiers (STYLE.md point 10): assets called directly, the graph materialized in-process on a
temporary instance, the Definitions load; plus the native CLI and `receraser` commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dagster import AssetKey, DagsterInstance, build_asset_context, instance_for_test

from dagster_project.assets import build_assets
from dagster_project.orchestrate import (
    Target,
    graph_status,
    materialize_names,
    materialize_target,
    parse_target,
    run_graph,
    status,
)
from dagster_project.resources import ReceraserResource
from dagster_project.settings import load_settings
from pipelines import steps
from pipelines.config import PipelineConfig
from pipelines.tracking import MemoryTracker
from receraser_core.data.readers import PROJECT_ROOT
from tests.test_pipeline import FAST_MODEL, write_blocks_csv

K = load_settings().n_shards  # the test session's (conftest: RECERASER_N_SHARDS)


def _resource(tmp_path: Path, model: str = "wmf", partitioner: str = "inbp") -> ReceraserResource:
    csv = write_blocks_csv(tmp_path / "blocks.csv")
    cfg = PipelineConfig(
        dataset=f"csv:{csv}",
        model=model,
        partitioner=partitioner,
        n_shards=K,
        model_overrides=FAST_MODEL[model],
        agg_overrides={"epochs": 2},
        partition_iters=5,
    )
    return ReceraserResource.from_pipeline_config(cfg, tmp_path / "state")


def _last_storage_id(instance: DagsterInstance, asset: str, partition: str | None = None) -> int:
    from dagster import AssetRecordsFilter

    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[partition] if partition else None), limit=1
    ).records
    return records[0].storage_id if records else -1


def test_definitions_load() -> None:
    from dagster_project.definitions import defs

    graph = defs.resolve_asset_graph()
    names = {k.path[-1] for k in graph.get_all_asset_keys()}
    assert names == {
        "interactions",
        "wmf_embeddings",
        "shard_assignment",
        "shard_data",
        "shard_model",
        "aggregator",
        "evaluation",
        "retrain_model",
        "deletion_requests",
    }
    assert defs.resolve_job_def("__ASSET_JOB") is not None
    assert defs.resolve_sensor_def("deletion_sensor").default_status.value == "RUNNING"
    node = graph.get(AssetKey("shard_model"))
    assert node.partitions_def.get_partition_keys() == [str(k) for k in range(K)]
    assert graph.get(AssetKey("aggregator")).partitions_def is None
    # what was deleted from shard k is its own partitioned data, an input of shard_data[k] alone
    assert AssetKey("deletion_requests") in graph.get(AssetKey("shard_data")).parent_keys
    assert graph.get(AssetKey("deletion_requests")).partitions_def == node.partitions_def


def test_no_module_uses_private_dagster_names() -> None:
    """Private Dagster modules (``dagster._core`` and the like) may change in any release: none is imported."""
    import ast

    offenders = []
    for folder in ("dagster_project", "pipelines", "receraser_core", "receraser_cli", "tests"):
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                bad = [
                    n
                    for n in names
                    if n.split(".")[0].startswith("dagster") and any(p.startswith("_") for p in n.split(".")[1:])
                ]
                offenders += [f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}: {n}" for n in bad]
    assert offenders == []


def test_assets_called_directly(tmp_path: Path) -> None:
    rec = _resource(tmp_path)
    tracker = MemoryTracker()
    cfg = rec.pipeline_config()
    run = rec.run_dir()
    A = {a.key.path[-1]: a for a in build_assets(cfg)}  # noqa: N806 (the graph of this configuration)
    result = A["interactions"](build_asset_context(), receraser=rec)
    assert result.metadata["users"] == 45 and result.data_version is not None
    steps.pretrain(run, cfg)
    steps.partition(run, cfg)
    data = A["shard_data"](build_asset_context(partition_key="1"), receraser=rec)
    again = A["shard_data"](build_asset_context(partition_key="1"), receraser=rec)
    other = A["shard_data"](build_asset_context(partition_key="0"), receraser=rec)
    assert data.data_version == again.data_version != other.data_version
    model = A["shard_model"](build_asset_context(partition_key="1"), receraser=rec, tracker=tracker)
    assert model.metadata["interactions"] == data.metadata["interactions"]
    (logged,) = tracker.runs
    assert logged["tags"]["partition"] == "1" and logged["params"]["shard"] == 1
    assert logged["history"] and "best_valid_recall@10" in logged["metrics"]


def test_graph_in_process_one_shard_and_staleness(tmp_path: Path) -> None:
    rec, tracker = _resource(tmp_path), MemoryTracker()
    with instance_for_test() as instance:
        run_graph(instance, rec, tracker, log=lambda _: None)
        assert set(graph_status(instance, rec).values()) == {"fresh"}
        # one MLflow-style run per shard model, aggregator and evaluation
        names = [r["name"] for r in tracker.runs]
        assert [p["name"] for p in tracker.parents] == ["run"]  # the job's parent run
        assert sorted(names) == sorted(
            [f"shard_model[{k}]" for k in range(K)] + ["aggregator", "evaluation inbp+attention"]
        )
        before = {k: _last_storage_id(instance, "shard_model", str(k)) for k in range(K)}
        model_bytes = {k: rec.run_dir().shard_model(k).read_bytes() for k in range(K)}

        # shard 1 and everything downstream, as `receraser materialize 'shard_model[1]+'` does
        materialize_target(
            instance, parse_target("shard_model[1]+", [str(k) for k in range(K)]), rec, tracker, log=lambda _: None
        )
        after = {k: _last_storage_id(instance, "shard_model", str(k)) for k in range(K)}
        assert after[1] > before[1]
        assert all(after[k] == before[k] for k in range(K) if k != 1)
        assert all(rec.run_dir().shard_model(k).read_bytes() == model_bytes[k] for k in range(K) if k != 1)

        # a redaction in shard 2: drop one of its interactions from the stored data, rematerialize all shard_data
        run = rec.run_dir()
        inter = steps.load_interactions(run.interactions)
        part = steps.load_partition(run)
        victim = int(np.flatnonzero(part.assignment == 2)[0])
        keep = np.ones(inter.train.nnz, dtype=bool)
        keep[victim] = False
        train = inter.train.tocoo()
        from receraser_core.data.interactions import pairs_to_csr

        redacted = inter.with_train(pairs_to_csr(train.row[keep], train.col[keep], *inter.train.shape))
        steps.save_interactions(run.interactions, redacted)
        steps._atomic(run.assignment, lambda p: steps._save_npz(p, assignment=part.assignment[keep]))
        for k in range(K):
            materialize_names(instance, ["shard_data"], rec, tracker, partition=str(k))
        assert status(instance, rec, "shard_model", "2") == "stale"
        assert all(status(instance, rec, "shard_model", str(k)) == "fresh" for k in range(K) if k != 2)
        assert status(instance, rec, "aggregator") == "stale"
        assert status(instance, rec, "evaluation") == "stale"
        # the main job now retrains shard 2 only, then the aggregator and evaluation
        n_before = len(tracker.runs)
        run_graph(instance, rec, tracker, log=lambda _: None)
        assert [r["name"] for r in tracker.runs[n_before:]] == [
            "shard_model[2]",
            "aggregator",
            "evaluation inbp+attention",
        ]
        assert set(graph_status(instance, rec).values()) == {"fresh"}


def test_parse_target() -> None:
    keys = [str(k) for k in range(K)]
    assert parse_target("shard_model[1]+", keys) == Target("shard_model", ("1",), True)
    assert parse_target("shard_data[0,2]+", keys) == Target("shard_data", ("0", "2"), True)
    assert parse_target("aggregator", keys) == Target("aggregator", None, False)
    assert parse_target("shard_model", keys).partitions == tuple(keys)
    for bad in ("shard_model[99]+", "aggregator[1]", "nonsense+", "shard_model[1]++"):
        with pytest.raises(ValueError):
            parse_target(bad, keys)


def _env(tmp_path: Path) -> dict[str, str]:
    csv = write_blocks_csv(tmp_path / "blocks.csv")
    env = {
        **os.environ,
        "RECERASER_HOME": str(tmp_path / "state"),
        "DAGSTER_HOME": str(tmp_path / "state" / "dagster"),
        "RECERASER_DATASET": f"csv:{csv}",
        "RECERASER_N_SHARDS": str(K),
        "RECERASER_PARTITION_ITERS": "5",
        "RECERASER_MODEL_OVERRIDES": json.dumps(FAST_MODEL["wmf"]),
        "RECERASER_AGG_OVERRIDES": json.dumps({"epochs": 2}),
    }
    (tmp_path / "state" / "dagster").mkdir(parents=True, exist_ok=True)
    (tmp_path / "state" / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return env


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "receraser_cli.main", *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_run_is_idempotent_and_native_dagster_cli_works(tmp_path: Path) -> None:
    env = _env(tmp_path)
    first = _cli(["run", "--executor", "multiprocess"], env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "Recall@N" in first.stdout and "MLflow store" in first.stdout and "mlflow ui" in first.stdout
    assert "registered model : models:/receraser-" in first.stdout
    second = _cli(["run"], env)
    assert second.returncode == 0 and "nothing to materialize" in second.stdout
    assert "0 Dagster run(s)" in second.stdout

    dagster = Path(sys.executable).with_name("dagster")
    native = subprocess.run(
        [
            str(dagster),
            "asset",
            "materialize",
            "-m",
            "dagster_project.definitions",
            "--select",
            "shard_model+",
            "--partition",
            "1",
        ],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert native.returncode == 0, native.stderr[-3000:]
    shorthand = _cli(["materialize", "shard_model[0,2]+"], env)
    assert shorthand.returncode == 0, shorthand.stderr[-2000:]
    assert "shard 0" in shorthand.stdout and "shard 2" in shorthand.stdout and "shard 1" not in shorthand.stdout
    status_out = _cli(["assets", "--json"], env)
    assert json.loads(status_out.stdout)["evaluation"] == "fresh"
    bad = _cli(["materialize", "shard_model[7]+"], env)
    assert bad.returncode == 2 and "unknown shard partition" in bad.stderr

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(f"receraser/{env['RECERASER_DATASET']}")
    runs = client.search_runs([exp.experiment_id])
    names = [r.info.run_name for r in runs]
    # first run: K shards + aggregator + evaluation; native: shard 1 + aggregator + evaluation; shorthand: 2 + 2
    assert names.count("aggregator") == 3 and sum(n.startswith("shard_model") for n in names) == K + 1 + 2
    shard_run = next(r for r in runs if r.info.run_name == "shard_model[1]")
    assert shard_run.data.tags["partition"] == "1" and "dagster_run_id" in shard_run.data.tags
    assert "best_valid_recall_at_10" in shard_run.data.metrics


def test_a_new_configuration_is_built_not_reported_fresh(tmp_path: Path) -> None:
    """Dagster's records belong to asset keys, not configurations: a run directory that lacks the files is
    treated as missing, so switching configuration rebuilds instead of claiming 'nothing to do'."""
    tracker = MemoryTracker()
    first = _resource(tmp_path)
    second = ReceraserResource(**{**first.model_dump(), "seed": 7})
    assert first.run_dir().root != second.run_dir().root
    with instance_for_test() as instance:
        run_graph(instance, first, tracker, log=lambda _: None)
        assert run_graph(instance, second, tracker, log=lambda _: None)  # runs were made
        assert second.run_dir().evaluation.exists()
        assert set(graph_status(instance, second, run=second.run_dir()).values()) == {"fresh"}
        assert run_graph(instance, second, tracker, log=lambda _: None) == []


def test_a_changed_default_changes_only_the_affected_code_versions() -> None:
    """A release that changes an aggregator default must make `aggregator` (and `evaluation`) stale, not the
    shard models; the configuration fingerprint (and so the run directory) stays the same."""
    probe = (
        "import json, sys\n"
        "from pipelines import config\n"
        "if sys.argv[1] == 'patched':\n"
        "    for d in config.AGG_DEFAULTS.values(): d['epochs'] = d['epochs'] + 1\n"
        "from dagster_project.assets import build_assets\n"
        "cfg = config.PipelineConfig()\n"
        "built = {a.key.path[-1]: a for a in build_assets(cfg)}\n"
        "names = ('shard_model', 'aggregator', 'evaluation')\n"
        "versions = {n: str(built[n].code_versions_by_key) for n in names}\n"
        "print(json.dumps({'versions': versions, 'config': cfg.fingerprint()}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    out = {}
    for mode in ("plain", "patched"):
        proc = subprocess.run(
            [sys.executable, "-c", probe, mode], env=env, capture_output=True, text=True, cwd=PROJECT_ROOT, check=True
        )
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    plain, patched = out["plain"], out["patched"]
    assert plain["config"] == patched["config"]  # same run directory
    assert plain["versions"]["shard_model"] == patched["versions"]["shard_model"]
    assert plain["versions"]["aggregator"] != patched["versions"]["aggregator"]
    assert plain["versions"]["evaluation"] != patched["versions"]["evaluation"]


def test_celery_runs_refuse_a_configuration_the_workers_do_not_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery workers build the graph from the config file and environment; a run whose configuration came only
    from the command line (another dataset here) is refused in one line before anything is sent to them."""
    from receraser_core.models import ConfigError

    monkeypatch.setenv("RECERASER_EXECUTOR", "celery")
    rec = _resource(tmp_path)
    with instance_for_test() as instance, pytest.raises(ConfigError, match="workers build the graph") as err:
        materialize_names(instance, ["interactions"], rec, MemoryTracker())
    assert "\n" not in str(err.value)
    assert not rec.run_dir().interactions.exists()
