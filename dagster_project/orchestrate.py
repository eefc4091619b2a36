"""Driving the asset graph from Python: the instance, staleness, and materializing selections.

Used by `receraser run` / `receraser materialize` (and by tests). Every materialization goes through
`dagster.materialize` against the project's Dagster instance, so the UI shows exactly these runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import (
    AssetKey,
    AssetObservation,
    AssetRecordsFilter,
    AssetsDefinition,
    AssetSelection,
    DagsterInstance,
    EventLogRecord,
    materialize,
)

from dagster_project.assets import NAMES, SHARED_NAMES, SOURCE_NAMES, asset_key, build_assets
from dagster_project.resources import ReceraserResource, ledger_for
from dagster_project.settings import executor
from pipelines.config import PipelineConfig
from pipelines.forget import shard_deletion_versions
from pipelines.steps import RunDir, follow_redactions, shard_versions
from pipelines.tracking import PARENT_TAG, Tracker
from receraser_core.models.base import ConfigError
from receraser_core.state_file import integrity

#: The graph, read from the asset definitions (never re-declared): materializable assets in definition order,
#: their parents, and which are shard-partitioned (the same for every configuration; K and the code versions
#: are the configuration's). ``deletion_requests`` is an observed source.
_SHAPE = {a.key.path[-1]: a for a in build_assets(PipelineConfig()) if isinstance(a, AssetsDefinition)}
ORDER = [n for n in NAMES if n not in SOURCE_NAMES]
SOURCES = set(SOURCE_NAMES)
PARENTS = {name: [k.path[-1] for k in a.dependency_keys] for name, a in _SHAPE.items()}
PARTITIONED = {name for name, a in _SHAPE.items() if a.partitions_def is not None} | SOURCES


def shard_keys(cfg: PipelineConfig) -> list[str]:
    """The shard partition keys of a configuration: ``"0"`` .. ``"K-1"``."""
    return [str(k) for k in range(cfg.n_shards)]


def _code_version(cfg: PipelineConfig, name: str) -> str | None:
    defs = {a.key.path[-1]: a for a in build_assets(cfg) if isinstance(a, AssetsDefinition)}
    return defs[name].get_asset_spec().code_version


DATA_VERSION_TAG = "dagster/data_version"  # the tags Dagster writes on every event (its REST API's names too)
CODE_VERSION_TAG = "dagster/code_version"
DAGSTER_YAML = """\
# written by receraser: embedded SQLite storage under this folder, no telemetry
telemetry:
  enabled: false
"""


def ensure_dagster_home(state_dir: Path) -> Path:
    """Point DAGSTER_HOME at ``state_dir/dagster`` (unless already set) with telemetry off."""
    home = Path(os.environ.get("DAGSTER_HOME") or Path(state_dir) / "dagster").resolve()
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def get_instance(state_dir: Path) -> DagsterInstance:
    ensure_dagster_home(state_dir)
    return DagsterInstance.get()


def names_of(rec: PipelineConfig) -> list[str]:
    """The assets of a configuration's graph in order: a compared configuration's (`ReceraserResource.name`) start
    with the main configuration's that it reads, and its Retrain is the main one's."""
    if not getattr(rec, "name", ""):
        return ORDER
    return [n for n in ORDER if n != "retrain_model"]


def _key(rec: PipelineConfig, name: str) -> AssetKey:
    return asset_key(rec, name) if isinstance(rec, ReceraserResource) else AssetKey(name)


def _latest(
    instance: DagsterInstance, key: AssetKey, part: str | None, before: int | None = None
) -> EventLogRecord | None:
    """The latest materialization (observation, for a source) of an asset partition, optionally before an event."""
    flt = AssetRecordsFilter(
        asset_key=key, asset_partitions=[part] if part is not None else None, before_storage_id=before
    )
    fetch = instance.fetch_observations if key.path[-1] in SOURCES else instance.fetch_materializations
    records = fetch(flt, limit=1).records
    return records[0] if records else None


def _version(record: EventLogRecord | None) -> str | None:
    event = record.asset_event if record is not None else None
    return event.tags.get(DATA_VERSION_TAG) if event is not None and event.tags else None


def _inputs(name: str, part: str | None, keys: Sequence[str]) -> list[tuple[str, str | None]]:
    """An asset partition's inputs: the same shard for shard -> shard, every shard for shard -> unpartitioned."""
    out: list[tuple[str, str | None]] = []
    for parent in PARENTS[name]:
        if parent not in PARTITIONED:
            out.append((parent, None))
        else:
            out += [(parent, k) for k in ([part] if part is not None else keys)]
    return out


