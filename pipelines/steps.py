"""The RecEraser workflow as plain-Python steps over a run directory.

Each step reads what earlier steps wrote and writes its own files, so any step can run alone (this is what
the Dagster assets wrap):

    prepare      -> interactions.npz            dataset, id-mapped, split
    pretrain     -> wmf_embeddings.npz          WMF user / item vectors used only to partition
    partition    -> shard_assignment.npz        shard id per training interaction + diagnostics.json
    train_shard  -> shards/<k>/model.pt         submodel k, trained on shard k's data only
    aggregate    -> aggregator.pt               aggregation over the frozen submodels
    evaluate     -> evaluation.json             Recall@N / NDCG@N on test (and validation)

Writes are atomic (temporary file, then rename), so an interrupted step never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from pipelines.config import SHARD_DEFAULTS, PipelineConfig, shard_units
from pipelines.retrain import model_config
from receraser_core.aggregate import AGGREGATORS, Aggregator, ShardStack
from receraser_core.data.interactions import DataError, Interactions, csr_fingerprint
from receraser_core.data.readers import load_dataset
from receraser_core.metrics import DEFAULT_KS, evaluate
from receraser_core.models import Recommender, build_model, load_model
from receraser_core.models.lightgcn import LightGCN
from receraser_core.partition import PARTITIONERS, Partition, route_validation, routed_validation
from receraser_core.state_file import check, load_state, save_state, seal

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


# -- storage helpers ---------------------------------------------------------------------------------
def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    seal(tmp, path)  # in place, with its content hash beside it


def write_json(path: Path, obj: Any) -> None:
    def write(p: Path) -> None:
        p.write_text(json.dumps(obj, indent=2, default=float) + "\n")

    _atomic(path, write)


def read_json(path: Path) -> Any:
    check(path, "file")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # only a file written before hashes were kept gets here
        raise DataError(f"{path}: not valid JSON ({exc}); `receraser run --rebuild` rebuilds it") from None


def save_interactions(path: Path, inter: Interactions) -> None:
    arrays: dict[str, Any] = {"user_ids": inter.user_ids.astype(str), "item_ids": inter.item_ids.astype(str)}
    for part in ("train", "valid", "test"):
        m = getattr(inter, part)
        arrays[f"{part}_indptr"], arrays[f"{part}_indices"] = m.indptr, m.indices
    meta = json.dumps({"name": inter.name, "shape": list(inter.train.shape), "meta": inter.meta}, default=str)

    def write(p: Path) -> None:
        with open(p, "wb") as fh:
            np.savez(fh, meta=np.array(meta), **arrays)

    _atomic(path, write)


#: the arrays of the last interactions file read, by its identity (path, inode, size, times): a deletion reads
#: the same file about ten times (14 ms each on ML-1M); a rewritten file has another identity
_LOADED: dict[tuple[Any, ...], dict[str, Any]] = {}


def load_interactions(path: Path) -> Interactions:
    check(path, "interactions file")
    st = Path(path).stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _LOADED:
        with read_npz(path) as z:
            arrays = {name: z[name] for name in z.files}
        _LOADED.clear()
        _LOADED[key] = arrays
    z = _LOADED[key]
    meta = json.loads(str(z["meta"]))
    shape = tuple(meta["shape"])
    mats = {}
    for part in ("train", "valid", "test"):  # copies: a caller may change its matrices, never the cache
        indices, indptr = z[f"{part}_indices"].copy(), z[f"{part}_indptr"].copy()
        mats[part] = sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=shape)
    ids = z["user_ids"].copy(), z["item_ids"].copy()
    return Interactions(meta["name"], mats["train"], mats["valid"], mats["test"], *ids, meta["meta"])


class RunDir:
    """Paths of one pipeline run's files. A compared configuration's run directory has ``main``, the main
    configuration's: it reads that one's interactions and pretrained embeddings instead of holding its own."""

    def __init__(self, root: Path, main: RunDir | None = None) -> None:
        self.root = Path(root)
        self.main = main

    interactions = property(lambda self: (self.main or self).root / "interactions.npz")
    embeddings = property(lambda self: (self.main or self).root / "wmf_embeddings.npz")
    assignment = property(lambda self: self.root / "shard_assignment.npz")
    diagnostics = property(lambda self: self.root / "partition_diagnostics.json")
    aggregator = property(lambda self: self.root / "aggregator.pt")
    evaluation = property(lambda self: self.root / "evaluation.json")
    config = property(lambda self: self.root / "config.json")
    serving = property(lambda self: self.root / "serving.pt")

    def shard_data(self, k: int) -> Path:
        return self.root / "shards" / str(k) / "data.npz"

    def shard_model(self, k: int) -> Path:
        return self.root / "shards" / str(k) / "model.pt"

    def shard_fit(self, k: int) -> Path:
        return self.root / "shards" / str(k) / "fit.json"


#: torch threads for every training step (pretraining, shards, aggregator). Results differ with the thread
#: count (summation order), so fixing it makes a model the same whoever trains it: a multiprocess build, an
#: `unlearn` in the foreground, the sensor's run. Shards run in parallel processes instead. Recorded in each
#: fit record (``torch_threads``).
TRAIN_THREADS = 1


@contextlib.contextmanager
def training_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- steps --------------------------------------------------------------------------------------------
def prepare(run: RunDir, cfg: PipelineConfig, data_dir: Path | None = None, log: Log = _quiet) -> Interactions:
    """Load the dataset, split it, store it as ``interactions.npz``."""
    PROGRESS.info(f"reading and splitting {cfg.dataset} ...")
    inter = load_dataset(cfg.dataset, data_dir, cfg.split_seed)
    check_shards(cfg, inter)
    save_interactions(run.interactions, inter)
    write_json(run.config, cfg.to_dict())
    log(f"prepared {inter.name}: {inter.train.nnz:,} train / {inter.valid.nnz:,} valid / {inter.test.nnz:,} test")
    return inter


def check_shards(cfg: PipelineConfig, inter: Interactions) -> None:
    """K must leave no shard empty: at most the number of units the partitioner deals out."""
    units, what = shard_units(cfg.partitioner, inter.train)
    if cfg.n_shards > units:
        raise DataError(
            f"{cfg.n_shards} shards is more than the {units:,} training {what} of {inter.name} that the "
            f"{cfg.partitioner} partitioner deals out: some shards would be empty; use --shards {units:,} or fewer"
        )


#: Progress of long steps (epochs, sweeps, partition iterations) on the terminal: `receraser` prints this logger
#: (or a tqdm bar, on a terminal); the Dagster run log gets the same lines (`progress`).
PROGRESS = logging.getLogger("receraser.progress")


@contextlib.contextmanager
def progress(
    task: str, total: int | None = None, unit: str = "epoch", log: Log | None = None, every: float = 5.0
) -> Iterator[Callable[[dict[str, float]], None]]:
    """A callback for a long loop (epochs, sweeps, partition iterations) that shows how far it is: a tqdm bar on
    a terminal, else a line on the ``receraser.progress`` logger at most every ``every`` s; the same line goes
    to ``log`` (the Dagster run log, from an asset) as often. With ``total`` (the most epochs or iterations the
    loop may take) the line gives the time left at most; early stopping may end the loop sooner."""
    from tqdm import tqdm

    tty = bool(PROGRESS.handlers) and all(
        getattr(getattr(h, "stream", None), "isatty", lambda: False)() for h in PROGRESS.handlers
    )
    bar = tqdm(total=total, desc=task, unit=unit, mininterval=every, leave=False, disable=not tty)
    start = time.perf_counter()
    last = [start]

    def report(info: dict[str, float]) -> None:
        n = int(info.get(unit, info.get("epoch", bar.n + 1)))
        score = info.get("valid_recall@10")
        if score is not None:
            bar.set_postfix_str(f"valid Recall@10 {score:.4f}", refresh=False)
        bar.update(n - bar.n)
        now = time.perf_counter()
        if now - last[0] < every:
            return
        last[0] = now
        elapsed = now - start  # a disabled tqdm bar keeps no time
        line = f"{task}: {unit} {n}" + (f" of at most {total}" if total else "")
        line += f", valid Recall@10 {score:.4f}" if score is not None else ""
        line += f" ({tqdm.format_interval(elapsed)}"
        if total and n:
            line += f", at most {tqdm.format_interval(elapsed / n * max(total - n, 0))} left"
        line += ")"
        if bar.disable:
            PROGRESS.info(line)
        if log is not None:
            log(line)

    try:
        yield report
    finally:
        bar.close()


def pretrain(run: RunDir, cfg: PipelineConfig, log: Log = _quiet) -> tuple[np.ndarray, np.ndarray]:
    """WMF on all training data; its embeddings only steer the partition."""
    inter = load_interactions(run.interactions)
    model = build_model("wmf", inter.n_users, inter.n_items, **model_config("wmf", inter.name, {"seed": cfg.seed}))
    PROGRESS.info(f"pretraining WMF on {inter.train.nnz:,} interactions (the partition's embeddings) ...")
    with training_threads(), progress("pretraining WMF", model.config.epochs, log=log) as shown:
        fit = model.fit(inter.train, inter.valid, callback=shown)
    u, i = (t.numpy() for t in model.embeddings())
    _atomic(run.embeddings, lambda p: _save_npz(p, user=u, item=i))
    log(f"pretrained WMF in {fit.seconds:.1f} s (valid Recall@10 {fit.best_valid_recall:.4f})")
    return u, i


@contextlib.contextmanager
def read_npz(path: Path) -> Iterator[Any]:
    """An .npz artifact, checked against its hash, read without pickle; damage is one line naming the file."""
    check(path, "file")
    try:
        with np.load(path, allow_pickle=False) as z:
            yield z
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc}); `receraser run --rebuild` rebuilds it") from None


def _save_npz(path: Path, **arrays: Any) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def partition(run: RunDir, cfg: PipelineConfig, log: Log = _quiet) -> Partition:
    """Shard id for every training interaction, with diagnostics."""
    inter = load_interactions(run.interactions)
    PROGRESS.info(
        f"partitioning {inter.train.nnz:,} interactions with {cfg.partitioner} into {cfg.n_shards} shards "
        f"(at most {cfg.partition_iters} iterations) ..."
    )
    kwargs: dict[str, Any] = {"max_iter": cfg.partition_iters}
    if cfg.partitioner != "random":
        with read_npz(run.embeddings) as z:
            kwargs.update(user_emb=z["user"], item_emb=z["item"])
    t0 = time.perf_counter()
    with progress(f"partition {cfg.partitioner}", cfg.partition_iters, "iteration", log) as shown:
        part = PARTITIONERS[cfg.partitioner](inter.train, cfg.n_shards, cfg.seed, callback=shown, **kwargs)
    diag = {**part.diagnostics, "seconds": time.perf_counter() - t0}
    _write_assignment(run, part.assignment, inter.train)
    write_json(run.diagnostics, diag)
    log(
        f"partitioned with {cfg.partitioner} into {cfg.n_shards} shards in {diag['seconds']:.1f} s: "
        f"sizes {diag['sizes']}"
    )
    return Partition(part.method, part.n_shards, part.assignment, diag)


def _pair_keys(train: sp.csr_matrix) -> np.ndarray:
    """One int64 per training interaction, (user, item) in CSR order."""
    rows = np.repeat(np.arange(train.shape[0], dtype=np.int64), np.diff(train.indptr))
    return rows * train.shape[1] + train.indices


def _write_assignment(run: RunDir, assignment: np.ndarray, train: sp.csr_matrix) -> None:
    """Store a shard assignment of ``train``. A compared configuration (``run.main``) also stores each entry's
    (user, item): the main configuration redacts the interactions it reads, and the pairs let it find its
    entries again in the redacted matrix (`follow_redactions`)."""
    arrays: dict[str, Any] = {"assignment": assignment, "train_fingerprint": np.array(csr_fingerprint(train))}
    if run.main is not None:
        arrays["pairs"] = _pair_keys(train)
    _atomic(run.assignment, lambda p: _save_npz(p, **arrays))


def _realigned(run: RunDir, train: sp.csr_matrix) -> np.ndarray | None:
    """A compared configuration's assignment of the current ``train``, which the main configuration's
    redactions may have shrunk: the stored entries whose (user, item) is still in ``train``. None when the
    stored one belongs to ``train`` as it is or holds no pairs."""
    with read_npz(run.assignment) as z:
        if "pairs" not in z or _belongs(z["assignment"], str(z["train_fingerprint"]), train):
            return None
        assignment, pairs = z["assignment"], z["pairs"]
    keys = _pair_keys(train)
    order = np.argsort(pairs, kind="stable")
    at = order[np.minimum(np.searchsorted(pairs, keys, sorter=order), len(pairs) - 1)]
    if not np.array_equal(pairs[at], keys):
        raise DataError(f"{run.assignment}: training records it never assigned: rebuild with `receraser run --rebuild`")
    return assignment[at]


def shard_counts(assignment: np.ndarray, train: sp.csr_matrix, n_shards: int) -> dict[str, Any]:
    """The size fields of the partition diagnostics (`partition.base.describe`) for ``assignment`` of ``train``."""
    users = np.repeat(np.arange(train.shape[0], dtype=np.int64), np.diff(train.indptr))
    sizes = np.bincount(assignment, minlength=n_shards)

    def distinct(ids: np.ndarray, n: int) -> list[int]:
        pairs = assignment.astype(np.int64) * n + ids
        if n_shards * n <= 50_000_000:  # a count table is much faster than sorting, while it fits
            seen = np.bincount(pairs, minlength=n_shards * n).reshape(n_shards, n)
            return np.count_nonzero(seen, axis=1).tolist()
        return np.bincount(np.unique(pairs) // n, minlength=n_shards).tolist()

    return {
        "sizes": sizes.tolist(),
        "users_per_shard": distinct(users, train.shape[0]),
        "items_per_shard": distinct(train.indices.astype(np.int64), train.shape[1]),
        "balance": float(sizes.max() / max(sizes.mean(), 1e-12)),
    }


def follow_redactions(run: RunDir, inter: Interactions | None = None) -> bool:
    """Rewrite a compared configuration's assignment without the records the main configuration's redactions
    removed (so this store no longer holds them either); True when something was removed."""
    train = (inter if inter is not None else load_interactions(run.interactions)).train
    assignment = _realigned(run, train)
    if assignment is None:
        return False
    _write_assignment(run, assignment, train)
    diag = read_json(run.diagnostics)  # the sizes follow the data, as in `forget.redact`
    write_json(run.diagnostics, {**diag, **shard_counts(assignment, train, int(diag["n_shards"]))})
    return True


def _read_assignment(run: RunDir) -> tuple[np.ndarray, str | None]:
    """The stored assignment and the fingerprint of the training matrix it belongs to (None in old files)."""
    with read_npz(run.assignment) as z:
        return z["assignment"], str(z["train_fingerprint"]) if "train_fingerprint" in z else None


def _belongs(assignment: np.ndarray, fingerprint: str | None, train: sp.csr_matrix) -> bool:
    return len(assignment) == train.nnz if fingerprint is None else fingerprint == csr_fingerprint(train)


def assignment_matches(run: RunDir, train: sp.csr_matrix) -> bool:
    """True when the stored shard assignment belongs to ``train`` (its recorded fingerprint, else its length)."""
    return _belongs(*_read_assignment(run), train)


def load_partition(run: RunDir, inter: Interactions | None = None) -> Partition:
    """The stored partition, checked against the stored (or given) interactions."""
    assignment, fingerprint = _read_assignment(run)
    train = (inter if inter is not None else load_interactions(run.interactions)).train
    realigned = _realigned(run, train) if run.main is not None else None
    if realigned is not None:  # the main configuration redacted since: the entries that remain
        assignment, fingerprint = realigned, None
    if not _belongs(assignment, fingerprint, train):
        raise DataError(
            f"{run.assignment}: belongs to another training matrix (an interrupted redaction); "
            "run `receraser unlearn` to finish it"
        )
    diag = read_json(run.diagnostics)
    return Partition(diag["method"], diag["n_shards"], assignment, diag)


def shard_train_matrix(run: RunDir, k: int, inter: Interactions | None = None) -> sp.csr_matrix:
    """Shard k's training interactions (full id space). Only these reach the shard's model."""
    inter = inter if inter is not None else load_interactions(run.interactions)
    return load_partition(run, inter).shard_matrix(inter.train, k)


def shard_validation(valid: sp.csr_matrix, shard: sp.csr_matrix) -> sp.csr_matrix:
    """The validation pairs whose user and item both occur in the shard: the part of validation a shard model
    can be judged on (early stopping). It depends only on the fixed validation set and the shard's own data."""
    users_in = np.diff(shard.indptr) > 0
    items_in = np.bincount(shard.indices, minlength=shard.shape[1]) > 0
    v = valid.tocoo()
    keep = users_in[v.row] & items_in[v.col]
    out = sp.csr_matrix((np.ones(int(keep.sum()), np.float32), (v.row[keep], v.col[keep])), shape=valid.shape)
    out.sort_indices()
    return out


