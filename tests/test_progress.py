"""Progress on long work: each partition iteration and each epoch reaches the terminal logger and the Dagster
run log, with the time left at most when the loop's length is known."""

from __future__ import annotations

import logging
import re
import time

import numpy as np
import pytest

from pipelines.steps import PROGRESS, progress
from receraser_core.partition import PARTITIONERS
from tests.conftest import block_interactions


def test_progress_lines_go_to_both_sinks_with_the_time_left(caplog: pytest.LogCaptureFixture) -> None:
    run_log: list[str] = []
    with (
        caplog.at_level(logging.INFO, logger=PROGRESS.name),
        progress("shard 3", 10, log=run_log.append, every=0) as cb,
    ):
        for epoch in (1, 2, 3):
            cb({"epoch": epoch, "valid_recall@10": 0.1 * epoch, "seconds": 0.0})
    assert len(run_log) == 3 and run_log == [r.getMessage() for r in caplog.records if r.name == PROGRESS.name]
    assert run_log[-1].startswith("shard 3: epoch 3 of at most 10, valid Recall@10 0.3000 (")
    assert "left)" in run_log[-1]
    slow: list[str] = []
    with progress("partition inbp", 20, "iteration", slow.append, every=0) as cb:
        time.sleep(1.1)
        cb({"iteration": 4, "moved": 10})  # 1.1 s for 4 of 20: about 4.4 s more at most
    (line,) = slow
    m = re.fullmatch(r"partition inbp: iteration 4 of at most 20 \((00:\d\d), at most (00:\d\d) left\)", line)
    assert m is not None, line
    assert m.group(1) != "00:00" and int(m.group(2)[3:]) >= 4  # elapsed, and 4 times it left
    quiet: list[str] = []
    with progress("aggregator", 10, log=quiet.append) as cb:  # a loop shorter than 5 s says nothing
        cb({"epoch": 1})
    assert quiet == []


@pytest.mark.parametrize("method", ["inbp", "ubp", "ibp", "graph_eraser"])
def test_partitioners_report_every_iteration(method: str) -> None:
    inter = block_interactions()
    rng = np.random.default_rng(0)
    users, items = rng.normal(size=(inter.n_users, 8)), rng.normal(size=(inter.n_items, 8))
    seen: list[dict[str, float]] = []
    part = PARTITIONERS[method](inter.train, 4, 0, user_emb=users, item_emb=items, max_iter=6, callback=seen.append)
    assert [int(s["iteration"]) for s in seen] == list(range(1, part.diagnostics["iterations"] + 1))
    assert seen[0]["moved"] > 0 and all(s["seconds"] >= 0 for s in seen)
    # the callback only observes: the same partition without it
    again = PARTITIONERS[method](inter.train, 4, 0, user_emb=users, item_emb=items, max_iter=6)
    assert np.array_equal(part.assignment, again.assignment)
