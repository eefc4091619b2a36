"""End to end: `dagster dev` on 127.0.0.1 serves the asset graph and the shard partitions over GraphQL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from receraser_core.data.readers import PROJECT_ROOT
from tests.test_dagster import K, _cli, _env

QUERY = "{ assetNodes { assetKey { path } isPartitioned partitionKeys groupName description } }"
PARTITIONED = ["shard_data", "shard_model"]
UNPARTITIONED = ["interactions", "wmf_embeddings", "shard_assignment", "aggregator", "evaluation"]


def _nodes(names: list[str], field: str) -> str:
    keys = ", ".join(f'{{path: ["{n}"]}}' for n in names)
    return f"{{ assetNodes(assetKeys: [{keys}]) {{ assetKey {{ path }} {field} }} }}"


#: Record a request for shard SHARD's first training record; with PREPARE=1 also redact it and record the
#: shard's new deletion version, as `receraser unlearn` and the sensor do before their runs.
FORGET = """
import os
from dagster_project.orchestrate import get_instance
from dagster_project.resources import ledger_for
from dagster_project.settings import load_settings
from dagster_project.unlearn import prepare_batch
from pipelines.ledger import NewRequest
from pipelines.steps import load_interactions, load_partition
import numpy as np
rec = load_settings()
run, ledger, shard = rec.run_dir(), ledger_for(rec), int(os.environ["SHARD"])
inter = load_interactions(run.interactions)
p = int(np.flatnonzero(load_partition(run).assignment == shard)[0])
u = int(np.searchsorted(inter.train.indptr, p, side="right") - 1)
ledger.add([NewRequest("interaction", str(inter.user_ids[u]), str(inter.item_ids[inter.train.indices[p]]))])
if os.environ.get("PREPARE"):
    with ledger.applier("test"):
        print(prepare_batch(get_instance(rec.state_path()), rec, ledger, ledger.outstanding(), print).shards)
"""


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
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{exc}: {exc.read()[:2000]!r}") from None


def _stale(port: int) -> dict[str, str]:
    out = {}
    by_partition = 'staleStatusByPartition(partitions: ["0", "1", "2"])'
    for node in _graphql(port, _nodes(PARTITIONED, by_partition))["data"]["assetNodes"]:
        out |= {f"{node['assetKey']['path'][-1]}[{k}]": s for k, s in enumerate(node["staleStatusByPartition"])}
    for node in _graphql(port, _nodes(UNPARTITIONED, "staleStatus"))["data"]["assetNodes"]:
        out[node["assetKey"]["path"][-1]] = node["staleStatus"]
    return out


def _python(code: str, env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _ledger(env: dict[str, str]) -> list[dict]:
    proc = _cli(["status", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["requests"]


@pytest.mark.slow
def test_dagster_dev_serves_the_graph_its_staleness_and_applies_deletions(tmp_path: Path) -> None:
    """The UI's view: the graph, Dagster's own stale status after a deletion (only that shard's partitions, the
    aggregator and evaluation), and the daemon's sensor applying a request in one run."""
    env = _env(tmp_path)
    assert _cli(["run"], env).returncode == 0
    # a request in shard 1, redacted and its deletion version recorded, not yet rebuilt
    assert _python(FORGET, {**env, "SHARD": "1", "PREPARE": "1"}).strip().endswith("[1]")
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

        # Dagster's own stale status (GraphQL, as the UI shows it) marks exactly what must be rebuilt
        stale = {label for label, state in _stale(port).items() if state == "STALE"}
        assert (
            {"shard_data[1]", "aggregator", "evaluation"}
            <= stale
            <= {
                "shard_data[1]",
                "shard_model[1]",
                "aggregator",
                "evaluation",
            }
        ), _stale(port)
        assert _cli(["unlearn"], env).returncode == 0  # rebuilds shard 1 and what is downstream
        assert set(_stale(port).values()) == {"FRESH"}, _stale(port)
        assert _ledger(env)[0]["status"] == "applied"

        # the daemon's sensor applies the next request by itself: one run for one shard
        _python(FORGET, {**env, "SHARD": "2"})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and _ledger(env)[1]["status"] != "applied":
            assert proc.poll() is None, (tmp_path / "dev.log").read_text()[-3000:]
            time.sleep(2)
        second = _ledger(env)[1]
        assert second["status"] == "applied" and second["shards"] == [2] and len(second["dagster_runs"]) == 1, second
        assert set(_stale(port).values()) == {"FRESH"}, _stale(port)
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
