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
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from pipelines.config import PipelineConfig
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
    shard_counts,
    validation_routes,
    write_json,
)
from receraser_core.data.interactions import DataError, Interactions, csr_fingerprint, csr_to_pairs, pairs_to_csr


class ForgetError(DataError):
    """A request that cannot be recorded: unknown ids, records not in the training data, a bad file."""


@dataclass(frozen=True)
class Located:
    """Training records of some requests: positions in the train CSR order, their shards."""

    positions: np.ndarray  # (n,) int64
    shards: np.ndarray  # (n,) int64
    by_request: dict[int, np.ndarray]  # request id -> positions


SPLITS = ("train", "valid", "test")


def _indices(inter: Interactions, req: NewRequest | Request) -> tuple[int, int | None] | None:
    """(user index, item index or None for a whole user), or None when an id is unknown."""
    try:
        return inter.user_index(req.user_id), None if req.kind == "user" else inter.item_index(req.item_id)
    except KeyError:
        return None


def _hits(m: sp.csr_matrix, inter: Interactions, req: NewRequest | Request) -> np.ndarray:
    """Positions (``m``'s CSR order) of the stored pairs of ``m`` the request names; found by id."""
    ids = _indices(inter, req)
    if ids is None:
        return np.zeros(0, dtype=np.int64)
    u, i = ids
    start, end = int(m.indptr[u]), int(m.indptr[u + 1])
    if i is None:
        return np.arange(start, end, dtype=np.int64)
    return start + np.flatnonzero(m.indices[start:end] == i).astype(np.int64)


def split_counts(inter: Interactions, req: NewRequest | Request) -> dict[str, int]:
    """How many stored records of each split the request names (0 for unknown ids)."""
    return {split: len(_hits(getattr(inter, split), inter, req)) for split in SPLITS}


def check_request(inter: Interactions, req: NewRequest) -> int:
    """Number of stored records (training, validation and test) the request covers; ForgetError naming the
    problem otherwise. A validation or test record is honoured too: validation steers early stopping and
    selection, and both are stored personal data."""
    try:
        inter.user_index(req.user_id)
    except KeyError:
        raise ForgetError(f"unknown user {req.user_id!r} in dataset {inter.name}") from None
    if req.kind != "user":
        try:
            inter.item_index(req.item_id)
        except KeyError:
            raise ForgetError(f"unknown item {req.item_id!r} in dataset {inter.name}") from None
    n = sum(split_counts(inter, req).values())
    if n == 0:
        if req.kind == "user":
            raise ForgetError(f"user {req.user_id!r} has no stored interactions left to forget")
        raise ForgetError(f"user {req.user_id!r} never interacted with item {req.item_id!r} (in any split)")
    return n


def file_requests(ledger: Ledger, inter: Interactions, requests: Sequence[NewRequest]) -> list[tuple[int, bool, int]]:
    """Check every request against the stored data, then record them all in one transaction; returns
    (request id, is new, stored records it names) per request. A request already applied or applying is
    recognised (by keyed hash) and not checked again: its records are gone. The first bad request raises one
    `ForgetError` line, and nothing is recorded. `receraser forget` and the service's POST /forget both call this."""
    records = []
    for n, req in enumerate(requests, start=1):  # validate everything before writing anything
        prior = ledger.find(req)
        if prior is not None and prior.status in ("applied", "applying"):
            records.append(prior.records)
            continue
        try:
            records.append(check_request(inter, req))
        except ForgetError as exc:
            where = f"request {n}: " if len(requests) > 1 else ""
            raise ForgetError(f"{where}{exc}; nothing was recorded") from None
    return [(rid, new, n) for (rid, new), n in zip(ledger.add(requests, records), records, strict=True)]


def _without_requests(m: sp.csr_matrix, inter: Interactions, requests: Sequence[Request]) -> sp.csr_matrix:
    """A validation or test matrix minus the pairs the requests name (found by id, so idempotent)."""
    drop = np.unique(np.concatenate([_hits(m, inter, r) for r in requests] or [np.zeros(0, np.int64)]))
    return _without(m, drop) if len(drop) else m


