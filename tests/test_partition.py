"""Partitioners: every interaction in exactly one shard, no shard empty, capacity respected, seeded."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from receraser_core.data.interactions import pairs_to_csr
from receraser_core.partition import PARTITIONERS, PartitionError, greedy_balanced_assign
from receraser_core.partition.balanced import _means


def greedy_reference(dist: np.ndarray, capacity: int) -> np.ndarray:
    """The literal algorithm: sort all pairs nearest first (ties by point), assign while there is room."""
    n, k = dist.shape
    pairs = sorted((dist[p, s], p, s) for p in range(n) for s in range(k))
    out, counts = np.full(n, -1), np.zeros(k, dtype=int)
    for _, p, s in pairs:
        if out[p] < 0 and counts[s] < capacity:
            out[p], counts[s] = s, counts[s] + 1
    return out


@pytest.mark.parametrize(
    ("n", "k", "capacity", "seed"),
    [(10, 3, 4, 0), (50, 4, 15, 1), (200, 7, 35, 2), (31, 5, 7, 3), (12, 3, 4, 4)],
)
def test_vectorised_greedy_equals_the_literal_greedy(n: int, k: int, capacity: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    dist = rng.random((n, k)) ** 3  # skewed: most points prefer the same shard, capacity binds
    assert np.array_equal(greedy_balanced_assign(dist, capacity), greedy_reference(dist, capacity))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_greedy_breaks_ties_like_the_literal_greedy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    dist = rng.integers(0, 3, size=(120, 5)).astype(float)  # many equal distances: ties by point, then shard
    assert np.array_equal(greedy_balanced_assign(dist, 26), greedy_reference(dist, 26))


def test_greedy_hand_case() -> None:
    # three points all nearest to shard 0, capacity 2: the two nearest stay, the third moves to shard 1
    dist = np.array([[0.1, 0.9], [0.2, 0.8], [0.3, 0.4]])
    assert greedy_balanced_assign(dist, 2).tolist() == [0, 0, 1]
    with pytest.raises(PartitionError, match="cannot hold"):
        greedy_balanced_assign(dist, 1)


def test_vector_mean_anchor_update() -> None:
    x = np.array([[0.0, 0.0], [2.0, 4.0], [10.0, 10.0]])
    anchors = np.array([[9.0, 9.0], [5.0, 5.0], [7.0, 7.0]])
    got = _means(x, np.array([0, 0, 1]), anchors)
    assert got.tolist() == [[1.0, 2.0], [10.0, 10.0], [7.0, 7.0]]  # vectors, not scalars; empty keeps anchor


def _clustered(seed: int = 0, n_users: int = 60, n_items: int = 40):
    """Users and items in 3 well-separated clusters; each user interacts with items of its cluster."""
    rng = np.random.default_rng(seed)
    centers = np.array([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    uc, ic = np.arange(n_users) % 3, np.arange(n_items) % 3
    user_emb = centers[uc] + rng.normal(0, 0.5, (n_users, 2))
    item_emb = centers[ic] + rng.normal(0, 0.5, (n_items, 2))
    pairs = [(u, i) for u in range(n_users) for i in range(n_items) if ic[i] == uc[u] and rng.random() < 0.5]
    arr = np.array(pairs)
    return pairs_to_csr(arr[:, 0], arr[:, 1], n_users, n_items), user_emb, item_emb, uc


@pytest.mark.parametrize("method", list(PARTITIONERS))
@pytest.mark.parametrize("k", [2, 3, 5])
def test_partition_invariants(method: str, k: int) -> None:
    train, user_emb, item_emb, _ = _clustered()
    part = PARTITIONERS[method](train, k, seed=1, user_emb=user_emb, item_emb=item_emb)
    a = part.assignment
    assert a.shape == (train.nnz,) and a.min() >= 0 and a.max() < k
    sizes = np.bincount(a, minlength=k)
    assert (sizes > 0).all(), sizes
    assert part.diagnostics["sizes"] == sizes.tolist()
    # the shard matrices are disjoint and add up to the training matrix
    total = sum(part.shard_matrix(train, s) for s in range(k))
    assert (total != train).nnz == 0 and total.max() == 1
    if method in ("random", "inbp"):
        assert sizes.max() <= int(np.ceil(1.2 * train.nnz / k))
    same = PARTITIONERS[method](train, k, seed=1, user_emb=user_emb, item_emb=item_emb)
    assert np.array_equal(a, same.assignment)


def test_capacity_of_node_partitioners() -> None:
    train, user_emb, item_emb, _ = _clustered()
    ubp = PARTITIONERS["ubp"](train, 4, seed=0, user_emb=user_emb)
    users = np.repeat(np.arange(train.shape[0]), np.diff(train.indptr))
    labels = np.full(train.shape[0], -1)
    labels[users] = ubp.assignment
    assert np.bincount(labels, minlength=4).max() <= int(np.ceil(1.2 * 60 / 4))
    ibp = PARTITIONERS["ibp"](train, 4, seed=0, item_emb=item_emb)
    item_labels = {}
    for i, s in zip(train.indices, ibp.assignment, strict=True):
        assert item_labels.setdefault(i, s) == s  # an item's interactions share one shard


def test_balanced_partitions_keep_cluster_structure() -> None:
    train, user_emb, item_emb, uc = _clustered(seed=3)
    users = np.repeat(np.arange(train.shape[0]), np.diff(train.indptr))
    for method in ("ubp", "inbp"):
        part = PARTITIONERS[method](train, 3, seed=0, user_emb=user_emb, item_emb=item_emb)
        # each shard is (almost) one cluster: purity of the user cluster per shard
        purity = sum(np.bincount(uc[users[part.assignment == s]]).max() for s in range(3)) / train.nnz
        assert purity > 0.95, (method, purity)
    rand = PARTITIONERS["random"](train, 3, seed=0)
    purity = sum(np.bincount(uc[users[rand.assignment == s]]).max() for s in range(3)) / train.nnz
    assert purity < 0.5


def test_seed_changes_random_partition_and_errors() -> None:
    train, user_emb, item_emb, _ = _clustered()
    a = PARTITIONERS["random"](train, 3, seed=0).assignment
    b = PARTITIONERS["random"](train, 3, seed=1).assignment
    assert not np.array_equal(a, b)
    tiny = sp.csr_matrix(np.eye(2, dtype=np.float32))
    with pytest.raises(PartitionError):
        PARTITIONERS["random"](tiny, 3, seed=0)
    with pytest.raises(PartitionError):
        PARTITIONERS["inbp"](tiny, 3, seed=0, user_emb=np.eye(2), item_emb=np.eye(2))
