"""State files (models, aggregator, serving snapshot) load without pickle: a file that would run code is
refused without running it, and a damaged file is one clear line naming it."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from receraser_core.data.interactions import DataError
from receraser_core.models import build_model, load_model
from receraser_core.state_file import checksum_path, load_state, save_state


class _RunsCode:
    """Unpickling this calls Path.touch(marker): what a planted state file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_round_trip_of_every_kind_of_leaf(tmp_path: Path) -> None:
    m = sp.random(5, 7, density=0.3, format="csr", dtype=np.float32, random_state=0)
    state = {
        "tensor": torch.arange(6.0).reshape(2, 3),
        "array": np.array([1, 5, 9], dtype=np.int64),
        "matrix": m,
        "none": None,
        "nested": {"history": [{"epoch": 1.0, "loss": 0.5}], "name": "wmf", "flag": True, "n": np.int64(3)},
    }
    save_state(tmp_path / "s.pt", state)
    back = load_state(tmp_path / "s.pt")
    assert torch.equal(back["tensor"], state["tensor"])
    assert np.array_equal(back["array"], state["array"])
    assert isinstance(back["matrix"], sp.csr_matrix) and (back["matrix"] != m).nnz == 0
    assert back["matrix"].shape == (5, 7)
    assert back["none"] is None
    assert back["nested"] == {"history": [{"epoch": 1.0, "loss": 0.5}], "name": "wmf", "flag": True, "n": 3}
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file is left behind"
    with pytest.raises(TypeError, match="cannot store a object"):
        save_state(tmp_path / "bad.pt", {"x": object()})


def test_a_file_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    planted = tmp_path / "shards" / "0" / "model.pt"
    planted.parent.mkdir(parents=True)
    torch.save({"model": "bpr", "params": _RunsCode(marker)}, planted)
    with open(tmp_path / "raw.pkl", "wb") as fh:  # the plain pickle route too
        pickle.dump(_RunsCode(marker), fh)
    for path in (planted, tmp_path / "raw.pkl"):
        with pytest.raises(DataError, match="no recorded hash") as err:  # first line of defence: no hash
            load_model(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        # whoever plants a file can plant its hash too: the restricted unpickler still refuses it
        checksum_path(path).write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")
        with pytest.raises(DataError, match="objects other than tensors") as err:
            load_model(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists(), "loading ran code from the file"
    # the same pickle loaded the unsafe way does run it: the test would catch a loader that did that
    torch.load(planted, weights_only=False)
    assert marker.exists()


def test_truncated_garbled_missing_and_foreign_files_are_one_line_errors(tmp_path: Path) -> None:
    data = sp.csr_matrix(np.eye(4, dtype=np.float32))
    for name in ("bpr", "wmf", "lightgcn"):
        model = build_model(name, 4, 4, dim=4, epochs=1)
        model.fit(data)
        path = tmp_path / name / "model.pt"
        model.save(path)
        again = load_model(path)
        assert all(torch.equal(a, b) for a, b in zip(model.embeddings(), again.embeddings(), strict=True))
        raw = path.read_bytes()
        for damaged in (raw[: len(raw) // 2], b"", b"\x00garbage" * 50):
            path.write_bytes(damaged)
            with pytest.raises(DataError) as err:
                load_model(path)
            assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="model file is missing"):
        load_model(tmp_path / "nothing.pt")
    save_state(tmp_path / "other.pt", {"something": 1})
    with pytest.raises(DataError, match="not a receraser model file"):
        load_model(tmp_path / "other.pt")


def test_a_file_changed_in_place_after_a_good_check_is_found_corrupt(tmp_path: Path) -> None:
    """Intact files are hashed once per process; a later change of their bytes (same size, same inode) is still
    caught."""
    from receraser_core.state_file import integrity, save_state

    path = tmp_path / "model.pt"
    save_state(path, {"w": torch.arange(64, dtype=torch.float32)})
    assert integrity(path) == "ok" and integrity(path) == "ok"
    raw = bytearray(path.read_bytes())
    raw[-9] ^= 0xFF
    with open(path, "r+b") as fh:  # in place: same inode, same size
        fh.write(raw)
    assert integrity(path) == "corrupt"
