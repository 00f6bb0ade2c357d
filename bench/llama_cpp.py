"""llama.cpp rows for `mlx-openelm bench`: the same weights as a GGUF file, timed by `llama-bench`.

The benchmarked folder is exported once (`mlx_openelm.export.gguf`) at the type that matches the
MLX rows: f32 beside fp32, f16/bf16 beside 16-bit, q8_0/q4_0 beside MLX 8-/4-bit. Its vocabulary
is the placeholder one (one character per id), so the bench's prompts, which are raw ids, can be
written as text for `llama-completion` and its greedy output read back as ids for the token check
(f32 only). `llama-bench` times prefill as `pp N` and decode as `tg G` at depth N (G tokens after
an N-token prompt), with the same thread count; its KV cache is f16 (it offers no f32). Each test
runs with flash attention off and on, and the faster counts: which one wins depends on the machine
(on a 2-core Xeon VM, q4_0 decode at depth 512 read 69 tok/s off and 47 on, llama.cpp's default).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mlx_openelm.errors import UserError

from .bench import MAX_CHECK_TOKENS, prompt_ids

NAME = "llama.cpp"
GGUF_FOR_BITS = {8: "q8_0", 4: "q4_0"}
GGUF_FOR_DTYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
EXTRA_CHECK_TOKENS = 8  # llama-completion may lose its last printed token or two at exit


def find_tools(path: str | Path) -> dict[str, str | None]:
    """`llama-bench` (required) and `llama-completion` (optional) in a build folder, or beside
    the `llama-bench` binary given."""
    path = Path(path).expanduser()
    bench = path if path.is_file() else path / "llama-bench"
    if not (bench.is_file() and os.access(bench, os.X_OK)):
        raise FileNotFoundError(
            f"--llama-cpp {path}: no llama-bench there; give llama.cpp's build/bin folder or the "
            "llama-bench binary (docs/gguf.md says how to build it)"
        )
    completion = bench.parent / "llama-completion"
    usable = completion.is_file() and os.access(completion, os.X_OK)
    return {"bench": str(bench), "completion": str(completion) if usable else None}


def gguf_type(dtype: str, q_bits: int | None) -> str:
    """The GGUF type that matches the MLX rows' weights."""
    if q_bits:
        if q_bits not in GGUF_FOR_BITS:
            raise UserError(
                f"--llama-cpp matches MLX 8-bit and 4-bit rows with q8_0 and q4_0; "
                f"there is no llama.cpp type for {q_bits}-bit: use --q-bits 8 or 4"
            )
        return GGUF_FOR_BITS[q_bits]
    return GGUF_FOR_DTYPE[dtype]


def export(folder: str | Path, out: str | Path, gguf_type: str) -> Path:
    """The folder's weights as a GGUF file for llama-bench (placeholder vocabulary, no BOS); a
    quantised folder's are dequantised first, then written as `gguf_type` (q4_0 beside 4-bit)."""
    import mlx.core as mx  # noqa: I001

    import mlx_openelm
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model
    from mlx_openelm.export.gguf import write_gguf

    model, _, args = mlx_openelm.load(folder)
    model = dequantize_model(model)
    weights = dict(tree_flatten(model.parameters()))
    path = write_gguf(weights, args, out, gguf_type=gguf_type, add_bos=False, name="bench")
    del model, weights
    mx.clear_cache()
    return path


