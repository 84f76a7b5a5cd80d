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

A background task polls the champion pointer and `models/ab.yaml` every `reload_seconds`
and swaps to a newly promoted model or a new challenger without dropping requests (see
`rtb.serving.service`). With a challenger, a request's arm follows its id (`rtb.serving.ab`):
in split mode the challenger answers its share, in shadow mode the champion answers and,
after the answer is sent, the challenger scores the same rows for the shadow log
(`rtb.serving.shadow`). Every answer names its arm and model; `GET /metrics` counts them
(`rtb.serving.metrics`). `--workers N` runs N such processes on one port (`rtb.serving.workers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from rtb.config import DATASET_CONFIG_ENV, ProjectPaths
from rtb.dataset_config import DatasetConfig, load_dataset_config
from rtb.errors import RtbError
from rtb.field_rules import FieldRule, field_rules
from rtb.serving.ab import CHALLENGER, CHAMPION, SPLIT
from rtb.serving.metrics import CONTENT_TYPE, PREDICT, ServingMetrics
from rtb.serving.schema import (
    UNKNOWN_FIELD,
    PredictResponse,
    ReloadAnswer,
    adapters,
    error_responses,
    request_body_schema,
)
from rtb.serving.service import Challenger, ReloadResult, ScoringService
from rtb.serving.shadow import DEFAULT_MAX_BYTES as SHADOW_MAX_BYTES
from rtb.serving.shadow import ShadowLog, ShadowRecord, shadow_dir

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
NOT_SCORED = "none"  # the arm and model label of an answer that scored nothing
ENDPOINTS = frozenset({"/health", "/model", "/reload", "/metrics", "/docs", "/openapi.json"})

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Answer:
    """What POST /predict answers, which arm and model scored it, and the shadow work left."""

    __slots__ = ("status", "payload", "arm", "model", "rows", "shadow")

    def __init__(self, status: int, payload: bytes, arm: str = NOT_SCORED,
                 model: str = NOT_SCORED, rows: int = 0,
                 shadow: tuple[Challenger, list, list[float], str] | None = None) -> None:
        self.status, self.payload, self.arm, self.model = status, payload, arm, model
        self.rows, self.shadow = rows, shadow


class PredictHandler:
    """Bytes in, an `Answer` out: validation, the arm, scoring and errors for POST /predict."""

    def __init__(self, service: ScoringService, cfg: DatasetConfig, max_batch: int,
                 max_body_bytes: int, shadow_log: ShadowLog | None = None) -> None:
        self.service = service
        self.max_batch = max_batch
        self.max_body_bytes = max_body_bytes
        self.one, self.many, _ = adapters(cfg, max_batch)
        self.rules = field_rules(cfg)
        self.id_field = cfg.id
        self.shadow_log = shadow_log

    def __call__(self, body: bytes) -> Answer:
        model = self.service.current  # read once: the whole request uses these models
        challenger = self.service.challenger
        listed = body.lstrip()[:1] == b"["
        try:
            rows = self.many.validate_json(body) if listed else [self.one.validate_json(body)]
        except ValidationError as exc:
            return Answer(*self._invalid(exc))
        arm, shadow = CHAMPION, None
        if challenger is not None and challenger.config.picks_challenger(
                rows[0].get(self.id_field) if self.id_field else None):
            if challenger.config.mode == SPLIT:
                arm, model = CHALLENGER, challenger.model
            else:
                shadow = challenger
        probabilities = _score(model.scorer, rows, listed)
        payload = _dumps({"model": model.version, "arm": arm, "probabilities": probabilities})
        return Answer(200, payload, arm, model.version, len(rows),
                      None if shadow is None else (shadow, rows, probabilities, model.version))

    def shadow(self, answer: Answer) -> None:
        """Score the answered rows with the shadow challenger and queue both scores for the
        log. Runs after the answer was sent; a failure here never reaches the client."""
        if answer.shadow is None or self.shadow_log is None:
            return
        challenger, rows, champion_p, champion = answer.shadow
        try:
            challenger_p = _score(challenger.model.scorer, rows, len(rows) > 1)
        except Exception:
            log.exception("shadow scoring by %s failed", challenger.model.version)
            self.shadow_log.on_dropped(len(rows))
            return
        ids = [row.get(self.id_field) for row in rows] if self.id_field else [None] * len(rows)
        self.shadow_log.put(ShadowRecord(time.time(), ids, champion, champion_p,
                                         challenger.model.version, challenger_p))

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
    """ASGI entry point: POST /predict handled raw, everything else delegated to FastAPI;
    every HTTP answer counted in the metrics."""

    def __init__(self, api: FastAPI, handler: PredictHandler, metrics: ServingMetrics) -> None:
        self.api = api
        self.handler = handler
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)
        elif scope["path"] == "/predict" and scope["method"] == "POST":
            await self._predict(scope, receive, send)
        else:
            await self._counted(scope, receive, send)

    async def _predict(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        try:
            body = await read_body(scope, receive, self.handler.max_body_bytes)
            answer = (Answer(*self.handler.too_large()) if body is None
                      else self.handler(body))
        except Exception:  # never a stack trace to the client; the log gets it
            log.exception("POST /predict failed")
            answer = Answer(500, INTERNAL_ERROR)
        payload = answer.payload
        await send({
            "type": "http.response.start",
            "status": answer.status,
            "headers": [*JSON_HEADERS, (b"content-length", str(len(payload)).encode())],
        })
        await send({"type": "http.response.body", "body": payload})
        self.metrics.observe(PREDICT, answer.status, answer.arm, answer.model, answer.rows,
                             time.perf_counter() - started)
        if answer.shadow is not None:
            self.handler.shadow(answer)

    async def _counted(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """Delegate to FastAPI, counting the answer's status under its route."""
        started = time.perf_counter()
        status = 500

        async def counting_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope["path"]
        endpoint = path if path in ENDPOINTS or path == PREDICT else "other"
        try:
            await self.api(scope, receive, counting_send)
        finally:
            self.metrics.observe(endpoint, status, NOT_SCORED, NOT_SCORED, 0,
                                 time.perf_counter() - started)


def _score(scorer: Any, rows: list, listed: bool) -> list[float]:
    return scorer.score_many(rows) if listed else [scorer.score_one(rows[0])]


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
               max_body_bytes: int | None = None, reload_seconds: float = 5.0,
               shadow_max_bytes: int | None = None) -> ServingApp:
    """The ASGI app for one service; the reload poll runs while the app's lifespan is on."""
    if max_batch < 1:
        raise RtbError(f"--max-batch: expected at least 1, got {max_batch}")
    max_body_bytes = max_body_bytes or max(MIN_BODY_BYTES, max_batch * BYTES_PER_ROW)
    metrics = ServingMetrics()
    shadow_log = ShadowLog(shadow_dir(service.paths.reports_dir),
                           max_bytes=shadow_max_bytes or SHADOW_MAX_BYTES,
                           on_written=metrics.shadow_rows.inc,
                           on_dropped=metrics.shadow_dropped.inc)
    handler = PredictHandler(service, service.cfg, max_batch, max_body_bytes, shadow_log)
    metrics.show_models(arms(service))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        poller = None
        if reload_seconds > 0:
            poller = asyncio.create_task(_poll(service, metrics, reload_seconds))
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            await asyncio.to_thread(shadow_log.close)

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
        answer = Answer(*handler.too_large()) if body is None else handler(body)
        handler.shadow(answer)
        return Response(answer.payload, status_code=answer.status, media_type="application/json")

    @api.get("/health", summary="Liveness, and the version of the model being served")
    async def health() -> dict[str, object]:
        model = service.current
        return {"status": "ok", "model": model.version, "scorer": model.scorer.kind}

    @api.get("/model", summary="The model being served: version, sha256, metrics, scorer")
    async def model_info() -> dict[str, object]:
        info = service.current.describe()
        info["pinned"] = service.pinned
        info["last_reload_error"] = service.last_error
        challenger = service.challenger
        info["ab"] = None if challenger is None else challenger.describe()
        info["last_ab_error"] = service.last_ab_error
        info["pid"] = os.getpid()  # which worker answered (`--workers N`)
        return info

    @api.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.scrape(), media_type=CONTENT_TYPE)

    @api.post("/reload", summary="Swap to the current champion now if it changed",
              response_model=ReloadAnswer,
              responses={409: {"model": ReloadAnswer,
                               "description": "The champion failed to load; still serving the "
                               "model named in `model`"}})
    async def reload() -> JSONResponse:
        result = await _reload(service, metrics, force=True)
        return JSONResponse(result.as_dict(), status_code=409 if result.error else 200)

    return ServingApp(api, handler, metrics)


def arms(service: ScoringService) -> list[tuple[str, Any]]:
    """(arm, model) pairs for the metrics' info and age gauges."""
    challenger = service.challenger
    return [(CHAMPION, service.current),
            (CHALLENGER, None if challenger is None else challenger.model)]


async def _reload(service: ScoringService, metrics: ServingMetrics, *, force: bool = False
                  ) -> ReloadResult:
    """Follow the champion pointer, then the A/B file, off the event loop; count the swaps
    and failures. Returns the champion's result (what POST /reload answers)."""
    result = await asyncio.to_thread(service.reload, force=force)
    metrics.reloaded("champion", swapped=result.reloaded, failed=result.error is not None)
    ab = await asyncio.to_thread(service.reload_ab, force=force)
    metrics.reloaded("ab", swapped=ab.reloaded, failed=ab.error is not None)
    metrics.show_models(arms(service))
    return result


async def _poll(service: ScoringService, metrics: ServingMetrics, period: float) -> None:
    """Look at the champion pointer and the A/B file every `period` seconds."""
    while True:
        await asyncio.sleep(period)
        try:
            await _reload(service, metrics)
        except Exception:  # a poll must never die: the next one may succeed
            log.exception("champion poll failed")


@dataclass(frozen=True)
class ServeOptions:
    """Everything `rtb serve` was asked for: picklable, so that workers get the same."""

    paths: ProjectPaths
    host: str
    port: int
    model_path: Path | None
    max_batch: int
    reload_seconds: float
    max_body_bytes: int | None = None
    dataset_config: str | None = None
    workers: int = 1


def build_app(options: ServeOptions) -> ServingApp:
    """Load the model (RtbError if it is missing or broken) and build the app around it."""
    cfg = load_dataset_config(options.dataset_config or os.environ.get(DATASET_CONFIG_ENV))
    service = ScoringService.start(options.paths, cfg, model_path=options.model_path)
    return create_app(service, max_batch=options.max_batch,
                      max_body_bytes=options.max_body_bytes,
                      reload_seconds=options.reload_seconds)


def uvicorn_server(app: ServingApp, host: str, port: int) -> Any:
    """The uvicorn server every process runs: uvloop and httptools, no access log."""
    import uvicorn

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
    return uvicorn.Server(config)


def run_server(options: ServeOptions) -> None:
    """Load the model (RtbError before anything listens if it is missing or broken), serve;
    with `workers` > 1, in that many processes (see `rtb.serving.workers`)."""
    if options.workers > 1:
        from rtb.serving.workers import run_workers

        run_workers(options)
        return
    app = build_app(options)
    log.info("serving model %s on http://%s:%d (docs at /docs)",
             app.handler.service.current.version, options.host, options.port)
    server = uvicorn_server(app, options.host, options.port)
    server.run()
    if not server.started:
        raise RtbError(f"could not listen on {options.host}:{options.port} (see the log above)")
