"""Dataset readers: one per format, each returning an `Interactions`.

Dataset names (``load_dataset``):

- ``ml-1m``       the RecEraser authors' MovieLens-1M split (``ml-1m/receraser_split/``): train 720,152,
                  validation 80,016 (the remainder of the full data), test 200,041; 6,040 users, 3,706 items.
- ``ml-1m-full``  all 1,000,209 MovieLens-1M interactions with the seeded protocol split.
- ``yelp2018``    LightGCN's Yelp2018 train / test; validation is a seeded 10% of train.
- ``csv:PATH`` / ``parquet:PATH``  any table with user and item columns, seeded protocol split.

Files are looked up under a data directory (`default_data_dir`) laid out like ``shared/data``.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from receraser_core.data.interactions import DataError, Interactions, check_disjoint, pairs_to_csr
from receraser_core.data.split import carve_validation, protocol_split

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def default_data_dir() -> Path:
    """``$RECERASER_DATA_DIR``, else ``../shared/data`` beside the checkout, else a user cache dir."""
    env = os.environ.get("RECERASER_DATA_DIR")
    if env:
        return Path(env).expanduser()
    for candidate in (PROJECT_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "receraser" / "data"


def _open_text(path: Path) -> IO[str]:
    if not path.exists():
        raise DataError(f"{path}: file not found (set RECERASER_DATA_DIR or run `receraser data fetch`)")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _resolve(path: Path) -> Path:
    """``path`` if it exists, else ``path.gz`` if that exists, else ``path`` (for the error message)."""
    if path.exists():
        return path
    gz = path.with_name(path.name + ".gz")
    return gz if gz.exists() else path


def _adjacency_lines(path: Path) -> Iterator[tuple[int, list[int]]]:
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            tokens = line.split()
            if not tokens:
                continue
            try:
                ids = [int(t) for t in tokens]
            except ValueError:
                bad = next(t for t in tokens if not t.lstrip("-").isdigit())
                raise DataError(f"{path}:{lineno}: non-integer id {bad!r} in adjacency list") from None
            if min(ids) < 0:
                raise DataError(f"{path}:{lineno}: negative id in adjacency list")
            yield lineno, ids


def read_adjacency(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a LightGCN-style adjacency file (``user item item ...`` per line) into (users, items) arrays."""
    path = _resolve(path)
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    for _, ids in _adjacency_lines(path):
        row = np.asarray(ids[1:], dtype=np.int64)
        users.append(np.full(len(row), ids[0], dtype=np.int64))
        items.append(row)
    if not users or sum(len(r) for r in items) == 0:
        raise DataError(f"{path}: no interactions in file")
    return np.concatenate(users), np.concatenate(items)


def read_table(path: Path, user_col: str = "user", item_col: str = "item", sep: str | None = None) -> pd.DataFrame:
    """Read a CSV / TSV / Parquet table and return its (user, item) columns, checked for the basics."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        if path.suffix == ".parquet" or path.name.endswith(".parquet.gz"):
            df = pd.read_parquet(path)
        else:
            if sep is None:
                sep = "\t" if ".tsv" in path.name else ","
            df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: cannot read table: {exc}") from None
    missing = [c for c in (user_col, item_col) if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))}; "
            f"found {', '.join(map(repr, df.columns))} "
            "(name yours in the dataset: csv:PATH?user=COLUMN&item=COLUMN, same for parquet:)"
        )
    df = df[[user_col, item_col]]
    if len(df) == 0:
        raise DataError(f"{path}: table has no rows")
    blank = (df[user_col].astype(str).str.strip() == "") | (df[item_col].astype(str).str.strip() == "")
    if blank.any():
        line = int(np.flatnonzero(blank.to_numpy())[0]) + 2  # 1-based, after the header
        raise DataError(f"{path}:{line}: empty user or item id")
    return df.rename(columns={user_col: "user", item_col: "item"})


def _encode(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Map original ids to 0..n-1 by sorted order; integer-looking ids sort numerically."""
    as_num = pd.to_numeric(values, errors="coerce")
    if not as_num.isna().any():
        uniques, codes = np.unique(as_num.to_numpy(dtype=np.int64), return_inverse=True)
    else:
        uniques, codes = np.unique(values.astype(str).to_numpy(), return_inverse=True)
    return codes.astype(np.int64), uniques