def validation_shards(
    inter: Interactions,
    assignment: np.ndarray,
    requests: Sequence[Request],
    scope: str,
    routes: np.ndarray | None = None,
) -> list[int]:
    """Shards whose early stopping reads a validation record the requests name: with ``scope="routed"`` the
    one shard each record is routed to (``routes``, `steps.validation_routes` of the same data), with
    ``"local"`` every shard holding both its user and its item (`steps.shard_validation`), with ``"global"``
    every shard."""
    n_shards = int(assignment.max()) + 1 if len(assignment) else 0
    users = np.repeat(np.arange(inter.train.shape[0]), np.diff(inter.train.indptr))
    out: set[int] = set()
    for req in requests:
        hits = _hits(inter.valid, inter, req)
        if len(hits) == 0:
            continue
        if scope == "routed":
            if routes is None:
                raise ValueError("routed validation needs the routes of the current data")
            out |= {int(k) for k in routes[hits] if k >= 0}
            continue
        if scope != "local":
            return list(range(n_shards))
        u = inter.user_index(req.user_id)
        items = inter.valid.indices[hits]
        user_shards = set(assignment[users == u].tolist())
        for i in items:
            out |= user_shards & set(assignment[inter.train.indices == i].tolist())
    return sorted(out)


def affected_entries(inter: Interactions, requests: Sequence[Request]) -> np.ndarray:
    """The validation entries (bool, one per entry) whose route the requests can change: those of the users and
    items of their training records, and their own validation records. A route depends only on which shards
    hold the entry's user and item, and removing (user, item) records changes that for those users and items
    alone."""
    positions = _all_positions(_positions(inter, requests))
    users = np.repeat(np.arange(inter.train.shape[0]), np.diff(inter.train.indptr))
    rows = np.repeat(np.arange(inter.valid.shape[0]), np.diff(inter.valid.indptr))
    out = np.isin(rows, users[positions]) | np.isin(inter.valid.indices, inter.train.indices[positions])
    for r in requests:
        out[_hits(inter.valid, inter, r)] = True
    return out


def rerouted_shards(
    inter: Interactions,
    assignment: np.ndarray,
    requests: Sequence[Request],
    routes: np.ndarray,
    cfg: PipelineConfig,
    only: np.ndarray | None = None,
) -> list[int]:
    """Shards whose routed validation pairs change, besides the requests' own validation records: removing
    training records can take a shard's last record of a user or an item, and the validation pairs routed
    there move to another shard holding both (`partition.route_validation`). ``routes``: the route of ``inter``'s
    validation entries before the removal; ``only``: the entries it holds (`affected_entries`), the only ones
    a removal can move."""
    positions = _all_positions(_positions(inter, requests))
    if len(positions) == 0:
        return []  # no training record leaves: every shard holds the same users and items as before
    dropped = np.unique(np.concatenate([_hits(inter.valid, inter, r) for r in requests] or [np.zeros(0, np.int64)]))
    keep = np.ones(inter.valid.nnz, dtype=bool)
    keep[dropped] = False
    after_inter = replace(inter, train=_without(inter.train, positions), valid=_without(inter.valid, dropped))
    kept = None if only is None else only[keep]
    after = validation_routes(after_inter, cfg, np.delete(assignment, positions), kept)
    before = routes[keep]
    moved = before != after if kept is None else (before != after) & kept
    return sorted({int(k) for k in np.concatenate([before[moved], after[moved]]) if k >= 0})


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
    """``train`` minus the stored entries at ``positions`` (row-major CSR order): the same binary matrix as
    rebuilding it from the remaining pairs, cut out of the CSR arrays directly (a rebuild sorted every entry:
    1.5 s at 7.2M training interactions)."""
    if not train.has_canonical_format:  # unsorted or duplicate entries: rebuild (sorted, duplicates collapsed)
        rows, cols = csr_to_pairs(train)
        keep = np.ones(train.nnz, dtype=bool)
        keep[positions] = False
        return pairs_to_csr(rows[keep], cols[keep], *train.shape)
    keep = np.ones(train.nnz, dtype=bool)
    keep[positions] = False
    gone_per_row = np.bincount(
        np.searchsorted(train.indptr, np.unique(positions), side="right") - 1, minlength=train.shape[0]
    )
    indptr = np.r_[0, np.cumsum(np.diff(train.indptr) - gone_per_row)].astype(train.indptr.dtype)
    indices = train.indices[keep]
    return sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=train.shape)


def _all_positions(by_request: dict[int, np.ndarray]) -> np.ndarray:
    return np.unique(np.concatenate([p for p in by_request.values()] or [np.zeros(0, np.int64)]))


def _positions(inter: Interactions, requests: Sequence[Request]) -> dict[int, np.ndarray]:
    return {req.id: _hits(inter.train, inter, req) for req in requests}


