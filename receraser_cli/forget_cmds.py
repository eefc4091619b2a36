"""`receraser forget / unlearn / status / recommend`: the forgetting service from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from receraser_cli.dagster_jobs import _context, add_pipeline_arguments, settings_from
from receraser_core.data.interactions import DataError
from receraser_core.state_file import load_state


def _run_dir(args: argparse.Namespace):  # noqa: ANN202
    rec = settings_from(args)
    run = rec.run_dir()
    if not run.interactions.exists():
        raise DataError(f"no pipeline state at {run.root}; run `receraser run` first")
    return rec, run


SPLIT_NAMES = (("train", "training"), ("valid", "validation"), ("test", "test"))


def cmd_forget(args: argparse.Namespace) -> int:
    from dagster_project.unlearn import ledger_for
    from pipelines.forget import ForgetError, file_requests, read_request_file, split_counts
    from pipelines.ledger import NewRequest
    from pipelines.steps import load_interactions

    rec, run = _run_dir(args)
    if args.file:
        if args.user or args.item or args.all:
            raise ForgetError("use either --file or --user/--item/--all, not both")
        requests = read_request_file(args.file)
    else:
        if not args.user or bool(args.item) == bool(args.all):
            raise ForgetError("give --user U with either --item I or --all (or --file requests.csv)")
        kind = "user" if args.all else "interaction"
        requests = [NewRequest(kind, str(args.user), "" if args.all else str(args.item), args.reason or "")]
    inter = load_interactions(run.interactions)
    ledger = ledger_for(rec)
    for (rid, new, n), req in zip(file_requests(ledger, inter, requests), requests, strict=True):
        what = f"user {req.user_id}" + (f", item {req.item_id}" if req.kind == "interaction" else " (all records)")
        state = "recorded" if new else f"already recorded ({ledger.get([rid])[0].status})"
        split = split_counts(inter, req)
        parts = ", ".join(f"{split[k]} {name}" for k, name in SPLIT_NAMES if split[k])
        print(f"request #{rid}: {what}: {n} stored record(s) ({parts or 'already removed'}), {state}")
    print("apply with `receraser unlearn` (or let the Dagster sensor do it while `dagster dev` runs)")
    return 0


def cmd_unlearn(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    from dagster_project.unlearn import unlearn_pending

    instance, rec, tracker = _context(args)
    report = unlearn_pending(instance, rec, tracker, log=lambda m: print(m, flush=True), wait=args.wait)
    if report is not None:
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
        print(f"retrained shard(s) {report.shards}; {parts}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from dagster_project.unlearn import ledger_for

    rec, run = _run_dir(args)
    if args.request is not None:
        from dagster_project.erasure_report import erasure_report, format_report

        instance, _, _ = _context(args)
        rep = erasure_report(instance, ledger_for(rec), args.request)
        print(json.dumps(rep, indent=2) if args.json else format_report(rep))
        return 0
    rows = ledger_for(rec).get()
    model = {}
    if run.serving.exists():
        state = load_state(run.serving, "serving snapshot")
        model = {"built_at": Path(run.serving).stat().st_mtime, "training_records": int(state["train"].nnz)}
    applied = [r.id for r in rows if r.status == "applied"]
    if args.json:
        print(
            json.dumps(
                {"requests": [r.to_dict() for r in rows], "serving_model": model, "serving_model_excludes": applied},
                indent=2,
            )
        )
        return 0
    print(f"{'id':>4} {'status':8} {'kind':11} {'user':>8} {'item':>8} {'records':>7} {'shards':10} applied_at / error")
    for r in rows:
        tail = r.applied_at if r.status == "applied" else r.error
        user, item = ("(erased)", "") if r.erased else (r.user_id, r.item_id or "*")
        print(
            f"{r.id:>4} {r.status:8} {r.kind:11} {user:>8} {item:>8} {r.records:>7} "
            f"{','.join(map(str, r.shards)) or '-':10} {tail}"
        )
    if any(r.erased for r in rows):
        print("(erased): applied; the ledger keeps only a keyed hash of the ids (a repeat is still recognised)")
    if model:
        print(
            f"serving model: trained on {model['training_records']:,} records; excludes applied request(s) "
            f"{applied or 'none'}"
        )
    return 0


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def cmd_recommend(args: argparse.Namespace) -> int:
    from pipelines.steps import load_interactions, load_serving, top_items
    from receraser_core.data.readers import load_titles

    _, run = _run_dir(args)
    inter = load_interactions(run.interactions)
    agg, train = load_serving(run)
    try:
        u = inter.user_index(args.user)
    except KeyError as exc:
        raise DataError(str(exc.args[0])) from None
    top, scores, masked = top_items(agg.score, train, u, args.n)
    titles = load_titles(inter)
    print(f"top {len(top)} for user {args.user} ({masked} training items masked):")
    for rank, i in enumerate(top, start=1):
        title = f"  {titles[i]}" if titles else ""
        print(f"{rank:>3}. item {inter.item_ids[i]}{title}  (score {float(scores[i]):.3f})")
    return 0


def add_forget_parsers(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser(
        "forget",
        help="record a request to forget training records (applied by `unlearn` or the Dagster sensor)",
        description="Ids are the dataset's original ids (MovieLens UserID / MovieID). --file takes a CSV with "
        "header user,item[,reason] (empty item or * = every record of the user); all rows are checked before "
        "any is recorded. A repeated request is recognised, not duplicated.",
    )
    f.add_argument("--user", help="original user id")
    f.add_argument("--item", help="original item id")
    f.add_argument("--all", action="store_true", help="every training record of --user (GDPR erasure)")
    f.add_argument("--file", type=Path, help="CSV of requests")
    f.add_argument("--reason", default="", help="free text kept in the ledger")
    add_pipeline_arguments(f)
    f.set_defaults(func=cmd_forget)

    u = sub.add_parser("unlearn", help="apply all outstanding requests now (retrains only the affected shards)")
    add_pipeline_arguments(u)
    u.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads outside training (evaluation; default: torch's choice). Training always runs "
        "at one thread per process, so a deletion gives the same models whoever applies it",
    )
    u.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="if another applier (a CLI unlearn, the Dagster sensor's run) is applying requests, wait up to this "
        "long for it before giving up (default 0: exit at once with a line naming it)",
    )
    u.set_defaults(func=cmd_unlearn)

    s = sub.add_parser("status", help="the deletion ledger: pending / applied / failed requests and the model")
    s.add_argument("--json", action="store_true", help="machine-readable output (with --request: the report)")
    s.add_argument(
        "--request",
        type=int,
        help="the erasure report of request N: what was asked, when it was received and applied, the records and "
        "shards it touched, the Dagster runs that rebuilt each artifact with its data version before and after, "
        "the MLflow runs, and the statement of exactness",
    )
    add_pipeline_arguments(s)
    s.set_defaults(func=cmd_status)

    r = sub.add_parser("recommend", help="top-N items for a user from the current aggregated model")
    r.add_argument("--user", required=True, help="original user id")
    r.add_argument(
        "-n",
        type=_positive,
        default=10,
        help="how many items (default 10); fewer when the user has fewer items left to rank (not trained on)",
    )
    add_pipeline_arguments(r)
    r.set_defaults(func=cmd_recommend)