def _from_masks(
    name: str,
    users: np.ndarray,
    items: np.ndarray,
    masks: tuple[np.ndarray, np.ndarray, np.ndarray],
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    meta: dict[str, Any],
) -> Interactions:
    n_u, n_i = len(user_ids), len(item_ids)
    train, valid, test = (pairs_to_csr(users[m], items[m], n_u, n_i) for m in masks)
    return Interactions(name, train, valid, test, user_ids, item_ids, meta)


def _check_train_coverage(inter: Interactions, source: str) -> None:
    has_train = np.diff(inter.train.indptr) > 0
    needs = (np.diff(inter.test.indptr) > 0) | (np.diff(inter.valid.indptr) > 0)
    orphans = np.flatnonzero(needs & ~has_train)
    if len(orphans):
        raise DataError(
            f"{source}: user {inter.user_ids[orphans[0]]} (and {len(orphans) - 1} more) has validation or "
            "test interactions but no training interaction"
        )


def load_table_dataset(
    spec: str,
    path: Path,
    seed: int = 0,
    user_col: str = "user",
    item_col: str = "item",
    sep: str | None = None,
) -> Interactions:
    """A user-supplied table with the seeded protocol split (80/20, then 10% of train as validation)."""
    df = read_table(path, user_col, item_col, sep).drop_duplicates()
    users, user_ids = _encode(df["user"])
    items, item_ids = _encode(df["item"])
    masks = protocol_split(users, items, seed)
    meta = {"source": str(path), "split": f"protocol(seed={seed})"}
    return _from_masks(spec, users, items, masks, user_ids, item_ids, meta)


def load_ml1m_full(data_dir: Path, seed: int = 0) -> Interactions:
    """All of MovieLens-1M with the seeded protocol split; ids are UserID / MovieID."""
    path = _resolve(data_dir / "ml-1m" / "interactions.tsv")
    inter = load_table_dataset("ml-1m-full", path, seed, user_col="user_id", item_col="movie_id", sep="\t")
    return Interactions(
        inter.name,
        inter.train,
        inter.valid,
        inter.test,
        inter.user_ids,
        inter.item_ids,
        {**inter.meta, "titles": str(_resolve(data_dir / "ml-1m" / "movies.dat"))},
    )


def load_ml1m_authors(data_dir: Path) -> Interactions:
    """The RecEraser authors' ML-1M split. user = UserID - 1, item = rank of MovieID among rated movies."""
    root = data_dir / "ml-1m"
    full = read_table(_resolve(root / "interactions.tsv"), "user_id", "movie_id", sep="\t")
    user_ids = np.unique(full["user"].to_numpy(dtype=np.int64))
    item_ids = np.unique(full["item"].to_numpy(dtype=np.int64))
    split_dir = root / "receraser_split"
    parts = {}
    for part, fname in (("train", "train.txt"), ("valid", "valid_inferred.txt"), ("test", "test.txt")):
        path = _resolve(split_dir / fname)
        u, i = read_adjacency(path)
        if u.max() >= len(user_ids) or i.max() >= len(item_ids):
            raise DataError(f"{path}: ids outside the ML-1M id space ({len(user_ids)} users, {len(item_ids)} items)")
        parts[part] = pairs_to_csr(u, i, len(user_ids), len(item_ids))
    meta = {"source": str(split_dir), "split": "RecEraser authors' split", "titles": str(_resolve(root / "movies.dat"))}
    inter = Interactions("ml-1m", parts["train"], parts["valid"], parts["test"], user_ids, item_ids, meta)
    check_disjoint(inter)
    _check_train_coverage(inter, str(split_dir))
    return inter


def _id_list(path: Path, expected: int) -> np.ndarray:
    """Original ids from a LightGCN ``org_id remap_id`` list, or 0..n-1 if the list is absent."""
    path = _resolve(path)
    if not path.exists():
        return np.arange(expected)
    df = pd.read_csv(path, sep=" ", dtype=str)
    if list(df.columns) != ["org_id", "remap_id"]:
        raise DataError(f"{path}: expected header 'org_id remap_id', found {' '.join(df.columns)!r}")
    ids = np.empty(len(df), dtype=object)
    ids[df["remap_id"].astype(np.int64).to_numpy()] = df["org_id"].to_numpy()
    return ids.astype(str)


