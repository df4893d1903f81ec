"""Transport security of every pdserve gRPC server and channel: TLS, mutual TLS, the cluster token.

One frozen :class:`SecurityConfig` per process, from flags (:func:`add_security_args`, the same
on every entry point), environment variables, or a cluster config's ``security:`` section. The
process installs it once (:func:`install`); servers (:func:`bind`, used by
:func:`pdserve.grpc_server.start_server` and the KV store) and internal channels
(:func:`internal_channel`) read it from there (:func:`current`), or take one explicitly.

The rules
---------
* **TLS.** ``--tls on`` serves every port with ``--tls-cert``/``--tls-key`` and verifies peers
  against ``--tls-ca``; ``--tls auto`` (default) is ``on`` when a certificate is given; without
  one it is *undecided*: a server refuses to start and an internal channel refuses to open
  (:class:`SecurityConfigError` saying how to fix it: ``pdserve certs``, or ``--tls off`` on
  loopback), never a silent fallback to plaintext. ``--tls off`` is plaintext.
* **Plaintext only on loopback, and only when asked for.** Plaintext takes an explicit
  ``--tls off`` (``PDSERVE_TLS=off``), and a server without TLS binds only a loopback address
  (127.0.0.0/8, ::1, ``localhost``): that is the local development mode (``pdserve serve --tls
  off``, the launcher's ``ClusterSpec(tls=False)``, tests: ``tests/conftest.py`` sets
  ``PDSERVE_TLS=off``). Asked to bind any other address (``0.0.0.0``, a node IP) without TLS it
  refuses to start with :class:`SecurityConfigError`, whose message says how to fix it. There is
  no override.
* **Internal services** (:data:`INTERNAL_SERVICES`: the router's ``Registry`` and ``Admin``,
  ``Worker``, ``WorkerAdmin``, ``KVPeer``, ``KVStore``) accept only cluster identities:

  - a peer whose client certificate the cluster CA signed: internal-only servers (workers, store
    nodes) require one at the TLS handshake when TLS and ``--mtls on`` (default) are set, so an
    unauthenticated peer never gets a connection;
  - or the cluster token in metadata ``x-pdserve-cluster-token`` (compared in constant time).

  The router serves the client API ``Generate`` (open to clients without certificates) and the
  internal ``Registry`` on one port, so it cannot require client certificates: its ``Registry``
  needs the token. A server with TLS on whose internal services would have neither (no token,
  and no required client certificates) refuses to start. On loopback plaintext without a token
  (development) internal services are open; with a token configured they require it.
  Refused calls end with ``UNAUTHENTICATED``. Health checking and reflection stay open.
* **Channels.** :func:`internal_channel` opens a TLS channel (CA roots, this process's
  certificate as the mTLS client certificate) when TLS is on, and adds the token to every call
  when one is configured. Internal channels verify that the peer's certificate names
  ``--tls-server-name`` (default :data:`CLUSTER_SERVER_NAME`, which
  ``pdserve certs`` puts in every cluster certificate) instead of the address it was dialled at:
  the cluster CA is private to the cluster, so one certificate serves every node whatever its IP.
  ``--tls-server-name ""`` verifies the dialled host name instead (your own PKI).
* **Client API.** Not internal: served over TLS when TLS is on; the SDK connects with
  ``Client(address, tls=True, ca=...)`` and needs no token.
* **Metrics.** ``--metrics-token-file``: the ``/metrics`` endpoint answers 401 unless the request
  carries ``Authorization: Bearer <token>`` (:mod:`pdserve.metrics`).

Environment (flags win): ``PDSERVE_TLS`` (auto|on|off), ``PDSERVE_TLS_CA``,
``PDSERVE_TLS_CERT``, ``PDSERVE_TLS_KEY``, ``PDSERVE_MTLS`` (on|off),
``PDSERVE_TLS_SERVER_NAME``, ``PDSERVE_CLUSTER_TOKEN_FILE`` or ``PDSERVE_CLUSTER_TOKEN`` (the
token itself), ``PDSERVE_METRICS_TOKEN_FILE`` or ``PDSERVE_METRICS_TOKEN``.
"""

from __future__ import annotations

import argparse
import enum
import hmac
import ipaddress
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from pdserve.errors import InvalidRequestError
from pdserve.tracing import with_metadata

