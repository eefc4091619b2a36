"""Full-ranking evaluation (DESIGN.md section 4).

For every user with at least one test item, all items are ranked by score with the user's *training*
items masked out (validation items stay rankable). With ``T_u`` the user's test items and ``rel_r`` = 1 if
the item at rank r (1-based) is in ``T_u``:

    Recall@N = |top-N ∩ T_u| / |T_u|
    NDCG@N   = DCG@N / IDCG@N,  DCG@N = sum_{r<=N} rel_r / log2(r + 1),  IDCG@N = sum_{r<=min(N, |T_u|)} 1 / log2(r + 1)

Both are averaged over test users. Scores are computed in user batches, so memory is O(batch * n_items).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch

ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # (b,) user indices -> (b, n_items) scores

DEFAULT_KS: tuple[int, ...] = (10, 20, 50)


def _row_entries(m: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(batch row, column) of every stored entry of the selected CSR rows, read from indptr / indices directly
    (no sparse row selection, no dense mask)."""
    start, count = m.indptr[rows], np.diff(m.indptr)[rows]
    batch_row = np.repeat(np.arange(len(rows)), count)
    offsets = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    return batch_row, m.indices[np.repeat(start, count) + offsets]


def validation_users(n_users: int, cap: int) -> np.ndarray | None:
    """The users whose validation Recall@10 early-stops a fit when there are more than ``cap`` (None: all):
    a fixed hash of the user index below ``cap / n_users``, so about ``cap`` users, the same for every model on
    the same data (shards, aggregator, Retrain), and erasing one user never changes whether another is in it.
    Ranking every item for every validation user was most of a WMF fit at 70k users."""
    if cap <= 0 or n_users <= cap:
        return None
    x = np.arange(n_users, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing, wrapping
    x ^= x >> np.uint64(29)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(32)
    return np.flatnonzero(x < np.uint64(int(cap / n_users * 2.0**64)))


def evaluate(
    score_fn: ScoreFn,
    train: sp.csr_matrix,
    test: sp.csr_matrix,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    users: np.ndarray | None = None,
    hit_ratio: bool = False,
    items: np.ndarray | None = None,
) -> dict[str, float]:
    """Mean Recall@k and NDCG@k over users with test items (optionally restricted to ``users``); with
    ``hit_ratio`` also HR@k, the share of those users with at least one test item in their top k.

    ``items`` (sorted item indices): rank among these items only; ``score_fn`` then returns (b, len(items))
    scores in that order. A test item outside them is never a hit but still counts in the user's |T_u|.

    Returns ``{"recall@10": ..., "ndcg@10": ..., ..., "users": n_evaluated}``.
    """
    if train.shape != test.shape:
        raise ValueError(f"train {train.shape} and test {test.shape} shapes differ")
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"cut-offs must be positive integers, got {ks}")
    dev = torch.device(device)
    train, test = sp.csr_matrix(train), sp.csr_matrix(test)
    if not test.has_sorted_indices:
        test = test.sorted_indices()  # a copy: the caller's matrix is not changed
    n_test = np.diff(test.indptr)
    eval_users = np.flatnonzero(n_test > 0)
    if users is not None:
        eval_users = np.intersect1d(eval_users, np.asarray(users))
    n_cols = train.shape[1]
    column: np.ndarray | None = None  # column[item]: its place among ``items``, -1 if not ranked
    if items is not None:
        items = np.asarray(items, dtype=np.int64)
        column = np.full(n_cols, -1, dtype=np.int64)
        column[items] = np.arange(len(items))
    max_k = min(ks[-1], n_cols if items is None else len(items))
    # discount[r] = 1 / log2(r + 2) for 0-based rank r; idcg_table[j] = sum of the first j discounts
    discount = 1.0 / torch.log2(torch.arange(2, max_k + 2, dtype=torch.float64, device=dev))
    idcg_table = torch.cat([torch.zeros(1, dtype=torch.float64, device=dev), discount.cumsum(0)])
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg") + (("hit",) if hit_ratio else ())}
    for start in range(0, len(eval_users), batch_size):
        rows = eval_users[start : start + batch_size]
        with torch.no_grad():
            scores = score_fn(torch.from_numpy(rows).to(dev)).to(torch.float32).clone()  # (b, n_items)
        seen_row, seen_col = _row_entries(train, rows)
        seen_col = seen_col.astype(np.int64)
        if column is not None:
            seen_col = column[seen_col]
            seen_row, seen_col = seen_row[seen_col >= 0], seen_col[seen_col >= 0]
        scores[torch.from_numpy(seen_row).to(dev), torch.from_numpy(seen_col).to(dev)] = -torch.inf
        top = torch.topk(scores, max_k, dim=1).indices.cpu().numpy()  # (b, max_k)
        if items is not None:
            top = items[top]
        # a top item is a hit when (batch row, item) is one of the batch's test entries (sorted keys)
        test_row, test_col = _row_entries(test, rows)
        keys = test_row.astype(np.int64) * n_cols + test_col
        cand = np.arange(len(rows))[:, None] * n_cols + top
        pos = np.minimum(np.searchsorted(keys, cand), max(len(keys) - 1, 0))
        hits = torch.from_numpy((keys[pos] == cand) if len(keys) else np.zeros(cand.shape, bool)).to(dev).double()
        n_rel = torch.from_numpy(n_test[rows]).to(dev)
        for k in ks:
            kk = min(k, max_k)
            recall = hits[:, :kk].sum(1) / n_rel
            dcg = (hits[:, :kk] * discount[:kk]).sum(1)
            idcg = idcg_table[torch.clamp(n_rel, max=kk)]
            sums[f"recall@{k}"] += float(recall.sum())
            sums[f"ndcg@{k}"] += float((dcg / idcg).sum())
            if hit_ratio:
                sums[f"hit@{k}"] += float((hits[:, :kk].sum(1) > 0).sum())
    n = max(len(eval_users), 1)
    result: dict[str, float] = {key: value / n for key, value in sums.items()}
    result["users"] = float(len(eval_users))
    return result


def evaluate_embeddings(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    train: sp.csr_matrix,
    test: sp.csr_matrix,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 1024,
) -> dict[str, float]:
    """`evaluate` with inner-product scores: user_emb (n_users, d), item_emb (n_items, d)."""
    item_t = item_emb.t()
    return evaluate(
        lambda u: user_emb[u.to(user_emb.device)] @ item_t, train, test, ks, batch_size, device=user_emb.device
    )


def popularity_scores(train: sp.csr_matrix) -> ScoreFn:
    """The most-popular baseline: every user gets the items' training counts as scores."""
    counts = torch.from_numpy(np.asarray(train.sum(axis=0)).ravel().astype(np.float32))  # (n_items,)
    return lambda users: counts.unsqueeze(0).expand(len(users), -1)
