"""The asset graph of DESIGN.md section 2. Each asset is one call into `pipelines.steps`; the steps own
their files in the run directory, so assets return only metadata and an explicit content `DataVersion`."""

import dataclasses
import functools
import hashlib
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    BetaWarning,
    DagsterError,
    DataVersion,
    DataVersionsByPartition,
    MaterializeResult,
    ResourceParam,
    SourceAsset,
    StaticPartitionsDefinition,
    asset,
    observable_source_asset,
)

from dagster_project.resources import ReceraserResource, ledger_for
from pipelines import registry, steps
from pipelines.config import PipelineConfig
from pipelines.forget import reapply_ledger, shard_deletion_versions
from pipelines.retrain import model_config, retrain
from pipelines.tracking import PARENT_TAG, DatasetRef, Tracker
from receraser_core.data.interactions import csr_fingerprint
from receraser_core.state_file import integrity, load_state

GROUP = "receraser"


def _settings_hash(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _hash_arrays(*arrays: Any) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:24]


def _params_version(state: dict[str, torch.Tensor]) -> str:
    return _hash_arrays(*(state[k].detach().cpu().numpy() for k in sorted(state)))


def _run_tags(context: AssetExecutionContext) -> dict[str, str]:
    """The Dagster run's tags; empty when the asset is invoked directly (tests)."""
    try:
        return dict(context.run.tags)
    except DagsterError:
        return {}


def _tags(context: AssetExecutionContext, rec: ReceraserResource) -> dict[str, str]:
    tags = {
        "dagster_run_id": context.run_id,
        "asset_key": context.asset_key.to_user_string(),
        "partition": context.partition_key if context.has_partition_key else "",
        "config": rec.pipeline_config().fingerprint(),
        "method": f"{rec.partitioner}+{rec.aggregator}",
    }
    run_tags = _run_tags(context)
    applied = run_tags.get("receraser/deletions")
    if applied:
        tags["deletion_requests"] = applied
    if run_tags.get(PARENT_TAG):  # the main job's or the deletion batch's MLflow run
        tags["mlflow.parentRunId"] = run_tags[PARENT_TAG]
    return tags


def _data(rec: ReceraserResource, part: str, digest: str, source: Path, context: str = "training") -> DatasetRef:
    """The MLflow dataset a run read: ``part`` of this configuration's dataset, at content hash ``digest``."""
    return DatasetRef(f"{rec.pipeline_config().dataset}/{part}", digest[:24], str(source), context)


def _params(rec: ReceraserResource, **extra: Any) -> dict[str, Any]:
    cfg = rec.pipeline_config()
    return {
        "dataset": cfg.dataset,
        "base_model": cfg.model,
        "partitioner": cfg.partitioner,
        "aggregator": cfg.aggregator,
        "K": cfg.n_shards,
        "seed": cfg.seed,
        **extra,
    }


def interactions(context: AssetExecutionContext, receraser: ReceraserResource) -> MaterializeResult:
    """The dataset, id-mapped and split into train / valid / test (minus applied deletions)."""
    run = receraser.run_dir()
    stored = integrity(run.interactions)
    if stored == "ok":
        inter = steps.load_interactions(run.interactions)  # the store, redacted by every applied deletion
    else:
        if stored != "missing":
            context.log.warning(f"{run.interactions}: {stored}; rebuilding it from the source minus applied deletions")
        steps.prepare(run, receraser.pipeline_config(), receraser.data_path(), context.log.info)
        inter = reapply_ledger(run, ledger_for(receraser))  # a store rebuilt from source never resurrects records
    version = _hash_arrays(
        *(getattr(inter, p).indptr for p in ("train", "valid", "test")),
        *(getattr(inter, p).indices for p in ("train", "valid", "test")),
    )
    return MaterializeResult(
        metadata={**inter.counts(), "path": str(run.interactions)}, data_version=DataVersion(version)
    )


def wmf_embeddings(context: AssetExecutionContext, receraser: ReceraserResource) -> MaterializeResult:
    """Pretrained WMF user and item vectors, used only to partition."""
    u, i = steps.pretrain(receraser.run_dir(), receraser.pipeline_config(), context.log.info)
    return MaterializeResult(
        metadata={"users": u.shape[0], "items": i.shape[0], "dim": u.shape[1]},
        data_version=DataVersion(_hash_arrays(u, i)),
    )


