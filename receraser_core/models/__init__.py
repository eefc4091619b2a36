"""Base recommenders behind one interface (`Recommender`), registered by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from receraser_core.data.interactions import DataError
from receraser_core.models.base import BaseConfig, ConfigError, FitResult, Recommender
from receraser_core.models.bpr import BPR, BPRConfig
from receraser_core.models.lightgcn import LightGCN, LightGCNConfig
from receraser_core.models.wmf import WMF, WMFConfig
from receraser_core.state_file import load_state

MODELS: dict[str, type[Recommender]] = {"bpr": BPR, "wmf": WMF, "lightgcn": LightGCN}


def build_model(name: str, n_users: int, n_items: int, **config: Any) -> Recommender:
    """A model by registry name with config fields given as keyword arguments."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    cls = MODELS[name]
    return cls(n_users, n_items, cls.config_cls.from_dict(config))


def load_model(path: Path) -> Recommender:
    """Load a model written by `Recommender.save`."""
    state = load_state(Path(path), "model file")
    if not isinstance(state, dict) or state.get("model") not in MODELS:
        raise DataError(f"{path}: not a receraser model file (no model name); rebuild with `receraser run --rebuild`")
    return MODELS[state["model"]].from_state_dict(state)


__all__ = [
    "MODELS",
    "BPR",
    "WMF",
    "LightGCN",
    "BPRConfig",
    "WMFConfig",
    "LightGCNConfig",
    "BaseConfig",
    "ConfigError",
    "FitResult",
    "Recommender",
    "build_model",
    "load_model",
]
