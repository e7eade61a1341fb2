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


def check_name(name: str) -> str:
    """Validate a bundle name against the contract."""
    if not NAME_RE.fullmatch(name):
        raise UsageError(
            f"Invalid name {name!r}.",
            "Names are 1-64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit.",
        )
    return name


def check_version(version: str) -> str:
    """Validate a version string against the contract."""
    if not VERSION_RE.fullmatch(version):
        raise UsageError(
            f"Invalid version {version!r}.",
            "Versions are 1-64 of A-Z, a-z, 0-9, '.', '_', '+', '-'.",
        )
    return version


def check_channel(channel: str) -> str:
    """Validate a channel name (same rules as bundle names)."""
    if not CHANNEL_RE.fullmatch(channel):
        raise UsageError(
            f"Invalid channel {channel!r}.",
            "Channels are 1-64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit.",
        )
    return channel
