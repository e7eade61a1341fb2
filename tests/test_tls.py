"""TLS (1.2 minimum, optional client certificates), the exposure rule for non-loopback binds, load-time refusals."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlserve.fsutil import sha256_file
from mlserve.security.keys import KeyStore
from tests.support.servers import ServerProcess

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")
EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """A self-signed server certificate for 127.0.0.1, and a CA with one client certificate."""
    d = tmp_path / "certs"
    d.mkdir()
    san = "subjectAltName=IP:127.0.0.1,DNS:localhost"
    server = ["-keyout", "key.pem", "-out", "cert.pem", "-days", "1", "-subj", "/CN=localhost", "-addext", san]
    _openssl("req", "-x509", *EC, *server, cwd=d)
    _openssl("req", "-x509", *EC, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca", cwd=d)
    _openssl("req", *EC, "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=client", cwd=d)
    sign = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "client.pem", "-days", "1"]
    _openssl("x509", "-req", "-in", "client.csr", *sign, cwd=d)
    return d


@pytest.fixture
def tiny_home(cli: Callable[..., Any], tiny_gguf: Path, home: Path) -> Path:
    assert cli("pack", tiny_gguf, "--name", "tiny").exit_code == 0
    return home


def _start_tls(home: Path, *flags: str) -> tuple[ServerProcess, str]:
    server = ServerProcess(home, ["tiny"], *flags)
    assert "listening on https://" in server.log
    port = server.url.rsplit(":", 1)[1]
    return server, f"https://127.0.0.1:{port}"


def _wait_ready(url: str, **kw: Any) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health/ready", timeout=2, **kw).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("TLS server never became ready")


def _handshake(port: int, max_version: ssl.TLSVersion) -> str:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.maximum_version = max_version
    if max_version < ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers("ALL:@SECLEVEL=0")  # OpenSSL 3 refuses TLS 1.0/1.1 at higher security levels
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        return str(tls.version())


@needs_openssl
def test_https_on_a_public_address_with_keys(tiny_home: Path, certs: Path) -> None:
    secret = KeyStore(tiny_home).create("app", ["infer"])[1]
    flags = ("--host", "0.0.0.0", "--tls-cert", str(certs / "cert.pem"), "--tls-key", str(certs / "key.pem"))
    server, url = _start_tls(tiny_home, *flags)
    try:
        ca = ssl.create_default_context(cafile=str(certs / "cert.pem"))
        _wait_ready(url, verify=ca)
        auth = {"Authorization": f"Bearer {secret}"}
        body = {"model": "tiny", "prompt": "a b", "max_tokens": 2, "temperature": 0}
        resp = httpx.post(url + "/v1/completions", json=body, headers=auth, verify=ca)
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 2
        assert httpx.get(url + "/v1/models", verify=ca).status_code == 401
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port gets no HTTP answer
            httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=5)
        assert _handshake(port, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
        try:
            version = _handshake(port, ssl.TLSVersion.TLSv1_1)
        except ssl.SSLError as exc:
            if "NO_PROTOCOLS_AVAILABLE" in str(exc) or "no protocols available" in str(exc):
                pytest.skip(
                    "this OpenSSL cannot build a TLS 1.1 client; TLS 1.2 minimum is set in mlserve/server/tls.py"
                )
            # The server answers with a protocol_version alert or just hangs up; either way no TLS 1.1.
            assert "PROTOCOL_VERSION" in str(exc).upper() or isinstance(exc, ssl.SSLEOFError), exc
            assert _handshake(port, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"  # and it is still serving
        else:
            raise AssertionError(f"a TLS 1.1-max client negotiated {version}")
    finally:
        server.stop()


@needs_openssl
def test_client_certificates_required_with_client_ca(tiny_home: Path, certs: Path) -> None:
    c = {n: str(certs / n) for n in ("cert.pem", "key.pem", "ca.pem", "client.pem", "client.key")}
    flags = ("--tls-cert", c["cert.pem"], "--tls-key", c["key.pem"], "--tls-client-ca", c["ca.pem"])
    server, url = _start_tls(tiny_home, *flags)
    try:
        client_ctx = ssl.create_default_context(cafile=c["cert.pem"])
        client_ctx.load_cert_chain(c["client.pem"], c["client.key"])
        _wait_ready(url, verify=client_ctx)
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health/live", verify=ssl.create_default_context(cafile=c["cert.pem"]), timeout=5)
    finally:
        server.stop()


def test_public_bind_refused_without_tls_and_keys(cli: Callable[..., Any], tiny_home: Path, tmp_path: Path) -> None:
    res = cli("serve", "tiny", "--host", "0.0.0.0")
    assert res.exit_code == 2 and "TLS and API keys" in res.stderr
    KeyStore(tiny_home).create("app")
    res = cli("serve", "tiny", "--host", "0.0.0.0")
    assert res.exit_code == 2 and "without TLS" in res.stderr and "API keys" not in res.stderr.split(".")[0]
    res = cli("serve", "tiny", "--tls-cert", tmp_path / "none.pem", "--tls-key", tmp_path / "none.key")
    assert res.exit_code == 2 and "TLS certificate" in res.stderr
    assert cli("serve", "tiny", "--tls-cert", tmp_path / "none.pem").exit_code == 2


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
        ("{{ raise_exception('this template refuses everything') }}", "refuses everything"),
        ("{% for m in messages %}{{ m.content | nosuchfilter }}", "compile"),
    ],
)
def test_serve_refuses_a_chat_template_that_fails_in_the_sandbox(
    cli: Callable[..., Any], tiny_gguf: Path, tmp_path: Path, template: str, why: str
) -> None:
    recipe = tmp_path / "bad.yaml"
    head = f"schema: 1\nname: bad\nsha256: {sha256_file(tiny_gguf)}\nsources:\n  - path: {tiny_gguf}\n"
    recipe.write_text(head + "chat_template: |-\n  " + template + "\n")
    packed = cli("pack", tiny_gguf, "--name", "bad", "--recipe", recipe)
    assert packed.exit_code == 0, packed
    res = cli("serve", "bad")
    assert res.exit_code == 2, res
    assert "Refusing to serve bad:1" in res.stderr and why in res.stderr


def test_serve_refuses_a_bundle_whose_blob_fails_verification(cli: Callable[..., Any], tiny_home: Path) -> None:
    (blob,) = (tiny_home / "blobs").iterdir()
    blob.chmod(0o644)
    with blob.open("r+b") as fh:
        fh.seek(1000)
        fh.write(b"\xff\xfe")
    res = cli("serve", "tiny")
    assert res.exit_code == 2 and "Refusing to serve tiny:1" in res.stderr
