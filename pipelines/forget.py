"""Turning requests to forget into redactions of the stored training data.

A request names records by the dataset's *original* ids (MovieLens UserID / MovieID). Only training
records can be forgotten (validation and test data never reach a model). Redaction removes the records from
``interactions.npz`` and the matching entries from ``shard_assignment.npz``: the same rows minus the deleted
ones, never a recomputed partition, so only the affected shards' data changes.

Crash safety: the assignment file records the fingerprint of the training matrix it belongs to. It is
written first; if the process dies before the interactions file follows, `redact` run again with the same
records finishes the job (the ledger keeps those records as ``applying``).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from pipelines.ledger import Ledger, NewRequest, Request
from pipelines.steps import (
    RunDir,
    _atomic,
    _save_npz,
    assignment_matches,
    fault_point,
    load_interactions,
    read_json,
    read_npz,
    save_interactions,
    write_json,
)
from receraser_core.data.interactions import DataError, Interactions, csr_fingerprint, pairs_to_csr


class ForgetError(DataError):
    """A request that cannot be recorded: unknown ids, records not in the training data, a bad file."""


@dataclass(frozen=True)
class Located:
    """Training records of some requests: positions in the train CSR order, their shards."""

    positions: np.ndarray  # (n,) int64
    shards: np.ndarray  # (n,) int64
    by_request: dict[int, np.ndarray]  # request id -> positions


def _pairs_of_user(inter: Interactions, u: int) -> np.ndarray:
    return inter.train.indices[inter.train.indptr[u] : inter.train.indptr[u + 1]].astype(np.int64)


def check_request(inter: Interactions, req: NewRequest) -> int:
    """Number of training records the request covers; ForgetError naming the problem otherwise."""
    try:
        u = inter.user_index(req.user_id)
    except KeyError:
        raise ForgetError(f"unknown user {req.user_id!r} in dataset {inter.name}") from None
    if req.kind == "user":
        n = len(_pairs_of_user(inter, u))
        if n == 0:
            raise ForgetError(f"user {req.user_id!r} has no training interactions left to forget")
        return n
    try:
        i = inter.item_index(req.item_id)
    except KeyError:
        raise ForgetError(f"unknown item {req.item_id!r} in dataset {inter.name}") from None
    if inter.train[u, i]:
        return 1
    where = "validation" if inter.valid[u, i] else "test" if inter.test[u, i] else None
    detail = f"it is in the {where} data, which no model trains on" if where else "the user never interacted with it"
    raise ForgetError(f"user {req.user_id!r}, item {req.item_id!r} is not a training interaction ({detail})")


def read_request_file(path: Path) -> list[NewRequest]:
    """CSV with header ``user,item[,reason]``; an empty item or ``*`` means every record of the user."""
    path = Path(path)
    if not path.exists():
        raise ForgetError(f"{path}: file not found")
    if not path.is_file():
        raise ForgetError(f"{path}: not a file (a CSV file of requests is expected)")
    out: list[NewRequest] = []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"user", "item"} <= set(reader.fieldnames):
                raise ForgetError(
                    f"{path}: expected a header with columns 'user,item[,reason]', got {reader.fieldnames}"
                )
            for lineno, row in enumerate(reader, start=2):
                user, item = (row.get("user") or "").strip(), (row.get("item") or "").strip()
                if not user:
                    raise ForgetError(f"{path}:{lineno}: empty user id")
                kind = "user" if item in ("", "*") else "interaction"
                out.append(NewRequest(kind, user, "" if kind == "user" else item, (row.get("reason") or "").strip()))
    except UnicodeDecodeError as exc:
        raise ForgetError(f"{path}: not UTF-8 text (byte {exc.start}); a CSV file of requests is expected") from None
    except csv.Error as exc:
        raise ForgetError(f"{path}: not a readable CSV file ({exc})") from None
    except OSError as exc:
        raise ForgetError(f"{path}: cannot read ({exc.strerror})") from None
    if not out:
        raise ForgetError(f"{path}: no requests in file")
    return out


def _without(train: sp.csr_matrix, positions: np.ndarray) -> sp.csr_matrix:
    """``train`` minus the stored entries at ``positions`` (row-major CSR order)."""
    keep = np.ones(train.nnz, dtype=bool)
    keep[positions] = False
    coo = train.tocoo()  # row-major order == CSR order
    return pairs_to_csr(coo.row[keep], coo.col[keep], *train.shape)


def _all_positions(by_request: dict[int, np.ndarray]) -> np.ndarray:
    return np.unique(np.concatenate([p for p in by_request.values()] or [np.zeros(0, np.int64)]))


def _positions(inter: Interactions, requests: Sequence[Request]) -> dict[int, np.ndarray]:
    by_request: dict[int, np.ndarray] = {}
    for req in requests:
        try:
            u = inter.user_index(req.user_id)
        except KeyError:
            by_request[req.id] = np.zeros(0, dtype=np.int64)
            continue
        start, end = inter.train.indptr[u], inter.train.indptr[u + 1]
        cols = inter.train.indices[start:end]
        if req.kind == "user":
            pos = np.arange(start, end, dtype=np.int64)
        else:
            try:
                i = inter.item_index(req.item_id)
            except KeyError:
                i = -1
            pos = start + np.flatnonzero(cols == i).astype(np.int64)
        by_request[req.id] = pos
    return by_request


def locate(run: RunDir, requests: Sequence[Request]) -> Located:
    """Positions (train CSR order) and shards of the records the requests name that are still stored."""
    inter = load_interactions(run.interactions)
    with read_npz(run.assignment) as z:
        assignment = z["assignment"]
    by_request = _positions(inter, requests)
    positions = _all_positions(by_request)
    return Located(positions, assignment[positions], by_request)


def shard_counts(assignment: np.ndarray, train: sp.csr_matrix, n_shards: int) -> dict[str, Any]:
    """The size fields of the partition diagnostics (`partition.base.describe`) for ``assignment`` of ``train``."""
    users = np.repeat(np.arange(train.shape[0], dtype=np.int64), np.diff(train.indptr))
    sizes = np.bincount(assignment, minlength=n_shards)

    def distinct(ids: np.ndarray, n: int) -> list[int]:
        pairs = np.unique(assignment.astype(np.int64) * n + ids)
        return np.bincount(pairs // n, minlength=n_shards).tolist()

    return {
        "sizes": sizes.tolist(),
        "users_per_shard": distinct(users, train.shape[0]),
        "items_per_shard": distinct(train.indices.astype(np.int64), train.shape[1]),
        "balance": float(sizes.max() / max(sizes.mean(), 1e-12)),
    }


def redact(run: RunDir, requests: Sequence[Request]) -> tuple[Interactions, int]:
    """Remove the training records the requests name from the interactions store and the shard assignment;
    returns the redacted interactions and how many records were removed.

    Idempotent: the records are found in the data read here, by their ids, never by positions computed from
    an earlier read, so a second redaction of the same requests removes nothing. (Positions from an earlier
    read, applied after another redaction, point at *other* records of the same users.)"""
    inter = load_interactions(run.interactions)
    with read_npz(run.assignment) as z:
        assignment = z["assignment"]
    positions = _all_positions(_positions(inter, requests))
    if len(positions) == 0:
        return inter, 0
    train = _without(inter.train, positions)
    new_assignment = np.delete(assignment, positions)
    fp = csr_fingerprint(train)
    _atomic(run.assignment, lambda p: _save_npz(p, assignment=new_assignment, train_fingerprint=np.array(fp)))
    diag = read_json(run.diagnostics)  # the sizes follow the data; how the partition was made stays
    write_json(run.diagnostics, {**diag, **shard_counts(new_assignment, train, int(diag["n_shards"]))})
    fault_point(run, "redact")
    redacted = inter.with_train(train)
    save_interactions(run.interactions, redacted)
    return redacted, len(positions)


def finish_interrupted_redaction(run: RunDir, requests: Sequence[Request]) -> bool:
    """If a redaction stopped between its two writes, complete it; True when something was repaired."""
    if check_consistent(run):
        return False
    inter = load_interactions(run.interactions)
    train = _without(inter.train, _all_positions(_positions(inter, requests)))
    with read_npz(run.assignment) as z:
        expected = str(z["train_fingerprint"]) if "train_fingerprint" in z else ""
    if csr_fingerprint(train) != expected:
        raise ForgetError(
            f"{run.assignment} does not match the stored interactions, and removing the outstanding "
            "requests' records does not reconcile them; rebuild with `receraser run --rebuild`"
        )
    save_interactions(run.interactions, inter.with_train(train))
    return True


def check_consistent(run: RunDir) -> bool:
    """True when the shard assignment belongs to the stored training matrix."""
    return assignment_matches(run, load_interactions(run.interactions).train)


def reapply_ledger(run: RunDir, ledger: Ledger) -> Interactions:
    """Remove from a freshly prepared interactions store every record of applied (or applying) requests."""
    inter = load_interactions(run.interactions)
    done = ledger.get(statuses=["applied", "applying"])
    positions = _all_positions(_positions(inter, done))
    if len(positions) == 0:
        return inter
    redacted = inter.with_train(_without(inter.train, positions))
    save_interactions(run.interactions, redacted)
    return redacted
