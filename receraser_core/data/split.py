"""The seeded split protocol (DESIGN.md section 4).

Per user, a random ``test_frac`` of the interactions goes to test, then ``valid_frac`` of what remains to
validation. Every user keeps at least one training interaction, so nobody is a cold-start user at test
time. The split is a pure function of the pairs and the seed.
"""

from __future__ import annotations

import numpy as np


def _held_out_mask(users: np.ndarray, frac: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask choosing round(frac * n_u) of each user's rows, never all of them. (n,) -> (n,)."""
    n = len(users)
    order = np.lexsort((rng.random(n), users))  # by user, random within user
    sorted_users = users[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    sizes = np.diff(np.r_[starts, n])
    rank = np.arange(n) - np.repeat(starts, sizes)  # position within the user's shuffled rows
    quota = np.minimum(np.floor(frac * sizes + 0.5).astype(np.int64), sizes - 1)
    mask = np.zeros(n, dtype=bool)
    mask[order] = rank < np.repeat(quota, sizes)
    return mask


def protocol_split(
    users: np.ndarray,
    items: np.ndarray,
    seed: int,
    test_frac: float = 0.2,
    valid_frac: float = 0.1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split parallel (users, items) arrays into boolean masks (train, valid, test), each (n,)."""
    if not (0.0 <= test_frac < 1.0 and 0.0 <= valid_frac < 1.0):
        raise ValueError(f"fractions must be in [0, 1): test_frac={test_frac}, valid_frac={valid_frac}")
    users = np.asarray(users, dtype=np.int64)
    rng = np.random.default_rng(seed)
    test = _held_out_mask(users, test_frac, rng)
    rest = np.flatnonzero(~test)
    valid = np.zeros(len(users), dtype=bool)
    valid[rest[_held_out_mask(users[rest], valid_frac, rng)]] = True
    return ~(test | valid), valid, test


def carve_validation(users: np.ndarray, seed: int, valid_frac: float = 0.1) -> np.ndarray:
    """Boolean mask (n,) of training rows moved to validation (used where test is fixed, e.g. Yelp2018)."""
    return _held_out_mask(np.asarray(users, dtype=np.int64), valid_frac, np.random.default_rng(seed))
