"""Training data: jsonl validation, loss masks for the three formats, deterministic batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlx_openelm.chat_template import ChatTemplate, encode_conversation
from mlx_openelm.errors import UserError
from mlx_openelm.tokenizer import CHAT_TEMPLATE
from mlx_openelm.train import data
from mlx_openelm.train.data import (
    batch_indices,
    collate,
    encode_segments,
    eval_batches,
    load_data_folder,
    read_jsonl,
    record_segments,
    shard,
    tokenize,
)

DATA = Path(__file__).parent / "data" / "lora"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def encode(tokenizer, record, template=CHAT_TEMPLATE):
    return encode_segments(tokenizer, record_segments(record, ChatTemplate(template, tokenizer)))


def targets_text(tokenizer, ids, mask) -> list[str]:
    """The target tokens, split into runs, each decoded (EOS shown as </s>)."""
    runs, current = [], []
    for i, m in zip(ids.tolist(), mask.tolist(), strict=True):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return ["".join(piece_text(tokenizer, t) for t in run) for run in runs]


def piece_text(tokenizer, t: int) -> str:
    piece = tokenizer.sp.id_to_piece(t)  # decode() would drop a leading space
    if tokenizer.sp.is_byte(t):
        return chr(int(piece[3:5], 16))
    return piece.replace("\u2581", " ")


# ---- reading and validating


def test_shipped_data_is_valid():
    splits = load_data_folder(DATA)
    assert set(splits) == {"train", "valid"}
    kinds = {next(k for k in ("text", "prompt", "messages") if k in r) for r in splits["train"]}
    assert kinds == {"text", "prompt", "messages"}  # all three formats are exercised


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "ok"', "not valid JSON"),
        ('["text"]', "expected a JSON object"),
        ('{"txt": "hello"}', "expected exactly one of"),
        ('{"text": "a", "prompt": "b", "completion": "c"}', "expected exactly one of"),
        ('{"text": ""}', '"text" must be a non-empty string'),
        ('{"prompt": "hi"}', 'non-empty string "completion"'),
        ('{"prompt": 3, "completion": "x"}', '"prompt" must be a string'),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', "role 'bot'"),
        ('{"messages": [{"role": "assistant"}]}', 'string "content"'),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},'
            ' {"role": "assistant", "content": "c"}]}',
            "system message may only come first",
        ),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "train.jsonl", ['{"text": "fine"}', "", line])
    with pytest.raises(ValueError) as e:
        read_jsonl(path)
    assert f"{path}:3:" in str(e.value)  # the blank line 2 counts
    assert message in str(e.value)


def test_blank_lines_are_skipped_and_empty_file_is_an_error(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", ["", '{"text": "x"}', "   "])
    assert read_jsonl(path) == [{"text": "x"}]
    with pytest.raises(ValueError, match="has no records"):
        read_jsonl(write_lines(tmp_path / "b.jsonl", [""]))


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder .* not found"):
        load_data_folder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="has no train.jsonl"):
        load_data_folder(tmp_path)
    write_lines(tmp_path / "train.jsonl", ['{"text": "x"}'])
    with pytest.raises(FileNotFoundError, match="has no valid.jsonl.*steps_per_eval 0"):
        load_data_folder(tmp_path)
    assert set(load_data_folder(tmp_path, require_valid=False)) == {"train"}


# ---- masks


def test_text_mask_covers_every_token_but_bos(tokenizer):
    ids, mask = encode(tokenizer, {"text": "Anne walked to Bath."})
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert ids[1:-1].tolist() == tokenizer.encode("Anne walked to Bath.", add_bos=False)
    assert not mask[0] and mask[1:].all()


def test_prompt_completion_mask_is_the_completion_and_eos(tokenizer):
    record = {"prompt": "Where does Anne live?\nAnswer:", "completion": " Anne lives at Kellynch."}
    ids, mask = encode(tokenizer, record)
    # One string, tokenised as a whole, as generation from the prompt would see it.
    whole = tokenizer.encode(record["prompt"] + record["completion"], add_bos=True)
    assert ids.tolist() == whole + [tokenizer.eos_id]
    prompt_len = len(tokenizer.encode(record["prompt"], add_bos=True))
    assert not mask[:prompt_len].any() and mask[prompt_len:].all()
    assert targets_text(tokenizer, ids, mask) == [" Anne lives at Kellynch.</s>"]


def test_chat_mask_covers_assistant_turns_only(tokenizer):
    messages = [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "Who is Anne?"},
        {"role": "assistant", "content": "Anne is Sir Walter's daughter."},
        {"role": "user", "content": "Where does she live?"},
        {"role": "assistant", "content": "She lives at Kellynch."},
    ]
    ids, mask = encode(tokenizer, {"messages": messages})
    # The token ids are OpenELM's chat format read the way Hugging Face's tokenizer reads it,
    # with </s> as the EOS token (the tokenizer's own `special=True` path).
    text = (
        "<|system|>\nAnswer in one sentence.</s>\n<|user|>\nWho is Anne?</s>\n"
        "<|assistant|>\nAnne is Sir Walter's daughter.</s>\n<|user|>\nWhere does she live?</s>\n"
        "<|assistant|>\nShe lives at Kellynch.</s>"
    )
    assert ids.tolist() == tokenizer.encode(text, special=True)
    assert targets_text(tokenizer, ids, mask) == [
        "Anne is Sir Walter's daughter.</s>",
        "She lives at Kellynch.</s>",
    ]
    assert int((ids[mask] == tokenizer.eos_id).sum()) == 2  # user/system EOS are not targets


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who is Anne?"},
    {"role": "assistant", "content": "Sir Walter's daughter."},
    {"role": "user", "content": "Where does she live?"},
    {"role": "assistant", "content": "At Kellynch."},
]
# A template of the user's own: other role markers, EOS only after replies, text after them.
CUSTOM = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ 'ANSWER: ' + m['content'] + eos_token + ' (end)\n' }}{% else %}"
    "{{ m['role'] | upper + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ANSWER:' }}{% endif %}"
)


@pytest.mark.parametrize("source", [CHAT_TEMPLATE, CUSTOM], ids=["openelm", "custom"])
def test_training_tokens_are_chat_prompts_then_replies(tokenizer, source):
    """What precedes each reply in a training example is exactly the prompt `chat` feeds the
    model for that turn (the same template), and the targets are the replies with their EOS."""
    template = ChatTemplate(source, tokenizer)
    [(ids, mask)], _ = tokenize([{"messages": CHAT}], tokenizer, 512, chat_template=source)
    starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]
    for start, k in zip(starts, [2, 4], strict=True):
        assert ids[:start].tolist() == encode_conversation(tokenizer, template, CHAT[:k])
    text = template.render(CHAT, add_generation_prompt=False)
    text = text[: text.rindex("</s>") + 4]  # nothing after the last reply is trained on
    assert ids.tolist() == tokenizer.encode(text, add_bos=False, special=True)
    replies = targets_text(tokenizer, ids, mask)
    assert [r.strip() for r in replies] == ["Sir Walter's daughter.</s>", "At Kellynch.</s>"]


def test_a_custom_template_changes_the_training_tokens(tokenizer):
    default, _ = tokenize([{"messages": CHAT}], tokenizer, 512)
    custom, _ = tokenize([{"messages": CHAT}], tokenizer, 512, chat_template=CUSTOM)
    assert default[0][0].tolist() != custom[0][0].tolist()
    assert default[0][0].tolist() == encode(tokenizer, {"messages": CHAT})[0].tolist()


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # Marks the last message, so earlier text changes as the conversation grows.
    moving = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    with pytest.raises(UserError, match="differently once later messages follow"):
        tokenize([{"messages": CHAT}], tokenizer, 512, chat_template=moving)


def test_raw_sentencepiece_works_too(spm_model, tokenizer):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))  # bos_id() is a method here
    record = {"prompt": "Q: x?", "completion": " y."}
    a, b = encode(sp, record), encode(tokenizer, record)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_tokenize_truncates_and_drops_examples_without_targets(tokenizer):
    records = [
        {"text": "word " * 50},
        {"prompt": "long prompt " * 50, "completion": " end"},
        {"text": "short"},
    ]
    examples, stats = tokenize(records, tokenizer, max_seq_length=16)
    assert stats == {"truncated": 2, "empty": 1}
    assert len(examples) == 2 and len(examples[0][0]) == 17  # 16 inputs + the last target


# ---- batches


def test_batch_order_is_a_pure_function_of_seed_and_index():
    n, b = 10, 4
    stream = np.concatenate([batch_indices(n, b, i, seed=3) for i in range(5)])
    # Each epoch is a permutation; the stream crosses epoch boundaries without gaps.
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert np.array_equal(batch_indices(n, b, 3, seed=3), stream[12:16])
    data._PERMUTATIONS.clear()
    assert np.array_equal(batch_indices(n, b, 3, seed=3), stream[12:16])
    assert not np.array_equal(batch_indices(n, b, 0, seed=4), stream[:4])


def test_shards_partition_the_global_batch():
    idx = np.arange(8) * 10
    parts = [shard(idx, r, 4) for r in range(4)]
    assert np.array_equal(np.concatenate(parts), idx)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        shard(idx, 0, 3)


def test_collate_pads_and_aligns_targets():
    ex = [
        (np.array([1, 5, 6, 7, 2]), np.array([0, 0, 1, 1, 1], bool)),
        (np.array([1, 9, 2]), np.array([0, 1, 1], bool)),
    ]
    inputs, targets, mask = collate(ex, pad_multiple=8)
    assert inputs.shape == targets.shape == mask.shape == (2, 8)
    assert inputs[0, :4].tolist() == [1, 5, 6, 7] and targets[0, :4].tolist() == [5, 6, 7, 2]
    assert mask[0].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    assert targets[1, :2].tolist() == [9, 2] and mask[1].tolist() == [1, 1] + [0] * 6


def test_eval_batches_cover_everything_once_across_ranks():
    ex = [(np.array([1, i]), np.array([0, 1], bool)) for i in range(11)]
    for world in (1, 2, 3):
        seen = [
            int(e[0][1])
            for r in range(world)
            for batch in eval_batches(ex, 4, -1, r, world)
            for e in batch
        ]
        assert sorted(seen) == list(range(11))
    assert sum(len(b) for b in eval_batches(ex, 4, num_batches=2)) == 8


def test_data_is_json_lines():
    for split in ("train", "valid"):
        for line in (DATA / f"{split}.jsonl").read_text().splitlines():
            json.loads(line)
