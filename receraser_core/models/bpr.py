"""BPR-MF: matrix factorisation trained with Bayesian Personalized Ranking.

Rendle et al., "BPR: Bayesian Personalized Ranking from Implicit Feedback" (UAI 2009). For each sampled
(u, i) one negative j is drawn uniformly from the items u has not interacted with *in the training data
the model is given* (a shard's model sees only its shard), and

    L = - sum ln σ(r_ui - r_uj) + l2 * (sum_{u in B} |p_u|^2 + sum_{i in B} |q_i|^2),    r_ui = p_u . q_i

divided by the mini-batch size, minimised with Adam (learning rate ``lr * lr_decay ** (epoch - 1)``).

- ``sampling="user"`` (default): an epoch draws nnz triples, each from a uniform user and one of that user's
  items, as the RecEraser and LightGCN authors' samplers do; ``"interaction"`` visits every pair once, so
  heavy users dominate. On ML-1M (authors' split) user sampling raised the best validation Recall@10 from
  0.1441 to 0.1526 and test Recall@20 from 0.2320 to 0.2459 (benchmarks/results/retrain-ml-1m-bpr.json).
- ``l2_per="row"`` (default) penalises each distinct user and item row the batch touches once;
  ``"occurrence"`` is the common per-sample form, which shrinks a popular item in proportion to its
  frequency (with interaction sampling, row L2 and lr 2e-3 decaying 0.98: 0.2158 -> 0.2320).
- With ``negatives="observed"`` (the shard models' default, `pipelines.config.SHARD_DEFAULTS`) j is drawn only
  among the items that occur in the model's data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from receraser_core.models.base import (
    PairwiseConfig,
    Recommender,
    bpr_triples,
    l2_penalty,
    reachable_rows,
    set_epoch_lr,
)


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Mean of -ln σ(pos - neg) over a batch; pos, neg (b,)."""
    return -F.logsigmoid(pos - neg).mean()


class _TripleLoss(torch.autograd.Function):
    """``bpr_loss`` of triples (u, i, j) read from whole embedding tables, with the gradient written straight
    into the tables' rows (index_add) instead of through autograd's gather, product and sum nodes, whose
    backward materialises several (b, d) tensors more. Same value and gradient as the gathered form (tested)."""

    @staticmethod
    def forward(
        ctx: Any, users: torch.Tensor, items: torch.Tensor, u: torch.Tensor, i: torch.Tensor, j: torch.Tensor
    ) -> torch.Tensor:
        eu, diff = users.index_select(0, u), items.index_select(0, i) - items.index_select(0, j)
        x = torch.einsum("bd,bd->b", eu, diff)  # r_ui - r_uj
        ctx.save_for_backward(eu, diff, x, u, i, j)
        ctx.shapes = users.shape, items.shape
        return -F.logsigmoid(x).mean()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        eu, diff, x, u, i, j = ctx.saved_tensors
        g = (torch.sigmoid(-x) * (-grad / len(x))).unsqueeze(1)  # d loss / d x, (b, 1)
        user_shape, item_shape = ctx.shapes
        gu = eu.new_zeros(user_shape).index_add_(0, u, g * diff)
        rows = g * eu
        gi = eu.new_zeros(item_shape).index_add_(0, i, rows).index_add_(0, j, rows, alpha=-1)
        return gu, gi, None, None, None


def triple_loss(
    users: torch.Tensor, items: torch.Tensor, u: torch.Tensor, i: torch.Tensor, j: torch.Tensor
) -> torch.Tensor:
    """Mean BPR loss of the triples (u[t], i[t], j[t]) over embedding tables ``users`` (n_u, d) and ``items``
    (n_i, d); equal to ``bpr_loss((users[u] * items[i]).sum(-1), (users[u] * items[j]).sum(-1))``."""
    return _TripleLoss.apply(users, items, u, i, j)


@dataclass(frozen=True)
class BPRConfig(PairwiseConfig):
    lr: float = 2e-3


class BPR(Recommender):
    name = "bpr"
    config_cls = BPRConfig
    config: BPRConfig

    def _init_params(self, train: sp.csr_matrix, generator: torch.Generator) -> None:
        std = self.config.init_std
        self.params = {
            "user": (torch.randn(self.n_users, self.config.dim, generator=generator) * std).to(self.device),
            "item": (torch.randn(self.n_items, self.config.dim, generator=generator) * std).to(self.device),
        }
        users, items = reachable_rows(train, self.config.negatives)
        live = self._start_live({"user": users, "item": items})  # only these rows can move
        self._opt = torch.optim.Adam(list(live.values()), lr=self.config.lr, fused=True)

    def _train_epoch(self, train: sp.csr_matrix, epoch: int, rng: np.random.Generator) -> float:
        cfg = self.config
        set_epoch_lr(self._opt, cfg.lr, cfg.lr_decay, epoch)
        u_all, i_all, j_all = bpr_triples(train, rng, self.device, cfg.negatives, cfg.sampling)
        u_all, i_all, j_all = (
            self._live_pos["user"][u_all],
            self._live_pos["item"][i_all],
            self._live_pos["item"][j_all],
        )
        users, items = self._live["user"], self._live["item"]
        total, n = 0.0, 0
        for start in range(0, len(u_all), cfg.batch_size):
            ub, ib, jb = (t[start : start + cfg.batch_size] for t in (u_all, i_all, j_all))
            loss = triple_loss(users, items, ub, ib, jb)
            loss = loss + cfg.l2 * l2_penalty(len(ub), cfg.l2_per, (users, ub), (items, torch.cat([ib, jb])))
            self._opt.zero_grad()
            loss.backward()
            self._opt.step()
            total += float(loss.detach()) * len(ub)
            n += len(ub)
        return total / max(n, 1)

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.params["user"].detach(), self.params["item"].detach()