CLUSTER_SERVER_NAME = "pdserve-internal"  # the SAN `pdserve certs` puts in every cluster certificate
TOKEN_METADATA_KEY = "x-pdserve-cluster-token"
INTERNAL_SERVICES = frozenset(
    {
        "pdserve.v1.Registry",
        "pdserve.v1.Worker",
        "pdserve.v1.KVPeer",
        "pdserve.v1.KVStore",
        "pdserve.v1.Admin",
        "pdserve.v1.WorkerAdmin",
    }
)

ENV_TLS = "PDSERVE_TLS"
ENV_CA = "PDSERVE_TLS_CA"
ENV_CERT = "PDSERVE_TLS_CERT"
ENV_KEY = "PDSERVE_TLS_KEY"
ENV_MTLS = "PDSERVE_MTLS"
ENV_SERVER_NAME = "PDSERVE_TLS_SERVER_NAME"
ENV_TOKEN = "PDSERVE_CLUSTER_TOKEN"
ENV_TOKEN_FILE = "PDSERVE_CLUSTER_TOKEN_FILE"
ENV_METRICS_TOKEN = "PDSERVE_METRICS_TOKEN"
ENV_METRICS_TOKEN_FILE = "PDSERVE_METRICS_TOKEN_FILE"


class SecurityConfigError(InvalidRequestError):
    """The security settings cannot be honoured (missing file, plaintext off loopback...); the
    message names the flag to set."""


class TLSMode(enum.Enum):
    AUTO = "auto"  # on when a certificate is given; without one: undecided (refused where used)
    ON = "on"
    OFF = "off"


