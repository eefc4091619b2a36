"""The `Interactions` type: implicit feedback over a fixed user x item id space, split train/valid/test.

Every reader in this package returns one of these. Rows are internal user indices ``0..n_users-1``,
columns internal item indices ``0..n_items-1``; ``user_ids[u]`` / ``item_ids[i]`` give the dataset's
original ids back. Matrices are binary CSR with sorted, duplicate-free indices.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp


class DataError(ValueError):
    """Bad input data: the message names the file (and line) and what is wrong."""


def pairs_to_csr(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """Binary CSR matrix (n_users, n_items) from parallel index arrays; duplicate pairs collapse to 1."""
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    data = np.ones(len(users), dtype=np.float32)
    m = sp.csr_matrix((data, (users, items)), shape=(n_users, n_items), dtype=np.float32)
    m.sum_duplicates()
    m.data[:] = 1.0
    m.sort_indices()
    return m


def csr_to_pairs(m: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """(users, items) int64 arrays of the stored entries of a CSR matrix, row-major order."""
    m = sp.csr_matrix(m)
    users = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))
    return users, m.indices.astype(np.int64)


def csr_fingerprint(m: sp.csr_matrix) -> str:
    """Content hash of a binary CSR matrix (shape + structure), stable across processes."""
    m = sp.csr_matrix(m)
    m.sort_indices()
    h = hashlib.sha256()
    h.update(np.asarray(m.shape, dtype=np.int64).tobytes())
    h.update(m.indptr.astype(np.int64).tobytes())
    h.update(m.indices.astype(np.int64).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Interactions:
    """A dataset split into train / valid / test binary matrices of shape (n_users, n_items).

    ``user_ids`` (n_users,) and ``item_ids`` (n_items,) hold the original ids, in internal-index order.
    """

    name: str
    train: sp.csr_matrix
    valid: sp.csr_matrix
    test: sp.csr_matrix
    user_ids: np.ndarray
    item_ids: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shapes = {self.train.shape, self.valid.shape, self.test.shape}
        if len(shapes) != 1:
            raise DataError(f"{self.name}: train/valid/test shapes differ: {sorted(shapes)}")
        n_users, n_items = self.train.shape
        if len(self.user_ids) != n_users or len(self.item_ids) != n_items:
            raise DataError(
                f"{self.name}: id maps ({len(self.user_ids)} users, {len(self.item_ids)} items) "
                f"do not match the matrix shape {self.train.shape}"
            )

    @property
    def n_users(self) -> int:
        return int(self.train.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.train.shape[1])

    def counts(self) -> dict[str, Any]:
        """Users, items, interactions per split and density of all interactions."""
        n_train, n_valid, n_test = self.train.nnz, self.valid.nnz, self.test.nnz
        total = n_train + n_valid + n_test
        out: dict[str, Any] = {
            "dataset": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "train": int(n_train),
            "valid": int(n_valid),
            "test": int(n_test),
            "interactions": int(total),
            "density": total / float(self.n_users * self.n_items),
            "test_users": int((np.diff(self.test.indptr) > 0).sum()),
            "split": str(self.meta.get("split", "")),
        }
        if "published_train" in self.meta:  # the file's train before validation was carved from it
            out["published_train"] = int(self.meta["published_train"])
        return out

    def user_index(self, original_id: Any) -> int:
        """Internal index of an original user id; KeyError naming the id if unknown."""
        return _index_of(self.user_ids, original_id, "user", self.name)

    def item_index(self, original_id: Any) -> int:
        """Internal index of an original item id; KeyError naming the id if unknown."""
        return _index_of(self.item_ids, original_id, "item", self.name)

    def with_train(self, train: sp.csr_matrix) -> Interactions:
        """A copy with a different training matrix (same id space, valid and test)."""
        return Interactions(self.name, train, self.valid, self.test, self.user_ids, self.item_ids, self.meta)


def _index_of(ids: np.ndarray, original_id: Any, kind: str, dataset: str) -> int:
    matches = np.flatnonzero(ids.astype(str) == str(original_id))
    if len(matches) == 0:
        raise KeyError(f"unknown {kind} id {original_id!r} in dataset {dataset}")
    return int(matches[0])


def check_disjoint(inter: Interactions) -> None:
    """Raise DataError if any (user, item) pair is in more than one split."""
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        overlap = getattr(inter, a).multiply(getattr(inter, b)).nnz
        if overlap:
            raise DataError(f"{inter.name}: {overlap} (user, item) pairs are in both {a} and {b}")
