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


@app.command("bench-serve")
def bench_serve(
    model: Annotated[str, typer.Option(help="MLX model folder with its tokenizer (float weights)")],
    q_bits: Annotated[
        int | None, typer.Option(help="Serve it quantised: 4 or 8 (llama.cpp: q4_0 / q8_0)")
    ] = None,
    llama_cpp: Annotated[
        str | None, typer.Option(help="llama.cpp's build/bin (llama-server): add its server")
    ] = None,
    mlx_lm: Annotated[bool, typer.Option(help="Add mlx_lm.server (slow on a CPU)")] = False,
    clients: Annotated[str, typer.Option(help="Concurrent client counts, e.g. 1,4,8")] = "1,4,8",
    requests: Annotated[int, typer.Option(help="Completions per client at each count")] = 2,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length of each request")] = 128,
    max_tokens: Annotated[int, typer.Option(help="Output tokens of each request")] = 64,
    rounds: Annotated[int, typer.Option(help="Rounds of every count on every server")] = 1,
    json_path: Annotated[str | None, typer.Option("--json", help="Write the report here")] = None,
    plot_path: Annotated[str | None, typer.Option("--plot", help="Write a PNG plot here")] = None,
) -> None:
    """Time concurrent streaming clients against our server, llama-server and mlx_lm.server on the
    same weights, each started here (docs/serve.md)."""
    options = locals()
    from ..bench.serve_bench import bench_serve as run_bench

    options["clients"] = [int(c) for c in clients.split(",") if c.strip()]
    _run(run_bench, **options)
