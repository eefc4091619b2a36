"""The deletion ledger: a durable, append-only record of every request to forget (DESIGN.md section 3).

SQLite in WAL mode; every change is one transaction. A request moves ``pending -> applying -> applied``, or
to ``failed`` with the error (a failed request is retried by the next `unlearn`). Nothing is ever deleted
from the ledger, and a repeated request is recognised by its (kind, user, item) and not duplicated.

Once a request is applied its ids are erased from the ledger: only their keyed hash (``subject``, BLAKE2b with
the key in ``ledger.key`` or ``$RECERASER_LEDGER_KEY``) stays, which still recognises a repeat of the request
and the records to remove again if the data is ever rebuilt from its source.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from receraser_core.data.interactions import DataError

SCHEMA = """
CREATE TABLE IF NOT EXISTS applier_lock (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    owner         TEXT NOT NULL,
    host          TEXT NOT NULL,
    pid           INTEGER NOT NULL,
    started       TEXT NOT NULL,
    acquired_at   TEXT NOT NULL,
    heartbeat     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    kind          TEXT NOT NULL CHECK (kind IN ('interaction', 'user')),
    user_id       TEXT NOT NULL,
    item_id       TEXT NOT NULL DEFAULT '',
    reason        TEXT NOT NULL DEFAULT '',
    received_at   TEXT NOT NULL,
    status        TEXT NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'applying', 'applied', 'failed')),
    records       INTEGER NOT NULL DEFAULT 0,
    shards        TEXT NOT NULL DEFAULT '[]',
    dagster_runs  TEXT NOT NULL DEFAULT '[]',
    mlflow_runs   TEXT NOT NULL DEFAULT '[]',
    error         TEXT NOT NULL DEFAULT '',
    applied_at    TEXT NOT NULL DEFAULT '',
    rebuilt       TEXT NOT NULL DEFAULT '{}',
    UNIQUE (kind, user_id, item_id)
);
"""
#: Columns added after the first release, with their definitions: an older ledger gets them on open.
ADDED_COLUMNS = {"rebuilt": "TEXT NOT NULL DEFAULT '{}'", "subject": "TEXT NOT NULL DEFAULT ''"}
#: What an applied request's ids become in the ledger: its keyed hash (`Ledger.subject`).
ERASED = "hmac:"


class ApplierBusy(DataError):
    """Another applier holds the ledger's applier lock (one line naming it)."""


#: An applier refreshes its lock every LEASE_SECONDS / 4; a lock not refreshed for LEASE_SECONDS belongs to
#: a dead applier (any machine) and is taken over. On the same machine a dead holder is seen at once.
LEASE_SECONDS = 60.0


def _process_start(pid: int) -> str:
    """A token that differs between two processes that had the same pid (Linux: start time in jiffies)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not started or _process_start(pid) in ("", started)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Request:
    id: int
    kind: str
    user_id: str
    item_id: str
    reason: str
    received_at: str
    status: str
    records: int
    shards: list[int]
    dagster_runs: list[str]
    mlflow_runs: list[str]
    error: str
    applied_at: str
    rebuilt: dict[str, str]  # what the request made rebuild, and why ("shard 3": "held 1 training record")
    subject: str  # keyed hash of (kind, user, item): all that is left of the ids once the request is applied

    @property
    def erased(self) -> bool:
        """True once the ledger no longer holds the request's ids (only their keyed hash)."""
        return self.user_id.startswith(ERASED)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Request:
        d = dict(row)
        for key in ("shards", "dagster_runs", "mlflow_runs", "rebuilt"):
            d[key] = json.loads(d[key])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class NewRequest:
    kind: str
    user_id: str
    item_id: str = ""
    reason: str = ""


