"""Finding a model: a local folder, or a Hub repo id through huggingface-hub's own cache."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(source: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """A local path as is; `owner/name` is fetched (or read from the cache) with huggingface-hub.

    huggingface-hub's own cache and switches apply (`HF_HOME`, `HF_HUB_OFFLINE=1`).
    """
    path = Path(source).expanduser()
    if path.exists() or not REPO_ID.match(str(source)):
        if not path.exists():
            raise FileNotFoundError(f"{source} does not exist (not a local path nor a Hub repo id)")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(str(source), allow_patterns=allow_patterns))
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"Hub repo {source} not found (or gated: run `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"Hub repo {source} is not in the local cache and the Hub can't be reached "
            "(offline or HF_HUB_OFFLINE=1): download it when online, or pass a local folder"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise FileNotFoundError(f"Could not fetch Hub repo {source}: {e}") from None
