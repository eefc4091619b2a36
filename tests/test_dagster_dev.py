"""End to end: `dagster dev` on 127.0.0.1 serves the asset graph and the shard partitions over GraphQL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from receraser_core.data.readers import PROJECT_ROOT
from tests.test_dagster import K, _env

QUERY = "{ assetNodes { assetKey { path } isPartitioned partitionKeys groupName description } }"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_dagster_dev_serves_the_graph(tmp_path: Path) -> None:
    env = _env(tmp_path)
    port = _free_port()
    dagster = Path(sys.executable).with_name("dagster")
    log = open(tmp_path / "dev.log", "w")  # noqa: SIM115 - closed in finally
    # started from a non-interactive shell, dagster dev ignores INT/TERM unless their default action is restored
    proc = subprocess.Popen(
        [
            "env",
            "--default-signal=INT,TERM",
            str(dagster),
            "dev",
            "-w",
            "workspace.yaml",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        nodes: list = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not nodes:
            assert proc.poll() is None, (tmp_path / "dev.log").read_text()[-3000:]
            try:
                nodes = _graphql(port, QUERY)["data"]["assetNodes"]
            except (OSError, KeyError, TypeError):
                time.sleep(1)
        by_name = {n["assetKey"]["path"][-1]: n for n in nodes}
        assert set(by_name) >= {
            "interactions",
            "wmf_embeddings",
            "shard_assignment",
            "shard_data",
            "shard_model",
            "aggregator",
            "evaluation",
        }
        for name in ("shard_data", "shard_model"):
            assert by_name[name]["isPartitioned"] and by_name[name]["partitionKeys"] == [str(k) for k in range(K)]
        assert not by_name["aggregator"]["isPartitioned"]
        assert by_name["shard_model"]["description"].startswith("The submodel trained on shard_data[k]")
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # only the process group this test started
        stopped_by_sigint = True
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stopped_by_sigint = False
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert stopped_by_sigint, "dagster dev did not stop within 60 s of Ctrl-C"
