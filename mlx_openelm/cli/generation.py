"""`generate` and `chat`."""

from __future__ import annotations

from typing import Annotated

import typer

from . import AdapterPath, _run, app

# Sampling options shared by `generate` and `chat` (mlx-lm's samplers).
MaxTokens = Annotated[int, typer.Option(help="Most tokens to generate (per reply in chat)")]
Temp = Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass in (0, 1]; 1 is off")]
TopK = Annotated[int, typer.Option(help="Sample from the k most likely tokens; 0 is off")]
MinP = Annotated[float, typer.Option(help="Drop tokens below min-p x the top token's; 0 is off")]
RepetitionPenalty = Annotated[
    float,
    typer.Option(help="Penalty on the last 20 tokens (OpenELM's model cards use 1.2); 1 is off"),
]
Seed = Annotated[int | None, typer.Option(help="Random seed, for repeatable sampling")]
ChatTemplateOption = Annotated[
    str | None,
    typer.Option(help="openelm, a Jinja file or the template (default: the model folder's)"),
]


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="MLX model folder or Hub repo id, with tokenizer")],
    prompt: Annotated[str, typer.Option(help="Text to continue (BOS is prepended)")],
    max_tokens: MaxTokens = 256,
    temp: Temp = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.2,
    seed: Seed = None,
    stop: Annotated[
        list[str] | None, typer.Option(help="Stop at this text (not printed); repeatable")
    ] = None,
    adapter_path: AdapterPath = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="The prompt is a user message: print the reply")
    ] = False,
    system: Annotated[str | None, typer.Option(help="System prompt (with --chat)")] = None,
    chat_template: ChatTemplateOption = None,
) -> None:
    """Continue a prompt; the speed report (tokens/s, peak memory) goes to stderr."""
    options = _sampling({**locals(), "stop": stop or []})
    from ..generation import run

    _run(run, **options)


@app.command()
def chat(
    model: Annotated[str, typer.Option(help="MLX Instruct model folder or Hub repo id")],
    system: Annotated[str | None, typer.Option(help="System prompt")] = None,
    max_tokens: MaxTokens = 512,
    temp: Temp = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.2,
    seed: Seed = None,
    adapter_path: AdapterPath = None,
    chat_template: ChatTemplateOption = None,
) -> None:
    """Chat with an OpenELM Instruct model (/reset, /exit; Ctrl-C stops a reply)."""
    options = _sampling(locals())
    from ..chat import run

    _run(run, **options)


def _sampling(options: dict) -> dict:
    """The flat sampling options as the one `SamplingOptions` the library takes (checked there)."""
    from ..prepare import SamplingOptions

    fields = {k: options.pop(k) for k in SamplingOptions.__dataclass_fields__}
    return {**options, "sampling": SamplingOptions(**fields)}
