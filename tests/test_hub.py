"""Apple's Hub checkpoints as users have them, offline: a huggingface-hub cache replica built here
(`HF_HOME`, `HF_HUB_OFFLINE=1`), tokenizer resolution and its check, and the chat template that
mlx-lm, transformers and our chat must all render to the same ids.

The replica follows huggingface-hub's layout: `hub/models--owner--name/refs/main` holds the
revision, `snapshots/<rev>/<file>` are symlinks into `blobs/` (or plain files). The "Llama-2"
tokenizer repos hold the tiny 512-piece test tokenizer, so the tests swap
`tokenizer_sources.EXPECTED` for a spec it meets (the only way to relax the check).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import make_model_folder, tiny_args, tiny_model
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache
from typer.testing import CliRunner

from mlx_openelm import tokenizer_sources as ts
from mlx_openelm.chat import ChatSession
from mlx_openelm.chat_template import (
    ChatTemplate,
    encode_conversation,
    folder_template,
    looks_instruct,
)
from mlx_openelm.cli import app
from mlx_openelm.tokenizer import CHAT_TEMPLATE, Tokenizer

INSTRUCT, BASE = "apple/OpenELM-270M-Instruct", "apple/OpenELM-270M"
REPOS = ts.LLAMA2_TOKENIZER_REPOS
REV = "0123456789abcdef0123456789abcdef01234567"
MESSAGES = [
    {"role": "system", "content": "You are Anne Elliot's friend."},
    {"role": "user", "content": "Where is Kellynch?"},
    {"role": "assistant", "content": "Sure, it is in Somerset."},
    {"role": "user", "content": "And who lives there now?"},
    {"role": "assistant", "content": "The Crofts, the admiral and his wife."},
    {"role": "user", "content": "Thank you 😀"},
]


# ---- a huggingface-hub cache replica


def cache_repo(hub_dir: Path, repo_id: str, files: dict[str, bytes], *, blobs: bool = True):
    """Write `repo_id` at revision REV the way huggingface-hub caches it."""
    repo = hub_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REV
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    for name, data in files.items():
        if blobs:
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            blob.write_bytes(data)
            (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
        else:
            (snapshot / name).write_bytes(data)
    return snapshot


def checkpoint_files(seed: int = 0) -> dict[str, bytes]:
    """A tiny OpenELM in Apple's layout: config.json, fp32 model.safetensors, no tokenizer."""
    from safetensors.numpy import save

    model = tiny_model(seed)
    weights = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    config = {**model.args.to_dict(), "torch_dtype": "float32"}
    return {
        "config.json": json.dumps(config).encode(),
        "model.safetensors": save(weights, metadata={"format": "pt"}),
    }


def spec_for(tokenizer: Tokenizer) -> ts.TokenizerSpec:
    """A check the tiny tokenizer passes: its own size and encodings (the test hook's value)."""
    encodings = {t: tokenizer.encode(t, add_bos=False) for t in ("Hello world", "\n")}
    return ts.TokenizerSpec("tiny", tokenizer.vocab_size, (0, 1, 2), encodings)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch, tokenizer) -> Path:
    """An empty cache in HF_HOME with offline mode on; the tiny tokenizer counts as Llama-2's."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface-hub reads these at import; in this process they are already read.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(ts, "EXPECTED", spec_for(tokenizer))
    return home / "hub"


@pytest.fixture(scope="session")
def other_spm(tmp_path_factory) -> Path:
    """A wrong tokenizer: 300 pieces, no byte fallback (conftest's trainer settings otherwise)."""
    import sentencepiece as spm

    prefix = tmp_path_factory.mktemp("other") / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(Path(__file__).parent / "data" / "persuasion.txt"), model_prefix=str(prefix),
        vocab_size=300, model_type="bpe", minloglevel=2, num_threads=1,
    )  # fmt: skip
    return prefix.with_suffix(".model")


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


# ---- the tokenizer check


def test_llama2_spec_documents_the_expected_values():
    assert ts.LLAMA2.vocab_size == 32000 and ts.LLAMA2.unk_bos_eos == (0, 1, 2)
    assert ts.LLAMA2.encodings["Hello world"] == [15043, 3186]
    assert ts.EXPECTED is ts.LLAMA2  # production code checks against Llama-2's tokenizer
    assert ts.takes_default(32000) and ts.takes_default(32128)  # CoreNet pads to 32128
    assert not ts.takes_default(512) and not ts.takes_default(32256)


