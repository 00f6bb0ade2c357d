"""The one thread that owns MLX: it loads the model, queues requests, and runs the continuous batch.

Each turn of its loop admits waiting requests while the batch has room, runs one prefill chunk of
one newcomer (so a long prompt never stalls the others for all of it), and one decode step for
every sequence that is prefilled: the products take all their rows at once (through the CPU
kernels on Linux, `kernels.batch_rows`) and attention runs per sequence over its own KV cache
(`kv_cache.RowCaches`), so sequences of any lengths share a step and each row computes exactly
what it would alone. A sequence leaves the batch when it ends or its client hangs up.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

from .. import kernels
from ..kv_cache import RowCaches
from .prompt_cache import BLOCK, PromptCache
from .protocol import APIError
from .sequence import Job, Params, Sequence, Usage

log = logging.getLogger("mlx_openelm.serve")


class Engine:
    """Runs jobs (sequence.Job) on a model that `load()` returns as (model, tokenizer, extra)."""

    def __init__(
        self,
        load: Callable[[], tuple[Any, Any, Any]],
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = 128,
        cache_bytes: int = 1 << 30,
    ):
        if prefill_chunk % BLOCK:
            raise ValueError(f"prefill_chunk must be a multiple of {BLOCK}")
        self._load, self.max_batch, self.max_queue = load, max_batch, max_queue
        self.prefill_chunk = prefill_chunk
        self.prompt_cache = PromptCache(cache_bytes)
        self.model = self.tokenizer = self.extra = None
        self.ready = threading.Event()
        self.failed: str | None = None
        self._waiting: deque[Job] = deque()
        self._active: list[Sequence] = []
        self._usage: dict[int, list[int]] = {}  # id(job) -> [prompt, completion, cached, left]
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mlx-openelm-engine", daemon=True)

    # ---- the web layer's side (any thread) ----------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a job; 503 before the model is ready, 429 when the queue is full."""
        if not self.ready.is_set() or self._stopping:
            raise APIError(503, "the model is still loading", type="server_error",
                           code="model_not_ready")  # fmt: skip
        with self._lock:
            # Requests that the batch has room for take no place in the queue.
            room = max(0, self.max_batch - len(self._active))
            if len(self._waiting) >= self.max_queue + room:
                raise APIError(429, "too many requests are waiting: try again shortly",
                               type="rate_limit_error", code="rate_limit_exceeded")  # fmt: skip
            self._waiting.append(job)
        self._wake.set()

    @property
    def load(self) -> dict[str, int]:
        return {"running": len(self._active), "waiting": len(self._waiting)}

    # ---- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.model, self.tokenizer, self.extra = self._load()
            self._warm_up()
        except Exception as e:
            self.failed = f"{type(e).__name__}: {e}"
            log.error("loading the model failed:\n%s", traceback.format_exc())
            return
        self.ready.set()
        log.info("model ready; CPU kernels %s", kernels.status())
        while not self._stopping:
            try:
                if not self._turn():
                    self._wake.wait(0.25)
                    self._wake.clear()
            except Exception:  # a bug must cost its batch, never the server
                log.error("engine step failed:\n%s", traceback.format_exc())
                self._fail_all(self._active, APIError(500, "internal error", type="server_error"))
                self._active = []
        self._fail_all(self._active, APIError(503, "the server is shutting down",
                                              type="server_error"))  # fmt: skip
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            job.emit(("error", APIError(503, "the server is shutting down", type="server_error")))

    def _warm_up(self) -> None:
        """Build the kernels and run every path once, so the first request is not slow."""
        done = threading.Event()
        job = Job([[self.tokenizer.bos_id] * (BLOCK + 3)], 2, Params(max_tokens=2),
                  lambda ev: ev[0] != "piece" and done.set())  # fmt: skip
        self._waiting.append(job)
        while not done.is_set():
            self._turn()
        self.prompt_cache = PromptCache(self.prompt_cache.max_bytes)

    def _turn(self) -> bool:
        """Admit, prefill one chunk, decode one step; False when there was nothing to do."""
        self._admit()
        self._drop_cancelled()
        if not self._active:
            return False
        newcomer = next((s for s in self._active if not s.ready and s.leader is None), None)
        if newcomer is not None:
            self._prefill_chunk(newcomer)
        decoding = [s for s in self._active if s.ready]
        if decoding:
            self._decode(decoding)
        return True

    def _admit(self) -> None:
        with self._lock:
            while self._waiting and self._waiting[0].choices <= self.max_batch - len(self._active):
                job = self._waiting.popleft()
                if job.cancelled.is_set():
                    continue
                try:
                    self._start(job)
                except Exception:  # this job's own problem: it fails alone
                    log.error("starting a request failed:\n%s", traceback.format_exc())
                    self._active = [s for s in self._active if s.job is not job]
                    job.emit(("error", APIError(500, "internal error", type="server_error")))

    def _start(self, job: Job) -> None:
        layers = len(self.model.layers)
        cached = 0
        for p, prompt in enumerate(job.prompts):
            leader = None
            for c in range(job.n):
                s = Sequence(job, p * job.n + c, prompt, self.tokenizer, layers)
                if leader is None:
                    cache, n = self.prompt_cache.lookup(prompt)
                    if cache is not None:
                        s.adopt(cache, n)
                        cached += n
                    leader = s
                else:
                    s.leader = leader
                self._active.append(s)
        prompt_tokens = sum(len(p) for p in job.prompts)
        self._usage[id(job)] = [prompt_tokens, 0, cached, job.choices]

    def _prefill_chunk(self, s: Sequence) -> None:
        # Chunks end on multiples of the chunk size (the prompt cache's blocks divide it), the last
        # one before the prompt's final token, which the first decode step feeds.
        end = min((s.pos // self.prefill_chunk + 1) * self.prefill_chunk, len(s.prompt) - 1)
        self.model(mx.array(s.prompt[s.pos : end])[None], cache=s.cache)
        mx.eval([c.state for c in s.cache])
        s.pos = end
        if s.ready:
            for other in self._active:
                if other.leader is s:  # the other choices of this prompt start from its cache
                    other.adopt(s.cache, s.pos)
                    other.leader = None

    def _decode(self, seqs: list[Sequence]) -> None:
        tokens = mx.array([s.history[-1] for s in seqs])[:, None]
        caches = [RowCaches(s.cache[i] for s in seqs) for i in range(len(self.model.layers))]
        with kernels.batch_rows(len(seqs)):
            logits = self.model(tokens, cache=caches)[:, -1, :]
            vocab = self.tokenizer.vocab_size
            if logits.shape[-1] > vocab:  # padding rows (CoreNet's 32128) are not tokens
                logits = logits[:, :vocab]
            plain = kernels.log_softmax(logits) if any(s.plain for s in seqs) else None
            out = [
                s.sample(logits[b : b + 1], None if plain is None else plain[b : b + 1])
                for b, s in enumerate(seqs)
            ]
        mx.eval(out, [c.state for s in seqs for c in s.cache])
        for s, (token, logprobs) in zip(seqs, out):
            want = s.job.params.logprobs is not None
            row = np.asarray(logprobs[0]) if want else None
            piece = s.advance(int(token.item()), row)
            self._emit_piece(s, piece)

    def _emit_piece(self, s: Sequence, piece: Any) -> None:
        if s.job.cancelled.is_set():
            return
        s.job.emit(("piece", piece))
        if piece.finish_reason is not None:
            self._finish(s)

    def _finish(self, s: Sequence) -> None:
        self._active.remove(s)
        # The cache holds every token fed: the prompt and all sampled but the last.
        self.prompt_cache.insert(s.history[: s.cache[0].offset], s.cache)
        usage = self._usage[id(s.job)]
        usage[1] += s.generated
        usage[3] -= 1
        if usage[3] == 0:
            del self._usage[id(s.job)]
            s.job.emit(("done", Usage(usage[0], usage[1], usage[2])))

    def _drop_cancelled(self) -> None:
        gone = [s for s in self._active if s.job.cancelled.is_set()]
        for s in gone:
            self._active.remove(s)
            self._usage.pop(id(s.job), None)
        for s in self._active:
            if s.leader is not None and s.leader not in self._active:
                s.leader = None  # prefill on its own

    def _fail_all(self, seqs: list[Sequence], error: APIError) -> None:
        jobs = {id(s.job): s.job for s in seqs}
        for job in jobs.values():
            self._usage.pop(id(job), None)
            job.emit(("error", error))


def wait_ready(engine: Engine, timeout: float) -> bool:
    """For tests and the bench: wait until the engine serves (or failed)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and not engine.failed:
        if engine.ready.wait(0.1):
            return True
    return False
