"""A report of one deletion request a privacy officer can file: what was asked, when, what it removed, which
runs rebuilt which artifacts (with data versions before and after), and why the result is exact."""

from __future__ import annotations

from typing import Any

from dagster import AssetKey, AssetRecordsFilter, DagsterEventType, DagsterInstance

from pipelines.ledger import Ledger

EXACTNESS = (
    "The serving model now equals a model trained from scratch without these records: every shard that held "
    "one was retrained from its seeded start on its remaining records only, the other shards never saw them, "
    "and the aggregator was retrained from its seeded start on the remaining training data (exact unlearning, "
    "DESIGN.md section 3). Checked bit for bit, for BPR, WMF and LightGCN, by "
    "tests/test_forget.py::test_forgetting_is_exact."
)


def _materializations(instance: DagsterInstance, run_id: str) -> list[dict[str, Any]]:
    """Each asset (partition) a run materialized, with its data version and the one it replaced."""
    out = []
    for record in instance.get_records_for_run(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION).records:
        event = record.event_log_entry.dagster_event
        if event is None or event.asset_key is None:
            continue
        mat = event.step_materialization_data.materialization
        key, partition = event.asset_key, mat.partition
        history = instance.fetch_materializations(  # newest first; the one after this run's is what it replaced
            AssetRecordsFilter(asset_key=AssetKey(key.path), asset_partitions=[partition] if partition else None),
            limit=200,
        ).records
        mine = [i for i, h in enumerate(history) if h.run_id == run_id]
        older = history[mine[0] + 1].asset_materialization if mine and mine[0] + 1 < len(history) else None
        before = (older.tags or {}).get("dagster/data_version") if older is not None else None
        out.append(
            {
                "asset": key.to_user_string() + (f"[{partition}]" if partition else ""),
                "data_version_before": before,
                "data_version_after": mat.tags.get("dagster/data_version") if mat.tags else None,
            }
        )
    return out


def erasure_report(instance: DagsterInstance, ledger: Ledger, request_id: int) -> dict[str, Any]:
    """The report of request ``request_id`` as a JSON-ready dict (`format_report` prints it)."""
    rows = ledger.get([request_id])
    if not rows:
        from receraser_core.data.interactions import DataError

        raise DataError(f"no request #{request_id} in {ledger.path}")
    r = rows[0]
    runs = []
    for run_id in r.dagster_runs:
        dagster_run = instance.get_run_by_id(run_id)
        runs.append(
            {
                "dagster_run": run_id,
                "status": dagster_run.status.value if dagster_run else "not in this Dagster instance",
                "rebuilt": _materializations(instance, run_id) if dagster_run else [],
            }
        )
    return {
        "request": r.id,
        "asked": {
            "kind": r.kind,
            "user": None if r.erased else r.user_id,
            "item": None if r.erased else r.item_id or "*",
            "keyed_hash": r.subject,
            "ids_erased": r.erased,
            "reason": r.reason,
        },
        "received_at": r.received_at,
        "status": r.status,
        "applied_at": r.applied_at or None,
        "records_removed": r.records,
        "shards_retrained": r.shards,
        "rebuilt_and_why": r.rebuilt,
        "dagster_runs": runs,
        "mlflow_runs": r.mlflow_runs,
        "statement": EXACTNESS if r.status == "applied" else f"not applied yet ({r.status}); no statement",
        "error": r.error or None,
    }


def format_report(rep: dict[str, Any]) -> str:
    asked = rep["asked"]
    if asked["ids_erased"]:
        whose = "every record of a user" if asked["kind"] == "user" else "one record"
        what = f"{whose} (ids erased once applied; keyed hash {asked['keyed_hash'][:16]}...)"
    elif asked["item"] == "*":
        what = f"every record of user {asked['user']}"
    else:
        what = f"the record (user {asked['user']}, item {asked['item']})"
    lines = [
        f"Deletion request #{rep['request']}",
        f"  asked          : forget {what}" + (f" (reason: {asked['reason']})" if asked["reason"] else ""),
        f"  received       : {rep['received_at']}",
        f"  status         : {rep['status']}" + (f", applied {rep['applied_at']}" if rep["applied_at"] else ""),
        f"  records removed: {rep['records_removed']} from the training data",
        f"  shards retrained: {', '.join(map(str, rep['shards_retrained'])) or 'none'}",
        "  rebuilt, and why:",
        *(f"    {what}: {why}" for what, why in rep["rebuilt_and_why"].items()),
        "  rebuilt by these Dagster runs (data version before -> after):",
    ]
    for run in rep["dagster_runs"]:
        lines.append(f"    run {run['dagster_run']} ({run['status']})")
        for m in run["rebuilt"]:
            same = " (unchanged)" if m["data_version_before"] == m["data_version_after"] else ""
            lines.append(f"      {m['asset']}: {m['data_version_before']} -> {m['data_version_after']}{same}")
    lines.append(f"  MLflow runs    : {', '.join(rep['mlflow_runs']) or 'none'}")
    if rep["error"]:
        lines.append(f"  last error     : {rep['error']}")
    lines += ["", rep["statement"]]
    return "\n".join(lines)
