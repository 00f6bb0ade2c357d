"""Finding a model: a local folder, or a Hub repo id through huggingface-hub's own cache.

huggingface-hub's own cache and switches apply (`HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE=1`);
nothing here keeps a cache of its own.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(source: str | Path) -> bool:
    """`owner/name` that is not an existing local path."""
    return not Path(source).expanduser().exists() and bool(REPO_ID.match(str(source)))


class NotCachedError(FileNotFoundError):
    """A Hub file or repo that is not in the cache while the Hub can't be reached (or is off)."""


def offline() -> bool:
    """Whether huggingface-hub's offline mode is on (`HF_HUB_OFFLINE=1`)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _not_cached(what: str) -> str:
    where = f"huggingface-hub's cache ({cache_dir()})"
    if offline():
        return (
            f"{what} is not in {where} and offline mode is on (HF_HUB_OFFLINE=1): unset "
            "HF_HUB_OFFLINE to download it, or point HF_HOME at a cache that holds it"
        )
    return f"{what} is not in {where} and the Hub can't be reached: download it when online"


def _fetch(repo_id: str, what: str, download):
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(download())
    except RepositoryNotFoundError:  # also a gated repo without access
        raise FileNotFoundError(
            f"Hub repo {repo_id} not found (or gated: run `hf auth login`)"
        ) from None
    except IncompleteSnapshotError as e:
        raise FileNotFoundError(f"Hub repo {repo_id}: {e}") from None
    except LocalEntryNotFoundError:
        raise NotCachedError(_not_cached(what)) from None
    except (EntryNotFoundError, RevisionNotFoundError):
        raise FileNotFoundError(f"{what} does not exist") from None
    except (HfHubHTTPError, OSError) as e:
        raise FileNotFoundError(f"Could not fetch {what}: {e}") from None


def resolve(source: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """A local path as is; `owner/name` is fetched (or read from the cache) with huggingface-hub."""
    path = Path(source).expanduser()
    if not is_repo_id(source):
        if not path.exists():
            raise FileNotFoundError(f"{source} does not exist (not a local path nor a Hub repo id)")
        return path
    from huggingface_hub import snapshot_download

    return _fetch(
        str(source),
        f"Hub repo {source}",
        lambda: snapshot_download(str(source), allow_patterns=allow_patterns),
    )


def download_file(repo_id: str, filename: str, cache_only: bool = False) -> Path:
    """One file of a Hub repo (e.g. its `tokenizer.model`), through huggingface-hub's cache.

    `cache_only` looks in the cache without asking the Hub (once it is known to be unreachable).
    """
    from huggingface_hub import hf_hub_download

    return _fetch(
        repo_id,
        f"{filename} of Hub repo {repo_id}",
        lambda: hf_hub_download(repo_id, filename, local_files_only=cache_only),
    )
