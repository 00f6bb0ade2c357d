"""`mlx-openelm bench-serve`: the command forwards its options; rounds give medians and ratios."""

from __future__ import annotations

from mlx_openelm.bench import serve_bench
from typer.testing import CliRunner

from mlx_openelm.cli import app


def test_the_command_forwards_its_options(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(serve_bench, "bench_serve", lambda **kw: seen.update(kw))
    args = ["bench-serve", "--model", str(tmp_path), "--q-bits", "4", "--clients", "1,8",
            "--llama-cpp", "/x/bin", "--json", "r.json"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert seen["clients"] == [1, 8] and seen["q_bits"] == 4 and seen["llama_cpp"] == "/x/bin"
    assert seen["json_path"] == "r.json" and not seen["mlx_lm"]


def test_a_folder_without_config_is_one_line_and_exit_1(tmp_path):
    r = CliRunner().invoke(app, ["bench-serve", "--model", str(tmp_path)])
    assert r.exit_code == 1 and "has no config.json" in r.output


def row(server, clients, tok_s, ttft, rnd=0):
    return {"server": server, "clients": clients, "round": rnd, "aggregate_tok_s": tok_s,
            "ttft_p50_ms": ttft, "ttft_p95_ms": ttft,
            "itl_p50_ms": 1.0, "itl_p95_ms": 2.0}  # fmt: skip


def test_rounds_give_medians_and_ratios():
    rows = [row("mlx-openelm", 1, 20, 100, 0), row("llama.cpp", 1, 10, 50, 0),
            row("mlx-openelm", 1, 30, 300, 1), row("llama.cpp", 1, 20, 50, 1),
            row("mlx-openelm", 8, 100, 400), row("llama.cpp", 8, 60, 800)]  # fmt: skip
    results = serve_bench.summarize(rows)
    ours1 = next(r for r in results if r["server"] == "mlx-openelm" and r["clients"] == 1)
    assert ours1["aggregate_tok_s"] == 25 and ours1["ttft_p50_ms"] == 200 and ours1["rounds"] == 2
    ratios = serve_bench.ratios(results)
    at8 = next(r for r in ratios if r.get("to") == "llama.cpp" and r["clients"] == 8)
    assert at8["aggregate"] == 100 / 60 and at8["ttft_p50"] == 0.5
    scaling = next(r for r in ratios if r["of"] == "mlx-openelm" and "scaling" in r)
    assert scaling["aggregate"] == 4.0
