"""Channels: promotion, canaries, rollback and the append-only history of who moved what when.

A channel pointer (``channels/NAME/CHANNEL.json``) is the commit point of every move::

    {"version": V, "digest": D,                         stable target
     "previous": {"version", "digest"},                 what ``rollback`` returns to
     "canary": {"version", "digest", "percent"},        optional share of requests for a new version
     "entry": {...}}                                     the history entry of the move that wrote it

Each move takes the store lock, writes the pointer atomically, then appends its entry to
``history/NAME.jsonl``. A crash between the two leaves the entry inside the pointer, and the
next move or read appends it first, so pointer and history never disagree for long.
Rolling back twice returns to where it started, like ``kubectl rollout undo``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlserve import config
from mlserve.bundles.store import Bundle, Store
from mlserve.errors import CheckFailed, ConflictError, InvalidInputError, NotFoundError, UsageError
from mlserve.fsutil import fsync_dir
from mlserve.names import check_channel, check_name
from mlserve.security import audit

log = logging.getLogger("mlserve.channels")
# A gate refuses by raising CheckFailed; what it checked (a dict) goes into the history entry and audit record.
Gate = Callable[[Bundle], "dict[str, Any] | None"]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _target(bundle: Bundle) -> dict[str, str]:
    return {"version": bundle.version, "digest": bundle.digest}


def history_path(store: Store, name: str) -> Path:
    """``$MLSERVE_HOME/history/NAME.jsonl``."""
    return store.root / "history" / f"{check_name(name)}.jsonl"


def _read_history(store: Store, name: str) -> list[dict[str, Any]]:
    path = history_path(store, name)
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):  # a torn last line from a crash mid-append is skipped
            entry = json.loads(line)
            if isinstance(entry, dict):
                entries.append(entry)
    return entries


def _append(store: Store, name: str, entry: dict[str, Any]) -> None:
    path = history_path(store, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not path.exists()
    with open(path, "ab") as fh:
        # A torn line left by a crash would swallow this entry; start on a fresh line.
        if fh.tell() and not _ends_with_newline(path):
            fh.write(b"\n")
        fh.write(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    if fresh:
        fsync_dir(path.parent)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def _repair(store: Store, name: str) -> None:
    """Append entries that pointers committed but a crash kept out of the history (caller holds the lock)."""
    folder = store.channels / name
    if not folder.is_dir():
        return
    pending = []
    for path in sorted(folder.glob("*.json")):
        entry = (store.channel_pointer(name, path.stem) or {}).get("entry")
        if isinstance(entry, dict):
            pending.append(entry)
    if not pending:
        return
    known = {e.get("id") for e in _read_history(store, name)}
    for entry in sorted(pending, key=lambda e: str(e.get("time"))):
        if entry.get("id") not in known:
            _append(store, name, entry)


def _audit(store: Store, entry: dict[str, Any]) -> None:
    """Best effort: also record the move in the hash-chained audit log (``mlserve audit verify``)."""
    try:
        audit.append({**entry, "event": f"channel.{entry['action']}", "actor": entry["user"]}, home=store.root)
    except Exception as exc:  # the channel has moved; a failing audit log must not undo or hide that
        log.warning("could not write the audit record of %s@%s: %s", entry["name"], entry["channel"], exc)


def _commit(store: Store, name: str, channel: str, body: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """Write the pointer (the commit point), then the history line; caller holds the lock."""
    store.write_channel(name, channel, {**body, "entry": entry})
    _append(store, name, entry)
    _audit(store, entry)
    return entry


def _entry(
    name: str,
    channel: str,
    action: str,
    before: dict[str, Any] | None,
    after: dict[str, Any],
    reason: str | None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex,
        "time": _now(),
        "user": config.current_user(),
        "name": name,
        "channel": channel,
        "action": action,
        "from": None if before is None else {"version": before["version"], "digest": before["digest"]},
        "to": {"version": after["version"], "digest": after["digest"]},
        "reason": reason,
        **extra,
    }


def promote(
    store: Store,
    ref: str,
    channel: str,
    reason: str | None = None,
    canary: float | None = None,
    gates: tuple[Gate, ...] = (),
) -> dict[str, Any]:
    """Point ``NAME@CHANNEL`` at REF (or send ``canary`` percent of its requests there); return the history entry.

    Gates run first, outside the lock (loading a model takes a while); a gate refuses by raising.
    """
    check_channel(channel)
    if canary is not None and not 0 < canary < 100:
        raise UsageError(f"--canary {canary:g} is out of range.", "Give a percentage above 0 and below 100.")
    bundle = store.resolve(ref)
    checks: dict[str, Any] = {}
    for gate in gates:
        try:
            checks.update(gate(bundle) or {})
        except CheckFailed as exc:
            _audit_refusal(store, bundle, channel, reason, exc, checks)
            raise
    extra = {"gates": checks} if checks else {}
    with store.lock():
        _repair(store, bundle.name)
        if store.get(bundle.name, bundle.version) is None:
            raise NotFoundError(f"{bundle.ref} was removed while its checks ran.", "Pack or pull it again.")
        old = store.channel_pointer(bundle.name, channel)
        if canary is not None:
            return _promote_canary(store, bundle, channel, old, canary, reason, extra)
        body: dict[str, Any] = _target(bundle)
        moved = old is not None and old["version"] != bundle.version
        previous = _target_of(old) if moved else (old or {}).get("previous")
        if previous:
            body["previous"] = previous
        was_canary = isinstance((old or {}).get("canary"), dict) and old["canary"]["version"] == bundle.version  # type: ignore[index]
        action = "promote-canary" if was_canary else "promote"
        entry = _entry(bundle.name, channel, action, old, body, reason, **extra)
        return _commit(store, bundle.name, channel, body, entry)


def _audit_refusal(
    store: Store, bundle: Bundle, channel: str, reason: str | None, exc: CheckFailed, checks: dict[str, Any]
) -> None:
    """Record a promotion a gate refused (the channel did not move) in the audit log, best effort."""
    record = getattr(exc, "record", None)  # what the refusing gate checked, when it says
    entry = {
        "event": "channel.promote-refused",
        "actor": config.current_user(),
        "name": bundle.name,
        "channel": channel,
        "to": _target(bundle),
        "reason": reason,
        "refusal": exc.message,
        "gates": {**checks, **(record if isinstance(record, dict) else {})},
    }
    try:
        audit.append(entry, home=store.root)
    except Exception as err:  # the refusal stands whatever the audit log does
        log.warning("could not write the audit record of a refused promotion of %s: %s", bundle.ref, err)


def _target_of(pointer: dict[str, Any] | None) -> dict[str, str] | None:
    return None if pointer is None else {"version": pointer["version"], "digest": pointer["digest"]}


def _promote_canary(
    store: Store,
    bundle: Bundle,
    channel: str,
    old: dict[str, Any] | None,
    percent: float,
    reason: str | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    if old is None:
        raise UsageError(
            f"Channel {bundle.name}@{channel} has no version yet, so there is nothing to compare a canary with.",
            f"Promote a stable version first: mlserve promote {bundle.ref} --to {channel}.",
        )
    if old["version"] == bundle.version:
        raise UsageError(f"{bundle.ref} is already the stable target of {bundle.name}@{channel}.")
    body = {k: v for k, v in old.items() if k in ("version", "digest", "previous")}
    body["canary"] = {**_target(bundle), "percent": int(percent) if float(percent).is_integer() else percent}
    before = old.get("canary") or old
    percent_ = body["canary"]["percent"]
    entry = _entry(bundle.name, channel, "canary", before, _target(bundle), reason, percent=percent_, **extra)
    return _commit(store, bundle.name, channel, body, entry)


def rollback(store: Store, name: str, channel: str, reason: str | None = None) -> dict[str, Any]:
    """Drop a channel's canary, or else point it back at its previous target; return the history entry."""
    check_name(name)
    check_channel(channel)
    with store.lock():
        _repair(store, name)
        old = store.channel_pointer(name, channel)
        if old is None:
            raise NotFoundError(
                f"Channel {name}@{channel} does not exist.", "See `mlserve history` and `mlserve list`."
            )
        canary = old.get("canary")
        if isinstance(canary, dict):
            body = {k: v for k, v in old.items() if k in ("version", "digest", "previous")}
            entry = _entry(name, channel, "rollback-canary", canary, body, reason)
            return _commit(store, name, channel, body, entry)
        previous = old.get("previous")
        if not isinstance(previous, dict):
            raise ConflictError(
                f"Channel {name}@{channel} has no previous version to roll back to.",
                f"Promote a version explicitly: mlserve promote {name}:VERSION --to {channel}.",
            )
        bundle = store.get(name, str(previous["version"]))
        if bundle is None or bundle.digest != previous["digest"]:
            raise NotFoundError(
                f"The previous version {name}:{previous['version']} is no longer stored as it was.",
                f"Re-import it, or promote another version: mlserve promote {name}:VERSION --to {channel}.",
            )
        body = {**_target(bundle), "previous": _target_of(old)}
        entry = _entry(name, channel, "rollback", old, body, reason)
        return _commit(store, name, channel, body, entry)


