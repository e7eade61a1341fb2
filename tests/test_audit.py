"""The hash-chained audit log: appends across writers and restarts; verify names the first bad record."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mlserve.security import audit


def _fill(home: Path, n: int = 5) -> Path:
    for i in range(n):
        audit.append({"event": "test", "i": i}, home)
    (path,) = audit.log_files(home / "audit")
    return path


def test_append_chains_and_verifies(cli: Callable[..., Any], home: Path) -> None:
    path = _fill(home)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["prev"] == audit.GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(lines, lines[1:], strict=False))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    ok = cli("audit", "verify", "--json")
    assert ok.exit_code == 0, ok
    assert ok.json()["records"] == 5 and ok.json()["last_hash"] == lines[-1]["hash"]
    assert cli("audit", "verify", path).exit_code == 0


def test_chain_continues_across_writers_restarts_and_days(home: Path) -> None:
    directory = home / "audit"
    first = audit.AuditLog(directory)
    first.append({"event": "a"})
    second = audit.AuditLog(directory)  # a second process on the same home
    second.append({"event": "b"})
    first.append({"event": "c"})  # first notices the file grew and re-reads the tail
    first.close()
    second.close()
    # Yesterday's file holds the records so far; today's continues the chain after a restart.
    (today,) = audit.log_files(directory)
    today.rename(directory / "2000-01-01.jsonl")
    restarted = audit.AuditLog(directory)
    restarted.append({"event": "d"})
    restarted.close()
    result = audit.verify(home=home)
    assert result.ok, result
    assert result.records == 4 and len(result.files) == 2


def _bad(cli: Callable[..., Any], path: Path) -> Any:
    res = cli("audit", "verify", "--json")
    assert res.exit_code == 1, res
    doc = res.json()
    assert doc["ok"] is False and doc["file"] == str(path)
    assert f"{path}:{doc['line']}" in res.stderr
    return doc


def test_one_edited_byte_is_named(cli: Callable[..., Any], home: Path) -> None:
    path = _fill(home)
    data = bytearray(path.read_bytes())
    lines = data.split(b"\n")
    offset = len(lines[0]) + 1 + lines[1].index(b'"i":1') + 4
    data[offset] = ord("7")  # record 2: "i":1 -> "i":7
    path.write_bytes(bytes(data))
    doc = _bad(cli, path)
    assert doc["line"] == 2 and "edited" in doc["reason"]


@pytest.mark.parametrize("where", [0, 2, 4])
def test_any_single_byte_flip_is_caught(home: Path, where: int) -> None:
    path = _fill(home)
    data = bytearray(path.read_bytes())
    start = sum(len(x) + 1 for x in data.split(b"\n")[:where])
    data[start + 3] ^= 0x01
    path.write_bytes(bytes(data))
    result = audit.verify(home=home)
    assert not result.ok and result.line == where + 1


def test_removed_line_is_named(cli: Callable[..., Any], home: Path) -> None:
    path = _fill(home)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2] + lines[3:]))
    doc = _bad(cli, path)
    assert doc["line"] == 3 and "removed" in doc["reason"]


def test_removed_first_line_is_named(cli: Callable[..., Any], home: Path) -> None:
    path = _fill(home)
    path.write_text("".join(path.read_text().splitlines(keepends=True)[1:]))
    doc = _bad(cli, path)
    assert doc["line"] == 1 and "missing" in doc["reason"]


def test_swapped_lines_are_named(cli: Callable[..., Any], home: Path) -> None:
    path = _fill(home)
    lines = path.read_text().splitlines(keepends=True)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_text("".join(lines))
    doc = _bad(cli, path)
    assert doc["line"] == 2 and "reordered" in doc["reason"]


def test_verify_of_missing_file_is_usage_error(cli: Callable[..., Any], tmp_path: Path) -> None:
    assert cli("audit", "verify", tmp_path / "nope.jsonl").exit_code == 2
