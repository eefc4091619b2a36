"""The one interface every base recommender implements, and the shared training loop pieces.

A model is fitted on a binary training matrix (the whole training set or one shard), may early-stop on a
validation matrix, and exposes user and item embeddings whose inner product is the score. That last point
is what lets one aggregator combine BPR, WMF and LightGCN submodels alike.

Exact unlearning depends on one rule enforced here: ``fit`` reads nothing but its ``train`` matrix, its
``valid`` matrix (for early stopping; never deleted from) and its seed.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch

from receraser_core.data.interactions import csr_to_pairs
from receraser_core.metrics import evaluate, validation_users
from receraser_core.state_file import save_state

EpochLog = dict[str, float]
Callback = Callable[[EpochLog], None]


class ConfigError(ValueError):
    """A model configuration value is out of range or unknown."""


@dataclass(frozen=True)
class BaseConfig:
    """Fields every model shares. Subclasses add their own hyperparameters."""

    dim: int = 64
    epochs: int = 100
    patience: int = 5  # evaluations without a validation Recall@10 gain before stopping
    eval_every: int = 1
    seed: int = 0
    device: str = "cpu"
    # early stopping ranks "all" items, or only those "trained" (with an interaction in the model's training data):
    # a shard model's other items keep their random start, and the aggregator never reads them (masked)
    valid_items: str = "all"
    # early stopping validates at most about this many users (a fixed hashed subset; `metrics.validation_users`)
    valid_users: int = 10_000

    def validate(self) -> None:
        if self.valid_items not in VALID_ITEMS:
            raise ConfigError(f"valid_items must be one of {', '.join(VALID_ITEMS)}, got {self.valid_items!r}")
        for name in ("dim", "epochs", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patience < 0:
            raise ConfigError(f"patience must be >= 0, got {self.patience}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BaseConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        cfg = cls(**values)
        cfg.validate()
        return cfg


@dataclass(frozen=True)
class PairwiseConfig(BaseConfig):
    """Fields of the models trained with the BPR loss and Adam on sampled triples (BPR, LightGCN)."""

    epochs: int = 400
    patience: int = 5
    eval_every: int = 5
    lr: float = 1e-3
    l2: float = 1e-2
    batch_size: int = 2048
    init_std: float = 0.1
    negatives: str = "all"  # "all" items of the catalogue, or only those "observed" in the training data
    l2_per: str = "row"  # penalise a row per "occurrence" in the batch, or once per distinct "row"
    lr_decay: float = 0.98  # the learning rate of epoch e is lr * lr_decay ** (e - 1)
    sampling: str = "user"  # triples drawn per "user" (uniform user, then one of its items) or per "interaction"

    def validate(self) -> None:
        super().validate()
        check_negatives(self.negatives)
        check_sampling(self.sampling)
        if self.l2_per not in L2_MODES:
            raise ConfigError(f"l2_per must be one of {', '.join(L2_MODES)}, got {self.l2_per!r}")
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.lr <= 0 or self.l2 < 0 or self.batch_size < 1:
            raise ConfigError(f"need lr > 0, l2 >= 0, batch_size >= 1; got {self.lr}, {self.l2}, {self.batch_size}")


@dataclass
class FitResult:
    """What ``fit`` did: per-evaluation history, the selected epoch and its validation score."""

    history: list[EpochLog] = field(default_factory=list)
    best_epoch: int = 0
    best_valid_recall: float = float("nan")
    epochs_run: int = 0
    seconds: float = 0.0


class Recommender(ABC):
    """Base class: subclasses implement ``_init_params``, ``_train_epoch`` and ``embeddings``."""

    name: ClassVar[str]
    config_cls: ClassVar[type[BaseConfig]]

    def __init__(self, n_users: int, n_items: int, config: BaseConfig | None = None) -> None:
        config = config if config is not None else self.config_cls()
        if not isinstance(config, self.config_cls):
            raise ConfigError(f"{self.name} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        config.validate()
        if n_users < 1 or n_items < 1:
            raise ConfigError(f"need at least one user and one item, got {n_users} x {n_items}")
        self.n_users, self.n_items, self.config = n_users, n_items, config
        self.device = torch.device(config.device)
        self.params: dict[str, torch.Tensor] = {}

    # -- to implement -------------------------------------------------------------------------------
    @abstractmethod
    def _init_params(self, train: sp.csr_matrix, generator: torch.Generator) -> None: ...

    @abstractmethod
    def _train_epoch(self, train: sp.csr_matrix, epoch: int, rng: np.random.Generator) -> float:
        """One pass over ``train``; returns the mean training loss (NaN where it was not computed: `fit` sets
        ``self._needs_loss`` False when a validation set does the selecting)."""

    @abstractmethod
    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Final (user (n_users, d), item (n_items, d)) embeddings; score = user @ item.T."""

    # -- shared ---------------------------------------------------------------------------------------
    def score(self, users: torch.Tensor) -> torch.Tensor:
        """Scores (len(users), n_items) for a batch of internal user indices."""
        return self.scorer()(users)

    def scorer(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """``score`` for many batches of users: the embeddings (for LightGCN, a propagation) are computed once,
        not once per batch. Same scores as ``score``."""
        user_emb, item_emb = self.embeddings()
        item_t = item_emb.t()
        return lambda users: user_emb[users.to(user_emb.device)] @ item_t

    def fit(
        self,
        train: sp.csr_matrix,
        valid: sp.csr_matrix | None = None,
        callback: Callback | None = None,
    ) -> FitResult:
        """Train on ``train`` (n_users, n_items); early-stop on validation Recall@10 when ``valid`` is given.

        The parameters kept are those of the best validation evaluation. Same data + config + seed give
        bit-identical parameters on CPU.
        """
        train = _check_matrix(train, (self.n_users, self.n_items), "train")
        if valid is not None:
            valid = _check_matrix(valid, (self.n_users, self.n_items), "valid")
        cfg = self.config
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        self._needs_loss = valid is None or valid.nnz == 0
        self._init_params(train, generator)
        result, best, bad = FitResult(), -1.0, 0
        best_params = self._snapshot()
        t0 = time.perf_counter()
        for epoch in range(1, cfg.epochs + 1):
            loss = self._train_epoch(train, epoch, rng)
            result.epochs_run = epoch
            if epoch % cfg.eval_every and epoch != cfg.epochs:
                continue
            self._sync_live()
            log: EpochLog = {"epoch": float(epoch), "seconds": time.perf_counter() - t0}
            if loss == loss:  # a model may skip computing its loss (NaN) when validation selects instead
                log["loss"] = float(loss)
            if valid is not None and valid.nnz:
                log["valid_recall@10"] = self.validation_recall(train, valid)
            result.history.append(log)
            if callback is not None:
                callback(log)
            score = log.get("valid_recall@10", -float(loss))
            if score > best:
                best, bad, result.best_epoch = score, 0, epoch
                best_params = self._snapshot()
            else:
                bad += 1
                if bad > cfg.patience:
                    break
        self._restore(best_params)
        result.best_valid_recall = best if valid is not None and valid.nnz else float("nan")
        result.seconds = time.perf_counter() - t0
        return result

    # -- live rows: train only the parameter rows that training can change -------------------------------
    def _start_live(self, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Trainable compact copies of the given rows (sorted) of the named ``params`` tables.

        A row that no training triple can reach (a user without items in ``train``; an item that is neither
        in ``train`` nor a possible negative) keeps its initial value whatever the training does: it gets no
        gradient, and Adam moves nothing with zero gradient history. A shard model has many such rows (ML-1M,
        K = 10, InBP: about half), so training only the reachable rows skips work whose result is known.
        The remaining rows see exactly the same operations in the same order (the row map is increasing), so
        the trained parameters are bit-identical to training the full tables (tested). ``_sync_live`` copies
        the live rows back into ``params``; ``fit`` calls it before every evaluation."""
        self._live_rows = {k: torch.from_numpy(np.asarray(r, dtype=np.int64)).to(self.device) for k, r in rows.items()}
        self._live_pos: dict[str, torch.Tensor] = {}
        self._live: dict[str, torch.Tensor] = {}
        for k, idx in self._live_rows.items():
            pos = torch.full((len(self.params[k]),), -1, dtype=torch.int64, device=self.device)
            pos[idx] = torch.arange(len(idx), device=self.device)
            self._live_pos[k] = pos
            self._live[k] = self.params[k].detach()[idx].clone().requires_grad_(True)
        return self._live

    def _sync_live(self) -> None:
        with torch.no_grad():
            for k, idx in getattr(self, "_live_rows", {}).items():
                self.params[k][idx] = self._live[k].detach()

    def validation_recall(self, train: sp.csr_matrix, valid: sp.csr_matrix) -> float:
        items = None
        if self.config.valid_items == "trained":
            trained = np.flatnonzero(np.bincount(train.indices, minlength=self.n_items))
            items = trained if 0 < len(trained) < self.n_items else None
        users = validation_users(self.n_users, self.config.valid_users)
        with torch.no_grad():
            if items is None:
                return evaluate(self.scorer(), train, valid, ks=(10,), device=self.device, users=users)["recall@10"]
            user_emb, item_emb = self.embeddings()
            item_t = item_emb[torch.from_numpy(items).to(item_emb.device)].t()
            score = lambda u: user_emb[u.to(user_emb.device)] @ item_t  # noqa: E731
            return evaluate(score, train, valid, ks=(10,), device=self.device, users=users, items=items)["recall@10"]

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.params.items()}

    def _restore(self, params: dict[str, torch.Tensor]) -> None:
        for k, v in params.items():
            self.params[k].data.copy_(v) if self.params[k].requires_grad else self.params[k].copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "config": asdict(self.config),
            "params": {k: v.detach().cpu() for k, v in self.params.items()},
        }

    def save(self, path: Path) -> None:
        """Write parameters and config to ``path`` atomically, as a pickle-free state file (`state_file`)."""
        save_state(path, self.state_dict())

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Recommender:
        config = cls.config_cls.from_dict(state["config"])
        model = cls(int(state["n_users"]), int(state["n_items"]), config)
        model.params = {k: v.to(model.device) for k, v in state["params"].items()}
        return model


def _check_matrix(m: sp.csr_matrix, shape: tuple[int, int], what: str) -> sp.csr_matrix:
    if not sp.issparse(m):
        raise ConfigError(f"{what} must be a scipy sparse matrix, got {type(m).__name__}")
    if m.shape != shape:
        raise ConfigError(f"{what} has shape {m.shape}, the model was built for {shape}")
    m = sp.csr_matrix(m, dtype=np.float32)
    m.sort_indices()
    return m


NEGATIVES = ("all", "observed")
VALID_ITEMS = ("all", "trained")
L2_MODES = ("occurrence", "row")
SAMPLINGS = ("interaction", "user")


def set_epoch_lr(opt: torch.optim.Optimizer, lr: float, decay: float, epoch: int) -> None:
    """Learning rate of epoch ``epoch`` (1-based): ``lr * decay ** (epoch - 1)``."""
    for group in opt.param_groups:
        group["lr"] = lr * decay ** (epoch - 1)


def l2_penalty(batch_size: int, mode: str, *lookups: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Squared-norm penalty of the embedding rows a mini-batch touches, divided by ``batch_size``.

    Each lookup is (table, row indices). ``mode="occurrence"`` counts a row once per time the batch uses it
    (the usual per-sample L2: a popular item is shrunk in proportion to its frequency); ``"row"`` counts each
    distinct row once per batch, so rare and popular rows are shrunk alike whenever they are trained.
    Computed as (uses of each row) . (squared norm of each row) over the whole table: its gradient is one
    dense product, not a scatter of gathered rows.
    """
    total = torch.zeros((), dtype=lookups[0][0].dtype, device=lookups[0][0].device)
    for table, idx in lookups:
        uses = torch.bincount(idx, minlength=len(table))
        weight = (uses > 0) if mode == "row" else uses
        total = total + weight.to(table.dtype) @ table.square().sum(1)
    return total / batch_size


def reachable_rows(train: sp.csr_matrix, negatives: str) -> tuple[np.ndarray, np.ndarray]:
    """(users, items) that `bpr_triples` on ``train`` can ever draw, sorted: users with at least one item, and
    items that are positives or possible negatives (with ``"observed"``: the items in ``train``, unless none or
    all are, when `sample_negatives` falls back to the whole catalogue)."""
    n_items = train.shape[1]
    users = np.flatnonzero(np.diff(train.indptr))
    seen = np.flatnonzero(np.bincount(train.indices, minlength=n_items))
    items = seen if negatives == "observed" and 0 < len(seen) < n_items else np.arange(n_items)
    return users, items


def check_negatives(negatives: str) -> None:
    """The one check of a ``negatives`` setting (model configs and `sample_negatives`)."""
    if negatives not in NEGATIVES:
        raise ConfigError(f"negatives must be one of {', '.join(NEGATIVES)}, got {negatives!r}")


def check_sampling(sampling: str) -> None:
    """The one check of a ``sampling`` setting (model and aggregator configs, `bpr_triples`)."""
    if sampling not in SAMPLINGS:
        raise ConfigError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")


#: `sample_negatives` checks candidates against a (users x items) table of booleans up to this many cells (bytes),
#: else by binary search in the sorted keys; the same negatives either way
DENSE_SEEN_LIMIT = 64 * 2**20


def sample_negatives(
    train: sp.csr_matrix,
    users: np.ndarray,
    rng: np.random.Generator,
    max_rounds: int = 100,
    negatives: str = "all",
) -> np.ndarray:
    """One uniform negative item per entry of ``users`` (n,), never an item the user has in ``train``; -1 for an
    entry whose user has every candidate item (no negative exists).

    ``negatives="all"`` draws from the whole item catalogue; ``"observed"`` only from the items that occur in
    ``train`` (for a shard model: its shard's items). Only ``train`` is consulted: a shard model's negatives
    depend on nothing outside its shard. When every item occurs in ``train`` the two draw identical samples.
    """
    check_negatives(negatives)
    n_items = train.shape[1]
    rows, cols = csr_to_pairs(train)
    keys = rows * n_items + cols
    # keys are sorted because CSR rows are in order and column indices are sorted
    pool = np.flatnonzero(np.bincount(cols, minlength=n_items) > 0) if negatives == "observed" else None
    if pool is not None and len(pool) in (0, n_items):
        pool = None  # nothing observed yet, or everything: the whole catalogue

    def draw(size: int) -> np.ndarray:
        idx = rng.integers(0, n_items if pool is None else len(pool), size=size, dtype=np.int64)
        return idx if pool is None else pool[idx]

    neg = draw(len(users))
    if len(keys) == 0:
        return neg
    seen: np.ndarray | None = None
    if train.shape[0] * n_items <= DENSE_SEEN_LIMIT:  # a lookup table instead of sorting and binary searches
        seen = np.zeros(train.shape[0] * n_items, dtype=bool)
        seen[keys] = True
    todo = np.arange(len(users))
    for _ in range(max_rounds):
        cand = users[todo] * n_items + neg[todo]
        if seen is not None:
            clash = seen[cand]
        else:
            order = np.argsort(cand)  # sorted needles: the binary searches walk keys in order (5x faster)
            pos = np.minimum(np.searchsorted(keys, cand[order]), len(keys) - 1)
            clash = np.empty(len(cand), dtype=bool)
            clash[order] = keys[pos] == cand[order]
        todo = todo[clash]
        if len(todo) == 0:
            return neg
        neg[todo] = draw(len(todo))
    # the few entries still drawing a positive belong to users with (almost) every candidate item: draw each
    # from the user's own complement, the same uniform distribution; -1 where there is none
    candidates = np.arange(n_items) if pool is None else pool
    for t in todo:
        u = int(users[t])
        left = np.setdiff1d(candidates, train.indices[train.indptr[u] : train.indptr[u + 1]], assume_unique=True)
        neg[t] = left[rng.integers(0, len(left))] if len(left) else -1
    return neg


def bpr_triples(
    train: sp.csr_matrix,
    rng: np.random.Generator,
    device: torch.device,
    negatives: str = "all",
    sampling: str = "interaction",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One epoch of BPR triples (users, positive items, negative items), each (nnz,), from ``train`` alone.

    ``sampling="interaction"``: every training pair once, in a seeded random order, so a user weighs in
    proportion to their number of items. ``"user"``: nnz draws of a uniform user among those with at least one
    item in ``train``, each with one of that user's items drawn uniformly (the sampler of the RecEraser and
    LightGCN authors' code): every user weighs the same, as in the user-averaged Recall and NDCG. Negatives come
    from `sample_negatives`. Used by BPR, LightGCN and the aggregators.
    """
    check_sampling(sampling)
    if sampling == "user":
        degree = np.diff(train.indptr)
        active = np.flatnonzero(degree)
        users = active[rng.integers(0, len(active), size=train.nnz)] if len(active) else active
        offsets = (rng.random(len(users)) * degree[users]).astype(np.int64)
        items = train.indices[train.indptr[users] + offsets].astype(np.int64)
        users = users.astype(np.int64)
    else:
        users, items = csr_to_pairs(train)
        order = rng.permutation(len(users))
        users, items = users[order], items[order]
    negs = sample_negatives(train, users, rng, negatives=negatives)
    if (negs < 0).any():  # a user with every candidate item ranks nothing below them: no triple
        keep = negs >= 0
        users, items, negs = users[keep], items[keep], negs[keep]
    return tuple(torch.from_numpy(a).to(device) for a in (users, items, negs))  # type: ignore[return-value]