def _label(name: str, part: str | None) -> str:
    return f"{name}[{part}]" if part is not None else name


def _dagster_status(
    instance: DagsterInstance, cfg: PipelineConfig, name: str, part: str | None, keys: Sequence[str]
) -> str:
    """Dagster's data-version rule, read from its event records: 'missing' without a materialization, 'stale'
    when the asset's code version or the data version of an input differs from what its latest materialization
    recorded, else 'fresh'. (The UI and GraphQL `staleStatusByPartition` answer the same; a test checks it.)"""
    record = _latest(instance, _key(cfg, name), part)
    if record is None:
        return "missing"
    event = record.asset_event
    recorded = (event.tags or {}).get(CODE_VERSION_TAG) if event is not None else None
    if recorded != _code_version(cfg, name):
        return "stale"
    for parent, ppart in _inputs(name, part, keys):
        key = _key(cfg, parent)
        if _version(_latest(instance, key, ppart)) != _version(_latest(instance, key, ppart, record.storage_id)):
            return "stale"
    return "fresh"


def _files(run: RunDir | None, name: str, part: str | None) -> str:
    """'ok', 'missing' or 'corrupt': whether the run directory still holds what the asset (partition) wrote,
    as written (content hashes, `state_file.integrity`); 'ok' when not checked."""
    if run is None:
        return "ok"
    if name == "retrain_model":
        return "ok" if (run.root / "retrain").exists() else "missing"
    paths = {
        "interactions": [run.interactions],
        "wmf_embeddings": [run.embeddings],
        "shard_assignment": [run.assignment, run.diagnostics],
        "aggregator": [run.aggregator, run.serving],
        "evaluation": [run.evaluation],
    }
    if name == "shard_data":
        paths[name] = [run.shard_data(int(str(part)))]
    if name == "shard_model":
        paths[name] = [run.shard_model(int(str(part))), run.shard_fit(int(str(part)))]
    states = {integrity(p) for p in paths[name]}
    return next((s for s in ("missing", "corrupt", "unverified") if s in states), "ok")


def graph_status(
    instance: DagsterInstance, cfg: PipelineConfig, include_retrain: bool = False, run: RunDir | None = None
) -> dict[str, str]:
    """'missing', 'stale' or 'fresh' for every asset of the graph, partitions as ``shard_model[3]``.

    Dagster marks an asset stale when a *direct* input has a new data version (one hop); here staleness is
    transitive, so after shard 3's deletions change, shard_data[3], shard_model[3], aggregator and evaluation
    all read stale."""
    keys = shard_keys(cfg)
    out: dict[str, str] = {}
    main_run = run.main if run is not None and run.main is not None else run
    for name in names_of(cfg):
        if name == "retrain_model" and not include_retrain:
            continue
        if (
            name in SHARED_NAMES and isinstance(cfg, ReceraserResource) and cfg.main_dir
        ):  # the main configuration's, as it stands
            out[name] = _shared_status(instance, cfg, name, main_run)
            continue
        parts: list[str | None] = list(keys) if name in PARTITIONED else [None]
        for part in parts:
            state = _dagster_status(instance, cfg, name, part, keys)
            files = _files(run, name, part) if state != "missing" else "ok"
            if files != "ok":
                state = files  # recorded by Dagster, but the run directory lost it or it was damaged
            inputs = [_label(p, k) for p, k in _inputs(name, part, keys) if p not in SOURCES]
            if state == "fresh" and any(out.get(label, "fresh") != "fresh" for label in inputs):
                state = "stale"
            out[_label(name, part)] = state
    return out


def _shared_status(instance: DagsterInstance, cfg: PipelineConfig, name: str, run: RunDir | None) -> str:
    """A shared asset's status as a compared configuration sees it: missing, corrupt, or else the main
    configuration's materialization counts as fresh (the main graph's own status says more)."""
    if _latest(instance, AssetKey(name), None) is None:
        return "missing"
    files = _files(run, name, None)
    return files if files != "ok" else "fresh"


