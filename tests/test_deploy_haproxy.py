"""``mlserve deploy haproxy``: a config ``haproxy -c`` accepts, the settings it must carry, refusals,
and TLS toward a real server that HAProxy verifies (and refuses when the CA is wrong)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fleet import HAPROXY, HAProxy, free_ports, wait_for
from tests.support.servers import ServerProcess

needs_haproxy = pytest.mark.skipif(
    not HAPROXY,
    reason="haproxy is not installed: `apt-get install -y haproxy` (CI's .ci/run installs it)",
)
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")
PAIR = ("--backend", "10.0.0.5:8000", "--backend", "10.0.0.6:8000", "--host", "0.0.0.0", "--insecure")
TINY = ("--ctx-size", "256", "--parallel", "2", "--threads", "1")


@pytest.fixture
def tiny_home(cli: Callable[..., Any], tiny_gguf: Path, home: Path) -> Path:
    """A store holding the tiny GGUF as tiny:1."""
    assert cli("pack", tiny_gguf, "--name", "tiny").exit_code == 0
    return home


def _cfg(cli: Callable[..., Any], *args: str | Path) -> str:
    res = cli("deploy", "haproxy", "tiny", *args)
    assert res.exit_code == 0, res
    return str(res.stdout)


def _lines(cfg: str) -> list[str]:
    return [line.strip() for line in cfg.splitlines()]


def test_config_carries_checks_balance_retries_and_timeouts(cli: Callable[..., Any], tiny_home: Path) -> None:
    cfg = _cfg(cli, *PAIR, "--request-timeout", "120", "--parallel", "4")
    lines = _lines(cfg)
    for expected in (
        "balance leastconn",
        "option httpchk",
        "http-check send meth GET uri /health/ready ver HTTP/1.1 hdr host mlserve",
        "http-check expect status 200",
        "option redispatch 1",
        "retry-on conn-failure empty-response response-timeout 503",
        "option http-no-delay",
        "http-request set-header x-request-id %[unique-id] unless { req.hdr(x-request-id) -m found }",
        "server s1 10.0.0.5:8000",
        "server s2 10.0.0.6:8000",
    ):
        assert expected in lines, expected
    assert "compression" not in cfg  # SSE must pass through unbuffered
    log_format = next(line for line in lines if line.startswith("log-format")).split('"')[1].split()
    assert not {"%r", "%HU", "%HQ", "%hr", "%CC"} & set(log_format)  # never the request line, query or headers
    timeout = re.search(r"timeout server (\d+)s", cfg)
    assert timeout and int(timeout[1]) >= 120
    assert re.search(r"^\s*default-server check .* maxconn 68$", cfg, re.M)  # 4 sequences + 64 queued per server


@needs_haproxy
def test_haproxy_accepts_the_config(cli: Callable[..., Any], tiny_home: Path, tmp_path: Path) -> None:
    assert cli("deploy", "haproxy", "tiny", *PAIR, "-o", tmp_path).exit_code == 0
    done = subprocess.run([HAPROXY, "-c", "-f", tmp_path / "haproxy.cfg"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    (tmp_path / "bad.cfg").write_text((tmp_path / "haproxy.cfg").read_text().replace("balance leastconn", "balance x"))
    done = subprocess.run([HAPROXY, "-c", "-f", tmp_path / "bad.cfg"], capture_output=True, text=True)
    assert done.returncode != 0, "haproxy -c accepts anything: this check proves nothing"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--timeout-server", "60"), "timeout server 60 s is shorter than the request timeout 600 s"),
        (("--hard-stop-after", "10", "--timeout-server", "700"), "hard-stop-after 10 s is shorter"),
        (("--ready-path", "/health/redy"), "not served by mlserve"),
        (("--request-timeout", "0"), "cannot size its server timeout"),
        (("--tls-cert", "/etc/mlserve/cert.pem", "--tls-key", "/etc/mlserve/key.pem"), "--backend-ca"),
        (
            ("--tls-cert", "/c", "--tls-key", "/k", "--tls-client-ca", "/ca", "--backend-ca", "/ca"),
            "--backend-client-cert",
        ),
        (("--backend-ca", "/ca.pem"), "need servers that speak TLS"),
        (("--bind", "everywhere"), "is not ADDRESS:PORT"),
        (("--host", "127.0.0.1"), "which HAProxy cannot reach at 10.0.0.5:8000"),
    ],
)
def test_inconsistent_settings_are_refused(
    cli: Callable[..., Any], tiny_home: Path, args: tuple[str, ...], needle: str
) -> None:
    res = cli("deploy", "haproxy", "tiny", *PAIR, *args)
    assert res.exit_code == 2, res
    assert needle in res.stderr and res.stdout == ""


@pytest.mark.parametrize(
    ("backends", "needle"),
    [
        ((), "--backend HOST:PORT"),
        (("--backend", "10.0.0.5"), "is not HOST:PORT"),
        (("--backend", "a:1", "--backend", "a:1"), "named twice"),
    ],
)
def test_bad_backends_are_refused(
    cli: Callable[..., Any], tiny_home: Path, backends: tuple[str, ...], needle: str
) -> None:
    res = cli("deploy", "haproxy", "tiny", *backends)
    assert res.exit_code == 2 and needle in res.stderr, res


def test_tls_backends_are_verified(cli: Callable[..., Any], tiny_home: Path) -> None:
    tls = ("--tls-cert", "/etc/mlserve/cert.pem", "--tls-key", "/etc/mlserve/key.pem")
    backends = ("--backend", "10.0.0.5:8443", "--backend", "mlserve-b.example:8443", "--host", "0.0.0.0")
    cfg = _cfg(cli, *backends, *tls, "--api-keys", "--backend-ca", "/ca.pem")
    assert "server s1 10.0.0.5:8443 ssl verify required ca-file /ca.pem" in _lines(cfg)
    line = "server s2 mlserve-b.example:8443 ssl verify required ca-file /ca.pem"
    assert f"{line} sni str(mlserve-b.example) verifyhost mlserve-b.example" in _lines(cfg)


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """A self-signed certificate for 127.0.0.1 and an unrelated CA."""
    d = tmp_path / "certs"
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"]
    for name, extra in (("server", ["-addext", "subjectAltName=IP:127.0.0.1"]), ("other", [])):
        cmd = ["openssl", "req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}"]
        subprocess.run([*cmd, *extra], cwd=d, check=True, capture_output=True)
    return d


@needs_haproxy
@needs_openssl
def test_haproxy_reaches_a_tls_server_and_passes_request_ids(
    cli: Callable[..., Any], tiny_home: Path, certs: Path, tmp_path: Path
) -> None:
    """Through HAProxy to a TLS server it verifies; the wrong CA keeps the server out of the pool."""
    port, front, wrong_front = free_ports(3)
    tls = ("--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"))
    server = ServerProcess(tiny_home, ["tiny"], *TINY, *tls, "--port", str(port))
    good_dir, bad_dir = tmp_path / "good", tmp_path / "bad"
    good_dir.mkdir()
    bad_dir.mkdir()
    proxies: list[HAProxy] = []
    try:
        flags = (*TINY, *tls)
        good = HAProxy(good_dir, tiny_home, "tiny", [port], front, *flags, "--backend-ca", str(certs / "server.pem"))
        proxies.append(good)
        body = {"model": "tiny", "prompt": "the patient", "max_tokens": 4}
        with httpx.Client(timeout=30) as client:
            resp = client.post(good.url + "/v1/completions", json=body, headers={"x-request-id": "abc-123"})
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-request-id"] == "abc-123"
            assert resp.headers["x-mlserve-model"] == "tiny:1"
            fresh = client.post(good.url + "/v1/completions", json=body).headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", fresh), fresh
        wrong_ca = ("--backend-ca", str(certs / "other.pem"))
        bad = HAProxy(bad_dir, tiny_home, "tiny", [port], wrong_front, *flags, *wrong_ca, wait_up=False)
        proxies.append(bad)
        wait_for(lambda: bad.stats().get("s1", "").startswith("DOWN"), "the unverifiable server to be DOWN")
        assert httpx.post(bad.url + "/v1/completions", json=body, timeout=30).status_code == 503
    finally:
        for proxy in proxies:
            proxy.stop()
        server.stop()
