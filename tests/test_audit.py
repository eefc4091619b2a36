"""`bench audit`: ranks of deleted records and the membership-inference AUC."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from pipelines.audit import auc, bootstrap_auc, interval, pair_ranks
from tests.test_dagster import _cli, _env


def test_pair_ranks_mask_the_other_training_items_only() -> None:
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    train = sp.csr_matrix(np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=np.float32))
    got_scores, ranks = pair_ranks(lambda users: scores[users], train, np.array([0, 0, 1, 1]), np.array([1, 2, 4, 0]))
    # user 0: item 1 (trained) keeps its place behind nothing once item 0 is masked; item 2 is behind nothing
    # either (items 0 and 1 masked); user 1: item 4 (trained, the pair itself) is on top; item 0 is last
    assert ranks.tolist() == [1, 1, 1, 4] and got_scores.tolist() == [4.0, 3.0, 5.0, 1.0]


def test_auc_and_its_bootstrap() -> None:
    assert auc(np.array([3.0, 2.0]), np.array([1.0, 0.0])) == 1.0
    assert auc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    assert auc(np.array([0.0, 2.0]), np.array([1.0, 3.0])) == 0.25
    rng = np.random.default_rng(0)
    members, others = {"m": rng.normal(1, 1, 300)}, {"m": rng.normal(0, 1, 300)}
    lo, hi = interval(bootstrap_auc(members, others, seed=1, rounds=200)["m"])
    assert lo < auc(members["m"], others["m"]) < hi and 0.6 < lo < hi < 0.85  # true AUC of N(1,1) vs N(0,1): 0.76


def test_bench_audit_end_to_end(tmp_path: Path) -> None:
    env = _env(tmp_path)
    out = tmp_path / "audit.json"
    args = ["bench", "audit", "--requests", "6", "--retrain-seeds", "2", "--sample-seed", "3", "--json", str(out)]
    proc = _cli([*args, "--state-dir", env["RECERASER_HOME"]], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert set(record["models"]) == {"before", "after", "retrain seed 0", "retrain seed 1"}
    for model in record["models"].values():
        lo, hi = model["mia_auc_ci95"]
        assert 0.0 <= lo <= model["mia_auc"] <= hi <= 1.0
    assert all(len(r) == 6 and min(r) >= 1 for r in record["ranks_deleted"].values())
    assert isinstance(record["indistinguishable_from_retrain"], bool) and "membership-inference AUC" in proc.stdout
    status = json.loads(_cli(["status", "--json"], env).stdout)["requests"]
    assert len(status) == 6 and {r["status"] for r in status} == {"applied"}
