"""Chat templates: which one a folder gets or uses, and rendering them as transformers does.

Converted Instruct folders carry OpenELM's Instruct template in `tokenizer_config.json`, so
mlx-lm, mlx-lm's server and transformers' `apply_chat_template` format a conversation exactly as
`mlx-openelm chat` does. Base models get none; `mlx-openelm chat` refuses them with a hint.
`mlx-openelm lora` renders its `messages` records with the same template (train/data.py), so a
model learns the format it is then prompted in.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import read_json, read_text
from .tokenizer import CHAT_TEMPLATE, Tokenizer

OPENELM = "openelm"  # `--chat-template openelm`: the built-in Instruct template
INSTRUCT_NAME = re.compile(r"-instruct(?![a-z0-9])", re.IGNORECASE)


def looks_instruct(source: str | Path) -> bool:
    """Whether a repo id or folder names an Instruct model (`...-Instruct`, also inside the
    huggingface-hub cache, whose snapshot folders sit under `models--apple--OpenELM-...`)."""
    path = Path(str(source).rstrip("/"))
    names = [path.name]
    if path.parent.name == "snapshots":
        names.append(path.parent.parent.name)
    return any(INSTRUCT_NAME.search(n) for n in names)


def read_template_option(value: str) -> str:
    """`--chat-template`: `openelm`, a file (a Jinja template or a tokenizer_config.json), or the
    template text itself."""
    if value == OPENELM:
        return CHAT_TEMPLATE
    path = Path(value).expanduser()
    if path.is_file():
        if path.suffix == ".json":
            template = _from_config(path)
            if template is None:
                raise UserError(f"{path} has no chat_template")
            return template
        return read_text(path)
    if "{{" in value or "{%" in value:
        return value
    raise FileNotFoundError(
        f"--chat-template {value}: not a file nor a Jinja template; pass {OPENELM} (the Instruct "
        "format), a .jinja file, a tokenizer_config.json, or the template text"
    )


def _from_config(path: Path) -> str | None:
    doc = read_json(path)
    template = doc.get("chat_template") if isinstance(doc, dict) else None
    if isinstance(template, list):  # named templates, as transformers saves several
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    return template or None


def folder_template(folder: str | Path) -> str | None:
    """A model folder's own template: `chat_template.jinja`, else tokenizer_config.json's (the
    precedence transformers gives them), else None."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return read_text(folder / "chat_template.jinja")
    config = folder / "tokenizer_config.json"
    return _from_config(config) if config.is_file() else None


def template_for_convert(source: str | Path, option: str = "auto") -> tuple[str | None, str]:
    """The template a converted folder gets, and a line for the log.

    `auto` gives an Instruct model (by name) OpenELM's template and a base model none; `none`
    writes none; anything else is read as `--chat-template`. A template in the source folder is
    not carried over: next to an OpenELM checkpoint it is Llama-2's, the wrong format.
    """
    if option == "none":
        return None, "none (--chat-template none)"
    if option == "auto":
        if looks_instruct(source):
            return CHAT_TEMPLATE, "OpenELM Instruct (the name ends in -Instruct)"
        return None, "none (a base model; --chat-template openelm adds the Instruct one)"
    return read_template_option(option), f"{option} (--chat-template)"


def template_for_chat(
    model: str,
    folder: str | Path,
    option: str | None = None,
    adapter_path: str | Path | None = None,
) -> tuple[str, str]:
    """The template `chat` and `generate --chat` use: `--chat-template`, else the one the adapters
    were trained with, else the folder's, else OpenELM's for a folder named `-Instruct`
    (mlx-community's carry none).

    Raises:
        ValueError: for a base model (no template anywhere), with what to do instead.
    """
    if option is not None:
        return read_template_option(option), "--chat-template"
    if adapter_path is not None and (template := adapter_template(adapter_path)) is not None:
        return template, "the adapters' training"
    if (template := folder_template(folder)) is not None:
        return template, "the model folder"
    if looks_instruct(model) or looks_instruct(folder):
        return CHAT_TEMPLATE, "OpenELM Instruct (by the model's name)"
    raise UserError(
        f"{model} has no chat template (a base model): chat needs an Instruct model such as "
        "`mlx-openelm convert apple/OpenELM-270M-Instruct OUT`; use `mlx-openelm generate` to "
        f"continue text with a base model, or pass --chat-template {OPENELM} to chat in the "
        "Instruct format anyway"
    )


def adapter_template(adapter_path: str | Path) -> str | None:
    """The template `mlx-openelm lora` formatted the chats with (in `adapter_config.json`)."""
    config = Path(adapter_path) / "adapter_config.json"
    doc = read_json(config) if config.is_file() else {}
    return doc.get("chat_template") if isinstance(doc, dict) else None


def template_for_training(folder: str | Path, option: str | None = None) -> str:
    """The template that formats `messages` records: `--chat-template`, else the folder's, else
    OpenELM's (a base model learns the Instruct format)."""
    if option is not None:
        return read_template_option(option)
    return folder_template(folder) or CHAT_TEMPLATE


def _raise(message: str) -> None:
    raise UserError(f"chat template: {message}")


class ChatTemplate:
    """A Jinja chat template compiled as transformers compiles it (sandboxed, trim_blocks,
    lstrip_blocks, loop controls, `raise_exception`, `tojson`, `strftime_now`)."""

    def __init__(self, source: str, tokenizer: Tokenizer):
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, **kw)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise UserError(f"The chat template does not compile: {e}") from None
        sp = getattr(tokenizer, "sp", tokenizer)  # a raw SentencePieceProcessor works too
        self.tokens: dict[str, Any] = {
            "bos_token": sp.id_to_piece(sp.bos_id()),
            "eos_token": sp.id_to_piece(sp.eos_id()),
            "unk_token": sp.id_to_piece(sp.unk_id()),
            "pad_token": None,
        }
        self.source = source

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens
            )
        except UserError:
            raise  # the template's own raise_exception(...)
        except Exception as e:  # the template is the user's code: whatever it raises is theirs
            raise UserError(f"the chat template fails: {type(e).__name__}: {e}") from None


def encode_conversation(
    tokenizer: Tokenizer, template: ChatTemplate, messages: list[dict[str, str]]
) -> list[int]:
    """A whole conversation's prompt ids, as `apply_chat_template(..., tokenize=True)` gives them:
    the rendered text with `<s>`/`</s>` read as BOS/EOS and no BOS added beyond the template's."""
    text = template.render(messages, add_generation_prompt=True)
    return tokenizer.encode(text, add_bos=False, special=True)
