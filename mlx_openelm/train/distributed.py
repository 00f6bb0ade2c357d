"""Data parallelism over `mx.distributed`: one starting state for every rank, and no silent hangs.

Started under `mlx.launch`, every process runs the same loop on its shard of each global batch.
Rank 0 is the only one that reads or writes the run's folder, so it hands its weights, optimizer
state and step to the others; a checkpoint then resumes under any number of processes.

The ring back end raises when a peer's socket closes (a process crashed or was killed), but waits
forever on a peer that is alive and silent (stopped, asleep, behind a broken link). A watchdog
thread ends a process that makes no progress for `MLX_OPENELM_DIST_TIMEOUT` seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import UserError

TIMEOUT_ENV = "MLX_OPENELM_DIST_TIMEOUT"
# Must cover the slowest step, validation or checkpoint save (peers wait while rank 0 saves).
DEFAULT_TIMEOUT = 300.0
_BACKEND_TAGS = ("[ring]", "[jaccl]", "[mpi]", "nccl")


def collective_timeout() -> float:
    """Seconds without progress before a rank gives up on its peers (0: wait forever)."""
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        timeout = float(value) if value else DEFAULT_TIMEOUT
    except ValueError:
        timeout = -1.0
    if timeout < 0:
        raise UserError(f"{TIMEOUT_ENV}={value!r}: give seconds (e.g. 300), or 0 to wait forever")
    return timeout


class _Watchdog(threading.Thread):
    def __init__(self, timeout: float, rank: int):
        super().__init__(name="mlx-openelm-watchdog", daemon=True)
        self.timeout, self.rank = timeout, rank
        self.last = time.monotonic()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(min(1.0, self.timeout / 10)):
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                sys.stderr.write(
                    f"error: rank {self.rank}: no progress for {idle:.0f} s: another process is "
                    "hung or unreachable (stopped, asleep, network link down). Stopping; continue "
                    f"from the last checkpoint with --resume. Set {TIMEOUT_ENV} (seconds) to wait "
                    "longer for slow steps or saves.\n"
                )
                sys.stderr.flush()
                # The main thread is blocked inside a collective: only a hard exit ends it.
                os._exit(1)


_ACTIVE: list[_Watchdog] = []


def heartbeat() -> None:
    """Tell the running watchdog (if any) that this process just made progress."""
    for dog in _ACTIVE:
        dog.last = time.monotonic()


def _is_peer_error(e: RuntimeError) -> bool:
    return any(tag in str(e).lower() for tag in _BACKEND_TAGS)


@contextlib.contextmanager
def guard(group: mx.distributed.Group) -> Iterator[None]:
    """Around code that runs collectives: a watchdog against silent peers, and a clear
    `ConnectionError` instead of the back end's error when a peer is lost."""
    if group.size() == 1:
        yield
        return
    timeout = collective_timeout()
    dog = _Watchdog(timeout, group.rank()) if timeout > 0 else None
    if dog is not None:
        _ACTIVE.append(dog)
        dog.start()
    try:
        yield
    except RuntimeError as e:
        if not _is_peer_error(e):
            raise
        raise ConnectionError(
            f"rank {group.rank()} lost contact with the other processes ({e}): one of them "
            "stopped or crashed, and its own output says why. Continue from the last checkpoint "
            "with --resume (any number of processes)."
        ) from None
    finally:
        if dog is not None:
            dog.done.set()
            _ACTIVE.remove(dog)


# ---- one starting state for all ranks


