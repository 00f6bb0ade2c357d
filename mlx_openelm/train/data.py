"""Training data: jsonl records -> token ids with a loss mask -> deterministic, shardable batches.

Three record formats, one per line (they may be mixed in a file):
- `{"text": ...}`: loss on every token.
- `{"prompt": ..., "completion": ...}`: loss on the completion (and the closing EOS) only.
- `{"messages": [{"role": ..., "content": ...}, ...]}`: rendered by the chat template (OpenELM's
  by default), loss on the assistant turns (and the EOS that closes each) only.

Batches are a pure function of (seed, batch index), so a resumed run and every rank of a
data-parallel run see exactly the examples an uninterrupted single process would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..chat_template import ChatTemplate
from ..errors import UserError
from ..files import parse_json_line, read_text
from ..tokenizer import CHAT_TEMPLATE

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "valid", "test")

# One tokenised example: token ids and, per token, whether it is a loss target.
Example = tuple[np.ndarray, np.ndarray]


class TokenizerLike(Protocol):
    """What the data layer needs: `encode(text)` (a leading BOS is dropped) and the BOS/EOS ids."""

    def encode(self, text: str) -> list[int]: ...


def _special_id(tokenizer: Any, name: str) -> int:
    # Our Tokenizer has `bos_id` attributes; a raw SentencePieceProcessor has bos_id() methods.
    value = getattr(tokenizer, name)
    return int(value() if callable(value) else value)


# ---- reading and validating jsonl


def _check_record(obj: Any) -> str | None:
    """The problem with one parsed line, or None when it is a valid record."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    formats = [k for k in ("text", "prompt", "messages") if k in obj]
    if len(formats) != 1:
        return (
            'expected exactly one of {"text": ...}, {"prompt": ..., "completion": ...} or '
            f'{{"messages": [...]}}, got keys {sorted(obj)}'
        )
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            return '"text" must be a non-empty string'
    elif "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            return '"prompt" must be a string'
        if not isinstance(obj.get("completion"), str) or not obj["completion"]:
            return 'a "prompt" record needs a non-empty string "completion"'
    else:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            return '"messages" must be a non-empty list'
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                return f'messages[{i}] must be an object with a string "content"'
            if m.get("role") not in ROLES:
                return f"messages[{i}] has role {m.get('role')!r}; use one of {', '.join(ROLES)}"
            if m["role"] == "system" and i > 0:
                return f"messages[{i}]: a system message may only come first"
        if not any(m["role"] == "assistant" for m in messages):
            return "messages has no assistant turn, so nothing to learn from"
    return None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a jsonl file; the first bad line raises UserError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    records = []
    for lineno, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline) are not records
        obj = parse_json_line(line, f"{path}:{lineno}")
        if problem := _check_record(obj):
            raise UserError(f"{path}:{lineno}: {problem}")
        records.append(obj)
    if not records:
        raise UserError(f"{path} has no records: add one JSON object per line")
    return records


