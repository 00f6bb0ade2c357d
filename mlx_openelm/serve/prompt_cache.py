"""Recent sequences' KV caches, so a prompt that begins with an earlier one (a chat's next turn,
a shared system prompt) prefills only what is new. Bounded in bytes, least recently used first out.

A prefix is reused in whole blocks of `BLOCK` tokens: the prefill then runs over the same
block-aligned chunks as a fresh prompt's, so a reused prefix gives the same bits as computing it
again (the attention tiles and the products sum in the same order).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..kv_cache import KVCache

BLOCK = 64


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


class PromptCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple[int, ...], tuple[np.ndarray, list[KVCache], int]] = (
            OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._entries)

    def insert(self, ids: list[int], cache: list[KVCache]) -> None:
        """Keep `cache` (which holds `ids`, and which nobody writes to any more) for later."""
        length = len(ids) // BLOCK * BLOCK
        if not length or not cache or cache[0].offset < length:
            return
        key = tuple(ids[:length])
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        size = sum(c.kv.nbytes for c in cache if c.kv is not None)
        if size > self.max_bytes:
            return
        self._entries[key] = (np.asarray(key, np.int64), cache, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, _, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped

    def lookup(self, prompt: list[int]) -> tuple[list[KVCache] | None, int]:
        """The cache sharing the longest prefix with `prompt` and how many tokens of it to reuse:
        whole blocks, leaving at least the prompt's last token to compute."""
        ids = np.asarray(prompt, np.int64)
        best, best_len, best_key = None, 0, None
        for key, (arr, cache, _) in self._entries.items():
            n = min(_common_prefix(arr, ids), len(prompt) - 1) // BLOCK * BLOCK
            if n > best_len:
                best, best_len, best_key = cache, n, key
        if best_key is not None:
            self._entries.move_to_end(best_key)
        return best, best_len
