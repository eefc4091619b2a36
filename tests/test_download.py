"""`receraser data fetch` against archives built here and served from loopback HTTP or file:// URLs."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from receraser_core.data.download import Source, fetch_ml1m, fetch_yelp2018
from receraser_core.data.interactions import DataError
from receraser_core.data.readers import load_dataset

RATINGS = [(1, 10), (1, 20), (1, 30), (1, 40), (2, 20), (2, 30), (2, 50), (3, 10), (3, 50), (3, 40)]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server over a folder; yields (base URL, folder)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def _build_ml1m(root: Path) -> dict[str, Source | dict]:
    ratings = "".join(f"{u}::{m}::5::97830{u}\n" for u, m in RATINGS)
    movies = "".join(f"{m}::Movie {m} (2000)::Drama\n" for m in (10, 20, 30, 40, 50))
    users = "".join(f"{u}::F::1::10::48067\n" for u in (1, 2, 3))
    with zipfile.ZipFile(root / "ml-1m.zip", "w") as zf:
        zf.writestr("ml-1m/ratings.dat", ratings)
        zf.writestr("ml-1m/movies.dat", movies)
        zf.writestr("ml-1m/users.dat", users)
    # authors' split in internal ids: user = UserID - 1, item = rank of MovieID (10->0 ... 50->4)
    train, test = "0 0 1\n1 1 2\n2 0 4\n", "0 2\n1 4\n2 3\n"
    (root / "train.txt").write_text(train)
    (root / "test.txt").write_text(test)
    tsv = "user_id\tmovie_id\n" + "".join(f"{u}\t{m}\n" for u, m in RATINGS)
    zip_md5 = hashlib.md5((root / "ml-1m.zip").read_bytes()).hexdigest()
    return {
        "zip_md5": zip_md5,  # type: ignore[dict-item]
        "converted": {
            "interactions.tsv": sha256(tsv.encode()),
            "movies.dat": sha256(movies.encode()),
            "users.dat": sha256(users.encode()),
        },
        "split": {"train": sha256(train.encode()), "test": sha256(test.encode())},
    }


def _ml1m_sources(base: str, sums: dict) -> dict:
    return {
        "archive": Source(f"{base}/ml-1m.zip", sums["zip_md5"], "md5"),
        "split": {
            "train.txt": Source(f"{base}/train.txt", sums["split"]["train"]),
            "test.txt": Source(f"{base}/test.txt", sums["split"]["test"]),
        },
        "converted_sha256": sums["converted"],
    }


def test_fetch_ml1m_over_loopback_http(served: tuple[str, Path], tmp_path: Path) -> None:
    base, root = served
    sums = _build_ml1m(root)
    data_dir = tmp_path / "data"
    fetch_ml1m(data_dir, progress=lambda _: None, **_ml1m_sources(base, sums))
    inter = load_dataset("ml-1m", data_dir=data_dir)
    c = inter.counts()
    assert (c["users"], c["items"], c["train"], c["test"], c["valid"]) == (3, 5, 6, 3, 1)
    # the validation remainder is user 1's movie 40 (item 3)
    assert inter.valid[0].indices.tolist() == [3]
    assert inter.item_ids.tolist() == [10, 20, 30, 40, 50]
    with gzip.open(data_dir / "ml-1m" / "movies.dat.gz", "rt") as fh:
        assert fh.readline().startswith("10::Movie 10")


def test_fetch_from_file_url(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "train.txt").write_text("0 1 2 3\n1 2 3 4\n")
    (www / "test.txt").write_text("0 4\n1 0\n")
    files = {
        name: Source((www / name).as_uri(), sha256((www / name).read_bytes())) for name in ("train.txt", "test.txt")
    }
    fetch_yelp2018(tmp_path / "data", files=files, progress=lambda _: None)
    inter = load_dataset("yelp2018", data_dir=tmp_path / "data")
    assert inter.counts()["published_train"] == 6 and inter.test.nnz == 2


def test_checksum_mismatch_keeps_existing_data(served: tuple[str, Path], tmp_path: Path) -> None:
    base, root = served
    sums = _build_ml1m(root)
    data_dir = tmp_path / "data"
    fetch_ml1m(data_dir, progress=lambda _: None, **_ml1m_sources(base, sums))
    before = {p: p.read_bytes() for p in sorted((data_dir / "ml-1m").rglob("*.gz"))}
    (root / "test.txt").write_text("0 2\n1 4\n2 1\n")  # tampered upstream file
    with pytest.raises(DataError, match="checksum mismatch"):
        fetch_ml1m(data_dir, progress=lambda _: None, **_ml1m_sources(base, sums))
    after = {p: p.read_bytes() for p in sorted((data_dir / "ml-1m").rglob("*.gz"))}
    assert before == after
    assert not list(data_dir.rglob(".part-*"))


def test_converted_content_is_verified(served: tuple[str, Path], tmp_path: Path) -> None:
    base, root = served
    sums = _build_ml1m(root)
    sums["converted"]["interactions.tsv"] = "0" * 64
    with pytest.raises(DataError, match="interactions.tsv: sha256 of converted file"):
        fetch_ml1m(tmp_path / "data", progress=lambda _: None, **_ml1m_sources(base, sums))
    assert not (tmp_path / "data" / "ml-1m").exists()


def test_unreachable_source_is_a_clear_error(tmp_path: Path) -> None:
    missing = Source((tmp_path / "absent.txt").as_uri(), "0" * 64)
    with pytest.raises(DataError, match="download failed"):
        fetch_yelp2018(tmp_path / "data", files={"train.txt": missing}, progress=lambda _: None)
