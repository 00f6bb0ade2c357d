"""The benchmark (`mlx-openelm bench`): end to end on a tiny model, the token check, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlx_openelm.bench import runner, weights
from mlx_openelm.bench.bench import run_worker
from typer.testing import CliRunner

from mlx_openelm.cli import app
from mlx_openelm.config import ModelArgs

pytest.importorskip("torch", reason="the reference row needs torch (pip install .[reference])")

# Layer-wise scaling that varies at this size: 4/6/6/8 query heads, GQA 2, FFN 64..256.
TINY = dict(
    num_transformer_layers=4, model_dim=128, head_dim=16, vocab_size=384, num_gqa_groups=2,
    ffn_multipliers=[0.5, 2.0], ffn_dim_divisor=32, max_context_length=256,
)  # fmt: skip
FIELDS = ("implementation", "backend", "dtype", "prompt_tokens", "gen_tokens", "prefill_tps",
          "decode_tps", "peak_memory_bytes", "ttft_s", "check_tokens", "device")  # fmt: skip
ROWS = {"mlx-openelm", "mlx-lm", "torch-reference", "mlx-openelm-naive-rmsnorm",
        "mlx-openelm-uniform"}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return weights.random_folder(ModelArgs(**TINY), tmp_path_factory.mktemp("bench") / "tiny", 0)


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same shape, other weights."""
    return weights.random_folder(ModelArgs(**TINY), tmp_path_factory.mktemp("bench") / "other", 1)