def status(
    instance: DagsterInstance, cfg: PipelineConfig, asset: str, partition: str | None = None, run: RunDir | None = None
) -> str:
    """'missing', 'stale' (transitively) or 'fresh' for one asset (partition)."""
    return graph_status(instance, cfg, include_retrain=asset == "retrain_model", run=run)[_label(asset, partition)]


def observe_deletions(
    instance: DagsterInstance, rec: ReceraserResource, keys: Sequence[str] | None = None
) -> list[str]:
    """Record in Dagster the deletion version of every shard partition (of ``keys``, default all) whose version
    changed or was never recorded: only those partitions' `shard_data` (and what is downstream) become stale.
    Returns their keys."""
    changed = []
    source = asset_key(rec, "deletion_requests")
    if rec.main_dir:  # a compared configuration: what each of its shards' data would hold now
        versions = shard_versions(rec.run_dir(), rec.pipeline_config())
    else:
        versions = shard_deletion_versions(ledger_for(rec), rec.n_shards)
    for key, version in versions.items():
        if keys is not None and key not in keys:
            continue
        if _version(_latest(instance, source, key)) != version:
            tags = {DATA_VERSION_TAG: version, "dagster/data_version_is_user_provided": "true"}
            instance.report_runless_asset_event(AssetObservation(source, partition=key, tags=tags))
            changed.append(key)
    return changed


def follow_main(instance: DagsterInstance, rec: ReceraserResource) -> list[str]:
    """A compared configuration after the main configuration's redactions: its assignment drops the removed
    records (`steps.follow_redactions`) and its shards whose data changed get a new deletion version (so go
    stale). Returns their keys; none for one never built (it will be built from the redacted data)."""
    if not rec.run_dir().assignment.exists():
        return []
    follow_redactions(rec.run_dir())
    return observe_deletions(instance, rec)


@dataclass(frozen=True)
class Target:
    """A parsed selection such as ``shard_model[3]+``: asset, partitions (None = unpartitioned), downstream."""

    asset: str
    partitions: tuple[str, ...] | None
    downstream: bool


_TARGET = re.compile(r"^\s*(?P<asset>[a-z_]+)\s*(\[(?P<parts>[0-9,\s]*)\])?\s*(?P<plus>\+?)\s*$")


def parse_target(text: str, valid_keys: Sequence[str]) -> Target:
    """Parse ``asset``, ``asset+``, ``asset[3]+`` or ``asset[0,4]+``."""
    m = _TARGET.match(text)
    if not m or m.group("asset") not in ORDER:
        raise ValueError(
            f"cannot parse selection {text!r}: use ASSET, ASSET+, or ASSET[K,...]+ with ASSET one of {', '.join(ORDER)}"
        )
    asset, parts = m.group("asset"), m.group("parts")
    keys: tuple[str, ...] | None = None
    if parts is not None:
        keys = tuple(p.strip() for p in parts.split(",") if p.strip())
        bad = [k for k in keys if k not in valid_keys]
        if bad or not keys:
            raise ValueError(f"unknown shard partition(s) {bad or parts!r}: valid are {', '.join(valid_keys)}")
        if asset not in PARTITIONED:
            raise ValueError(f"{asset} is not partitioned; drop the [..]")
    elif asset in PARTITIONED:
        keys = tuple(valid_keys)
    return Target(asset, keys, bool(m.group("plus")))


def selection_names(target: Target) -> list[str]:
    """Asset names the target covers, in graph order (downstream means all descendants)."""
    if not target.downstream:
        return [target.asset]
    names = {k.path[-1] for k in AssetSelection.assets(target.asset).downstream().resolve(list(_SHAPE.values()))}
    if target.asset != "retrain_model":
        names.discard("retrain_model")  # the on-demand baseline never rides along with the main graph
    return [n for n in ORDER if n in names]


def _resources(rec: ReceraserResource, tracker: Tracker) -> dict[str, Any]:
    return {"receraser": rec, "tracker": tracker}


