"""Hostile and malformed inputs: each is refused with one line naming the file, exit code 1,
and nothing left at the destination; programming errors keep their traceback."""

from __future__ import annotations

import copy
import json
import os
import struct
import zipfile
import zlib
from pathlib import Path

import mlx.optimizers as optim
import numpy as np
import pytest
import typer
from hostile import (
    Storage,
    Tensor,
    header_bytes,
    logits,
    safetensors_bytes,
    state_pickle,
    tiny_state,
    torch_pickle,
    torch_zip_bytes,
    write_bin,
    write_hf,
)
from typer.testing import CliRunner

from mlx_openelm import cli
from mlx_openelm.cli import app
from mlx_openelm.errors import UserError

CONFIG, STATE = tiny_state()
NAME = "transformer.layers.0.attn.qkv_proj.weight"


def convert(source: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["convert", str(source), str(out), "--no-tokenizer", *extra])


def assert_one_line(result, *names: str) -> str:
    """Exit 1, no traceback, one `error:` line on stderr that names each of `names`."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def assert_refused(tmp: Path, source: Path, *names: str) -> str:
    out = tmp / "out"
    line = assert_one_line(convert(source, out), *names)
    assert not out.exists() and not list(tmp.glob(".out.*")), "something was left behind"
    return line


def hf_with_header(tmp: Path, header: dict | str) -> Path:
    text = header if isinstance(header, str) else json.dumps(header)
    data = safetensors_bytes(STATE)
    n = struct.unpack("<Q", data[:8])[0]
    return write_hf(tmp / "hf", CONFIG, header_bytes(text) + data[8 + n :])


def good_header() -> dict:
    data = safetensors_bytes(STATE)
    return json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])


def first_storage() -> tuple[Storage, dict[str, bytes]]:
    """The first tensor's storage, at its true size, and every storage's bytes."""
    _, storages = state_pickle(STATE)
    key = next(iter(storages))
    return Storage(key, len(storages[key]) // 4), storages


def bin_with(tmp: Path, obj, storages=None) -> Path:
    _, good = state_pickle(STATE)
    return write_bin(tmp / "hf", CONFIG, torch_zip_bytes(torch_pickle(obj), storages or good))


# -- numbers that overflow, are floats or infinite, keys that are not strings ------------------


def _header_with(**entry) -> dict:
    h = good_header()
    h[NAME] = {**h[NAME], **entry}
    return h


@pytest.mark.parametrize(
    "entry",
    [{"shape": [2**70, 1]}, {"shape": [1.5, 32]}, {"data_offsets": [0, 1e400]}, {"shape": "96"}],
    ids=["overflow", "float", "infinite", "string"],
)
def test_safetensors_numbers_that_are_not_sizes(tmp_path, entry):
    assert_refused(tmp_path, hf_with_header(tmp_path, _header_with(**entry)), "model.safetensors")


@pytest.mark.parametrize(
    "shape", [(2**70, 1), (1.5, 32), (float("inf"),), "96"], ids=["overflow", "float", "inf", "str"]
)
def test_pickle_shapes_that_are_not_sizes(tmp_path, shape):
    storage, storages = first_storage()
    obj = {NAME: Tensor(storage, shape, stride=(1, 1))}
    assert_refused(tmp_path, bin_with(tmp_path, obj, storages), "pytorch_model.bin", "shape")


def test_state_dict_key_that_is_not_a_string(tmp_path):
    storage, storages = first_storage()
    obj = {7: Tensor(storage, (storage.numel,))}
    assert_refused(tmp_path, bin_with(tmp_path, obj, storages), "pytorch_model.bin", "7")


@pytest.mark.parametrize(
    "change",
    [
        {"num_gqa_groups": 0},
        {"head_dim": 0},
        {"ffn_dim_divisor": 0},
        {"rms_norm_eps": "1e-6"},
        {"ffn_multipliers": ["a", "b"]},
        {"model_dim": 2**40},
        {"num_query_heads": [0, 0]},
        {"num_transformer_layers": 1_000_000},
        {"vocab_size": 1.5},
        {"ffn_with_glu": "yes"},
        {"ffn_multipliers": [1e4, 1e4], "model_dim": 2**19},
    ],
    ids=lambda c: "-".join(c),
)
def test_configs_that_cannot_be_built(tmp_path, change):
    src = write_hf(tmp_path / "hf", {**CONFIG, **change}, safetensors_bytes(STATE))
    assert_refused(tmp_path, src, "config.json")


# -- recursion, self-reference and opcodes that tamper --------------------------------------


def test_deep_and_self_referencing_pickles_and_json(tmp_path):
    storage, storages = first_storage()
    deep: list = [Tensor(storage, (storage.numel,))]
    for _ in range(100):  # past MAX_DEPTH, within what the pickler that writes it can nest
        deep = [deep]
    assert_refused(tmp_path, bin_with(tmp_path, {"x": deep}, storages), "pytorch_model.bin")
    loop: list = []
    loop.append(loop)
    assert_refused(tmp_path, bin_with(tmp_path, {"x": loop}, storages), "pytorch_model.bin")
    for name in ("config.json", "model.safetensors"):
        src = write_hf(tmp_path / "hf", CONFIG, safetensors_bytes(STATE))
        nested = "[" * 100_000 + "]" * 100_000
        if name == "config.json":
            (src / name).write_text(nested)
        else:
            (src / name).write_bytes(header_bytes(nested) + b"\0" * 16)
        assert_refused(tmp_path, src, name)
    src = write_hf(tmp_path / "hf", CONFIG, safetensors_bytes(STATE))
    (src / "config.json").write_text('{"model_dim": ' + "9" * 5000 + "}")  # past Python's cap
    assert_refused(tmp_path, src, "config.json")


GLOBAL = b"ctorch._utils\n_rebuild_tensor_v2\n"


@pytest.mark.parametrize(
    "pkl",
    [
        b"\x80\x02" + GLOBAL + b"}X\x04\x00\x00\x00nameX\x01\x00\x00\x00xs" + b"b.",  # BUILD fn
        b"\x80\x02" + GLOBAL + b"N}X\x0c\x00\x00\x00__defaults__N\x86\x86b.",  # slot state
        b"\x80\x02ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00aK\x02u.",
        b"\x80\x02" + GLOBAL + b"X\x01\x00\x00\x00aK\x01s.",  # SETITEM on a function
    ],
    ids=["build-function", "build-slots", "duplicate-key", "setitem-function"],
)
def test_pickle_opcodes_that_tamper_with_allowed_objects(tmp_path, pkl):
    _, storages = state_pickle(STATE)
    src = write_bin(tmp_path / "hf", CONFIG, torch_zip_bytes(pkl, storages))
    assert_refused(tmp_path, src, "pytorch_model.bin")


# -- shard indexes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weight_map",
    [["a"], {NAME: 3}, {NAME: "../model.safetensors"}, {NAME: "/etc/passwd"}, {NAME: ""}],
    ids=["list", "not-a-string", "parent", "absolute", "empty"],
)
def test_shard_indexes_that_are_not_maps_or_leave_the_folder(tmp_path, weight_map):
    src = write_hf(tmp_path / "m" / "hf", CONFIG, safetensors_bytes(STATE))
    (tmp_path / "m" / "model.safetensors").write_bytes(safetensors_bytes(STATE))
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_refused(tmp_path, src, "model.safetensors.index.json")


# -- non-UTF-8, seeds, templates, perplexity ------------------------------------------------


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_non_utf8_files_are_named(tmp_path, name):
    src = write_hf(tmp_path / "hf", CONFIG, safetensors_bytes(STATE))
    (src / name).write_bytes(b'{"a": "\xff\xfe"}')
    assert_refused(tmp_path, src, name, "UTF-8")


def test_non_utf8_jsonl_and_state_files_are_named(tmp_path):
    from mlx_openelm.train.data import read_jsonl

    (tmp_path / "train.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match="train.jsonl is not UTF-8"):
        read_jsonl(tmp_path / "train.jsonl")


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory, spm_model) -> Path:
    from conftest import make_model_folder

    return make_model_folder(tmp_path_factory.mktemp("chat") / "m", spm_model, never_eos=True)


@pytest.mark.parametrize(
    "extra, names",
    [
        (["--prompt", "caf\udce9"], ["--prompt", "UTF-8"]),
        (["--prompt", "hi", "--seed", "-1"], ["--seed"]),
        (["--prompt", "hi", "--seed", str(2**70)], ["--seed"]),
        (["--prompt", "hi", "--chat", "--chat-template", "{{ 1 / 0 }}"], ["chat template"]),
        (["--prompt", "hi", "--chat", "--chat-template", "{{ messages[9].x }}"], ["chat template"]),
    ],
    ids=["prompt-utf8", "seed-negative", "seed-huge", "template-division", "template-index"],
)
def test_generate_inputs(chat_folder, extra, names):
    args = ["generate", "--model", str(chat_folder), "--max-tokens", "2", *extra]
    assert_one_line(CliRunner().invoke(app, args), *names)


def test_a_non_utf8_chat_line_is_refused_and_the_session_goes_on(chat_folder):
    result = CliRunner().invoke(
        app, ["chat", "--model", str(chat_folder), "--max-tokens", "2"], input=b"caf\xe9\n/exit\n"
    )
    assert result.exit_code == 0, result.output
    assert "error: that line is not valid UTF-8" in result.stderr


def test_whitespace_only_perplexity_text(chat_folder, tmp_path):
    (tmp_path / "blank.txt").write_text("  \n\n \t \n")
    args = ["perplexity", "--model", str(chat_folder), "--data", str(tmp_path / "blank.txt")]
    assert_one_line(CliRunner().invoke(app, args), "blank.txt")


# -- training checkpoints -----------------------------------------------------------------------


def test_a_truncated_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    from conftest import tiny_model

    from mlx_openelm.train.checkpoint import resume_checkpoint, save_checkpoint

    model, opt = tiny_model(), optim.AdamW(1e-3)
    opt.init(model.trainable_parameters())
    for step in (1, 2):
        save_checkpoint(tmp_path, "model.safetensors", model, opt, {"step": step}, keep=3)
    broken = tmp_path / "checkpoints" / "step_0000002" / "model.safetensors"
    broken.write_bytes(broken.read_bytes()[:-100])
    assert resume_checkpoint(tmp_path, "model.safetensors", model, opt)["step"] == 1
    assert str(broken) in capsys.readouterr().err
    first = tmp_path / "checkpoints" / "step_0000001" / "optimizer.safetensors"
    first.write_bytes(first.read_bytes()[:50])
    with pytest.raises(UserError, match="optimizer.safetensors"):
        resume_checkpoint(tmp_path, "model.safetensors", model, opt)


# -- wrong weights: short zip entries, CRCs, overlaps, duplicates -------------------------------


def _central_record(data: bytes, name: str) -> int:
    i = data.index(b"PK\x01\x02")
    while data[i + 46 : i + 46 + len(name)] != name.encode():
        i = data.index(b"PK\x01\x02", i + 4)
    return i


def test_a_zip_entry_shorter_than_its_directory_entry_is_refused(tmp_path):
    pkl, storages = state_pickle(STATE)
    key = next(k for k in storages)
    short = {**storages, key: storages[key][:-16]}  # the pickle still says the full size
    data = bytearray(torch_zip_bytes(pkl, short))
    rec, n = _central_record(data, f"archive/data/{key}"), len(storages[key])
    local = struct.unpack("<I", data[rec + 42 : rec + 46])[0]
    start = local + 30 + struct.unpack("<HH", data[local + 26 : local + 30])[0]
    start += struct.unpack("<HH", data[local + 26 : local + 30])[1]
    crc = zlib.crc32(bytes(data[start : start + n]))  # a CRC that matches the neighbour's bytes
    data[rec + 16 : rec + 28] = struct.pack("<III", crc, n, n)
    src = write_bin(tmp_path / "hf", CONFIG, bytes(data))
    assert_refused(tmp_path, src, "pytorch_model.bin", key)


def test_a_zip_entry_with_a_bad_crc_is_refused(tmp_path):
    pkl, storages = state_pickle(STATE)
    key = next(iter(storages))
    data = bytearray(torch_zip_bytes(pkl, storages))
    i = data.index(storages[key])
    data[i] ^= 0x40
    assert_refused(tmp_path, write_bin(tmp_path / "hf", CONFIG, bytes(data)), "CRC", key)


def test_overlapping_safetensors_entries_are_refused(tmp_path):
    h = good_header()
    a, b = "transformer.layers.0.attn_norm.weight", "transformer.layers.1.attn_norm.weight"
    h[b] = copy.deepcopy(h[a])
    assert_refused(tmp_path, hf_with_header(tmp_path, h), "model.safetensors", a, b)


def test_duplicate_tensor_names_are_refused(tmp_path):
    text = json.dumps(good_header())
    entry = json.dumps({NAME: good_header()[NAME]})[1:-1]
    assert_refused(tmp_path, hf_with_header(tmp_path, text[:-1] + ", " + entry + "}"), NAME)
    obj = b"\x80\x02}(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00aK\x02u."
    _, storages = state_pickle(STATE)
    src = write_bin(tmp_path / "bin", CONFIG, torch_zip_bytes(obj, storages))
    assert_refused(tmp_path, src, "pytorch_model.bin", "twice")


# -- resource exhaustion ---------------------------------------------------------------------


BOMB_SCRIPT = """
import resource, sys
from mlx_openelm.cli import app
try:
    app(sys.argv[2:])