def shard_assignment(context: AssetExecutionContext, receraser: ReceraserResource) -> MaterializeResult:
    """Shard id of every training interaction, with partition diagnostics."""
    part = steps.partition(receraser.run_dir(), receraser.pipeline_config(), context.log.info)
    d = part.diagnostics
    return MaterializeResult(
        metadata={
            "sizes": str(d["sizes"]),
            "balance": float(d["balance"]),
            "iterations": d.get("iterations", 0),
            "seconds": float(d.get("seconds", 0.0)),
            "method": part.method,
        },
        data_version=DataVersion(_hash_arrays(part.assignment)),
    )


warnings.filterwarnings("ignore", category=BetaWarning, message=".*observable_source_asset")


def deletion_requests(receraser: ReceraserResource) -> DataVersionsByPartition:
    """Observed by `receraser unlearn` and the deletion sensor after each redaction (and by the UI's Observe).

    Every artifact that must forget a record reads it (shard k's data and model, the aggregator, evaluation,
    the Retrain baseline), so Dagster's own one-hop staleness marks exactly those as stale after a deletion."""
    return DataVersionsByPartition(shard_deletion_versions(ledger_for(receraser), receraser.n_shards))


def shard_data(context: AssetExecutionContext, receraser: ReceraserResource) -> MaterializeResult:
    """Shard k's training interactions (every deletion in shard k already removed) and the validation pairs its
    model early-stops on: the data version covers both, so forgetting a validation record restales its shards."""
    k, run = int(context.partition_key), receraser.run_dir()
    m, valid = steps.write_shard_data(run, receraser.pipeline_config(), k)
    users = int((np.diff(m.indptr) > 0).sum())
    return MaterializeResult(
        metadata={
            "interactions": int(m.nnz),
            "users": users,
            "items": int(len(np.unique(m.indices))),
            "validation_pairs": int(valid.nnz),
        },
        data_version=DataVersion(steps.shard_data_version(m, valid)),
    )


def shard_model(
    context: AssetExecutionContext, receraser: ReceraserResource, tracker: ResourceParam[Tracker]
) -> MaterializeResult:
    """The submodel trained on shard_data[k] alone."""
    k, run, cfg = int(context.partition_key), receraser.run_dir(), receraser.pipeline_config()
    t0, started = time.perf_counter(), time.time()
    model = steps.train_shard(run, cfg, k, context.log.info)
    fit = steps.read_json(run.shard_fit(k))
    seconds = time.perf_counter() - t0
    tracker.log_run(
        receraser.experiment(),
        f"shard_model[{k}]",
        _params(receraser, shard=k, **model.config.__dict__),
        {"best_valid_recall@10": fit["best_valid_recall@10"], "wall_seconds": seconds},
        fit["history"],
        _tags(context, receraser),
        started=started,
        dataset=_data(receraser, f"shard-{k}", fit["data_version"], run.shard_data(k)),
    )
    return MaterializeResult(
        metadata={
            "interactions": fit["interactions"],
            "epochs": fit["epochs"],
            "best_epoch": fit["best_epoch"],
            "valid_recall@10": float(fit["best_valid_recall@10"]),
            "fit_seconds": seconds,
        },
        data_version=DataVersion(_params_version(model.params)),
    )


