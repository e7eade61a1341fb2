"""Names, versions and digests as the contract spells them, and the one canonical JSON encoding.

Shared by the store, recipes, keys and the audit log; nothing here touches the disk.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from mlserve.errors import UsageError

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
CHANNEL_RE = NAME_RE
HEX_RE = re.compile(r"[0-9a-f]{64}")


def canonical_text(data: Any) -> str:
    """The canonical text of a JSON value: sorted keys, no spaces, non-ASCII kept as is."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(data: Any) -> bytes:
    """The canonical bytes of a JSON value: ``canonical_text`` in UTF-8."""
    return canonical_text(data).encode()


def digest_of(data: bytes) -> str:
    """``sha256:HEX`` of some bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


_NAME_RULE = "1-64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit."


def _checked(value: str, pattern: re.Pattern[str], what: str, rule: str) -> str:
    if not pattern.fullmatch(value):
        raise UsageError(f"Invalid {what} {value!r}.", rule)
    return value


def check_name(name: str) -> str:
    """Validate a bundle name against the contract."""
    return _checked(name, NAME_RE, "name", "Names are " + _NAME_RULE)


def check_version(version: str) -> str:
    """Validate a version string against the contract."""
    return _checked(version, VERSION_RE, "version", "Versions are 1-64 of A-Z, a-z, 0-9, '.', '_', '+', '-'.")


def check_channel(channel: str) -> str:
    """Validate a channel name (same rules as bundle names)."""
    return _checked(channel, CHANNEL_RE, "channel", "Channels are " + _NAME_RULE)
