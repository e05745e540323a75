"""Serving the app with uvicorn, and draining it on SIGTERM or SIGINT.

On the first signal /ready turns 503 and new requests get 503 "draining" (probes and /metrics
still answer), while requests in flight, streams included, get up to --drain-seconds to finish.
Then uvicorn stops, the lifespan shuts the engine down, and the process exits 0. A second signal
skips what is left of the drain.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from server.config import Settings
from server.http.middleware import RequestGate

logger = logging.getLogger(__name__)

# After the drain, what uvicorn gives the few requests it did not wait for (probes, scrapes).
SHUTDOWN_GRACE_SECONDS = 2.0


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose exit signal starts a drain instead of an immediate shutdown."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_seconds: float):
        super().__init__(config)
        self.served_app = app
        self.gate: RequestGate = app.state.gate
        self.drain_seconds = drain_seconds
        self.drain_deadline: float | None = None
        self._drain_logged = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: set flags only; on_tick does the rest on the event loop.
        if self.drain_deadline is None and not self.should_exit:
            self.served_app.state.ready = False
            self.gate.draining = True
            self.drain_deadline = time.monotonic() + self.drain_seconds
        elif self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True
        # Not recorded in _captured_signals: uvicorn would re-raise it after serving, and the
        # process would die of it instead of exiting 0.

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            if not self._drain_logged:
                self._drain_logged = True
                logger.info(
                    "draining for up to %.0f s; requests in flight: %d", self.drain_seconds, self.gate.in_flight
                )
            if self.gate.in_flight == 0:
                logger.info("drained; shutting down")
                self.should_exit = True
            elif time.monotonic() >= self.drain_deadline:
                logger.warning("drain time is up; shutting down with requests in flight: %d", self.gate.in_flight)
                self.should_exit = True
        return await super().on_tick(counter)


def bind_listener(host: str, port: int) -> socket.socket:
    """The server's socket, bound now: before the engine starts, so that a port in use fails fast,
    and so that none of the ports vLLM's processes pick for themselves can take it meanwhile."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def serve_app(app: FastAPI, settings: Settings, sock: socket.socket | None = None) -> None:
    """Serve until a signal, then drain; returns once the lifespan has shut down.

    `sock` is a socket from bind_listener; without one, uvicorn binds --host and --port itself.
    """
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # the root logger's handler (server.ops.logs) formats uvicorn's lines too
        access_log=False,  # the telemetry middleware logs each request once
        timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
    )
    DrainingServer(config, app, settings.drain_seconds).run(sockets=[sock] if sock is not None else None)
