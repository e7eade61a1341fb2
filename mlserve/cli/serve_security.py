"""Safety checks ``serve`` runs before it binds: exposure (TLS + keys), TLS files, chat templates."""

from __future__ import annotations

import ipaddress
from typing import Any

from mlserve.bundles.store import Bundle, Store
from mlserve.errors import EngineError, InvalidInputError, UsageError
from mlserve.security import keys

# Placeholders for the special tokens while checking a template before the model loads;
# rendering success does not depend on their exact text.
_SPECIAL = {"bos_token": "<bos>", "eos_token": "<eos>"}


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_tls(cert: str | None, key: str | None, client_ca: str | None) -> Any:
    """The TLS config for ``--tls-cert/--tls-key[/--tls-client-ca]``, or None without them."""
    if not cert and not key:
        if client_ca:
            raise UsageError("--tls-client-ca needs --tls-cert and --tls-key.")
        return None
    if not cert or not key:
        raise UsageError("TLS needs both --tls-cert FILE and --tls-key FILE.")
    from mlserve.server import tls

    return tls.load(cert, key, client_ca)


def check_exposure(host: str, insecure: bool, tls_on: bool) -> None:
    """A non-loopback bind needs TLS and at least one active API key, unless ``--insecure``."""
    if is_loopback(host) or insecure:
        return
    has_keys = any(r.active for r in keys.KeyStore().records())
    if tls_on and has_keys:
        return
    missing = " and ".join(x for x, ok in (("TLS", tls_on), ("API keys", has_keys)) if not ok)
    raise UsageError(
        f"Refusing to bind {host}: a non-loopback address would expose the models without {missing}.",
        "Pass --tls-cert/--tls-key and create a key with `mlserve keys create NAME`, "
        "or bind 127.0.0.1, or pass --insecure if this network is trusted.",
    )


def check_chat_template(store: Store, bundle: Bundle) -> None:
    """Refuse a bundle whose chat template fails, or exceeds the render bounds, on sample conversations."""
    from mlserve.bundles import gguf_info
    from mlserve.engine.chat import checked_template

    source = bundle.manifest.get("serving", {}).get("chat_template")
    if not source:
        source = gguf_info.inspect(store.blob_path(bundle.model_sha256)).chat_template
    if not source:
        return
    try:
        checked_template(source, _SPECIAL)
    except EngineError as exc:
        raise InvalidInputError(f"Refusing to serve {bundle.ref}: {exc.message}", exc.hint) from exc
