"""Evaluation: batched scoring against the PyTorch reference, sliding-window perplexity against
lm-eval's rolling windows, the lm-eval backend end to end on the offline hellaswag_local task, and
a cross-check with mlx-lm's own lm-eval backend.

One random reference checkpoint (2 layers, dim 64, the tiny tokenizer's 512 pieces, a 64-token
window so that long texts need several windows), converted to fp32 once per module.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx  # conftest has imported mlx_openelm first (it picks the BLAS)
import numpy as np
import pytest
from conftest import DATA, SPM_VOCAB
from typer.testing import CliRunner

import mlx_openelm

torch = pytest.importorskip(
    "torch", reason="the PyTorch reference needs torch (pip install .[reference])"
)
lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness (pip install .[eval])")
import torch_checkpoints  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from mlx_openelm.convert import convert  # noqa: E402

from mlx_openelm.cli import app  # noqa: E402
from mlx_openelm.eval import rolling_windows, score  # noqa: E402
from mlx_openelm.eval.lm import MLXOpenELM  # noqa: E402
from mlx_openelm.tasks.hellaswag_local import read_docs  # noqa: E402

TOL = 1e-4
WINDOW = 64
CONFIG = dict(
    num_transformer_layers=2, model_dim=64, head_dim=16, vocab_size=SPM_VOCAB, ffn_dim_divisor=32,
    max_context_length=WINDOW,
)  # fmt: skip
TEXT = (DATA / "persuasion.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def ref_folder(tmp_path_factory, spm_model):
    """(PyTorch reference model, its converted fp32 MLX folder with the tiny tokenizer)."""
    ref = torch_checkpoints.random_model(CONFIG, seed=3)
    root = tmp_path_factory.mktemp("eval")
    torch_checkpoints.save_hf(ref, root / "hf")
    convert(root / "hf", root / "mlx", dtype="float32", tokenizer=spm_model)
    return ref, root / "mlx"


@pytest.fixture(scope="module")
def loaded(ref_folder):
    model, tokenizer, _ = mlx_openelm.load(ref_folder[1])
    return model, tokenizer


def ref_logprobs(ref, ids: list[int]) -> np.ndarray:
    """Log-softmax of one full reference forward over ids[:-1]: row i predicts ids[i + 1]."""
    with torch.no_grad():
        logits = ref(torch.tensor([ids[:-1]]))[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def split_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal-LM convention: trailing spaces move to the continuation, the whole text is
    tokenized once and split after the context's tokens; an empty context is BOS alone."""
    if not context:
        return [tokenizer.bos_id], tokenizer.encode(continuation, add_bos=False)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tokenizer.encode(context)
    return ctx, tokenizer.encode(context + continuation)[len(ctx) :]


def expected(ref, ctx: list[int], cont: list[int], window: int = WINDOW) -> tuple[float, bool]:
    full = (ctx + cont)[-(window + 1) :]  # what does not fit loses context from the left
    rows = ref_logprobs(ref, full)[-len(cont) :]
    total = float(sum(rows[i, t] for i, t in enumerate(cont)))
    return total, all(int(rows[i].argmax()) == t for i, t in enumerate(cont))


PAIRS = [
    ("Anne Elliot had been", " at home all the morning"),
    ("Anne Elliot had been", " in Bath"),
    ("Anne Elliot had been", "."),
    ("Sir Walter", " smiled, and said nothing more about it."),
    ("", "Captain Wentworth"),  # empty context: BOS
    ("She had been forced into prudence in her youth, ", "she learned romance as she grew older"),
    (TEXT[:400], " and so it ended."),  # longer than the window: truncated from the left
    ("Lady Russell", " was"),
]


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_loglikelihood_matches_reference(ref_folder, loaded, batch_size):
    ref, _ = ref_folder
    lm = MLXOpenELM(loaded=loaded, batch_size=batch_size)
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    assert lm.stats.groups == len(PAIRS) - 2  # the three choices of one context share its pass
    for (ctx, cont), (lp, greedy) in zip(PAIRS, got, strict=True):
        want, want_greedy = expected(ref, *split_pair(loaded[1], ctx, cont))
        assert abs(lp - want) <= TOL * max(1.0, abs(want)), (ctx[:30], cont, lp, want)
        assert greedy == want_greedy


