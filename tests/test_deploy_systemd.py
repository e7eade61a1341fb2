"""``mlserve deploy systemd``: the plan's estimate, a unit systemd accepts and scores "OK", refusals,
and the real server running inside the unit's sandbox (syscall filter, W^X, /proc subset)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlserve.bundles.store import Store
from mlserve.deploy.memory import RUNTIME_BYTES, KVShape, kv_shape
from mlserve.deploy.plan import ServeSettings, build_plan
from tests.support.servers import REPO

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (Debian: apt-get install systemd)"
)
MLSERVE = str(Path(sys.executable).with_name("mlserve"))


@pytest.fixture
def tiny_home(cli: Callable[..., Any], tiny_gguf: Path, home: Path) -> Path:
    """A store holding the tiny GGUF as tiny:1."""
    assert cli("pack", tiny_gguf, "--name", "tiny").exit_code == 0
    return home


def _render(cli: Callable[..., Any], out: Path, *args: str) -> Path:
    res = cli("deploy", "systemd", "tiny", "--exec-path", MLSERVE, "-o", out, *args)
    assert res.exit_code == 0, res
    return out / "mlserve-tiny.service"


def _directives(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_kv_shape_and_estimate_follow_the_gguf(tiny_home: Path, tiny_gguf: Path) -> None:
    # The tiny llama: 2 layers, 4 heads over 64 dims (head 16), 2 KV heads -> 32 K and 32 V elements per layer.
    assert kv_shape(tiny_gguf) == KVShape(n_layer=2, n_embd_k_gqa=32, n_embd_v_gqa=32)
    plan = build_plan(Store(), ["tiny"], ServeSettings(ctx_size=256, parallel=4))
    (m,) = plan.models
    assert m.ref == "tiny:1" and m.follows is None  # a bare NAME is pinned to the version it resolves to
    assert m.kv_bytes == 256 * 4 * 2 * (32 + 32) * 2
    assert plan.memory_bytes == tiny_gguf.stat().st_size + m.kv_bytes + RUNTIME_BYTES


def test_following_a_channel_budgets_two_versions(cli: Callable[..., Any], tiny_home: Path) -> None:
    assert cli("promote", "tiny:1", "--to", "production").exit_code == 0
    pinned = build_plan(Store(), ["tiny:1"], ServeSettings())
    follows = build_plan(Store(), ["tiny@production"], ServeSettings())
    assert follows.models[0].follows == "production" and follows.models[0].ref == "tiny@production"
    assert follows.models[0].memory_bytes == 2 * pinned.models[0].memory_bytes


def test_unit_carries_the_hardening_and_the_plan(cli: Callable[..., Any], tiny_home: Path, tmp_path: Path) -> None:
    unit = _render(cli, tmp_path, "--drain-timeout", "40", "--parallel", "4")
    d = _directives(unit)
    for key, value in {
        "User": "mlserve",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "MemoryDenyWriteExecute": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
        "Restart": "on-failure",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "ReadWritePaths": "/var/lib/mlserve",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }.items():
        assert d[key] == [value], key
    assert int(d["TimeoutStopSec"][0]) >= 40 + 5
    assert d["SystemCallFilter"][0] == "@system-service"
    exec_start = d["ExecStart"][0].split()
    assert exec_start[:3] == [MLSERVE, "serve", "tiny:1"]
    assert exec_start[exec_start.index("--drain-timeout") + 1] == "40"
    assert exec_start[exec_start.index("--parallel") + 1] == "4"
    plan = build_plan(Store(), ["tiny"], ServeSettings(parallel=4))
    assert int(d["MemoryMax"][0].removesuffix("M")) << 20 >= plan.memory_bytes
    assert (tmp_path / "sysusers.d" / "mlserve.conf").read_text().splitlines()[-1].startswith("u mlserve - ")


def test_json_names_the_plan_and_the_files(cli: Callable[..., Any], tiny_home: Path) -> None:
    res = cli("deploy", "systemd", "tiny", "--json")
    assert res.exit_code == 0, res
    doc = json.loads(res.stdout)
    assert doc["target"] == "systemd" and doc["written"] == []
    (model,) = doc["plan"]["models"]
    assert model["digest"].startswith("sha256:") and model["kv"] == {
        "n_layer": 2,
        "n_embd_k_gqa": 32,
        "n_embd_v_gqa": 32,
    }
    assert set(doc["files"]) == {"mlserve-tiny.service", "sysusers.d/mlserve.conf"}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--drain-timeout", "60", "--stop-timeout", "30"), "TimeoutStopSec 30 s is shorter than the drain timeout"),
        (("--memory-max-mb", "1"), "below the estimated peak"),
        (("--home", "/home/alice/mlserve"), "ProtectHome"),
        (("--user", "root"), "not a dedicated system user"),
        (("--exec-path", "mlserve"), "absolute path"),
        (("--ready-path", "/healthz"), "not served by mlserve"),
        (("--host", "0.0.0.0"), "refuses to start without TLS and API keys"),
    ],
)
def test_inconsistent_settings_are_refused(
    cli: Callable[..., Any], tiny_home: Path, args: tuple[str, ...], needle: str
) -> None:
    res = cli("deploy", "systemd", "tiny", *args)
    assert res.exit_code == 2, res
    assert needle in res.stderr and res.stdout == ""


def test_unknown_ref_exits_2(cli: Callable[..., Any], home: Path) -> None:
    res = cli("deploy", "systemd", "nope")
    assert res.exit_code == 2 and "nope" in res.stderr


@needs_analyze
def test_systemd_analyze_verify_accepts_the_unit(cli: Callable[..., Any], tiny_home: Path, tmp_path: Path) -> None:
    unit = _render(cli, tmp_path)
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "mlserve-tiny.service" not in done.stderr, done.stderr  # any complaint names the unit
    broken = tmp_path / "broken" / "mlserve-tiny.service"
    broken.parent.mkdir()
    broken.write_text(unit.read_text().replace(f"ExecStart={MLSERVE}", "ExecStart=/nonexistent/mlserve"))
    done = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True)
    assert done.returncode != 0, "verify accepts a missing executable: this check proves nothing"


@needs_analyze
def test_exposure_score_is_ok(cli: Callable[..., Any], tiny_home: Path, tmp_path: Path) -> None:
    unit = _render(cli, tmp_path)
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True, cwd=tmp_path
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", done.stdout)
    assert match, done.stdout + done.stderr
    print(f"\nsystemd-analyze security --offline=yes: {match[1]} {match[2]}")
    assert float(match[1]) <= 2.0 and match[2] == "OK"


def _syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current = ""
    for line in out.splitlines():
        if line.startswith("@"):
            current = line.strip()
            groups[current] = []
        elif line.startswith("    ") and not line.strip().startswith("#") and current:
            groups[current].append(line.strip())
    return groups


def _expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    found: set[str] = set()
    for name in names:
        found |= _expand(groups[name], groups) if name.startswith("@") else {name}
    return found


def allowed_syscalls(unit: Path) -> set[str]:
    """The syscalls the unit's SystemCallFilter= lines leave allowed (allow list minus ~ lines)."""
    groups = _syscall_groups()
    allowed: set[str] = set()
    for value in _directives(unit)["SystemCallFilter"]:
        if value.startswith("~"):
            allowed -= _expand(value[1:].split(), groups)
        else:
            allowed |= _expand(value.split(), groups)
    return allowed


