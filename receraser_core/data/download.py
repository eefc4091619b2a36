"""Fetch the public datasets from their original sources, verify checksums, convert to the local layout.

The layout written is the one `readers` expects (the same as ``shared/data``):

- ``ml-1m/interactions.tsv.gz``, ``ml-1m/movies.dat.gz``, ``ml-1m/users.dat.gz`` from GroupLens' ``ml-1m.zip``
- ``ml-1m/receraser_split/{train,test,valid_inferred}.txt.gz`` from the RecEraser authors' repository
- ``yelp2018/{train,test,user_list,item_list}.txt.gz`` from LightGCN's repository

Every download goes to a temporary file, is verified, and only then moved into place: a failed or
mismatching download leaves whatever was stored before untouched.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from receraser_core.data.interactions import DataError
from receraser_core.data.readers import read_adjacency

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Source:
    """One remote file: where it is and the digest it must have (``algo`` is ``sha256`` or ``md5``)."""

    url: str
    digest: str
    algo: str = "sha256"


ML1M_ZIP = Source("https://files.grouplens.org/datasets/movielens/ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906", "md5")
_UNLEARN = "https://raw.githubusercontent.com/chenchongthu/Recommendation-Unlearning/master/data/ml-1m"
_LIGHTGCN = "https://raw.githubusercontent.com/kuandeng/LightGCN/master/Data/yelp2018"

#: sha256 of the converted, uncompressed files (shared/data/README.md gives the same values).
ML1M_CONVERTED_SHA256 = {
    "interactions.tsv": "ac5f7625c955098d6b2be4c6b07d1086b7d9555a27ffa5a628796b13c367623e",
    "movies.dat": "0140fc2356357c1a851d0f52e893a1e4d3696df632c4141cea8d5bc3d621f0b9",
    "users.dat": "1dc3a95300cb19f7c10e027daf29b8cdf1d908dab65b5edfb45950aa389a10a3",
}
ML1M_SPLIT = {
    "train.txt": Source(f"{_UNLEARN}/train.txt", "c74ca36cdff687523a151f25ae24a8e93f52906d599e446625a393fdb06443d7"),
    "test.txt": Source(f"{_UNLEARN}/test.txt", "0ea4825f0016fffc2b44329ef3617efbf6a3c3ba6e145c48b7a8b46b7313d5c5"),
}
YELP2018 = {
    "train.txt": Source(f"{_LIGHTGCN}/train.txt", "1e9568725a9e833d0ac3bae01c94cd95367f73b3bb6104fd26b5f65ea5054093"),
    "test.txt": Source(f"{_LIGHTGCN}/test.txt", "9cd9b37926cd1447a06625ffa7914527573fb097c10cb0bbdb1d1b8ded3742fe"),
    "user_list.txt": Source(
        f"{_LIGHTGCN}/user_list.txt", "4931519d8b3c40d71a34cc386c3287b6d63c1be9a82edd7ee6bfad765e640778"
    ),
    "item_list.txt": Source(
        f"{_LIGHTGCN}/item_list.txt", "1091bc824b60561906df552f2f7cb3ec61767b1e46fd4386b44400ae49712007"
    ),
}


def file_digest(path: Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(source: Source, dest: Path, progress: Progress = print) -> Path:
    """Download ``source`` to ``dest`` (plain, not compressed) and verify its digest before keeping it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    progress(f"downloading {source.url}")
    with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=".part-", delete=False) as tmp:
        tmp_path = Path(tmp.name)
        try:
            with urllib.request.urlopen(source.url, timeout=120) as resp:
                shutil.copyfileobj(resp, tmp)
        except OSError as exc:
            tmp_path.unlink(missing_ok=True)
            raise DataError(f"{source.url}: download failed: {exc}") from None
    got = file_digest(tmp_path, source.algo)
    if got != source.digest:
        tmp_path.unlink(missing_ok=True)
        raise DataError(f"{source.url}: {source.algo} checksum mismatch: expected {source.digest}, got {got}")
    tmp_path.replace(dest)
    return dest


def _gzip_into(src: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".part")
    with open(src, "rb") as fin, gzip.GzipFile(tmp, "wb", compresslevel=9, mtime=0) as fout:
        shutil.copyfileobj(fin, fout)
    tmp.replace(dest)


def _verify(path: Path, expected: str | None) -> None:
    if expected is None:
        return
    got = file_digest(path)
    if got != expected:
        raise DataError(f"{path.name}: sha256 of converted file is {got}, expected {expected}")


