"""``mlserve deploy systemd``: a hardened unit (and its sysusers.d entry) for one on-prem server.

The unit runs ``mlserve serve`` as a dedicated user that can write only the store, in a
sandbox a hospital security review asks for (``systemd-analyze security`` scores it 1.x,
"OK"). Memory is capped from the bundle's estimate; a stop waits out the drain; reload
sends SIGHUP, which makes a server that follows a channel look at it again.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from mlserve.deploy.plan import Plan
from mlserve.errors import UsageError

# After the drain, uvicorn's own graceful shutdown may take this long (mlserve/server/run.py).
SERVER_SHUTDOWN_S = 5
MIB = 1 << 20
_PLAIN = re.compile(r"[A-Za-z0-9_@+=:,./-]+")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,30}")
# Every NVIDIA device group in /proc/devices (nvidia, nvidia-uvm, nvidia-caps, ...); other GPUs differ.
_GPU_DEVICES = "char-nvidia* rw"


@dataclass(frozen=True)
class Options:
    """Settings only the systemd target has."""

    user: str = field(default="mlserve", metadata={"help": "Dedicated user (and group) the server runs as."})
    unit_name: str | None = field(
        default=None, metadata={"help": "Unit file name without .service (default: mlserve-NAME)."}
    )
    memory_max_mb: int | None = field(
        default=None,
        metadata={"help": "MemoryMax in MiB (default: the estimate plus 25%); below the estimate is refused."},
    )
    stop_timeout: float | None = field(
        default=None,
        metadata={"help": "TimeoutStopSec in seconds (default: drain timeout + 15); must cover the drain."},
    )
    allow_from: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Accept connections only from these addresses/CIDRs (IPAddressAllow=); repeatable."},
    )


def _quote(arg: str) -> str:
    """One ExecStart argument: systemd expands % and $, so both are doubled; quoted when not plain."""
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if _PLAIN.fullmatch(arg):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mib(n: int) -> str:
    return f"{n / MIB:,.0f} MiB"


def unit_name(plan: Plan, opts: Options) -> str:
    """The unit's file name: ``mlserve-NAME.service`` unless given."""
    return f"{opts.unit_name or 'mlserve-' + plan.name}.service"


def check(plan: Plan, opts: Options) -> None:
    """Refuse settings the unit cannot honour (UsageError, exit 2)."""
    s = plan.serve
    if not _USER.fullmatch(opts.user) or opts.user == "root":
        raise UsageError(f"User {opts.user!r} is not a dedicated system user name.", "Use e.g. --user mlserve.")
    if not s.exec_path.startswith("/"):
        raise UsageError(
            f"ExecStart needs an absolute path; got {s.exec_path!r}.", "Pass --exec-path /path/to/mlserve."
        )
    if not s.home.startswith("/") or s.home.rstrip("/") in ("", "/usr", "/etc", "/var"):
        raise UsageError(f"--home {s.home!r} must be an absolute directory of its own, e.g. /var/lib/mlserve.")
    if s.home == "/root" or s.home.startswith(("/home/", "/root/", "/run/user/")) or s.home == "/home":
        raise UsageError(
            f"The store {s.home} is under a home directory, which ProtectHome= hides from the service.",
            "Put the store elsewhere, e.g. --home /var/lib/mlserve.",
        )
    stop = _stop_timeout(plan, opts)
    need = s.drain_timeout + SERVER_SHUTDOWN_S
    if stop < need:
        raise UsageError(
            f"TimeoutStopSec {stop:g} s is shorter than the drain timeout {s.drain_timeout:g} s plus the server's "
            f"{SERVER_SHUTDOWN_S} s shutdown: systemd would kill requests still draining.",
            f"Pass --stop-timeout {math.ceil(need)} or more, or a shorter --drain-timeout.",
        )
    if opts.memory_max_mb is not None and opts.memory_max_mb * MIB < plan.memory_bytes:
        raise UsageError(
            f"MemoryMax {opts.memory_max_mb} MiB is below the estimated peak of {_mib(plan.memory_bytes)}: "
            "the kernel would kill the server under load.",
            "Raise --memory-max-mb, or lower --ctx-size or --parallel.",
        )


def _stop_timeout(plan: Plan, opts: Options) -> float:
    return opts.stop_timeout if opts.stop_timeout is not None else plan.serve.drain_timeout + SERVER_SHUTDOWN_S + 10


def memory_max(plan: Plan, opts: Options) -> int:
    """MemoryMax in bytes: given, or the estimate plus 25% rounded up to a MiB."""
    if opts.memory_max_mb is not None:
        return opts.memory_max_mb * MIB
    return math.ceil(plan.memory_bytes * 1.25 / MIB) * MIB