def test_check_refuses_a_tokenizer_that_is_not_llama2(spm_model, tokenizer):
    with pytest.raises(ValueError) as e:
        ts.check_tokenizer(spm_model)  # the production spec
    assert "is not Llama-2's tokenizer: 512 pieces, not 32000" in str(e.value)
    assert "'Hello world' encodes to" in str(e.value) and "not [15043, 3186]" in str(e.value)
    # A fake spec it meets passes; one with other special ids or encodings fails.
    assert ts.check_tokenizer(spm_model, spec_for(tokenizer)).vocab_size == 512
    wrong_ids = ts.TokenizerSpec("fake", 512, (0, 1, 3))
    with pytest.raises(ValueError, match=r"unk/bos/eos ids 0/1/2, not 0/1/3"):
        ts.check_tokenizer(spm_model, wrong_ids)
    wrong_text = ts.TokenizerSpec("fake", 512, (0, 1, 2), {"Hello world": [15043, 3186]})
    with pytest.raises(ValueError, match=r"'Hello world' encodes to \[\d+"):
        ts.check_tokenizer(spm_model, wrong_text)


# ---- resolution order


def test_resolution_order(hub_dir, spm_model, other_spm):
    own = spm_model
    # --tokenizer (a path) wins over the source's own; the own one wins over the Hub list.
    assert ts.resolve_tokenizer(own, other_spm, 512)[0] == other_spm
    assert ts.resolve_tokenizer(own, None, 512)[0] == own
    # Nothing cached and offline: the list fails with what to pass.
    with pytest.raises(FileNotFoundError) as e:
        ts.resolve_tokenizer(None, None, 512)
    message = str(e.value)
    assert all(f"{r} (not cached)" in message for r in REPOS)
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in message and str(hub_dir) in message
    assert "Pass --tokenizer path/to/tokenizer.model" in message and "--no-tokenizer" in message
    # The list is tried in order; a wrong tokenizer in an earlier repo is refused and skipped.
    cache_repo(hub_dir, REPOS[0], {"tokenizer.model": other_spm.read_bytes()})
    cache_repo(hub_dir, REPOS[2], {"tokenizer.model": spm_model.read_bytes()}, blobs=False)
    path, origin = ts.resolve_tokenizer(None, None, 512)
    assert path.read_bytes() == spm_model.read_bytes()
    assert origin == f"Hub repo {REPOS[2]} (default)" and str(hub_dir) in str(path)
    cache_repo(hub_dir, REPOS[1], {"tokenizer.model": spm_model.read_bytes()})
    assert ts.resolve_tokenizer(None, None, 512)[1] == f"Hub repo {REPOS[1]} (default)"
    # A model whose vocabulary is not the default tokenizer's gets none, not a wrong one.
    path, origin = ts.resolve_tokenizer(None, None, 300)
    assert path is None and "300-row vocabulary is not tiny's" in origin
    assert ts.resolve_tokenizer(None, None, 512, fetch_default=False) == (
        None,
        "none (--no-tokenizer)",
    )


def test_an_unreachable_hub_is_asked_once(hub_dir, monkeypatch, spm_model):
    """Online but without a connection: after the first repo fails, the rest come from the cache
    only (no retries per repo)."""
    import huggingface_hub.constants as constants

    from mlx_openelm import hub

    calls = []

    def download(repo_id, filename, cache_only=False):
        calls.append((repo_id, cache_only))
        if repo_id == REPOS[2]:
            return spm_model
        raise hub.NotCachedError(f"{repo_id} not cached")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "download_file", download)
    assert ts.default_tokenizer()[0] == spm_model
    assert calls == [(REPOS[0], False), (REPOS[1], True), (REPOS[2], True)]
    with pytest.raises(FileNotFoundError, match=r"could be used \(the Hub can't be reached\)"):
        ts.default_tokenizer(REPOS[:2])