def validation_routes(
    inter: Interactions, cfg: PipelineConfig, assignment: np.ndarray, only: np.ndarray | None = None
) -> np.ndarray:
    """The shard each validation entry early-stops (``shard_valid="routed"``; -1: none), from the current data
    (of the entries in ``only`` alone, when given: `partition.route_validation`)."""
    return route_validation(inter.valid, inter.train, assignment, cfg.n_shards, cfg.seed, only)


def shard_valid(
    run: RunDir,
    inter: Interactions,
    cfg: PipelineConfig,
    k: int,
    shard: sp.csr_matrix,
    routes: np.ndarray | None = None,
) -> sp.csr_matrix:
    """The validation pairs shard k's model early-stops on, by ``cfg.shard_valid``: "routed" (each validation
    pair steers exactly one shard that holds both its user and its item, `route_validation`; ``routes`` when
    already computed), "local" (every such shard) or "global" (all of validation, every shard)."""
    if cfg.shard_valid == "routed":
        if routes is None:
            routes = validation_routes(inter, cfg, load_partition(run, inter).assignment)
        return routed_validation(inter.valid, routes, k)
    return shard_validation(inter.valid, shard) if cfg.shard_valid == "local" else inter.valid


def write_shard_data(run: RunDir, cfg: PipelineConfig, k: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Store shard k's current training interactions as ``shards/<k>/data.npz``; returns them and the validation
    pairs its model early-stops on (all of validation with ``shard_valid=global``)."""
    inter = load_interactions(run.interactions)
    m = shard_train_matrix(run, k, inter)
    _atomic(run.shard_data(k), lambda p: _save_npz(p, indptr=m.indptr, indices=m.indices, shape=np.array(m.shape)))
    return m, shard_valid(run, inter, cfg, k, m)


def shard_data_version(train: sp.csr_matrix, valid: sp.csr_matrix) -> str:
    """The content version of a shard's data: its training interactions and the validation pairs it early-stops
    on (so forgetting a validation record restales its shard too)."""
    return hashlib.sha256(f"{csr_fingerprint(train)}|{csr_fingerprint(valid)}".encode()).hexdigest()[:24]


def shard_versions(run: RunDir, cfg: PipelineConfig) -> dict[str, str]:
    """What `write_shard_data` would store for every shard now, as content versions by partition key: a
    compared configuration's record of what was deleted from each of its shards (the main configuration's
    ledger knows only its own shards)."""
    inter = load_interactions(run.interactions)
    part = load_partition(run, inter)
    routes = validation_routes(inter, cfg, part.assignment) if cfg.shard_valid == "routed" else None
    out = {}
    for k in range(cfg.n_shards):
        m = part.shard_matrix(inter.train, k)
        out[str(k)] = shard_data_version(m, shard_valid(run, inter, cfg, k, m, routes))
    return out


def load_shard_data(run: RunDir, k: int) -> sp.csr_matrix:
    path = run.shard_data(k)
    with read_npz(path) as z:
        indices = z["indices"]
        return sp.csr_matrix((np.ones(len(indices), np.float32), indices, z["indptr"]), shape=tuple(z["shape"]))


def shard_model_config(cfg: PipelineConfig, dataset: str, k: int) -> dict[str, Any]:
    """Shard k's model settings: the model's and dataset's defaults, the shard defaults, the user's overrides,
    and the seed ``seed + k``."""
    overrides = {**SHARD_DEFAULTS.get(cfg.model, {}), **cfg.model_overrides, "seed": cfg.seed + k}
    return model_config(cfg.model, dataset, overrides)


def fault_point(run: RunDir, point: str) -> None:
    """Testing hook for the crash / failure tests, at ``point`` ("redact": between the two writes of a
    redaction, "shard": before a shard fit, "aggregator": before the aggregator fit).
    ``RECERASER_FAULT_INJECTION=fail_<point>`` raises there; ``hang_<point>`` writes ``fault-hang-started`` in
    the run directory and sleeps (to be killed)."""
    fault = os.environ.get("RECERASER_FAULT_INJECTION", "")
    if fault == f"fail_{point}":
        raise RuntimeError(f"injected failure at {point} (RECERASER_FAULT_INJECTION={fault})")
    if fault == f"hang_{point}":
        (run.root / "fault-hang-started").write_text(point)
        time.sleep(3600)


def train_shard(
    run: RunDir, cfg: PipelineConfig, k: int, log: Log = _quiet, shard: sp.csr_matrix | None = None
) -> Recommender:
    """Train submodel k on shard k's data only (plus the fixed validation set for early stopping).

    The data is ``shard`` if given, else the stored ``shards/<k>/data.npz``, else computed from the
    interactions and the shard assignment."""
    fault_point(run, "shard")
    inter = load_interactions(run.interactions)
    if shard is not None:
        data = shard
    elif run.shard_data(k).exists():
        data = load_shard_data(run, k)
    else:
        data = load_partition(run).shard_matrix(inter.train, k)
    model = build_model(cfg.model, inter.n_users, inter.n_items, **shard_model_config(cfg, inter.name, k))
    with training_threads(), progress(f"shard {k}", model.config.epochs, log=log) as shown:
        fit = model.fit(data, shard_valid(run, inter, cfg, k, data), callback=shown)
    model.save(run.shard_model(k))
    write_json(
        run.shard_fit(k),
        {
            "shard": k,
            "interactions": int(data.nnz),
            "data_version": csr_fingerprint(data),
            "best_epoch": fit.best_epoch,
            "epochs": fit.epochs_run,
            "best_valid_recall@10": fit.best_valid_recall,
            "seconds": fit.seconds,
            "torch_threads": TRAIN_THREADS,
            "history": fit.history,
        },
    )
    log(f"shard {k}: {data.nnz:,} interactions, {fit.epochs_run} epochs, {fit.seconds:.1f} s")
    return model


def _train_shard_worker(args: tuple[str, str, dict[str, Any], int]) -> tuple[int, float]:
    root, main, cfg_dict, k = args
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    train_shard(RunDir(Path(root), RunDir(Path(main)) if main else None), PipelineConfig.from_dict(cfg_dict), k)
    return k, time.perf_counter() - t0


def train_shards(
    run: RunDir, cfg: PipelineConfig, shards: Sequence[int] | None = None, workers: int = 1, log: Log = _quiet
) -> dict[int, float]:
    """Train several shards, in parallel processes when ``workers`` > 1. Returns seconds per shard."""
    todo = list(range(cfg.n_shards) if shards is None else shards)
    if workers <= 1:
        out = {}
        for k in todo:
            t0 = time.perf_counter()
            train_shard(run, cfg, k, log)
            out[k] = time.perf_counter() - t0
        return out
    jobs = [(str(run.root), str(run.main.root) if run.main else "", cfg.to_dict(), k) for k in todo]
    out = {}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for k, secs in pool.map(_train_shard_worker, jobs):
            out[k] = secs
            log(f"shard {k} trained in {secs:.1f} s")
    return out


def shard_stack(run: RunDir, cfg: PipelineConfig, inter: Interactions, part: Partition) -> ShardStack:
    """The frozen per-shard embeddings the aggregator combines (layer-0 for LightGCN + attention)."""
    embs, mats = [], []
    for k in range(cfg.n_shards):
        model = load_model(run.shard_model(k))
        if isinstance(model, LightGCN) and cfg.aggregator == "attention":
            embs.append(model.layer0())
        else:
            embs.append(model.embeddings())
        mats.append(part.shard_matrix(inter.train, k))
    return ShardStack.build(embs, mats)


def aggregate(
    run: RunDir, cfg: PipelineConfig, log: Log = _quiet, callback: Callable[[dict[str, float]], None] | None = None
) -> Aggregator:
    """Train the aggregator on all remaining training data (submodels frozen), from its seeded init."""
    fault_point(run, "aggregator")
    inter = load_interactions(run.interactions)
    with training_threads():  # the aligned start (an SVD per shard) included
        stack = shard_stack(run, cfg, inter, load_partition(run))
        t0 = time.perf_counter()
        agg = AGGREGATORS[cfg.aggregator](stack, cfg.agg_config())
        init_seconds = time.perf_counter() - t0  # its data-dependent start (attention: the Procrustes alignment)
        with progress(f"aggregator {cfg.aggregator}", agg.config.epochs, log=log) as shown:

            def both(epoch_log: dict[str, float]) -> None:
                shown(epoch_log)
                if callback is not None:
                    callback(epoch_log)

            fit = agg.fit(inter.train, inter.valid, callback=both)
    state = {
        "aggregator": cfg.aggregator,
        "config": cfg.to_dict(),
        "state": agg.state_dict(),
        "fit": {
            "best_epoch": fit.best_epoch,
            "best_valid_recall@10": fit.best_valid_recall,
            "seconds": fit.seconds,
            "init_seconds": init_seconds,
            "torch_threads": TRAIN_THREADS,
            "history": fit.history,
        },
    }
    save_state(run.aggregator, state)
    # the serving snapshot: everything `recommend` needs, independent of the shard model files, replaced only
    # here, so an interrupted unlearning keeps the previous model serving
    serving = {
        **state,
        "stack": stack.__dict__,
        "graph": inter.train if agg.config.loss == "lightgcn" else None,
        "train": inter.train,
    }
    save_state(run.serving, serving)
    log(f"aggregator {cfg.aggregator}: {len(fit.history)} epochs, {fit.seconds:.1f} s")
    return agg


def load_aggregator(run: RunDir, cfg: PipelineConfig) -> Aggregator:
    inter = load_interactions(run.interactions)
    stack = shard_stack(run, cfg, inter, load_partition(run))
    state = load_state(run.aggregator, "aggregator file")
    agg = AGGREGATORS[cfg.aggregator].restore(stack, cfg.agg_config(), state["state"])
    if agg.config.loss == "lightgcn":
        agg.set_graph(inter.train)
    return agg


def load_serving(run: RunDir) -> tuple[Aggregator, sp.csr_matrix]:
    """The model currently serving recommendations, and the training matrix it was built on."""
    if not run.serving.exists():
        raise DataError(f"{run.serving}: no model has been built yet; run `receraser run` first")
    return load_serving_file(run.serving)


def load_serving_file(path: Path) -> tuple[Aggregator, sp.csr_matrix]:
    """A serving snapshot (``serving.pt`` or a copy of it) as a model and its training matrix."""
    state = load_state(path, "serving snapshot")
    cfg = PipelineConfig.from_dict(state["config"])
    agg = AGGREGATORS[cfg.aggregator].restore(ShardStack.restore(state["stack"]), cfg.agg_config(), state["state"])
    if state["graph"] is not None:
        agg.set_graph(state["graph"])
    return agg, state["train"]


def top_items(
    score: Callable[[torch.Tensor], torch.Tensor], train: sp.csr_matrix, u: int, n: int
) -> tuple[list[int], torch.Tensor, int]:
    """User ``u``'s top-``n`` item indices, best first, with its training items masked (fewer when fewer are left
    to rank); also its (n_items,) scores, masked ones -inf, and how many training items were masked.
    ``score`` maps (users,) to (users, n_items), as `Aggregator.score` and `Aggregator.scorer()` do."""
    with torch.no_grad():
        scores = score(torch.tensor([u]))[0].clone()  # (n_items,)
    seen = train.indices[train.indptr[u] : train.indptr[u + 1]]
    scores[torch.from_numpy(seen.astype(np.int64))] = float("-inf")
    rankable = len(scores) - len(np.unique(seen))  # training items are never recommended
    return torch.topk(scores, min(n, rankable)).indices.tolist(), scores, len(seen)


def evaluate_run(
    run: RunDir, cfg: PipelineConfig, log: Log = _quiet, agg: Aggregator | None = None
) -> dict[str, float]:
    """Test (and validation) metrics of the aggregated model, training items masked."""
    inter = load_interactions(run.interactions)
    agg = agg if agg is not None else load_aggregator(run, cfg)
    t0 = time.perf_counter()
    score = agg.scorer()
    test = evaluate(score, inter.train, inter.test, ks=DEFAULT_KS, batch_size=256)
    valid = evaluate(score, inter.train, inter.valid, ks=(10, 20), batch_size=256)
    out = {
        **{k: v for k, v in test.items() if k != "users"},
        "test_users": test["users"],
        "valid_recall@10": valid["recall@10"],
        "valid_recall@20": valid["recall@20"],
        "seconds": time.perf_counter() - t0,
    }
    write_json(run.evaluation, out)
    log(f"evaluation: Recall@20 {out['recall@20']:.4f}  NDCG@20 {out['ndcg@20']:.4f}")
    return out
