"""RecEraser's balanced data partition: UBP, IBP and InBP (Chen et al., WWW 2022, Section 3.2, Alg. 1-3).

On pretrained (WMF) user embeddings P and item embeddings Q:

- UBP partitions users: points p_u, K anchors chosen among users; dist(u, k) = |p_u - a_k|^2.
- IBP partitions items likewise with q_i.
- InBP partitions interactions: anchor k is a pair (a_k^u, a_k^i) taken from a random interaction;
  dist((u, i), k) = |p_u - a_k^u|^2 * |q_i - a_k^i|^2.

Each iteration sorts all (point, anchor) pairs nearest first and assigns greedily while the shard holds
fewer than t = ceil(1.2 N / K) points (`base.greedy_balanced_assign`), then moves each anchor to the
**vector mean** of its members (the authors' code drops ``axis=0`` there and collapses anchors to scalars).
It stops when the assignment is unchanged or after ``max_iter`` iterations. UBP / IBP shards hold every
interaction of their users / items.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from receraser_core.partition.base import Partition, PartitionError, balanced_kmeans, describe


def _sq_dist(x: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (n, K) between rows of x (n, d) and anchors (K, d)."""
    d = (x * x).sum(1)[:, None] - 2.0 * x @ anchors.T + (anchors * anchors).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _means(x: np.ndarray, labels: np.ndarray, anchors: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
    """Vector mean per label of the rows ``x[index]`` (or of x itself); labels < 0 are ignored and a label
    without members keeps its anchor. x (m, d), labels (n,), anchors (K, d) -> (K, d)."""
    k = anchors.shape[0]
    rows = np.arange(len(labels)) if index is None else index
    ok = labels >= 0
    member = sp.csr_matrix((np.ones(int(ok.sum())), (labels[ok], rows[ok])), shape=(k, x.shape[0]))
    sums = np.asarray(member @ x)  # (K, d): sum of member vectors, with multiplicity
    counts = np.asarray(member.sum(axis=1))  # (K, 1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), anchors)


def _capacity(n: int, n_shards: int, slack: float) -> int:
    if n < n_shards:
        raise PartitionError(f"cannot split {n} points into {n_shards} non-empty shards")
    return max(math.ceil(slack * n / n_shards), 1)


def _node_partition(
    method: str,
    train: sp.csr_matrix,
    vectors: np.ndarray,
    n_shards: int,
    seed: int,
    max_iter: int,
    slack: float,
    callback: Callable[[dict[str, float]], None] | None = None,
) -> tuple[np.ndarray, dict]:
    """Balanced k-means over node vectors (n, d); returns node labels and the loop diagnostics."""
    rng = np.random.default_rng(seed)
    x = np.asarray(vectors, dtype=np.float64)
    init = x[rng.choice(len(x), n_shards, replace=False)].copy()
    return balanced_kmeans(
        distances=lambda a: _sq_dist(x, a),
        init_anchors=init,
        update=lambda labels, a: _means(x, labels, a),
        n_points=len(x),
        n_shards=n_shards,
        capacity=_capacity(len(x), n_shards, slack),
        max_iter=max_iter,
        rng=rng,
        callback=callback,
    )


def ubp_partition(
    train: sp.csr_matrix,
    n_shards: int,
    seed: int,
    user_emb: np.ndarray,
    max_iter: int = 20,
    slack: float = 1.2,
    callback: Callable[[dict[str, float]], None] | None = None,
    **_: object,
) -> Partition:
    """User-based balanced partition: every interaction goes with its user."""
    labels, info = _node_partition("ubp", train, user_emb, n_shards, seed, max_iter, slack, callback)
    assignment = np.repeat(labels, np.diff(train.indptr))
    return Partition("ubp", n_shards, assignment, describe("ubp", assignment, train, n_shards, **info))


def ibp_partition(
    train: sp.csr_matrix,
    n_shards: int,
    seed: int,
    item_emb: np.ndarray,
    max_iter: int = 20,
    slack: float = 1.2,
    callback: Callable[[dict[str, float]], None] | None = None,
    **_: object,
) -> Partition:
    """Item-based balanced partition: every interaction goes with its item."""
    labels, info = _node_partition("ibp", train, item_emb, n_shards, seed, max_iter, slack, callback)
    assignment = labels[train.indices]
    return Partition("ibp", n_shards, assignment, describe("ibp", assignment, train, n_shards, **info))


def inbp_partition(
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
    """Interaction-based balanced partition (RecEraser's best): points are (user, item) pairs."""
    users = np.repeat(np.arange(train.shape[0]), np.diff(train.indptr))
    items = train.indices.astype(np.int64)
    n = len(users)
    rng = np.random.default_rng(seed)
    p = np.asarray(user_emb, dtype=np.float64)
    q = np.asarray(item_emb, dtype=np.float64)
    picks = rng.choice(n, n_shards, replace=False) if n >= n_shards else np.arange(n)
    init = np.stack([p[users[picks]], q[items[picks]]], axis=1)  # (K, 2, d): user anchor, item anchor

    def distances(a: np.ndarray) -> np.ndarray:  # (n, K) = |p_u - a^u|^2 * |q_i - a^i|^2
        out = np.take(_sq_dist(p, a[:, 0]), users, axis=0)  # (np.take: twice as fast as fancy indexing here)
        out *= np.take(_sq_dist(q, a[:, 1]), items, axis=0)
        return out

    def update(labels: np.ndarray, a: np.ndarray) -> np.ndarray:
        return np.stack([_means(p, labels, a[:, 0], users), _means(q, labels, a[:, 1], items)], axis=1)

    assignment, info = balanced_kmeans(
        distances, init, update, n, n_shards, _capacity(n, n_shards, slack), max_iter, rng, callback
    )
    return Partition("inbp", n_shards, assignment, describe("inbp", assignment, train, n_shards, **info))
