"""`receraser data synth`: seeded, shaped like MovieLens-10M, and learnable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.retrain import model_config, retrain
from receraser_core.data.readers import load_dataset
from receraser_core.data.synth import SynthConfig, synthesize
from receraser_core.metrics import evaluate, popularity_scores
from tests.test_dagster import _cli, _env

SMALL = SynthConfig(interactions=40_000, seed=3, users=1_500, items=600)


def test_same_seed_same_table_and_the_requested_shape() -> None:
    users, items = synthesize(SMALL)
    again_u, again_i = synthesize(SMALL)
    assert np.array_equal(users, again_u) and np.array_equal(items, again_i)
    other_u, other_i = synthesize(SynthConfig(**{**SMALL.__dict__, "seed": 4}))
    assert not np.array_equal(items, other_i)
    assert len(users) == SMALL.interactions and users.max() < SMALL.users and items.max() < SMALL.items
    assert len(np.unique(users * SMALL.items + items)) == len(users)  # distinct pairs
    per_user = np.bincount(users, minlength=SMALL.users)
    assert per_user.min() >= SMALL.min_per_user and per_user.max() <= SMALL.items // 2
    assert per_user.max() > 8 * np.median(per_user)  # heavy-tailed activity
    per_item = np.sort(np.bincount(items, minlength=SMALL.items))[::-1]
    assert per_item[: SMALL.items // 10].sum() > 0.2 * len(items)  # the top 10% of items: over twice their share


def test_models_learn_it_well_above_popularity(tmp_path: Path) -> None:
    import pandas as pd

    users, items = synthesize(SMALL)
    path = tmp_path / "synth.parquet"
    pd.DataFrame({"user": users, "item": items}).to_parquet(path, index=False)
    inter = load_dataset(f"parquet:{path}")
    res = retrain(inter, "wmf", model_config("wmf", inter.name, {"dim": 16, "epochs": 10}))
    popular = evaluate(popularity_scores(inter.train), inter.train, inter.test)
    assert res.metrics["recall@20"] > 1.5 * popular["recall@20"], (res.metrics["recall@20"], popular["recall@20"])


def test_cli_writes_the_table_and_refuses_what_cannot_fit(tmp_path: Path) -> None:
    env = _env(tmp_path)
    out = tmp_path / "t.parquet"
    args = ["data", "synth", "--interactions", "5000", "--users", "300", "--items", "200", "--seed", "1"]
    ok = _cli([*args, "--out", str(out)], env)
    assert ok.returncode == 0 and f"parquet:{out}" in ok.stdout, ok.stderr
    info = _cli(["data", "info", f"parquet:{out}"], env)
    assert info.returncode == 0 and "5,000" in info.stdout
    bad = _cli(["data", "synth", "--interactions", "10", "--users", "300"], env)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "do not fit" in bad.stderr


@pytest.mark.parametrize("n", [0, -5])
def test_config_rejects_empty_tables(n: int) -> None:
    with pytest.raises(ValueError, match="do not fit"):
        SynthConfig(interactions=n, users=10, items=10).check()
