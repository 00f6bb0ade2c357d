"""`mlx-openelm serve`: an OpenAI-compatible local server with continuous batching.

`app.py` is the web layer (FastAPI routes, SSE, auth, limits), `engine.py` the one thread that
owns MLX and runs the batch, `sequence.py` one sequence of it, `prompt_cache.py` the reuse of
earlier prompts, `grammar.py` structured output, `protocol.py` the API's request models and error
bodies. docs/serve.md says how to use it.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError

DEFAULT_PORT = 8080


def load_served(model: str, adapter_path: str | None = None, chat_template: str | None = None):
    """What the engine thread loads: (model, tokenizer, {"template", "grammars"})."""
    from ..chat_template import ChatTemplate, template_for_chat
    from ..prepare import load_for_generation
    from .grammar import Grammars

    m, tokenizer = load_for_generation(model, adapter_path)
    try:
        source, _ = template_for_chat(model, tokenizer.path.parent, chat_template, adapter_path)
        template = ChatTemplate(source, tokenizer)
    except UserError:
        template = None  # a base model: completions only
    return m, tokenizer, {"template": template, "grammars": Grammars(tokenizer)}


def make_server(
    model: str,
    *,
    adapter_path: str | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    prefill_chunk: int = 128,
    cache_mb: int = 1024,
    chat_template: str | None = None,
    log_level: str = "info",
) -> tuple[Any, Any]:
    """(uvicorn.Server, Engine), neither started: `serve` runs them; tests run them in threads."""
    import uvicorn

    from .app import create_app
    from .engine import Engine
    from .http import Protocol, Server
    from .prompt_cache import BLOCK

    checks = [
        (1 <= max_batch <= 64, f"--max-batch must be 1-64, got {max_batch}"),
        (0 <= max_queue <= 10_000, f"--max-queue must be 0-10000, got {max_queue}"),
        (0 <= port <= 65535, f"--port must be 0-65535, got {port}"),
        (prefill_chunk >= BLOCK and prefill_chunk % BLOCK == 0,
         f"--prefill-chunk must be a multiple of {BLOCK}, got {prefill_chunk}"),
        (cache_mb >= 0, f"--cache-mb must be >= 0, got {cache_mb}"),
        (api_key is None or api_key.strip() != "", "--api-key must not be empty"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    engine = Engine(
        lambda: load_served(model, adapter_path, chat_template),
        max_batch=max_batch,
        max_queue=max_queue,
        prefill_chunk=prefill_chunk,
        cache_bytes=cache_mb << 20,
    )
    app = create_app(engine, model_id=model, api_key=api_key)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=Protocol,  # slow or idle clients time out (http.py)
        # No startup or shutdown hooks: without the lifespan task, Ctrl-C logs no CancelledError.
        lifespan="off",
        # Requests past the batch and its queue get the engine's 429. This bounds the sockets
        # (each may hold a body of up to app.MAX_BODY): past it uvicorn answers 503.
        limit_concurrency=max_batch + max_queue + 1024,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=3,
        h11_max_incomplete_event_size=64 * 1024,
    )
    return Server(config, engine), engine


def serve(model: str, **options: Any) -> None:
    """Serve until Ctrl-C / SIGTERM; the model loads while /health answers 503."""
    server, engine = make_server(model, **options)
    engine.start()
    try:
        server.run()
    finally:
        engine.stop()