def test_explicit_hub_tokenizer_is_fetched_and_checked(hub_dir, spm_model, other_spm):
    cache_repo(hub_dir, "someone/good-tokenizer", {"tokenizer.model": spm_model.read_bytes()})
    cache_repo(hub_dir, "someone/wrong-tokenizer", {"tokenizer.model": other_spm.read_bytes()})
    cache_repo(hub_dir, "someone/no-tokenizer", {"config.json": b"{}"})
    path, origin = ts.explicit_tokenizer("someone/good-tokenizer")
    assert path.read_bytes() == spm_model.read_bytes() and "(--tokenizer)" in origin
    with pytest.raises(ValueError, match=r"is not tiny's tokenizer: 300 pieces, not 512"):
        ts.explicit_tokenizer("someone/wrong-tokenizer")
    with pytest.raises(FileNotFoundError, match="tokenizer.model of Hub repo someone/no-tokenizer"):
        ts.explicit_tokenizer("someone/no-tokenizer")
    # A local file is the user's own choice: used as is.
    assert ts.explicit_tokenizer(other_spm)[0] == other_spm
    assert ts.explicit_tokenizer(other_spm.parent)[0] == other_spm.parent / "tokenizer.model"


# ---- convert from the cache, offline


HOOK = """
import sys
from mlx_openelm import tokenizer_sources as ts
ts.EXPECTED = ts.TokenizerSpec("tiny", {vocab}, (0, 1, 2), {encodings!r})  # the test hook
from mlx_openelm.cli import app
sys.argv = ["mlx-openelm", *{argv!r}]
app()
"""