def test_greedy_flag_and_mixed_lengths(ref_folder, loaded):
    ref, _ = ref_folder
    model, tokenizer = loaded
    ctx = tokenizer.encode("Anne")
    greedy = []
    for _ in range(6):  # the reference's own greedy continuation
        greedy.append(int(ref_logprobs(ref, ctx + greedy + [0])[-1].argmax()))
    wrong = greedy[:3] + [(greedy[3] + 1) % SPM_VOCAB] + greedy[4:]
    rng = np.random.default_rng(0)
    others = [
        (rng.integers(3, SPM_VOCAB, n).tolist(), rng.integers(3, SPM_VOCAB, k).tolist())
        for n, k in [(1, 9), (30, 1), (7, 2), (50, 14), (12, 40)]
    ]
    requests = [(ctx, greedy), (ctx, wrong), (ctx, greedy[:1])] + others
    one = score(model, requests, batch_size=1)
    batched = score(model, requests, batch_size=8)
    assert [g for _, g in batched[:3]] == [True, False, True]
    for (c, k), a, b in zip(requests, one, batched, strict=True):
        want, want_greedy = expected(ref, c, k)
        assert abs(a[0] - want) <= TOL * max(1.0, abs(want))
        assert abs(a[0] - b[0]) <= 1e-5 * max(1.0, abs(want)) and a[1] == b[1] == want_greedy


def test_rolling_windows_are_lm_evals():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for n in (1, 5, 63, 64, 65, 200):
        tokens = list(range(10, 10 + n))
        for context, stride in [(64, 64), (64, 16), (8, 1), (8, 3), (1, 1)]:
            theirs = get_rolling_token_windows(tokens, 1, context, context - stride + 1)
            assert rolling_windows(tokens, 1, context, stride) == [
                make_disjoint_window(w) for w in theirs
            ]
    with pytest.raises(ValueError, match="stride"):
        rolling_windows([5, 6], 1, 8, 9)


def naive_sliding(ref, ids: list[int], bos: int, context: int, stride: int) -> float:
    """Sliding-window log-likelihood straight from the reference: a window of `context` tokens
    ending at each block of `stride` new tokens (the first from BOS, the last right-aligned)."""
    seq = [bos] + ids
    total, done = 0.0, 0
    while done < len(ids):
        n = min(context, len(ids)) if done == 0 else min(stride, len(ids) - done)
        end = done + n  # predict seq[done + 1 : end + 1] from seq[end - context : end]
        window = seq[max(0, end - context) : end + 1]
        rows = ref_logprobs(ref, window)[-n:]
        total += float(sum(rows[i, t] for i, t in enumerate(seq[done + 1 : end + 1])))
        done = end
    return total


