"""The configurations of one experiment side by side, read back from MLflow: what `receraser compare` prints and
what a user filtering the MLflow UI on ``tags.method`` sees.

Per configuration (the ``config`` tag: a fingerprint of every setting), the latest finished evaluation run gives
RecEraser / SISA / GraphEraser test metrics, and the latest ``retrain`` run the Retrain baseline's; the training
seconds are those logged by the shard, aggregator and Retrain runs of the same Dagster build.
"""

from __future__ import annotations

from typing import Any

#: partitioner + aggregator -> the method's name in the paper
NAMES = {"random+mean": "SISA", "graph_eraser+static": "GraphEraser", "inbp+attention": "RecEraser"}
METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20", "recall@50", "ndcg@50")


def _metric(run: Any, key: str) -> float | None:
    value = run.data.metrics.get(key.replace("@", "_at_"))
    return float(value) if value is not None else None


def compare_table(client: Any, experiment: str) -> list[dict[str, Any]]:
    """One row per configuration and method, best Recall@20 first."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id], filter_string="attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"]
    )
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for run in runs:  # newest first: the first seen per (config, kind) is the current one
        tags, name = run.data.tags, run.info.run_name or ""
        kind = "retrain" if tags.get("method") == "retrain" else "evaluation" if name.startswith("evaluation") else ""
        key = (tags.get("config", ""), kind)
        if not kind or key in rows:
            continue
        params = run.data.params
        method = "Retrain" if kind == "retrain" else NAMES.get(tags.get("method", ""), tags.get("method", ""))
        rows[key] = {
            "method": method,
            "partitioner": "" if kind == "retrain" else params.get("partitioner", ""),
            "aggregator": "" if kind == "retrain" else params.get("aggregator", ""),
            "shards": 1 if kind == "retrain" else int(params.get("K", 0)),
            "base_model": params.get("base_model", ""),
            "seed": int(params.get("seed", 0)),
            "config": key[0],
            "run_id": run.info.run_id,
            "dagster_run_id": tags.get("dagster_run_id", ""),
            "finished": run.info.end_time,
            **{m: _metric(run, m) for m in METRICS},
            "fit_seconds": _metric(run, "wall_seconds") if kind == "retrain" else None,
        }
    if any(r["fit_seconds"] is None for r in rows.values()):  # RecEraser-style: its shard and aggregator runs
        trained: dict[tuple[str, str], float] = {}
        for run in runs:
            name, cfg = run.info.run_name or "", run.data.tags.get("config", "")
            if name.startswith("shard_model[") or name == "aggregator":
                key = (cfg, name)
                if key not in trained and _metric(run, "wall_seconds") is not None:
                    trained[key] = float(_metric(run, "wall_seconds") or 0.0)  # the latest fit of each
        for (cfg, kind), row in rows.items():
            if kind == "evaluation":
                row["fit_seconds"] = sum(v for (c, _), v in trained.items() if c == cfg) or None
    out, retrains = [], set()
    for (_, kind), row in sorted(rows.items(), key=lambda kv: -kv[1]["finished"]):
        if kind == "retrain":  # one model whatever the partition: the newest per base model and seed
            if (row["base_model"], row["seed"]) in retrains:
                continue
            retrains.add((row["base_model"], row["seed"]))
        out.append(row)
    return sorted(out, key=lambda r: -(r["recall@20"] or 0.0))


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'method':12} {'model':8} {'partition':13} {'aggregator':10} {'K':>3} {'seed':>4}"
    head += f" {'Recall@20':>9} {'NDCG@20':>8}"
    lines = [head + f" {'train s':>8}  MLflow run", "-" * (len(head) + 44)]
    for r in rows:
        secs = f"{r['fit_seconds']:.1f}" if r["fit_seconds"] is not None else "-"
        lines.append(
            f"{r['method']:12} {r['base_model']:8} {r['partitioner'] or '-':13} {r['aggregator'] or '-':10} "
            f"{r['shards']:>3} "
            f"{r['seed']:>4} {r['recall@20'] or float('nan'):>9.4f} {r['ndcg@20'] or float('nan'):>8.4f} "
            f"{secs:>8}  {r['run_id']}"
        )
    return "\n".join(lines)
