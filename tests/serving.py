"""A server started in-process for the serve tests: uvicorn in a thread, the engine in its own."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

from mlx_openelm.serve import make_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(model: str, **options):
    """Yield (base URL, engine) of a served model, and stop both afterwards."""
    port = free_port()
    server, engine = make_server(model, port=port, log_level="warning", **options)
    engine.start()
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not (server.started and engine.ready.is_set()):
        assert not engine.failed, engine.failed
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(30)
        engine.stop()