def _estimate_comment(plan: Plan, limit: int) -> list[str]:
    lines = ["# Memory estimate (upper bound; MemoryMax is the estimate plus 25% unless --memory-max-mb):"]
    for m in plan.models:
        kv = (
            f"KV cache {_mib(m.kv_bytes)} ({m.ctx_size} ctx x {m.parallel} parallel x {m.kv.bytes_per_cell} B/cell)"
            if m.kv
            else "KV cache unknown (the GGUF does not say)"
        )
        twice = ", x2 while a new channel version warms beside the old" if m.follows else ""
        lines.append(f"#   {m.ref} ({m.digest}): model {_mib(m.model_bytes)} + {kv}{twice}")
    lines.append(f"#   + runtime; total {_mib(plan.memory_bytes)}; MemoryMax {_mib(limit)}")
    return lines


def _sandbox(plan: Plan, opts: Options) -> list[str]:
    """The hardening block: each line removes something the server never needs."""
    gpu = plan.gpu
    lines = [
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "ProtectProc=invisible",
        "ProcSubset=pid",
        "PrivateMounts=yes",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "RemoveIPC=yes",
        "KeyringMode=private",
        # AF_UNIX: glibc's name service and journald's stdout socket; AF_INET*: serving.
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged @resources @mount @debug @cpu-emulation @obsolete @raw-io @reboot @swap",
        "SystemCallErrorNumber=EPERM",
        "UMask=0077",
        # Prompts are PHI: no core dumps and no swap of the server's memory.
        "LimitCORE=0",
        "MemorySwapMax=0",
    ]
    if gpu:
        # CUDA needs the NVIDIA device nodes and JIT-compiles kernels into W+X memory.
        lines += ["PrivateDevices=no", "DevicePolicy=closed", f"DeviceAllow={_GPU_DEVICES}"]
    else:
        # llama.cpp's CPU kernels are compiled ahead of time: no W+X pages (tests check serve under MDWE).
        lines += ["PrivateDevices=yes", "PrivateUsers=yes", "MemoryDenyWriteExecute=yes"]
    if opts.allow_from:
        lines += ["IPAddressDeny=any", "IPAddressAllow=localhost " + " ".join(opts.allow_from)]
    return lines


def _store_access(home: str) -> list[str]:
    """Write access to the store only: StateDirectory= when under /var/lib (systemd creates it 0700)."""
    home = home.rstrip("/")
    if home.startswith("/var/lib/"):
        return [f"StateDirectory={home.removeprefix('/var/lib/')}", "StateDirectoryMode=0700", f"ReadWritePaths={home}"]
    return [f"ReadWritePaths={home}"]


def render_unit(plan: Plan, opts: Options) -> str:
    """The ``.service`` file text."""
    check(plan, opts)
    s = plan.serve
    limit = memory_max(plan, opts)
    command = " ".join(_quote(a) for a in [s.exec_path, *plan.serve_args()])
    refs = ", ".join(m.ref for m in plan.models)
    lines = [
        f"# Rendered by `mlserve deploy systemd` for {refs}.",
        f"# Install: cp {unit_name(plan, opts)} /etc/systemd/system/; cp sysusers.d/{opts.user}.conf /etc/sysusers.d/;",
        f"#   systemd-sysusers; systemctl daemon-reload; systemctl enable --now {unit_name(plan, opts)}",
        "# The store must hold the bundles: MLSERVE_HOME=" + s.home + " mlserve import FILE.tar (as the user).",
        *_estimate_comment(plan, limit),
        "",
        "[Unit]",
        f"Description=mlserve model server ({refs})",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=exec",
        f"User={opts.user}",
        f"Group={opts.user}",
        f"Environment=MLSERVE_HOME={s.home}",
        # A server never downloads: bundles arrive by import or pull, never at start.
        "Environment=HF_HUB_OFFLINE=1",
        f"ExecStart={command}",
        # SIGHUP: a server that follows NAME@CHANNEL re-reads the channel now.
        "ExecReload=/bin/kill -HUP $MAINPID",
        # SIGTERM drains: readiness turns 503, in-flight requests finish, then exit 0.
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        f"TimeoutStopSec={math.ceil(_stop_timeout(plan, opts))}",
        "Restart=on-failure",
        "RestartSec=2",
        f"MemoryMax={limit // MIB}M",
        *_store_access(s.home),
        *_sandbox(plan, opts),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def render_sysusers(plan: Plan, opts: Options) -> str:
    """The sysusers.d entry that creates the dedicated user with the store as its home."""
    return (
        f"# Rendered by `mlserve deploy systemd`: the user {opts.user} owns only {plan.serve.home}.\n"
        f'u {opts.user} - "mlserve model server" {plan.serve.home} /usr/sbin/nologin\n'
    )


def render(plan: Plan, opts: Options) -> dict[str, str]:
    """The unit and its sysusers.d entry, by relative path."""
    return {unit_name(plan, opts): render_unit(plan, opts), f"sysusers.d/{opts.user}.conf": render_sysusers(plan, opts)}