def history(store: Store, name: str, channel: str | None = None) -> list[dict[str, Any]]:
    """Every recorded move of NAME's channels, oldest first."""
    check_name(name)
    if channel is not None:
        check_channel(channel)
    if (store.channels / name).is_dir():
        with store.lock():
            _repair(store, name)
    entries = _read_history(store, name)
    return [e for e in entries if channel is None or e.get("channel") == channel]


def release(store: Store, bundle: Bundle, channel: str) -> None:
    """Stop a channel using a version being removed: drop it as canary, else delete the pointer (caller holds lock)."""
    pointer = store.channel_pointer(bundle.name, channel)
    if pointer is None:
        return
    canary = pointer.get("canary")
    if pointer["version"] != bundle.version and isinstance(canary, dict) and canary["version"] == bundle.version:
        store.write_channel(bundle.name, channel, {k: v for k, v in pointer.items() if k != "canary"})
        return
    store.channel_path(bundle.name, channel).unlink(missing_ok=True)


# -- the benchmark gate ----------------------------------------------------------------------
def bench_misses(report: dict[str, Any], slo: dict[str, float]) -> list[str]:
    """Why a bench report (``{"results": [...]}``) misses the SLO: failed requests or a p99 above a bound."""
    results = report.get("results") if isinstance(report, dict) else None
    if not isinstance(results, list) or not results:
        raise InvalidInputError("The bench file has no results.", "Write one with `mlserve bench ... --output FILE`.")
    misses = []
    for i, level in enumerate(results):
        where = f"result {i + 1}"
        if not isinstance(level, dict):
            raise InvalidInputError(f"Bench {where} is not an object.")
        if level.get("max_concurrency") is not None:
            where += f" (concurrency {level['max_concurrency']})"
        failed = level.get("failed", 0)
        if not isinstance(failed, (int, float)) or failed > 0:
            misses.append(f"{where}: {failed} request(s) failed")
        for metric, bound in slo.items():
            value = level.get(f"p99_{metric}")
            if not isinstance(value, (int, float)):
                raise InvalidInputError(f"Bench {where} has no p99_{metric}.", "Re-run `mlserve bench` to write it.")
            if value > bound:
                misses.append(f"{where}: p99 {metric} {value:g} ms > {bound:g} ms")
    return misses


