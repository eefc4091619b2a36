"""The `receraser` command line: data info, clean one-line errors, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from receraser_cli.main import main


def _table(tmp_path: Path) -> Path:
    rows = [(u, i) for u in range(10) for i in range(u, u + 6)]
    path = tmp_path / "t.csv"
    path.write_text("user,item\n" + "".join(f"{u},{i}\n" for u, i in rows))
    return path


def test_data_info_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "info", f"csv:{_table(tmp_path)}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["users"], info["items"], info["interactions"]) == (10, 15, 60)
    assert info["train"] + info["valid"] + info["test"] == 60
    assert info["density"] == pytest.approx(60 / 150)


def test_data_info_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "info", f"csv:{_table(tmp_path)}"]) == 0
    out = capsys.readouterr().out
    assert "users        10" in out and "density" in out


@pytest.mark.parametrize(
    ("content", "needle"),
    [("user,item\n", "no rows"), ("who,what\n1,2\n", "missing column"), ("user,item\n1,\n", ":2: empty")],
)
def test_malformed_input_is_one_line_error(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    proc = subprocess.run(
        [sys.executable, "-m", "receraser_cli.main", "data", "info", f"csv:{path}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("receraser: error:") and needle in lines[0]
    assert str(path) in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("model", ["wmf", "bpr", "lightgcn"])
def test_bench_retrain_writes_the_record(model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    argv = [
        "bench",
        "retrain",
        "--dataset",
        f"csv:{_table(tmp_path)}",
        "--model",
        model,
        "--json",
        str(out),
        "--set",
        "epochs=2",
        "--set",
        "dim=8",
        "--set",
        "eval_every=1",
    ]
    assert main(argv) == 0
    rec = json.loads(out.read_text())
    keys = {
        "dataset",
        "model",
        "method",
        "recall@10",
        "recall@20",
        "recall@50",
        "ndcg@10",
        "ndcg@20",
        "ndcg@50",
        "fit_seconds",
        "epochs",
        "peak_rss_mb",
        "seed",
        "config",
    }
    assert keys <= set(rec)
    assert rec["method"] == "retrain" and rec["model"] == model and rec["epochs"] == 2
    assert rec["config"]["dim"] == 8 and rec["peak_rss_mb"] > 0
    progress = capsys.readouterr().out
    assert "epoch    1" in progress and "valid Recall@10" in progress


def test_bench_retrain_rejects_bad_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = f"csv:{_table(tmp_path)}"
    assert main(["bench", "retrain", "--dataset", table, "--model", "bpr", "--set", "speed=3"]) == 2
    assert "bad --set 'speed=3'" in capsys.readouterr().err
    assert main(["bench", "retrain", "--dataset", table, "--model", "bpr", "--set", "lr=fast"]) == 2
    assert "lr must be float" in capsys.readouterr().err
    assert main(["bench", "retrain", "--dataset", table, "--model", "bpr", "--set", "lr=-1"]) == 2
    assert "lr > 0" in capsys.readouterr().err


def test_columns_named_in_the_dataset_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.csv"
    path.write_text("who,what\n" + "".join(f"{u},{i}\n" for u in range(10) for i in range(u, u + 6)))
    assert main(["data", "info", f"csv:{path}"]) == 2
    err = capsys.readouterr().err
    assert "missing column" in err and "csv:PATH?user=COLUMN&item=COLUMN" in err  # what it suggests exists
    assert main(["data", "info", f"csv:{path}?user=who&item=what", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["interactions"] == 60
    assert main(["data", "info", f"csv:{path}?person=who"]) == 2
    assert "only user=COLUMN and item=COLUMN" in capsys.readouterr().err


def test_settings_from_the_environment_are_checked_and_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster_project.settings import load_settings
    from receraser_core.models import ConfigError

    monkeypatch.setenv("RECERASER_HOME", "/nonexistent-receraser-home")
    for name, value, needle in (
        ("RECERASER_N_SHARDS", "abc", "RECERASER_N_SHARDS='abc': expected an integer"),
        ("RECERASER_N_SHARDS", "1", "RECERASER_N_SHARDS='1': n_shards must be between 2 and"),
        ("RECERASER_N_SHARDS", "5000", "n_shards must be between 2 and 1024"),
        ("RECERASER_MODEL_OVERRIDES", '{"reg": -1}', "RECERASER_MODEL_OVERRIDES='{\"reg\": -1}': reg must be >= 0"),
        ("RECERASER_AGG_OVERRIDES", '{"lr": -0.1}', "AggConfig needs lr > 0"),
        ("RECERASER_AGG_OVERRIDES", '{"momentum": 1}', "unknown aggregator field(s): momentum"),
        ("RECERASER_PARTITIONER", "kmeans", "unknown partitioner 'kmeans'; choose one of"),
        ("RECERASER_MODEL", "svd", "RECERASER_MODEL='svd': unknown model"),
        ("RECERASER_AGG_OVERRIDES", "{not json", "RECERASER_AGG_OVERRIDES='{not json': expected JSON"),
    ):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(ConfigError) as err:
                load_settings()
            assert needle in str(err.value) and "\n" not in str(err.value)


def test_too_many_shards_is_refused_before_any_work(tmp_path: Path) -> None:
    env = {**os.environ, "RECERASER_HOME": str(tmp_path / "state"), "DAGSTER_HOME": ""}
    env.pop("DAGSTER_HOME")
    big = subprocess.run(
        [sys.executable, "-m", "receraser_cli.main", "run", "--shards", "100000"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert big.returncode == 2 and "argument --shards: must be between 2 and 1024" in big.stderr
    one = subprocess.run(
        [sys.executable, "-m", "receraser_cli.main", "run", "--shards", "1"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert one.returncode == 2 and "argument --shards: must be between 2 and 1024, got 1" in one.stderr
    data = _table(tmp_path)  # 10 users
    proc = subprocess.run(
        [sys.executable, "-m", "receraser_cli.main", "run", "--dataset", f"csv:{data}", "--partitioner", "ubp"]
        + ["--shards", "11"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "receraser: error: 11 shards is more than the 10 training users of "
        f"csv:{data} that the ubp partitioner deals out: some shards would be empty; use --shards 10 or fewer"
    ]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "state" / "pipeline").exists() or not list((tmp_path / "state" / "pipeline").rglob("*.npz"))


def test_ctrl_c_stops_a_run_within_seconds_with_one_line(tmp_path: Path) -> None:
    """SIGINT while a Dagster step trains (WMF pretraining on ML-1M) ends the command in seconds, one line."""
    import signal
    import time

    from receraser_core.data.readers import default_data_dir

    if not (default_data_dir() / "ml-1m").exists():
        pytest.skip("needs the shared ML-1M files (../shared/data)")
    env = {**os.environ, "RECERASER_HOME": str(tmp_path / "state"), "RECERASER_N_SHARDS": "10"}
    env.pop("DAGSTER_HOME", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "receraser_cli.main", "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert "materializing interactions" in proc.stdout.readline() + proc.stdout.readline()
    time.sleep(8)  # inside the interactions / pretraining step by now
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 15
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("receraser: interrupted")
    assert "Traceback" not in err