class AuthOutcome(enum.Enum):
    ALLOW = "allow"
    MISSING_TOKEN = "missing_token"
    WRONG_TOKEN = "wrong_token"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``; IPv6 in brackets or not) is loopback only."""
    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def split_host_port(address: str) -> tuple[str, str]:
    """``host:port`` -> (host, port); IPv6 hosts may be bracketed."""
    host, sep, port = address.rpartition(":")
    if not sep:
        raise SecurityConfigError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]"), port


def _read(path: str, what: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SecurityConfigError(
            f"cannot read the {what} {path!r} ({flag}): {e.strerror}; make one with `pdserve certs --out DIR`"
        ) from None


def read_token(path: str, flag: str) -> str:
    """The token in file ``path`` (surrounding whitespace stripped; an empty file is an error)."""
    tok = _read(path, "token file", flag).decode().strip()
    if not tok:
        raise SecurityConfigError(f"the token file {path!r} ({flag}) is empty")
    return tok


@dataclass(frozen=True)
class SecurityConfig:
    """How this process secures its gRPC servers and channels (see module docstring).

    Paths are read at construction (a missing or unreadable file is a :class:`SecurityConfigError`
    at once, naming its flag); tokens are kept out of ``repr``."""

    tls: TLSMode = TLSMode.AUTO
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    mtls: bool = True  # internal-only servers require a CA-signed client certificate (TLS on)
    server_name: str = CLUSTER_SERVER_NAME  # the name internal channels verify ("": the dialled host)
    cluster_token_file: str = ""
    cluster_token: str = field(default="", repr=False)
    metrics_token_file: str = ""
    metrics_token: str = field(default="", repr=False)
    _pem: dict[str, bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pem", {})
        if not isinstance(self.tls, TLSMode):
            try:
                object.__setattr__(self, "tls", TLSMode(str(self.tls).lower()))
            except ValueError:
                raise SecurityConfigError(
                    f"--tls must be one of {[m.value for m in TLSMode]}, got {self.tls!r}"
                ) from None
        if self.cluster_token_file and not self.cluster_token:
            object.__setattr__(
                self, "cluster_token", read_token(self.cluster_token_file, "--cluster-token-file")
            )
        if self.metrics_token_file and not self.metrics_token:
            object.__setattr__(
                self, "metrics_token", read_token(self.metrics_token_file, "--metrics-token-file")
            )
        given = {"--tls-ca": self.ca_file, "--tls-cert": self.cert_file, "--tls-key": self.key_file}
        if self.tls is TLSMode.OFF:
            if any(given.values()):
                raise SecurityConfigError(
                    f"--tls off but {', '.join(k for k, v in given.items() if v)} given: drop them, "
                    "or use --tls on"
                )
            return
        if self.tls is TLSMode.AUTO and not (self.cert_file or self.key_file):
            if self.ca_file:
                raise SecurityConfigError("--tls-ca given without --tls-cert/--tls-key: give all three")
            return
        missing = [k for k, v in given.items() if not v]
        if missing:
            raise SecurityConfigError(
                f"TLS needs {', '.join(missing)} (make them with `pdserve certs --out DIR`: "
                "--tls-ca DIR/ca.pem --tls-cert DIR/server.pem --tls-key DIR/server.key)"
            )
        self._pem["ca"] = _read(self.ca_file, "CA certificate", "--tls-ca")
        self._pem["cert"] = _read(self.cert_file, "certificate", "--tls-cert")
        self._pem["key"] = _read(self.key_file, "private key", "--tls-key")

    # ------------------------------------------------------------------ derived
    @property
    def tls_on(self) -> bool:
        return bool(self._pem)

    @property
    def undecided(self) -> bool:
        """``--tls auto`` without certificates: neither TLS (nothing to serve it with) nor
        plaintext (never chosen silently); servers and internal channels refuse it."""
        return self.tls is TLSMode.AUTO and not self.tls_on

    def check_decided(self, what: str) -> None:
        """:class:`SecurityConfigError` when :attr:`undecided`, naming ``what`` needs the choice
        and both ways out."""
        if self.undecided:
            raise SecurityConfigError(
                f"{what}: no TLS certificate and plaintext was not asked for (--tls auto, env "
                f"{ENV_TLS} unset). Make certificates with `pdserve certs --out DIR` and pass --tls on "
                "--tls-ca DIR/ca.pem --tls-cert DIR/server.pem --tls-key DIR/server.key "
                "--cluster-token-file DIR/cluster-token (or the PDSERVE_TLS_* variables), or, for "
                f"local development on a loopback address only, pass --tls off ({ENV_TLS}=off)"
            )

    def describe(self) -> str:
        """A one-line summary without secrets (for logs)."""
        parts = [f"tls={'on' if self.tls_on else 'off'}"]
        if self.tls_on:
            parts += [f"mtls={'on' if self.mtls else 'off'}", f"server_name={self.server_name or '<host>'}"]
        parts.append(f"cluster_token={'set' if self.cluster_token else 'none'}")
        parts.append(f"metrics_token={'set' if self.metrics_token else 'none'}")
        return " ".join(parts)

    # ------------------------------------------------------------------ server side
    def require_client_certs(self, internal_only: bool) -> bool:
        """Whether a server requires CA-signed client certificates at the handshake: TLS on,
        ``mtls``, and every service it serves is internal."""
        return self.tls_on and self.mtls and internal_only

    def server_credentials(self, internal_only: bool) -> grpc.ServerCredentials:
        """TLS credentials of a server (TLS must be on)."""
        if not self.tls_on:
            raise SecurityConfigError("server_credentials() needs TLS on")
        require = self.require_client_certs(internal_only)
        return grpc.ssl_server_credentials(
            [(self._pem["key"], self._pem["cert"])],
            root_certificates=self._pem["ca"] if require else None,
            require_client_auth=require,
        )

    def auth_policy(self, internal_only: bool, has_internal: bool) -> ServerAuthPolicy:
        """The call-level policy of a server's internal services; :class:`SecurityConfigError` when
        TLS is on and they would accept anyone (no token, no required client certificates)."""
        verified = self.require_client_certs(internal_only)
        if has_internal and self.tls_on and not verified and not self.cluster_token:
            why = (
                "it also serves the client API, so it cannot require client certificates"
                if not internal_only
                else "--mtls is off"
            )
            raise SecurityConfigError(
                f"internal services would accept any caller: {why}; give the cluster a token "
                f"(--cluster-token-file FILE or {ENV_TOKEN}; `pdserve certs` writes one)"
            )
        return ServerAuthPolicy(token=self.cluster_token, peers_verified=verified)

    def check_bind(self, host: str) -> None:
        """Refuse (:class:`SecurityConfigError`) a server whose transport is :attr:`undecided`,
        and a plaintext server on a non-loopback address."""
        self.check_decided(f"refusing to serve gRPC on {host!r}")
        if self.tls_on or is_loopback(host):
            return
        raise SecurityConfigError(
            f"refusing to serve plaintext gRPC on {host!r}: only loopback addresses may run without "
            "TLS. Make certificates with `pdserve certs --out DIR` and pass --tls on --tls-ca "
            "DIR/ca.pem --tls-cert DIR/server.pem --tls-key DIR/server.key --cluster-token-file "
            "DIR/cluster-token (or the PDSERVE_TLS_* variables), or bind 127.0.0.1 for local use"
        )

    # ------------------------------------------------------------------ client side
    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials of an internal channel: the cluster CA, and this process's certificate
        as the client certificate (mutual TLS)."""
        if not self.tls_on:
            raise SecurityConfigError("channel_credentials() needs TLS on")
        return grpc.ssl_channel_credentials(
            root_certificates=self._pem["ca"],
            private_key=self._pem["key"],
            certificate_chain=self._pem["cert"],
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        """Channel options besides :func:`pdserve.limits.grpc_options`: keepalive
        (:data:`pdserve.keepalive.KEEPALIVE`) and the verified name."""
        from pdserve.keepalive import KEEPALIVE

        opts: list[tuple[str, Any]] = [*KEEPALIVE.channel_options()]
        if self.tls_on and self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return opts

    # ------------------------------------------------------------------ conversions
    def to_args(self) -> list[str]:
        """The flags that give a child process this configuration, the TLS choice always
        explicit (tokens travel as files or through the inherited environment, never on a
        command line). :class:`SecurityConfigError` when :attr:`undecided`."""
        self.check_decided("cannot pass the TLS setting on to a child process")
        out = ["--tls", "on" if self.tls_on else "off"]
        if self.tls_on:
            out += ["--tls-ca", self.ca_file, "--tls-cert", self.cert_file, "--tls-key", self.key_file]
            out += ["--mtls", "on" if self.mtls else "off", "--tls-server-name", self.server_name]
        if self.cluster_token_file:
            out += ["--cluster-token-file", self.cluster_token_file]
        if self.metrics_token_file:
            out += ["--metrics-token-file", self.metrics_token_file]
        return out

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SecurityConfig:
        """From ``PDSERVE_*`` variables only (see module docstring)."""
        e = os.environ if env is None else env
        return cls(
            tls=TLSMode(_mode(e.get(ENV_TLS, "auto"), ENV_TLS, TLSMode)),
            ca_file=e.get(ENV_CA, ""),
            cert_file=e.get(ENV_CERT, ""),
            key_file=e.get(ENV_KEY, ""),
            mtls=_on_off(e.get(ENV_MTLS, "on"), ENV_MTLS),
            server_name=e.get(ENV_SERVER_NAME, CLUSTER_SERVER_NAME),
            cluster_token_file=e.get(ENV_TOKEN_FILE, ""),
            cluster_token="" if e.get(ENV_TOKEN_FILE) else e.get(ENV_TOKEN, "").strip(),
            metrics_token_file=e.get(ENV_METRICS_TOKEN_FILE, ""),
            metrics_token="" if e.get(ENV_METRICS_TOKEN_FILE) else e.get(ENV_METRICS_TOKEN, "").strip(),
        )

    @classmethod
    def from_args(cls, a: argparse.Namespace, env: Mapping[str, str] | None = None) -> SecurityConfig:
        """From the flags of :func:`add_security_args` (their defaults come from the environment;
        a token given only as ``PDSERVE_CLUSTER_TOKEN``/``PDSERVE_METRICS_TOKEN`` is read here)."""
        e = os.environ if env is None else env
        return cls(
            tls=a.tls,
            ca_file=a.tls_ca,
            cert_file=a.tls_cert,
            key_file=a.tls_key,
            mtls=_on_off(a.mtls, "--mtls"),
            server_name=a.tls_server_name,
            cluster_token_file=a.cluster_token_file,
            cluster_token="" if a.cluster_token_file else e.get(ENV_TOKEN, "").strip(),
            metrics_token_file=a.metrics_token_file,
            metrics_token="" if a.metrics_token_file else e.get(ENV_METRICS_TOKEN, "").strip(),
        )


def _on_off(v: str | bool, where: str) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("on", "true", "1", "yes"):
        return True
    if s in ("off", "false", "0", "no"):
        return False
    raise SecurityConfigError(f"{where} must be on or off, got {v!r}")


def _mode(v: str, where: str, enum_cls: type[enum.Enum]) -> str:
    s = v.strip().lower()
    if s not in {m.value for m in enum_cls}:
        raise SecurityConfigError(f"{where} must be one of {[m.value for m in enum_cls]}, got {v!r}")
    return s


TLS_FILE_FLAGS = ("ca", "cert", "key", "server-name")  # --[prefix]tls-<name>


def _add_tls_file_args(
    g: Any, dest: str, defaults: Mapping[str, Any], helps: Mapping[str, str], flag_prefix: str = ""
) -> None:
    """The ``--{flag_prefix}tls-{ca,cert,key,server-name}`` flags (dest ``{dest}_{name}``) of a
    server (:func:`add_security_args`) or a client (:func:`add_client_tls_args`): the same
    flags, with their own defaults and help texts."""
    for name in TLS_FILE_FLAGS:
        g.add_argument(
            f"--{flag_prefix}tls-{name}",
            dest=f"{dest}_{name.replace('-', '_')}",
            default=defaults[name],
            metavar="NAME" if name == "server-name" else "PEM",
            help=f"{helps[name]} (default: %(default)r)",
        )


_SECURITY_GROUP = "security (TLS, mutual TLS, cluster token; see pdserve/security.py)"


def given_security_flags(p: argparse.ArgumentParser, a: argparse.Namespace) -> list[str]:
    """The flags :func:`add_security_args` added to ``p`` that ``a`` gives a value other than
    their default (a default may come from the environment: only the command line counts)."""
    group = next(g for g in p._action_groups if g.title == _SECURITY_GROUP)
    return [
        act.option_strings[0]
        for act in group._group_actions
        if getattr(a, act.dest) != p.get_default(act.dest)
    ]


def add_security_args(p: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    """The security flags every pdserve process takes (defaults from the environment)."""
    e = os.environ if env is None else env
    g = p.add_argument_group(_SECURITY_GROUP)
    g.add_argument(
        "--tls",
        default=e.get(ENV_TLS, TLSMode.AUTO.value),
        choices=[m.value for m in TLSMode],
        help="TLS on every gRPC port: on; auto = on when --tls-cert is given, refused without one; "
        f"off = plaintext, allowed on loopback addresses only (env {ENV_TLS}) (default: %(default)s)",
    )
    _add_tls_file_args(
        g,
        dest="tls",
        defaults={
            "ca": e.get(ENV_CA, ""),
            "cert": e.get(ENV_CERT, ""),
            "key": e.get(ENV_KEY, ""),
            "server-name": e.get(ENV_SERVER_NAME, CLUSTER_SERVER_NAME),
        },
        helps={
            "ca": f"cluster CA certificate: verifies peers (env {ENV_CA})",
            "cert": "this process's certificate, served and presented to peers for mutual TLS "
            f"(`pdserve certs` writes server.pem) (env {ENV_CERT})",
            "key": f"private key of --tls-cert (env {ENV_KEY})",
            "server-name": "name internal channels verify in the peer's certificate; '' verifies the "
            f"dialled host (env {ENV_SERVER_NAME})",
        },
    )
    g.add_argument(
        "--mtls",
        default=e.get(ENV_MTLS, "on"),
        choices=["on", "off"],
        help="with TLS, workers and store nodes require a client certificate signed by --tls-ca "
        f"(env {ENV_MTLS}) (default: %(default)s)",
    )
    g.add_argument(
        "--cluster-token-file",
        default=e.get(ENV_TOKEN_FILE, ""),
        metavar="FILE",
        help="file holding the cluster token internal services require (metadata "
        f"{TOKEN_METADATA_KEY}) and internal channels send; or env {ENV_TOKEN} "
        f"(env {ENV_TOKEN_FILE}) (default: %(default)r)",
    )
    g.add_argument(
        "--metrics-token-file",
        default=e.get(ENV_METRICS_TOKEN_FILE, ""),
        metavar="FILE",
        help="file holding the bearer token /metrics requires; or env "
        f"{ENV_METRICS_TOKEN} (env {ENV_METRICS_TOKEN_FILE}) (default: %(default)r: no token)",
    )


def install_from_args(
    parser: argparse.ArgumentParser,
    a: argparse.Namespace,
    bind_host: str | None = None,
    services: Iterable[str] = (),
) -> SecurityConfig:
    """Build the configuration of :func:`add_security_args`'s flags, check that ``bind_host`` may
    be served with it (and a server of ``services``, full proto names, protected: see
    :func:`server_security`), and :func:`install` it; a bad setting exits through
    ``parser.error`` with the message saying how to fix it (before the process loads anything
    heavy)."""
    try:
        cfg = SecurityConfig.from_args(a)
        if bind_host is not None:
            cfg.check_bind(bind_host)
        names = set(services)
        if names:
            server_security(names, cfg)
    except SecurityConfigError as e:
        parser.error(str(e))
    return install(cfg)


def add_process_security_args(p: argparse.ArgumentParser, *, redis: bool = False) -> None:
    """The security flags of a pdserve process: :func:`add_security_args`, and with ``redis``
    (a process that opens a Redis: the KV index, a redis:// key store) the Redis access flags
    (:func:`pdserve.redis_access.add_redis_args`)."""
    add_security_args(p)
    if redis:
        from pdserve.redis_access import add_redis_args

        add_redis_args(p)


def install_process_security(
    parser: argparse.ArgumentParser,
    a: argparse.Namespace,
    bind_host: str | None,
    services: Iterable[str],
    *,
    redis: bool = False,
) -> SecurityConfig:
    """The one start-up step of every pdserve process's security (flags of
    :func:`add_process_security_args`): the TLS / cluster-token configuration checked for
    ``bind_host`` and ``services`` and installed (:func:`install_from_args`), and with ``redis``
    the Redis access installed (:func:`pdserve.redis_access.install_from_args`). A setting that
    cannot be honoured exits through ``parser.error`` with the fix, before anything heavy loads."""
    cfg = install_from_args(parser, a, bind_host, services)
    if redis:
        from pdserve.redis_access import install_from_args as install_redis

        install_redis(parser, a)
    return cfg


# ---------------------------------------------------------------------------- process default
_lock = threading.Lock()
_current: SecurityConfig | None = None


def install(config: SecurityConfig) -> SecurityConfig:
    """Make ``config`` this process's security configuration (read by :func:`current`)."""
    global _current
    with _lock:
        _current = config
    return config


def current() -> SecurityConfig:
    """This process's configuration: the installed one, else built from the environment once."""
    global _current
    with _lock:
        if _current is None:
            _current = SecurityConfig.from_env()
        return _current


def reset() -> None:
    """Forget the installed configuration (tests)."""
    global _current
    with _lock:
        _current = None


# ---------------------------------------------------------------------------- server side
@dataclass(frozen=True)
class ServerAuthPolicy:
    """Pure: who may call a server's internal services. ``peers_verified``: the handshake already
    required a client certificate signed by the cluster CA, so every caller is a cluster member.
    Otherwise the cluster ``token`` must be presented; without one (loopback development only,
    enforced by :meth:`SecurityConfig.auth_policy`) everyone is allowed."""

    token: str = field(default="", repr=False)
    peers_verified: bool = False

    def check(self, presented: str | None) -> AuthOutcome:
        if self.peers_verified or not self.token:
            return AuthOutcome.ALLOW
        if not presented:
            return AuthOutcome.MISSING_TOKEN
        if hmac.compare_digest(presented.encode(), self.token.encode()):
            return AuthOutcome.ALLOW
        return AuthOutcome.WRONG_TOKEN

    @property
    def open(self) -> bool:
        return self.peers_verified or not self.token


def _presented_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for k, v in metadata or ():
        if k == TOKEN_METADATA_KEY:
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


_MESSAGES = {
    AuthOutcome.MISSING_TOKEN: (
        f"{{service}} is an internal pdserve service: present a client certificate signed by the "
        f"cluster CA or the cluster token (metadata {TOKEN_METADATA_KEY}; --cluster-token-file)"
    ),
    AuthOutcome.WRONG_TOKEN: (
        f"{{service}}: the cluster token (metadata {TOKEN_METADATA_KEY}) does not match this cluster's"
    ),
}


def _denied(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that ends every call with UNAUTHENTICATED."""

    def deny(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    des = handler.request_deserializer
    ser = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, des, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, des, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, des, ser)
    return grpc.unary_unary_rpc_method_handler(deny, des, ser)


class ClusterAuthInterceptor(grpc.ServerInterceptor):
    """Applies a :class:`ServerAuthPolicy` to the calls of :data:`INTERNAL_SERVICES` (others pass)."""

    def __init__(self, policy: ServerAuthPolicy, internal: frozenset[str] = INTERNAL_SERVICES) -> None:
        self.policy = policy
        self.internal = internal

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        service = handler_call_details.method.lstrip("/").split("/", 1)[0]
        if service not in self.internal or self.policy.open:
            return continuation(handler_call_details)
        outcome = self.policy.check(_presented_token(handler_call_details.invocation_metadata))
        handler = continuation(handler_call_details)
        if outcome is AuthOutcome.ALLOW or handler is None:
            return handler
        return _denied(handler, _MESSAGES[outcome].format(service=service))


@dataclass(frozen=True)
class ServerSecurity:
    """What :func:`server_security` decided for one server."""

    interceptors: tuple[grpc.ServerInterceptor, ...]
    internal_only: bool
    config: SecurityConfig


def server_security(service_names: Iterable[str], config: SecurityConfig | None = None) -> ServerSecurity:
    """The interceptors of a server serving ``service_names`` (full proto names; health and
    reflection need not be listed) under ``config`` (default: :func:`current`).
    :class:`SecurityConfigError` when its internal services could not be protected."""
    cfg = config if config is not None else current()
    names = set(service_names)
    internal = names & INTERNAL_SERVICES
    internal_only = bool(names) and names <= INTERNAL_SERVICES
    policy = cfg.auth_policy(internal_only, bool(internal))
    inter: tuple[grpc.ServerInterceptor, ...] = () if policy.open else (ClusterAuthInterceptor(policy),)
    return ServerSecurity(inter, internal_only, cfg)


def bind(server: grpc.Server, host: str, port: int, sec: ServerSecurity) -> int:
    """Add ``host:port`` to ``server``: TLS when on, plaintext only on loopback (else
    :class:`SecurityConfigError`). Returns the bound port (OSError when it could not bind)."""
    sec.config.check_bind(host)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if sec.config.tls_on:
        bound = server.add_secure_port(target, sec.config.server_credentials(sec.internal_only))
    else:
        bound = server.add_insecure_port(target)
    if bound == 0:
        raise OSError(f"could not bind {target}")
    return bound


def tls_mode_from_env(env: Mapping[str, str] | None = None) -> TLSMode:
    """``PDSERVE_TLS`` (auto|on|off; unset: auto) as a :class:`TLSMode`."""
    e = os.environ if env is None else env
    return TLSMode(_mode(e.get(ENV_TLS, TLSMode.AUTO.value), ENV_TLS, TLSMode))


def http_serves_tls(mode: TLSMode, cert: str | None, key: str | None, host: str, what: str) -> bool:
    """Pure: whether an HTTP server (``what``, e.g. "the OpenAI HTTP server") on ``host`` serves
    HTTPS, by the rules of the gRPC ports (module docstring): ``on`` needs ``cert`` and ``key``;
    ``auto`` is on when they are given and *undecided* otherwise (refused: never a silent
    fallback to plain HTTP); ``off`` is plain HTTP, on a loopback ``host`` only, without
    certificates. Raises :class:`SecurityConfigError` naming the flags that fix it."""
    if bool(cert) != bool(key):
        raise SecurityConfigError(f"{what}: HTTPS needs both --tls-cert and --tls-key (or neither)")
    if mode is TLSMode.OFF:
        if cert:
            raise SecurityConfigError(
                f"{what}: --tls off but --tls-cert/--tls-key given: drop them, or use --tls on"
            )
        if not is_loopback(host):
            raise SecurityConfigError(
                f"{what} would listen on {host!r} in plain HTTP: API keys and prompts would cross "
                "the network in clear text, and plain HTTP (--tls off) is for loopback addresses only. "
                "Give --tls-cert/--tls-key (e.g. `pdserve certs --out DIR`: DIR/server.pem, "
                "DIR/server.key) or listen on 127.0.0.1"
            )
        return False
    if cert:
        return True
    if mode is TLSMode.ON:
        raise SecurityConfigError(
            f"{what}: --tls on needs --tls-cert and --tls-key (make them with `pdserve certs --out DIR`)"
        )
    if not is_loopback(host):
        raise SecurityConfigError(
            f"{what} would listen on {host!r} in plain HTTP: API keys and prompts would cross the "
            "network in clear text. Give --tls-cert/--tls-key (e.g. `pdserve certs --out DIR`: "
            "DIR/server.pem, DIR/server.key) or listen on 127.0.0.1"
        )
    raise SecurityConfigError(
        f"{what}: no TLS certificate and plain HTTP was not asked for (--tls auto, env {ENV_TLS} "
        "unset). Give --tls-cert/--tls-key (e.g. `pdserve certs --out DIR`: DIR/server.pem, "
        f"DIR/server.key; env {ENV_CERT}/{ENV_KEY}), or, on a loopback address only, ask for plain "
        f"HTTP with --tls off ({ENV_TLS}=off)"
    )


def bearer_ok(authorization: str, token: str) -> bool:
    """Pure: whether an HTTP ``Authorization`` header value carries ``Bearer <token>`` (constant
    time). An empty ``token`` accepts nothing."""
    scheme, _, presented = authorization.strip().partition(" ")
    if not token or scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), token.encode())


# ---------------------------------------------------------------------------- client side
class TokenClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``x-pdserve-cluster-token: <token>`` to every call of a channel."""

    def __init__(self, token: str) -> None:
        self._md = (TOKEN_METADATA_KEY, token)

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return with_metadata(d, self._md)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def internal_channel(
    address: str, config: SecurityConfig | None = None, options: list[tuple[str, Any]] | None = None
) -> grpc.Channel:
    """A channel from one pdserve component to another's internal service at ``address``:
    TLS + client certificate when TLS is on, the cluster token on every call when one is set.
    ``options``: channel options (default :func:`pdserve.limits.grpc_options`)."""
    from pdserve.limits import grpc_options

    cfg = config if config is not None else current()
    cfg.check_decided(f"refusing to open an internal channel to {address}")
    opts = [*(grpc_options() if options is None else options), *cfg.channel_options()]
    if cfg.tls_on:
        ch = grpc.secure_channel(address, cfg.channel_credentials(), options=opts)
    else:
        ch = grpc.insecure_channel(address, options=opts)
    if cfg.cluster_token:
        ch = grpc.intercept_channel(ch, TokenClientInterceptor(cfg.cluster_token))
    return ch


def client_credentials(
    ca: str | bytes | None = None, cert: str | bytes | None = None, key: str | bytes | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials of an SDK channel: ``ca`` (path or PEM bytes; None: the system roots) and an
    optional client certificate ``cert``/``key`` (both or neither)."""
    if (cert is None) != (key is None):
        raise SecurityConfigError("a client certificate needs both cert and key")

    def pem(v: str | bytes | None, what: str) -> bytes | None:
        if v is None or isinstance(v, bytes):
            return v
        return _read(v, what, what)

    return grpc.ssl_channel_credentials(
        root_certificates=pem(ca, "ca"), private_key=pem(key, "key"), certificate_chain=pem(cert, "cert")
    )


def sdk_channel(
    address: str,
    *,
    tls: bool | None = None,
    ca: str | bytes | None = None,
    cert: str | bytes | None = None,
    key: str | bytes | None = None,
    server_name: str | None = None,
    aio: bool = False,
    options: list[tuple[str, Any]] | None = None,
) -> Any:
    """The channel of the client SDK (sync, or ``grpc.aio`` with ``aio``) to a router's client
    API. ``tls`` None: on when ``ca`` is given. With TLS: ``ca`` verifies the router (None: the
    system roots), ``cert``/``key`` an optional client certificate, ``server_name`` the name to
    verify instead of ``address``'s host. Without TLS: plaintext (a router serves plaintext only
    on loopback, see module docstring)."""
    from pdserve.keepalive import KEEPALIVE
    from pdserve.limits import grpc_options

    on = (ca is not None) if tls is None else tls
    # a restarted router is tried again within about a second (gRPC's backoff grows to 120 s)
    opts = [*(grpc_options() if options is None else options), *KEEPALIVE.reconnect_options()]
    mod: Any = grpc.aio if aio else grpc
    if not on:
        if ca is not None or cert is not None or key is not None or server_name is not None:
            raise SecurityConfigError(
                "tls=False but ca/cert/key/server_name given: drop them or pass tls=True"
            )
        return mod.insecure_channel(address, options=opts)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return mod.secure_channel(address, client_credentials(ca, cert, key), options=opts)


def add_client_tls_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The flags of a client of the router's client API (``pdserve generate``, the OpenAI
    server's channel to the router): ``--{prefix}tls-ca`` etc.; read back with
    :func:`client_tls_kwargs`."""
    g = p.add_argument_group(f"TLS to the router{' (' + prefix.rstrip('-') + ')' if prefix else ''}")
    g.add_argument(
        f"--{prefix}tls",
        dest=f"{prefix.replace('-', '_')}client_tls",
        action="store_true",
        help=f"connect with TLS even without --{prefix}tls-ca (system roots) (default: %(default)s)",
    )
    _add_tls_file_args(
        g,
        dest=f"{prefix.replace('-', '_')}client_tls",
        defaults=dict.fromkeys(TLS_FILE_FLAGS),
        helps={
            "ca": "CA that signed the router's certificate (`pdserve certs`: ca.pem); turns TLS on "
            "(none: plaintext)",
            "cert": "client certificate, if the router asks for one",
            "key": "private key of the client certificate",
            "server-name": "name to verify in the router's certificate instead of the address's host",
        },
        flag_prefix=prefix,
    )


def client_tls_kwargs(a: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The TLS keywords of :class:`pdserve.client.Client` from :func:`add_client_tls_args` flags."""
    k = prefix.replace("-", "_") + "client_tls"
    ca = getattr(a, f"{k}_ca")
    return {
        "tls": True if getattr(a, k) else None,
        "ca": ca,
        "cert": getattr(a, f"{k}_cert"),
        "key": getattr(a, f"{k}_key"),
        "server_name": getattr(a, f"{k}_server_name"),
    }