def test_perplexity_equals_loglikelihood_rolling(ref_folder, loaded, tmp_path):
    ref, folder = ref_folder
    model, tokenizer = loaded
    text = TEXT[:1200]  # ~300+ tokens: several 64-token windows
    ids = tokenizer.encode(text, add_bos=False)
    assert len(ids) > 4 * WINDOW
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8")

    lm = MLXOpenELM(loaded=loaded, batch_size=4)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], True)[0]
    out = tmp_path / "ppl.json"
    result = CliRunner().invoke(
        app, ["perplexity", "--model", str(folder), "--data", str(tmp_path / "doc.txt"),
              "--output", str(out), "--batch-size", "3"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["tokens"] == len(ids) and report["context"] == report["stride"] == WINDOW
    assert report["loglikelihood"] == pytest.approx(rolling, rel=1e-6)
    assert report["perplexity"] == pytest.approx(np.exp(-rolling / len(ids)), rel=1e-6)
    assert report["model"] == str(folder) and report["dtype"] == "float32"
    want = naive_sliding(ref, ids, tokenizer.bos_id, WINDOW, WINDOW)
    assert rolling == pytest.approx(want, rel=1e-5)

    # A shorter stride gives each token more context: checked against the reference as well.
    from mlx_openelm.eval.perplexity import perplexity

    strided = perplexity(
        str(folder), tmp_path / "doc.txt", context=32, stride=8, loaded=loaded, verbose=False
    )
    assert strided["loglikelihood"] == pytest.approx(
        naive_sliding(ref, ids, tokenizer.bos_id, 32, 8), rel=1e-5
    )


def test_perplexity_reads_folders_and_jsonl(tmp_path, loaded):
    from mlx_openelm.eval.perplexity import perplexity, read_documents

    (tmp_path / "a.txt").write_text("Anne Elliot", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    lines = [json.dumps({"text": t}) for t in ("Sir Walter", "Lady Russell")]
    (tmp_path / "sub" / "b.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    docs = read_documents(tmp_path)
    assert [t for _, t in docs] == ["Anne Elliot", "Sir Walter", "Lady Russell"]
    report = perplexity("m", tmp_path, loaded=loaded, verbose=False)
    assert report["documents"] == 3 and len(report["per_document"]) == 3
    assert sum(d["loglikelihood"] for d in report["per_document"]) == pytest.approx(
        report["loglikelihood"]
    )
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="text"):
        read_documents(tmp_path / "bad.jsonl")


def test_adapter_is_applied_and_reported(ref_folder, loaded, tmp_path):
    from mlx.utils import tree_flatten, tree_map

    from mlx_openelm.adapters import adapter_config, apply_lora
    from mlx_openelm.eval.perplexity import perplexity

    folder = ref_folder[1]
    model, _, _ = mlx_openelm.load(folder)
    config = adapter_config(2, rank=4, targets=["qkv_proj", "out_proj"])
    apply_lora(model, config)
    mx.random.seed(0)
    model.update(tree_map(lambda p: 0.05 * mx.random.normal(p.shape), model.trainable_parameters()))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    mx.save_safetensors(
        str(adapter / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters()))
    )
    (tmp_path / "doc.txt").write_text(TEXT[:300], encoding="utf-8")

    base = perplexity(str(folder), tmp_path / "doc.txt", verbose=False)
    tuned = perplexity(str(folder), tmp_path / "doc.txt", adapter_path=adapter, verbose=False)
    assert base["adapter"] is None
    assert tuned["adapter"]["path"] == str(adapter)
    assert tuned["adapter"]["config"]["lora_parameters"]["rank"] == 4
    assert abs(tuned["loglikelihood"] - base["loglikelihood"]) > 1e-3
    model.eval()  # no adapter dropout
    direct = perplexity("m", tmp_path / "doc.txt", loaded=(model, loaded[1]), verbose=False)
    assert tuned["loglikelihood"] == pytest.approx(direct["loglikelihood"], rel=1e-6)


def test_perplexity_cli_errors(ref_folder, tmp_path):
    (tmp_path / "doc.txt").write_text("Anne", encoding="utf-8")
    runner = CliRunner()
    for extra, message in [
        (["--data", str(tmp_path / "missing.txt")], "does not exist"),
        (["--data", str(tmp_path / "doc.txt"), "--context", "16", "--stride", "32"], "stride"),
        (["--data", str(tmp_path / "doc.txt"), "--context", "128"], "exceeds"),
    ]:
        result = runner.invoke(app, ["perplexity", "--model", str(ref_folder[1]), *extra])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output


def test_hellaswag_local_docs():
    docs = read_docs()
    assert len(docs) == 10042
    assert all(len(d["choices"]) == 4 and 0 <= d["label"] <= 3 for d in docs)
    # lm-eval capitalises ctx_b ("he" -> "He") and drops WikiHow's bracketed artefacts.
    assert docs[0]["query"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert docs[1]["query"].endswith("She bends down and grabs the pole. The lady")
    assert "[www.kiddio.org]" not in docs[3505]["query"] + "".join(docs[3505]["choices"])


def test_hellaswag_local_end_to_end(ref_folder, loaded, tmp_path):
    from mlx_openelm.eval.harness import evaluate

    lm = MLXOpenELM(loaded=loaded, batch_size=8)
    lm.path = str(ref_folder[1])
    out = tmp_path / "report.json"
    report = evaluate(
        "unused", "hellaswag_local", limit=5, lm=lm, log_samples=True, output=out, verbose=False
    )
    docs = read_docs(limit=5)
    pairs = [(d["query"], " " + c) for d in docs for c in d["choices"]]
    lls = [
        lp for lp, _ in lm.loglikelihood([Instance("loglikelihood", {}, p, 0) for p in pairs], True)
    ]
    lls = np.array(lls).reshape(5, 4)
    samples = sorted(report["samples"]["hellaswag_local"], key=lambda s: s["doc_id"])
    got = np.array([[r[0] for r in s["filtered_resps"]] for s in samples])
    np.testing.assert_allclose(got, lls, rtol=1e-6)
    gold = np.array([d["label"] for d in docs])
    lengths = np.array([[len(c) for c in d["choices"]] for d in docs], dtype=float)
    result = report["results"]["hellaswag_local"]
    assert result["acc,none"] == pytest.approx(np.mean(lls.argmax(1) == gold))
    assert result["acc_norm,none"] == pytest.approx(np.mean((lls / lengths).argmax(1) == gold))

    saved = json.loads(out.read_text())
    assert saved["n_samples"]["hellaswag_local"]["effective"] == 5
    assert saved["model"] == str(ref_folder[1]) and saved["adapter"] is None
    assert saved["dtype"] == "float32" and saved["bits"] is None
    assert saved["versions"]["lm-eval"] == lm_eval.__version__
    assert saved["speed"]["items"] == 5 and saved["speed"]["items_per_s"] > 0


def test_matches_mlx_lm_backend(loaded):
    """mlx-lm's own lm-eval backend (one continuation at a time) gives the same numbers."""
    from lm_eval.api.model import LM
    from mlx_lm.evaluate import MLXLM

    model, tokenizer = loaded

    class HFStyle:  # the one tokenizer call MLXLM makes
        def encode(self, text, add_special_tokens=True):
            return tokenizer.encode(text, add_bos=add_special_tokens)

    theirs = MLXLM.__new__(MLXLM)
    LM.__init__(theirs)
    theirs._model, theirs.tokenizer, theirs._max_tokens = model, HFStyle(), None
    theirs._batch_size, theirs.use_chat_template = 8, False
    docs = read_docs(limit=3)
    requests = [
        Instance("loglikelihood", {}, (d["query"], " " + c), 0) for d in docs for c in d["choices"]
    ]
    # No truncation on either side (mlx-lm trims a whole item's context by its longest choice).
    ours = MLXOpenELM(loaded=loaded, batch_size=5, max_length=1024)
    ours = ours.loglikelihood(requests, disable_tqdm=True)
    want = theirs.loglikelihood(requests)
    for (a, ga), (b, gb) in zip(ours, want, strict=True):
        assert abs(a - b) <= TOL * max(1.0, abs(b)) and ga == bool(gb)


def test_generate_until_is_greedy(ref_folder, loaded):
    ref, _ = ref_folder
    model, tokenizer = loaded
    context = "Anne Elliot"
    ids = tokenizer.encode(context)
    new = []
    for _ in range(6):
        t = int(ref_logprobs(ref, ids + new + [0])[-1].argmax())
        if t == tokenizer.eos_id:
            break
        new.append(t)
    detok = tokenizer.detokenizer(trim_space=False)
    for t in new:
        detok.add_token(t)
    detok.finalize()
    lm = MLXOpenELM(loaded=loaded)
    request = Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 6}), 0)
    assert lm.generate_until([request], disable_tqdm=True) == [detok.text]


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model, model_registry

    assert get_model("mlx-openelm") is MLXOpenELM
    assert "hf" in model_registry  # lm-eval's own backends are still there


