"""MeanAgg, SISA's aggregation (Bourtoule et al., IEEE S&P 2021): the average of the submodels' scores,

    r_ui = (1 / |S_ui|) * sum_{k in S_ui} e_u^k . e_i^k,   S_ui = shards where both u and i are present.

No parameters, no training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from receraser_core.aggregate.base import Aggregator


class MeanAggregator(Aggregator):
    name = "mean"
    trainable = False

    def score(self, users: torch.Tensor) -> torch.Tensor:
        s = self.stack
        total = torch.zeros(len(users), s.items.shape[1])
        count = torch.zeros(len(users), s.items.shape[1])
        for k in range(s.n_shards):
            total += s.users[k, users] @ s.items[k].t()  # absent users / items are zero vectors
            count += s.user_mask[k, users].float()[:, None] * s.item_mask[k].float()[None, :]
        return total / count.clamp(min=1.0)

    def scorer(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.score

    def full_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("MeanAgg averages scores; it has no single embedding per user (use score)")
