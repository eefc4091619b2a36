"""WMF: weighted matrix factorisation for implicit feedback.

Hu, Koren, Volinsky, "Collaborative Filtering for Implicit Feedback Datasets" (ICDM 2008); the whole-data
(non-sampling) form of Chen et al., "Efficient Neural Matrix Factorization without Sampling" (ENMF, SIGIR
2020), as used by RecEraser. Weight 1 on observed entries, ``c0`` on every missing one:

    L = sum_{(u,i) in R} (1 - r_ui)^2 + c0 * sum_{(u,i) not in R} r_ui^2 + reg * (|P|^2 + |Q|^2),   r_ui = p_u . q_i

which, up to the constant |R|, is the ENMF loss

    L = c0 * sum(P^T P  ⊙  Q^T Q) + sum_{(u,i) in R} [(1 - c0) r_ui^2 - 2 r_ui] + reg * (|P|^2 + |Q|^2).

Two solvers minimise it: ``als`` (closed-form alternating least squares through the `implicit` library,
seconds on CPU; dividing L by c0 gives implicit's objective with confidence alpha = 1/c0 on observed entries
and regularisation reg / c0), and ``enmf`` (mini-batch Adam on the ENMF loss in torch; `wmf_loss` is reused
by the WMF aggregator).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from threadpoolctl import threadpool_limits

from receraser_core.models.base import BaseConfig, ConfigError, Recommender


def wmf_loss(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    pos_rows: torch.Tensor,
    pos_items: torch.Tensor,
    c0: float,
) -> torch.Tensor:
    """ENMF whole-data loss of a user batch (without the L2 term).

    user_emb (b, d) for the batch's users, item_emb (n_items, d), and the batch's observed entries as
    ``pos_rows`` (nnz,) indexing into the batch and ``pos_items`` (nnz,) item indices.
    """
    all_pairs = c0 * torch.sum((user_emb.t() @ user_emb) * (item_emb.t() @ item_emb))  # c0 * sum(PᵀP ⊙ QᵀQ)
    r = (user_emb[pos_rows] * item_emb[pos_items]).sum(-1)  # (nnz,) observed predictions
    return all_pairs + torch.sum((1.0 - c0) * r.square() - 2.0 * r)


@dataclass(frozen=True)
class WMFConfig(BaseConfig):
    epochs: int = 30  # ALS sweeps, or ENMF epochs
    patience: int = 3
    c0: float = 0.2  # weight of missing entries (0.2 MovieLens, 0.05 Yelp2018)
    reg: float = 10.0  # L2 weight in the objective above (chosen on ML-1m validation)
    solver: str = "als"  # "als" (closed form, implicit) or "enmf" (torch, mini-batch)
    lr: float = 0.05  # enmf only
    batch_size: int = 256  # enmf only: users per batch
    init_std: float = 0.01

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.c0 <= 1.0:
            raise ConfigError(f"c0 must be in (0, 1], got {self.c0}")
        if self.reg < 0:
            raise ConfigError(f"reg must be >= 0, got {self.reg}")
        if self.solver not in ("als", "enmf"):
            raise ConfigError(f"solver must be 'als' or 'enmf', got {self.solver!r}")


class WMF(Recommender):
    name = "wmf"
    config_cls = WMFConfig
    config: WMFConfig

    def _init_params(self, train: sp.csr_matrix, generator: torch.Generator) -> None:
        cfg = self.config
        std = cfg.init_std
        self.params = {
            "user": (torch.randn(self.n_users, cfg.dim, generator=generator) * std).to(self.device),
            "item": (torch.randn(self.n_items, cfg.dim, generator=generator) * std).to(self.device),
        }
        if cfg.solver == "enmf":
            for p in self.params.values():
                p.requires_grad_(True)
            self._opt = torch.optim.Adam(list(self.params.values()), lr=cfg.lr)
        else:
            self._als = self._make_als(train)

    def _make_als(self, train: sp.csr_matrix):  # noqa: ANN202 - implicit has no type hints
        logging.getLogger("implicit").setLevel(logging.ERROR)
        from implicit.cpu.als import AlternatingLeastSquares

        cfg = self.config
        with threadpool_limits(1, "blas"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            als = AlternatingLeastSquares(
                factors=cfg.dim,
                regularization=cfg.reg / cfg.c0,
                alpha=1.0 / cfg.c0,
                iterations=1,
                use_cg=False,  # exact Cholesky solves: the fixed point does not depend on CG tolerance
                calculate_training_loss=False,
                random_state=cfg.seed,
            )
        als.user_factors = self.params["user"].cpu().numpy().copy()
        als.item_factors = self.params["item"].cpu().numpy().copy()
        return als

    def _train_epoch(self, train: sp.csr_matrix, epoch: int, rng: np.random.Generator) -> float:
        if self.config.solver == "als":
            with threadpool_limits(1, "blas"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # implicit's advice to limit BLAS threads: done
                self._als.fit(train, show_progress=False)  # one sweep: users given items, then items given users
            self.params["user"] = torch.from_numpy(np.ascontiguousarray(self._als.user_factors)).to(self.device)
            self.params["item"] = torch.from_numpy(np.ascontiguousarray(self._als.item_factors)).to(self.device)
            with torch.no_grad():
                return float(self.objective(train)) / max(train.nnz, 1)
        return self._enmf_epoch(train, rng)

    def _enmf_epoch(self, train: sp.csr_matrix, rng: np.random.Generator) -> float:
        cfg = self.config
        users = rng.permutation(self.n_users)
        total = 0.0
        for start in range(0, self.n_users, cfg.batch_size):
            batch = np.sort(users[start : start + cfg.batch_size])
            sub = train[batch]
            rows = torch.from_numpy(np.repeat(np.arange(len(batch)), np.diff(sub.indptr))).to(self.device)
            items = torch.from_numpy(sub.indices.astype(np.int64)).to(self.device)
            u = self.params["user"][torch.from_numpy(batch).to(self.device)]
            loss = wmf_loss(u, self.params["item"], rows, items, cfg.c0)
            loss = loss + cfg.reg * (u.square().sum() + self.params["item"].square().sum() * len(batch) / self.n_users)
            self._opt.zero_grad()
            loss.backward()
            self._opt.step()
            total += float(loss.detach())
        return total / max(train.nnz, 1)

    def objective(self, train: sp.csr_matrix) -> torch.Tensor:
        """The full objective L (module docstring) at the current parameters, without the constant |R|."""
        p, q = self.params["user"], self.params["item"]
        users = torch.from_numpy(np.repeat(np.arange(self.n_users), np.diff(train.indptr))).to(self.device)
        items = torch.from_numpy(train.indices.astype(np.int64)).to(self.device)
        loss = wmf_loss(p, q, users, items, self.config.c0)
        return loss + self.config.reg * (p.square().sum() + q.square().sum())

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.params["user"].detach(), self.params["item"].detach()