# Applies the unit's syscall filter (EPERM for the rest, as SystemCallErrorNumber=EPERM), no_new_privs
# and the kernel's MDWE (what MemoryDenyWriteExecute= enforces with seccomp), then execs the server.
SANDBOX = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN (Linux 6.3+)
    sys.exit(77)
sc = ctypes.CDLL("libseccomp.so.2")
sc.seccomp_init.restype = ctypes.c_void_p
sc.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
ctx = sc.seccomp_init(0x00050000 | 1)  # SCMP_ACT_ERRNO(EPERM)
for name in open(sys.argv[1]).read().split():
    nr = sc.seccomp_syscall_resolve_name(name.encode())
    if nr >= 0:
        assert sc.seccomp_rule_add(ctx, 0x7FFF0000, nr, 0) == 0, name  # SCMP_ACT_ALLOW
assert sc.seccomp_load(ctypes.c_void_p(ctx)) == 0
os.execv(sys.argv[2], sys.argv[2:])
"""


def _can_sandbox() -> str | None:
    if shutil.which("systemd-analyze") is None or shutil.which("unshare") is None:
        return "needs systemd-analyze and unshare"
    if os.geteuid() != 0:
        return "needs root to mount a private /proc (ProcSubset=pid)"
    try:
        import ctypes

        ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return "needs libseccomp2"
    probe = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "mount",
        "-t",
        "proc",
        "-o",
        "subset=pid",
        "proc",
        "/proc",
    ]
    if subprocess.run(probe, capture_output=True).returncode != 0:
        return "cannot mount a private /proc here (a container without CAP_SYS_ADMIN?)"
    return None


def test_server_runs_inside_the_units_sandbox(cli: Callable[..., Any], tiny_home: Path, tmp_path: Path) -> None:
    """The unit's syscall filter, W^X memory and /proc subset do not stop llama.cpp or the server."""
    if reason := _can_sandbox():
        pytest.skip(reason)
    unit = _render(cli, tmp_path)
    allowed = tmp_path / "allowed.txt"
    allowed.write_text("\n".join(sorted(allowed_syscalls(unit))))
    launcher = tmp_path / "sandbox.py"
    launcher.write_text(SANDBOX)
    serve = [sys.executable, "-m", "mlserve", "serve", "tiny", "--port", "0", "--ctx-size", "256", "--parallel", "2"]
    inner = f"mount -t proc -o subset=pid,hidepid=invisible proc /proc && exec {sys.executable} {launcher} {allowed} "
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner + " ".join(serve)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        for line in proc.stdout:
            lines.append(line)
            if match := re.search(r"listening on http://127.0.0.1:(\d+)", line):
                url = f"http://127.0.0.1:{match[1]}"
                break
        else:
            if proc.wait() == 77:
                pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
            raise AssertionError("server did not start in the sandbox:\n" + "".join(lines))
        with httpx.Client(timeout=30) as client:
            for _ in range(200):
                if client.get(url + "/health/ready").status_code == 200:
                    break
                proc.poll()
                assert proc.returncode is None, "".join(lines)
                time.sleep(0.1)
            body = {"model": "tiny", "prompt": "the patient", "max_tokens": 8}
            resp = client.post(url + "/v1/completions", json=body)
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(30)