@pytest.fixture(scope="module")
def converted(tmp_path_factory, spm_model, tokenizer) -> tuple[Path, Path, subprocess.Popen]:
    """`mlx-openelm convert apple/OpenELM-270M-Instruct OUT` in a fresh process whose only
    settings are HF_HOME and HF_HUB_OFFLINE=1 (huggingface-hub reads them itself)."""
    tmp = tmp_path_factory.mktemp("hub")
    hub = tmp / "hf" / "hub"
    files = checkpoint_files()
    snapshot = cache_repo(hub, INSTRUCT, files)
    # Only the second default repo is cached: the first is skipped as not cached.
    cache_repo(hub, REPOS[1], {"tokenizer.model": spm_model.read_bytes()})
    spec = spec_for(tokenizer)
    argv = ["convert", INSTRUCT, str(tmp / "out")]
    script = HOOK.format(vocab=spec.vocab_size, encodings=spec.encodings, argv=argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp / "hf"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    return tmp / "out", snapshot, proc


def test_convert_instruct_repo_from_the_cache_offline(converted, spm_model):
    out, snapshot, proc = converted
    assert proc.returncode == 0, proc.stderr
    assert f"tokenizer: Hub repo {REPOS[1]} (default)" in proc.stderr
    assert "chat template: OpenELM Instruct" in proc.stderr
    assert (out / "tokenizer.model").read_bytes() == spm_model.read_bytes()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    # The weights are the cached checkpoint's.
    source = mx.load(str(snapshot / "model.safetensors"))
    weights = mx.load(str(out / "model.safetensors"))
    assert set(weights) == set(source)
    assert all(mx.array_equal(weights[k], source[k]).item() for k in source)


def test_absent_repo_names_the_repo_and_offline_mode(hub_dir, tmp_path):
    result = cli("convert", "apple/OpenELM-450M-Instruct", tmp_path / "out")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Hub repo apple/OpenELM-450M-Instruct")
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in lines[0] and str(hub_dir) in lines[0]
    assert not (tmp_path / "out").exists()


def test_convert_without_any_tokenizer_says_what_to_pass(hub_dir, tmp_path, spm_model):
    cache_repo(hub_dir, INSTRUCT, checkpoint_files())
    result = cli("convert", INSTRUCT, tmp_path / "out")
    assert result.exit_code == 1 and not (tmp_path / "out").exists()
    assert "error: No tokenizer: the source has no tokenizer.model" in result.stderr
    assert "Pass --tokenizer path/to/tokenizer.model" in result.stderr
    # What the message offers works: --no-tokenizer, or --tokenizer FILE.
    assert cli("convert", INSTRUCT, tmp_path / "bare", "--no-tokenizer").exit_code == 0
    assert not (tmp_path / "bare" / "tokenizer.model").exists()
    assert cli("convert", INSTRUCT, tmp_path / "tok", "--tokenizer", spm_model).exit_code == 0
    assert (tmp_path / "tok" / "tokenizer.model").exists()


def test_convert_refuses_a_hub_tokenizer_with_the_wrong_vocabulary(hub_dir, tmp_path, other_spm):
    cache_repo(hub_dir, INSTRUCT, checkpoint_files())
    cache_repo(hub_dir, "someone/wrong-tokenizer", {"tokenizer.model": other_spm.read_bytes()})
    result = cli("convert", INSTRUCT, tmp_path / "out", "--tokenizer", "someone/wrong-tokenizer")
    assert result.exit_code == 1 and not (tmp_path / "out").exists()
    assert "300 pieces, not 512" in result.stderr


# ---- chat templates: which folder gets one, and the same ids everywhere


def test_looks_instruct():
    assert looks_instruct("apple/OpenELM-270M-Instruct")
    assert looks_instruct("mlx-community/OpenELM-1_1B-Instruct-8bit")
    assert looks_instruct("/models/openelm-3b-instruct/")
    assert looks_instruct("/hf/hub/models--apple--OpenELM-450M-Instruct/snapshots/" + REV)
    assert not looks_instruct("apple/OpenELM-270M")
    assert not looks_instruct("/data/instructions/OpenELM-270M")
    assert not looks_instruct("/hf/hub/models--apple--OpenELM-450M/snapshots/" + REV)


def test_base_model_gets_no_template_and_chat_refuses_it(hub_dir, tmp_path, spm_model):
    cache_repo(hub_dir, BASE, checkpoint_files())
    out = tmp_path / "base"
    assert cli("convert", BASE, out, "--tokenizer", spm_model).exit_code == 0
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    for command in (["chat"], ["generate", "--chat", "--prompt", "Hi"]):
        result = cli(*command, "--model", out)
        assert result.exit_code == 1
        assert "has no chat template (a base model)" in result.stderr
        assert "--chat-template openelm" in result.stderr
        assert "mlx-openelm generate" in result.stderr
    # Asked for, the Instruct format runs on it; --chat-template at convert time writes it.
    result = cli("generate", "--model", out, "--chat", "--chat-template", "openelm",
                 "--prompt", "Hi", "--max-tokens", "3")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert cli("convert", BASE, tmp_path / "b2", "--tokenizer", spm_model,
               "--chat-template", "openelm").exit_code == 0  # fmt: skip
    assert folder_template(tmp_path / "b2") == CHAT_TEMPLATE


def test_a_user_template_wins(tmp_path, spm_model, tokenizer):
    folder = make_model_folder(tmp_path / "m", spm_model)  # carries OpenELM's template
    mine = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    (tmp_path / "mine.jinja").write_text(mine)
    want = tokenizer.encode("user: Hi\nassistant:", add_bos=False)
    for option, n in ((tmp_path / "mine.jinja", len(want)), (None, None)):
        extra = ["--chat-template", option] if option else []
        result = cli("generate", "--model", folder, "--chat", "--prompt", "Hi",
                     "--max-tokens", "2", *extra)  # fmt: skip
        assert result.exit_code == 0, result.stderr
        default = encode_conversation(
            tokenizer, ChatTemplate(CHAT_TEMPLATE, tokenizer), [{"role": "user", "content": "Hi"}]
        )
        assert f"prompt: {n or len(default)} tokens" in result.stderr
    # A chat_template.jinja file takes precedence over tokenizer_config.json's, as in transformers.
    (folder / "chat_template.jinja").write_text(mine)
    assert folder_template(folder) == mine


class Teacher(nn.Module):
    """A stand-in model: at absolute position i it predicts `ids[i + 1]`, so greedy replays ids."""

    def __init__(self, ids: list[int], vocab: int):
        super().__init__()
        self.args = tiny_args(vocab_size=vocab)
        self.layers = [None]  # one KV cache, for its offset
        self.ids, self.vocab = ids, vocab

    def __call__(self, x: mx.array, cache: list[KVCache]) -> mx.array:
        start, n = cache[0].offset, x.shape[1]
        cache[0].update_and_fetch(mx.zeros((1, 1, n, 1)), mx.zeros((1, 1, n, 1)))
        nxt = [self.ids[min(start + i + 1, len(self.ids) - 1)] for i in range(n)]
        return mx.eye(self.vocab)[mx.array(nxt)][None] * 100


def test_training_tokens_equal_transformers_apply_chat_template(converted, tokenizer):
    """A `messages` record trains on transformers' ids for the conversation, and each reply's
    targets start where transformers' prompt for that reply ends."""
    from transformers import AutoTokenizer

    from mlx_openelm.chat_template import template_for_training
    from mlx_openelm.train.data import tokenize

    out, _, proc = converted
    assert proc.returncode == 0, proc.stderr
    hf = AutoTokenizer.from_pretrained(out)
    chat = MESSAGES[:5]  # ends with a reply
    [(ids, mask)], _ = tokenize([{"messages": chat}], tokenizer, 512, template_for_training(out))
    full = hf.apply_chat_template(chat, return_dict=False)
    assert ids.tolist() == full[: len(ids)] and ids[-1] == tokenizer.eos_id
    assert hf.decode(full[len(ids) :]).strip() == ""  # only the newline after the last EOS
    starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]
    prompts = [
        hf.apply_chat_template(chat[:k], add_generation_prompt=True, return_dict=False)
        for k in (2, 4)
    ]
    assert starts == [len(p) for p in prompts] and not mask[: starts[0]].any()