def load_data_folder(
    folder: str | Path, require_valid: bool = True
) -> dict[str, list[dict[str, Any]]]:
    """Read `train.jsonl`, `valid.jsonl` and (optional) `test.jsonl`, validating every line.

    Args:
        folder: the data folder.
        require_valid: whether a missing `valid.jsonl` is an error (it is when validating).

    Returns:
        split name -> records, for the splits present.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} not found")
    if not (folder / "train.jsonl").is_file():
        raise FileNotFoundError(
            f"{folder} has no train.jsonl: put one JSON record per line there "
            '({"text"}, {"prompt", "completion"} or {"messages"})'
        )
    if require_valid and not (folder / "valid.jsonl").is_file():
        raise FileNotFoundError(
            f"{folder} has no valid.jsonl: add one, or turn validation off (steps_per_eval 0)"
        )
    return {
        s: read_jsonl(folder / f"{s}.jsonl") for s in SPLITS if (folder / f"{s}.jsonl").exists()
    }


# ---- tokenising with a loss mask


class Special(str):
    """A special token in a segment list (kept apart from text that happens to read "eos")."""


BOS, EOS = Special("<s>"), Special("</s>")

# A segment is text or a special token, and whether its tokens are loss targets.
Segment = tuple[str, bool]


def chat_segments(messages: Sequence[dict[str, str]], template: ChatTemplate) -> list[Segment]:
    """A conversation as its chat template renders it, cut into segments.

    The targets are what the template adds for each assistant message (the text between
    rendering the turns before it with the generation prompt and rendering it too), up to and
    including its last `</s>`: what follows an EOS is never generated. Text after the last reply
    teaches nothing and is left out. `<s>`/`</s>` become the BOS/EOS ids, as in `chat`.
    """
    full = template.render(list(messages), add_generation_prompt=False)
    eos = template.tokens["eos_token"]
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = template.render(list(messages[:i]), add_generation_prompt=True)
        end = template.render(list(messages[: i + 1]), add_generation_prompt=False)
        if not (end.startswith(start) and full.startswith(end)):
            raise UserError(
                f"the chat template renders messages[:{i}] differently once later messages "
                "follow, so the assistant replies cannot be found in it for the loss mask: "
                "train with a template whose rendering only grows (--chat-template)"
            )
        cut = end.rfind(eos, len(start))
        spans.append((len(start), cut + len(eos) if cut >= 0 else len(end)))
    full = full[: spans[-1][1]] if spans else full
    specials = {template.tokens["bos_token"]: BOS, eos: EOS}
    # Cut at every span edge and around every special token, then tag each piece.
    edges = {0, len(full), *(e for span in spans for e in span)}
    for token in specials:
        at = full.find(token)
        while at >= 0:
            edges |= {at, at + len(token)}
            at = full.find(token, at + len(token))
    bounds = sorted(edges)
    segments: list[Segment] = []
    for a, b in zip(bounds, bounds[1:]):
        piece, target = full[a:b], any(s <= a < e for s, e in spans)
        segments.append((specials.get(piece, piece), target))
    return segments


def record_segments(record: dict[str, Any], template: ChatTemplate | None = None) -> list[Segment]:
    if "text" in record:
        return [(BOS, False), (record["text"], True), (EOS, True)]
    if "prompt" in record:
        return [(BOS, False), (record["prompt"], False), (record["completion"], True), (EOS, True)]
    if template is None:
        raise ValueError("a messages record needs a chat template")
    return chat_segments(record["messages"], template)


def _encode(tokenizer: TokenizerLike, text: str, bos: int) -> list[int]:
    ids = list(tokenizer.encode(text)) if text else []
    return ids[1:] if ids and ids[0] == bos else ids


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def encode_segments(tokenizer: TokenizerLike, segments: Sequence[Segment]) -> Example:
    """Token ids and target mask for a list of segments.

    Adjacent text segments are encoded as one string, as a tokenizer would see the whole prompt;
    the target boundary inside it is where the prefix's own encoding stops agreeing with it (a
    token merged across the boundary goes to the later segment).
    """
    bos, eos = _special_id(tokenizer, "bos_id"), _special_id(tokenizer, "eos_id")
    ids: list[int] = []
    mask: list[bool] = []
    run: list[Segment] = []

    def flush() -> None:
        texts = [t for t, _ in run]
        full = _encode(tokenizer, "".join(texts), bos)
        start = 0
        for k, (_, target) in enumerate(run):
            if k == len(run) - 1:
                end = len(full)
            else:
                end = _common_prefix(_encode(tokenizer, "".join(texts[: k + 1]), bos), full)
            end = max(end, start)
            ids.extend(full[start:end])
            mask.extend([target] * (end - start))
            start = end
        run.clear()

    for seg, target in segments:
        if isinstance(seg, Special):
            if run:
                flush()
            ids.append(bos if seg is BOS else eos)
            mask.append(target)
        else:
            run.append((seg, target))
    if run:
        flush()
    return np.array(ids, dtype=np.int32), np.array(mask, dtype=bool)


def tokenize(
    records: Sequence[dict[str, Any]],
    tokenizer: TokenizerLike,
    max_seq_length: int,
    chat_template: str = CHAT_TEMPLATE,
) -> tuple[list[Example], dict[str, int]]:
    """Tokenise records, truncating each to `max_seq_length` inputs (+1 for the last target).

    `chat_template` (Jinja source) formats the `messages` records, as `chat` formats prompts.

    Returns:
        (examples, stats): stats counts `truncated` examples and `empty` ones (no target left).
    """
    examples, truncated, empty = [], 0, 0
    template = None
    if any("messages" in r for r in records):
        template = ChatTemplate(chat_template, tokenizer)
    for record in records:
        ids, mask = encode_segments(tokenizer, record_segments(record, template))
        if len(ids) > max_seq_length + 1:
            ids, mask = ids[: max_seq_length + 1], mask[: max_seq_length + 1]
            truncated += 1
        if not mask[1:].any():
            empty += 1  # e.g. a prompt longer than max_seq_length: it can teach nothing
            continue
        examples.append((ids, mask))
    return examples, {"truncated": truncated, "empty": empty}


# ---- deterministic batches


def batch_indices(num_examples: int, batch_size: int, index: int, seed: int) -> np.ndarray:
    """Example indices of global batch `index`: a seeded permutation per epoch, read as one stream.

    A pure function of its arguments, so resuming at any step replays the same order.
    """
    start = index * batch_size
    out = []
    for pos in range(start, start + batch_size):
        epoch, i = divmod(pos, num_examples)
        out.append(_permutation(num_examples, seed, epoch)[i])
    return np.array(out, dtype=np.int64)


_PERMUTATIONS: dict[tuple[int, int, int], np.ndarray] = {}


def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    key = (n, seed, epoch)
    if key not in _PERMUTATIONS:
        if len(_PERMUTATIONS) > 4:
            _PERMUTATIONS.clear()
        _PERMUTATIONS[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _PERMUTATIONS[key]


def shard(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's contiguous slice of a global batch (the batch size must divide evenly)."""
    if len(indices) % world_size:
        raise UserError(
            f"batch size {len(indices)} is not divisible by the {world_size} processes: "
            "choose a batch size that is a multiple of the world size"
        )
    n = len(indices) // world_size
    return indices[rank * n : (rank + 1) * n]


