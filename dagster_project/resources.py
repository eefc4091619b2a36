"""Dagster resources: the pipeline configuration + storage location, and experiment tracking."""

from __future__ import annotations

import json
from pathlib import Path

from dagster import ConfigurableResource

from dagster_project.settings import data_dir, load_pipeline_config, run_root, state_dir
from pipelines.config import PipelineConfig
from pipelines.ledger import Ledger
from pipelines.steps import RunDir
from pipelines.tracking import MlflowTracker, Tracker


class ReceraserResource(ConfigurableResource):
    """The `PipelineConfig`, field for field, plus where state lives. Defaults come from `settings`."""

    dataset: str = "ml-1m"
    model: str = "wmf"
    partitioner: str = "inbp"
    aggregator: str = "attention"
    n_shards: int = 10
    seed: int = 0
    split_seed: int = 0
    partition_iters: int = 20
    shard_valid: str = "routed"
    model_overrides_json: str = "{}"
    agg_overrides_json: str = "{}"
    state_dir: str = ""
    data_dir: str = ""

    @classmethod
    def from_settings(cls) -> ReceraserResource:
        cfg = load_pipeline_config()
        return cls.from_pipeline_config(cfg, state_dir(), data_dir())

    @classmethod
    def from_pipeline_config(cls, cfg: PipelineConfig, state: Path, data: Path | None = None) -> ReceraserResource:
        return cls(
            dataset=cfg.dataset,
            model=cfg.model,
            partitioner=cfg.partitioner,
            aggregator=cfg.aggregator,
            n_shards=cfg.n_shards,
            seed=cfg.seed,
            split_seed=cfg.split_seed,
            partition_iters=cfg.partition_iters,
            shard_valid=cfg.shard_valid,
            model_overrides_json=json.dumps(cfg.model_overrides),
            agg_overrides_json=json.dumps(cfg.agg_overrides),
            state_dir=str(state),
            data_dir=str(data or ""),
        )

    def pipeline_config(self) -> PipelineConfig:
        return PipelineConfig.from_dict(
            {
                "dataset": self.dataset,
                "model": self.model,
                "partitioner": self.partitioner,
                "aggregator": self.aggregator,
                "n_shards": self.n_shards,
                "seed": self.seed,
                "split_seed": self.split_seed,
                "partition_iters": self.partition_iters,
                "shard_valid": self.shard_valid,
                "model_overrides": json.loads(self.model_overrides_json),
                "agg_overrides": json.loads(self.agg_overrides_json),
            }
        )

    def run_dir(self) -> RunDir:
        cfg = self.pipeline_config()
        root = run_root(cfg)
        if self.state_dir:
            root = Path(self.state_dir) / "pipeline" / root.name
        return RunDir(root)

    def data_path(self) -> Path | None:
        return Path(self.data_dir) if self.data_dir else None

    def experiment(self) -> str:
        return f"receraser/{self.dataset}/{self.model}"


def default_tracker() -> Tracker:
    return MlflowTracker.in_state_dir(state_dir())


def ledger_for(rec: ReceraserResource) -> Ledger:
    """The deletion ledger of this pipeline configuration, beside its run directory."""
    return Ledger(rec.run_dir().root / "ledger.sqlite")
