"""Retrain: one model on all (remaining) training data, selected on validation, evaluated on test.

This is the exact-unlearning baseline every RecEraser number is compared with, and the body of
`receraser bench retrain`.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from receraser_core.data.interactions import Interactions
from receraser_core.metrics import DEFAULT_KS, evaluate
from receraser_core.models import MODELS, ConfigError, Recommender, build_model
from receraser_core.models.base import EpochLog

#: Per-dataset defaults that differ from the model configs' own (DESIGN.md section 5).
DATASET_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("wmf", "yelp2018"): {"c0": 0.05},
}


def model_config(model: str, dataset: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Config fields for ``model`` on ``dataset``: the model's defaults, dataset defaults, then overrides."""
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    base = dataclasses.asdict(MODELS[model].config_cls())
    return {**base, **DATASET_DEFAULTS.get((model, dataset), {}), **(overrides or {})}


def parse_overrides(model: str, pairs: list[str]) -> dict[str, Any]:
    """``["lr=0.01", "epochs=50"]`` -> typed dict, using the config dataclass's field types."""
    types = {f.name: f.type for f in dataclasses.fields(MODELS[model].config_cls)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in types:
            raise ConfigError(f"bad --set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(types))}")
        kind = {"int": int, "float": float, "str": str}.get(str(types[key]), str)
        try:
            out[key] = kind(value)
        except ValueError:
            raise ConfigError(f"bad --set {pair!r}: {key} must be {kind.__name__}") from None
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def print_progress(prefix: str) -> Callable[[EpochLog], None]:
    def show(log: EpochLog) -> None:
        valid = f"  valid Recall@10 {log['valid_recall@10']:.4f}" if "valid_recall@10" in log else ""
        loss = f"  loss {log['loss']:.4f}" if "loss" in log else ""
        print(
            f"{prefix} epoch {int(log['epoch']):>4}{loss}{valid}  ({log['seconds']:.0f} s)",
            flush=True,
        )

    return show


@dataclass
class RetrainResult:
    model: Recommender
    metrics: dict[str, float]
    record: dict[str, Any] = field(default_factory=dict)


def retrain(
    inter: Interactions,
    model_name: str,
    config: dict[str, Any],
    callback: Callable[[EpochLog], None] | None = None,
    ks: tuple[int, ...] = DEFAULT_KS,
) -> RetrainResult:
    """Fit ``model_name`` on ``inter.train``, early-stop on ``inter.valid``, evaluate on ``inter.test``."""
    model = build_model(model_name, inter.n_users, inter.n_items, **config)
    t0 = time.perf_counter()
    fit = model.fit(inter.train, inter.valid, callback=callback)
    fit_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    with torch.no_grad():
        metrics = evaluate(model.scorer(), inter.train, inter.test, ks=ks, device=model.device)
    record: dict[str, Any] = {
        "dataset": inter.name,
        "model": model_name,
        "method": "retrain",
        **{f"{m}@{k}": metrics[f"{m}@{k}"] for m in ("recall", "ndcg") for k in ks},
        "fit_seconds": round(fit_seconds, 3),
        "eval_seconds": round(time.perf_counter() - t1, 3),
        "epochs": fit.epochs_run,
        "best_epoch": fit.best_epoch,
        "best_valid_recall@10": fit.best_valid_recall,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "seed": model.config.seed,
        "config": dataclasses.asdict(model.config),
        "torch_threads": torch.get_num_threads(),
        "history": fit.history,
    }
    return RetrainResult(model, metrics, record)
