"""CURE4Rec's user selections and group measures, as `receraser bench unlearning --kind user` uses them."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from receraser_cli.bench_unlearning import choose_users, group_quality, most_active
from receraser_core.data.interactions import DataError


def _train() -> sp.csr_matrix:
    counts = [5, 1, 9, 0, 3, 9, 2, 7, 4, 6]  # user 3 has no training data
    rows = np.repeat(np.arange(10), counts)
    cols = np.concatenate([np.arange(c) for c in counts])
    return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(10, 12))


def test_users_are_chosen_by_activity_or_at_random() -> None:
    train, rng = _train(), np.random.default_rng(0)
    assert list(choose_users(train, 2, "active", rng)) == [2, 5]  # the two with 9 records
    assert list(choose_users(train, 2, "inactive", rng)) == [1, 6]
    assert set(choose_users(train, 3, "active", rng)) - {2, 5} == {7}
    picked = choose_users(train, 0.5, "random", np.random.default_rng(1))  # half of the 9 users with data
    assert len(picked) == 4 and 3 not in picked  # round(4.5) = 4, never a user without training data
    assert np.array_equal(picked, choose_users(train, 0.5, "random", np.random.default_rng(1)))  # seeded
    assert list(most_active(train, 0.2)) == [2, 5]  # 20% of 9 users: 2
    with pytest.raises(DataError, match="cannot erase 20 users"):
        choose_users(train, 20, "random", rng)


def test_group_quality_splits_active_and_other_users() -> None:
    train = _train()
    test = sp.csr_matrix((np.ones(10), (np.arange(10), np.full(10, 11))), shape=(10, 12))  # item 11 for all

    def score(users):  # noqa: ANN001, ANN202 - item 11 first for even users, last for odd ones
        import torch

        s = torch.zeros(len(users), 12)
        s[:, 11] = torch.where(users % 2 == 0, 10.0, -10.0)
        return s

    g = group_quality(score, train, test, np.array([2, 5]))
    # user 2: item 11 first (NDCG 1); user 5 (items 0-8 masked): last of items 9, 10, 11 (NDCG 1 / log2 4)
    assert g["ndcg@20_active"] == pytest.approx((1 + 0.5) / 2) and g["active_users_evaluated"] == 2
    # every user has one test item ranked in the top 20 of 12 - its training items: all are hits
    assert g["hit@20"] == pytest.approx(1.0)
    assert g["ndcg@20_gap"] == pytest.approx(g["ndcg@20_active"] - g["ndcg@20_other"])