def locate(
    run: RunDir, requests: Sequence[Request], inter: Interactions | None = None, assignment: np.ndarray | None = None
) -> Located:
    """Positions (train CSR order) and shards of the records the requests name that are still stored (in
    ``inter`` and ``assignment`` when given, already read from the run directory)."""
    if inter is None:
        inter = load_interactions(run.interactions)
    if assignment is None:
        with read_npz(run.assignment) as z:
            assignment = z["assignment"]
    by_request = _positions(inter, requests)
    positions = _all_positions(by_request)
    return Located(positions, assignment[positions], by_request)


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
    valid, test = (_without_requests(getattr(inter, s), inter, requests) for s in ("valid", "test"))
    held_out = inter.valid.nnz - valid.nnz + inter.test.nnz - test.nnz
    user_ids = _tombstoned(inter, requests)
    if len(positions) == 0 and held_out == 0 and user_ids is inter.user_ids:
        return inter, 0
    train = _without(inter.train, positions) if len(positions) else inter.train
    if len(positions):
        new_assignment = np.delete(assignment, positions)
        fp = csr_fingerprint(train)
        _atomic(run.assignment, lambda p: _save_npz(p, assignment=new_assignment, train_fingerprint=np.array(fp)))
        diag = read_json(run.diagnostics)  # the sizes follow the data; how the partition was made stays
        write_json(run.diagnostics, {**diag, **shard_counts(new_assignment, train, int(diag["n_shards"]))})
    fault_point(run, "redact")
    redacted = replace(inter, train=train, valid=valid, test=test, user_ids=user_ids)
    save_interactions(run.interactions, redacted)
    return redacted, len(positions) + held_out


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
    valid, test = (_without_requests(getattr(inter, s), inter, requests) for s in ("valid", "test"))
    user_ids = _tombstoned(inter, requests)
    save_interactions(run.interactions, replace(inter, train=train, valid=valid, test=test, user_ids=user_ids))
    return True


def check_consistent(run: RunDir) -> bool:
    """True when the shard assignment belongs to the stored training matrix."""
    return assignment_matches(run, load_interactions(run.interactions).train)


def shard_deletion_versions(ledger: Ledger, n_shards: int) -> dict[str, str]:
    """Per shard partition, a version of what has been deleted from that shard: a hash of the ids of the requests
    whose records it held (the shards are recorded when a request starts applying, before its redaction). Only
    the shards a request touches get a new version, so only their partitions go stale."""
    ids: dict[int, list[int]] = {k: [] for k in range(n_shards)}
    for r in ledger.get():
        for k in r.shards:
            if k in ids:
                ids[k].append(r.id)
    return {
        str(k): hashlib.sha256(",".join(map(str, sorted(v))).encode()).hexdigest()[:16] if v else "none"
        for k, v in ids.items()
    }


def tombstone(subject: str) -> str:
    """What an erased user's id becomes in the id map: the user keeps an index (models stay aligned) but the
    store no longer holds the id."""
    return f"erased:{subject[:32]}"


def _with_ids(user_ids: np.ndarray, replacements: dict[int, str]) -> np.ndarray:
    if not replacements:
        return user_ids
    ids = user_ids.astype(str).astype(object)
    for u, text in replacements.items():
        ids[u] = text
    return np.array(ids.tolist())  # a string array as wide as its longest id


def _tombstoned(inter: Interactions, requests: Sequence[Request]) -> np.ndarray:
    """The id map with every user erased by a whole-user request replaced by its tombstone (the same array
    when there is none)."""
    found = [(r.subject, _indices(inter, r)) for r in requests if r.kind == "user"]
    return _with_ids(inter.user_ids, {ids[0]: tombstone(subject) for subject, ids in found if ids is not None})


def reapply_ledger(run: RunDir, ledger: Ledger) -> Interactions:
    """Remove from a freshly prepared interactions store every record of applied (or applying) requests, in
    every split, and tombstone erased users. Matched by keyed hash: the ledger no longer holds applied ids."""
    inter = load_interactions(run.interactions)
    subjects = {r.subject for r in ledger.get(statuses=["applied", "applying"])}
    if not subjects:
        return inter
    users, items = inter.user_ids.astype(str), inter.item_ids.astype(str)
    gone = np.array([ledger.subject("user", u) in subjects for u in users], dtype=bool)

    def remaining(m: sp.csr_matrix) -> sp.csr_matrix:
        rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
        pairs = zip(users[rows], items[m.indices], strict=True)
        hits = (ledger.subject("interaction", u, i) in subjects for u, i in pairs)
        hit = gone[rows] | np.fromiter(hits, dtype=bool, count=m.nnz)
        return _without(m, np.flatnonzero(hit)) if hit.any() else m

    erased = {int(u): tombstone(ledger.subject("user", users[u])) for u in np.flatnonzero(gone)}
    redacted = replace(
        inter,
        train=remaining(inter.train),
        valid=remaining(inter.valid),
        test=remaining(inter.test),
        user_ids=_with_ids(inter.user_ids, erased),
    )
    save_interactions(run.interactions, redacted)
    return redacted