def materialize_names(
    instance: DagsterInstance,
    names: Sequence[str],
    rec: ReceraserResource,
    tracker: Tracker,
    partition: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """One Dagster run materializing ``names`` (and ``partition`` of the partitioned ones)."""
    # events always reach the instance and the UI; on the console a failed step is its one line from the CLI
    # (raise_on_error re-raises it), its stack trace only with RECERASER_VERBOSE
    level = "DEBUG" if os.environ.get("RECERASER_VERBOSE") else "CRITICAL"
    if executor() == "celery":
        return _execute_on_workers(instance, names, rec, partition, tags or {}, level)
    result = materialize(
        build_assets(rec.pipeline_config(), rec.name),
        selection=[asset_key(rec, n) for n in names],
        partition_key=partition,
        instance=instance,
        resources=_resources(rec, tracker),
        tags=tags or {},
        raise_on_error=True,
        run_config={"loggers": {"console": {"config": {"log_level": level}}}},
    )
    return result.run_id


def _root_cause(error: Any) -> str:
    """The innermost message of a Dagster error chain (the step's own exception, not the wrapper)."""
    while error is not None and error.cause is not None:
        error = error.cause
    return error.message.strip() if error is not None else "unknown error"


def _execute_on_workers(
    instance: DagsterInstance,
    names: Sequence[str],
    rec: ReceraserResource,
    partition: str | None,
    tags: dict[str, str],
    level: str,
) -> str:
    """One run of the Definitions' asset job whose steps the workers of its executor (Celery) execute: the code
    is found through `dagster.reconstructable` (the graph of the configuration the workers read from the config
    file and the environment, which must be ``rec``'s), ``rec`` reaches the steps as the run's resource config,
    the storage is the instance's (Postgres, in such a deployment)."""
    from dagster import execute_job, reconstructable

    from dagster_project.definitions import asset_job, defs

    loaded = (defs.resources or {}).get("receraser")
    held = {} if not isinstance(loaded, ReceraserResource) else {"": loaded, **loaded.compared()}
    if rec.name not in held or held[rec.name].fingerprint() != rec.fingerprint():
        raise ConfigError(
            "with RECERASER_EXECUTOR=celery the workers build the graph from the config file and RECERASER_* "
            "variables: set the configuration there (the same for the workers), not only on the command line"
        )
    # the steps get the main configuration's resource (a compared configuration's steps pick theirs from it)
    main = held[""] if rec.name else rec
    fields = {**main.to_dict(), "state_dir": rec.state_dir, "data_dir": rec.data_dir, "compare": main.compare}
    with execute_job(
        reconstructable(asset_job),
        instance,
        run_config={
            "loggers": {"console": {"config": {"log_level": level}}},
            "resources": {"receraser": {"config": fields}},
        },
        tags={**tags, **({"dagster/partition": partition} if partition is not None else {})},
        asset_selection=[asset_key(rec, n) for n in names],
        raise_on_error=True,
    ) as result:
        if not result.success:
            failures = [e for e in result.all_events if e.is_step_failure]
            why = "; ".join(f"{e.step_key}: {_root_cause(e.step_failure_data.error)}" for e in failures)
            raise RuntimeError(f"Dagster run {result.run_id} failed on the workers: {why or 'see the Dagster UI'}")
        return result.run_id


def _partition_worker(args: tuple[str, list[str], str, dict[str, Any], dict[str, str]]) -> tuple[str, str]:
    home, names, key, rec_fields, tags = args
    import torch

    torch.set_num_threads(1)
    os.environ["DAGSTER_HOME"] = home  # Dagster's own variable: which instance (storage) the process reports to
    instance = DagsterInstance.get()
    rec = ReceraserResource(**rec_fields)
    return key, materialize_names(instance, names, rec, rec.tracker(), key, tags)


def materialize_target(
    instance: DagsterInstance,
    target: Target,
    rec: ReceraserResource,
    tracker: Tracker,
    workers: int = 1,
    statuses: Callable[[], dict[str, str]] | None = None,
    tags: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Materialize a target: partitioned assets one run per shard (in parallel processes when ``workers`` > 1),
    then the unpartitioned ones in one run. With ``statuses`` (a `graph_status` snapshot taken before each
    stage), pieces that are fresh are skipped. Returns run ids."""
    names = [n for n in selection_names(target) if n in names_of(rec) and not (rec.main_dir and n in SHARED_NAMES)]
    upstream = [n for n in names if n not in PARTITIONED and ORDER.index(n) < ORDER.index("shard_data")]
    parted = [n for n in names if n in PARTITIONED]
    downstream = [n for n in names if n not in PARTITIONED and n not in upstream]
    runs: list[str] = []

    def todo(labels: list[str]) -> list[str]:
        if statuses is None:
            return labels
        state = statuses()
        return [label for label in labels if state.get(label, "missing") != "fresh"]

    upstream = todo(upstream)
    if upstream:
        log(f"materializing {', '.join(upstream)}")
        runs.append(materialize_names(instance, upstream, rec, tracker, tags=tags))
    keys = list(target.partitions or shard_keys(rec)) if parted else []
    if "shard_data" in parted:
        observe_deletions(instance, rec)
    stale_parts = set(todo([f"{n}[{k}]" for n in parted for k in keys]))
    keys = [k for k in keys if any(f"{n}[{k}]" in stale_parts for n in parted)]
    if keys and workers > 1:
        log(f"materializing {'+'.join(parted)} for shards {', '.join(keys)} in {workers} processes")
        # the workers log to the default tracker; their first MLflow calls would race to create its database
        rec.tracker().prepare(rec.experiment())
        jobs = [(os.environ["DAGSTER_HOME"], parted, k, rec.model_dump(), tags or {}) for k in keys]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for k, run_id in pool.map(_partition_worker, jobs):
                log(f"  shard {k} done (run {run_id[:8]})")
                runs.append(run_id)
    else:
        for k in keys:
            log(f"materializing {'+'.join(parted)} for shard {k}")
            runs.append(materialize_names(instance, parted, rec, tracker, partition=k, tags=tags))
    downstream = todo(downstream)
    if downstream:
        log(f"materializing {', '.join(downstream)}")
        runs.append(materialize_names(instance, downstream, rec, tracker, tags=tags))
    return runs


def run_graph(
    instance: DagsterInstance,
    rec: ReceraserResource,
    tracker: Tracker,
    workers: int = 1,
    log: Callable[[str], None] = print,
    rebuild: bool = False,
) -> list[str]:
    """Materialize whatever of the main graph is missing or stale (checked stage by stage, so what an
    upstream rebuild makes stale is rebuilt too), then of each compared configuration's; nothing when everything
    is fresh.

    ``rebuild`` materializes everything: the pretrained embeddings and the partition are recomputed from the
    remaining (redacted) data, which lifts the limit of DESIGN.md section 3.6 at the cost of a full retrain."""
    runs = _run_one(instance, rec, tracker, workers, log, rebuild)
    for name, other in rec.compared().items():
        what = f"{other.partitioner} + {other.aggregator}, {other.model}, K = {other.n_shards}"
        log(f"compared configuration {name} ({what})")
        runs += _run_one(instance, other, tracker, workers, lambda m: log(f"  {m}"), rebuild)
    return runs


def _run_one(
    instance: DagsterInstance,
    rec: ReceraserResource,
    tracker: Tracker,
    workers: int,
    log: Callable[[str], None],
    rebuild: bool,
) -> list[str]:
    run = rec.run_dir()
    if not rebuild and all(v == "fresh" for v in graph_status(instance, rec, run=run).values()):
        log("everything is up to date: nothing to materialize")
        return []
    if rec.main_dir:
        rec.record_compared()  # from now on every deletion reaches it, whatever the settings
        follow_main(instance, rec)
    # one MLflow parent run for the job: the runs of its steps nest under it
    parent = tracker.start_parent(rec.experiment(), "rebuild" if rebuild else "run", {"launched_by": "run"})
    try:
        runs = materialize_target(
            instance,
            Target("interactions", None, True),
            rec,
            tracker,
            workers,
            statuses=None if rebuild else lambda: graph_status(instance, rec, run=run),
            tags={PARENT_TAG: parent},
            log=log,
        )
    except BaseException:
        tracker.end_parent(parent, failed=True)
        raise
    tracker.end_parent(parent)
    return runs
