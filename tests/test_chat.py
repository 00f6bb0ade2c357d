"""The chat REPL, driven through a real terminal (pexpect), and the Instruct prompt format."""

from __future__ import annotations

import os
import re
import signal
import sys
import time

import pexpect
from conftest import make_model_folder, tiny_model

from mlx_openelm.chat import ChatSession

STATUS = re.compile(
    r"\[prefill (\d+) new tokens \((\d+) cached\), [\d.]+ tokens/s \| reply (\d+) tokens, "
    r"[\d.]+ tokens/s \| context (\d+)/(\d+) \| ([a-z ]+)\]"
)
SYSTEM = "You are a helpful assistant."


def test_session_turn_ids(tokenizer):
    session = ChatSession(tiny_model(never_eos=True), tokenizer, system=SYSTEM, max_tokens=4)
    ids = session.turn_ids("Hi")
    assert ids[0] == tokenizer.bos_id
    assert ids.count(tokenizer.eos_id) == 2  # after the system prompt and after the message
    replies = list(session.reply("Hi"))
    assert session.cached == len(ids) + 4 and replies[-1].finish_reason == "length"
    # The reply was cut off, so the next turn first closes it with EOS.
    more = session.turn_ids("Again")
    assert more[0] == tokenizer.eos_id and tokenizer.bos_id not in more
    session.reset()
    assert session.cached == 0 and session.turn_ids("Hi") == ids


def test_a_long_chat_drops_the_oldest_exchanges_and_keeps_the_system_prompt(tokenizer):
    model = tiny_model(never_eos=True, max_context_length=96)
    session = ChatSession(model, tokenizer, system=SYSTEM, max_tokens=8)
    notes = []
    for i in range(12):
        replies = list(session.reply(f"Tell me about chapter {i}, please."))
        assert len(replies) == 8 and session.cached <= 96
        notes.append(session.note)
        assert session.messages[0] == {"role": "system", "content": SYSTEM}
        assert session.messages[-2]["content"] == f"Tell me about chapter {i}, please."
        # The cache holds exactly the rendered conversation that is kept.
        kept = session.template.render(session.messages[:-1], add_generation_prompt=True)
        want = len(tokenizer.encode(kept, add_bos=False, special=True)) + 8
        assert session.cached == want
    shifted = [n for n in notes if n]
    assert shifted and "dropped the oldest" in shifted[0], notes
    assert len(session.messages) < 1 + 2 * 12


def spawn(folder, *args: str):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "mlx_openelm.cli", "chat", "--model", str(folder), *args],
        encoding="utf-8",
        # Ctrl-C's "^C" echo can land between the bytes of a character that the
        # pty took in two writes; that is the terminal's doing, not the REPL's.
        codec_errors="replace",
        timeout=90,
        env={**os.environ, "TERM": "dumb"},
        dimensions=(50, 200),
        # A terminal's foreground job takes Ctrl-C. Run in the background (`cmd &` in a script),
        # the suite inherits SIGINT ignored, and a child that starts with it ignored never raises
        # KeyboardInterrupt: the chat would not see the test's Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    child.expect_exact(">>> ")
    return child


def turn(child, message: str) -> tuple[int, ...]:
    child.sendline(message)
    child.expect(STATUS)
    new, cached, reply, used, context = map(int, child.match.groups()[:5])
    reason = child.match.group(6)
    child.expect_exact(">>> ")
    return new, cached, reply, used, context, reason


def interrupted_turn(child, message: str) -> tuple:
    child.sendline(message)
    time.sleep(1.5)  # well into the reply
    child.sendintr()
    child.expect(STATUS)
    groups = [int(g) if g.isdigit() else g for g in child.match.groups()]
    child.expect_exact(">>> ")
    return tuple(groups)


def test_chat_repl(tiny_folder, tokenizer):
    child = spawn(tiny_folder, "--system", SYSTEM, "--max-tokens", "6")
    first = f"<|system|>\n{SYSTEM}</s>\n<|user|>\nHello there</s>\n<|assistant|>\n"
    first_ids = tokenizer.encode(first, special=True)

    new, cached, reply, used, context, reason = turn(child, "Hello there")
    assert (new, cached, reply, context, reason) == (len(first_ids), 0, 6, 512, "length limit")
    assert used == new + reply

    # The second turn prefills only its own tokens: EOS closing the cut-off reply, then the turn.
    second = "</s>\n<|user|>\nAnd then?</s>\n<|assistant|>\n"
    want = len(tokenizer.encode(second, add_bos=False, special=True))
    new2, cached2, reply2, used2, _, _ = turn(child, "And then?")
    assert (new2, cached2) == (want, used)
    assert new2 < used  # the first turn was not prefilled again
    assert used2 == used + new2 + reply2

    child.sendline("Anne " * 600)  # more than the whole context
    child.expect(r"error: this message \((\d+) tokens with the system prompt\) outgrows")
    child.expect_exact(">>> ")

    child.sendline("/reset")
    child.expect_exact("[new conversation]")
    child.expect_exact(">>> ")
    new3, cached3, _, _, _, _ = turn(child, "Hello there")
    assert (new3, cached3) == (len(first_ids), 0)

    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_reply_and_keeps_the_session(tmp_path, spm_model):
    folder = make_model_folder(tmp_path / "m", spm_model, never_eos=True, max_context_length=10**6)
    child = spawn(folder, "--max-tokens", "500000")
    child.sendintr()  # at the prompt: a hint, not an exit
    child.expect_exact("/exit or Ctrl-D quits")
    new, cached, reply, used, _, reason = interrupted_turn(child, "Tell me a long story")
    assert reason == "interrupted" and 0 < reply < 500000
    # The session goes on from the cut-off reply: nothing is prefilled again.
    _, cached2, _, _, _, reason2 = interrupted_turn(child, "Go on")
    assert cached2 == used == new + reply and reason2 == "interrupted"
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
