"""Shared pieces of the aggregators: the stack of frozen shard embeddings and the training loop.

Masking rule (all aggregators): a user or item that has no interaction in shard k gets a **zero** vector
from shard k, and the attention aggregator additionally gives shard k no weight for it (masked softmax).
Such a vector is only the submodel's random initialisation (BPR, LightGCN) or a ridge solution of nothing
(WMF: zero already); treating it as knowledge would add noise to every score of that user or item.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from receraser_core.metrics import evaluate, validation_users
from receraser_core.models.base import bpr_triples, check_sampling
from receraser_core.models.bpr import triple_loss
from receraser_core.models.lightgcn import normalized_adjacency, propagate, to_torch_csr
from receraser_core.models.wmf import Observed, wmf_loss


@dataclass(frozen=True)
class ShardStack:
    """Frozen per-shard embeddings: users (K, n_users, d), items (K, n_items, d), presence masks (K, n) and
    interaction counts (K, n: how many training interactions of the user / item each shard holds)."""

    users: torch.Tensor
    items: torch.Tensor
    user_mask: torch.Tensor
    item_mask: torch.Tensor
    user_count: torch.Tensor
    item_count: torch.Tensor

    @classmethod
    def restore(cls, fields: dict[str, torch.Tensor]) -> ShardStack:
        """From a stored ``__dict__``; snapshots written before counts were kept count 1 wherever present."""
        return cls(
            **{
                "user_count": fields["user_mask"].float(),
                "item_count": fields["item_mask"].float(),
                **fields,
            }
        )

    @classmethod
    def build(
        cls, embeddings: list[tuple[torch.Tensor, torch.Tensor]], shard_matrices: list[sp.csr_matrix]
    ) -> ShardStack:
        """From each shard's (user, item) embeddings and its training matrix (for presence)."""
        uc = torch.stack([torch.from_numpy(np.diff(m.indptr).astype(np.float32)) for m in shard_matrices])
        ic = torch.stack(
            [torch.from_numpy(np.bincount(m.indices, minlength=m.shape[1]).astype(np.float32)) for m in shard_matrices]
        )
        um, im = uc > 0, ic > 0
        users = torch.stack([u.detach().float().cpu() for u, _ in embeddings]) * um.unsqueeze(-1)
        items = torch.stack([i.detach().float().cpu() for _, i in embeddings]) * im.unsqueeze(-1)
        return cls(users, items, um, im, uc, ic)

    @property
    def n_shards(self) -> int:
        return int(self.users.shape[0])

    @property
    def dim(self) -> int:
        return int(self.users.shape[-1])


@dataclass(frozen=True)
class AggConfig:
    """Training settings of a learned aggregator (static, attention)."""

    loss: str = "bpr"  # the base model's own loss: "bpr", "wmf" or "lightgcn" (BPR after propagation)
    epochs: int = 20
    patience: int = 2
    lr: float = 5e-3
    batch_size: int = 4096
    weight_decay: float = 0.0
    reg: float = 0.0  # L2 on the aggregated embeddings of the batch, as in the base model's loss
    attention_dim: int = 32
    align_init: bool = True  # attention only: start W_k at the rotation aligning shard k with the others
    count_prior: bool = True  # attention only: add gamma * log(interactions in shard) to the attention logits
    c0: float = 0.2  # wmf loss only
    layers: int = 3  # lightgcn only
    sampling: str = "interaction"  # bpr / lightgcn loss: triples per "interaction" or per "user" (bpr_triples)
    # > 0: validate, select and keep an average of the weights over epochs, avg <- ema * avg + (1 - ema) * new
    ema: float = 0.0
    # learning-rate schedule over the whole fit: the rate rises linearly over the first `warmup` fraction of
    # the steps, then stays at `lr` ("constant") or falls linearly to zero at the last step ("linear")
    warmup: float = 0.0
    decay: str = "constant"
    valid_from: int = 1  # first epoch whose model is validated and can be selected (at most the last epoch)
    valid_users: int = 10_000  # validates at most about this many users (`metrics.validation_users`)

    # bpr loss: each step takes the triples of one block of users (the epoch's users in a seeded order, cut into
    # as many blocks as steps), so a step embeds only those users and every item, not every user
    user_blocks: bool = False
    # wmf loss: at most this many steps an epoch (0: no cap); beyond batch_size // 16 users a step, a step takes
    # ceil(users / max_steps_per_epoch) users. Each step embeds every item, so this bounds the fit's cost.
    max_steps_per_epoch: int = 0

    seed: int = 0

    def __post_init__(self) -> None:
        check_sampling(self.sampling)
        for name in ("lr", "reg", "epochs", "patience", "batch_size"):
            if not isinstance(getattr(self, name), int | float):
                raise ValueError(f"AggConfig.{name} must be a number, got {getattr(self, name)!r}")
        if not self.lr > 0 or self.reg < 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"AggConfig needs lr > 0, reg >= 0, epochs >= 1, batch_size >= 1; got {self.lr}, {self.reg}, "
                f"{self.epochs}, {self.batch_size}"
            )
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"AggConfig.ema must be in [0, 1), got {self.ema}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"AggConfig.warmup must be in [0, 1), got {self.warmup}")
        if self.decay not in ("constant", "linear"):
            raise ValueError(f"AggConfig.decay must be 'constant' or 'linear', got {self.decay!r}")
        if self.valid_from < 1:
            raise ValueError(f"AggConfig.valid_from must be >= 1, got {self.valid_from}")

    def lr_at(self, progress: float) -> float:
        """The learning rate at ``progress`` in [0, 1) of the fit's steps."""
        scale = 1.0
        if self.warmup and progress < self.warmup:
            scale = (progress + 1e-9) / self.warmup
        elif self.decay == "linear":
            scale = (1.0 - progress) / (1.0 - self.warmup)
        return self.lr * min(max(scale, 0.0), 1.0)