def aggregator(
    context: AssetExecutionContext, receraser: ReceraserResource, tracker: ResourceParam[Tracker]
) -> MaterializeResult:
    """The aggregation over all frozen submodels, trained on all remaining training data."""
    run, cfg = receraser.run_dir(), receraser.pipeline_config()
    t0, started = time.perf_counter(), time.time()
    agg = steps.aggregate(run, cfg, context.log.info)
    seconds = time.perf_counter() - t0
    fit = load_state(run.aggregator, "aggregator file")["fit"]
    inter = steps.load_interactions(run.interactions)
    tags = _tags(context, receraser)
    run_id = tracker.log_run(
        receraser.experiment(),
        "aggregator",
        _params(receraser, **agg.config.__dict__),
        {"best_valid_recall@10": fit["best_valid_recall@10"], "wall_seconds": seconds},
        fit["history"],
        tags,
        started=started,
        dataset=_data(receraser, "train", csr_fingerprint(inter.train), run.interactions),
    )
    # a new version of the configuration's registered model, now `production` (it is what serves)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model_version = tracker.register_model(
            registry.model_name(run),
            run_id,
            registry.save_pyfunc(run, inter, Path(tmp)),
            {k: v for k, v in tags.items() if k in ("dagster_run_id", "config", "method", "deletion_requests")},
            tags.get("deletion_requests", ""),
        )
    register_seconds = time.perf_counter() - t1
    context.log.info(f"registered {registry.model_name(run)} version {model_version} in {register_seconds:.2f} s")
    version = _params_version(agg.state_dict()) if agg.state_dict() else _hash_arrays(agg.stack.users.numpy())
    return MaterializeResult(
        metadata={
            "epochs": len(fit["history"]),
            "fit_seconds": seconds,
            "valid_recall@10": float(fit["best_valid_recall@10"]),
            "registered_model": f"{registry.model_name(run)} version {model_version}",
            "register_seconds": register_seconds,
        },
        data_version=DataVersion(version),
    )


def evaluation(
    context: AssetExecutionContext, receraser: ReceraserResource, tracker: ResourceParam[Tracker]
) -> MaterializeResult:
    """Recall@N / NDCG@N (N = 10, 20, 50) on test, full ranking, training items masked."""
    run, cfg, started = receraser.run_dir(), receraser.pipeline_config(), time.time()
    metrics = steps.evaluate_run(run, cfg, context.log.info)
    test = steps.load_interactions(run.interactions).test
    tracker.log_run(
        receraser.experiment(),
        f"evaluation {cfg.partitioner}+{cfg.aggregator}",
        _params(receraser),
        {k: float(v) for k, v in metrics.items()},
        [],
        _tags(context, receraser),
        started=started,
        dataset=_data(receraser, "test", csr_fingerprint(test), run.interactions, "evaluation"),
    )
    return MaterializeResult(metadata={k: float(v) for k, v in metrics.items()})


def retrain_model(
    context: AssetExecutionContext, receraser: ReceraserResource, tracker: ResourceParam[Tracker]
) -> MaterializeResult:
    """One model on all remaining training data: the exact-unlearning baseline (on demand)."""
    run, cfg, started = receraser.run_dir(), receraser.pipeline_config(), time.time()
    inter = steps.load_interactions(run.interactions)
    res = retrain(inter, cfg.model, model_config(cfg.model, inter.name, {**cfg.model_overrides, "seed": cfg.seed}))
    res.model.save(run.root / "retrain" / "model.pt")
    metrics = {k: float(v) for k, v in res.metrics.items()}
    tracker.log_run(
        receraser.experiment(),
        "retrain",
        _params(receraser, method="retrain"),
        {**metrics, "wall_seconds": res.record["fit_seconds"]},
        res.record["history"],
        {**_tags(context, receraser), "method": "retrain"},
        started=started,
        dataset=_data(receraser, "train", csr_fingerprint(inter.train), run.interactions),
    )
    return MaterializeResult(metadata={**metrics, "fit_seconds": res.record["fit_seconds"]})


def compared_deletions(receraser: ReceraserResource) -> DataVersionsByPartition:
    """A compared configuration's record of what was deleted from each of its shards: the content version of
    what each shard's data would hold now (the main configuration's ledger knows only its own shards)."""
    return DataVersionsByPartition(steps.shard_versions(receraser.run_dir(), receraser.pipeline_config()))


def _as(name: str, fn: Any) -> Any:
    """``fn`` run with compared configuration ``name``'s resource in place of the main one's (the Definitions
    hold one ``receraser`` resource: the main configuration, with its compared ones)."""
    if not name:
        return fn

    @functools.wraps(fn)
    def run(*args: Any, receraser: ReceraserResource, **kwargs: Any) -> Any:
        own = receraser if receraser.name == name else receraser.compared()[name]
        return fn(*args, receraser=own, **kwargs)

    return run