finally:
    open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""


def write_bomb(folder: Path, expanded: int) -> Path:
    """A pytorch_model.bin whose first storage deflates from a few MB to `expanded` bytes."""
    pkl, storages = state_pickle(STATE)
    key = next(iter(storages))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    with zipfile.ZipFile(folder / "pytorch_model.bin", "w", zipfile.ZIP_DEFLATED, True, 1) as z:
        z.writestr("archive/data.pkl", pkl, zipfile.ZIP_STORED)
        for k, raw in storages.items():
            if k != key:
                z.writestr(f"archive/data/{k}", raw, zipfile.ZIP_STORED)
                continue
            with z.open(f"archive/data/{k}", "w", force_zip64=True) as w:  # deflated
                w.write(raw)
                for _ in range((expanded - len(raw)) // (16 << 20)):
                    w.write(bytes(16 << 20))
    return folder


def peak_rss_mb(tmp: Path, *args: str) -> tuple[int, float, str]:
    import subprocess
    import sys

    rss = tmp / "rss"
    proc = subprocess.run(
        [sys.executable, "-c", BOMB_SCRIPT, str(rss), *args], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    return proc.returncode, int(rss.read_text()) / 1024, proc.stderr


@pytest.mark.slow  # two convert processes, one of them expanding toward 256 MiB
def test_a_deflate_bomb_is_refused_in_bounded_memory(tmp_path):
    src = write_bomb(tmp_path / "bomb", 256 << 20)
    assert (src / "pytorch_model.bin").stat().st_size < 8 << 20
    good = write_bin(tmp_path / "good", CONFIG, torch_zip_bytes(*state_pickle(STATE)))
    rc0, base, _ = peak_rss_mb(
        tmp_path, "convert", str(good), str(tmp_path / "o1"), "--no-tokenizer"
    )
    rc, peak, err = peak_rss_mb(
        tmp_path, "convert", str(src), str(tmp_path / "o2"), "--no-tokenizer"
    )
    print(f"peak RSS: bomb {peak:.0f} MB, valid checkpoint {base:.0f} MB")
    assert rc0 == 0 and rc == 1, err
    assert err.count("\n") == 1 and "pytorch_model.bin" in err and "expands" in err, err
    assert peak < base + 100, (peak, base)
    assert not (tmp_path / "o2").exists()


# -- the output folder --------------------------------------------------------------------------


def test_an_unwritable_destination_is_found_before_the_source_is_read(tmp_path):
    src = write_hf(tmp_path / "hf", CONFIG, b"not safetensors at all")
    (tmp_path / "a_file").write_text("x")
    result = convert(src, tmp_path / "a_file" / "out")
    assert_one_line(result, "a_file")


def test_overwrite_onto_a_symlink_replaces_the_link_not_its_target(tmp_path):
    src = write_hf(tmp_path / "hf", CONFIG, safetensors_bytes(STATE))
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep.txt").write_text("mine")
    (tmp_path / "out").symlink_to(tmp_path / "target")
    assert_one_line(convert(src, tmp_path / "out"), "already exists")
    result = convert(src, tmp_path / "out", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out").is_symlink() and (tmp_path / "target" / "keep.txt").exists()


def test_output_mode_follows_the_umask_and_stale_temporaries_are_removed(tmp_path):
    src = write_hf(tmp_path / "hf", CONFIG, safetensors_bytes(STATE))
    stale = tmp_path / ".out.999999999.abc.tmp"  # a pid that cannot be running
    stale.mkdir()
    live = tmp_path / f".out.{os.getpid()}.abc.tmp"
    live.mkdir()
    old = os.umask(0o027)
    try:
        assert convert(src, tmp_path / "out").exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert not stale.exists() and live.exists()


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    from mlx_openelm.files import atomic_folder

    def write():
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "half").write_text("x")
            os.kill(os.getpid(), 15)
            raise AssertionError("SIGTERM did not interrupt")

    with pytest.raises(typer.Exit) as e:
        cli._run(write)
    assert e.value.exit_code == 143
    assert not list(tmp_path.iterdir())


# -- programming errors keep their traceback ----------------------------------------------------


def test_a_programming_error_keeps_its_traceback_and_debug_shows_user_errors(monkeypatch):
    import mlx_openelm.summary as summary

    def bug(**kw):
        raise ValueError("[matmul] shapes (3,4) and (5,6) cannot be multiplied")

    monkeypatch.setattr(summary, "describe", bug)
    result = CliRunner().invoke(app, ["info", "--preset", "270M"])
    assert isinstance(result.exception, ValueError) and result.exit_code == 1
    monkeypatch.setattr(summary, "describe", lambda **kw: (_ for _ in ()).throw(UserError("x")))
    assert_one_line(CliRunner().invoke(app, ["info", "--preset", "270M"]), "x")
    result = CliRunner().invoke(app, ["--debug", "info", "--preset", "270M"])
    assert isinstance(result.exception, UserError)


def test_a_valid_checkpoint_still_converts_exactly(tmp_path):
    a = write_hf(tmp_path / "hf", CONFIG, safetensors_bytes(STATE))
    b = write_bin(tmp_path / "bin", CONFIG, torch_zip_bytes(*state_pickle(STATE)))
    for src in (a, b):
        assert convert(src, tmp_path / f"{src.name}_out").exit_code == 0
    np.testing.assert_array_equal(logits(tmp_path / "hf_out"), logits(tmp_path / "bin_out"))
