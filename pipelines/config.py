"""One typed configuration for the whole RecEraser pipeline, with the paper's defaults."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pydantic

from receraser_core.aggregate import AGGREGATORS, AggConfig
from receraser_core.models import MODELS, ConfigError
from receraser_core.partition import PARTITIONERS

#: Aggregator training defaults per base model (chosen on ML-1M validation; see docs/results.md).
AGG_DEFAULTS: dict[str, dict[str, Any]] = {
    # WMF: a fixed budget of 12 epochs, keeping the best on validation. With an aligned start it plateaus by
    # then, and validation moves in small noisy steps: patience 2 stopped one unlearning retrain at epoch 8
    # (Recall@20 -5%), so a fixed budget keeps both the quality and the unlearning time steady.
    # Then for cost (each step embeds every item, so a fit costs about its number of steps): 384 users a step
    # at lr 0.03, warmed up over the first 15% of the steps and decayed linearly to zero, 10 epochs validated
    # from the 6th: 160 steps instead of 288 and 5 validations instead of 12, for the same validation Recall@10
    # (0.1428 against 0.1434) and test Recall@20 (0.2292 against 0.2310, seed 0; see docs/results.md).
    "wmf": {
        "loss": "wmf",
        "lr": 0.03,
        "reg": 10.0,
        "epochs": 10,
        "patience": 10,
        "batch_size": 6144,
        "warmup": 0.15,
        "decay": "linear",
        "valid_from": 8,
        # on larger data, more users a step instead of more steps (each step embeds every item): ML-1M keeps 384
        # users a step (16 steps an epoch); 70k users get 16 steps of 4.4k (docs/results.md, "Growth with data")
        "max_steps_per_epoch": 16,
    },
    # BPR: large batches (11 steps per epoch on ML-1M) keep the aggregator near its aligned start and make an
    # epoch cheap: batch 4096 -> 65536 raised RecEraser's Recall@20 from 0.1794 to 0.1998 on the same InBP
    # shards, at a fifth of the time per epoch. Triples are drawn per user, like the base model's: on the same
    # user-sampled InBP shards, validation Recall@10 / test Recall@20 0.1308 / 0.2124 (per interaction, L2
    # 1e-3) -> 0.1336 / 0.2177 (per user, L2 1e-3). L2 on the aggregated vectors then chosen on validation
    # Recall@10 (same shards, per user): 3e-4 -> 0.1335, 1e-3 -> 0.1336, 3e-3 -> 0.1389, 6e-3 -> 0.1365,
    # 1.2e-2 -> 0.1298 (the last two with patience 3; 3e-3 with 24 epochs and patience 3: 0.1395).
    # Its validation jumps from epoch to epoch (0.1331-0.1395 after epoch 5 on the seed-0 shards), so it
    # validates and keeps a moving average of its weights (ema 0.7 per epoch). Same shards, same 10 epochs
    # and patience, validation Recall@10 of the epoch selected: seed 0 0.1382 -> 0.1390, two other InBP
    # partitions (seeds 1, 2) 0.1347 -> 0.1384 and 0.1320 -> 0.1335. A uniform average from epoch 1 did
    # about as well (0.1390, 0.1379, 0.1347); ema 0.5 stopped early (0.1371, 0.1369, 0.1323). WMF's aggregator
    # keeps its raw weights: with ema 0.7 its 12 epochs selected 0.1437 against 0.1426, but test NDCG@20 fell
    # (0.3288 -> 0.3268) and it already beats the paper. Nor does LightGCN's: within its 14 epochs ema 0.7
    # selected 0.1412 against 0.1411 (test Recall@20 0.2270 against 0.2282).
    "bpr": {
        "loss": "bpr",
        "lr": 0.02,
        "reg": 3e-3,
        "epochs": 10,
        "patience": 2,
        "batch_size": 65536,
        "sampling": "user",
        "ema": 0.7,
        # for cost: a step takes one block of users' triples and scores that block against every item (two dense
        # products), so it embeds a tenth of the users; validated from epoch 6. Same validation and test quality
        # on the same shards at about half the fit (README, "What makes retraining cheaper")
        "user_blocks": True,
        "valid_from": 6,
    },
    # LightGCN: per-user triples and more L2, chosen on validation Recall@10 on the same user-sampled InBP
    # shards (test Recall@20 in brackets): per interaction, L2 1e-3 0.1359 (0.2206); per user: L2 1e-3 0.1388
    # (0.2236), 3e-3 0.1397 (0.2275), 6e-3 0.1410 (0.2277), 1.2e-2 at most 0.1360 in 14 epochs (unstable);
    # 3e-3 with lr 5e-3 0.1389 (0.2256). Then the batch, for cost (each step propagates the whole graph, so an
    # epoch costs about its number of steps): 8192 at lr 1e-2 0.1410 at epoch 5 of 9 run (115-125 s);
    # 32768 at lr 2e-2 0.1405 at epoch 13 of 17 (79 s, a third less); 65536 at lr 3e-2 0.1380 (55 s).
    # At most 14 epochs: with up to 30 epochs and patience 3 the aggregator's cost swung with the noisy
    # validation (52, 72 and 89 s in three deletions of one unlearning run). Capped at 10, the best epoch on
    # the full ML-1M data was 9 (0.1400 -> test 0.2264 / 0.3236); with 30 it was 13 (0.1411 -> 0.2282 / 0.3252),
    # as in the dense-attention run above (13 of 17). 14 keeps that epoch and bounds the cost.
    "lightgcn": {
        "loss": "lightgcn",
        "lr": 0.02,
        "reg": 6e-3,
        "epochs": 14,
        "patience": 3,
        "batch_size": 32768,
        "sampling": "user",
    },
}

#: Shard submodel overrides per base model: a shard holds ~1/K of the data, so an epoch has ~K times fewer
#: Adam steps; BPR at the full-data lr (1e-3) barely leaves its initialisation before early stopping.
#: BPR and LightGCN shards draw negatives only from the shard's own items: with InBP a user's other items
#: mostly sit in other shards, and sampling them as negatives taught each shard to rank them low (ML-1M,
#: K = 10, RecEraser Recall@20: BPR 0.1644 -> 0.1782, LightGCN 0.1979 -> 0.2188; docs/results.md).
#: BPR and LightGCN shards keep the per-occurrence L2 and a constant learning rate: the full-data defaults (L2
#: once per row, lr decay 0.98) lowered RecEraser's test Recall@20 on the same InBP partition (BPR 0.1782 ->
#: 0.1731, validation 0.179 -> 0.171; LightGCN 0.2188 -> 0.2075; measured with per-interaction sampling, before
#: shards sampled per user, and not rerun since).
#: BPR and LightGCN shards early-stop ranking only the items they were trained on (`valid_items`): the others
#: keep their random start and the aggregator masks them, and validating over every item was a quarter of a BPR
#: shard's fit.
SHARD_DEFAULTS: dict[str, dict[str, Any]] = {
    "bpr": {"lr": 5e-3, "negatives": "observed", "l2_per": "occurrence", "lr_decay": 1.0, "valid_items": "trained"},
    "lightgcn": {
        "lr": 1e-2,
        "negatives": "observed",
        "l2_per": "occurrence",
        "lr_decay": 1.0,
        "valid_items": "trained",
    },
}


#: Upper bound on K whatever the data: each shard is a Dagster partition with its own model file and run. The
#: data sets a tighter bound (no shard may be empty), checked by `pipelines.steps.check_shards` before any training.
MAX_SHARDS = 1024
#: K = 1 is a single model trained on everything: Retrain, not RecEraser.
MIN_SHARDS = 2


def shard_units(partitioner: str, train: Any) -> tuple[int, str]:
    """How many units the partitioner deals out to shards, and what they are: users (UBP), items (IBP), else
    interactions. K above this count leaves a shard empty."""
    if partitioner == "ubp":
        return int((train.getnnz(axis=1) > 0).sum()), "users"
    if partitioner == "ibp":
        return int((train.getnnz(axis=0) > 0).sum()), "items"
    return int(train.nnz), "interactions"


class PipelineConfig(pydantic.BaseModel):
    """Everything that determines a RecEraser model. Same config + data = same model (bit for bit on CPU).

    The one typed source of the pipeline's defaults and validation: the Dagster resource inherits these fields
    (`dagster_project.resources.ReceraserResource`), and the CLI options, the config file and the
    ``RECERASER_<FIELD>`` variables are all read into it (`dagster_project.settings.load_settings`). A bad
    value fails at construction; `from_dict` turns that into one `ConfigError` line naming the field."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    dataset: str = "ml-1m"
    model: str = "wmf"
    partitioner: str = "inbp"
    aggregator: str = "attention"
    n_shards: int = 10
    seed: int = 0
    split_seed: int = 0
    partition_iters: int = 20
    # which validation pairs early-stop a shard: "routed" (each pair steers one shard holding its user and item,
    # so forgetting it retrains one shard), "local" (every shard holding both) or "global" (all, every shard)
    shard_valid: str = "routed"
    #: base-model fields that differ from the model's defaults (e.g. ``{"lr": 0.01}``), shards and Retrain alike
    model_overrides: dict[str, Any] = pydantic.Field(default_factory=dict)
    #: aggregator training fields that differ from `AGG_DEFAULTS` (`receraser_core.aggregate.AggConfig`)
    agg_overrides: dict[str, Any] = pydantic.Field(default_factory=dict)

    @pydantic.field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return _one_of("model", v, MODELS)

    @pydantic.field_validator("partitioner")
    @classmethod
    def _partitioner(cls, v: str) -> str:
        return _one_of("partitioner", v, PARTITIONERS)

    @pydantic.field_validator("aggregator")
    @classmethod
    def _aggregator(cls, v: str) -> str:
        return _one_of("aggregator", v, AGGREGATORS)

    @pydantic.field_validator("shard_valid")
    @classmethod
    def _shard_valid(cls, v: str) -> str:
        return _one_of("shard_valid", v, ("routed", "local", "global"))

    @pydantic.field_validator("n_shards")
    @classmethod
    def _n_shards(cls, v: int) -> int:
        if not MIN_SHARDS <= v <= MAX_SHARDS:
            raise ValueError(f"n_shards must be between {MIN_SHARDS} and {MAX_SHARDS}, got {v}")
        return v

    @pydantic.field_validator("seed", "split_seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"seeds must be >= 0, got {v}")
        return v

    @pydantic.field_validator("partition_iters")
    @classmethod
    def _iters(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"partition_iters must be >= 1, got {v}")
        return v

    @pydantic.model_validator(mode="after")
    def _overrides(self) -> PipelineConfig:
        """The overrides build valid model and aggregator configs (known fields, lr > 0, ...)."""
        cls = MODELS[self.model].config_cls
        try:
            cls.from_dict({**dataclasses.asdict(cls()), **self.model_overrides})
            self.agg_config()
        except (ConfigError, TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from None
        return self

    def agg_config(self) -> AggConfig:
        values = {**AGG_DEFAULTS[self.model], "seed": self.seed, **self.agg_overrides}
        if self.model == "wmf":
            values.setdefault("c0", self.model_overrides.get("c0", 0.05 if self.dataset == "yelp2018" else 0.2))
        if self.aggregator != "attention" and values.get("loss") == "lightgcn":
            values["loss"] = "bpr"  # score-level aggregators use each shard's own propagated embeddings
        known = {f.name for f in dataclasses.fields(AggConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown aggregator field(s): {', '.join(unknown)}")
        return AggConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PipelineConfig.model_fields}

    def replace(self, **changes: Any) -> PipelineConfig:
        """A copy with ``changes``, validated like any other."""
        return PipelineConfig.from_dict({**self.to_dict(), **changes})

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "") -> PipelineConfig:
        """Validated config from plain values; a bad one is one `ConfigError` line (prefixed with ``source``)."""
        try:
            return cls(**values)
        except pydantic.ValidationError as exc:
            raise ConfigError(_one_line(exc, source, sorted(cls.model_fields))) from None


#: Named configurations a user can put beside the main one by name alone (``"compare": ["sisa", "graph_eraser"]``
#: in the config file): the paper's baselines on the main configuration's data, pretraining, base model and K.
COMPARE_PRESETS: dict[str, dict[str, Any]] = {
    "sisa": {"partitioner": "random", "aggregator": "mean"},
    "graph_eraser": {"partitioner": "graph_eraser", "aggregator": "static"},
    "receraser": {"partitioner": "inbp", "aggregator": "attention"},
}
#: Fields a compared configuration shares with the main one: it reads the main configuration's interactions and
#: pretrained WMF embeddings (the same split and the same pretraining seed), so it cannot change them.
SHARED_FIELDS = ("dataset", "split_seed", "seed")
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_")


def compare_fields(named: Any, source: str = "compare") -> dict[str, Any]:
    """``named`` as name -> fields: a comma-separated string or a list of names become names with no fields."""
    if isinstance(named, str):
        named = [n.strip() for n in named.split(",") if n.strip()]
    if isinstance(named, list):
        named = {n: {} for n in named}
    if not isinstance(named, dict):
        raise ConfigError(f"{source}: expected a list of names or an object of name -> pipeline fields")
    return named


def compare_configs(main: PipelineConfig, named: Any, source: str = "compare") -> dict[str, PipelineConfig]:
    """The configurations to build beside ``main``, by name: ``named`` is a list of preset names
    (`COMPARE_PRESETS`) or a mapping of name -> pipeline fields that differ from ``main`` (a preset name maps to
    the preset plus those fields). One `ConfigError` line for a bad name, an unknown or shared field, or a
    configuration equal to the main one."""
    out: dict[str, PipelineConfig] = {}
    for name, fields in compare_fields(named, source).items():
        if not isinstance(name, str) or not name or set(name) - _NAME_CHARS or name[0].isdigit():
            raise ConfigError(f"{source}: configuration name {name!r}: use lowercase letters, digits and _")
        if not isinstance(fields, dict):
            raise ConfigError(f"{source}: {name}: expected an object of pipeline fields, got {fields!r}")
        if not fields and name not in COMPARE_PRESETS:
            raise ConfigError(
                f"{source}: {name!r} is not a preset ({', '.join(COMPARE_PRESETS)}): give its fields, "
                f'e.g. {{"{name}": {{"partitioner": "ubp"}}}}'
            )
        shared = sorted(set(fields) & set(SHARED_FIELDS))
        if shared:
            raise ConfigError(
                f"{source}: {name}: {', '.join(shared)} cannot differ from the main configuration's (compared "
                "configurations share its interactions and pretraining)"
            )
        cfg = PipelineConfig.from_dict(
            {**main.to_dict(), **COMPARE_PRESETS.get(name, {}), **fields}, f"{source}: {name}"
        )
        if cfg == main:
            raise ConfigError(f"{source}: {name}: the same as the main configuration")
        out[name] = cfg
    return out


def _one_of(name: str, value: str, choices: Any) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


def _one_line(exc: pydantic.ValidationError, source: str, known: list[str]) -> str:
    """pydantic's first error as one line: ``source: field: message``."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        msg = f"unknown pipeline field {where!r}; known: {', '.join(known)}"
    else:
        msg = str(err["msg"]).removeprefix("Value error, ")
        msg = msg if where in msg or not where else f"{where}: {msg}"
    return f"{source}: {msg}" if source else msg