def _make_assets(cfg: PipelineConfig, name: str = "") -> list[AssetsDefinition | SourceAsset]:
    """The graph for one configuration: its K shard partitions, and code versions that carry the configuration
    (changing the dataset, model, partitioner, K, seeds or overrides makes the whole graph stale; each
    configuration has its own run directory) and the resolved training settings (the code's defaults
    included, so a release that changes a default, say the aggregator's epochs, marks the affected assets
    stale instead of reporting old models fresh)."""
    config = cfg.fingerprint()[:12]
    shard = _settings_hash(steps.shard_model_config(cfg, cfg.dataset, 0))  # seeds: in `config`
    agg = _settings_hash(dataclasses.asdict(cfg.agg_config()))
    retrained = _settings_hash(model_config(cfg.model, cfg.dataset, cfg.model_overrides))
    shards = StaticPartitionsDefinition([str(k) for k in range(cfg.n_shards)])
    prefix = [name] if name else []
    group = name or GROUP

    def own(asset_name: str) -> AssetKey:
        return AssetKey([*prefix, asset_name])

    def make(fn: Any, deps: list[AssetKey], code_version: str, partitioned: bool = False) -> AssetsDefinition:
        return asset(
            name=fn.__name__,
            key_prefix=prefix or None,
            group_name=group,
            deps=deps,
            code_version=code_version,
            partitions_def=shards if partitioned else None,
        )(_as(name, fn))

    deleted = own("deletion_requests")
    if name:  # a compared configuration: the main one's interactions and pretraining, its own shards' content
        upstream: list[AssetsDefinition | SourceAsset] = []
        source = observable_source_asset(
            name="deletion_requests",
            key_prefix=prefix,
            group_name=group,
            partitions_def=shards,
            description="What has been deleted from each shard: the content version of each shard's data now.",
        )(_as(name, compared_deletions))
    else:
        upstream = [
            make(interactions, [], f"interactions-{config}"),
            make(wmf_embeddings, [AssetKey("interactions")], f"wmf-{config}"),
        ]
        source = observable_source_asset(
            group_name=GROUP,
            partitions_def=shards,
            description="What has been deleted from each shard: a version per shard partition, from the ledger.",
        )(deletion_requests)
    graph = [
        *upstream,
        make(shard_assignment, [AssetKey("wmf_embeddings")], f"partition-{config}"),
        source,
        make(shard_data, [own("shard_assignment"), deleted], config, partitioned=True),
        make(shard_model, [own("shard_data"), deleted], f"{config}-m{shard}", partitioned=True),
        make(aggregator, [own("shard_model"), deleted], f"{config}-m{shard}-a{agg}"),
        make(evaluation, [own("aggregator"), deleted], f"{config}-m{shard}-a{agg}"),
    ]
    if not name:  # the Retrain baseline of the main configuration's base model
        graph.append(make(retrain_model, [AssetKey("interactions"), deleted], f"{config}-r{retrained}"))
    return graph


_BUILT: dict[tuple[str, str], list[AssetsDefinition | SourceAsset]] = {}


def build_assets(cfg: PipelineConfig, name: str = "") -> list[AssetsDefinition | SourceAsset]:
    """The asset graph of a configuration (built once per configuration and process). A compared configuration
    ``name`` gets its own asset group with key prefix ``name``: its shard assignment follows the main
    configuration's `wmf_embeddings` (and reads its interactions); `retrain_model` is the main one's."""
    key = (cfg.fingerprint(), name)
    if key not in _BUILT:
        _BUILT[key] = _make_assets(cfg, name)
    return _BUILT[key]


def all_assets(rec: ReceraserResource) -> list[AssetsDefinition | SourceAsset]:
    """The main configuration's graph and every compared configuration's, as one code location shows them."""
    out = list(build_assets(rec.pipeline_config()))
    for name, other in rec.compared().items():
        out += build_assets(other.pipeline_config(), name)
    return out


#: The assets a compared configuration shares with (reads from) the main configuration.
SHARED_NAMES = ("interactions", "wmf_embeddings")


def asset_key(rec: ReceraserResource, name: str) -> AssetKey:
    """The key of asset ``name`` of ``rec``'s configuration: prefixed by a compared configuration's name, but for
    the assets it shares with the main configuration."""
    return AssetKey([rec.name, name]) if rec.name and name not in SHARED_NAMES else AssetKey(name)


#: Asset names in graph order, partitioned ones, and each asset's parents: the same for every configuration.
_SHAPE = build_assets(PipelineConfig())
NAMES = [a.key.path[-1] for a in _SHAPE]
SOURCE_NAMES = {a.key.path[-1] for a in _SHAPE if isinstance(a, SourceAsset)}
