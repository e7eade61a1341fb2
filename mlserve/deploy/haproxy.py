"""``mlserve deploy haproxy``: ``haproxy.cfg`` in front of two or more ``mlserve serve`` hosts.

What each part is for:

- Active checks of ``/health/ready``: a loading or draining server answers 503 and leaves
  the pool; a connection error marks it down at once (``observe layer4``).
- ``balance leastconn``: generations are long and uneven, round robin would pile them up.
- Retries only of requests no byte of whose answer has been sent: ``conn-failure`` (never
  reached the server), ``empty-response`` (the server died before answering),
  ``response-timeout`` (a hung server, past mlserve's own deadline) and ``503`` (mlserve
  refused it before any work: overloaded, loading, draining). Inference changes nothing on
  the server, so a replay is harmless; ``option redispatch 1`` sends each retry to another
  server. A stream that has started is never retried: its client has seen tokens.
- Timeouts sized to the request deadline: ``timeout server`` covers a whole non-streamed
  generation; SSE passes through unbuffered (``option http-no-delay``, no compression).
- ``x-request-id`` passes through; when absent it is set to a UUID, which mlserve keeps.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field

from mlserve.deploy.plan import Plan
from mlserve.errors import UsageError

_HOSTPORT = re.compile(r"(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+):(?P<port>[0-9]{1,5})")
_PATHLIKE = re.compile(r"[^\s#'\"\\]+")
# HAProxy's httplog fields, but method and path (%HM %HP) instead of the request line (%r, with the query).
_LOG_FORMAT = "%ci:%cp [%tr] %ft %b/%s %TR/%Tw/%Tc/%Tr/%Ta %ST %B %tsc %ac/%fc/%bc/%sc/%rc %sq/%bq %HM %HP %ID"
# After a drain mlserve's own shutdown may take this long (mlserve/server/run.py).
SERVER_SHUTDOWN_S = 5


@dataclass(frozen=True)
class Options:
    """Settings only the HAProxy target has."""

    backend: tuple[str, ...] = field(
        default=(), metadata={"help": "An mlserve server as HOST:PORT; repeat for each (two or more)."}
    )
    bind: str = field(default="127.0.0.1:8080", metadata={"help": "Address:port HAProxy listens on for clients."})
    frontend_cert: str | None = field(
        default=None, metadata={"help": "PEM (certificate + key) to terminate TLS from clients at HAProxy."}
    )
    backend_ca: str | None = field(
        default=None, metadata={"help": "CA file that verifies the servers' certificates (needed with --tls-cert)."}
    )
    backend_client_cert: str | None = field(
        default=None, metadata={"help": "PEM HAProxy presents to servers (needed with --tls-client-ca)."}
    )
    timeout_server: float | None = field(
        default=None,
        metadata={"help": "Seconds HAProxy waits on a server (default: request timeout + 10); not below it."},
    )
    hard_stop_after: float | None = field(
        default=None,
        metadata={"help": "Seconds an old HAProxy keeps serving after a reload (default: timeout server + 10)."},
    )
    check_interval: float = field(default=1.0, metadata={"help": "Seconds between readiness checks per server."})
    retries: int = field(default=3, metadata={"help": "Attempts after the first for a request not yet answered."})
    bufsize: int = field(
        default=65536, metadata={"help": "tune.bufsize: a request body larger than this is never retried."}
    )
    server_header: bool = field(
        default=False, metadata={"help": "Add x-mlserve-backend naming the server that answered (reveals names)."}
    )
    stats_socket: str = field(
        default="/run/haproxy/admin.sock", metadata={"help": "Admin socket (drain a server by hand); '' for none."}
    )
    chroot: str = field(default="/var/lib/haproxy", metadata={"help": "Directory HAProxy chroots into; '' for none."})
    user: str = field(default="haproxy", metadata={"help": "User (and group) HAProxy drops to; '' to stay."})
    log_target: str = field(default="/dev/log", metadata={"help": "Syslog target of the access log, e.g. stdout."})


@dataclass(frozen=True)
class Server:
    """One backend server line."""

    name: str
    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        """Whether the host is an address (no DNS name to verify a certificate against)."""
        try:
            ipaddress.ip_address(self.host.strip("[]"))
        except ValueError:
            return False
        return True


def servers(opts: Options) -> list[Server]:
    """The backends as named servers (``s1``, ``s2``, ...), refusing malformed or repeated ones."""
    if not opts.backend:
        raise UsageError("Name the mlserve servers: --backend HOST:PORT, once for each (two or more).")
    found: list[Server] = []
    for i, spec in enumerate(opts.backend, 1):
        match = _HOSTPORT.fullmatch(spec)
        if not match or not 0 < int(match["port"]) < 65536:
            raise UsageError(f"Backend {spec!r} is not HOST:PORT.", "Write e.g. --backend 10.0.0.5:8000.")
        found.append(Server(f"s{i}", match["host"], int(match["port"])))
    seen = [(s.host, s.port) for s in found]
    if len(set(seen)) != len(seen):
        raise UsageError("The same backend is named twice.", "Give each server's HOST:PORT once.")
    return found


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _seconds(value: float) -> str:
    return f"{math.ceil(value * 1000)}ms" if value < 10 else f"{math.ceil(value)}s"


def timeout_server(plan: Plan, opts: Options) -> float:
    """``timeout server``: given, else the request deadline plus 10 s."""
    if opts.timeout_server is not None:
        return opts.timeout_server
    if not plan.serve.request_timeout:
        raise UsageError(
            "With no request timeout (--request-timeout 0) HAProxy cannot size its server timeout.",
            "Pass --timeout-server SECONDS, or set a --request-timeout.",
        )
    return plan.serve.request_timeout + 10


def check(plan: Plan, opts: Options) -> None:
    """Refuse settings the load balancer cannot honour (UsageError, exit 2)."""
    s = plan.serve
    t_server = timeout_server(plan, opts)
    if s.request_timeout and t_server < s.request_timeout:
        raise UsageError(
            f"timeout server {t_server:g} s is shorter than the request timeout {s.request_timeout:g} s: "
            "HAProxy would cut generations mlserve is still running.",
            f"Pass --timeout-server {math.ceil(s.request_timeout) + 10} or more, or a shorter --request-timeout.",
        )
    stop = opts.hard_stop_after if opts.hard_stop_after is not None else t_server + 10
    if stop < s.drain_timeout + SERVER_SHUTDOWN_S or (s.request_timeout and stop < s.request_timeout):
        floor = max(s.drain_timeout + SERVER_SHUTDOWN_S, s.request_timeout)
        raise UsageError(
            f"hard-stop-after {stop:g} s is shorter than the drain timeout {s.drain_timeout:g} s or the request "
            f"timeout {s.request_timeout:g} s: a reload would cut streams still finishing.",
            f"Pass --hard-stop-after {math.ceil(floor)} or more.",
        )
    remote = [f"{b.host}:{b.port}" for b in servers(opts) if not _loopback(b.host)]
    if remote and _loopback(s.host):
        raise UsageError(
            f"The servers would bind {s.host}, which HAProxy cannot reach at {remote[0]}.",
            "Pass --host 0.0.0.0 with --tls-cert/--tls-key and --api-keys (or --insecure on a trusted network).",
        )
    if opts.check_interval <= 0 or opts.retries < 0:
        raise UsageError("--check-interval must be positive and --retries zero or more.")
    if opts.bufsize < 16384:
        raise UsageError(f"--bufsize {opts.bufsize} is below HAProxy's default 16384.")
    if s.tls and not opts.backend_ca:
        raise UsageError(
            "The servers speak TLS (--tls-cert) but HAProxy has no CA to verify them.",
            "Pass --backend-ca FILE (the CA that signed the servers' certificates).",
        )
    if not s.tls and (opts.backend_ca or opts.backend_client_cert):
        raise UsageError("--backend-ca and --backend-client-cert need servers that speak TLS (--tls-cert).")
    if s.tls_client_ca and not opts.backend_client_cert:
        raise UsageError(
            "The servers require client certificates (--tls-client-ca) but HAProxy has none to present.",
            "Pass --backend-client-cert PEM (certificate and key signed by that CA).",
        )
    if not _HOSTPORT.fullmatch(opts.bind) and not re.fullmatch(r":[0-9]{1,5}", opts.bind):
        raise UsageError(f"--bind {opts.bind!r} is not ADDRESS:PORT.", "Write e.g. --bind 0.0.0.0:443.")
    for label, value in (
        ("--frontend-cert", opts.frontend_cert),
        ("--backend-ca", opts.backend_ca),
        ("--backend-client-cert", opts.backend_client_cert),
        ("--stats-socket", opts.stats_socket or None),
        ("--chroot", opts.chroot or None),
        ("--log-target", opts.log_target),
        ("--ready-path", s.ready_path),
    ):
        if value is not None and not _PATHLIKE.fullmatch(value):
            raise UsageError(f"{label} {value!r} contains spaces, quotes or '#', which haproxy.cfg cannot hold.")


def _maxconn(plan: Plan) -> int:
    """Requests one server takes before HAProxy queues: its sequences plus its own queue."""
    return sum(m.parallel + plan.serve.max_queue for m in plan.models)


def _global(plan: Plan, opts: Options, t_server: float) -> list[str]:
    stop = opts.hard_stop_after if opts.hard_stop_after is not None else t_server + 10
    lines = ["global", f"    log {opts.log_target} local0"]
    if opts.chroot:
        lines.append(f"    chroot {opts.chroot}")
    if opts.user:
        lines += [f"    user {opts.user}", f"    group {opts.user}"]
    if opts.stats_socket:
        lines.append(f"    stats socket {opts.stats_socket} mode 660 level admin")
    lines += [
        f"    hard-stop-after {_seconds(stop)}",
        "    # Retries need the whole request in one buffer.",
        f"    tune.bufsize {opts.bufsize}",
        "    ssl-default-bind-options ssl-min-ver TLSv1.2",
        "    ssl-default-server-options ssl-min-ver TLSv1.2",
    ]
    return lines


def _defaults(plan: Plan, opts: Options, t_server: float) -> list[str]:
    s = plan.serve
    queue = min(30.0, s.request_timeout) if s.request_timeout else 30.0
    return [
        "defaults",
        "    mode http",
        "    log global",
        f'    log-format "{_LOG_FORMAT}"',
        "    option http-no-delay",
        "    option http-buffer-request",
        "    option abortonclose",
        "    option redispatch 1",
        f"    retries {opts.retries}",
        "    retry-on conn-failure empty-response response-timeout 503",
        "    timeout connect 2s",
        f"    timeout client {_seconds(t_server)}",
        f"    timeout server {_seconds(t_server)}",
        "    timeout http-request 30s",
        "    timeout http-keep-alive 10s",
        f"    timeout queue {_seconds(queue)}",
        f"    timeout check {_seconds(max(2.0, opts.check_interval))}",
        "    timeout client-fin 5s",
        "    timeout server-fin 5s",
    ]


def _frontend(plan: Plan, opts: Options) -> list[str]:
    tls = f" ssl crt {opts.frontend_cert} alpn http/1.1" if opts.frontend_cert else ""
    return [
        "frontend mlserve",
        f"    bind {opts.bind}{tls}",
        "    unique-id-format %[uuid()]",
        "    http-request set-header x-request-id %[unique-id] unless { req.hdr(x-request-id) -m found }",
        f"    default_backend {_backend_name(plan)}",
    ]


def _backend_name(plan: Plan) -> str:
    return f"mlserve_{re.sub(r'[^A-Za-z0-9_]', '_', plan.name)}"


def _server_line(plan: Plan, opts: Options, server: Server) -> str:
    line = f"    server {server.name} {server.host}:{server.port}"
    if plan.serve.tls:
        line += f" ssl verify required ca-file {opts.backend_ca}"
        if not server.is_ip:  # a DNS name is checked against the certificate; an address is not (HAProxy 2.6)
            line += f" sni str({server.host}) verifyhost {server.host}"
        if opts.backend_client_cert:
            line += f" crt {opts.backend_client_cert}"
    return line


def _backend(plan: Plan, opts: Options) -> list[str]:
    s = plan.serve
    inter = opts.check_interval
    lines = [
        f"backend {_backend_name(plan)}",
        "    balance leastconn",
        "    option httpchk",
        f"    http-check send meth GET uri {s.ready_path} ver HTTP/1.1 hdr host mlserve",
        "    http-check expect status 200",
        # One refused connection takes a server out at once; two good checks bring it back.
        f"    default-server check inter {_seconds(inter)} fastinter {_seconds(inter / 2)} fall 2 rise 2 "
        f"observe layer4 error-limit 1 on-error mark-down maxconn {_maxconn(plan)}",
    ]
    if opts.server_header:
        lines.append("    http-response set-header x-mlserve-backend %s")
    return lines + [_server_line(plan, opts, server) for server in servers(opts)]


def render_cfg(plan: Plan, opts: Options) -> str:
    """The ``haproxy.cfg`` text."""
    check(plan, opts)
    t_server = timeout_server(plan, opts)
    refs = ", ".join(f"{m.ref} ({m.digest})" for m in plan.models)
    head = [
        f"# Rendered by `mlserve deploy haproxy` for {refs}.",
        f"# Each server runs (with --port as in its server line): mlserve {' '.join(plan.serve_args())}",
        "# Check: haproxy -c -f haproxy.cfg. Drain a server by hand: echo 'set server "
        f"{_backend_name(plan)}/s1 state drain' | socat stdio {opts.stats_socket or 'ADMIN_SOCKET'}",
    ]
    sections = [
        head,
        _global(plan, opts, t_server),
        _defaults(plan, opts, t_server),
        _frontend(plan, opts),
        _backend(plan, opts),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def render(plan: Plan, opts: Options) -> dict[str, str]:
    """``haproxy.cfg``."""
    return {"haproxy.cfg": render_cfg(plan, opts)}
