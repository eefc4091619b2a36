"""LightGCN: simplified graph convolution for collaborative filtering.

He et al., "LightGCN: Simplifying and Powering Graph Convolution Network for Recommendation" (SIGIR 2020).
Over the bipartite user-item graph A of the training data (a shard's model: its shard's graph only),

    Â = D^-1/2 A D^-1/2,    E^(k+1) = Â E^(k),    E = mean(E^(0), ..., E^(K)),    K = 3,

scores are r_ui = e_u . e_i, trained with the BPR loss (`bpr.triple_loss`) plus l2 on the layer-0 embeddings
of the batch: by default (``l2_per="row"``) each distinct user and item row once per batch, not once per
triple (``"occurrence"``, LightGCN's own code), with Adam at ``lr * lr_decay ** (epoch - 1)``. Triples are
drawn per user by default (``sampling="user"``: a uniform user, then one of its items, as in LightGCN's own
sampler; see `base.bpr_triples`). On ML-1M (authors' split), validation Recall@10 / test Recall@20:
per-interaction sampling with occurrence L2 0.1382 / 0.2216, with row L2 0.1453 / 0.2330, plus decay 0.98
0.1458 / 0.2358; per-user sampling 0.1510 / 0.2447 (benchmarks/results/retrain-ml-1m-lightgcn.json).
Propagation uses a custom autograd function whose backward is Â·G (Â is symmetric), which is several times
faster on CPU than torch's generic sparse backward.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from receraser_core.models.base import (
    ConfigError,
    PairwiseConfig,
    Recommender,
    bpr_triples,
    l2_penalty,
    reachable_rows,
    set_epoch_lr,
)
from receraser_core.models.bpr import triple_loss


def normalized_adjacency(train: sp.csr_matrix) -> sp.csr_matrix:
    """Â = D^-1/2 A D^-1/2 of the bipartite graph, shape (n_users + n_items,)*2; isolated nodes get 0."""
    n_users, n_items = train.shape
    r = sp.csr_matrix(train, dtype=np.float32)
    a = sp.bmat([[None, r], [r.T, None]], format="csr", dtype=np.float32)
    deg = np.asarray(a.sum(axis=1)).ravel()
    inv_sqrt = np.zeros_like(deg)
    inv_sqrt[deg > 0] = deg[deg > 0] ** -0.5
    d = sp.diags(inv_sqrt)
    out = sp.csr_matrix(d @ a @ d, dtype=np.float32)
    out.sort_indices()
    return out


def to_torch_csr(m: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(
            torch.from_numpy(m.indptr.astype(np.int64)),
            torch.from_numpy(m.indices.astype(np.int64)),
            torch.from_numpy(m.data.astype(np.float32)),
            size=m.shape,
            check_invariants=False,  # built from a canonical scipy CSR matrix
        ).to(device)


class _SymmetricSpMM(torch.autograd.Function):
    """y = Â x with backward Â g; valid because Â is symmetric."""

    @staticmethod
    def forward(ctx: Any, adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.adj = adj
        return adj @ x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, ctx.adj @ grad


def propagate(adj: torch.Tensor, e0: torch.Tensor, layers: int) -> torch.Tensor:
    """Mean of layers 0..K of LightGCN propagation; e0 (n_users + n_items, d) -> same shape."""
    out, e = e0, e0
    for _ in range(layers):
        e = _SymmetricSpMM.apply(adj, e)
        out = out + e
    return out / (layers + 1)


@dataclass(frozen=True)
class LightGCNConfig(PairwiseConfig):
    layers: int = 3
    lr: float = 1e-2
    l2: float = 1e-3
    batch_size: int = 8192

    def validate(self) -> None:
        super().validate()
        if self.layers < 0:
            raise ConfigError(f"layers must be >= 0, got {self.layers}")


class LightGCN(Recommender):
    name = "lightgcn"
    config_cls = LightGCNConfig
    config: LightGCNConfig

    def _init_params(self, train: sp.csr_matrix, generator: torch.Generator) -> None:
        n = self.n_users + self.n_items
        e0 = torch.randn(n, self.config.dim, generator=generator) * self.config.init_std
        self.params = {"embedding": e0.to(self.device)}
        adj = normalized_adjacency(train)
        self._adj = to_torch_csr(adj, self.device)  # as set_graph(train), sharing the normalisation below
        users, items = reachable_rows(train, self.config.negatives)
        nodes = np.concatenate([users, items + self.n_users])  # only these rows can move
        live = self._start_live({"embedding": nodes})
        # the graph among them: every edge of train joins two reachable nodes, and the normalisation is train's
        sub = adj[nodes][:, nodes].tocsr()
        sub.sort_indices()
        self._live_adj = to_torch_csr(sub, self.device)
        self._opt = torch.optim.Adam([live["embedding"]], lr=self.config.lr, fused=True)

    def set_graph(self, train: sp.csr_matrix) -> None:
        """Use the graph of ``train`` for propagation (its own training data, or the full graph)."""
        self._adj = to_torch_csr(normalized_adjacency(train), self.device)

    def _train_epoch(self, train: sp.csr_matrix, epoch: int, rng: np.random.Generator) -> float:
        cfg = self.config
        set_epoch_lr(self._opt, cfg.lr, cfg.lr_decay, epoch)
        u_all, i_all, j_all = bpr_triples(train, rng, self.device, cfg.negatives, cfg.sampling)
        pos = self._live_pos["embedding"]  # item rows follow the user rows
        u_all, i_all, j_all = pos[u_all], pos[i_all + self.n_users], pos[j_all + self.n_users]
        e0 = self._live["embedding"]
        total, n = 0.0, 0
        for start in range(0, len(u_all), cfg.batch_size):
            u, i, j = (t[start : start + cfg.batch_size] for t in (u_all, i_all, j_all))
            e = propagate(self._live_adj, e0, cfg.layers)  # (reachable nodes, d)
            loss = triple_loss(e, e, u, i, j)
            loss = loss + cfg.l2 * l2_penalty(len(u), cfg.l2_per, (e0, u), (e0, torch.cat([i, j])))
            self._opt.zero_grad()
            loss.backward()
            self._opt.step()
            total += float(loss.detach()) * len(u)
            n += len(u)
        return total / max(n, 1)

    def layer0(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer-0 (user, item) embeddings, the ones the aggregator combines before propagating."""
        e0 = self.params["embedding"].detach()
        return e0[: self.n_users], e0[self.n_users :]

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            e = propagate(self._adj, self.params["embedding"].detach(), self.config.layers)
        return e[: self.n_users], e[self.n_users :]

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Recommender:
        model = super().from_state_dict(state)
        assert isinstance(model, LightGCN)
        model._adj = to_torch_csr(sp.csr_matrix(state["graph"]), model.device)
        return model

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        adj = self._adj.to_sparse_coo().coalesce()  # store the training graph: embeddings depend on it
        n = self.n_users + self.n_items
        idx = adj.indices().cpu().numpy()
        state["graph"] = sp.csr_matrix((adj.values().cpu().numpy(), (idx[0], idx[1])), shape=(n, n))
        return state
