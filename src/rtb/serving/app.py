"""`rtb serve`: the HTTP scoring service (FastAPI app, uvicorn server).

POST /predict is the hot path and is answered by a raw ASGI handler in front of FastAPI:
FastAPI's per-request machinery (dependency solving, body parsing, response validation)
costs more than scoring a row, and at 1,000 requests/s on two cores that is the difference
between meeting a 5 ms p99 and not. The handler keeps FastAPI's contract: pydantic validates
the body straight from JSON bytes (the same schema the OpenAPI docs show), errors come back
as 422 in FastAPI's `{"detail": [{"type", "loc", "msg"}]}` shape, one entry per offending
field (every one, not only the first) with the field rule's `expected` beside. Everything
else (/health, /model, /reload, /docs, /openapi.json) is plain FastAPI; POST /predict is
also declared there, with the same handler, so it is documented and reachable either way.

A background task polls the champion pointer every `reload_seconds` and swaps to a newly
promoted model without dropping requests (see `rtb.serving.service`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from rtb.config import DATASET_CONFIG_ENV, ProjectPaths
from rtb.dataset_config import DatasetConfig, load_dataset_config
from rtb.errors import RtbError
from rtb.field_rules import FieldRule, field_rules
from rtb.serving.schema import (
    UNKNOWN_FIELD,
    PredictResponse,
    ReloadAnswer,
    adapters,
    error_responses,
    request_body_schema,
)
from rtb.serving.service import ScoringService

try:  # orjson is much faster than json for the response; json keeps the service working
    import orjson

    def _dumps(payload: object) -> bytes:
        return orjson.dumps(payload)
except ImportError:  # pragma: no cover - exercised only without orjson
    def _dumps(payload: object) -> bytes:
        return json.dumps(payload, separators=(",", ":")).encode()

log = logging.getLogger(__name__)

BYTES_PER_ROW = 1024  # a raw row is ~350 bytes of JSON; 1 MB per 1,000 rows leaves room
MIN_BODY_BYTES = 64 * 1024
JSON_HEADERS = [(b"content-type", b"application/json")]
INTERNAL_ERROR = b'{"detail":"internal server error"}'

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class PredictHandler:
    """Bytes in, (status, JSON bytes) out: validation, scoring and errors for POST /predict."""

    def __init__(self, service: ScoringService, cfg: DatasetConfig, max_batch: int,
                 max_body_bytes: int) -> None:
        self.service = service
        self.max_batch = max_batch
        self.max_body_bytes = max_body_bytes
        self.one, self.many, _ = adapters(cfg, max_batch)
        self.rules = field_rules(cfg)

    def __call__(self, body: bytes) -> tuple[int, bytes]:
        model = self.service.current  # read once: the whole request uses this model
        stripped = body.lstrip()
        try:
            if stripped[:1] == b"[":
                rows = self.many.validate_json(body)
                probabilities = model.scorer.score_many(rows)
            else:
                probabilities = [model.scorer.score_one(self.one.validate_json(body))]
        except ValidationError as exc:
            return self._invalid(exc)
        return 200, _dumps({"model": model.version, "probabilities": probabilities})

    def _invalid(self, exc: ValidationError) -> tuple[int, bytes]:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        for error in errors:
            if error["type"] == "too_long" and error["loc"] == ():
                detail = (f"batch too large: at most {self.max_batch} rows per request "
                          "(--max-batch)")
                return 413, _dumps({"detail": detail})
        return 422, _dumps({"detail": field_errors(errors, self.rules)})

    def too_large(self) -> tuple[int, bytes]:
        detail = f"request body too large: at most {self.max_body_bytes} bytes"
        return 413, _dumps({"detail": detail})


class ServingApp:
    """ASGI entry point: POST /predict handled raw, everything else delegated to FastAPI."""

    def __init__(self, api: FastAPI, handler: PredictHandler) -> None:
        self.api = api
        self.handler = handler

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/predict" and scope["method"] == "POST":
            await self._predict(scope, receive, send)
        else:
            await self.api(scope, receive, send)

    async def _predict(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        try:
            body = await read_body(scope, receive, self.handler.max_body_bytes)
            status, payload = self.handler.too_large() if body is None else self.handler(body)
        except Exception:  # never a stack trace to the client; the log gets it
            log.exception("POST /predict failed")
            status, payload = 500, INTERNAL_ERROR
        await send({
            "type": "http.response.start",
            "status": status,
            "headers": [*JSON_HEADERS, (b"content-length", str(len(payload)).encode())],
        })
        await send({"type": "http.response.body", "body": payload})


def field_errors(errors: list[Any], rules: dict[str, FieldRule]) -> list[dict[str, object]]:
    """One entry per offending field (row by row, in schema order), each with its rule.

    pydantic reports a value that fits no branch of a union (text or integer) once per
    branch, with the branch's tag in `loc`; a bidder needs the field, once, and its rule.
    """
    merged: dict[tuple, dict[str, Any]] = {}
    for error in errors:
        loc = tuple(error["loc"])
        named = next((i for i, part in enumerate(loc) if isinstance(part, str)), None)
        key = loc if named is None else loc[: named + 1]
        rule = rules.get(key[-1]) if named is not None else None
        msg = error["msg"].removeprefix("Value error, ")
        if error["type"] == "string_pattern_mismatch" and rule is not None:
            msg = rule.pattern_message  # not the regex itself
        entry = merged.get(key)
        if entry is None:
            expected = rule.request_expected if rule is not None else None
            if error["type"] == "extra_forbidden":
                expected = UNKNOWN_FIELD
            merged[key] = {"type": error["type"], "loc": ["body", *key], "msg": msg,
                           "expected": expected}
        elif msg not in entry["msg"]:
            entry["msg"] += f"; or {msg[0].lower()}{msg[1:]}"
    return list(merged.values())


async def read_body(scope: dict[str, Any], receive: Receive, limit: int) -> bytes | None:
    """The request body, or None as soon as it is known to exceed `limit` bytes."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                if int(value) > limit:
                    return None
            except ValueError:
                return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def create_app(service: ScoringService, *, max_batch: int = 1000,
               max_body_bytes: int | None = None, reload_seconds: float = 5.0) -> ServingApp:
    """The ASGI app for one service; the reload poll runs while the app's lifespan is on."""
    if max_batch < 1:
        raise RtbError(f"--max-batch: expected at least 1, got {max_batch}")
    max_body_bytes = max_body_bytes or max(MIN_BODY_BYTES, max_batch * BYTES_PER_ROW)
    handler = PredictHandler(service, service.cfg, max_batch, max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        poller = None
        if reload_seconds > 0 and not service.pinned:
            poller = asyncio.create_task(_poll(service, reload_seconds))
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller

    api = FastAPI(
        title="rtb scoring service",
        description="Install probability for real-time-bidding requests, from the champion "
        "model (or the one given with --model).",
        version="1",
        lifespan=lifespan,
    )

    @api.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> Response:
        log.error("unhandled %s: %s", type(exc).__name__, exc)
        return Response(INTERNAL_ERROR, status_code=500, media_type="application/json")

    @api.post(
        "/predict",
        response_model=PredictResponse,
        openapi_extra={"requestBody": request_body_schema(service.cfg, max_batch)},
        responses=error_responses(service.cfg, max_batch, max_body_bytes),
        summary="Install probability of one request or a list of requests",
    )
    async def predict(request: Request) -> Response:
        body = await read_body(request.scope, request.receive, max_body_bytes)
        status, payload = handler.too_large() if body is None else handler(body)
        return Response(payload, status_code=status, media_type="application/json")

    @api.get("/health", summary="Liveness, and the version of the model being served")
    async def health() -> dict[str, object]:
        model = service.current
        return {"status": "ok", "model": model.version, "scorer": model.scorer.kind}

    @api.get("/model", summary="The model being served: version, sha256, metrics, scorer")
    async def model_info() -> dict[str, object]:
        info = service.current.describe()
        info["pinned"] = service.pinned
        info["last_reload_error"] = service.last_error
        return info

    @api.post("/reload", summary="Swap to the current champion now if it changed",
              response_model=ReloadAnswer,
              responses={409: {"model": ReloadAnswer,
                               "description": "The champion failed to load; still serving the "
                               "model named in `model`"}})
    async def reload() -> JSONResponse:
        result = await asyncio.to_thread(service.reload, force=True)
        return JSONResponse(result.as_dict(), status_code=409 if result.error else 200)

    return ServingApp(api, handler)


async def _poll(service: ScoringService, period: float) -> None:
    """Look at the champion pointer every `period` seconds; load off the event loop."""
    while True:
        await asyncio.sleep(period)
        try:
            await asyncio.to_thread(service.reload)
        except Exception:  # a poll must never die: the next one may succeed
            log.exception("champion poll failed")


def run_server(
    paths: ProjectPaths,
    *,
    host: str,
    port: int,
    model_path: Path | None,
    max_batch: int,
    reload_seconds: float,
    max_body_bytes: int | None = None,
    dataset_config: str | None = None,
) -> None:
    """Load the model (RtbError before anything listens if it is missing or broken), serve."""
    import uvicorn

    cfg = load_dataset_config(dataset_config or os.environ.get(DATASET_CONFIG_ENV))
    service = ScoringService.start(paths, cfg, model_path=model_path)
    app = create_app(service, max_batch=max_batch, max_body_bytes=max_body_bytes,
                     reload_seconds=reload_seconds)
    log.info("serving model %s on http://%s:%d (docs at /docs)", service.current.version,
             host, port)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="auto",  # uvloop and httptools when installed
        http="auto",
        lifespan="on",
        access_log=False,
        server_header=False,
        date_header=False,
        log_config=None,
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise RtbError(f"could not listen on {host}:{port} (see the log above)")
