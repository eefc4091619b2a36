"""Configurations side by side (issue 16, item 4): compared configurations are key-prefixed asset groups of the
one Definitions, reading the main configuration's interactions and pretraining, and forgetting with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, build_sensor_context, instance_for_test

from dagster_project.definitions import build_definitions
from dagster_project.orchestrate import graph_status, materialize_names, run_graph
from dagster_project.resources import ReceraserResource, ledger_for
from dagster_project.sensors import deletion_sensor
from dagster_project.settings import load_settings
from dagster_project.unlearn import unlearn_pending
from pipelines.config import SHARD_DEFAULTS
from pipelines.ledger import NewRequest
from pipelines.retrain import model_config
from pipelines.steps import (
    load_interactions,
    load_partition,
    load_shard_data,
    read_npz,
    shard_valid,
    training_threads,
)
from pipelines.tracking import MemoryTracker
from receraser_core.models import build_model, load_model
from receraser_core.models.base import ConfigError
from tests.test_dagster import K, _resource


def _with_compare(tmp_path: Path, compare: Any) -> ReceraserResource:
    main = _resource(tmp_path)
    return ReceraserResource.from_pipeline_config(main.pipeline_config(), main.state_path(), compare=compare)


def _materializations(instance: DagsterInstance, key: AssetKey) -> int:
    return len(instance.fetch_materializations(AssetRecordsFilter(asset_key=key), limit=100).records)


def _pairs(run: Any, shard: int) -> set[tuple[int, int]]:
    m = load_shard_data(run, shard)
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    return set(zip(rows.tolist(), m.indices.tolist(), strict=True))


def test_definitions_hold_every_configuration_as_a_key_prefixed_group(tmp_path: Path) -> None:
    rec = _with_compare(tmp_path, ["sisa", "graph_eraser"])
    graph = build_definitions(rec).resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    for name in ("sisa", "graph_eraser"):
        assert {f"{name}/{a}" for a in ("shard_assignment", "shard_data", "shard_model", "aggregator")} <= keys
        assert f"{name}/interactions" not in keys and f"{name}/retrain_model" not in keys
        # its partition follows the main configuration's pretraining: shared, not recomputed
        assert graph.get(AssetKey([name, "shard_assignment"])).parent_keys == {AssetKey("wmf_embeddings")}
        assert AssetKey([name, "deletion_requests"]) in graph.get(AssetKey([name, "shard_data"])).parent_keys
        assert graph.get(AssetKey([name, "shard_model"])).partitions_def.get_partition_keys() == [
            str(k) for k in range(K)
        ]
    groups = {graph.get(AssetKey(["sisa", "aggregator"])).group_name, graph.get(AssetKey("aggregator")).group_name}
    assert groups == {"sisa", "receraser"}


def test_bad_compared_configurations_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECERASER_COMPARE", "sisa,graph_eraser")
    assert sorted(load_settings(state=tmp_path).compare) == ["graph_eraser", "sisa"]
    monkeypatch.setenv("RECERASER_COMPARE", '{"ubp": {"partitioner": "ubp"}}')
    rec = load_settings(state=tmp_path)
    assert rec.compared()["ubp"].partitioner == "ubp" and rec.compared()["ubp"].aggregator == rec.aggregator
    for bad, message in [
        ("nope", "'nope' is not a preset"),
        ('{"x": {"seed": 3}}', "x: seed cannot differ from the main configuration's"),
        ('{"x": {"partitioner": "best"}}', "unknown partitioner 'best'"),
        ('{"x": {"aggregator": "attention"}}', "x: the same as the main configuration"),
        ('{"Bad-Name": {"partitioner": "ubp"}}', "configuration name 'Bad-Name'"),
    ]:
        monkeypatch.setenv("RECERASER_COMPARE", bad)
        with pytest.raises(ConfigError, match=message) as err:
            load_settings(state=tmp_path)
        assert "\n" not in str(err.value) and str(err.value).startswith("RECERASER_COMPARE=")


def test_compared_configurations_share_the_data_and_forget_with_it(tmp_path: Path) -> None:
    """Built beside the main configuration from its interactions and pretraining (materialized once); a
    deletion redacts the compared configuration's assignment too and rebuilds exactly its shards whose data
    changed, to the model a fit from scratch on the remaining shard data gives."""
    rec, tracker = _with_compare(tmp_path, {"sisa": {}}), MemoryTracker()
    sisa = rec.compared()["sisa"]
    main_run, run = rec.run_dir(), sisa.run_dir()
    assert run.root.parent.parent == main_run.root and run.interactions == main_run.interactions
    with instance_for_test() as instance:
        run_graph(instance, rec, tracker, log=lambda _: None)
        assert all(_materializations(instance, AssetKey(n)) == 1 for n in ("interactions", "wmf_embeddings"))
        assert _materializations(instance, AssetKey(["sisa", "aggregator"])) == 1
        assert set(graph_status(instance, sisa, run=run).values()) == {"fresh"}
        before = {k: run.shard_model(k).read_bytes() for k in range(K)}
        inter0 = load_interactions(main_run.interactions)
        random0 = load_partition(run, inter0).assignment
        # a record in sisa's shard 1: which main shard holds it does not matter
        users = np.repeat(np.arange(inter0.n_users), np.diff(inter0.train.indptr))
        p = int(np.flatnonzero(random0 == 1)[0])
        u, i = int(users[p]), int(inter0.train.indices[p])
        ledger_for(sisa).add([NewRequest("interaction", str(inter0.user_ids[u]), str(inter0.item_ids[i]))])
        assert ledger_for(sisa).path == ledger_for(rec).path  # one ledger: a request reaches both
        report = unlearn_pending(instance, rec, tracker, log=lambda _: None)
        assert report is not None and report.records == 1
        assert set(graph_status(instance, rec, run=main_run).values()) == {"fresh"}
        assert set(graph_status(instance, sisa, run=run).values()) == {"fresh"}
        # the compared configuration's stores no longer hold the record
        with read_npz(run.assignment) as z:
            assert len(z["assignment"]) == inter0.train.nnz - 1
            assert u * inter0.n_items + i not in set(z["pairs"].tolist())
        assert (u, i) not in _pairs(run, 1)
        changed = [k for k in range(K) if run.shard_model(k).read_bytes() != before[k]]
        assert 1 in changed and len(changed) < K  # its other shards untouched
        # exact: sisa's shard 1 equals a fresh fit on its original pairs minus the record
        cfg = sisa.pipeline_config()
        inter = load_interactions(main_run.interactions)
        keep = (random0 == 1) & (np.arange(len(random0)) != p)
        assert _pairs(run, 1) == set(zip(users[keep].tolist(), inter0.train.indices[keep].tolist(), strict=True))
        overrides = {**SHARD_DEFAULTS.get(cfg.model, {}), **cfg.model_overrides, "seed": cfg.seed + 1}
        fresh = build_model(cfg.model, inter.n_users, inter.n_items, **model_config(cfg.model, inter.name, overrides))
        shard = load_shard_data(run, 1)
        with training_threads():
            fresh.fit(shard, shard_valid(run, inter, cfg, 1, shard))
        stored = load_model(run.shard_model(1))
        assert all(torch.equal(stored.params[n], fresh.params[n]) for n in fresh.params)
        # nothing left to do for either
        assert run_graph(instance, rec, tracker, log=lambda _: None) == []


def test_the_sensor_rebuilds_compared_configurations_before_applying(tmp_path: Path) -> None:
    rec, tracker = _with_compare(tmp_path, ["sisa"]), MemoryTracker()
    configs = {"": rec, "sisa": rec.compared()["sisa"]}
    with instance_for_test() as instance:
        run_graph(instance, rec, tracker, log=lambda _: None)
        run = rec.run_dir()
        inter = load_interactions(run.interactions)
        users = np.repeat(np.arange(inter.n_users), np.diff(inter.train.indptr))
        p = int(np.flatnonzero(load_partition(run, inter).assignment == 0)[0])
        uid, iid = str(inter.user_ids[users[p]]), str(inter.item_ids[inter.train.indices[p]])
        ledger_for(rec).add([NewRequest("interaction", uid, iid)])
        cursor, stages = None, []
        for _ in range(8):
            result = deletion_sensor(
                build_sensor_context(instance=instance, cursor=cursor), receraser=rec, tracker=tracker
            )
            cursor = result.cursor if result.cursor is not None else cursor
            for request in result.run_requests or []:
                stages.append(request.tags["receraser/stage"])
                prefix = request.asset_selection[0].path[:-1]
                own = configs[prefix[0] if prefix else ""]
                names = [k.path[-1] for k in request.asset_selection]
                materialize_names(instance, names, own, tracker, partition=request.partition_key, tags=request.tags)
            if cursor == "":
                break
        assert stages[0] == "final" and stages[-1] == "sisa/final" and len(stages) <= 3
        assert [r.status for r in ledger_for(rec).get()] == ["applied"]
        assert set(graph_status(instance, configs["sisa"], run=configs["sisa"].run_dir()).values()) == {"fresh"}
