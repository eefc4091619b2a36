"""`receraser serve`: the recommendation service over HTTP, swapping in each new model after unlearning."""

from __future__ import annotations

import argparse
import sys

import torch

from receraser_cli.dagster_jobs import add_pipeline_arguments
from receraser_cli.forget_cmds import _positive, _run_dir


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.05 <= value <= 60:
        raise argparse.ArgumentTypeError(f"must be between 0.05 and 60 seconds, got {value}")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    import uvicorn

    from dagster_project.resources import ledger_for
    from pipelines.serving import Service, create_app, serve_token

    rec, run = _run_dir(args)
    token, where = serve_token(rec.state_path())
    service = Service(run, ledger_for(rec), token, args.poll, log=lambda m: print(m, file=sys.stderr, flush=True))
    view = service.view
    print(
        f"serving {run.root.name}: model {view.model.version}, excludes applied request(s) "
        f"{', '.join(map(str, view.applied)) or 'none'}\n"
        f"  http://{args.host}:{args.port}/recommend?user=U&n=20   (API docs: http://{args.host}:{args.port}/docs)\n"
        f"  POST /forget and GET /requests/ID need 'Authorization: Bearer TOKEN'; the token is in {where}\n"
        f"  a new model (after `receraser unlearn` or the Dagster sensor) is swapped in within {args.poll:g} s",
        flush=True,
    )
    uvicorn.run(
        create_app(service),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=args.access_log,
        timeout_graceful_shutdown=5,
    )
    return 0


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "serve",
        help="serve recommendations over HTTP (FastAPI + uvicorn); swaps in the new model after unlearning",
        description="GET /recommend?user=U&n=20 (original ids; training items masked; unknown user: 404), "
        'GET /health, POST /forget (JSON {"user": U, "item": I} or {"user": U, "all": true}, checked like '
        "`receraser forget`) and GET /requests/ID; the last two need 'Authorization: Bearer TOKEN', the token "
        "being $RECERASER_SERVE_TOKEN or else <state dir>/serve.token (made with mode 0600 on first start). "
        "Every response names the model in X-Model-Version (first 12 hex digits of serving.pt's SHA-256) and "
        "the applied deletion requests it excludes in X-Deletions-Applied (ranges, e.g. 1-3,7). A background "
        "thread polls the serving snapshot every --poll seconds and, when `receraser unlearn` or the Dagster "
        "sensor has rebuilt it, loads the new model and swaps it in between two requests. A user whose "
        "erasure is pending gets 404 at once. OpenAPI docs at /docs and /openapi.json. Ctrl-C stops it.",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--poll", type=_seconds, default=0.5, help="seconds between checks for a new model (default 0.5)")
    s.add_argument(
        "--threads",
        type=_positive,
        default=1,
        help="torch CPU threads for scoring and loading (default 1: one request's scoring is too small to share)",
    )
    s.add_argument("--access-log", action="store_true", help="print a line per request (off by default)")
    add_pipeline_arguments(s)
    s.set_defaults(func=cmd_serve)
