"""StaticAgg, GraphEraser's learned aggregation (Chen et al., CCS 2022): one non-negative weight per shard,

    r_ui = sum_k w_k (e_u^k . e_i^k),   w_k = softplus(θ_k),

which is the inner product of the concatenations [w_1 e_u^1, ..., w_K e_u^K] and [e_i^1, ..., e_i^K], so the
base model's own loss trains θ directly. Shard embeddings are frozen; absent users / items are zero.
"""

from __future__ import annotations

import math

import torch

from receraser_core.aggregate.base import AggConfig, Aggregator, ShardStack


class StaticAggregator(Aggregator):
    name = "static"

    def __init__(self, stack: ShardStack, config: AggConfig) -> None:
        super().__init__(stack, config)
        k = stack.n_shards
        # start at w_k = 1 / K (softplus^-1), i.e. at the unnormalised mean of the scores
        self.theta = torch.nn.Parameter(torch.full((k,), math.log(math.expm1(1.0 / k))))

    def weights(self) -> torch.Tensor:
        return torch.nn.functional.softplus(self.theta)  # (K,)

    def user_embed(self, idx: torch.Tensor) -> torch.Tensor:
        u = self.stack.users[:, idx] * self.weights()[:, None, None]  # (K, b, d)
        return u.permute(1, 0, 2).reshape(len(idx), -1)  # (b, K*d)

    def item_embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.stack.items[:, idx].permute(1, 0, 2).reshape(len(idx), -1)  # (b, K*d)
