"""`serve`: the OpenAI-compatible server."""

from __future__ import annotations

from typing import Annotated

import typer

from . import AdapterPath, _run, app
from .generation import ChatTemplateOption


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="MLX model folder or Hub repo id, with tokenizer")],
    adapter_path: AdapterPath = None,
    host: Annotated[
        str, typer.Option(help="Address to bind (0.0.0.0 opens it to the network)")
    ] = "127.0.0.1",  # noqa: E501
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8080,
    api_key: Annotated[
        str | None, typer.Option(envvar="MLX_OPENELM_API_KEY", help="Require this bearer token")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Sequences decoded together at most")] = 8,
    max_queue: Annotated[int, typer.Option(help="Requests waiting at most (then 429)")] = 64,
    prefill_chunk: Annotated[
        int, typer.Option(help="Prompt tokens a newcomer prefills per step (multiple of 64)")
    ] = 128,
    cache_mb: Annotated[int, typer.Option(help="Prompt cache size in MiB (0 turns it off)")] = 1024,
    chat_template: ChatTemplateOption = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (docs/serve.md)."""
    options = locals()
    from ..serve import serve as run_server

    _run(run_server, **options)