def collate(
    examples: Sequence[Example], pad_multiple: int = 32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, loss mask), each (B, T), padded with 0 to a multiple of `pad_multiple`.

    Padding to a few fixed widths keeps the number of compiled shapes small.
    """
    longest = max(len(ids) - 1 for ids, _ in examples)
    width = -(-longest // pad_multiple) * pad_multiple
    inputs = np.zeros((len(examples), width), np.int32)
    targets = np.zeros((len(examples), width), np.int32)
    mask = np.zeros((len(examples), width), np.float32)
    for row, (ids, m) in enumerate(examples):
        n = len(ids) - 1
        inputs[row, :n], targets[row, :n], mask[row, :n] = ids[:-1], ids[1:], m[1:]
    return inputs, targets, mask


def num_input_tokens(examples: Sequence[Example]) -> int:
    """Real (unpadded) input positions: what tokens/s counts."""
    return sum(len(ids) - 1 for ids, _ in examples)


def eval_batches(
    examples: Sequence[Example],
    batch_size: int,
    num_batches: int = -1,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[list[Example]]:
    """Validation batches in file order (every rank walks the same batches, taking its share)."""
    total = -(-len(examples) // batch_size)
    if num_batches >= 0:
        total = min(total, num_batches)
    for b in range(total):
        chunk = examples[b * batch_size : (b + 1) * batch_size]
        per_rank = -(-len(chunk) // world_size)
        mine = list(chunk[rank * per_rank : (rank + 1) * per_rank])
        if mine:
            yield mine
