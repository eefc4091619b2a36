"""Seeded synthetic interaction tables with the shape of MovieLens-10M, for measuring how costs grow with data.

Users' activity follows a log-normal (a few users with thousands of records, most with a few dozen), items'
popularity a Zipf law, and each user picks distinct items with probability proportional to popularity times
``exp(strength * <user factor, item factor>)``: latent-factor structure that a recommender can learn, so
quality is measurable (well above a popularity ranking). The same arguments give the same table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: MovieLens-10M: 69,878 users, 10,677 items, 10,000,054 ratings.
ML10M_USERS, ML10M_ITEMS = 69_878, 10_677


@dataclass(frozen=True)
class SynthConfig:
    interactions: int
    seed: int = 0
    users: int = ML10M_USERS
    items: int = ML10M_ITEMS
    factors: int = 16
    strength: float = 3.0  # how much taste (vs popularity) decides; 0 = popularity alone
    activity_sigma: float = 1.0  # spread of users' (log) activity
    popularity_exponent: float = 0.9  # Zipf exponent of item popularity
    min_per_user: int = 5

    def check(self) -> None:
        if self.users < 1 or self.items < 2:
            raise ValueError(f"need at least 1 user and 2 items, got {self.users} users, {self.items} items")
        if not self.users * self.min_per_user <= self.interactions <= self.users * self.items // 2:
            raise ValueError(
                f"{self.interactions:,} interactions do not fit {self.users:,} users x {self.items:,} items "
                f"(between {self.users * self.min_per_user:,}, {self.min_per_user} per user, and half the matrix, "
                f"{self.users * self.items // 2:,}); change --users / --items"
            )


def _per_user(cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Records per user: log-normal weights scaled to the total, each user between the minimum and half the
    catalogue; rounding differences go to the most active users."""
    cap = cfg.items // 2
    weights = rng.lognormal(0.0, cfg.activity_sigma, cfg.users)
    counts = np.full(cfg.users, cfg.min_per_user, dtype=np.int64)
    extra = cfg.interactions - counts.sum()
    for _ in range(50):  # spread the rest in proportion to the weights, respecting the cap
        room = cap - counts
        if extra <= 0 or not room.any():
            break
        share = np.floor(extra * weights * (room > 0) / (weights * (room > 0)).sum()).astype(np.int64)
        counts += np.minimum(share, room)
        extra = cfg.interactions - counts.sum()
    order = np.argsort(-weights, kind="stable")
    while extra > 0:  # what rounding left: one more each for the most active users with room
        take = order[counts[order] < cap][:extra]
        counts[take] += 1
        extra -= len(take)
    return counts


def synthesize(cfg: SynthConfig, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(user, item) index arrays of ``cfg.interactions`` distinct pairs, users sorted."""
    cfg.check()
    rng = np.random.default_rng(cfg.seed)
    counts = _per_user(cfg, rng)
    popularity = (1.0 + rng.permutation(cfg.items)) ** -cfg.popularity_exponent
    log_pop = np.log(popularity / popularity.sum())
    user_f = rng.normal(0.0, 1.0, (cfg.users, cfg.factors)) / np.sqrt(cfg.factors)
    item_f = rng.normal(0.0, 1.0, (cfg.items, cfg.factors)) / np.sqrt(cfg.factors)
    users, items = [], []
    for start in range(0, cfg.users, batch):
        stop = min(start + batch, cfg.users)
        logits = log_pop + cfg.strength * np.sqrt(cfg.factors) * (user_f[start:stop] @ item_f.T)
        keys = logits + rng.gumbel(size=logits.shape)  # Gumbel top-k: a weighted draw without replacement
        k = int(counts[start:stop].max())
        top = (
            np.argpartition(-keys, k - 1, axis=1)[:, :k]
            if k < cfg.items
            else np.tile(np.arange(cfg.items), (stop - start, 1))
        )
        ranked = np.take_along_axis(top, np.argsort(-np.take_along_axis(keys, top, 1), axis=1), 1)
        for row, n in enumerate(counts[start:stop]):
            items.append(ranked[row, :n])
            users.append(np.full(n, start + row, dtype=np.int64))
    return np.concatenate(users), np.concatenate(items).astype(np.int64)


def write_table(cfg: SynthConfig, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Check ``cfg`` (ValueError), draw its table and write it to ``path`` as Parquet (``user``, ``item``),
    atomically; returns the drawn (users, items)."""
    import pandas as pd

    cfg.check()
    users, items = synthesize(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pd.DataFrame({"user": users, "item": items}).to_parquet(tmp, index=False)
    tmp.replace(path)
    return users, items
