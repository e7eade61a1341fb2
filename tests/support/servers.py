"""Start real `mlserve serve` processes on a free loopback port for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from mlserve.bench.local_server import stop_process

REPO = Path(__file__).resolve().parent.parent.parent
RECIPE = REPO / "recipes" / "gemma3-270m.yaml"


class ServerProcess:
    """A running server whose stderr is captured line by line.

    ``command``: what runs ``serve`` (default: this checkout's ``python -m mlserve``; a kit test
    passes another venv's ``mlserve``). ``free_port=False`` leaves the port to the flags or the
    environment (Vertex AI's ``AIP_HTTP_PORT``). ``url`` is loopback on the bound port;
    ``listened`` is the address the server printed.
    """

    def __init__(
        self,
        home: Path,
        refs: list[str],
        *flags: str,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
        cwd: Path = REPO,
        free_port: bool = True,
        bind_timeout: float = 60,
    ) -> None:
        full_env = {**os.environ, "MLSERVE_HOME": str(home), "PYTHONUNBUFFERED": "1", **(env or {})}
        argv = [*(command or [sys.executable, "-m", "mlserve"]), "serve", *refs]
        self.proc = subprocess.Popen(
            [*argv, *(["--port", "0"] if free_port else []), *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=full_env,
            cwd=cwd,
        )
        self.lines: list[str] = []
        self.listened = ""
        self._port: int | None = None
        self._bound = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._bound.wait(bind_timeout) or self._port is None:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))
        self.url = f"http://127.0.0.1:{self._port}"

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            match = re.search(r"listening on (https?://[^:]+:(\d+))", line)
            if match:
                self.listened, self._port = match.group(1), int(match.group(2))
                self._bound.set()
        self._bound.set()

    def wait_ready(self, timeout: float = 60, path: str = "/health/ready") -> None:
        """Poll ``path`` until 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("server never became ready:\n" + "".join(self.lines))

    @property
    def log(self) -> str:
        """Everything the server printed so far."""
        return "".join(self.lines)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait for exit; return the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Stop the server, forcefully if it does not drain in time."""
        stop_process(self.proc)


@contextlib.contextmanager
def start_server(home: Path, *flags: str, refs: list[str] | None = None) -> Iterator[ServerProcess]:
    """Start, wait until ready, yield, and always stop (also when the test fails)."""
    server = ServerProcess(home, refs or ["gemma3-270m"], *flags)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def pack_gemma(home: Path, gemma_path: Path) -> Path:
    """Pack the real Gemma GGUF with its recipe into ``home`` as gemma3-270m:1."""
    env = {**os.environ, "MLSERVE_HOME": str(home)}
    subprocess.run(
        [sys.executable, "-m", "mlserve", "pack", str(gemma_path), "--name", "gemma3-270m", "--recipe", str(RECIPE)],
        check=True,
        env=env,
        cwd=REPO,
        capture_output=True,
    )
    return home
