"""Run the app under uvicorn with a draining shutdown: SIGTERM makes readiness 503,
refuses new requests, lets in-flight ones finish (up to the drain timeout), then exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette

from mlserve.errors import UsageError
from mlserve.server.state import ServerState
from mlserve.server.tls import TLSConfig

log = logging.getLogger("mlserve.server")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of stopping at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, on_hup: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.state = state
        self.on_hup = on_hup  # SIGHUP: followed channels are looked at again now
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_started = False
        self.bound: tuple[str, int] | None = None

    async def startup(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)  # type: ignore[arg-type]
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                self.bound = (host, port)
                scheme = "https" if self.config.ssl_keyfile else "http"
                print(f"mlserve: listening on {scheme}://{host}:{port}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's SIGINT/SIGTERM handling, plus SIGHUP (which no longer kills the server)."""
        hup: signal.Signals | None = getattr(signal, "SIGHUP", None)  # not on Windows
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(hup, self.handle_hup) if hup is not None and main else None
        try:
            with super().capture_signals():
                yield
        finally:
            if hup is not None and previous is not None:  # None: a handler set outside Python, left alone
                signal.signal(hup, previous)

    def handle_hup(self, sig: int, frame: FrameType | None) -> None:
        """Hand SIGHUP to the app's reload hook on the event loop."""
        if self.on_hup is None or self._loop is None:
            log.info("SIGHUP ignored: this server follows no channel")
            return
        self._loop.call_soon_threadsafe(self.on_hup)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_started or self._loop is None:
            if sig == signal.SIGINT and self._drain_started:
                self.force_exit = True
            self.should_exit = True
            return
        self._drain_started = True
        self.state.draining = True
        for m in self.state.models:
            m.engine.begin_drain()
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        timeout = self.state.settings.drain_timeout
        deadline = time.monotonic() + timeout
        log.info("draining: %d request(s) in flight, up to %.0f s", self.state.in_flight, timeout)
        while self.state.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.state.in_flight:
            log.warning("drain timeout: %d request(s) still in flight are cut", self.state.in_flight)
        self.should_exit = True


def serve(app: Starlette, host: str, port: int, log_level: str = "info", tls: TLSConfig | None = None) -> None:
    """Serve until drained; returns normally (exit 0) after SIGTERM."""
    ssl_args: dict[str, Any] = {}
    if tls is not None:
        # Our own context (TLS 1.2 minimum, client certs); the file names make uvicorn (and us) report https.
        ssl_args = {"ssl_certfile": tls.cert, "ssl_keyfile": tls.key, "ssl_context_factory": lambda _c, _d: tls.context}
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="on",
        # The same event loop and HTTP parser wherever mlserve runs: uvicorn would otherwise pick
        # uvloop/httptools when some other package happened to install them, and disconnects,
        # flushing and timing would differ from what the tests exercised.
        loop="asyncio",
        http="h11",
        **ssl_args,
    )
    # Bind before anything loads, so a taken port is a plain error, not a crash after warm-up.
    sock = _bind(host, port)
    DrainingServer(config, app.state.mlserve, on_hup=getattr(app.state, "reload", None)).run(sockets=[sock])


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say so,
    # and with Nagle on every small SSE chunk or health answer waits ~40 ms for an ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(
                f"Port {port} on {host} is already in use.",
                "Stop the other server, or pass --port N (0 picks a free one).",
            ) from exc
        raise UsageError(f"Cannot listen on {host}:{port}: {exc.strerror}.", "Check --host and --port.") from exc
    sock.set_inheritable(True)
    return sock
