"""Partitioners: the shard id of every training interaction. Registered by name."""

from __future__ import annotations

from collections.abc import Callable

from receraser_core.partition.balanced import ibp_partition, inbp_partition, ubp_partition
from receraser_core.partition.base import (
    Partition,
    PartitionError,
    greedy_balanced_assign,
    route_validation,
    routed_validation,
)
from receraser_core.partition.graph_eraser import graph_eraser_partition
from receraser_core.partition.random import random_partition

PARTITIONERS: dict[str, Callable[..., Partition]] = {
    "random": random_partition,
    "ubp": ubp_partition,
    "ibp": ibp_partition,
    "inbp": inbp_partition,
    "graph_eraser": graph_eraser_partition,
}

__all__ = [
    "PARTITIONERS",
    "Partition",
    "PartitionError",
    "greedy_balanced_assign",
    "route_validation",
    "routed_validation",
]
