"""A development certificate authority for a pdserve cluster (``pdserve certs``).

:func:`write_dev_pki` writes into one folder:

* ``ca.pem`` / ``ca.key``: a self-signed CA (keep ``ca.key`` off the cluster nodes);
* ``server.pem`` / ``server.key``: the certificate every pdserve process serves with and presents
  as a client to the others (mutual TLS). Usable for both server and client authentication; its
  subject alternative names are ``localhost``, ``127.0.0.1``, ``::1``, the cluster name
  :data:`pdserve.security.CLUSTER_SERVER_NAME` (which internal channels verify, so one certificate
  serves every node of a cluster whatever its address) and every ``hosts`` entry;
* ``client.pem`` / ``client.key``: a client-only certificate for tools and SDK users that must
  pass an mTLS-only internal service (anything this CA signs is a cluster identity: hand it out
  accordingly);
* ``cluster-token``: a random cluster token (``--cluster-token-file``);
* ``metrics-token``: a random bearer token for the ``/metrics`` endpoints (``--metrics-token-file``).

Keys are ECDSA P-256, written with mode 0600. The CA is for development and private clusters;
bring your own PKI for anything else (the same file flags take its files). Certificate making is
pure (:func:`make_ca`, :func:`issue` return objects; only :func:`write_dev_pki` touches disk).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pdserve.errors import InvalidRequestError
from pdserve.security import CLUSTER_SERVER_NAME

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

# ``cryptography`` is imported where certificates are made, so that ``pdserve`` (whose parser
# registers ``pdserve certs``) starts without it

DEFAULT_DAYS = 365
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@dataclass(frozen=True)
class PkiPaths:
    """The files :func:`write_dev_pki` wrote."""

    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    cluster_token: Path
    metrics_token: Path


def _name(cn: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pdserve"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _validity(
    not_before: dt.datetime | None, days: int, not_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    start = not_before or (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
    end = not_after or (start + dt.timedelta(days=days))
    if end <= start:
        raise InvalidRequestError(f"certificate validity ends ({end}) before it starts ({start})")
    return start, end


def make_ca(
    common_name: str = "pdserve dev CA",
    *,
    days: int = DEFAULT_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    """A self-signed CA certificate (basic constraints CA, path length 0) and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(not_before, days, not_after)
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    from cryptography import x509

    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for h in hosts:
        h = h.strip()
        if not h or h in seen:
            continue
        seen.add(h)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(out)


def issue(
    ca: Issued,
    common_name: str,
    hosts: Iterable[str] = (),
    *,
    server: bool = True,
    client: bool = True,
    days: int = DEFAULT_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    """A leaf certificate signed by ``ca``: subject alternative names ``hosts`` (IP addresses and
    DNS names), extended key usage serverAuth (``server``) and/or clientAuth (``client``).
    ``not_before``/``not_after`` override the validity (tests make expired certificates)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    if not (server or client):
        raise InvalidRequestError("a certificate needs server or client authentication (or both)")
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(not_before, days, not_after)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    names = list(hosts)
    if names:
        b = b.add_extension(_san(names), critical=False)
    return Issued(b.sign(ca.key, hashes.SHA256()), key)


def server_hosts(hosts: Iterable[str] = ()) -> list[str]:
    """The SANs of a cluster certificate: loopback names, the cluster name, then ``hosts``."""
    return [*LOOPBACK_NAMES, CLUSTER_SERVER_NAME, *hosts]


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if private:
        os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT


def write_dev_pki(
    out_dir: str | Path, hosts: Iterable[str] = (), *, days: int = DEFAULT_DAYS, force: bool = False
) -> PkiPaths:
    """Make a dev CA, a cluster (server + client) certificate, a client certificate and two
    random tokens in ``out_dir`` (created; mode 0700). Refuses to overwrite existing files unless
    ``force`` (InvalidRequestError naming them)."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    paths = PkiPaths(
        ca=d / "ca.pem",
        ca_key=d / "ca.key",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        cluster_token=d / "cluster-token",
        metrics_token=d / "metrics-token",
    )
    existing = [str(p) for p in vars(paths).values() if p.exists()]
    if existing and not force:
        raise InvalidRequestError(f"{', '.join(existing)} already exist(s): pass --force to overwrite")
    if days < 1:
        raise InvalidRequestError(f"--days must be >= 1, got {days}")
    ca = make_ca(days=days)
    srv = issue(ca, "pdserve", server_hosts(hosts), days=days)
    cli = issue(ca, "pdserve-client", (), server=False, client=True, days=days)
    _write(paths.ca, ca.cert_pem(), False)
    _write(paths.ca_key, ca.key_pem(), True)
    _write(paths.server_cert, srv.cert_pem(), False)
    _write(paths.server_key, srv.key_pem(), True)
    _write(paths.client_cert, cli.cert_pem(), False)
    _write(paths.client_key, cli.key_pem(), True)
    _write(paths.cluster_token, (secrets.token_hex(32) + "\n").encode(), True)
    _write(paths.metrics_token, (secrets.token_hex(32) + "\n").encode(), True)
    return paths


# ---------------------------------------------------------------------------- CLI
def register(sub) -> None:
    """Add ``pdserve certs`` to the CLI's subparsers."""
    p = sub.add_parser(
        "certs",
        help="make a development CA, cluster + client certificates and tokens",
        description="Write ca.pem/ca.key, server.pem/server.key (every pdserve process: server and "
        "mTLS client), client.pem/client.key (tools, SDK), cluster-token and metrics-token into "
        "--out. Copy the folder (without ca.key) to every node.",
    )
    p.add_argument("--out", default="pdserve-certs", help="output folder (default: %(default)s)")
    p.add_argument(
        "--host",
        action="append",
        default=[],
        help="extra DNS name or IP address the cluster certificate is valid for (repeatable; "
        f"always included: {', '.join(LOOPBACK_NAMES)}, {CLUSTER_SERVER_NAME}) (default: %(default)s)",
    )
    p.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity in days (default: %(default)s)")
    p.add_argument(
        "--force", action="store_true", help="overwrite existing files in --out (default: %(default)s)"
    )
    p.set_defaults(func=_cmd_certs)


def _cmd_certs(a) -> int:
    paths = write_dev_pki(a.out, a.host, days=a.days, force=a.force)
    for k, v in vars(paths).items():
        print(f"{k:<14} {v}")
    print(
        f"\nserve with: --tls on --tls-ca {paths.ca} --tls-cert {paths.server_cert} "
        f"--tls-key {paths.server_key} --cluster-token-file {paths.cluster_token}"
    )
    return 0