def test_public_tls_server_and_quoting(cli: Callable[..., Any], tiny_home: Path, tmp_path: Path) -> None:
    """TLS and keys reach ExecStart; % and $ (systemd specifiers and variables) are escaped, spaces quoted."""
    tls = ("--tls-cert", "/etc/mlserve/my cert.pem", "--tls-key", "/etc/mlserve/100%.key")
    unit = _render(cli, tmp_path, "--host", "0.0.0.0", *tls, "--api-keys")
    exec_start = _directives(unit)["ExecStart"][0]
    assert "--host 0.0.0.0 " in exec_start
    assert '--tls-cert "/etc/mlserve/my cert.pem" --tls-key "/etc/mlserve/100%%.key"' in exec_start
    if shutil.which("systemd-analyze"):
        done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr


def test_allow_from_limits_peers(cli: Callable[..., Any], tiny_home: Path, tmp_path: Path) -> None:
    unit = _render(
        cli, tmp_path, "--host", "0.0.0.0", "--insecure", "--allow-from", "10.0.0.5", "--allow-from", "10.0.1.0/24"
    )
    d = _directives(unit)
    assert d["IPAddressDeny"] == ["any"] and d["IPAddressAllow"] == ["localhost 10.0.0.5 10.0.1.0/24"]
    assert "IPAddressDeny" not in _directives(_render(cli, tmp_path / "open"))
