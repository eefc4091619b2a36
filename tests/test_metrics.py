"""Recall@N / NDCG@N against a plain-Python reference and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from receraser_core.metrics import evaluate, evaluate_embeddings, popularity_scores


def reference(scores: np.ndarray, train: sp.csr_matrix, test: sp.csr_matrix, ks: list[int]) -> dict[str, float]:
    """The definitions of DESIGN.md section 4, one user at a time, no vectorisation."""
    out = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    users = [u for u in range(test.shape[0]) if test[u].nnz > 0]
    for u in users:
        train_items = set(train[u].indices.tolist())
        test_items = set(test[u].indices.tolist())
        ranked = [i for i in sorted(range(scores.shape[1]), key=lambda i: -scores[u, i]) if i not in train_items]
        for k in ks:
            top = ranked[:k]
            hits = [1.0 if i in test_items else 0.0 for i in top]
            out[f"recall@{k}"] += sum(hits) / len(test_items)
            dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
            idcg = sum(1.0 / math.log2(r + 2) for r in range(min(k, len(test_items))))
            out[f"ndcg@{k}"] += dcg / idcg
    return {key: v / len(users) for key, v in out.items()}


def table_fn(scores: np.ndarray):
    t = torch.from_numpy(scores)
    return lambda users: t[users]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_on_random_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_users, n_items = 40, 70
    dense = rng.random((n_users, n_items))
    train = sp.csr_matrix((dense < 0.2).astype(np.float32))
    test = sp.csr_matrix(((dense >= 0.2) & (dense < 0.35)).astype(np.float32))
    scores = rng.standard_normal((n_users, n_items)).astype(np.float32)  # distinct: no ties
    ks = [1, 5, 10, 20, 50]
    got = evaluate(table_fn(scores), train, test, ks=ks, batch_size=7)
    want = reference(scores, train, test, ks)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert got["users"] == sum(1 for u in range(n_users) if test[u].nnz)


def test_single_relevant_item_at_rank_one_is_perfect_ndcg() -> None:
    # one test item ranked first: NDCG@N = 1 for every N (IDCG over min(N, |T_u|) = 1 position)
    scores = np.array([[0.9, 0.1, 0.2, 0.3, 0.4]], dtype=np.float32)
    test = sp.csr_matrix(np.array([[1, 0, 0, 0, 0]], dtype=np.float32))
    train = sp.csr_matrix((1, 5), dtype=np.float32)
    got = evaluate(table_fn(scores), train, test, ks=[3])
    assert got["ndcg@3"] == pytest.approx(1.0)
    assert got["recall@3"] == pytest.approx(1.0)


def test_hand_computed_case() -> None:
    # items ranked 0 > 1 > 2 > 3 > 4 > 5; item 0 is a training item (masked); test items {2, 5}
    scores = np.array([[6, 5, 4, 3, 2, 1]], dtype=np.float32)
    train = sp.csr_matrix(np.array([[1, 0, 0, 0, 0, 0]], dtype=np.float32))
    test = sp.csr_matrix(np.array([[0, 0, 1, 0, 0, 1]], dtype=np.float32))
    got = evaluate(table_fn(scores), train, test, ks=[2, 3, 10])
    # ranking after masking: 1, 2, 3, 4, 5 -> test item 2 at rank 2, item 5 at rank 5
    assert got["recall@2"] == pytest.approx(0.5)
    assert got["ndcg@2"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert got["recall@3"] == pytest.approx(0.5)
    assert got["recall@10"] == pytest.approx(1.0)
    dcg = 1 / math.log2(3) + 1 / math.log2(6)
    assert got["ndcg@10"] == pytest.approx(dcg / (1 + 1 / math.log2(3)))


def test_hit_ratio_counts_users_with_a_hit() -> None:
    # user 0: test item at rank 2 after masking; user 1: its only test item at rank 4
    scores = np.array([[6, 5, 4, 3, 2, 1], [6, 5, 4, 3, 2, 1]], dtype=np.float32)
    train = sp.csr_matrix(np.array([[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=np.float32))
    test = sp.csr_matrix(np.array([[0, 0, 1, 0, 0, 1], [0, 0, 0, 1, 0, 0]], dtype=np.float32))
    got = evaluate(table_fn(scores), train, test, ks=[2, 4], hit_ratio=True)
    assert got["hit@2"] == pytest.approx(0.5) and got["hit@4"] == pytest.approx(1.0)
    assert "hit@2" not in evaluate(table_fn(scores), train, test, ks=[2])  # only when asked
    only = evaluate(table_fn(scores), train, test, ks=[2], users=np.array([1]), hit_ratio=True)
    assert only["hit@2"] == 0.0 and only["users"] == 1


def test_recall_divides_by_all_test_items_not_by_n() -> None:
    # 30 test items, the top 10 are all hits: Recall@10 = 10/30, NDCG@10 = 1
    n_items = 40
    scores = np.arange(n_items, 0, -1, dtype=np.float32)[None, :]
    test = sp.csr_matrix(np.r_[np.ones(30), np.zeros(10)][None, :].astype(np.float32))
    train = sp.csr_matrix((1, n_items), dtype=np.float32)
    got = evaluate(table_fn(scores), train, test, ks=[10])
    assert got["recall@10"] == pytest.approx(10 / 30)
    assert got["ndcg@10"] == pytest.approx(1.0)


def test_training_items_are_masked_but_validation_items_are_not() -> None:
    scores = np.array([[9, 8, 7, 1]], dtype=np.float32)
    train = sp.csr_matrix(np.array([[1, 0, 0, 0]], dtype=np.float32))
    # item 1 would be a validation item: it stays rankable and takes rank 1
    test = sp.csr_matrix(np.array([[0, 0, 1, 0]], dtype=np.float32))
    got = evaluate(table_fn(scores), train, test, ks=[1, 2])
    assert got["recall@1"] == 0.0
    assert got["recall@2"] == 1.0


def test_users_without_test_items_are_not_averaged() -> None:
    scores = np.array([[1, 0], [0, 1]], dtype=np.float32)
    train = sp.csr_matrix((2, 2), dtype=np.float32)
    test = sp.csr_matrix(np.array([[1, 0], [0, 0]], dtype=np.float32))
    got = evaluate(table_fn(scores), train, test, ks=[1])
    assert got["users"] == 1
    assert got["recall@1"] == 1.0


def test_embeddings_and_popularity_helpers() -> None:
    rng = np.random.default_rng(3)
    u, v = rng.standard_normal((20, 4)), rng.standard_normal((30, 4))
    train = sp.csr_matrix((rng.random((20, 30)) < 0.2).astype(np.float32))
    test = sp.csr_matrix((rng.random((20, 30)) < 0.1).astype(np.float32))
    got = evaluate_embeddings(torch.from_numpy(u), torch.from_numpy(v), train, test, ks=[5])
    assert got["ndcg@5"] == pytest.approx(reference(u @ v.T, train, test, [5])["ndcg@5"])
    got = evaluate(popularity_scores(train), train, test, ks=[50])
    assert got["recall@50"] == pytest.approx(1.0)  # 50 >= n_items: every unmasked item is retrieved


def test_bad_arguments() -> None:
    train = sp.csr_matrix((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="shapes differ"):
        evaluate(lambda u: torch.zeros(len(u), 3), train, sp.csr_matrix((2, 4)))
    with pytest.raises(ValueError, match="positive"):
        evaluate(lambda u: torch.zeros(len(u), 3), train, train, ks=[0])


def test_ranking_among_some_items_equals_pushing_the_others_to_the_bottom() -> None:
    """``items``: only those are ranked (scores for them alone), a test item outside them is never a hit but stays
    in the user's count: the same as scoring every item with the others below all ranked ones."""
    rng = np.random.default_rng(3)
    n_u, n_i = 30, 25
    train = sp.csr_matrix(rng.random((n_u, n_i)) < 0.2, dtype=np.float32)
    test = sp.csr_matrix((rng.random((n_u, n_i)) < 0.15) & (train.toarray() == 0), dtype=np.float32)
    items = np.sort(rng.choice(n_i, size=15, replace=False))
    full = torch.from_numpy(rng.random((n_u, n_i)).astype(np.float32))
    outside = np.setdiff1d(np.arange(n_i), items)
    pushed = full.clone()
    pushed[:, outside] = -1e6
    want = evaluate(lambda u: pushed[u], train, test, ks=(3, 5))
    got = evaluate(lambda u: full[u][:, items], train, test, ks=(3, 5), items=items)
    assert got == want
    assert got != evaluate(lambda u: full[u], train, test, ks=(3, 5))  # the restriction did change the ranking
