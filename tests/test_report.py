"""`receraser bench report` regenerates the results page and figures from JSON records alone."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.report import build_report


def _rec(method: str, **kw: object) -> dict:
    base = {
        "dataset": "ml-1m",
        "model": "wmf",
        "method": method,
        "recall@20": 0.2,
        "ndcg@20": 0.3,
        "fit_seconds": 10.0,
        "partitioner": "inbp",
        "aggregator": "attention",
        "shards": 10,
        "partition_seconds": 1.0,
        "aggregate_seconds": 2.0,
        "shard_seconds_mean": 0.5,
        "unlearning_seconds_estimate": 2.5,
    }
    return {**base, **kw}


def test_report_from_json(tmp_path: Path) -> None:
    res = tmp_path / "results"
    res.mkdir()
    records = [
        _rec("retrain"),
        _rec("receraser", **{"recall@20": 0.2313}),
        _rec("ablation-partitioner-ubp", partitioner="ubp"),
        _rec("ablation-aggregator-mean", aggregator="mean"),
        _rec("ablation-shards-5", shards=5),
        _rec("ablation-shards-20", shards=20),
    ]
    (res / "compare-ml-1m-wmf.json").write_text(json.dumps(records))
    path = build_report(res, tmp_path / "docs")
    text = path.read_text()
    assert "| wmf | receraser | 0.2313 | 0.3000 | 0.2254 | 0.3253 |" in text
    assert "| wmf | ubp |" in text and "| wmf | 20 |" in text
    quality = {"recall@20": 0.23}
    unlearning = {
        "model": "bpr",
        "requests": 5,
        "batch": 1,
        "unlearning_seconds_mean": 40.0,
        "unlearning_seconds_median": 39.0,
        "unlearning_seconds_p95": 45.0,
        "breakdown_mean_seconds": {
            "shard_training": 20.0,
            "aggregator_training": 15.0,
            "evaluation": 1.5,
            "dagster_and_io_overhead": 3.5,
        },
        "retrain_seconds": 400.0,
        "speedup_mean": 10.0,
        "quality_before": quality,
        "quality_after": quality,
        "retrain_quality_on_remaining": quality,
    }
    (res / "unlearning-ml-1m-bpr.json").write_text(json.dumps(unlearning))
    text = build_report(res, tmp_path / "docs").read_text()
    assert "| bpr | 10 | 5 | 1 | 40.0 | 39.0 | 45.0 | 20.0 / 15.0 / 1.5 / 3.5 | 400.0 | 10.00× |" in text
    for fig in ("fig_partitioner.png", "fig_aggregator.png", "fig_shards.png"):
        assert (tmp_path / "docs" / fig).read_bytes().startswith(b"\x89PNG")
    assert "fig_deletion_cost.png" in text
    assert (tmp_path / "docs" / "fig_deletion_cost.png").read_bytes().startswith(b"\x89PNG")
    assert "CURE4Rec" not in text
    group = {"ndcg@20": 0.3, "hit@20": 0.8, "ndcg@20_gap": 0.05}
    erased = {
        **unlearning,
        "model": "wmf",
        "kind": "user",
        "select": "active",
        "requests": 302,
        "batch": 302,
        "breakdown_mean_seconds": {**unlearning["breakdown_mean_seconds"], "shards_retrained": 10.0},
        "speedup_median": 0.2,
        "groups": {"before": group, "after": {**group, "ndcg@20_gap": 0.01}, "retrain": group},
    }
    (res / "unlearning-ml-1m-wmf-cure4rec-active.json").write_text(json.dumps(erased))
    text = build_report(res, tmp_path / "docs").read_text()
    assert "## CURE4Rec protocol" in text
    assert "| wmf | active | 302 | 10 | 39.0 | 400.0 | 0.20× | 0.3000 / 0.8000 |" in text
    assert "| +0.0500 / +0.0100 / +0.0500 |" in text


def test_deletion_cost_figure_takes_the_largest_sequential_run_per_model() -> None:
    from pipelines.report import deletion_costs

    runs = [
        {"model": "wmf", "batch": 1, "requests": 50, "breakdown_mean_seconds": {}, "tag": "seq50"},
        {"model": "wmf", "batch": 100, "requests": 100, "breakdown_mean_seconds": {}, "tag": "batch"},
        {"model": "wmf", "batch": 1, "requests": 20, "shards": 10, "breakdown_mean_seconds": {}, "tag": "seq20"},
        {"model": "wmf", "batch": 1, "requests": 80, "shards": 20, "breakdown_mean_seconds": {}, "tag": "k20"},
        {"model": "bpr", "batch": 1, "requests": 5, "breakdown_mean_seconds": {}, "tag": "bpr"},
        {"model": "bpr", "batch": 1, "requests": 50, "kind": "user", "breakdown_mean_seconds": {}, "tag": "users"},
        {"model": "lightgcn", "batch": 1, "requests": 9, "tag": "no breakdown"},
    ]
    assert {m: r["tag"] for m, r in deletion_costs(runs).items()} == {"wmf": "seq50", "bpr": "bpr"}
