"""AttAgg, RecEraser's attention-based adaptive aggregation (Chen et al., WWW 2022, Section 3.3).

Each shard's embedding is first transferred into a common space, then weighted by attention:

    ê_u^k = W_k e_u^k + b_k                                       (transfer, W_k d x d)
    a_u^k = h_u^T ReLU(W_u ê_u^k + c_u),   α_u = softmax_k(a_u)    (user attention, d -> 32 -> 1)
    e_u   = sum_k α_u^k ê_u^k

and likewise for items with a separate attention MLP (W_i, c_i, h_i). Shards where the user (item) has no
interaction are masked out of the softmax. For LightGCN the aggregated vectors are layer-0 embeddings that
are then propagated over the full remaining graph. Submodels are frozen; only W_k, b_k and the attention
MLPs train, with the base model's own loss.
"""

from __future__ import annotations

import torch

from receraser_core.aggregate.base import AggConfig, Aggregator, ShardStack


class _Attention(torch.nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (K, b, d) transferred embeddings, mask (K, b) -> combined (b, d)."""
        logits = self.mlp(x).squeeze(-1).masked_fill(~mask, float("-inf"))  # (K, b)
        alpha = torch.softmax(logits, dim=0).nan_to_num(0.0)  # all-masked columns -> zero vector
        return (alpha.unsqueeze(-1) * x).sum(0)


class AttentionAggregator(Aggregator):
    name = "attention"

    def __init__(self, stack: ShardStack, config: AggConfig) -> None:
        super().__init__(stack, config)
        g = torch.Generator().manual_seed(config.seed)
        k, d = stack.n_shards, stack.dim
        eye = torch.eye(d).expand(k, d, d).clone()
        self.transfer_w = torch.nn.Parameter(eye + 0.01 * torch.randn(k, d, d, generator=g))  # near identity
        self.transfer_b = torch.nn.Parameter(torch.zeros(k, 1, d))
        torch.manual_seed(config.seed)
        self.user_att = _Attention(d, config.attention_dim)
        self.item_att = _Attention(d, config.attention_dim)

    def _transfer(self, e: torch.Tensor) -> torch.Tensor:  # (K, b, d) -> (K, b, d)
        return torch.bmm(e, self.transfer_w.transpose(1, 2)) + self.transfer_b

    def user_embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.user_att(self._transfer(self.stack.users[:, idx]), self.stack.user_mask[:, idx])

    def item_embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.item_att(self._transfer(self.stack.items[:, idx]), self.stack.item_mask[:, idx])