def fingerprint(args: dict[str, Any], train_set: Sequence[Any], model: nn.Module) -> int:
    """A 32-bit digest of what every rank must share: options, data, trainable parameter shapes."""
    h = hashlib.blake2b(digest_size=4)
    h.update(json.dumps(args, sort_keys=True, default=str).encode())
    h.update(str(len(train_set)).encode())
    for i in range(0, len(train_set), max(1, len(train_set) // 256)):  # a sample of the data
        h.update(np.ascontiguousarray(train_set[i][0]).tobytes())
    for k, v in tree_flatten(model.trainable_parameters()):
        h.update(f"{k}{v.shape}{v.dtype}".encode())
    return int.from_bytes(h.digest(), "little")


def _from_rank0(tree: Any, group: mx.distributed.Group) -> Any:
    # A sum with zeros from every other rank is an exact broadcast. Leaves go in key order: a
    # loaded optimizer state lists them in another order than a fresh one.
    rank0, flat, pending = group.rank() == 0, dict(tree_flatten(tree)), []
    for k in sorted(flat):
        if isinstance(flat[k], mx.array):
            v = flat[k] if rank0 else mx.zeros_like(flat[k])
            flat[k] = mx.distributed.all_sum(v, group=group)
            pending.append(flat[k])
        if sum(p.nbytes for p in pending) > 256 * 2**20:  # bound the memory in flight
            mx.eval(pending)
            pending.clear()
            heartbeat()
    mx.eval(pending)
    return tree_unflatten(list(flat.items()))


def _json_from_rank0(obj: Any, group: mx.distributed.Group) -> Any:
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if group.rank() == 0 else None
    n = _from_rank0(mx.array([0 if data is None else len(data)], mx.int32), group).item()
    buf = mx.array(data) if data is not None else mx.zeros((n,), mx.uint8)
    return json.loads(bytes(np.array(_from_rank0(buf, group))))


_CHECK_ERRORS = {e.__name__: e for e in (UserError, FileNotFoundError, FileExistsError)}


def check_on_rank0(check: Callable[[], None], group: mx.distributed.Group | None = None) -> None:
    """Run `check` (a precondition on the run's folder) on rank 0 alone and raise its error on
    every rank.

    Rank 0 is the only one that reads or writes the folder, which need not exist on the other
    machines; and every rank must stop together, or the others would wait for it at their first
    collective until the watchdog ends them.
    """
    group = group or mx.distributed.init()
    if group.size() == 1:
        check()
        return
    error = None
    if group.rank() == 0:
        try:
            check()
        except tuple(_CHECK_ERRORS.values()) as e:
            error = [type(e).__name__, str(e)]
    with guard(group):
        error = _json_from_rank0(error, group)
    if error:
        raise _CHECK_ERRORS[error[0]](error[1])


def weights_from_rank0(
    weights: dict[str, mx.array] | None, model: nn.Module, group: mx.distributed.Group
) -> dict[str, mx.array]:
    """Rank 0's `weights` (e.g. an average of the checkpoints only it holds) on every rank.

    The other ranks pass None: `model`'s trainable parameters give them the names and shapes.
    """
    if group.size() == 1:
        return weights
    template = weights if group.rank() == 0 else dict(tree_flatten(model.trainable_parameters()))
    with guard(group):
        return dict(tree_flatten(_from_rank0(template, group)))


def sync_from_rank0(
    model: nn.Module,
    optimizer: optim.Optimizer,
    meta: dict[str, Any],
    digest: int,
    group: mx.distributed.Group,
) -> dict[str, Any]:
    """Give every rank rank 0's trainable weights, optimizer state (when resuming) and `meta`.

    First checks that every rank was started with the same options, data and model (`digest`,
    from `fingerprint`), since collectives on mismatched shapes would fail or hang.
    """
    digests = mx.distributed.all_gather(mx.array([digest], mx.uint32), group=group).tolist()
    others = [r for r, d in enumerate(digests) if d != digests[0]]
    if others:
        raise UserError(
            f"rank(s) {others} run with other options, data or model than rank 0: start every "
            "process with the same command, and the same files at the same paths on every machine"
        )
    meta = _json_from_rank0(meta, group)
    model.update(_from_rank0(model.trainable_parameters(), group))
    if meta["step"] > 0:  # a fresh optimizer state is the same everywhere already
        optimizer.state = _from_rank0(optimizer.state, group)
    mx.eval(model.state, optimizer.state)
    return meta
