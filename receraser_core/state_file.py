"""Pickle-free state files for models, aggregators and the serving snapshot, and content hashes for every
file the pipeline writes.

Every artifact is moved into place by `seal`, which records the SHA-256 of its content in ``<file>.sha256``
beside it; `check` compares before a file is read, so a truncated or altered file is reported by name instead
of being read. A file without a hash (written by a version that kept none, possibly as a pickle) counts as
unverified: it is not read, and `receraser run` rebuilds it.

A state is a nested structure of dicts and lists whose leaves are torch tensors, numpy arrays, scipy sparse
matrices or JSON values (str, int, float, bool, None). Arrays and sparse matrices are stored as tensors, so
the file holds nothing but tensors and plain containers, and it is read back with
``torch.load(weights_only=True)``: torch's restricted unpickler, which refuses any other object and so never
runs code from the file. A missing, truncated or foreign file raises one `DataError` line naming the path.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from receraser_core.data.interactions import DataError

_ARRAY, _CSR = "__ndarray__", "__csr_matrix__"


def _encode(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.ndarray):
        return {_ARRAY: torch.from_numpy(np.ascontiguousarray(obj))}
    if sp.issparse(obj):
        m = sp.csr_matrix(obj)
        return {
            _CSR: [int(m.shape[0]), int(m.shape[1])],
            "indptr": torch.from_numpy(m.indptr.astype(np.int64)),
            "indices": torch.from_numpy(m.indices.astype(np.int64)),
            "data": torch.from_numpy(np.ascontiguousarray(m.data)),
        }
    if isinstance(obj, dict):
        return {str(k): _encode(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_encode(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a state file")


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if _ARRAY in obj:
            return obj[_ARRAY].numpy()
        if _CSR in obj:
            parts = (obj["data"].numpy(), obj["indices"].numpy().astype(np.int32), obj["indptr"].numpy())
            return sp.csr_matrix(parts, shape=tuple(obj[_CSR]))
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def checksum_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".sha256")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def seal(tmp: Path, path: Path) -> None:
    """Move the finished temporary file ``tmp`` to ``path`` and record its content hash beside it. A crash
    between the two renames leaves a hash that does not match: the file then counts as corrupt and is rebuilt."""
    digest = _digest(tmp)
    os.replace(tmp, path)
    side = checksum_path(path)
    side_tmp = side.with_name(f".{side.name}.tmp{os.getpid()}")
    side_tmp.write_text(digest + "\n")
    os.replace(side_tmp, side)


#: files found intact in this process, by (path, and the identity, size and change time of the file and of its
#: hash file): a file rewritten (a new inode by rename, or new bytes in place) no longer matches and is hashed again
_VERIFIED: dict[tuple[Any, ...], None] = {}


def _identity(path: Path, side: Path) -> tuple[Any, ...]:
    a, b = path.stat(), side.stat()
    return (str(path), a.st_ino, a.st_size, a.st_mtime_ns, a.st_ctime_ns, b.st_ino, b.st_mtime_ns, b.st_ctime_ns)


def integrity(path: Path) -> str:
    """'ok', 'missing', 'unverified' (no hash recorded: an older version wrote it) or 'corrupt' (content
    differs from the hash recorded when it was written). An intact file is hashed once per process while it
    stays the same file (a deletion reads the interactions and shard files about ten times)."""
    path = Path(path)
    if not path.exists():
        return "missing"
    side = checksum_path(path)
    if not path.is_file():
        return "corrupt"
    if not side.exists():
        return "unverified"
    key = _identity(path, side)
    if key in _VERIFIED:
        return "ok"
    if side.read_text().strip() != _digest(path):
        return "corrupt"
    _VERIFIED[key] = None
    return "ok"


def check(path: Path, what: str) -> None:
    """Raise one `DataError` line naming ``path`` if it is missing or not what was written."""
    state = integrity(path)
    if state == "missing":
        raise DataError(f"{path}: {what} is missing; `receraser run` rebuilds it")
    if state == "corrupt":
        raise DataError(
            f"{path}: {what} is corrupt (its content differs from the hash recorded when it was written); "
            "`receraser run` rebuilds it"
        )
    if state == "unverified":
        raise DataError(
            f"{path}: {what} has no recorded hash (an older receraser wrote it); `receraser run` rebuilds it"
        )


def save_state(path: Path, state: Any) -> None:
    """Write ``state`` to ``path`` atomically (a temporary file, flushed to disk, then renamed) with its hash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(_encode(state), fh)
        fh.flush()
        os.fsync(fh.fileno())
    seal(tmp, path)


def load_state(path: Path, what: str = "state file") -> Any:
    """Read a file written by `save_state`; any other content (a pickle of other objects, a truncated or
    garbled file) is refused with one line naming the file, without running anything from it."""
    path = Path(path)
    check(path, what)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError ... depending on the damage
        text = " ".join(str(exc).split())
        if "weights_only" in text or "Unsupported global" in text:
            reason = "it holds objects other than tensors and plain values (not written by this receraser version)"
        else:
            reason = f"truncated or damaged ({text.split('. ')[0][:120] or type(exc).__name__})"
        raise DataError(f"{path}: cannot read this {what}: {reason}; rebuild with `receraser run --rebuild`") from None
    return _decode(state)
