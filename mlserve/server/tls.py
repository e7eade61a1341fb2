"""The server's TLS context: TLS 1.2 minimum, forward-secret AEAD ciphers, optional client certificates."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from mlserve.errors import InvalidInputError

# NIST SP 800-52r2 style: ECDHE key exchange with AES-GCM or ChaCha20 for TLS 1.2 (TLS 1.3 suites are fixed).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


@dataclass(frozen=True)
class TLSConfig:
    """Files the context came from (uvicorn reports https when they are set) and the context itself."""

    cert: str
    key: str
    client_ca: str | None
    context: ssl.SSLContext


def load(cert: str, key: str, client_ca: str | None = None) -> TLSConfig:
    """Build the server context now, so a bad file fails before any model loads."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInputError(
            f"Cannot load the TLS certificate {cert} with key {key}: {getattr(exc, 'strerror', None) or exc}.",
            "Pass a PEM certificate chain with --tls-cert and its PEM private key with --tls-key.",
        ) from exc
    if client_ca:
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInputError(
                f"Cannot load the client CA file {client_ca}: {getattr(exc, 'strerror', None) or exc}.",
                "Pass PEM CA certificates with --tls-client-ca.",
            ) from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    return TLSConfig(cert, key, client_ca, ctx)
