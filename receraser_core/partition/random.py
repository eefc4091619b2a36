"""Random partition, as in SISA (Bourtoule et al., "Machine Unlearning", IEEE S&P 2021).

Interactions are shuffled with the seed and cut into K shards whose sizes differ by at most one. It keeps
no collaborative structure: a user's interactions scatter over all shards.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from receraser_core.partition.base import Partition, PartitionError, describe


def random_partition(train: sp.csr_matrix, n_shards: int, seed: int, **_: object) -> Partition:
    """Shard id per training interaction (CSR order), uniformly random and balanced."""
    n = train.nnz
    if n < n_shards:
        raise PartitionError(f"cannot split {n} interactions into {n_shards} non-empty shards")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    assignment = np.empty(n, dtype=np.int64)
    assignment[rng.permutation(n)] = np.arange(n) % n_shards
    diag = describe("random", assignment, train, n_shards, seconds=time.perf_counter() - t0, iterations=0)
    return Partition("random", n_shards, assignment, diag)
