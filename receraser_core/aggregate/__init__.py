"""Aggregators over frozen shard submodels, registered by name."""

from __future__ import annotations

from receraser_core.aggregate.attention import AttentionAggregator
from receraser_core.aggregate.base import AggConfig, AggFitResult, Aggregator, ShardStack
from receraser_core.aggregate.mean import MeanAggregator
from receraser_core.aggregate.static import StaticAggregator

AGGREGATORS: dict[str, type[Aggregator]] = {
    "mean": MeanAggregator,
    "static": StaticAggregator,
    "attention": AttentionAggregator,
}

__all__ = ["AGGREGATORS", "AggConfig", "AggFitResult", "Aggregator", "ShardStack"]
