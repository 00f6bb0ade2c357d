"""Generation: the step loop and cache, sampling, stop conditions, PyTorch parity, the CLI."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import make_model_folder, tiny_args, tiny_model
from mlx_lm.models.cache import make_prompt_cache
from typer.testing import CliRunner

from mlx_openelm.cli import app
from mlx_openelm.generation import generate, generate_step, stream_generate
from mlx_openelm.prepare import SamplingOptions

PROMPT = "It was a truth universally acknowledged"


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def greedy_ids(model, prompt, n, **kwargs) -> list[int]:
    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=n, **kwargs)]


def repeats(ids: list[int]) -> int:
    return len(ids) - len(set(ids))


def test_greedy_steps_equal_full_recompute(model, tokenizer):
    # The cached, pipelined loop picks the argmax of a full forward pass over the sequence so far.
    ids = tokenizer.encode(PROMPT)
    got = greedy_ids(model, ids, 12)
    seq = list(ids)
    for _ in range(12):
        seq.append(int(mx.argmax(model(mx.array([seq]))[0, -1])))
    assert got == seq[len(ids) :]


def test_chunked_prefill_matches_one_pass(model, tokenizer):
    ids = tokenizer.encode(PROMPT * 3)
    one = list(generate_step(mx.array(ids), model, max_tokens=8))
    chunked = list(generate_step(mx.array(ids), model, max_tokens=8, prefill_step_size=5))
    assert [t for t, _ in one] == [t for t, _ in chunked]
    for (_, a), (_, b) in zip(one, chunked, strict=True):
        assert mx.allclose(a, b, atol=1e-4)


def test_cache_holds_prompt_and_every_yielded_token(model, tokenizer):
    ids = tokenizer.encode(PROMPT)
    cache = make_prompt_cache(model)
    assert len(greedy_ids(model, ids, 5, prompt_cache=cache)) == 5
    assert all(c.offset == len(ids) + 5 for c in cache)
    # Stopped early, the cache still matches what the caller saw.
    cache = make_prompt_cache(model)
    steps = generate_step(mx.array(ids), model, max_tokens=50, prompt_cache=cache)
    seen = [next(steps)[0] for _ in range(3)]
    steps.close()
    assert all(c.offset == len(ids) + len(seen) for c in cache)
    # New tokens continue from the cache exactly as a fresh run over the whole sequence does.
    new = tokenizer.encode(" and so on", add_bos=False)
    assert greedy_ids(model, new, 6, prompt_cache=cache) == greedy_ids(model, ids + seen + new, 6)


def test_fixed_seed_repeats_and_seeds_differ(model, tokenizer):
    sampler, _ = SamplingOptions(temp=1.5).build()
    ids = tokenizer.encode(PROMPT)

    def sample(seed: int) -> list[int]:
        mx.random.seed(seed)
        return greedy_ids(model, ids, 24, sampler=sampler)

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_top_k_one_equals_greedy(model, tokenizer):
    ids = tokenizer.encode(PROMPT)
    sampler, _ = SamplingOptions(temp=2.0, top_k=1, repetition_penalty=1.0).build()
    mx.random.seed(0)
    assert greedy_ids(model, ids, 24, sampler=sampler) == greedy_ids(model, ids, 24)


def test_repetition_penalty_lowers_repeats(model, tokenizer):
    ids = tokenizer.encode(PROMPT)
    plain = greedy_ids(model, ids, 40)
    _, processors = SamplingOptions(repetition_penalty=1.5).build()
    penalised = greedy_ids(model, ids, 40, logits_processors=processors)
    assert repeats(plain) > 20  # a random model loops
    assert repeats(penalised) < repeats(plain)


def test_stream_responses(model, tokenizer):
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=10))
    assert len(responses) == 10
    assert [r.finish_reason for r in responses] == [None] * 9 + ["length"]
    last = responses[-1]
    assert last.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert last.generation_tokens == 10
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0
    tokens = [r.token for r in responses]
    assert (
        "".join(r.text for r in responses)
        == (tokenizer.decode(tokenizer.encode(PROMPT) + tokens)[len(PROMPT) :])
    )
    assert generate(model, tokenizer, PROMPT, max_tokens=10) == "".join(r.text for r in responses)


def test_eos_stops_generation(model, tokenizer):
    eos = tokenizer.eos_id
    ids = tokenizer.encode(PROMPT)

    def force_eos(tokens, logits):  # EOS after 4 generated tokens
        return logits.at[:, eos].add(1e9) if tokens.size >= len(ids) + 4 else logits

    responses = list(
        stream_generate(model, tokenizer, ids, max_tokens=50, logits_processors=[force_eos])
    )
    assert len(responses) == 5
    assert responses[-1].token == eos and responses[-1].finish_reason == "stop"
    text = "".join(r.text for r in responses)
    assert text == tokenizer.decode(ids + [r.token for r in responses[:4]])[len(PROMPT) :]


def test_padding_rows_beyond_the_tokenizer_are_never_sampled(tokenizer):
    model = tiny_model(seed=1, vocab_size=640)  # like CoreNet's 32128 rows for 32000 pieces
    emb = model.transformer.token_embeddings
    emb.weight = emb.weight.at[512:].multiply(50.0)  # padding rows would win every argmax
    assert max(greedy_ids(model, tokenizer.encode(PROMPT), 5)) >= 512
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=20))
    assert len(responses) == 20 and max(r.token for r in responses) < 512


def test_stop_string_ends_generation_and_is_not_returned(tokenizer):
    model = tiny_model(seed=5)
    _, processors = SamplingOptions(repetition_penalty=1.3).build()
    full = generate(model, tokenizer, PROMPT, max_tokens=40, logits_processors=processors)
    stop = full[12:15]
    assert len(stop) == 3
    responses = list(
        stream_generate(
            model, tokenizer, PROMPT, max_tokens=40, stop=[stop, "never there"],
            logits_processors=processors,
        )
    )  # fmt: skip
    assert responses[-1].finish_reason == "stop"
    assert "".join(r.text for r in responses) == full[: full.find(stop)]
    assert all(stop not in r.text for r in responses)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temp=-0.1), "temp"),
        (dict(temp=float("nan")), "temp"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
    ],
)
def test_bad_sampling_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingOptions(**kwargs).build()


def test_prompt_errors(model, tokenizer):
    with pytest.raises(ValueError, match="empty"):
        next(stream_generate(model, tokenizer, ""))
    with pytest.raises(ValueError, match="empty"):
        next(stream_generate(model, tokenizer, []))
    ids = list(range(3, 3 + 500))
    with pytest.raises(ValueError, match="context window of 512"):
        next(stream_generate(model, tokenizer, ids, max_tokens=13))
    assert len(list(stream_generate(model, tokenizer, ids, max_tokens=12))) == 12


def test_greedy_matches_pytorch_reference(tokenizer):
    torch = pytest.importorskip("torch")
    import torch_checkpoints
    from mlx_openelm.bench import reference

    from mlx_openelm.model import Model

    # 4 layers with 4 -> 8 query heads (1 -> 2 kv heads), fp32 on both sides.
    args = tiny_args(num_transformer_layers=4, model_dim=128, head_dim=16)
    assert len(set(args.num_query_heads)) > 1
    ref = torch_checkpoints.random_model(args.to_dict(), seed=0)
    model = Model(args)
    model.load_weights([(k, mx.array(v.numpy())) for k, v in ref.state_dict().items()])
    ids = tokenizer.encode(PROMPT)
    want = reference.greedy_generate(ref, ids, 40)
    got = greedy_ids(model, ids, 40)
    assert len(set(want)) > 5  # not a degenerate loop
    assert got == want
    with torch.no_grad():
        assert int(ref(torch.tensor([ids]))[0, -1].argmax()) == want[0]


# ---- the CLI


@pytest.fixture(scope="module")
def folder(tmp_path_factory, spm_model):
    return make_model_folder(tmp_path_factory.mktemp("gen") / "m", spm_model, seed=3)


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_cli_generate(folder, tokenizer):
    result = cli("generate", "--model", str(folder), "--prompt", PROMPT, "--max-tokens", "8")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(PROMPT)
    assert "generation: 8 tokens" in result.stderr
    assert f"prompt: {len(tokenizer.encode(PROMPT))} tokens" in result.stderr
    assert "tokens/s" in result.stderr and "peak memory" in result.stderr


def test_cli_generate_is_repeatable_with_a_seed(folder):
    run = lambda: cli(  # noqa: E731
        "generate", "--model", str(folder), "--prompt", PROMPT, "--max-tokens", "12",
        "--temp", "1.0", "--top-p", "0.9", "--top-k", "50", "--min-p", "0.01", "--seed", "3",
    )  # fmt: skip
    a, b = run(), run()
    assert a.exit_code == 0, a.output
    assert a.stdout == b.stdout


def test_cli_stop(folder, tokenizer):
    full = cli("generate", "--model", str(folder), "--prompt", PROMPT, "--max-tokens", "30")
    text = full.stdout.removesuffix("\n")[len(PROMPT) :]
    stop = text.strip()[3:6]
    result = cli(
        "generate", "--model", str(folder), "--prompt", PROMPT, "--max-tokens", "30",
        "--stop", stop, "--stop", "zzzz",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == PROMPT + text[: text.find(stop)] + "\n"


def test_cli_help_names_the_default_penalty():
    result = cli("generate", "--help")
    assert "1.2" in result.stdout and "repetition-penalty" in result.stdout
    assert "chat" in cli("--help").stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", ""], "prompt is empty"),
        (["--prompt", "Anne " * 400], "context window of 512"),
        (["--prompt", "Anne " * 200, "--max-tokens", "400"], "context window of 512"),
        (["--prompt", "x", "--temp", "-1"], "temp must be >= 0"),
        (["--prompt", "x", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["--prompt", "x", "--top-k", "-3"], "top_k must be >= 0"),
        (["--prompt", "x", "--min-p", "2"], "min_p must be in [0, 1]"),
        (["--prompt", "x", "--repetition-penalty", "0"], "repetition_penalty must be > 0"),
        (["--prompt", "x", "--max-tokens", "0"], "--max-tokens must be at least 1"),
    ],
)
def test_cli_errors(folder, extra, message):
    result = cli("generate", "--model", str(folder), *extra)
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_cli_folder_without_tokenizer(tmp_path):
    folder = make_model_folder(tmp_path / "m", None)
    for command in ("generate", "chat"):
        args = [command, "--model", str(folder)] + (
            ["--prompt", "x"] if command == "generate" else []
        )
        result = cli(*args)
        assert result.exit_code == 1
        assert "has no tokenizer.model" in result.stderr
        assert "mlx-openelm convert" in result.stderr and "--tokenizer" in result.stderr


def test_cpu_speed_notes_name_slow_weights_and_a_missing_blas(monkeypatch):
    from mlx_openelm import _blas, kernels
    from mlx_openelm.prepare import cpu_speed_notes

    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))  # as on a Mac's CPU too
    monkeypatch.setattr(_blas, "loaded", "libmkl_rt.so")
    model = tiny_model()
    assert cpu_speed_notes(model) == []  # float32, through an optimised BLAS
    nn.quantize(model, group_size=32, bits=4)
    monkeypatch.setattr(kernels, "available", lambda: True)
    assert cpu_speed_notes(model) == []  # float32 around 4-bit weights: the kernels run them
    monkeypatch.setattr(kernels, "available", lambda: False)
    monkeypatch.setattr(kernels, "_why_off", "off (no C++ compiler found)")
    monkeypatch.setattr("sys.platform", "linux")
    (note,) = cpu_speed_notes(model, "m")
    assert note.startswith("m has quantised weights") and "no C++ compiler" in note
    model = tiny_model()
    model.set_dtype(mx.bfloat16)
    assert "16-bit" in cpu_speed_notes(model)[0]
    monkeypatch.setattr(_blas, "loaded", None)
    monkeypatch.setattr("sys.platform", "linux")
    assert "bundled reference BLAS" in cpu_speed_notes(tiny_model())[0]


def test_a_quantized_16_bit_model_runs_in_float32_on_the_cpu(monkeypatch):
    """A folder quantized on a Mac (bfloat16): its norms and the embedding's scales become float32,
    so the activations are float32 (what the kernels take); the products keep 16-bit scales."""
    from mlx.utils import tree_flatten

    from mlx_openelm.loading import float32_on_cpu, product_scales
    from mlx_openelm.prepare import cpu_speed_notes

    model = tiny_model(seed=4)
    model.set_dtype(mx.bfloat16)
    assert float32_on_cpu(model) == 0  # not quantized: doubling it is the user's choice
    nn.quantize(model, group_size=32, bits=4)
    ids = mx.array([[5, 6, 7]])
    before = model(ids)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert float32_on_cpu(model) == 0  # a GPU runs 16 bits as they are
    monkeypatch.undo()
    assert float32_on_cpu(model) > 0
    kept = product_scales(model)
    dtypes = {key: p.dtype for key, p in tree_flatten(model.parameters())}
    assert kept and all(dtypes[key] == mx.bfloat16 for key in kept)
    assert all(d in (mx.float32, mx.uint32) for key, d in dtypes.items() if key not in kept)
    after = model(ids)
    assert before.dtype == mx.bfloat16 and after.dtype == mx.float32
    assert mx.allclose(after, before.astype(mx.float32), atol=0.1).item()  # bfloat16's precision
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    assert not any("16-bit" in note for note in cpu_speed_notes(model))


def test_cli_generate_notes_16_bit_weights_on_the_cpu(tmp_path, spm_model):
    from mlx_openelm.loading import save_model
    from mlx_openelm.tokenizer import write_tokenizer_files

    model = tiny_model(seed=3)
    model.set_dtype(mx.bfloat16)
    save_model(tmp_path, model, model.args)
    write_tokenizer_files(tmp_path, spm_model, model.args.max_context_length)
    result = cli("generate", "--model", str(tmp_path), "--prompt", PROMPT, "--max-tokens", "2")
    assert result.exit_code == 0, result.output
    assert "16-bit weights" in result.stderr and "--dtype float32" in result.stderr
    # Quantized too (as on a Mac): it runs in float32 around its 16-bit scales, fast, no note.
    nn.quantize(model, group_size=32, bits=4)
    save_model(tmp_path, model, model.args, quantization={"group_size": 32, "bits": 4})
    result = cli("generate", "--model", str(tmp_path), "--prompt", PROMPT, "--max-tokens", "2")
    assert result.exit_code == 0, result.output
    from mlx_openelm import kernels

    assert ("note:" in result.stderr) == (not kernels.available()), result.stderr


def test_cli_ctrl_c_still_reports(folder, monkeypatch):
    import mlx_openelm.generation as gen

    real = gen.stream_generate

    def interrupted(*args, **kwargs):
        stream = real(*args, **kwargs)
        yield next(stream)
        yield next(stream)
        raise KeyboardInterrupt

    monkeypatch.setattr(gen, "stream_generate", interrupted)
    result = cli("generate", "--model", str(folder), "--prompt", PROMPT, "--max-tokens", "8")
    assert result.exit_code == 130, result.output
    assert "generation: 2 tokens" in result.stderr and "interrupted" in result.stderr
