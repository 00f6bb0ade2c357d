r"""`mlx-openelm chat`: a REPL for the OpenELM Instruct models.

The Instruct models were DPO-tuned with Hugging Face's alignment-handbook (CoreNet's
`projects/openelm/instruction_tuning/openelm-instruct.yaml`) using Zephyr's chat template, which
renders plain text `<|system|>\n{system}</s>\n<|user|>\n{message}</s>\n<|assistant|>\n{reply}</s>\n`
with `eos_token` spelled `</s>`; HF's Llama tokenizer then reads each `</s>` as the EOS id 2.
SentencePiece alone spells `</s>` out as plain characters (with the test model: `▁`, `<0x3C>`,
`<0x2F>`, `s`, `<0x3E>`), which the model never saw there. So turns are encoded with
`special=True`: each `</s>` becomes id 2 and the text after it gets its own leading `▁`, exactly
as transformers' tokenizer does (tests/test_tokenizer.py checks this). The model ends its replies
with that same EOS.

The format comes from a chat template (see chat_template.py): `--chat-template`, else the one
the adapters were trained with, else the model folder's (`tokenizer_config.json`, where convert
writes OpenELM's for an Instruct model), else OpenELM's for a folder named `-Instruct`; a base
model is refused with a hint. The template is
rendered with jinja2 as transformers renders it, so mlx-lm and transformers users get the same ids,
and `mlx-openelm lora` renders its `messages` records with the same template.

Each turn keeps the KV cache of the conversation so far and prefills only the new turn's tokens:
the whole conversation is rendered again and only the text past what the cache already holds
(the earlier turns and the reply as generated, with its `</s>` when it ended with EOS) is
encoded. A template that rewrites earlier turns makes the session start its cache over.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from .chat_template import ChatTemplate
from .errors import UserError, check_utf8
from .generation import GenerationResponse, stream_generate
from .prepare import prepare
from .tokenizer import CHAT_TEMPLATE, Tokenizer

PROMPT = ">>> "
HELP = "/reset starts a new conversation, /exit (or Ctrl-D) quits, Ctrl-C stops a reply."


class ChatSession:
    """A conversation with one KV cache: each turn prefills only its own new tokens."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        *,
        system: str | None = None,
        max_tokens: int = 512,
        template: ChatTemplate | None = None,
        **kwargs: Any,
    ):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.template = template or ChatTemplate(CHAT_TEMPLATE, tokenizer)
        self.eos_text = tokenizer.sp.id_to_piece(tokenizer.eos_id)
        self.max_tokens = max_tokens
        self.kwargs = kwargs  # sampler, logits_processors for generate_step
        self.context = model.args.max_context_length
        self.reset()

    def reset(self) -> None:
        self.cache = make_prompt_cache(self.model)
        self.last_token: int | None = None  # the last token in the cache (None: empty)
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.text = ""  # the rendered conversation whose tokens the cache holds
        self.note: str | None = None  # what the last turn dropped to fit the context

    @property
    def cached(self) -> int:
        return self.cache[0].offset

    def _pending(self, message: str) -> tuple[list[dict[str, str]], str, bool]:
        """(messages with `message`, the text still to prefill, whether to start the cache over)."""
        messages = [*self.messages, {"role": "user", "content": message}]
        full = self.template.render(messages, add_generation_prompt=True)
        if self.last_token is None or full.startswith(self.text):
            return messages, full[len(self.text) :], False
        return messages, full, True  # the template rewrote an earlier turn

    def turn_ids(self, message: str) -> list[int]:
        """The new tokens to prefill for `message`, given what the cache already holds."""
        _, text, _ = self._pending(message)
        # A reply cut short (length limit or Ctrl-C) is closed by the template's own `</s>`.
        return self.tokenizer.encode(text, add_bos=False, special=True)

    def _fit(self, message: str) -> tuple[list[dict[str, str]], str, list[int], bool, int]:
        """(messages, text and ids to prefill, whether to start the cache over, reply room).

        When the conversation leaves the reply less than `min(max_tokens, context / 4)`, the
        oldest exchanges go (the system prompt stays) and what remains is prefilled again, as
        llama.cpp's context shift does. `self.note` then says so.
        """
        messages, text, restart = self._pending(message)
        ids = self.tokenizer.encode(text, add_bos=False, special=True)
        room = self.context - (0 if restart else self.cached) - len(ids)
        want, dropped, self.note = min(self.max_tokens, self.context // 4), 0, None
        keep = 1 if self.system else 0  # the system message
        while room < want and len(messages) - keep > 1:
            # Drop one exchange: the oldest user message and the replies up to the next one.
            end = keep + 1
            while end < len(messages) - 1 and messages[end]["role"] != "user":
                end += 1
            messages, dropped, restart = messages[:keep] + messages[end:], dropped + 1, True
            text = self.template.render(messages, add_generation_prompt=True)
            ids = self.tokenizer.encode(text, add_bos=False, special=True)
            room = self.context - len(ids)
        if room < 1:
            raise UserError(
                f"this message ({len(ids)} tokens with the system prompt) outgrows the context "
                f"window of {self.context} tokens: shorten it"
            )
        if dropped:
            self.note = (
                f"[context full: dropped the oldest {dropped} exchange(s), "
                f"prefilling the {len(ids)} tokens left]"
            )
        return messages, text, ids, restart, room

    def reply(self, message: str) -> Generator[GenerationResponse, None, None]:
        """Stream the reply to `message`; stopping early (closing the generator) is fine."""
        messages, text, ids, restart, room = self._fit(message)
        if restart:
            self.cache, self.text = make_prompt_cache(self.model), ""
        answer = {"role": "assistant", "content": ""}
        self.messages = [*messages, answer]
        prompt = self.text + text
        for r in stream_generate(
            self.model,
            self.tokenizer,
            ids,
            max_tokens=min(self.max_tokens, room),
            trim_space=True,
            prompt_cache=self.cache,
            **self.kwargs,
        ):
            self.last_token = r.token
            answer["content"] += r.text
            ended = r.token in self.tokenizer.eos_token_ids
            self.text = prompt + answer["content"] + (self.eos_text if ended else "")
            yield r


class _StopFlag:
    """Turns Ctrl-C into a flag while a reply streams, so the loop stops between tokens."""

    def __init__(self) -> None:
        self.set = False

    def __enter__(self) -> _StopFlag:
        self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        self.set = True

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGINT, self.previous)