@pytest.mark.slow
def test_bench_all_rows_json_and_plot(tiny: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["bench", "--model", str(tiny), "--prompt-tokens", "8,32", "--gen-tokens", "12",
            "--trials", "2", "--study", "--json", str(out), "--plot", str(png)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = report["results"]
    # --study also adds a row per other BLAS installed here (e.g. mlx-openelm-blis on Debian).
    blas_rows = {f"mlx-openelm-{b}" for b in runner._other_blas(report["machine"]["mlx_blas"])}
    assert {r["implementation"] for r in rows} == ROWS | blas_rows
    assert sorted(r["prompt_tokens"] for r in rows) == sorted([8, 32] * len(ROWS | blas_rows))
    for r in rows:
        assert all(k in r for k in FIELDS), r.keys()
        assert r["prefill_tps"] > 0 and r["decode_tps"] > 0 and r["peak_memory_bytes"] > 0
        assert (r["backend"], r["dtype"], r["gen_tokens"]) == ("cpu", "float32", 12)
        assert len(r["prefill_tps_trials"]) == 2
        if r["implementation"] != "mlx-openelm-uniform":
            # Every same-weights row was compared with the PyTorch reference, on real tokens.
            assert r["checked_against"] == "torch-reference"
            assert r["checked_tokens"] >= 6
            assert len(set(r["check_tokens"])) >= 6  # the random weights don't repeat one token
    assert {"mlx", "mlx-lm", "torch", "numpy"} <= set(report["machine"]["versions"])
    assert report["machine"]["cpu"]
    roof = report["roofline"]
    assert roof["bandwidth_bytes_per_s"] > 1e8
    assert roof["weight_bytes"] == ModelArgs(**TINY).num_parameters() * 4
    assert [p["prompt_tokens"] for p in roof["per_prompt"]] == [8, 32]
    assert {(x["implementation"], x["prompt_tokens"]) for x in report["ratios"]} == {
        (impl, n) for impl in (ROWS | blas_rows) - {"mlx-openelm"} for n in (8, 32)
    }
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "torch-reference" in result.output and "roofline" in result.output


@pytest.mark.slow  # two worker processes, PyTorch in one
def test_bench_refuses_a_reference_that_disagrees(tiny: Path, other: Path) -> None:
    # The reference reads other weights: a real disagreement, found by the token check.
    with pytest.raises(ValueError, match="refusing to compare a wrong implementation"):
        runner.bench(model=str(tiny), reference_model=str(other), prompt_tokens=[16],
                     gen_tokens=8, trials=1, mlx_lm=False, bandwidth_bytes=2**20)  # fmt: skip


@pytest.mark.slow  # two worker processes
def test_bench_preset_shape_without_reference(tmp_path: Path) -> None:
    # --config: random weights of a shape of one's own; mlx-lm is checked against mlx-openelm.
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    report = runner.bench(config=str(config), prompt_tokens="16", gen_tokens=6, trials=1,
                          reference="none", bandwidth_bytes=2**20)  # fmt: skip
    rows = {r["implementation"]: r for r in report["results"]}
    assert set(rows) == {"mlx-openelm", "mlx-lm"}
    assert rows["mlx-lm"]["checked_against"] == "mlx-openelm"
    assert rows["mlx-lm"]["check_tokens"] == rows["mlx-openelm"]["check_tokens"]


@pytest.mark.slow
def test_kernels_ab_adds_a_row_with_the_cpu_kernels_off(tiny: Path) -> None:
    from mlx_openelm import kernels

    report = runner.bench(model=str(tiny), prompt_tokens="16", gen_tokens=6, trials=1,
                          reference="none", mlx_lm=False, kernels_ab=True,
                          bandwidth_bytes=2**20)  # fmt: skip
    rows = {r["implementation"]: r for r in report["results"]}
    assert set(rows) == {"mlx-openelm", "mlx-openelm-kernels-off"}
    assert rows["mlx-openelm-kernels-off"]["kernels"] == "off (MLX_OPENELM_KERNELS=0)"
    assert rows["mlx-openelm"]["kernels"] == kernels.status()  # the same machine, the same build
    off = rows["mlx-openelm-kernels-off"]
    assert off["checked_against"] == "mlx-openelm"  # and its greedy tokens agreed
    assert off["check_tokens"] == rows["mlx-openelm"]["check_tokens"]


def _row(name: str, tokens: list[int], margins: list[float], n: int = 16) -> dict:
    return dict(implementation=name, prompt_tokens=n, check_tokens=tokens, check_margins=margins)


def test_check_agreement_stops_at_a_near_tie() -> None:
    ref = _row("torch-reference", [5, 6, 7, 8], [0.3, 0.2, 1e-5, 0.4])
    mine = _row("mlx-openelm", [5, 6, 9, 10], [0.3, 0.2, 1e-5, 0.4])
    twin = _row("mlx-openelm-uniform", [1, 2, 3, 4], [0.3, 0.3, 0.3, 0.3])  # other weights
    runner.check_agreement([mine, ref, twin])
    assert mine["checked_tokens"] == 2 and mine["checked_against"] == "torch-reference"
    assert "checked_tokens" not in twin
    wrong = _row("mlx-lm", [5, 7, 7, 8], [0.3, 0.2, 1e-5, 0.4])
    with pytest.raises(ValueError, match=r"mlx-lm generated .*first difference at token 1"):
        runner.check_agreement([mine, ref, wrong])


def test_random_weights_make_varied_tokens() -> None:
    import mlx.core as mx

    from mlx_openelm.generation import generate_step
    from mlx_openelm.model import Model

    model = Model(ModelArgs(**TINY))
    weights.random_weights(model, seed=0)
    prompt = mx.array(list(range(3, 35)))
    tokens = [t for t, _ in generate_step(prompt, model, max_tokens=24)]
    assert len(set(tokens)) >= 16, tokens
    # And MLX's default init, for contrast, collapses onto a few tokens.
    mx.random.seed(0)
    plain = Model(ModelArgs(**TINY))
    assert len({t for t, _ in generate_step(prompt, plain, max_tokens=24)}) < len(set(tokens))


@pytest.fixture(scope="module")
def quantised(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> Path:
    import mlx.nn as nn

    from mlx_openelm.loading import load, save_model

    model, _, args = load(tiny)
    nn.quantize(model, group_size=32, bits=4)
    folder = tmp_path_factory.mktemp("bench") / "q4"
    save_model(folder, model, args, quantization={"group_size": 32, "bits": 4})
    return folder


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "9B"], "Unknown OpenELM preset '9B'"),
        (["--preset", "270M", "--dtype", "float64"], "--dtype must be one of"),
        (["--preset", "270M", "--prompt-tokens", "2000"], "exceed the model's context of 2048"),
        (["--preset", "270M", "--prompt-tokens", "12,x"], "comma-separated lengths"),
        (["--preset", "270M", "--gen-tokens", "1"], "--gen-tokens must be at least 2"),
        (["--preset", "270M", "-q"], "unquantised weights only"),
        (["--preset", "270M", "--model", "x"], "exactly one of --model, --preset or --config"),
        (["--preset", "270M", "--reference", "tf"], "--reference must be torch or none"),
        (["--preset", "270M", "--reference-device", "tpu"], "auto, cpu or cuda"),
        (["--preset", "270M", "--json", "/no/such/dir/x.json"], "does not exist"),
        (["--preset", "270M", "--reference", "none", "--reference-model", "x"], "needs"),
        (
            ["--model", "QUANTISED", "--prompt-tokens", "16", "--gen-tokens", "8"],
            "quantised weights, which the PyTorch reference can't run",
        ),
    ],
)
def test_bad_inputs_are_one_line_errors(args: list[str], message: str, quantised: Path) -> None:
    args = [str(quantised) if a == "QUANTISED" else a for a in args]
    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_worker_errors_come_back_as_user_errors(tmp_path: Path) -> None:
    spec = dict(
        implementation="torch-reference", folder=str(tmp_path), device="cpu", dtype="float32",
        dtype_name="float32", gen_tokens=4, prompt_tokens=[4], trials=1, vocab_size=384,
    )  # fmt: skip
    with pytest.raises(FileNotFoundError, match="No config.json"):
        run_worker(spec)


