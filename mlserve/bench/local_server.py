"""Start ``mlserve serve REF`` on a free loopback port for a benchmark, and stop it after."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from types import TracebackType

import httpx

from mlserve.errors import EngineError

_LISTENING = re.compile(r"mlserve: listening on (https?://\S+)")


def stop_process(proc: subprocess.Popen[str], grace: float = 30.0) -> None:
    """SIGTERM (an mlserve server drains), then kill if it lingers past ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class LocalServer:
    """A ``mlserve serve`` subprocess bound to 127.0.0.1 on a port the OS picks."""

    def __init__(
        self, ref: str, extra_args: list[str], start_timeout: float = 300.0, src: str | os.PathLike[str] | None = None
    ) -> None:
        """``src``: another mlserve source tree to serve from. The server runs with it as its working
        directory, because ``python -m mlserve`` imports ``./mlserve`` before anything on PYTHONPATH
        (so PYTHONPATH alone, run from a checkout, serves the checkout's code).
        """
        self.ref = ref
        self.src = src
        self.args = [sys.executable, "-m", "mlserve", "serve", ref, "--host", "127.0.0.1", "--port", "0"]
        self.args += ["--log-level", "warning", *extra_args]
        self.start_timeout = start_timeout
        self.url = ""
        self._tail: deque[str] = deque(maxlen=20)
        self._bound = threading.Event()
        self.proc: subprocess.Popen[str] | None = None

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._tail.append(line.rstrip())
            match = _LISTENING.search(line)
            if match and not self.url:
                self.url = match.group(1)
                self._bound.set()
        self._bound.set()

    def _failed(self, what: str) -> EngineError:
        log = " | ".join(list(self._tail)[-3:]) or "no output"
        return EngineError(f"The server for {self.ref} {what}: {log}", "Run `mlserve serve REF` to see its full log.")

    def start(self) -> str:
        """Start the server and wait until /health/ready answers 200; return its base URL."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=self.src,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + self.start_timeout
        if not self._bound.wait(self.start_timeout) or not self.url:
            self.stop()
            raise self._failed("did not start")
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health/ready", timeout=5).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise self._failed(f"exited with code {self.proc.returncode}")
            time.sleep(0.1)
        self.stop()
        raise self._failed(f"was not ready after {self.start_timeout:.0f} s")

    def stop(self) -> None:
        """SIGTERM (the server drains), then kill if it lingers."""
        if self.proc is not None:
            stop_process(self.proc)

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
