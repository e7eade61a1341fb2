"""Review findings in security/: the key ring fails closed, the audit chain keeps its order at midnight."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from pathlib import Path

import pytest

from mlserve.errors import InvalidInputError
from mlserve.security import audit
from mlserve.security.keys import KeyRing, KeyStore


# -- keys: fail closed ------------------------------------------------------------------------------------
def test_deleting_keys_file_fails_closed(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = KeyStore(home)
    record, secret = store.create("ward-7", ["infer"])
    ring = KeyRing(store.path, check_interval=0)
    assert ring.enabled and ring.authenticate(secret) == record
    store.path.unlink()
    with caplog.at_level(logging.WARNING, logger="mlserve.keys"):
        ring.refresh()
    # Still enabled: the auth middleware keeps asking for a key, and none is accepted.
    assert ring.enabled
    assert ring.authenticate(secret) is None
    assert any("every request is refused" in r.getMessage() for r in caplog.records)
    assert secret not in caplog.text and record.sha256 not in caplog.text
    # New keys written after the accident are obeyed.
    again, fresh = store.create("ward-8", ["infer"])
    ring.refresh()
    assert ring.enabled and ring.authenticate(fresh) == again


def test_key_file_emptied_after_keys_refuses_everything(home: Path) -> None:
    store = KeyStore(home)
    _, secret = store.create("a", ["infer"])
    ring = KeyRing(store.path, check_interval=0)
    store.path.write_text('{"keys": []}\n')
    ring.refresh()
    assert ring.enabled and ring.authenticate(secret) is None


def test_corrupt_or_unreadable_key_file_keeps_last_good_keys(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = KeyStore(home)
    record, secret = store.create("a", ["infer"])
    good = store.path.read_bytes()
    ring = KeyRing(store.path, check_interval=0)
    store.path.write_bytes(good[: len(good) // 2])  # a half-written hand edit
    with caplog.at_level(logging.WARNING, logger="mlserve.keys"):
        ring.refresh()
    assert ring.enabled and ring.authenticate(secret) == record
    assert "keeping the last good keys" in caplog.text
    assert record.sha256 not in caplog.text
    store.path.write_bytes(good)
    if os.geteuid() != 0:  # root reads a 0000 file anyway
        store.path.chmod(0)
        ring.refresh()
        assert ring.enabled and ring.authenticate(secret) == record
        store.path.chmod(0o600)
    store.revoke("a")  # a valid file with fewer keys is obeyed: revocation still works
    ring.refresh()
    assert ring.enabled and ring.authenticate(secret) is None


def test_corrupt_key_file_at_start_is_an_error(home: Path) -> None:
    path = home / "keys.json"
    home.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    with pytest.raises(InvalidInputError):
        KeyRing(path)


def test_keyless_ring_enables_when_keys_appear(home: Path) -> None:
    ring = KeyRing(home / "keys.json", check_interval=0)
    assert not ring.enabled  # no key file at start: keyless (loopback only)
    _, secret = KeyStore(home).create("a", ["infer"])
    ring.refresh()
    assert ring.enabled and ring.authenticate(secret) is not None


# -- audit: time under the lock -----------------------------------------------------------------------
BEFORE = "2031-12-31T23:59:59.999999Z"
AFTER = "2032-01-01T00:00:00.000001Z"


def _lock_is_held(directory: Path) -> bool:
    fd = os.open(directory / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing also drops the probe's lock when it got it
    return False


def test_audit_midnight_two_writers_chain_in_order(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writer A reads the clock just before midnight; writer B appends just after it, before A writes."""
    directory = home / "audit"
    first, second = audit.AuditLog(directory), audit.AuditLog(directory)
    monkeypatch.setattr(audit, "utc_now", lambda: "2031-12-31T23:59:58.000000Z")
    first.append({"event": "a"})
    calls: list[str] = []
    others: list[threading.Thread] = []

    def clock() -> str:
        calls.append("tick")
        if len(calls) > 1:
            return AFTER  # B's clock, after midnight
        # A is reading the clock. If A does not hold the lock yet, B can append now (the
        # race); if it does, B waits for it in a thread, as a second process would.
        if _lock_is_held(directory):
            others.append(threading.Thread(target=second.append, args=({"event": "b"},)))
            others[0].start()
        else:
            second.append({"event": "b"})
        return BEFORE

    monkeypatch.setattr(audit, "utc_now", clock)
    first.append({"event": "c"})
    for thread in others:
        thread.join(timeout=10)
        assert not thread.is_alive()
    first.close()
    second.close()
    result = audit.verify(home=home)
    assert result.ok, result
    assert result.records == 3 and len(result.files) == 2


def test_audit_append_is_thread_safe(home: Path) -> None:
    log = audit.AuditLog(home / "audit")
    start = threading.Barrier(8)

    def work(n: int) -> None:
        start.wait()
        for i in range(50):
            log.append({"event": "t", "thread": n, "i": i})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    result = audit.verify(home=home)
    assert result.ok, result
    assert result.records == 400