def test_chat_session_ids_equal_transformers_apply_chat_template(converted, tokenizer):
    """Three turns with a system prompt: the ids our session feeds the model (each turn's new
    tokens, then the reply as generated) are exactly transformers' ids for the conversation."""
    from transformers import AutoTokenizer

    out, _, proc = converted
    assert proc.returncode == 0, proc.stderr
    hf = AutoTokenizer.from_pretrained(out)
    full = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    template = ChatTemplate(folder_template(out), tokenizer)
    assert encode_conversation(tokenizer, template, MESSAGES) == full
    assert hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == (
        template.render(MESSAGES)
    )

    teacher = Teacher(full, tokenizer.vocab_size)
    session = ChatSession(teacher, tokenizer, system=MESSAGES[0]["content"], template=template)
    fed: list[int] = []
    for user, assistant in zip(MESSAGES[1::2], [*MESSAGES[2::2], None], strict=True):
        new = session.turn_ids(user["content"])
        assert fed + new == full[: len(fed) + len(new)]  # only this turn's tokens are new
        if assistant is None:
            break
        replies = list(session.reply(user["content"]))
        assert "".join(r.text for r in replies) == assistant["content"]
        assert replies[-1].finish_reason == "stop"  # the reply ended with EOS, as in `full`
        fed += new + [r.token for r in replies]
        assert session.cached == len(fed)
    assert fed + new == full


def test_session_starts_over_when_the_template_rewrites_earlier_turns(tokenizer):
    # This template numbers the conversation at its start, so every turn changes the prefix.
    counting = (
        "{{ bos_token }}[{{ messages|length }}]{% for m in messages %}{{ m['content'] }}"
        "{{ eos_token }}{% endfor %}"
    )
    template = ChatTemplate(counting, tokenizer)
    session = ChatSession(tiny_model(never_eos=True), tokenizer, max_tokens=3, template=template)
    list(session.reply("Hi"))
    again = session.messages + [{"role": "user", "content": "Again"}]
    list(session.reply("Again"))
    assert session.cached == len(encode_conversation(tokenizer, template, again)) + 3


def test_mlx_lm_chats_with_the_converted_folder(converted, tokenizer):
    """mlx-lm loads the folder, formats with its template the ids we do, and its greedy
    generation from them gives our tokens."""
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    from mlx_openelm.generation import stream_generate
    from mlx_openelm.loading import load

    out, _, _ = converted
    model, mlx_lm_tokenizer = mlx_lm.load(str(out))
    prompt = mlx_lm_tokenizer.apply_chat_template(
        MESSAGES[:2], add_generation_prompt=True, return_dict=False
    )
    ours, _, _ = load(out)
    template = ChatTemplate(folder_template(out), tokenizer)
    ids = encode_conversation(tokenizer, template, MESSAGES[:2])
    assert prompt == ids
    theirs = [
        r.token
        for r in mlx_lm.stream_generate(
            model, mlx_lm_tokenizer, prompt, max_tokens=8, sampler=make_sampler(temp=0.0)
        )
    ]
    mine = [r.token for r in stream_generate(ours, tokenizer, ids, max_tokens=8)]
    assert theirs == mine and len(mine) > 0
