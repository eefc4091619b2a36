"""The recommendation service behind `receraser serve`: a FastAPI app over the serving snapshot that swaps in
each new model unlearning writes, without a restart.

    GET  /recommend?user=U&n=20   top-n items for an original user id, the user's training items masked
    GET  /health                  the model being served
    POST /forget                  record a request to forget, checked as `receraser forget` checks it (token)
    GET  /requests/{id}           a request's status in the deletion ledger (token)

Every response carries ``X-Model-Version`` (the first 12 hex digits of the serving snapshot's SHA-256, as
recorded in ``serving.pt.sha256``) and ``X-Deletions-Applied`` (the applied requests the model excludes, as
ranges such as ``1-3,7``; empty for none).

Hot swap: a background thread reads the ledger and the recorded hashes of the serving snapshot and the id map
every ``poll`` seconds. When they change (`receraser unlearn` or the Dagster sensor rebuilt the aggregator in
another process) it loads the new snapshot fully, off the request path: the scorer with the full user and item
embeddings, the training matrix for masking, the id map. Then it replaces one reference, the `View`. Each
request reads that reference once, so it is answered wholly by the old model or wholly by the new one and never
waits for a load; until a load succeeds the previous model keeps serving. A user whose erasure is outstanding
(a ``user`` request pending, applying or failed) gets the same 404 as an unknown user at once: right after
POST /forget here, within one poll after `receraser forget`.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import scipy.sparse as sp
import torch
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.forget import ForgetError, file_requests
from pipelines.ledger import Ledger, NewRequest
from pipelines.steps import RunDir, load_interactions, load_serving, top_items
from receraser_core.data.interactions import DataError, Interactions
from receraser_core.data.readers import load_titles
from receraser_core.state_file import checksum_path

TOKEN_ENV = "RECERASER_SERVE_TOKEN"
VIEW = "receraser.view"  # the scope key a request's pinned `View` is kept under
BEARER = HTTPBearer(auto_error=False, description="the token in <state dir>/serve.token, or $RECERASER_SERVE_TOKEN")
Log = Callable[[str], None]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


def serve_token(state: Path) -> tuple[str, str]:
    """The bearer token of POST /forget and GET /requests: ``$RECERASER_SERVE_TOKEN``, else the content of
    ``<state>/serve.token`` (created with mode 0600 on first start). Returns the token and where it is."""
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env, f"${TOKEN_ENV}"
    path = Path(state) / "serve.token"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made on an earlier start (or by another process just now)
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
    token = path.read_text().strip()
    if not token:
        raise DataError(f"{path} is empty; delete it and a new token is made on the next start")
    return token, str(path)


def _recorded_hash(path: Path) -> str:
    """The content hash recorded beside a pipeline file ('' when there is none)."""
    try:
        return checksum_path(path).read_text().strip()
    except OSError:
        return ""


def _ranges(ids: tuple[int, ...]) -> str:
    """``(1, 2, 3, 7)`` -> ``'1-3,7'``."""
    out: list[str] = []
    start = prev = None
    for i in sorted(ids):
        if prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            out.append(f"{start}-{prev}" if prev != start else str(start))
        start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(out)


@dataclass(frozen=True)
class Model:
    """One loaded serving snapshot with what makes a request cheap."""

    serving_hash: str
    interactions_hash: str
    score: Callable[[torch.Tensor], torch.Tensor]  # (users,) -> (users, n_items), full embeddings precomputed
    train: sp.csr_matrix  # (n_users, n_items): what the model was trained on, masked in its recommendations
    inter: Interactions  # the stored id maps and splits (requests are checked against it)
    users: dict[str, int]  # original user id -> index
    item_ids: list[str]
    titles: dict[int, str]
    loaded_at: str

    @property
    def version(self) -> str:
        return self.serving_hash[:12]


def load_model(run: RunDir) -> Model:
    """Load the serving snapshot and the id map as they are now; `DataError` if either is missing, damaged,
    replaced while being read, or if the two disagree in shape (a rebuild is under way)."""
    hashes = _recorded_hash(run.serving), _recorded_hash(run.interactions)
    agg, train = load_serving(run)
    inter = load_interactions(run.interactions)
    if (_recorded_hash(run.serving), _recorded_hash(run.interactions)) != hashes:
        raise DataError(f"{run.root}: the model changed while it was being loaded; loading again")
    if inter.train.shape != train.shape:
        raise DataError(f"{run.root}: the id map and the model differ in shape (a rebuild is under way?)")
    return Model(
        *hashes,
        score=agg.scorer(),
        train=train,
        inter=inter,
        users={str(u): k for k, u in enumerate(inter.user_ids.tolist())},
        item_ids=[str(i) for i in inter.item_ids.tolist()],
        titles=load_titles(inter),
        loaded_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


@dataclass(frozen=True)
class View:
    """What a request reads, replaced as one reference: the model, the applied requests it excludes, and the
    users whose erasure is outstanding."""

    model: Model
    applied: tuple[int, ...]
    erasing: frozenset[str]

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        applied = _ranges(self.applied).encode()
        return [(b"x-model-version", self.model.version.encode()), (b"x-deletions-applied", applied)]


class Service:
    """The current `View`, kept fresh by a polling thread (`start` / `stop`), and the ledger requests go to."""

    def __init__(self, run: RunDir, ledger: Ledger, token: str, poll: float = 0.5, log: Log = print) -> None:
        self.run, self.ledger, self.token, self.poll, self.log = run, ledger, token, poll, log
        self._lock = threading.Lock()  # one writer of `view` at a time
        self._posted: dict[str, float] = {}  # user erasures filed here -> when, until a ledger read covers them
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure = ""
        applied, erasing = self._ledger_state()
        self.view = View(load_model(run), applied, erasing)

    def _ledger_state(self) -> tuple[tuple[int, ...], frozenset[str]]:
        rows = self.ledger.get()
        applied = tuple(r.id for r in rows if r.status == "applied")
        return applied, frozenset(r.user_id for r in rows if r.kind == "user" and r.status != "applied")

    def refresh(self) -> None:
        """One poll: reread the ledger, load a changed snapshot, swap the view.

        The ledger is read before the hashes: a request is marked applied only after the snapshot without it
        was written, so every request applied at that read is excluded by the snapshot the hashes then name."""
        started = time.monotonic()
        applied, erasing = self._ledger_state()
        model = self.view.model
        current = (_recorded_hash(self.run.serving), _recorded_hash(self.run.interactions)) == (
            model.serving_hash,
            model.interactions_hash,
        )
        if not current:
            try:
                t = time.perf_counter()
                model = load_model(self.run)
            except DataError as exc:  # half-written or replaced under us: the old model serves, retry next poll
                if str(exc) != self._failure:
                    self.log(f"keeping model {model.version}: {exc}")
                self._failure = str(exc)
            else:
                current, self._failure = True, ""
                if model.serving_hash != self.view.model.serving_hash:
                    self.log(
                        f"model {model.version} loaded in {time.perf_counter() - t:.2f} s; serving it "
                        f"(excludes applied request(s) {_ranges(applied) or 'none'})"
                    )
        with self._lock:
            self._posted = {u: t for u, t in self._posted.items() if t >= started}  # older ones are in `erasing`
            old = self.view
            if not current:  # an erasure applied since may not be in the old model's id map: keep hiding it
                applied, erasing = old.applied, erasing | old.erasing
            self.view = View(model, applied, erasing | frozenset(self._posted))

    def forget(self, req: NewRequest) -> tuple[int, bool, int, str]:
        """Record one request (as `receraser forget` does); a user erasure is hidden from the next request on.
        Returns (request id, is new, stored records it names, status)."""
        with self._lock:
            [(rid, new, records)] = file_requests(self.ledger, self.view.model.inter, [req])
            status = self.ledger.get([rid])[0].status
            if req.kind == "user" and status != "applied":
                self._posted[req.user_id] = time.monotonic()
                self.view = replace(self.view, erasing=self.view.erasing | {req.user_id})
        return rid, new, records, status

    def _poll(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - a locked or busy ledger: say so, keep serving, poll again
                self.log(f"poll failed ({type(exc).__name__}: {exc}); keeping model {self.view.model.version}")

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="receraser-model-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class PinView:
    """ASGI middleware: pins the current `View` for the whole request and adds its headers to the response,
    so the headers name the model that answered."""

    def __init__(self, app: Callable[..., Awaitable[None]], service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Callable[..., Awaitable[Any]], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        view = scope[VIEW] = self.service.view

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *view.headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Recommendation(BaseModel):
    item: str
    score: float
    title: str | None = None


class Recommendations(BaseModel):
    user: str
    model_version: str = Field(description="first 12 hex digits of the serving snapshot's SHA-256")
    deletions_applied: list[int] = Field(description="ids of the applied deletion requests this model excludes")
    masked: int = Field(description="training items of the user, never recommended")
    items: list[Recommendation]


class Health(BaseModel):
    status: str
    model_version: str
    deletions_applied: list[int]
    loaded_at: str
    dataset: str
    users: int
    items: int
    training_records: int


class ForgetBody(BaseModel):
    """One request to forget: ``{"user": U, "item": I}`` (one record) or ``{"user": U, "all": true}``."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    user: str = Field(description="original user id (MovieLens UserID)")
    item: str | None = Field(default=None, description="original item id (MovieLens MovieID)")
    all: bool = Field(default=False, description="every stored record of the user (erasure)")
    reason: str = Field(default="", description="free text kept in the ledger")


