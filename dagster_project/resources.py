"""Dagster resources: the pipeline configuration + storage location, and experiment tracking."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource

from pipelines.config import PipelineConfig, compare_configs, compare_fields
from pipelines.ledger import Ledger
from pipelines.steps import RunDir
from pipelines.tracking import MlflowTracker
from receraser_core.models.base import ConfigError

#: what a compared configuration's run directory records of it (name and fields) once built
COMPARED_FILE = "compared.json"


class ReceraserResource(ConfigurableResource, PipelineConfig):
    """The pipeline configuration (every field of `PipelineConfig`, its defaults and validation inherited, not
    copied) plus where state and data live. Built from the CLI options, the config file and the environment by
    `dagster_project.settings.load_settings`; the Dagster UI's launchpad can override any field as run config
    (``resources: receraser: config: {model: bpr, ...}``)."""

    state_dir: str = ""  # the state directory (run directories, Dagster and MLflow storage); "" = ./state
    data_dir: str = ""  # where the named datasets are; "" = the default search (`receraser --help`)
    #: configurations built beside this one, by name: preset names or name -> fields that differ
    #: (`pipelines.config.compare_configs`); each is a key-prefixed asset group of the same Definitions
    compare: dict[str, Any] = {}
    #: set on a compared configuration's resource only: its name (the asset key prefix) and the main
    #: configuration's run directory, whose interactions, pretraining and ledger it shares (its ``compare``
    #: holds its own name and fields)
    name: str = ""
    main_dir: str = ""

    @classmethod
    def from_pipeline_config(
        cls, cfg: PipelineConfig, state: Path, data: Path | None = None, compare: Any = None
    ) -> ReceraserResource:
        named = compare_fields(compare or {})
        return cls(**cfg.to_dict(), state_dir=str(state), data_dir=str(data or ""), compare=named)

    def compared(self) -> dict[str, ReceraserResource]:
        """The compared configurations' resources, by name (none on a compared configuration's own): the ones
        the settings name, and every one built beside this configuration before (recorded in its run
        directory), so that a deletion reaches them whatever the settings of the command that applies it."""
        if self.main_dir:
            return {}
        main = self.run_dir().root
        named = {**self.recorded_compared(), **self.compare}
        out = {}
        for name, cfg in compare_configs(self.pipeline_config(), named).items():
            other = ReceraserResource(
                **cfg.to_dict(),
                state_dir=self.state_dir,
                data_dir=self.data_dir,
                compare={name: named[name]},  # its own fields, for `record_compared`
                name=name,
                main_dir=str(main),
            )
            built = [d for d in (main / "compare").glob(f"{name}-*") if (d / COMPARED_FILE).exists()]
            if any(d != other.run_dir().root for d in built):
                raise ConfigError(
                    f"compared configuration {name!r} was built with other fields in {built[0]}: remove that "
                    "directory (and its asset group's history in Dagster) or choose another name"
                )
            out[name] = other
        return out

    def recorded_compared(self) -> dict[str, Any]:
        """The compared configurations built beside this one, name -> fields, as their run directories record."""
        out = {}
        for path in sorted((self.run_dir().root / "compare").glob(f"*/{COMPARED_FILE}")):
            record = json.loads(path.read_text())
            out[record["name"]] = record["fields"]
        return out

    def record_compared(self) -> None:
        """On a compared configuration's resource: record in its run directory that it was built (its name and
        fields), so that every later deletion reaches it (`compared`)."""
        path = self.run_dir().root / COMPARED_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"name": self.name, "fields": self.compare[self.name]}, indent=2))

    def pipeline_config(self) -> PipelineConfig:
        return PipelineConfig(**self.to_dict())

    def state_path(self) -> Path:
        from receraser_core.data.readers import PROJECT_ROOT

        return Path(self.state_dir or PROJECT_ROOT / "state").resolve()

    def run_dir(self) -> RunDir:
        """This configuration's run directory, under the state directory."""
        name = f"{self.dataset.replace(':', '_').replace('/', '_')}-{self.model}-{self.partitioner}-{self.aggregator}"
        if self.main_dir:  # inside the main configuration's run directory, reading its interactions
            main = RunDir(Path(self.main_dir))
            return RunDir(main.root / "compare" / f"{self.name}-{name}-K{self.n_shards}-{self.fingerprint()[:8]}", main)
        return RunDir(self.state_path() / "pipeline" / f"{name}-K{self.n_shards}-s{self.seed}-{self.fingerprint()[:8]}")

    def data_path(self) -> Path | None:
        return Path(self.data_dir) if self.data_dir else None

    def experiment(self) -> str:
        """One MLflow experiment per dataset: every configuration and base model of it, side by side."""
        return f"receraser/{self.dataset}"

    def tracker(self) -> MlflowTracker:
        """MLflow, with its store in the state directory."""
        return MlflowTracker.in_state_dir(self.state_path())


def ledger_for(rec: ReceraserResource) -> Ledger:
    """The deletion ledger of this pipeline configuration, beside its run directory (a compared configuration's
    is its main configuration's: one request reaches both)."""
    return Ledger((Path(rec.main_dir) if rec.main_dir else rec.run_dir().root) / "ledger.sqlite")
