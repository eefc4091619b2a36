"""`receraser bench serve`: the service under a fixed request rate while deletions are filed over HTTP and
applied by `receraser unlearn`; latency before, during and after each model swap.

Three processes: this one drives the load (an aiohttp client, open loop: request k is sent at k / rate seconds
whatever the answers before it), `receraser serve` answers, and `receraser unlearn` applies each deletion."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from receraser_cli.bench_common import bench_settings, write_record
from receraser_cli.dagster_jobs import _context, add_pipeline_arguments, pipeline_argv
from receraser_cli.forget_cmds import _positive
from receraser_cli.serve import _seconds

GOAL_P99_MS = 50.0


@dataclass
class Sample:
    sent: float  # seconds since the load started
    latency: float  # seconds, send to last byte
    lag: float  # seconds the send came after its scheduled time (the client's own delay)
    status: int  # HTTP status; 0 for a connection error
    version: str  # X-Model-Version of the answer


@dataclass
class Swap:
    request: int
    user: str
    item: str
    posted: float  # seconds since the load started
    unlearn_seconds: float = 0.0
    unlearn_rc: int = 0
    version_before: str = ""
    version_after: str = ""
    swapped: float = float("nan")  # first request answered by the new model (its send time)
    extra: dict[str, Any] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: the benchmark's pipeline options (state directory, dataset, model ...), passed on to every child command
_SETTINGS_ARGV: list[str] = []


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "receraser_cli.main", *args, *_SETTINGS_ARGV]


def _cli_top(user: str, n: int) -> list[str]:
    """The item ids `receraser recommend` prints for the same state."""
    out = subprocess.run(_cli("recommend", "--user", user, "-n", str(n)), capture_output=True, text=True, check=True)
    return [line.split()[2] for line in out.stdout.splitlines()[1:] if line.strip()]


@contextmanager
def _server(port: int, poll: float, token: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`receraser serve` in its own process group, stopped with Ctrl-C (then killed) at the end."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            _cli("serve", "--port", str(port), "--poll", str(poll)),
            env={**os.environ, "RECERASER_SERVE_TOKEN": token},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _stats(samples: list[Sample]) -> dict[str, float]:
    """Count, errors, p50 / p99 / max latency (ms) of some samples."""
    ms = np.array([s.latency for s in samples]) * 1000
    if not len(ms):
        return {"requests": 0, "errors": 0}
    return {
        "requests": len(ms),
        "errors": sum(s.status != 200 for s in samples),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
    }


def _between(samples: list[Sample], start: float, end: float) -> list[Sample]:
    return [s for s in samples if start <= s.sent < end]


class Load:
    """Requests for random known users at a fixed rate until stopped; every answer becomes a `Sample`."""

    def __init__(self, url: str, users: list[str], rate: float, n: int, rng: np.random.Generator) -> None:
        self.url, self.users, self.rate, self.n, self.rng = url, users, rate, n, rng
        self.samples: list[Sample] = []
        self.start = 0.0
        self.stop = asyncio.Event()

    def now(self) -> float:
        return time.perf_counter() - self.start

    async def _one(self, session: Any, user: str, due: float) -> None:
        import aiohttp

        sent = self.now()
        status, version = 0, ""
        try:
            async with session.get(f"{self.url}/recommend", params={"user": user, "n": str(self.n)}) as resp:
                await resp.read()
                status, version = resp.status, resp.headers.get("X-Model-Version", "")
        except (aiohttp.ClientError, TimeoutError):
            pass
        self.samples.append(Sample(sent, self.now() - sent, sent - due, status, version))

    async def run(self, session: Any) -> None:
        self.start = time.perf_counter()
        pending: set[asyncio.Task[None]] = set()
        k = 0
        while not self.stop.is_set():
            due = k / self.rate
            if due > self.now():
                await asyncio.sleep(due - self.now())
            task = asyncio.create_task(self._one(session, self.users[int(self.rng.integers(len(self.users)))], due))
            pending.add(task)
            task.add_done_callback(pending.discard)
            k += 1
        await asyncio.gather(*pending)

    async def report(self, every: float = 10.0) -> None:
        """One progress line every ``every`` seconds."""
        seen = 0
        while not self.stop.is_set():
            await asyncio.sleep(every)
            recent = self.samples[seen:]
            seen += len(recent)
            st = _stats(recent)
            version = recent[-1].version if recent else "?"
            print(
                f"  {self.now():5.0f} s: {len(self.samples):,} requests, "
                f"{sum(s.status != 200 for s in self.samples)} errors; last {every:g} s: p50 "
                f"{st.get('p50_ms', 0):.1f} ms, p99 {st.get('p99_ms', 0):.1f} ms; model {version}",
                flush=True,
            )


async def _served_version(session: Any, url: str) -> str:
    async with session.get(f"{url}/health") as resp:
        return str(resp.headers["X-Model-Version"])


async def _delete(session: Any, url: str, token: str, load: Load, user: str, item: str, log: Path) -> Swap:
    """File one deletion over HTTP, apply it with `receraser unlearn` in a process of its own, and wait until the
    service answers with the new model."""
    before = await _served_version(session, url)
    posted = load.now()
    body = {"user": user, "item": item, "reason": "bench serve"}
    headers = {"Authorization": f"Bearer {token}"}
    async with session.post(f"{url}/forget", json=body, headers=headers) as resp:
        filed = await resp.json()
        if resp.status != 202:
            raise RuntimeError(f"POST /forget {body}: {resp.status} {filed}")
    swap = Swap(int(filed["request"]), user, item, posted, version_before=before)
    print(f"  {posted:5.0f} s: request #{swap.request} (user {user}, item {item}) filed; unlearning ...", flush=True)
    t = time.perf_counter()
    with open(log, "a") as out:
        proc = await asyncio.create_subprocess_exec(*_cli("unlearn"), stdout=out, stderr=subprocess.STDOUT)
        swap.unlearn_rc = await proc.wait()
    swap.unlearn_seconds = time.perf_counter() - t
    deadline = time.perf_counter() + 60
    while (after := await _served_version(session, url)) == before and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    swap.version_after = after
    print(
        f"  {load.now():5.0f} s: `receraser unlearn` exited {swap.unlearn_rc} after {swap.unlearn_seconds:.1f} s; "
        f"serving model {after} (was {before})",
        flush=True,
    )
    return swap


async def _scenario(
    args: argparse.Namespace, url: str, token: str, users: list[str], victims: list[tuple[str, str]], log: Path
) -> tuple[Load, list[Swap]]:
    import aiohttp

    load = Load(url, users, args.rate, args.n, np.random.default_rng(args.sample_seed + 1))
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        driver = asyncio.create_task(load.run(session))
        reporter = asyncio.create_task(load.report())
        swaps = []
        await asyncio.sleep(args.before)
        for user, item in victims:
            swaps.append(await _delete(session, url, token, load, user, item, log))
            await asyncio.sleep(args.after)
        await asyncio.sleep(max(0.0, args.duration - load.now()))
        load.stop.set()
        await driver
        reporter.cancel()
    return load, swaps


def _victims(inter: Any, fixed: str, count: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """One random training record each of ``count`` random users other than ``fixed``."""
    active = [u for u in np.flatnonzero(np.diff(inter.train.indptr)) if str(inter.user_ids[u]) != fixed]
    out = []
    for u in rng.choice(active, size=count, replace=False):
        items = inter.train.indices[inter.train.indptr[u] : inter.train.indptr[u + 1]]
        out.append((str(inter.user_ids[u]), str(inter.item_ids[rng.choice(items)])))
    return out


def _phases(samples: list[Sample], swaps: list[Swap], end: float) -> None:
    """Attach to each swap its 'during' (filed to swapped), 'around' (1 s either side of the swap) and 'after'
    (swapped to the next filing or the end) latency statistics."""
    for k, sw in enumerate(swaps):
        new = [s.sent for s in samples if s.sent >= sw.posted and s.version == sw.version_after]
        sw.swapped = min(new) if new else float("nan")
        following = swaps[k + 1].posted if k + 1 < len(swaps) else end
        sw.extra = {
            "during": _stats(_between(samples, sw.posted, sw.swapped)),
            "around_swap": _stats(_between(samples, sw.swapped - 1, sw.swapped + 1)),
            "after": _stats(_between(samples, sw.swapped, following)),
        }


def cmd_bench_serve(args: argparse.Namespace) -> int:
    bench_settings(args, "serve")
    _SETTINGS_ARGV[:] = pipeline_argv(args)
    from dagster_project.orchestrate import run_graph
    from pipelines.steps import load_interactions

    instance, rec, tracker = _context(args)
    cfg, run = rec.pipeline_config(), rec.run_dir()
    print(
        f"building {cfg.partitioner}+{cfg.aggregator} K={cfg.n_shards} {cfg.model} on {cfg.dataset} "
        "(skipped if already built)",
        flush=True,
    )
    run_graph(instance, rec, tracker, log=lambda m: print(f"  {m}", flush=True))
    inter = load_interactions(run.interactions)
    rng = np.random.default_rng(args.sample_seed)
    users = [str(inter.user_ids[u]) for u in np.flatnonzero(np.diff(inter.train.indptr))]
    fixed = args.user or users[int(rng.integers(len(users)))]
    victims = _victims(inter, fixed, args.deletions, rng)
    top_cli = _cli_top(fixed, 20)
    port, token = _free_port(), secrets.token_urlsafe(32)
    server_log, unlearn_log = run.root / "bench-serve-server.log", run.root / "bench-serve-unlearn.log"
    unlearn_log.write_text("")
    with _server(port, args.poll, token, server_log) as proc:
        url = f"http://127.0.0.1:{port}"
        top_http = _wait_and_top(url, proc, fixed, server_log)
        print(
            f"serving on {url}; {args.rate:g} requests/s for random known users (seed {args.sample_seed + 1}), "
            f"{args.deletions} deletion(s) after {args.before:g} s, {args.after:g} s apart after each swap",
            flush=True,
        )
        load, swaps = asyncio.run(_scenario(args, url, token, users, victims, unlearn_log))
        top_http_after = _wait_and_top(url, proc, fixed, server_log)
    top_cli_after = _cli_top(fixed, 20)
    end = load.samples[-1].sent if load.samples else 0.0
    _phases(load.samples, swaps, end + 1)
    record = _record(args, cfg, load, swaps, fixed, (top_http, top_cli, top_http_after, top_cli_after))
    _print_summary(record)
    write_record(args.json, record)
    return (
        0
        if record["errors"] == 0 and record["top20"]["before_matches_cli"] and record["top20"]["after_matches_cli"]
        else 1
    )


def _wait_and_top(url: str, proc: subprocess.Popen[bytes], user: str, log: Path) -> list[str]:
    """Wait for the service to answer (up to 120 s), then the top-20 of ``user``."""
    import json
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"`receraser serve` did not start: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/recommend?user={user}&n=20", timeout=10) as resp:
                return [r["item"] for r in json.loads(resp.read())["items"]]
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"GET /recommend?user={user}: {exc.code} {exc.read()[:300]!r}") from None
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)


def _record(
    args: argparse.Namespace, cfg: Any, load: Load, swaps: list[Swap], fixed: str, tops: tuple[list[str], ...]
) -> dict[str, Any]:
    samples = load.samples
    top_http, top_cli, top_http_after, top_cli_after = tops
    seconds = samples[-1].sent - samples[0].sent if len(samples) > 1 else 0.0
    overall = _stats(samples)
    first = swaps[0].posted if swaps else float("inf")
    return {
        "dataset": cfg.dataset,
        "model": cfg.model,
        "partitioner": cfg.partitioner,
        "aggregator": cfg.aggregator,
        "shards": cfg.n_shards,
        "n": args.n,
        "rate": args.rate,
        "poll_seconds": args.poll,
        "load_seconds": round(seconds, 1),
        "requests": overall["requests"],
        "errors": overall["errors"],
        "achieved_rate": round(overall["requests"] / seconds, 1) if seconds else 0.0,
        "latency_definition": "client side, from sending the request to reading the last byte of the answer",
        "latency": {
            "all": overall,
            "before": _stats(_between(samples, 0.0, first)),
            "client_lag_p99_ms": round(float(np.percentile([s.lag for s in samples], 99)) * 1000, 2),
        },
        "swaps": [
            {
                "request": sw.request,
                "user": sw.user,
                "item": sw.item,
                "filed_at_s": round(sw.posted, 2),
                "unlearn_seconds": round(sw.unlearn_seconds, 2),
                "unlearn_exit_code": sw.unlearn_rc,
                "swapped_at_s": round(sw.swapped, 2),
                "filed_to_swap_seconds": round(sw.swapped - sw.posted, 2),
                "version_before": sw.version_before,
                "version_after": sw.version_after,
                **sw.extra,
            }
            for sw in swaps
        ],
        "top20": {
            "user": fixed,
            "before": top_http,
            "after": top_http_after,
            "before_matches_cli": top_http == top_cli,
            "after_matches_cli": top_http_after == top_cli_after,
            "changed": top_http != top_http_after,
        },
        "goal": f"p99 <= {GOAL_P99_MS:g} ms for top-{args.n} at >= {args.rate:g} requests/s, 0 errors",
        "goal_met": overall["errors"] == 0 and overall.get("p99_ms", 1e9) <= GOAL_P99_MS,
        "sample_seed": args.sample_seed,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
    }


def _print_summary(r: dict[str, Any]) -> None:
    def line(name: str, st: dict[str, Any]) -> str:
        if not st.get("requests"):
            return f"  {name:24} no requests"
        return (
            f"  {name:24} {st['requests']:>7,} requests  p50 {st['p50_ms']:6.1f} ms  p99 {st['p99_ms']:6.1f} ms  "
            f"max {st['max_ms']:7.1f} ms  errors {st['errors']}"
        )

    print(f"{r['requests']:,} requests in {r['load_seconds']:.0f} s ({r['achieved_rate']:.1f}/s), {r['errors']} errors")
    print(line("all", r["latency"]["all"]))
    print(line("before any deletion", r["latency"]["before"]))
    for sw in r["swaps"]:
        print(
            f"request #{sw['request']}: unlearn {sw['unlearn_seconds']:.1f} s, swap at {sw['swapped_at_s']:.1f} s "
            f"({sw['version_before']} -> {sw['version_after']})"
        )
        for phase in ("during", "around_swap", "after"):
            print(line(phase, sw[phase]))
    t = r["top20"]
    print(
        f"top-20 of user {t['user']}: before = `receraser recommend`: {t['before_matches_cli']}, after = "
        f"`receraser recommend`: {t['after_matches_cli']}, changed by the deletions: {t['changed']}"
    )
    print(f"goal ({r['goal']}): {'met' if r['goal_met'] else 'NOT met'}")


def add_serve_bench_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "serve",
        help="the HTTP service under a fixed request rate while deletions are applied: latency and swaps",
        description="Builds (or reuses) the state, starts `receraser serve` on a free 127.0.0.1 port and drives "
        "it from this process with an open-loop aiohttp client: --rate requests per second of GET "
        "/recommend?user=U&n=N for random known users (seeded). After --before seconds it files --deletions "
        "deletions (one random training record of another random user each) through POST /forget and applies "
        "each with `receraser unlearn` in a third process, waiting --after seconds after each swap; the load "
        "runs at least --duration seconds. Reports requests, errors, p50 / p99 latency before any deletion and "
        "during, around (1 s either side) and after each swap, and checks the top-20 of a fixed user against "
        "`receraser recommend` before and after. Exit code 1 when a request failed or a top-20 differs.",
    )
    add_pipeline_arguments(p)
    p.add_argument("--rate", type=_positive, default=200, help="requests per second (default 200)")
    p.add_argument("--duration", type=_positive, default=60, help="least seconds of load (default 60)")
    p.add_argument("--deletions", type=_positive, default=2, help="deletions filed and applied (default 2)")
    p.add_argument("--before", type=float, default=15.0, help="seconds of load before the first deletion (default 15)")
    p.add_argument("--after", type=float, default=10.0, help="seconds of load after each swap (default 10)")
    p.add_argument("-n", type=_positive, default=20, help="items per request (default 20)")
    p.add_argument("--poll", type=_seconds, default=0.5, help="the service's --poll (default 0.5 s)")
    p.add_argument("--user", help="the fixed user whose top-20 is checked (default: a random one)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the users and deletions drawn")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads of this process (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="write the record here")
    p.set_defaults(func=cmd_bench_serve)
