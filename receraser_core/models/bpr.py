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
        eu, diff = F.embedding(u, users), F.embedding(i, items) - F.embedding(j, items)  # gathers
        x = (eu * diff).sum(1)  # r_ui - r_uj
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


def bpr_grads(
    users: torch.Tensor,
    items: torch.Tensor,
    u: torch.Tensor,
    i: torch.Tensor,
    j: torch.Tensor,
    l2: float,
    l2_per: str,
    need_loss: bool = False,
) -> float:
    """One BPR-MF step's gradient, written into ``users.grad`` and ``items.grad`` without autograd: the mean
    BPR loss of the triples (u, i, j) plus ``l2 * l2_penalty(len(u), l2_per, (users, u), (items, i ++ j))``.

    Equal (up to summation order) to backpropagating `triple_loss` + `l2_penalty` (tested), with one gather per
    table lookup and one scatter per table: on a shard's 2,048-triple batches autograd's graph, the separate
    penalty and their scatters were most of the step. Returns the loss when ``need_loss`` (else NaN)."""
    b = len(u)
    with torch.no_grad():
        eu, ei, ej = F.embedding(u, users), F.embedding(i, items), F.embedding(j, items)
        diff = ei - ej
        x = (eu * diff).sum(1)
        g = torch.sigmoid(-x).mul_(-1.0 / b).unsqueeze(1)  # d loss / d x
        c = 2.0 * l2 / b
        gu, gi, gj = g * diff, g * eu, -g * eu
        if l2_per == "occurrence" and l2:
            gu.add_(eu, alpha=c)
            gi.add_(ei, alpha=c)
            gj.add_(ej, alpha=c)
        grad_u = torch.zeros_like(users).index_add_(0, u, gu)
        grad_i = torch.zeros_like(items).index_add_(0, i, gi).index_add_(0, j, gj)
        if l2_per == "row" and l2:
            for table, grad, idx in ((users, grad_u, u), (items, grad_i, torch.cat([i, j]))):
                used = torch.bincount(idx, minlength=len(table)) > 0
                grad.add_(table * used.unsqueeze(1).to(table.dtype), alpha=c)
        users.grad, items.grad = grad_u, grad_i
        if not need_loss:
            return float("nan")
        loss = -F.logsigmoid(x).mean()
        if l2:
            loss = loss + l2 * l2_penalty(b, l2_per, (users, u), (items, torch.cat([i, j])))
        return float(loss)


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
            loss = bpr_grads(users, items, ub, ib, jb, cfg.l2, cfg.l2_per, need_loss=self._needs_loss)
            self._opt.step()
            total += loss * len(ub)
            n += len(ub)
        return total / max(n, 1)

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.params["user"].detach(), self.params["item"].detach()