# Runs argv[2:] and writes its peak RSS (ru_maxrss) to the file argv[1], then exits as it did.
# Linux charges an exec'd child the RSS of the process it was forked from: llama-bench started by a
# bench that held the 3B's fp32 weights reported their 12 GB as its own peak (3.3 GB alone).
# Started from this small process, it reports its own.
_LAUNCHER = """
import os, signal, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
if os.WIFSIGNALED(status):
    signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _run(cmd: list[str]) -> tuple[str, int]:
    """Run a llama.cpp tool: (stdout, its own peak RSS in bytes)."""
    with tempfile.TemporaryFile(mode="w+") as err, tempfile.TemporaryDirectory() as tmp:
        rss_file = Path(tmp) / "maxrss"
        launch = [sys.executable, "-c", _LAUNCHER, str(rss_file), *cmd]
        proc = subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=err, text=True)
        out = proc.stdout.read()
        proc.wait()
        proc.stdout.close()
        if proc.returncode == -signal.SIGILL:
            raise UserError(
                f"{Path(cmd[0]).name} died on an illegal instruction: this llama.cpp build uses "
                "CPU instructions this machine will not run (AMX in some VMs); rebuild it with "
                "-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' (and the same "
                "CMAKE_CXX_FLAGS)"
            )
        if proc.returncode != 0:
            err.seek(0)
            tail = [line for line in err.read().splitlines() if line.strip()][-3:]
            raise UserError(
                f"{Path(cmd[0]).name} failed (exit {proc.returncode}): " + " | ".join(tail)
            )
        maxrss = int(rss_file.read_text())
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return out, maxrss * scale


def check_tokens(spec: dict[str, Any], n: int) -> list[int]:
    """llama-completion's greedy tokens after the bench's n-token prompt (f32 GGUF, f32 cache).

    Flash attention off: llama.cpp's CPU flash attention is not fp32-exact (270M shape, prompt
    512: it flips the second greedy token, where the fp32 top-2 gap is 0.028).
    """
    from mlx_openelm.export.gguf import ids_to_placeholder_text, placeholder_text_to_ids

    n_check = min(spec["gen_tokens"], MAX_CHECK_TOKENS)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as prompt:
        prompt.write(ids_to_placeholder_text(prompt_ids(n, spec["vocab_size"])))
        prompt.flush()
        n_gen = n_check + EXTRA_CHECK_TOKENS
        out, _ = _run([
            spec["tools"]["completion"], "-m", spec["gguf"], "-f", prompt.name,
            "-n", str(n_gen), "-c", str(n + n_gen), "-t", str(spec["threads"]), "--temp", "0",
            "--repeat-penalty", "1.0", "--ignore-eos", "-ctk", "f32", "-ctv", "f32",
            "-fa", "off", "-no-cnv", "--no-display-prompt", "--simple-io", "--no-warmup",
        ])  # fmt: skip
    tokens = placeholder_text_to_ids(out.rstrip("\n"))[:n_check]
    if len(tokens) < n_check:
        raise UserError(f"llama-completion printed {len(tokens)} of {n_check} tokens: {out!r}")
    return tokens


def run(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """One round of the llama.cpp row: prefill and decode per prompt length, the check if asked.

    Returns rows shaped as `bench.Result`, plus `llama_bench` (the build, the model as llama.cpp
    sees it, the KV cache types).
    """
    lengths, gen, trials = spec["prompt_tokens"], spec["gen_tokens"], spec["trials"]
    common = ["-m", spec["gguf"], "-t", str(spec["threads"]), "-r", str(trials), "-o", "json",
              "-fa", "0,1"]  # fmt: skip
    csv = ",".join(map(str, lengths))
    pp_out, pp_rss = _run([spec["tools"]["bench"], *common, "-p", csv, "-n", "0"])
    tg_out, tg_rss = _run([spec["tools"]["bench"], *common, "-p", "0", "-n", str(gen), "-d", csv])
    tests: dict[tuple[int, int, int], dict[str, Any]] = {}
    for t in json.loads(pp_out) + json.loads(tg_out):  # the faster of flash attention off and on
        key = (t["n_prompt"], t["n_gen"], t["n_depth"])
        if key not in tests or t["avg_ts"] > tests[key]["avg_ts"]:
            tests[key] = t
    check = spec.get("check", True) and spec["tools"]["completion"] and spec["gguf_type"] == "f32"
    rows = []
    for n in lengths:
        pp, tg = tests.get((n, 0, 0)), tests.get((0, gen, n))
        if pp is None or tg is None:
            raise UserError(f"llama-bench reported no pp{n} or tg{gen} @ d{n} test")
        prefill, decode = list(pp["samples_ts"]), list(tg["samples_ts"])
        ttft = [n / s for s in prefill]
        rows.append(dict(
            implementation=NAME, backend=pp["backends"].split(",")[0].lower(),
            device=pp.get("gpu_info") or pp["cpu_info"], dtype=spec["gguf_type"],
            prompt_tokens=n, gen_tokens=gen, prefill_tps=statistics.median(prefill),
            decode_tps=statistics.median(decode),
            ttft_s=statistics.median(ttft), ttft_s_trials=ttft,
            peak_memory_bytes=max(pp_rss, tg_rss), peak_memory_kind="llama-bench peak RSS",
            peak_rss_bytes=max(pp_rss, tg_rss), trials=len(prefill),
            prefill_tps_trials=prefill, decode_tps_trials=decode,
            check_tokens=check_tokens(spec, n) if check else [], check_margins=[],
            threads=pp["n_threads"], blas=None,
            llama_bench=dict(
                build=f"{pp['build_commit']} ({pp['build_number']})", model_type=pp["model_type"],
                model_size=pp["model_size"], type_k=tg["type_k"], type_v=tg["type_v"],
                flash_attn=dict(prefill=pp["flash_attn"], decode=tg["flash_attn"]),
            ),
        ))  # fmt: skip
        r = rows[-1]
        print(f"  {NAME} prompt {n}: prefill {r['prefill_tps']:.1f} tok/s, "
              f"decode {r['decode_tps']:.2f} tok/s", file=sys.stderr, flush=True)  # fmt: skip
    return rows


def threads() -> int:
    """The threads every CPU row gets by default: the cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