def test_eval_cli(ref_folder, tmp_path, monkeypatch):
    runner = CliRunner()
    out = tmp_path / "r.json"
    args = ["eval", "--model", str(ref_folder[1]), "--tasks", "hellaswag_local", "--limit", "2"]
    result = runner.invoke(app, [*args, "--batch-size", "4", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "hellaswag_local" in result.output and "items/s" in result.output
    report = json.loads(out.read_text())
    assert report["tasks"] == ["hellaswag_local"] and report["limit"] == 2
    assert 0 <= report["results"]["hellaswag_local"]["acc,none"] <= 1

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "pip install 'mlx-openelm[eval]'" in result.output


@pytest.mark.slow
def test_lm_eval_command_line(ref_folder, tmp_path):
    """`python -m mlx_openelm.eval` is lm-eval's own CLI with our backend and tasks; both it and
    a task name that is not local scan lm-eval's ~15k task configs (30-60 s each)."""
    cmd = [
        sys.executable, "-m", "mlx_openelm.eval", "run", "--model", "mlx-openelm",
        "--model_args", f"model={ref_folder[1]}", "--tasks", "hellaswag_local", "--limit", "2",
        "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "hellaswag_local" in proc.stdout
    results = list(Path(tmp_path / "out").rglob("results_*.json"))
    assert results and "hellaswag_local" in json.loads(results[0].read_text())["results"]

    # An unknown name is only known to be unknown after scanning lm-eval's own tasks.
    args = ["eval", "--model", str(ref_folder[1]), "--tasks", "hellaswag_local,no_such_task"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "Unknown task(s): no_such_task" in result.output
