"""`fedmed certs`: a CA, a coordinator certificate with SANs, site keys Flower can load."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmed.cli import main
from fedmed.privacy.ledger import load_public_key


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_certs_cli_writes_0600_keys_refuses_overwrite_and_prints_no_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "pki"
    assert main(["certs", "init-ca", "--dir", str(folder)]) == 0
    assert main(["certs", "server", "--dir", str(folder), "--host", "localhost", "127.0.0.1"]) == 0
    assert main(["certs", "site", "va", "--dir", str(folder)]) == 0
    out = capsys.readouterr()
    private = [folder / "ca.key", folder / "server.key"]
    private += [folder / "sites" / "va" / "node.key", folder / "sites" / "va" / "ledger.key"]
    for key in private:
        assert _mode(key) == 0o600, key
        assert key.read_text().strip().splitlines()[1] not in out.out + out.err
    assert "PRIVATE KEY" not in out.out + out.err

    before = (folder / "ca.key").read_bytes()
    assert main(["certs", "init-ca", "--dir", str(folder)]) == 2
    assert "refusing to overwrite a key (use --force)" in capsys.readouterr().err
    assert (folder / "ca.key").read_bytes() == before
    assert main(["certs", "site", "va", "--dir", str(folder)]) == 2
    assert main(["certs", "init-ca", "--dir", str(folder), "--force"]) == 0
    assert (folder / "ca.key").read_bytes() != before
    assert _mode(folder / "ca.key") == 0o600


def test_server_certificate_is_signed_by_the_ca_for_every_host(tmp_path: Path) -> None:
    assert main(["certs", "init-ca", "--dir", str(tmp_path)]) == 0
    hosts = ["coordinator.example.org", "localhost", "127.0.0.1"]
    assert main(["certs", "server", "--dir", str(tmp_path), "--host", *hosts]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_site_keys_are_flower_node_keys_and_a_ledger_key(tmp_path: Path) -> None:
    assert main(["certs", "site", "cleveland", "--dir", str(tmp_path)]) == 0
    site = tmp_path / "sites" / "cleveland"
    node = serialization.load_ssh_private_key((site / "node.key").read_bytes(), password=None)
    assert isinstance(node, ec.EllipticCurvePrivateKey) and node.curve.name == "secp384r1"
    public = serialization.load_ssh_public_key((site / "node.pub").read_bytes())
    assert public == node.public_key()
    load_public_key(site / "ledger.pub")  # Ed25519, as the ledger verifies with
    assert main(["certs", "server", "--dir", str(tmp_path / "nowhere"), "--host", "x"]) == 2
