"""`receraser serve`: a real uvicorn process on 127.0.0.1 over a tiny state built by the real pipeline.

The tests share one server and run in file order: read-only checks first, then requests that change the
ledger, then an unlearning in another process while requests keep coming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines.ledger import Ledger, NewRequest
from pipelines.steps import RunDir, load_interactions
from receraser_core.data.readers import PROJECT_ROOT
from tests.test_dagster import _cli, _env
from tests.test_dagster_dev import _free_port


@dataclass
class Server:
    url: str
    env: dict[str, str]
    run: RunDir
    token: str
    log: Path

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.run.root / "ledger.sqlite")


def _call(url: str, token: str | None = None, body: object | bytes | None = None) -> tuple[int, dict[str, str], str]:
    """(status, headers with lower-case names, body text) of a GET, or of a POST when ``body`` is given."""
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read().decode()


def _one_line_error(text: str) -> str:
    assert "\n" not in text.strip()
    return str(json.loads(text)["error"])


def _cli_top(server: Server, user: str, n: int) -> list[str]:
    out = _cli(["recommend", "--user", user, "-n", str(n)], server.env)
    assert out.returncode == 0, out.stderr[-2000:]
    return [line.split()[2] for line in out.stdout.splitlines()[1:] if line.strip()]


def _version(run: RunDir) -> str:
    return (run.root / "serving.pt.sha256").read_text().strip()[:12]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve")
    env = _env(tmp)
    built = _cli(["run"], env)
    assert built.returncode == 0, built.stderr[-2000:]
    (root,) = (tmp / "state" / "pipeline").iterdir()
    port = _free_port()
    log = tmp / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "receraser_cli.main", "serve", "--port", str(port), "--poll", "0.2"],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if _call(f"{url}/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        token_file = tmp / "state" / "serve.token"
        assert token_file.stat().st_mode & 0o777 == 0o600 and str(token_file) in log.read_text()
        yield Server(url, env, RunDir(root), token_file.read_text().strip(), log)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # only the process group this fixture started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_recommend_equals_the_cli_and_names_the_model(server: Server) -> None:
    status, headers, text = _call(f"{server.url}/recommend?user=u0&n=5")
    body = json.loads(text)
    assert status == 200 and [r["item"] for r in body["items"]] == _cli_top(server, "u0", 5)
    assert headers["x-model-version"] == body["model_version"] == _version(server.run)
    assert headers["x-deletions-applied"] == "" and body["deletions_applied"] == []
    assert body["masked"] == load_interactions(server.run.interactions).train[0].nnz > 0
    health = json.loads(_call(f"{server.url}/health")[2])
    assert health["status"] == "ok" and health["model_version"] == body["model_version"]


def test_bad_reads_are_one_line_json(server: Server) -> None:
    status, headers, text = _call(f"{server.url}/recommend?user=nobody")
    assert (
        status == 404
        and _one_line_error(text)
        == "unknown user id 'nobody' in dataset " + json.loads(_call(f"{server.url}/health")[2])["dataset"]
    )
    assert headers["x-model-version"] == _version(server.run)
    for query in ("user=u0&n=0", "user=u0&n=x", "n=3"):
        status, _, text = _call(f"{server.url}/recommend?{query}")
        assert status == 422 and _one_line_error(text)


def test_openapi_lists_the_endpoints(server: Server) -> None:
    spec = json.loads(_call(f"{server.url}/openapi.json")[2])
    assert set(spec["paths"]) == {"/recommend", "/health", "/forget", "/requests/{request_id}"}
    assert _call(f"{server.url}/docs")[0] == 200


def test_forget_needs_the_token_and_valid_input(server: Server) -> None:
    inter = load_interactions(server.run.interactions)
    item = str(inter.item_ids[inter.train.indices[inter.train.indptr[1]]])
    good = {"user": "u1", "item": item}
    for token in (None, "wrong", ""):
        status, headers, text = _call(f"{server.url}/forget", token, good)
        assert status == 401 and "bearer token" in _one_line_error(text) and headers["www-authenticate"] == "Bearer"
        assert _call(f"{server.url}/requests/1", token)[0] == 401
        assert _call(f"{server.url}/forget", token, b"{not json")[0] == 401  # the token is checked first
    bad: list[object | bytes] = [
        {"user": "u1"},  # neither item nor all
        {"user": "u1", "item": item, "all": True},
        {"user": "u1", "item": "999999"},  # unknown item
        {"user": "nobody", "all": True},
        {"user": "u1", "item": item, "extra": 1},
        b"{not json",
        ["u1", item],
    ]
    for body in bad:
        status, _, text = _call(f"{server.url}/forget", server.token, body)
        assert 400 <= status < 500 and _one_line_error(text), (body, text)
    assert server.ledger.get() == []  # nothing was written


def test_forget_records_and_a_pending_erasure_is_hidden_at_once(server: Server) -> None:
    assert _call(f"{server.url}/recommend?user=u3")[0] == 200
    status, _, text = _call(f"{server.url}/forget", server.token, {"user": "u3", "all": True, "reason": "gdpr"})
    filed = json.loads(text)
    assert status == 202 and filed["new"] and filed["status"] == "pending" and filed["records"] > 0
    assert _call(f"{server.url}/recommend?user=u3")[0] == 404  # at once, not the old model's list
    status, _, text = _call(f"{server.url}/requests/{filed['request']}", server.token)
    row = json.loads(text)
    assert status == 200 and row["status"] == "pending" and row["user_id"] == "u3" and row["reason"] == "gdpr"
    assert not row["excluded_by_serving_model"]
    again = json.loads(_call(f"{server.url}/forget", server.token, {"user": "u3", "all": True})[2])
    assert again["request"] == filed["request"] and not again["new"]
    assert _call(f"{server.url}/requests/99", server.token)[0] == 404
    # a request filed by another process (as `receraser forget` does) hides its user within the poll
    server.ledger.add([NewRequest("user", "u5")])
    time.sleep(0.6)
    assert _call(f"{server.url}/recommend?user=u5")[0] == 404


def test_unlearning_in_another_process_swaps_the_model_without_a_failed_request(server: Server) -> None:
    before = _version(server.run)
    pending = [r.id for r in server.ledger.outstanding()]
    proc = subprocess.Popen(
        [sys.executable, "-m", "receraser_cli.main", "unlearn"],
        env=server.env,
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: list[str] = []
    failures: list[tuple[int, str]] = []
    while proc.poll() is None or not seen or seen[-1] == before:
        status, headers, text = _call(f"{server.url}/recommend?user=u0&n=5")
        if status != 200 or headers["x-model-version"] != json.loads(text)["model_version"]:
            failures.append((status, text))
        seen.append(headers["x-model-version"])
        assert len(seen) < 20_000, "the new model was not swapped in"
        time.sleep(0.01)
    assert proc.returncode == 0, proc.stderr.read()[-2000:] if proc.stderr else ""
    assert failures == []
    after = _version(server.run)
    changes = [v for k, v in enumerate(seen) if k == 0 or v != seen[k - 1]]
    assert changes == [before, after] and after != before  # the old model until the swap, then the new one
    status, headers, text = _call(f"{server.url}/recommend?user=u0&n=5")
    assert [r["item"] for r in json.loads(text)["items"]] == _cli_top(server, "u0", 5)
    assert pending == [1, 2] and json.loads(text)["deletions_applied"] == pending
    assert headers["x-deletions-applied"] == "1-2"
    for user in ("u3", "u5"):  # erased: gone from the id map, not merely hidden
        status, _, text = _call(f"{server.url}/recommend?user={user}")
        assert status == 404 and "unknown user id" in _one_line_error(text)
    row = json.loads(_call(f"{server.url}/requests/{pending[0]}", server.token)[2])
    assert row["status"] == "applied" and row["excluded_by_serving_model"] and row["user_id"].startswith("hmac:")
    assert f"model {after} loaded" in server.log.read_text()


def test_applied_requests_are_named_as_ranges() -> None:
    from pipelines.serving import _ranges

    assert _ranges((9, 1, 2, 3, 7, 10)) == "1-3,7,9-10" and _ranges(()) == ""
