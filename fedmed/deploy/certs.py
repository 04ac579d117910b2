"""The consortium's certificates and keys, made with ``cryptography`` (no openssl).

- ``init_ca``: the consortium CA (``ca.key`` 0600, ``ca.crt`` for everyone).
- ``server_certificate``: the coordinator's TLS certificate, signed by the CA, with a SAN for
  every host name / IP the sites connect to, and for its own loopback (the operator's API).
- ``site_keys``: a site's SuperNode authentication key pair (ECDSA P-384 in OpenSSH format,
  as Flower expects) and its Ed25519 ledger-signing key pair.

Private keys are written with mode 0600 and never overwritten without ``force``; nothing here
prints or logs key material: functions return paths.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmed.errors import FedMedError
from fedmed.kits.keys import write_private, write_public
from fedmed.privacy.ledger import public_key_pem, signing_key_pem

log = logging.getLogger(__name__)

CA_KEY, CA_CERT = "ca.key", "ca.crt"
SERVER_KEY, SERVER_CERT = "server.key", "server.pem"
VALIDITY = datetime.timedelta(days=825)
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    key_cert_sign=True,
    crl_sign=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    encipher_only=False,
    decipher_only=False,
)


@dataclass(frozen=True)
class SiteKeyFiles:
    """Where a site's keys live inside the certificate folder."""

    node_private: Path
    node_public: Path
    ledger_private: Path
    ledger_public: Path

    @classmethod
    def for_site(cls, folder: Path, site: str) -> SiteKeyFiles:
        base = folder / "sites" / site
        return cls(
            base / "node.key",
            base / "node.pub",
            base / "ledger.key",
            base / "ledger.pub",
        )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmed consortium"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def init_ca(folder: Path, force: bool = False) -> tuple[Path, Path]:
    """Create the consortium CA; returns (private key path, certificate path)."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("fedmed consortium CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .sign(key, hashes.SHA384())
    )
    key_path, cert_path = folder / CA_KEY, folder / CA_CERT
    write_private(key_path, _pem_key(key), force)
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM), force)
    return key_path, cert_path


def _load_ca(folder: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = folder / CA_KEY, folder / CA_CERT
    if not key_path.is_file() or not cert_path.is_file():
        raise FedMedError(f"{folder}: no consortium CA here; run `fedmed certs init-ca` first")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedMedError(f"{key_path}: not an EC private key")
    return key, x509.load_pem_x509_certificate(cert_path.read_bytes())


def _subject_alternative_name(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


# The operator's tools and Flower's ServerApp runtime reach the SuperLink on the coordinator's
# loopback (server kit: control_address), over the same TLS certificate.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1")


def server_certificate(folder: Path, hosts: list[str], force: bool = False) -> tuple[Path, Path]:
    """The coordinator's TLS key and certificate for ``hosts`` and its loopback; returns
    their paths."""
    if not hosts:
        raise FedMedError("fedmed certs server: give at least one --host (name or IP)")
    hosts = [*hosts, *(h for h in LOOPBACK_HOSTS if h not in hosts)]
    ca_key, ca_cert = _load_ca(folder)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + VALIDITY)
        .add_extension(_subject_alternative_name(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    key_path, cert_path = folder / SERVER_KEY, folder / SERVER_CERT
    write_private(key_path, _pem_key(key), force)
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM), force)
    return key_path, cert_path


def site_keys(folder: Path, site: str, force: bool = False) -> SiteKeyFiles:
    """A site's SuperNode authentication keys and its ledger-signing keys."""
    if not site or "/" in site or site.startswith("."):
        raise FedMedError(f"fedmed certs site: '{site}' is not a usable site name")
    files = SiteKeyFiles.for_site(folder, site)
    node = ec.generate_private_key(ec.SECP384R1())
    write_private(
        files.node_private,
        node.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        force,
    )
    write_public(
        files.node_public,
        node.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ),
        force,
    )
    ledger = Ed25519PrivateKey.generate()
    write_private(files.ledger_private, signing_key_pem(ledger), force)
    write_public(files.ledger_public, public_key_pem(ledger), force)
    return files


def certs_main(argv: list[str]) -> int:
    """``fedmed certs init-ca|server|site``: prints the paths written, never key material."""
    import argparse

    parser = argparse.ArgumentParser(prog="fedmed certs", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ca = commands.add_parser("init-ca", help="create the consortium CA")
    server = commands.add_parser("server", help="the coordinator's TLS certificate")
    server.add_argument(
        "--host",
        nargs="+",
        required=True,
        help="host names / IPs the hospitals reach (SANs; localhost and 127.0.0.1 are added)",
    )
    site = commands.add_parser("site", help="a site's node-auth and ledger keys")
    site.add_argument("name", help="the site's name, as in its kit")
    for sub in (ca, server, site):
        sub.add_argument("--dir", type=Path, required=True, help="the certificate folder")
        sub.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    if args.command == "init-ca":
        written = list(init_ca(args.dir, args.force))
    elif args.command == "server":
        written = list(server_certificate(args.dir, args.host, args.force))
    else:
        files = site_keys(args.dir, args.name, args.force)
        written = [files.node_private, files.node_public, files.ledger_private, files.ledger_public]
    for path in written:
        kind = "private, mode 0600" if path.suffix == ".key" else "share it"
        log.info(f"wrote {path} ({kind})")
    return 0


def certificate_names(cert_path: Path) -> set[str]:
    """The host names and IPs a certificate's SAN covers (IPs as text)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return ips | set(san.get_values_for_type(x509.DNSName))
