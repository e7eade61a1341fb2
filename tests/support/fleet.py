"""Fleet helpers: HAProxy in front of mlserve servers on loopback, free ports, waiting on conditions."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import run_mlserve

# The flags each fleet server is started with: small, so two fit on 2 cores beside HAProxy.
SERVE = ("--parallel", "4", "--ctx-size", "256", "--threads", "1", "--drain-timeout", "20", "--request-timeout", "30")
# Debian puts it in /usr/sbin, which a non-root PATH may lack.
HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin") or ""


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (HAProxy needs them before the servers start)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Poll ``condition`` until true or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class HAProxy:
    """haproxy in the foreground with a config rendered by ``mlserve deploy haproxy``."""

    def __init__(
        self, tmp: Path, store: Path, ref: str, backends: list[int], port: int, *flags: str, wait_up: bool = True
    ) -> None:
        self.socket = tmp / "admin.sock"
        flags = flags or SERVE
        args = ["deploy", "haproxy", ref, *flags, "-o", tmp, "--bind", f"127.0.0.1:{port}", "--server-header"]
        args += ["--chroot", "", "--user", "", "--stats-socket", self.socket, "--log-target", "stdout"]
        for p in backends:
            args += ["--backend", f"127.0.0.1:{p}"]
        done = run_mlserve(*args, env={**os.environ, "MLSERVE_HOME": str(store)})
        assert done.returncode == 0, done.stderr
        cfg = tmp / "haproxy.cfg"
        check = subprocess.run([HAPROXY, "-c", "-f", cfg], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log_path = tmp / "haproxy.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", cfg], stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        if wait_up:
            every = {f"s{i}" for i in range(1, len(backends) + 1)}
            wait_for(lambda: self.up() == every, "every server UP in HAProxy")

    def stats(self) -> dict[str, str]:
        """Server name -> status (UP, DOWN, MAINT, ...) from the admin socket; empty while HAProxy starts."""
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.socket))
            except (FileNotFoundError, ConnectionRefusedError):
                assert self.proc.poll() is None, self.log_path.read_text()
                return {}
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = [line.split(",") for line in data.decode().splitlines() if line and not line.startswith("#")]
        return {r[1]: r[17] for r in rows if r[1] not in ("FRONTEND", "BACKEND")}

    def up(self) -> set[str]:
        """The servers HAProxy sends traffic to (none while it starts)."""
        return {name for name, status in self.stats().items() if status == "UP"}

    def retried(self) -> int:
        """Requests HAProxy retried at least once: the %rc field of its log line is not 0."""
        counts = re.findall(r" \d+/\d+/\d+/\d+/\+?(\d+) \d+/\d+ ", self.log_path.read_text())
        return sum(1 for c in counts if c != "0")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()