def bench_gate(path: Path, slo: dict[str, float]) -> Gate:
    """A gate that refuses promotion unless the bench report in ``path`` measured this bundle and meets the SLO."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFoundError(f"Bench file {path} does not exist.") from None
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"Bench file {path} is not readable JSON: {exc}.") from None
    misses = bench_misses(report, slo)

    def gate(bundle: Bundle) -> None:
        bench_is_for(report, bundle, path)
        if misses:
            raise CheckFailed(
                f"Not promoting {bundle.ref}: the benchmark misses its SLO ({'; '.join(misses)}).",
                "Improve the model or its serving settings, re-run `mlserve bench`, then promote again.",
            )

    return gate


def bench_is_for(report: dict[str, Any], bundle: Bundle, path: Path) -> None:
    """Refuse a bench report that did not measure ``bundle``: its ``env.bundle_digest`` (and model) must match."""
    env = report.get("env")
    digest = env.get("bundle_digest") if isinstance(env, dict) else None
    rerun = f"Bench this version (`mlserve bench {bundle.ref} --output FILE.json`) and pass that file."
    if not isinstance(digest, str) or not digest:
        raise CheckFailed(
            f"Not promoting {bundle.ref}: bench file {path} does not say which bundle it measured "
            "(it has no env.bundle_digest).",
            rerun,
        )
    if digest.lower().removeprefix("sha256:") != bundle.digest.removeprefix("sha256:"):
        raise CheckFailed(
            f"Not promoting {bundle.ref} ({bundle.digest[:19]}): bench file {path} measured another bundle "
            f"({digest[:19]}).",
            rerun,
        )
    model = report.get("model")
    if isinstance(model, str) and not model.startswith("sha256:"):
        # The server's model id: NAME, NAME:VERSION or NAME@CHANNEL.
        name, _, version = model.partition("@")[0].partition(":")
        if name != bundle.name or version not in ("", bundle.version):
            raise CheckFailed(
                f"Not promoting {bundle.ref}: bench file {path} measured model {model!r}, not {bundle.ref}.",
                rerun,
            )


def verify_gate(store: Store) -> Gate:
    """A gate that refuses a bundle whose blobs are missing or altered."""

    def gate(bundle: Bundle) -> None:
        problems = store.verify(bundle)
        if problems:
            raise CheckFailed(
                f"Not promoting {bundle.ref}: {'; '.join(problems)}.", "Re-pull or re-import it, then promote again."
            )

    return gate