def load_yelp2018(data_dir: Path, seed: int = 0) -> Interactions:
    """LightGCN's Yelp2018 split; validation carved from train (seeded 10% per user)."""
    root = data_dir / "yelp2018"
    tr_u, tr_i = read_adjacency(root / "train.txt")
    te_u, te_i = read_adjacency(root / "test.txt")
    n_users = int(max(tr_u.max(), te_u.max())) + 1
    n_items = int(max(tr_i.max(), te_i.max())) + 1
    user_ids = _id_list(root / "user_list.txt", n_users)
    item_ids = _id_list(root / "item_list.txt", n_items)
    n_users, n_items = max(n_users, len(user_ids)), max(n_items, len(item_ids))
    to_valid = carve_validation(tr_u, seed)
    test = pairs_to_csr(te_u, te_i, n_users, n_items)
    train = pairs_to_csr(tr_u[~to_valid], tr_i[~to_valid], n_users, n_items)
    valid = pairs_to_csr(tr_u[to_valid], tr_i[to_valid], n_users, n_items)
    meta = {
        "source": str(root),
        "split": f"LightGCN train/test, valid carved from train (seed={seed})",
        "published_train": len(tr_u),
    }
    inter = Interactions("yelp2018", train, valid, test, user_ids, item_ids, meta)
    check_disjoint(inter)
    _check_train_coverage(inter, str(root))
    return inter


@dataclass(frozen=True)
class DatasetSpec:
    """Parsed dataset name: a built-in name, or ``csv:PATH`` / ``parquet:PATH``, optionally naming the columns
    as ``csv:PATH?user=COL&item=COL`` (so that every command, ``run`` included, can read any table)."""

    name: str
    path: Path | None = None
    user_col: str | None = None
    item_col: str | None = None


BUILTIN = ("ml-1m", "ml-1m-full", "yelp2018")


def parse_dataset(spec: str) -> DatasetSpec:
    if spec in BUILTIN:
        return DatasetSpec(spec)
    kind, sep, rest = spec.partition(":")
    path, _, query = rest.partition("?")
    if sep and kind in ("csv", "parquet") and path:
        cols = {}
        for part in filter(None, query.split("&")):
            key, eq, value = part.partition("=")
            if key not in ("user", "item") or not eq or not value:
                raise DataError(f"dataset {spec!r}: after '?' only user=COLUMN and item=COLUMN, got {part!r}")
            cols[key] = value
        return DatasetSpec(kind, Path(path), cols.get("user"), cols.get("item"))
    raise DataError(f"unknown dataset {spec!r}: use one of {', '.join(BUILTIN)}, csv:PATH or parquet:PATH")


def load_dataset(
    spec: str,
    data_dir: Path | None = None,
    seed: int = 0,
    user_col: str = "user",
    item_col: str = "item",
) -> Interactions:
    """Load a dataset by name (see module docstring). ``seed`` drives the protocol / validation split."""
    parsed = parse_dataset(spec)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    builtin = {
        "ml-1m": lambda: load_ml1m_authors(root),
        "ml-1m-full": lambda: load_ml1m_full(root, seed),
        "yelp2018": lambda: load_yelp2018(root, seed),
    }
    if parsed.name in builtin:
        try:
            return builtin[parsed.name]()
        except DataError as exc:
            if "file not found" not in str(exc):
                raise
            fetch = "yelp2018" if parsed.name == "yelp2018" else "ml-1m"
            where = str(exc).split(": file not found")[0]
            raise DataError(
                f"{where}: file not found: get the data with `receraser data fetch {fetch}` (or point "
                "RECERASER_DATA_DIR / --data-dir at a copy)"
            ) from None
    assert parsed.path is not None
    return load_table_dataset(spec, parsed.path, seed, parsed.user_col or user_col, parsed.item_col or item_col)


def load_titles(inter: Interactions) -> dict[int, str]:
    """Internal item index -> title, for datasets that ship them (MovieLens); empty dict otherwise."""
    titles_path = inter.meta.get("titles")
    if not titles_path or not Path(str(titles_path)).exists():
        return {}
    path = Path(str(titles_path))
    opener = gzip.open if path.suffix == ".gz" else open
    by_movie: dict[int, str] = {}
    with opener(path, "rt", encoding="latin-1") as fh:
        for line in fh:
            movie_id, title, _ = line.rstrip("\n").split("::", 2)
            by_movie[int(movie_id)] = title
    return {i: by_movie.get(int(mid), str(mid)) for i, mid in enumerate(inter.item_ids)}