#: a user block's BPR step scores the block against every item when that is at most this many cells per triple
#: (dense products), else it gathers the triples' rows (on ML-1M a block has ~31 cells a triple, Yelp2018 ~1,100)
DENSE_BLOCK_RATIO = 64


def _batch_l2(users: torch.Tensor, items: torch.Tensor, u: torch.Tensor, ij: torch.Tensor) -> torch.Tensor:
    """L2 of a batch's aggregated vectors, a row counted once per time the batch uses it, over the batch size."""
    uses_u = torch.bincount(u, minlength=len(users)).to(users.dtype)
    uses_i = torch.bincount(ij, minlength=len(items)).to(items.dtype)
    return (uses_u @ users.square().sum(1) + uses_i @ items.square().sum(1)) / len(u)


@dataclass
class AggFitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_valid_recall: float = float("nan")
    seconds: float = 0.0


class Aggregator(torch.nn.Module):
    """Combines frozen shard embeddings into one model. Subclasses define the two embedding maps."""

    name = "aggregator"
    trainable = True

    def __init__(self, stack: ShardStack, config: AggConfig) -> None:
        super().__init__()
        self.stack, self.config = stack, config
        self._adj: torch.Tensor | None = None

    @classmethod
    def restore(cls, stack: ShardStack, config: AggConfig, state: dict[str, torch.Tensor]) -> Aggregator:
        """A trained aggregator from its ``state_dict``. The starting point of training (``align_init``: a
        Procrustes fit over all shards, 0.3-0.7 s on ML-1M) is skipped, since the state overwrites it."""
        agg = cls(stack, replace(config, align_init=False))
        agg.config = config
        agg.load_state_dict(state)
        with torch.no_grad():
            for name, p in agg.named_parameters():
                if p.stride() != state[name].stride():  # keep the trained memory layout: products then sum in
                    p.data = state[name].clone()  # the same order, and scores are bit for bit the saved model's
        return agg

    def user_embed(self, idx: torch.Tensor) -> torch.Tensor:  # (b,) -> (b, D)
        raise NotImplementedError

    def item_embed(self, idx: torch.Tensor) -> torch.Tensor:  # (b,) -> (b, D)
        raise NotImplementedError

    def set_graph(self, train: sp.csr_matrix) -> None:
        """For the LightGCN loss: propagate aggregated layer-0 embeddings over this (full remaining) graph."""
        self._adj = to_torch_csr(normalized_adjacency(train), torch.device("cpu"))

    def full_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(users (n_users, D), items (n_items, D)); propagated over the full graph for the LightGCN loss."""
        n_u, n_i = self.stack.users.shape[1], self.stack.items.shape[1]
        u = self.user_embed(torch.arange(n_u))
        i = self.item_embed(torch.arange(n_i))
        if self.config.loss == "lightgcn":
            if self._adj is None:
                raise RuntimeError("call set_graph(train) before using a LightGCN aggregator")
            e = propagate(self._adj, torch.cat([u, i]), self.config.layers)
            return e[:n_u], e[n_u:]
        return u, i

    def score(self, users: torch.Tensor) -> torch.Tensor:
        return self.scorer()(users)

    def scorer(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """``score`` for many batches of users: the full embeddings (for LightGCN, a propagation over the whole
        graph) are computed once, not once per batch. Same scores as ``score``."""
        with torch.no_grad():
            u, i = self.full_embeddings()
        item_t = i.t()
        return lambda users: u[users] @ item_t

    # -- training -----------------------------------------------------------------------------------
    def _set_lr(self, opt: torch.optim.Optimizer, epoch: int, done: int, total: int) -> None:
        """Set the rate for the next step: step ``done`` of ``total`` in 0-based ``epoch``."""
        cfg = self.config
        if cfg.warmup or cfg.decay != "constant":
            lr = cfg.lr_at((epoch + done / max(total, 1)) / cfg.epochs)
            for group in opt.param_groups:
                group["lr"] = lr

    def _epoch(
        self, train: sp.csr_matrix, opt: torch.optim.Optimizer, rng: np.random.Generator, epoch: int = 0
    ) -> float:
        cfg = self.config
        if cfg.loss == "wmf":
            return self._wmf_epoch(train, opt, rng, epoch)
        u_all, i_all, negs = bpr_triples(train, rng, torch.device("cpu"), sampling=cfg.sampling)
        if cfg.user_blocks and cfg.loss == "bpr":
            return self._user_block_epoch(train, opt, rng, epoch, (u_all, i_all, negs))
        # a batch larger than the catalogue is cheaper to embed as "everyone once, then index"
        embed_all = cfg.loss == "lightgcn" or 3 * cfg.batch_size >= sum(train.shape)
        total = 0.0
        n_steps = -(-len(u_all) // cfg.batch_size)
        for start in range(0, len(u_all), cfg.batch_size):
            self._set_lr(opt, epoch, start // cfg.batch_size, n_steps)
            u, i, j = (t[start : start + cfg.batch_size] for t in (u_all, i_all, negs))
            if embed_all:
                users, items = self.full_embeddings()
            else:  # the distinct rows of the batch, once each
                user_rows, u = torch.unique(u, return_inverse=True)
                item_rows, ij = torch.unique(torch.cat([i, j]), return_inverse=True)
                i, j = ij[: len(u)], ij[len(u) :]
                users, items = self.user_embed(user_rows), self.item_embed(item_rows)
            loss = triple_loss(users, items, u, i, j)
            if cfg.reg:
                loss = loss + cfg.reg * _batch_l2(users, items, u, torch.cat([i, j]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(u)
        return total / max(len(u_all), 1)

    def _user_block_epoch(
        self,
        train: sp.csr_matrix,
        opt: torch.optim.Optimizer,
        rng: np.random.Generator,
        epoch: int,
        triples: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> float:
        """The BPR loss over the epoch's triples grouped by user block: users in a seeded random order are cut
        into ceil(triples / batch_size) blocks, and a step trains on the triples of one block's users (about
        batch_size of them), sorted by user. A step embeds that block's users and every item."""
        cfg = self.config
        u_all, i_all, j_all = triples
        n_users = train.shape[0]
        n_steps = max(1, -(-len(u_all) // cfg.batch_size))
        rank = torch.from_numpy(rng.permutation(n_users))  # rank[user]: the user's place in this epoch's order
        order = torch.argsort(rank)  # order[r]: the user in place r
        sort = torch.argsort(rank[u_all], stable=True)  # triples by their user's place
        u_rank, i_all, j_all = rank[u_all][sort], i_all[sort], j_all[sort]
        bounds = np.linspace(0, n_users, n_steps + 1).round().astype(np.int64)
        cuts = torch.searchsorted(u_rank, torch.from_numpy(bounds)).tolist()
        all_items = torch.arange(train.shape[1])
        total = 0.0
        for step in range(n_steps):
            lo, hi = cuts[step], cuts[step + 1]
            if hi == lo:
                continue
            self._set_lr(opt, epoch, step, n_steps)
            users = self.user_embed(order[bounds[step] : bounds[step + 1]])
            items = self.item_embed(all_items)
            u = u_rank[lo:hi] - int(bounds[step])
            if len(users) * len(items) <= DENSE_BLOCK_RATIO * (hi - lo):
                # the block's scores against every item, then the triples' entries of them: two dense products
                # instead of a gather and a scatter of d-vectors per triple (same loss as `triple_loss`)
                flat = (users @ items.t()).reshape(-1)
                row = u * items.shape[0]
                x = flat.index_select(0, row + i_all[lo:hi]) - flat.index_select(0, row + j_all[lo:hi])
                loss = -F.logsigmoid(x).mean()
            else:  # sparse data: far fewer triples than (user, item) cells
                loss = triple_loss(users, items, u, i_all[lo:hi], j_all[lo:hi])
            if cfg.reg:
                loss = loss + cfg.reg * _batch_l2(users, items, u, torch.cat([i_all[lo:hi], j_all[lo:hi]]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * (hi - lo)
        return total / max(len(u_all), 1)

    def _wmf_epoch(
        self, train: sp.csr_matrix, opt: torch.optim.Optimizer, rng: np.random.Generator, epoch: int = 0
    ) -> float:
        n_users, n_items = train.shape
        step = max(self.config.batch_size // 16, 64)  # users per batch
        if self.config.max_steps_per_epoch:  # more users a step on larger data: the fit's step count stays put
            step = max(step, -(-n_users // self.config.max_steps_per_epoch))
        order = rng.permutation(n_users)
        total = 0.0
        for start in range(0, n_users, step):
            self._set_lr(opt, epoch, start // step, -(-n_users // step))
            batch = np.sort(order[start : start + step])
            eu, ei = self.user_embed(torch.from_numpy(batch)), self.item_embed(torch.arange(n_items))
            loss = wmf_loss(eu, ei, Observed.of(train[batch]), self.config.c0)
            if self.config.reg:  # the WMF objective's L2, items counted in proportion to the batch
                loss = loss + self.config.reg * (eu.square().sum() + ei.square().sum() * len(batch) / n_users)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
        return total / max(train.nnz, 1)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the current weights that later training steps do not change."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def _update_average(self, average: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """One epoch's step of the exponential moving average of the weights (the first epoch starts it); a new
        dict each time, never changed in place."""
        current = self._snapshot()
        if average is None:
            return current
        a = self.config.ema
        return {k: a * average[k] + (1.0 - a) * current[k] for k in current}

    @contextlib.contextmanager
    def _weights(self, state: dict[str, torch.Tensor] | None) -> Iterator[None]:
        """Score with ``state`` inside the block (None: the current weights), then put the trained ones back."""
        if state is None:
            yield
            return
        trained = self._snapshot()
        self.load_state_dict(state)
        try:
            yield
        finally:
            self.load_state_dict(trained)

    def fit(
        self,
        train: sp.csr_matrix,
        valid: sp.csr_matrix | None,
        callback: Callable[[dict[str, float]], None] | None = None,
    ) -> AggFitResult:
        """Train the aggregator's own parameters (shard embeddings stay frozen), early-stopping on
        validation Recall@10. Reads only ``train`` (all remaining training data) and ``valid``."""
        result = AggFitResult()
        t0 = time.perf_counter()
        if self.config.loss == "lightgcn":
            self.set_graph(train)
        params = [p for p in self.parameters() if p.requires_grad]
        if not self.trainable or not params:
            result.seconds = time.perf_counter() - t0
            return result
        torch.manual_seed(self.config.seed)
        rng = np.random.default_rng(self.config.seed)
        opt = torch.optim.Adam(params, lr=self.config.lr, weight_decay=self.config.weight_decay, fused=True)
        best, bad = float("-inf"), 0
        best_state = self._snapshot()
        average: dict[str, torch.Tensor] | None = None
        for epoch in range(1, self.config.epochs + 1):
            loss = self._epoch(train, opt, rng, epoch - 1)
            log = {"epoch": float(epoch), "loss": loss, "seconds": time.perf_counter() - t0}
            if self.config.ema:
                average = self._update_average(average)
            if epoch < min(self.config.valid_from, self.config.epochs):  # too early to be selected
                result.history.append(log)
                if callback:
                    callback(log)
                continue
            score = -loss
            if valid is not None and valid.nnz:
                with self._weights(average):
                    users = validation_users(train.shape[0], self.config.valid_users)
                    log["valid_recall@10"] = evaluate(self.scorer(), train, valid, ks=(10,), users=users)["recall@10"]
                score = log["valid_recall@10"]
            result.history.append(log)
            if callback:
                callback(log)
            if score > best:
                best, bad, result.best_epoch = score, 0, epoch
                best_state = average if average is not None else self._snapshot()
            else:
                bad += 1
                if bad > self.config.patience:
                    break
        self.load_state_dict(best_state)
        result.best_valid_recall = best
        result.seconds = time.perf_counter() - t0
        return result
