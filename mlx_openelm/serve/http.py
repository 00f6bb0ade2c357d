"""uvicorn's server and HTTP protocol, made to stop promptly and to drop slow or idle clients.

uvicorn times out an idle connection only after a response (`timeout_keep_alive`): a client that
connects and sends nothing, or dribbles a header line a second, holds its socket for ever, and
past `limit_concurrency` such sockets make uvicorn answer every newcomer with a 503 (400 of them
did). `Protocol` closes a connection whose request headers are not all in within
`HEADER_SECONDS` of its start or of its last response; `app._body` gives the body a deadline of
its own. `Server` stops the engine the moment it is told to stop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_SECONDS = 10.0  # nginx allows 60, Apache's mod_reqtimeout 20: a local server can be tighter


class Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's headers."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._cancel()
        self._waiting_after = self.cycle  # a new cycle means a request's headers arrived
        self._deadline = self.loop.call_later(HEADER_SECONDS, self._expire)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.cycle is self._waiting_after and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._deadline is not None and self.cycle is not self._waiting_after:
            self._cancel()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)


class Server(uvicorn.Server):
    """uvicorn's server, stopping the engine as soon as it is told to stop (Ctrl-C, SIGTERM): the
    replies in flight end at the next step with a 503 (an error event in a stream) instead of
    running on past uvicorn's 3 s of grace, to be cut mid-stream."""

    def __init__(self, config: uvicorn.Config, engine: Any):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.engine.stop(timeout=0)
        super().handle_exit(sig, frame)