class Ledger:
    """The ledger file ``<state>/ledger.sqlite``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)
            present = {row[1] for row in con.execute("PRAGMA table_info(requests)")}
            for name, definition in ADDED_COLUMNS.items():
                if name not in present:
                    con.execute(f"ALTER TABLE requests ADD COLUMN {name} {definition}")
            # rows hashed with a key (a ledger from before keyed hashes has none, and gets a new key)
            hashed = con.execute("SELECT 1 FROM requests WHERE subject != '' LIMIT 1").fetchone() is not None
        self._key = self._load_key(hashed)
        self._migrate()

    def _load_key(self, hashed: bool) -> bytes:
        """The key of the ledger's keyed hashes: ``$RECERASER_LEDGER_KEY``, else ``ledger.key`` beside the ledger
        (created, mode 0600, with a new ledger). Losing it would lose the ability to recognise erased records,
        so a ledger with requests and no key is an error, never a new key."""
        env = os.environ.get("RECERASER_LEDGER_KEY")
        if env:
            return env.encode()
        path = self.path.with_name("ledger.key")
        if not path.exists():
            if hashed:
                raise DataError(
                    f"{path} is missing: the ledger's key (it recognises erased requests and records); restore it "
                    "from a backup or set RECERASER_LEDGER_KEY; nothing was changed"
                )
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process created it first
                pass
            else:
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_hex(32))
        return path.read_text().strip().encode()

    def subject(self, kind: str, user_id: str, item_id: str = "") -> str:
        """Keyed hash of a request's (kind, user, item): recognises a repeat and the records of an applied
        request without keeping its ids (BLAKE2b with the ledger's key)."""
        data = "\x1f".join((kind, str(user_id), str(item_id))).encode()
        return hashlib.blake2b(data, key=self._key[:64], digest_size=32).hexdigest()

    def _migrate(self) -> None:
        """Give rows from before keyed hashes their subject, and erase the ids of applied ones."""
        with self._transaction() as con:
            rows = con.execute("SELECT id, kind, user_id, item_id FROM requests WHERE subject=''").fetchall()
            for row in rows:
                subject = self.subject(row["kind"], row["user_id"], row["item_id"])
                con.execute("UPDATE requests SET subject=? WHERE id=?", (subject, row["id"]))
            scrub = con.execute(f"SELECT 1 FROM requests WHERE status='applied' AND user_id NOT LIKE '{ERASED}%'")
            needs_scrub = scrub.fetchone() is not None
        if needs_scrub:
            self._erase_ids([r.id for r in self.get(statuses=["applied"]) if not r.erased])

    def _erase_ids(self, ids: Sequence[int]) -> None:
        """Replace the ids of applied requests by their keyed hash, overwrite the freed bytes and fold the
        write-ahead log into the database, so the file no longer holds them."""
        with self._transaction() as con:
            for rid in ids:
                con.execute("UPDATE requests SET user_id=? || subject, item_id='', error='' WHERE id=?", (ERASED, rid))
        with self._connect() as con:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def find(self, req: NewRequest) -> Request | None:
        """The recorded request with the same kind and ids (by keyed hash, so applied ones are found too)."""
        with self._connect() as con:
            row = con.execute(
                "SELECT * FROM requests WHERE subject=?", (self.subject(req.kind, req.user_id, req.item_id),)
            ).fetchone()
        return Request.from_row(row) if row is not None else None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA secure_delete=ON")  # bytes an update frees are zeroed, not left in the file
        try:
            yield con
        except sqlite3.DatabaseError as exc:
            if "not a database" in str(exc) or "malformed" in str(exc):  # not "locked" and the like
                raise DataError(
                    f"{self.path}: the deletion ledger is damaged ({exc}); restore it from a backup (it is the "
                    "record of what was forgotten, so nothing can rebuild it); nothing was changed"
                ) from None
            raise
        finally:
            con.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    @contextmanager
    def applier(self, owner: str, wait: float = 0.0, poll: float = 0.5) -> Iterator[None]:
        """Hold the one applier lock of this ledger for the block: at most one process (CLI, Dagster sensor run,
        any executor, any machine sharing the state) applies requests at a time.

        The lock is a row taken in an ``IMMEDIATE`` transaction, so two takers cannot both see it free. It
        survives crashes: a holder that died on this machine (its pid gone or reused) is replaced at once; one
        on another machine once its heartbeat is older than `LEASE_SECONDS`. Waits up to ``wait`` seconds for a
        live holder, then raises `ApplierBusy` naming it."""
        me = (owner, socket.gethostname(), os.getpid(), _process_start(os.getpid()))
        deadline = time.monotonic() + wait
        while True:
            holder = self._try_lock(me)
            if holder is None:
                break
            if time.monotonic() >= deadline:
                raise ApplierBusy(
                    f"another applier is applying deletion requests ({holder['owner']}, pid {holder['pid']} on "
                    f"{holder['host']}, since {holder['acquired_at']}); wait for it or retry later"
                )
            time.sleep(poll)
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(me, stop), daemon=True)
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()
            with self._transaction() as con:
                con.execute("DELETE FROM applier_lock WHERE host=? AND pid=? AND started=?", me[1:])

    def _try_lock(self, me: tuple[str, str, int, str]) -> dict[str, Any] | None:
        """Take the lock (None) or return its live holder."""
        owner, host, pid, started = me
        with self._transaction() as con:
            row = con.execute("SELECT * FROM applier_lock WHERE id=1").fetchone()
            if row is not None:
                same_host = row["host"] == host
                dead = (same_host and not _alive(row["pid"], row["started"])) or (
                    time.time() - row["heartbeat"] > LEASE_SECONDS
                )
                if not dead:  # not re-entrant: a second applier in the same process waits too
                    return dict(row)
            con.execute(
                "INSERT OR REPLACE INTO applier_lock (id, owner, host, pid, started, acquired_at, heartbeat) "
                "VALUES (1,?,?,?,?,?,?)",
                (owner, host, pid, started, _now(), time.time()),
            )
        return None

    def _heartbeat(self, me: tuple[str, str, int, str], stop: threading.Event) -> None:
        while not stop.wait(LEASE_SECONDS / 4):
            with self._transaction() as con:
                con.execute(
                    "UPDATE applier_lock SET heartbeat=? WHERE host=? AND pid=? AND started=?", (time.time(), *me[1:])
                )

    def add(self, requests: Sequence[NewRequest], records: Sequence[int] | None = None) -> list[tuple[int, bool]]:
        """Record requests all-or-nothing; returns (id, is_new) per request. A repeat returns the old id
        (a repeat of a *failed* request puts it back to pending)."""
        out: list[tuple[int, bool]] = []
        with self._transaction() as con:
            for n, req in enumerate(requests):
                if req.kind not in ("interaction", "user"):
                    raise ValueError(f"unknown request kind {req.kind!r}")
                subject = self.subject(req.kind, req.user_id, req.item_id)
                row = con.execute("SELECT id, status FROM requests WHERE subject=?", (subject,)).fetchone()
                if row is not None:
                    if row["status"] == "failed":
                        con.execute("UPDATE requests SET status='pending', error='' WHERE id=?", (row["id"],))
                    out.append((int(row["id"]), False))
                    continue
                cur = con.execute(
                    "INSERT INTO requests (kind, user_id, item_id, reason, received_at, records, subject) "
                    "VALUES (?,?,?,?,?,?,?)",
                    (
                        req.kind,
                        req.user_id,
                        req.item_id,
                        req.reason,
                        _now(),
                        int(records[n]) if records else 0,
                        subject,
                    ),
                )
                out.append((int(cur.lastrowid or 0), True))
        return out

    def get(self, ids: Sequence[int] | None = None, statuses: Sequence[str] | None = None) -> list[Request]:
        sql, args = "SELECT * FROM requests", list[object]()
        clauses = []
        if ids is not None:
            clauses.append(f"id IN ({','.join('?' * len(ids))})")
            args += list(ids)
        if statuses is not None:
            clauses.append(f"status IN ({','.join('?' * len(statuses))})")
            args += list(statuses)
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        with self._connect() as con:
            return [Request.from_row(r) for r in con.execute(sql + " ORDER BY id", args)]

    def outstanding(self) -> list[Request]:
        """Requests not yet applied: pending, applying (an interrupted apply) and failed (to retry)."""
        return self.get(statuses=["pending", "applying", "failed"])

    def mark_applying(
        self,
        shards_by_id: dict[int, list[int]],
        records_by_id: dict[int, int] | None = None,
        rebuilt_by_id: dict[int, dict[str, str]] | None = None,
    ) -> None:
        """Before any data changes: the shards each request touches, what it makes rebuild and why, and, when
        found, how many stored records it names (a count of 0 or nothing to say, as after an interrupted
        redaction, keeps what was found earlier)."""
        records_by_id, rebuilt_by_id = records_by_id or {}, rebuilt_by_id or {}
        with self._transaction() as con:
            for rid, shards in shards_by_id.items():
                n = int(records_by_id.get(rid, 0))
                why = json.dumps(rebuilt_by_id.get(rid) or {})
                con.execute(
                    "UPDATE requests SET status='applying', shards=?, error='', "
                    "records=CASE WHEN ? > 0 THEN ? ELSE records END, "
                    "rebuilt=CASE WHEN ? != '{}' THEN ? ELSE rebuilt END WHERE id=?",
                    (json.dumps(sorted(set(shards))), n, n, why, why, rid),
                )

    def mark_applied(self, ids: Sequence[int], dagster_runs: Sequence[str], mlflow_runs: Sequence[str]) -> None:
        with self._transaction() as con:
            for rid in ids:
                con.execute(
                    "UPDATE requests SET status='applied', dagster_runs=?, mlflow_runs=?, applied_at=?, "
                    "error='' WHERE id=?",
                    (json.dumps(list(dagster_runs)), json.dumps(list(mlflow_runs)), _now(), rid),
                )
        self._erase_ids(ids)  # applied: the ledger keeps no copy of what was forgotten

    def mark_failed(self, ids: Sequence[int], error: str) -> None:
        with self._transaction() as con:
            for rid in ids:
                con.execute("UPDATE requests SET status='failed', error=? WHERE id=?", (error[:2000], rid))