def test_reference_keeps_only_the_last_logits() -> None:
    # The PyTorch side of the bench computes only the logits it samples from, as MLX does.
    import torch
    from mlx_openelm.bench.reference import KVCache
    from torch_checkpoints import random_model

    model = random_model(TINY, seed=0)
    ids = torch.randint(3, TINY["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids, cache=KVCache())
        cache = KVCache()
        last = model(ids, cache=cache, logits_to_keep=1)
    assert last.shape == (1, 1, TINY["vocab_size"]) and cache.offset == 9
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)


def test_merge_trials_pools_rounds() -> None:
    def row(prefill: float, decode: float, mem: int, check: list[int]) -> dict:
        return dict(implementation="mlx-openelm", prompt_tokens=16, prefill_tps=prefill,
                    decode_tps=decode, ttft_s=16 / prefill, prefill_tps_trials=[prefill],
                    decode_tps_trials=[decode], ttft_s_trials=[16 / prefill], trials=1,
                    peak_memory_bytes=mem, peak_rss_bytes=None, check_tokens=check)  # fmt: skip

    merged: dict = {}
    for r, (prefill, decode, mem) in enumerate([(100, 9, 5), (50, 3, 7), (200, 10, 6)]):
        runner.merge_trials(merged, [row(prefill, decode, mem, [1, 2] if r == 0 else [])])
    (m,) = merged.values()
    assert (m["trials"], m["prefill_tps"], m["decode_tps"], m["ttft_s"]) == (3, 100, 9, 0.16)
    assert m["prefill_tps_trials"] == [100, 50, 200] and m["peak_memory_bytes"] == 7
    assert m["check_tokens"] == [1, 2]  # the check comes from the first round
    assert m["prefill_tps_mean"] == pytest.approx(350 / 3)
    assert m["prefill_tps_std"] == pytest.approx(76.376, abs=1e-3)  # sample std of the trials


def test_worker_ignores_a_source_tree_in_the_working_directory(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Run from a clone with a non-editable install, `python -m` would import the clone's
    # `mlx_openelm/` (no `bench` in it) first; the worker must not see it, and a relative model
    # path must still mean the one the user gave.
    (tmp_path / "mlx_openelm").mkdir()
    (tmp_path / "mlx_openelm" / "__init__.py").write_text("raise ImportError('the decoy')\n")
    (tmp_path / "model").symlink_to(tiny)
    monkeypatch.chdir(tmp_path)
    spec = dict(
        implementation="mlx-openelm", folder="model", dtype="float32", dtype_name="float32",
        gen_tokens=3, prompt_tokens=[4], trials=1, vocab_size=TINY["vocab_size"], check=False,
    )  # fmt: skip
    (row,) = run_worker(spec)
    assert row["prompt_tokens"] == 4 and row["decode_tps"] > 0


# ---- llama.cpp rows, with stand-ins for llama-bench and llama-completion

FAKE_BENCH = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LLAMA_LOG"], "a") as f:
    f.write(json.dumps(["llama-bench", *args]) + "\\n")
if os.environ.get("FAKE_LLAMA_FAIL"):
    print("llama_model_load: error loading model: unknown model architecture", file=sys.stderr)
    sys.exit(1)
opt = lambda name, default: args[args.index(name) + 1] if name in args else default
assert open(opt("-m", None), "rb").read(4) == b"GGUF"
reps, tests = int(opt("-r", "5")), []
for d in map(int, opt("-d", "0").split(",")):
    tests += [(p, 0, d) for p in map(int, opt("-p", "512").split(",")) if p]
    tests += [(0, n, d) for n in map(int, opt("-n", "128").split(",")) if n]
out = []
for (p, n, d), fa in ((t, fa) for t in tests for fa in map(int, opt("-fa", "0").split(","))):
    # flash attention on: prefill 7 tok/s slower, decode 3 faster
    ts = [(1000.0 + p - 7 * fa if p else 50.0 + d + 3 * fa) + 10 * i for i in range(reps)]
    out.append(dict(n_prompt=p, n_gen=n, n_depth=d, samples_ts=ts, avg_ts=sum(ts) / reps,
                    flash_attn=bool(fa),
                    stddev_ts=0.0, backends="CPU", cpu_info="Fake CPU", gpu_info="",
                    n_threads=int(opt("-t", "4")), build_commit="fake", build_number=1,
                    model_type="openelm fake", model_size=1, type_k="f16", type_v="f16"))
print(json.dumps(out, indent=2))
"""

# Greedy tokens from mlx-openelm itself, printed as llama-completion prints them (losing the
# last two, as its logger sometimes does at exit).
FAKE_COMPLETION = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LLAMA_LOG"], "a") as f:
    f.write(json.dumps(["llama-completion", *args]) + "\\n")
opt = lambda name: args[args.index(name) + 1]
import mlx.core as mx, mlx_openelm
from mlx_openelm.generation import generate_step
from mlx_openelm.export.gguf import ids_to_placeholder_text, placeholder_text_to_ids
ids = placeholder_text_to_ids(open(opt("-f"), encoding="utf-8").read())
model, _, _ = mlx_openelm.load(os.environ["FAKE_LLAMA_MODEL"])
out = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=int(opt("-n")))]
if os.environ.get("FAKE_LLAMA_WRONG"):
    out[1] = 3 if out[1] != 3 else 4
sys.stdout.write(ids_to_placeholder_text(out[:-2]))
"""


@pytest.fixture
def fake_llama(tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import sys

    bin_dir = tmp_path / "build" / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("llama-bench", FAKE_BENCH), ("llama-completion", FAKE_COMPLETION)):
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_LLAMA_MODEL", str(tiny))
    return bin_dir


def _calls(bin_dir: Path) -> list[list[str]]:
    log = bin_dir.parent.parent / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.slow
def test_llama_cpp_rows_beside_the_mlx_rows(tiny: Path, fake_llama: Path, tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(tiny), "--prompt-tokens", "8,16", "--gen-tokens", "6",
            "--trials", "2", "--reference", "none", "--no-mlx-lm", "--llama-cpp",
            str(fake_llama), "--json", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = {(r["implementation"], r["prompt_tokens"]): r for r in report["results"]}
    assert set(rows) == {(impl, n) for impl in ("mlx-openelm", "llama.cpp") for n in (8, 16)}
    from mlx_openelm.bench.llama_cpp import threads

    for n in (8, 16):
        row = rows["llama.cpp", n]
        # Two interleaved rounds of llama-bench -r 1: samples pooled, median, mean and std; of
        # flash attention off and on, the faster (off for prefill, on for decode here).
        assert row["prefill_tps_trials"] == [1000.0 + n] * 2
        assert row["decode_tps_trials"] == [53.0 + n] * 2 and row["decode_tps"] == 53.0 + n
        assert row["prefill_tps_std"] == 0.0 and row["decode_tps_mean"] == 53.0 + n
        assert row["llama_bench"]["flash_attn"] == {"prefill": False, "decode": True}
        assert (row["dtype"], row["backend"], row["threads"]) == ("f32", "cpu", threads())
        assert row["ttft_s"] == pytest.approx(n / (1000.0 + n)) and row["peak_rss_bytes"] > 0
        # Its greedy tokens joined the check (the fake printed 2 fewer than asked for).
        assert row["checked_against"] == "mlx-openelm" and row["checked_tokens"] == 6
        assert row["check_tokens"] == rows["mlx-openelm", n]["check_tokens"]
    assert any(r["implementation"] == "llama.cpp" for r in report["ratios"])
    assert report["settings"]["llama_cpp"]["completion"].endswith("llama-completion")
    assert "llama.cpp: llama-bench fake (1)" in result.output

    calls = _calls(fake_llama)
    benches = [c for c in calls if c[0] == "llama-bench"]
    assert len(benches) == 4  # prefill and decode, per round
    t = str(threads())
    prefill = ["-t", t, "-r", "1", "-o", "json", "-fa", "0,1", "-p", "8,16", "-n", "0"]
    decode = ["-t", t, "-r", "1", "-o", "json", "-fa", "0,1", "-p", "0", "-n", "6", "-d", "8,16"]
    assert [c[3:] for c in benches] == [prefill, decode] * 2
    completions = [c for c in calls if c[0] == "llama-completion"]
    assert len(completions) == 2  # the check: round 1 only, once per prompt length
    assert all({"--temp", "--ignore-eos", "-no-cnv"} <= set(c) for c in completions)
    assert all(c[c.index("-ctk") + 1] == "f32" and c[c.index("-fa") + 1] == "off"
               for c in completions)  # fmt: skip


@pytest.mark.slow
def test_llama_cpp_tokens_that_disagree_are_refused(
    tiny: Path, fake_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("gguf")
    monkeypatch.setenv("FAKE_LLAMA_WRONG", "1")
    with pytest.raises(ValueError, match=r"llama.cpp generated .*first difference at token 1"):
        runner.bench(model=str(tiny), prompt_tokens=[8], gen_tokens=4, trials=1,
                     reference="none", mlx_lm=False, llama_cpp=fake_llama,
                     bandwidth_bytes=2**20)  # fmt: skip


@pytest.mark.slow  # a worker process, then the llama-bench stand-in (prefill, decode)
def test_llama_cpp_beside_8_bit_rows_is_q8_0_without_a_check(fake_llama, tmp_path) -> None:
    pytest.importorskip("gguf")
    config = tmp_path / "config.json"  # every matrix width a multiple of MLX's group of 64
    config.write_text(json.dumps({**TINY, "head_dim": 32, "ffn_dim_divisor": 64,
                                  "num_transformer_layers": 2}))  # fmt: skip
    report = runner.bench(config=config, prompt_tokens=[8], gen_tokens=4, trials=1, q_bits=8,
                          reference="none", mlx_lm=False, llama_cpp=fake_llama / "llama-bench",
                          bandwidth_bytes=2**20)  # fmt: skip
    row = next(r for r in report["results"] if r["implementation"] == "llama.cpp")
    assert row["dtype"] == "q8_0" and row["check_tokens"] == [] and "checked_tokens" not in row
    (call,) = {c[c.index("-m") + 1] for c in _calls(fake_llama) if c[0] == "llama-bench"}
    assert call.endswith("model-q8_0.gguf")
    assert not [c for c in _calls(fake_llama) if c[0] == "llama-completion"]


@pytest.mark.slow  # a worker process, then the llama-bench stand-in (prefill, decode)
def test_llama_cpp_beside_a_4_bit_folder_is_q4_0(quantised, fake_llama) -> None:
    pytest.importorskip("gguf")
    report = runner.bench(model=str(quantised), prompt_tokens=[8], gen_tokens=4, trials=1,
                          reference="none", mlx_lm=False, llama_cpp=fake_llama,
                          bandwidth_bytes=2**20)  # fmt: skip
    rows = {r["implementation"]: r for r in report["results"]}
    assert rows["llama.cpp"]["dtype"] == "q4_0" and rows["mlx-openelm"]["dtype"] == "4-bit/float32"
    (call,) = {c[c.index("-m") + 1] for c in _calls(fake_llama) if c[0] == "llama-bench"}
    assert call.endswith("model-q4_0.gguf")


def test_a_quantised_folder_exports_its_dequantised_weights(quantised, tmp_path) -> None:
    gguf = pytest.importorskip("gguf")
    import mlx.core as mx
    import numpy as np
    from mlx_openelm.bench.llama_cpp import export

    from mlx_openelm.export.gguf import read_tensors
    from mlx_openelm.loading import load

    model, _, args = load(quantised)
    out = export(quantised, tmp_path / "m.gguf", "q4_0")
    Q = gguf.GGMLQuantizationType
    tensors = read_tensors(out)
    emb_type, emb = tensors["token_embd.weight"]
    assert (emb_type, emb.shape) == (Q.Q8_0, (args.vocab_size, args.model_dim))
    qkv_type, qkv = tensors["blk.1.attn_qkv.weight"]
    layer = model.layers[1].attn.qkv_proj
    want = np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, 32, 4))
    assert qkv_type == Q.Q4_0 and qkv.shape == want.shape
    step = np.abs(want).max(axis=1, keepdims=True) / 7  # q4_0's rounding of the same values
    assert (np.abs(qkv - want) <= step).all()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--llama-cpp", "/no/such/llama"], "no llama-bench there"),
        (["--llama-cpp", "FAKE", "-q", "--q-bits", "3", "--reference", "none"],
         "no llama.cpp type for 3-bit"),
        pytest.param(["--llama-cpp", "FAKE", "--reference", "none"],
                     "llama-bench failed (exit 1): llama_model_load: error loading model",
                     marks=pytest.mark.slow),  # a worker, then the stand-in
    ],
)  # fmt: skip
def test_llama_cpp_errors_are_one_line(
    extra: list[str], message: str, tiny: Path, fake_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("gguf")
    monkeypatch.setenv("FAKE_LLAMA_FAIL", "1")
    extra = [str(fake_llama) if a == "FAKE" else a for a in extra]
    args = ["bench", "--model", str(tiny), "--prompt-tokens", "8", "--gen-tokens", "4",
            "--trials", "1", "--no-mlx-lm", *extra]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert message in result.output


def test_a_llama_cpp_build_that_dies_on_an_illegal_instruction_says_how_to_rebuild() -> None:
    import sys

    from mlx_openelm.bench.llama_cpp import _run

    from mlx_openelm.errors import UserError

    die = "import os, signal; os.kill(os.getpid(), signal.SIGILL)"
    with pytest.raises(UserError, match=r"illegal instruction.*-mno-amx-tile"):
        _run([sys.executable, "-c", die])


def test_a_llama_cpp_tool_reports_its_own_peak_rss() -> None:
    # The tool runs under a small launcher that reports its peak alone: started straight from a
    # bench holding a model's fp32 weights, llama-bench was charged their size too.
    import sys

    import numpy as np
    from mlx_openelm.bench.llama_cpp import _run

    held = np.ones(600 << 20, dtype=np.uint8)
    out, rss = _run([sys.executable, "-c", "b = bytearray(200 << 20); print('ran')"])
    assert out.strip() == "ran"
    assert 200 << 20 < rss < 400 << 20, rss
    del held
