"""Dagster resources: the pipeline configuration + storage location, and experiment tracking."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource

from pipelines.config import PipelineConfig
from pipelines.ledger import Ledger
from pipelines.steps import RunDir
from pipelines.tracking import MlflowTracker


class ReceraserResource(ConfigurableResource, PipelineConfig):
    """The pipeline configuration (every field of `PipelineConfig`, its defaults and validation inherited, not
    copied) plus where state and data live. Built from the CLI options, the config file and the environment by
    `dagster_project.settings.load_settings`; the Dagster UI's launchpad can override any field as run config
    (``resources: receraser: config: {model: bpr, ...}``)."""

    state_dir: str = ""  # the state directory (run directories, Dagster and MLflow storage); "" = ./state
    data_dir: str = ""  # where the named datasets are; "" = the default search (`receraser --help`)

    @classmethod
    def from_pipeline_config(cls, cfg: PipelineConfig, state: Path, data: Path | None = None) -> ReceraserResource:
        return cls(**cfg.to_dict(), state_dir=str(state), data_dir=str(data or ""))

    def pipeline_config(self) -> PipelineConfig:
        return PipelineConfig(**self.to_dict())

    def state_path(self) -> Path:
        from receraser_core.data.readers import PROJECT_ROOT

        return Path(self.state_dir or PROJECT_ROOT / "state").resolve()

    def run_dir(self) -> RunDir:
        """This configuration's run directory, under the state directory."""
        name = f"{self.dataset.replace(':', '_').replace('/', '_')}-{self.model}-{self.partitioner}-{self.aggregator}"
        return RunDir(self.state_path() / "pipeline" / f"{name}-K{self.n_shards}-s{self.seed}-{self.fingerprint()[:8]}")

    def data_path(self) -> Path | None:
        return Path(self.data_dir) if self.data_dir else None

    def experiment(self) -> str:
        return f"receraser/{self.dataset}/{self.model}"

    def tracker(self) -> MlflowTracker:
        """MLflow, with its store in the state directory."""
        return MlflowTracker.in_state_dir(self.state_path())


def ledger_for(rec: ReceraserResource) -> Ledger:
    """The deletion ledger of this pipeline configuration, beside its run directory."""
    return Ledger(rec.run_dir().root / "ledger.sqlite")
