"""Readers, the split protocol and bad-input errors, on small files written by the tests."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from receraser_core.data.interactions import DataError, csr_fingerprint, csr_to_pairs, pairs_to_csr
from receraser_core.data.readers import load_dataset, read_adjacency
from receraser_core.data.split import carve_validation, protocol_split


def _pairs(n_users: int = 50, per_user: int = 11, n_items: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user)
    items = np.concatenate([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)])
    return users, items


def test_protocol_split_partitions_rows_per_user() -> None:
    users, items = _pairs()
    train, valid, test = protocol_split(users, items, seed=7)
    assert np.all(train.astype(int) + valid.astype(int) + test.astype(int) == 1)
    for u in range(50):
        rows = users == u
        assert test[rows].sum() == 2  # round(0.2 * 11)
        assert valid[rows].sum() == 1  # round(0.1 * 9)
        assert train[rows].sum() == 8


def test_protocol_split_is_seeded() -> None:
    users, items = _pairs()
    a = protocol_split(users, items, seed=1)
    b = protocol_split(users, items, seed=1)
    c = protocol_split(users, items, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[2], c[2])


def test_every_user_keeps_a_training_interaction() -> None:
    users = np.array([0, 1, 1, 2, 2, 2])
    train, _, _ = protocol_split(users, np.arange(6), seed=0, test_frac=0.9, valid_frac=0.9)
    assert set(users[train]) == {0, 1, 2}
    assert carve_validation(np.array([0, 0, 0, 0]), seed=0, valid_frac=0.99).sum() == 3


def test_csr_helpers_round_trip() -> None:
    m = pairs_to_csr(np.array([2, 0, 0, 2]), np.array([1, 3, 3, 0]), 3, 4)
    assert m.nnz == 3 and m.data.tolist() == [1.0, 1.0, 1.0]
    u, i = csr_to_pairs(m)
    assert list(zip(u.tolist(), i.tolist(), strict=True)) == [(0, 3), (2, 0), (2, 1)]
    assert csr_fingerprint(m) == csr_fingerprint(pairs_to_csr(u, i, 3, 4))
    assert csr_fingerprint(m) != csr_fingerprint(pairs_to_csr(u[:2], i[:2], 3, 4))


def test_csv_and_parquet_tables(tmp_path: Path) -> None:
    users, items = _pairs(n_users=20)
    df = pd.DataFrame({"uid": [f"u{u}" for u in users], "iid": items + 1000})
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_parquet(tmp_path / "t.parquet")
    a = load_dataset(f"csv:{tmp_path / 't.csv'}", seed=3, user_col="uid", item_col="iid")
    b = load_dataset(f"parquet:{tmp_path / 't.parquet'}", seed=3, user_col="uid", item_col="iid")
    assert a.n_users == 20 and a.counts()["interactions"] == len(df)
    assert csr_fingerprint(a.test) == csr_fingerprint(b.test)
    assert a.user_index("u3") == list(a.user_ids).index("u3")
    assert int(a.item_ids[a.item_index(1005)]) == 1005
    with pytest.raises(KeyError, match="unknown user id 'nobody'"):
        a.user_index("nobody")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("user,item\n", "no rows"),
        ("a,b\n1,2\n", "missing column"),
        ("user,item\n1,2\n,3\n", r"t.csv:3: empty user or item id"),
    ],
)
def test_bad_tables(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "t.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        load_dataset(f"csv:{tmp_path / 't.csv'}")


def test_missing_file_and_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        load_dataset(f"csv:{tmp_path / 'nope.csv'}")
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("ml-100k")
    with pytest.raises(DataError, match="file not found"):
        load_dataset("yelp2018", data_dir=tmp_path)
    for name, fetch in (("ml-1m", "ml-1m"), ("ml-1m-full", "ml-1m"), ("yelp2018", "yelp2018")):
        with pytest.raises(DataError, match=f"receraser data fetch {fetch}") as err:  # says how to get it
            load_dataset(name, data_dir=tmp_path)
        assert "\n" not in str(err.value)


def test_adjacency_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.txt.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("0 1 2\n1 3 x4\n")
    with pytest.raises(DataError, match=r"train.txt.gz:2: non-integer id 'x4'"):
        read_adjacency(path)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="no interactions"):
        read_adjacency(tmp_path / "empty.txt")


def _write_adj(path: Path, rows: dict[int, list[int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(" ".join(map(str, [u, *items])) + "\n" for u, items in rows.items()))


def test_yelp_layout_reader(tmp_path: Path) -> None:
    root = tmp_path / "yelp2018"
    _write_adj(root / "train.txt", {u: list(range(u, u + 10)) for u in range(6)})
    _write_adj(root / "test.txt", {u: [u + 20] for u in range(6)})
    inter = load_dataset("yelp2018", data_dir=tmp_path, seed=0)
    c = inter.counts()
    assert (c["users"], c["items"], c["train"] + c["valid"], c["test"]) == (6, 26, 60, 6)
    assert c["valid"] == 6 and c["published_train"] == 60


def test_user_with_test_but_no_training_interaction_is_rejected(tmp_path: Path) -> None:
    root = tmp_path / "yelp2018"
    _write_adj(root / "train.txt", {0: [1, 2, 3]})
    _write_adj(root / "test.txt", {0: [4], 1: [5]})
    with pytest.raises(DataError, match="user 1 .* no training interaction"):
        load_dataset("yelp2018", data_dir=tmp_path)


def test_overlapping_splits_are_rejected(tmp_path: Path) -> None:
    root = tmp_path / "yelp2018"
    _write_adj(root / "train.txt", {0: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]})
    _write_adj(root / "test.txt", {0: [10]})
    with pytest.raises(DataError, match="in both (train|valid) and test"):
        load_dataset("yelp2018", data_dir=tmp_path, seed=0)