class Filed(BaseModel):
    request: int
    new: bool = Field(description="false when the same request was recorded before")
    status: str
    records: int = Field(description="stored records (training, validation, test) the request names")


def _problem(e: dict[str, Any]) -> str:
    """One validation error as 'where: what' (the JSON body's own syntax error as such)."""
    if e["type"] == "json_invalid":
        return f"the body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})"
    if tuple(e["loc"]) == ("body",) and e["type"] in ("model_attributes_type", "dict_type"):
        return "the body must be a JSON object, sent with 'Content-Type: application/json'"
    return f"{'.'.join(map(str, e['loc'][1:])) or e['loc'][0]}: {e['msg']}"


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status, headers=headers)


def create_app(service: Service) -> FastAPI:
    """The app; `service` must be loaded. The polling thread runs while the app does (its lifespan)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        service.stop()

    app = FastAPI(
        title="receraser",
        summary="Recommendations from a model that forgets: deletions are applied by retraining only the affected "
        "shards, and the service swaps in the new model without a restart.",
        lifespan=lifespan,
    )
    app.add_middleware(PinView, service=service)

    unauthorized = HTTPException(
        401,
        "missing or wrong bearer token: send 'Authorization: Bearer TOKEN' with the token `receraser serve` names "
        "at start",
        headers={"WWW-Authenticate": "Bearer"},
    )

    def valid(token: str | None) -> bool:
        return token is not None and secrets.compare_digest(token.encode(), service.token.encode())

    def authorized(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if not valid(cred.credentials if cred else None):
            raise unauthorized

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_input(request: Request, exc: RequestValidationError) -> JSONResponse:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if request.method == "POST" and not valid(token if scheme.lower() == "bearer" else None):
            return await http_error(request, unauthorized)  # FastAPI reads a POST's JSON before the token check
        return _error(422, "; ".join(map(_problem, exc.errors())))

    @app.get("/recommend", response_model=Recommendations)
    async def recommend(
        request: Request,
        user: Annotated[str, Query(description="original user id (MovieLens UserID)")],
        n: Annotated[int, Query(ge=1, description="how many items; fewer when fewer are left to rank")] = 20,
    ) -> JSONResponse:
        """Top-n items for a user from the serving model, the user's training items masked. 404 for an unknown
        user, an erased one, and one whose erasure is outstanding."""
        view: View = request.scope[VIEW]
        m = view.model
        u = m.users.get(user) if user not in view.erasing else None
        if u is None:
            raise HTTPException(404, f"unknown user id {user!r} in dataset {m.inter.name}")
        top, scores, masked = top_items(m.score, m.train, u, n)
        items = [
            {"item": m.item_ids[i], "score": s, **({"title": m.titles[i]} if m.titles else {})}
            for i, s in zip(top, scores[top].tolist(), strict=True)
        ]
        body = {
            "user": user,
            "model_version": m.version,
            "deletions_applied": list(view.applied),
            "masked": masked,
            "items": items,
        }
        return JSONResponse(body)

    @app.get("/health", response_model=Health)
    async def health(request: Request) -> JSONResponse:
        """The model being served: its version, the applied requests it excludes, when it was loaded."""
        view: View = request.scope[VIEW]
        m = view.model
        body = {
            "status": "ok",
            "model_version": m.version,
            "deletions_applied": list(view.applied),
            "loaded_at": m.loaded_at,
            "dataset": m.inter.name,
            "users": m.train.shape[0],
            "items": m.train.shape[1],
            "training_records": int(m.train.nnz),
        }
        return JSONResponse(body)

    @app.post("/forget", status_code=202, response_model=Filed, dependencies=[Depends(authorized)])
    def forget(body: ForgetBody) -> JSONResponse:
        """Record a request to forget, checked as `receraser forget` checks it (nothing is recorded when it
        fails). `receraser unlearn` or the Dagster sensor applies it; the service then swaps in the new model.
        A user erasure hides the user from /recommend at once."""
        if not body.user or bool(body.item) == body.all:
            raise HTTPException(400, 'give "user" with either "item" or "all": true')
        kind = "user" if body.all else "interaction"
        req = NewRequest(kind, body.user, "" if body.all else str(body.item), body.reason)
        try:
            rid, new, records, status = service.forget(req)
        except ForgetError as exc:
            raise HTTPException(400, str(exc)) from None
        return JSONResponse({"request": rid, "new": new, "status": status, "records": records}, status_code=202)

    @app.get("/requests/{request_id}", dependencies=[Depends(authorized)])
    def request_status(request_id: int, request: Request) -> JSONResponse:
        """A request in the deletion ledger: its status (pending, applying, applied, failed), shards, runs; and
        whether the model answering excludes it. An applied request's ids are erased (a keyed hash stays)."""
        rows = service.ledger.get([request_id])
        if not rows:
            raise HTTPException(404, f"no deletion request #{request_id}")
        view: View = request.scope[VIEW]
        return JSONResponse({**rows[0].to_dict(), "excluded_by_serving_model": request_id in view.applied})

    return app