def _status(session: ChatSession, reused: int, last: GenerationResponse, reason: str) -> str:
    return (
        f"[prefill {last.prompt_tokens} new tokens ({reused} cached), "
        f"{last.prompt_tps:.1f} tokens/s | reply {last.generation_tokens} tokens, "
        f"{last.generation_tps:.1f} tokens/s | context {session.cached}/{session.context} | "
        f"{reason}]"
    )


def chat_turn(session: ChatSession, message: str) -> None:
    """Stream one reply to stdout and a status line to stderr; Ctrl-C ends the reply early."""
    reused, last, noted = session.cached, None, False
    with _StopFlag() as stop:
        for last in session.reply(message):
            if session.note and not noted:  # set once the turn has started
                noted = True
                dim = ("\x1b[2m", "\x1b[0m") if sys.stderr.isatty() else ("", "")
                print(dim[0] + session.note + dim[1], file=sys.stderr, flush=True)
                reused = 0
            print(last.text, end="", flush=True)
            if stop.set:
                break
    print()
    if last is None:
        return
    reason = {"stop": "end of reply", "length": "length limit"}.get(last.finish_reason, "")
    reason = "interrupted" if stop.set and last.finish_reason is None else reason
    print(_status(session, reused, last, reason), file=sys.stderr, flush=True)


def run(
    model: str,
    *,
    system: str | None = None,
    max_tokens: int = 512,
    chat_template: str | None = None,
    **options: Any,
) -> None:
    """`mlx-openelm chat`: read messages from the terminal, stream the replies.

    `chat_template` (`openelm`, a file or the template text) wins over the folder's template;
    `options` are `prepare`'s (sampling, seed, adapter_path).
    """
    p = prepare(
        model, max_tokens=max_tokens, system=system, chat=True, chat_template=chat_template,
        **options,
    )  # fmt: skip
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    session = ChatSession(
        p.model, p.tokenizer, system=system, max_tokens=max_tokens, template=p.template,
        sampler=p.sampler, logits_processors=p.processors,
    )  # fmt: skip
    print(
        f"Chatting with {Path(model).name} (chat template: {p.template_origin}). {HELP}",
        file=sys.stderr,
        flush=True,
    )
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a bad line is refused, not fatal
    while True:
        try:
            message = input(PROMPT)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D quits)", file=sys.stderr)
            continue
        command = message.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            session.reset()
            print("[new conversation]", file=sys.stderr, flush=True)
            continue
        if command.startswith("/") and " " not in command:
            print(f"Unknown command {command}. {HELP}", file=sys.stderr, flush=True)
            continue
        try:
            check_utf8(message, "that line")
            chat_turn(session, message)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
