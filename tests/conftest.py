"""Shared fixtures: small synthetic datasets with known structure."""

from __future__ import annotations

import os
import tempfile

# The Dagster code location reads its pipeline settings once, at import: tests use 3 shards and a
# throw-away state directory so nothing touches the project's own ./state.
os.environ.setdefault("RECERASER_N_SHARDS", "3")
os.environ.setdefault("RECERASER_HOME", tempfile.mkdtemp(prefix="receraser-test-state-"))
os.environ.setdefault("DAGSTER_HOME", os.path.join(os.environ["RECERASER_HOME"], "dagster"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from receraser_core.data.interactions import Interactions, pairs_to_csr  # noqa: E402
from receraser_core.data.readers import PROJECT_ROOT  # noqa: E402

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "ml-1m").is_dir(), reason=f"real datasets not present at {SHARED_DATA}"
)


def block_interactions(
    n_blocks: int = 4, users_per_block: int = 12, items_per_block: int = 10, seed: int = 0
) -> Interactions:
    """Users in block b interact only with items of block b: each user holds out one valid and one test item.

    A model that learns the block structure ranks the held-out items near the top.
    """
    rng = np.random.default_rng(seed)
    n_users, n_items = n_blocks * users_per_block, n_blocks * items_per_block
    tr, va, te = [], [], []
    for u in range(n_users):
        b = u // users_per_block
        items = rng.permutation(np.arange(b * items_per_block, (b + 1) * items_per_block))
        keep = items[: items_per_block - 3]  # the user sees 7 of the 10 block items
        te.append((u, keep[0]))
        va.append((u, keep[1]))
        tr.extend((u, i) for i in keep[2:])

    def csr(pairs: list[tuple[int, int]]) -> sp.csr_matrix:
        arr = np.asarray(pairs)
        return pairs_to_csr(arr[:, 0], arr[:, 1], n_users, n_items)

    return Interactions("blocks", csr(tr), csr(va), csr(te), np.arange(n_users) + 100, np.arange(n_items) + 500)


@pytest.fixture
def blocks() -> Interactions:
    return block_interactions()
