"""GraphEraser-style partition (Chen et al., "Graph Unlearning", CCS 2022): balanced k-means (BEKM) over
node embeddings, users and items together as nodes of the interaction graph; an interaction then follows
its *user's* shard. Node shards are balanced (t = ceil(1.2 (|U| + |I|) / K)); interaction shards need not be.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from receraser_core.partition.balanced import _node_partition
from receraser_core.partition.base import Partition, describe


def graph_eraser_partition(
    train: sp.csr_matrix,
    n_shards: int,
    seed: int,
    user_emb: np.ndarray,
    item_emb: np.ndarray,
    max_iter: int = 20,
    slack: float = 1.2,
    callback: Callable[[dict[str, float]], None] | None = None,
    **_: object,
) -> Partition:
    """Shard per interaction = BEKM shard of its user node (item nodes shape the clusters)."""
    nodes = np.concatenate([np.asarray(user_emb), np.asarray(item_emb)])  # (n_users + n_items, d)
    labels, info = _node_partition("graph_eraser", train, nodes, n_shards, seed, max_iter, slack, callback)
    assignment = np.repeat(labels[: train.shape[0]], np.diff(train.indptr))
    if (np.bincount(assignment, minlength=n_shards) == 0).any():
        # a shard of item nodes only holds no interaction: give it the interactions of its items' users
        # would break "an interaction follows its user"; instead assign interactions by the item's node
        # label for those shards (documented exception, rare with K << |U|)
        item_labels = labels[train.shape[0] :][train.indices]
        for k in np.flatnonzero(np.bincount(assignment, minlength=n_shards) == 0):
            assignment[item_labels == k] = k
    diag = describe("graph_eraser", assignment, train, n_shards, **info)
    return Partition("graph_eraser", n_shards, assignment, diag)
