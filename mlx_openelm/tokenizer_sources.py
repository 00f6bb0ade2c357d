"""Where a converted folder's tokenizer comes from, and the check a fetched one must pass.

Apple's OpenELM repos ship no tokenizer; the models use Llama-2's SentencePiece model, whose own
repo (meta-llama/Llama-2-7b-hf) is gated. The order, first match wins:
1. `--tokenizer PATH|HUB_ID` (a file, a folder holding `tokenizer.model`, or a Hub repo id);
2. the source folder's own `tokenizer.model`;
3. for a model with Llama-2's vocabulary, the ungated Hub copies in `LLAMA2_TOKENIZER_REPOS`,
   tried in order through huggingface-hub (its cache and `HF_HUB_OFFLINE` apply).
A tokenizer fetched from the Hub must pass `check_tokenizer` against `EXPECTED` before it is used.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from . import hub
from .errors import UserError
from .tokenizer import TOKENIZER_FILE, Tokenizer

# Ungated Hub repos that hold Llama-2's tokenizer.model (LLaMA-1 and Llama-2 share it). Chosen
# from what OpenELM users and tools point at; not checked online from here: the check below
# decides, and a repo that lacks the file or fails the check is skipped.
LLAMA2_TOKENIZER_REPOS = (
    "NousResearch/Llama-2-7b-hf",
    "hf-internal-testing/llama-tokenizer",
    "TheBloke/Llama-2-7B-fp16",
)

# sha256 of Llama-2's tokenizer.model (499,723 bytes), as many public manifests record it. A match
# is only reported; the behavioural check below is what accepts or refuses a file.
LLAMA2_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"

# CoreNet checkpoints pad the embedding (32000 -> 32128); such a model still takes Llama-2's pieces.
VOCAB_PADDING = 128


@dataclass(frozen=True)
class TokenizerSpec:
    """What a tokenizer must be: its size, special ids and a few encodings (without BOS)."""

    name: str
    vocab_size: int
    unk_bos_eos: tuple[int, int, int]
    encodings: dict[str, list[int]] = field(default_factory=dict)


# Llama-2's tokenizer: 32000 pieces, <unk> 0, <s> 1, </s> 2; "▁Hello" is 15043 and "▁world" 3186;
# "\n" is the dummy-prefix piece "▁" (29871) then the byte piece <0x0A> (13, bytes start at 3).
LLAMA2 = TokenizerSpec(
    name="Llama-2",
    vocab_size=32000,
    unk_bos_eos=(0, 1, 2),
    encodings={"Hello world": [15043, 3186], "\n": [29871, 13]},
)

# The spec Hub tokenizers are checked against. Tests swap it for one their tiny tokenizer meets
# (the only way to relax it); nothing else assigns it.
EXPECTED = LLAMA2


def check_tokenizer(path: str | Path, spec: TokenizerSpec | None = None) -> Tokenizer:
    """Load a SentencePiece model and refuse it unless it is `spec`'s tokenizer (default EXPECTED).

    Raises:
        ValueError: naming every difference found.
    """
    spec = spec or EXPECTED
    tok = Tokenizer(path)
    problems = []
    if tok.vocab_size != spec.vocab_size:
        problems.append(f"{tok.vocab_size} pieces, not {spec.vocab_size}")
    special = (tok.unk_id, tok.bos_id, tok.eos_id)
    if special != spec.unk_bos_eos:
        problems.append(
            "unk/bos/eos ids {}/{}/{}, not {}/{}/{}".format(*special, *spec.unk_bos_eos)
        )
    for text, want in spec.encodings.items():
        if (got := tok.encode(text, add_bos=False)) != want:
            problems.append(f"{text!r} encodes to {got}, not {want}")
    if problems:
        raise UserError(f"{path} is not {spec.name}'s tokenizer: {'; '.join(problems)}")
    return tok


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fetch_checked(repo_id: str, cache_only: bool = False) -> Path:
    path = hub.download_file(repo_id, TOKENIZER_FILE, cache_only=cache_only)
    check_tokenizer(path)
    return path


def explicit_tokenizer(tokenizer: str | Path) -> tuple[Path, str]:
    """`--tokenizer`: a local file or folder as is, or a Hub repo id fetched and checked.

    Returns:
        (path of tokenizer.model, where it came from, for the log).
    """
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if path.is_file():
        return path, f"{path} (--tokenizer)"
    if not hub.is_repo_id(tokenizer):
        raise FileNotFoundError(
            f"No tokenizer at {tokenizer}: pass a tokenizer.model file, a folder holding one, "
            "or a Hub repo id"
        )
    try:
        return _fetch_checked(str(tokenizer)), f"Hub repo {tokenizer} (--tokenizer)"
    except ValueError as e:
        raise UserError(
            f"--tokenizer {tokenizer}: {e}; pass a local file to skip this check"
        ) from None


def takes_default(vocab_size: int, spec: TokenizerSpec | None = None) -> bool:
    """Whether a model with this many embeddings can use the default (Llama-2) tokenizer."""
    spec = spec or EXPECTED
    return spec.vocab_size <= vocab_size <= spec.vocab_size + VOCAB_PADDING


def default_tokenizer(repos: tuple[str, ...] | None = None) -> tuple[Path, str]:
    """The first of `repos` (default LLAMA2_TOKENIZER_REPOS) whose tokenizer.model passes the check.

    Raises:
        FileNotFoundError: none could be fetched or passed; the message says what to pass.
    """
    repos = LLAMA2_TOKENIZER_REPOS if repos is None else repos
    tried = []
    unreachable = False  # once a download fails for want of the Hub, only the cache is asked
    for repo_id in repos:
        try:
            path = _fetch_checked(repo_id, cache_only=unreachable)
        except hub.NotCachedError:
            unreachable = True
            tried.append(f"{repo_id} (not cached)")
            continue
        except (FileNotFoundError, ValueError) as e:
            tried.append(f"{repo_id} ({e})")
            continue
        same = ", byte-identical to Llama-2's" if _sha256(path) == LLAMA2_SHA256 else ""
        return path, f"Hub repo {repo_id} (default{same})"
    want = f"--tokenizer path/to/tokenizer.model ({EXPECTED.name}'s SentencePiece model, "
    want += f"{EXPECTED.vocab_size} pieces)"
    if hub.offline():
        why = (
            "offline mode is on (HF_HUB_OFFLINE=1) and huggingface-hub's cache "
            f"({hub.cache_dir()}) holds no usable copy of {EXPECTED.name}'s tokenizer"
        )
        fix = f"{want}, unset HF_HUB_OFFLINE to fetch one from {repos[0] if repos else 'the Hub'}"
    else:
        why = f"no Hub copy of {EXPECTED.name}'s tokenizer could be used"
        if unreachable:
            why += " (the Hub can't be reached)"
        fix = f"{want} or --tokenizer HUB_ID"
    raise FileNotFoundError(
        f"No tokenizer: the source has no {TOKENIZER_FILE}, and {why}; tried "
        f"{', '.join(tried) or 'nothing'}. Pass {fix}, or --no-tokenizer to convert the weights "
        "alone"
    )


def resolve_tokenizer(
    own: Path | None,
    tokenizer: str | Path | None,
    vocab_size: int,
    *,
    fetch_default: bool = True,
) -> tuple[Path | None, str]:
    """The tokenizer a converted folder gets, in the module's order.

    Args:
        own: the source folder's tokenizer.model, if any.
        tokenizer: `--tokenizer` (path, folder or Hub repo id), if given.
        vocab_size: the model's embedding rows; the default list applies only to Llama-2's size.
        fetch_default: try the Hub's Llama-2 copies when nothing else gives a tokenizer.

    Returns:
        (path or None, a line for the log saying where it came from or why there is none).
    """
    if tokenizer is not None:
        return explicit_tokenizer(tokenizer)
    if own is not None:
        return own, f"{own} (the source's own)"
    if not fetch_default:
        return None, "none (--no-tokenizer)"
    if not takes_default(vocab_size):
        return None, (
            f"none: the source has no {TOKENIZER_FILE} and its {vocab_size}-row vocabulary is not "
            f"{EXPECTED.name}'s; pass --tokenizer to add one"
        )
    return default_tokenizer()
