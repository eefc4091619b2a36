"""The real datasets in ../shared/data: exact counts and the derived ML-1M validation remainder."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from receraser_core.data.download import derive_ml1m_validation
from receraser_core.data.readers import load_dataset
from tests.conftest import SHARED_DATA, needs_shared_data


@needs_shared_data
def test_ml1m_authors_split_counts() -> None:
    c = load_dataset("ml-1m", data_dir=SHARED_DATA).counts()
    assert (c["users"], c["items"], c["train"], c["valid"], c["test"]) == (6040, 3706, 720152, 80016, 200041)


@needs_shared_data
def test_ml1m_full_counts_and_split_proportions() -> None:
    inter = load_dataset("ml-1m-full", data_dir=SHARED_DATA, seed=0)
    c = inter.counts()
    assert (c["users"], c["items"], c["interactions"]) == (6040, 3706, 1000209)
    assert abs(c["test"] / c["interactions"] - 0.2) < 0.01
    assert abs(c["valid"] / (c["train"] + c["valid"]) - 0.1) < 0.01
    assert int(inter.user_ids[0]) == 1 and int(inter.item_ids[0]) == 1


@needs_shared_data
def test_yelp2018_counts() -> None:
    c = load_dataset("yelp2018", data_dir=SHARED_DATA, seed=0).counts()
    assert (c["users"], c["items"], c["test"]) == (31668, 38048, 324147)
    assert c["train"] + c["valid"] == c["published_train"] == 1237259
    assert abs(c["valid"] / 1237259 - 0.1) < 0.01


@needs_shared_data
def test_derived_validation_equals_the_shared_remainder(tmp_path: Path) -> None:
    root = SHARED_DATA / "ml-1m"
    out = tmp_path / "valid.txt"
    derive_ml1m_validation(
        root / "interactions.tsv.gz",
        root / "receraser_split" / "train.txt.gz",
        root / "receraser_split" / "test.txt.gz",
        out,
    )
    with gzip.open(root / "receraser_split" / "valid_inferred.txt.gz", "rt") as fh:
        expected = [np.array(line.split(), dtype=int).tolist() for line in fh if line.strip()]
    got = [np.array(line.split(), dtype=int).tolist() for line in out.read_text().splitlines()]
    assert got == expected