def convert_ml1m_zip(zip_path: Path, work: Path, expected: dict[str, str] | None) -> dict[str, Path]:
    """Turn GroupLens' ml-1m.zip into plain interactions.tsv / movies.dat / users.dat in ``work``."""
    out: dict[str, Path] = {}
    with zipfile.ZipFile(zip_path) as zf:
        names = {Path(n).name: n for n in zf.namelist()}
        for needed in ("ratings.dat", "movies.dat", "users.dat"):
            if needed not in names:
                raise DataError(f"{zip_path}: archive has no {needed}")
        ratings = zf.read(names["ratings.dat"]).decode("latin-1").splitlines()
        rows = [line.split("::", 2)[:2] for line in ratings if line]
        tsv = work / "interactions.tsv"
        tsv.write_text("user_id\tmovie_id\n" + "".join(f"{u}\t{m}\n" for u, m in rows), encoding="utf-8")
        out["interactions.tsv"] = tsv
        for side in ("movies.dat", "users.dat"):
            (work / side).write_bytes(zf.read(names[side]))
            out[side] = work / side
    for name, path in out.items():
        _verify(path, (expected or {}).get(name))
    return out


def derive_ml1m_validation(inter_tsv: Path, train: Path, test: Path, dest: Path) -> None:
    """valid_inferred.txt: each user's ML-1M interactions that are in neither the authors' train nor test."""
    full = pd.read_csv(inter_tsv, sep="\t")
    uid = full["user_id"].to_numpy(dtype=np.int64) - 1
    item_ids = np.unique(full["movie_id"].to_numpy(dtype=np.int64))
    iid = np.searchsorted(item_ids, full["movie_id"].to_numpy(dtype=np.int64))
    n_items = len(item_ids)
    seen = set()
    for path in (train, test):
        u, i = read_adjacency(path)
        seen.update((u * n_items + i).tolist())
    keys = uid * n_items + iid
    rest = np.array([k not in seen for k in keys.tolist()], dtype=bool)
    order = np.lexsort((iid[rest], uid[rest]))
    ru, ri = uid[rest][order], iid[rest][order]
    if len(ru) == 0:
        raise DataError(f"{inter_tsv}: train and test already cover every interaction; no validation remainder")
    starts = np.flatnonzero(np.r_[True, ru[1:] != ru[:-1]])
    lines = [
        " ".join(map(str, [int(g_u), *g_i.tolist()]))
        for g_u, g_i in zip(ru[starts], np.split(ri, starts[1:]), strict=True)
    ]
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")


def fetch_ml1m(
    data_dir: Path,
    archive: Source = ML1M_ZIP,
    split: dict[str, Source] | None = None,
    converted_sha256: dict[str, str] | None = None,
    progress: Progress = print,
) -> Path:
    """Download and convert MovieLens-1M and the authors' split into ``data_dir/ml-1m``."""
    split = ML1M_SPLIT if split is None else split
    expected = ML1M_CONVERTED_SHA256 if converted_sha256 is None else converted_sha256
    root = data_dir / "ml-1m"
    with tempfile.TemporaryDirectory(prefix="receraser-fetch-") as tmpdir:
        work = Path(tmpdir)
        zip_path = download(archive, work / "ml-1m.zip", progress)
        converted = convert_ml1m_zip(zip_path, work, expected)
        for name, src in split.items():
            converted[name] = download(src, work / name, progress)
        derive_ml1m_validation(
            converted["interactions.tsv"], converted["train.txt"], converted["test.txt"], work / "valid_inferred.txt"
        )
        converted["valid_inferred.txt"] = work / "valid_inferred.txt"
        # everything verified: only now write into the data directory
        (root / "receraser_split").mkdir(parents=True, exist_ok=True)
        for name, path in converted.items():
            sub = "receraser_split/" if name.endswith(".txt") else ""
            _gzip_into(path, root / f"{sub}{name}.gz")
    progress(f"MovieLens-1M written to {root}")
    return root


def fetch_yelp2018(data_dir: Path, files: dict[str, Source] | None = None, progress: Progress = print) -> Path:
    """Download LightGCN's Yelp2018 files into ``data_dir/yelp2018``."""
    files = YELP2018 if files is None else files
    root = data_dir / "yelp2018"
    with tempfile.TemporaryDirectory(prefix="receraser-fetch-") as tmpdir:
        work = Path(tmpdir)
        got = {name: download(src, work / name, progress) for name, src in files.items()}
        root.mkdir(parents=True, exist_ok=True)
        for name, path in got.items():
            _gzip_into(path, root / f"{name}.gz")
    progress(f"Yelp2018 written to {root}")
    return root


FETCHERS: dict[str, Callable[..., Path]] = {"ml-1m": fetch_ml1m, "yelp2018": fetch_yelp2018}
