"""Evidence beyond exactness: how deleted records look to a model before unlearning, after it, and to a Retrain.

For each (user, item) pair the model's score and the item's rank among all items for that user, with the
user's *other* training items masked (the pair itself stays rankable, whether or not it is still trained on).
A membership-inference test tells deleted records (members of the training data before unlearning) from
never-seen records (test records) by their rank: its AUC is well above 0.5 for the model that trained on them
and should sit where a Retrain's does once they are forgotten.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch
from scipy.stats import rankdata

Scorer = Callable[[torch.Tensor], torch.Tensor]


def pair_ranks(
    scorer: Scorer, train: sp.csr_matrix, users: np.ndarray, items: np.ndarray, batch: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(score, rank) of each pair: rank 1 is the top; the user's training items other than the pair's are
    masked, ties count against the pair."""
    scores = np.empty(len(users), dtype=np.float64)
    ranks = np.empty(len(users), dtype=np.int64)
    for start in range(0, len(users), batch):
        u, i = users[start : start + batch], items[start : start + batch]
        with torch.no_grad():
            s = scorer(torch.from_numpy(u.astype(np.int64))).double().numpy().copy()
        own = s[np.arange(len(u)), i].copy()
        rows = train[u].tocoo()
        s[rows.row, rows.col] = -np.inf
        s[np.arange(len(u)), i] = own  # the pair itself stays rankable
        scores[start : start + len(u)] = own
        ranks[start : start + len(u)] = 1 + (s > own[:, None]).sum(1)
    return scores, ranks


def auc(members: np.ndarray, others: np.ndarray) -> float:
    """P(a member's attack score > a non-member's), ties counted half (Mann-Whitney)."""
    ranks = rankdata(np.concatenate([members, others]))  # ties get their average rank
    m = len(members)
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * len(others)))


def bootstrap_auc(
    members: dict[str, np.ndarray], others: dict[str, np.ndarray], seed: int, rounds: int = 1000
) -> dict[str, list[float]]:
    """The AUC of each model over ``rounds`` resamples of the same member and non-member pairs (the same
    resample for every model, so differences between models are paired)."""
    rng = np.random.default_rng(seed)
    n_m, n_o = len(next(iter(members.values()))), len(next(iter(others.values())))
    out: dict[str, list[float]] = {name: [] for name in members}
    for _ in range(rounds):
        pick_m, pick_o = rng.integers(0, n_m, n_m), rng.integers(0, n_o, n_o)
        for name in members:
            out[name].append(auc(members[name][pick_m], others[name][pick_o]))
    return out


def interval(values: list[float] | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.percentile(np.asarray(values), [50 * (1 - level), 100 - 50 * (1 - level)])
    return float(lo), float(hi)
