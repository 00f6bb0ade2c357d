"""The one thread that owns MLX: it loads the model, queues requests, and runs the continuous batch.

Each turn of its loop admits waiting requests while the batch has room, runs one prefill chunk of
one newcomer (so a long prompt never stalls the others for all of it), and one decode step for
every sequence that is prefilled: the products take all their rows at once (through the CPU
kernels on Linux, `kernels.batch_rows`) and attention runs per sequence over its own KV cache
(`kv_cache.RowCaches`; one kernel for all rows on a CPU), so sequences of any lengths share a
step and each row computes exactly what it would alone. A sequence leaves the batch when it ends
or its client hangs up.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
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
        self._pending: _Step | None = None  # the decode step queued and not yet read
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
                self._active, self._pending = [], None
        self._fail_all(self._active, APIError(503, "the server is shutting down",
                                              type="server_error"))  # fmt: skip
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            job.emit(("error", APIError(503, "the server is shutting down", type="server_error")))

    def _warm_up(self) -> None:
        """Build the kernels and run every path once, so the first request is not slow."""
        done = threading.Event()
        rows = min(2, self.max_batch)  # a batched step too, where there can be one
        job = Job([[self.tokenizer.bos_id] * (BLOCK + 3)], rows, Params(max_tokens=2),
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
            self._pending = None  # only rows that left were in it
            return False
        newcomer = next((s for s in self._active if not s.ready and s.leader is None), None)
        if newcomer is not None:
            self._prefill_chunk(newcomer)
        decoding = [s for s in self._active if s.ready]
        if decoding:
            self._decode(decoding)
        elif self._pending is not None:
            self._read(self._pending)
            self._pending = None
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
        """Queue this decode step, then read the previous one, as `generate_step` does: the step's
        graph is built while the last one computes, and its inputs are the last one's tokens
        before they reach Python. A row that needs its latest token on the host to build its
        step (a grammar, a repetition penalty) waits for it instead."""
        pending, self._pending = self._pending, None
        if pending is not None and not all(s.pipelined for s in seqs):
            self._read(pending)
            pending = None
            seqs = [s for s in seqs if not s.finished]
        # Rows whose pending token is their last are done: no step past it for them.
        last = {id(s) for s in pending.seqs if s.generated + 1 >= s.job.params.max_tokens} \
            if pending is not None else set()  # fmt: skip
        seqs = [s for s in seqs if id(s) not in last]
        if seqs:
            self._pending = self._queue(seqs, pending)
        if pending is not None:
            self._read(pending)

    def _queue(self, seqs: list[Sequence], pending: _Step | None) -> _Step:
        """Build one decode step of `seqs` and start computing it; the rows of `pending` take
        their input token from it, still on the device."""
        rows = {id(s): b for b, s in enumerate(pending.seqs)} if pending is not None else {}
        carried = [s for s in seqs if id(s) in rows]
        fresh = [s for s in seqs if id(s) not in rows]
        seqs = carried + fresh
        parts = []
        if carried:
            idx = [rows[id(s)] for s in carried]
            same = idx == list(range(len(pending.seqs)))
            parts.append(pending.tokens if same else pending.tokens[mx.array(idx)])
        if fresh:
            parts.append(mx.array([s.history[-1] for s in fresh]))
        tokens = parts[0] if len(parts) == 1 else mx.concatenate(parts)
        if len(seqs) == 1:  # exactly `generate`'s step
            caches = seqs[0].cache
        else:
            caches = [RowCaches(s.cache[i] for s in seqs) for i in range(len(self.model.layers))]
        with kernels.batch_rows(len(seqs)):
            logits = self.model(tokens[:, None], cache=caches)[:, -1, :]
            vocab = self.tokenizer.vocab_size
            if logits.shape[-1] > vocab:  # padding rows (CoreNet's 32128) are not tokens
                logits = logits[:, :vocab]
            plain = kernels.log_softmax(logits) if any(s.plain for s in seqs) else None
            if plain is not None and all(s.plain and s.greedy for s in seqs):
                out, logprobs = mx.argmax(plain, axis=-1), plain
            else:
                rows_out = [
                    s.sample(logits[b : b + 1], None if plain is None else plain[b : b + 1])
                    for b, s in enumerate(seqs)
                ]
                out = mx.concatenate([t for t, _ in rows_out])
                want = any(s.job.params.logprobs is not None for s in seqs)
                logprobs = mx.concatenate([lp for _, lp in rows_out]) if want else None
        for s in seqs:
            s.sampled += 1
        mx.async_eval(out, [c.state for s in seqs for c in s.cache])
        return _Step(seqs, out, logprobs)

    def _read(self, step: _Step) -> None:
        """Hand a computed step's tokens to their sequences and clients."""
        tokens = step.tokens.tolist()
        rows = None
        if step.logprobs is not None and any(s.job.params.logprobs is not None for s in step.seqs):
            rows = np.asarray(step.logprobs)
        for b, (s, token) in enumerate(zip(step.seqs, tokens)):
            if s.finished or s.job.cancelled.is_set():
                continue  # it left the batch while this step ran
            row = rows[b] if rows is not None and s.job.params.logprobs is not None else None
            piece = s.advance(token, row)
            self._emit_piece(s, piece)

    def _emit_piece(self, s: Sequence, piece: Any) -> None:
        if s.job.cancelled.is_set():
            return
        s.job.emit(("piece", piece))
        if piece.finish_reason is not None:
            self._finish(s)

    def _finish(self, s: Sequence) -> None:
        s.finished = True
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


@dataclass
class _Step:
    seqs: list[Sequence]
    tokens: mx.array  # (B,) the sampled tokens
    logprobs: mx.array | None  # (B, vocab), when a row asks for logprobs


def wait_ready(engine: Engine, timeout: float) -> bool:
    """For tests and the bench: wait until the engine serves (or failed)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and not engine.failed:
        if engine.ready.wait(0.1):
            return True
    return False
