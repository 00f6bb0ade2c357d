"""The web layer: FastAPI routes of the OpenAI API over the engine, SSE streaming, the API key,
and the limits that keep a hostile client from hurting the others.

It never calls MLX: a request becomes an engine `Job` whose events come back through an asyncio
queue (`loop.call_soon_threadsafe`); a client that hangs up cancels its job, which leaves the batch
at the engine's next step. Every error is an OpenAI error body; an unexpected one is a generic 500
with the traceback only in the server's log.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import UserError
from ..files import parse_json
from . import jobs
from .engine import Engine
from .protocol import APIError, ChatRequest, CompletionRequest, error_body, from_validation
from .responses import Builder
from .sequence import Job, Piece

log = logging.getLogger("mlx_openelm.serve")
MAX_BODY = 4 << 20  # bytes: a whole context of text is ~10 KB; a long chat history far less
BODY_SECONDS = 30.0  # to read a body: 4 MiB at ~1 Mbit/s
STATIC = Path(__file__).parent / "static"
# The chat page runs only its own files; model text is never HTML (app.js), this is a second wall.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def create_app(engine: Engine, model_id: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="mlx-openelm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.model_id, app.state.api_key = engine, model_id, api_key
    app.state.served = None

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=_auth_header(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.error("unexpected error on %s", request.url.path, exc_info=e)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    @app.get("/")
    async def page() -> FileResponse:  # no key needed: the page asks for one on a 401 from /v1/*
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.ready.is_set():
            return JSONResponse({"status": "ok", **engine.load})
        status = "failed" if engine.failed else "loading"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        served = _check(request)
        data = [_model_entry(i) for i in sorted(served.model_ids, key=lambda i: i != model_id)]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> JSONResponse:
        jobs.check_model(_check(request), model)
        return JSONResponse(_model_entry(model))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await _complete(request, ChatRequest, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _complete(request, CompletionRequest, chat=False)

    return app


def _model_entry(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "mlx-openelm"}


def _auth_header(e: APIError) -> dict[str, str] | None:
    return {"WWW-Authenticate": "Bearer"} if e.status == 401 else None


def _check(request: Request) -> jobs.Served:
    """The API key, then whether the model is loaded; the served model's facts."""
    state = request.app.state
    if state.api_key is not None:
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), state.api_key.encode()
        ):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")  # fmt: skip
    engine: Engine = state.engine
    if not engine.ready.is_set():
        raise APIError(503, "the model is still loading", type="server_error",
                       code="model_not_ready")  # fmt: skip
    if state.served is None:
        extra = engine.extra
        ids = {state.model_id, state.model_id.rstrip("/").rsplit("/", 1)[-1]}
        context = engine.model.args.max_context_length
        state.served = jobs.Served(ids, engine.tokenizer, extra["template"], extra["grammars"],
                                   context, engine.max_batch)  # fmt: skip
    return state.served


async def _body(request: Request) -> Any:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise APIError(413, f"the request body is over {MAX_BODY} bytes", code="body_too_large")
    data = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            data.extend(chunk)
            if len(data) > MAX_BODY:
                raise APIError(413, f"the request body is over {MAX_BODY} bytes",
                               code="body_too_large")  # fmt: skip

    try:  # a client that sends its body a byte at a time must not hold its place for ever
        await asyncio.wait_for(read(), BODY_SECONDS)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body took over {BODY_SECONDS:.0f} s to arrive",
                       code="request_timeout") from None  # fmt: skip
    if not data:
        raise APIError(400, "the request body is empty: send a JSON object")
    try:
        return parse_json(bytes(data), "the request body")
    except UserError as e:
        raise APIError(400, str(e), code="invalid_json") from None


async def _complete(request: Request, kind: type, chat: bool) -> Any:
    served = _check(request)
    body = await _body(request)
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = kind.model_validate(body)
    except ValidationError as e:
        raise from_validation(e) from None
    jobs.check_model(served, req.model)
    prompts, params, echo = await run_in_threadpool(_prepare, served, req, chat)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(event: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is going down
            pass

    job = Job(prompts, req.n, params, emit)
    request.app.state.engine.submit(job)
    builder = Builder(served.tokenizer, req.model, chat, job.choices, echo)
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _stream(job, queue, builder, usage)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip
    return await _collect(request, job, queue, builder)


def _prepare(served: jobs.Served, req: Any, chat: bool) -> tuple:
    prompts = [jobs.chat_prompt(served, req)] if chat else jobs.completion_prompts(served, req)
    params = jobs.params(served, req, prompts, chat)
    echo = []
    if not chat and req.echo:
        echo = [served.tokenizer.decode(p) for p in prompts for _ in range(req.n)]
    return prompts, params, echo


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _stream(job: Job, queue: asyncio.Queue, builder: Builder, usage: bool) -> AsyncIterator:
    try:
        while True:
            kind, value = await queue.get()
            if kind == "piece":
                yield _sse(builder.chunk(value))
            elif kind == "done":
                if usage:
                    yield _sse(builder.usage_chunk(value))
                break
            else:
                yield _sse(_error(value).body())
                break
        yield b"data: [DONE]\n\n"
    finally:  # also when the client hangs up: the job leaves the batch at the next step
        job.cancel()


async def _watch_disconnect(request: Request, job: Job) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


async def _collect(request: Request, job: Job, queue: asyncio.Queue, builder: Builder) -> Any:
    watch = asyncio.create_task(_watch_disconnect(request, job))
    pieces: list[list[Piece]] = [[] for _ in range(job.choices)]
    try:
        while True:
            kind, value = await queue.get()
            if kind == "piece":
                pieces[value.index].append(value)
            elif kind == "done":
                return JSONResponse(builder.whole(pieces, value))
            else:
                raise _error(value)
    finally:
        watch.cancel()
        job.cancel()


def _error(e: Exception) -> APIError:
    return e if isinstance(e, APIError) else APIError(500, "internal error", type="server_error")
