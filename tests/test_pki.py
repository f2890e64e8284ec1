from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from gateway import pki
from tests.helpers import make_one_ca_pki


@pytest.fixture(scope="module")
def ca() -> pki.Issued:
    return pki.create_ca("test CA")


@pytest.fixture(scope="module")
def other_ca() -> pki.Issued:
    return pki.create_ca("other CA")


def load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cert_with_uris(ca: pki.Issued, uris: list[str]) -> bytes:
    """A client cert signed by ``ca`` with arbitrary URI SANs (none: no SAN at all)."""
    ca_cert = load(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if uris:
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------- identities


def test_identity_uris() -> None:
    assert pki.operator_uri("contoso-telecom") == "spiffe://opconnect/operator/contoso-telecom"
    assert pki.platform_uri("admin-center") == "spiffe://opconnect/platform/admin-center"
    for bad in ["", "-x", "Upper", "a/b", "a_b", "a" * 64, "abc\n", "a b"]:
        with pytest.raises(ValueError, match="invalid"):
            pki.operator_uri(bad)
        with pytest.raises(ValueError, match="invalid"):
            pki.platform_uri(bad)
    assert pki.operator_uri("a" * 63).endswith("a" * 63)


@given(st.text(max_size=80))
def test_operator_uri_refuses_ids_outside_the_pattern(text: str) -> None:
    valid = (
        0 < len(text) <= 63
        and all(c in "abcdefghijklmnopqrstuvwxyz0123456789-" for c in text)
        and text[0] != "-"
    )
    if valid:
        assert pki.operator_uri(text) == pki.OPERATOR_URI_PREFIX + text
    else:
        with pytest.raises(ValueError, match="invalid operator id"):
            pki.operator_uri(text)


# --------------------------------------------------------------------------- issuing


def test_ca(ca: pki.Issued) -> None:
    cert = load(ca.cert_pem)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(cert)
    assert b"PRIVATE KEY" in ca.key_pem
    assert b"PRIVATE" not in repr(ca).encode()


def test_server_cert(ca: pki.Issued) -> None:
    server = pki.issue_server_cert(ca, ["localhost", "gw.test"], ["127.0.0.1", "::1"])
    cert = load(server.cert_pem)
    cert.verify_directly_issued_by(load(ca.cert_pem))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "gw.test"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == []
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = load(ca.cert_pem).extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert aki.key_identifier == ca_ski.value.digest
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6"):
        pki.issue_server_cert(ca, ["localhost"], ["not-an-ip"])


def test_client_cert(ca: pki.Issued, other_ca: pki.Issued) -> None:
    uri = pki.operator_uri("acme")
    client = pki.issue_client_cert(ca, uri)
    cert = load(client.cert_pem)
    cert.verify_directly_issued_by(load(ca.cert_pem))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(uri)]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "acme"
    named = pki.issue_client_cert(ca, uri, common_name="Acme Ltd")
    assert load(named.cert_pem).subject.rfc4514_string() == "CN=Acme Ltd"
    assert not load(ca.cert_pem).not_valid_after_utc < cert.not_valid_after_utc
    assert pki.serial_of(client.cert_pem) == cert.serial_number
    assert pki.fingerprint_sha256(client.cert_pem) == cert.fingerprint(hashes.SHA256()).hex()
    assert len(pki.fingerprint_sha256(client.cert_pem)) == 64

    assert pki.issued_by(client.cert_pem, [ca.cert_pem])
    assert pki.issued_by(client.cert_pem, [other_ca.cert_pem, ca.cert_pem])
    assert not pki.issued_by(client.cert_pem, [other_ca.cert_pem])
    assert not pki.issued_by(client.cert_pem, [])
    # Same subject name, different key: the signature check must fail, not the name check.
    impostor = pki.create_ca("test CA")
    assert not pki.issued_by(client.cert_pem, [impostor.cert_pem])


def test_mismatched_ca_key_is_refused(ca: pki.Issued, other_ca: pki.Issued) -> None:
    mixed = pki.Issued(cert_pem=ca.cert_pem, key_pem=other_ca.key_pem)
    with pytest.raises(ValueError, match="does not match") as info:
        pki.issue_client_cert(mixed, pki.operator_uri("acme"))
    assert "PRIVATE" not in str(info.value)


# --------------------------------------------------------------------------- identity_from_cert


def test_identity_from_cert(ca: pki.Issued) -> None:
    op = pki.issue_client_cert(ca, pki.operator_uri("contoso-telecom"))
    ident = pki.identity_from_cert(op.cert_pem)
    assert ident == pki.PeerIdentity(
        kind="operator",
        name="contoso-telecom",
        serial=pki.serial_of(op.cert_pem),
        fingerprint=pki.fingerprint_sha256(op.cert_pem),
    )
    pf = pki.issue_client_cert(ca, pki.platform_uri("admin-center"))
    assert pki.identity_from_cert(pf.cert_pem).kind == "platform"
    assert pki.identity_from_cert(pf.cert_pem).name == "admin-center"


@pytest.mark.parametrize(
    ("uris", "reason"),
    [
        ([], "no subjectAltName"),
        (
            ["spiffe://opconnect/operator/a", "spiffe://opconnect/platform/b"],
            "several",
        ),
        (["spiffe://opconnect/operator/a", "spiffe://opconnect/operator/a"], "several"),
        (["spiffe://opconnect/operator/Bad_Id"], "malformed operator"),
        (["spiffe://opconnect/operator/a/b"], "malformed operator"),
        (["spiffe://opconnect/operator/"], "malformed operator"),
        (["spiffe://opconnect/platform/-x"], "malformed platform"),
        (["spiffe://other/operator/a"], "not an opconnect identity"),
        (["spiffe://opconnect/tenant/a"], "not an opconnect identity"),
    ],
)
def test_identity_from_cert_refuses(ca: pki.Issued, uris: list[str], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        pki.identity_from_cert(cert_with_uris(ca, uris))


def test_identity_from_cert_needs_a_uri(ca: pki.Issued) -> None:
    server = pki.issue_server_cert(ca, ["localhost"], [])
    with pytest.raises(ValueError, match="no URI subjectAltName"):
        pki.identity_from_cert(server.cert_pem)
    with pytest.raises(ValueError, match="no subjectAltName"):
        pki.identity_from_cert(ca.cert_pem)
    bad = pki.issue_client_cert(ca, "spiffe://opconnect/operator/NOPE")
    with pytest.raises(ValueError, match="malformed"):
        pki.identity_from_cert(bad.cert_pem)


# --------------------------------------------------------------------------- CRLs


def test_crl(ca: pki.Issued, other_ca: pki.Issued) -> None:
    crl_pem = pki.make_crl(ca, [5, 7, 5])
    assert pki.load_crl_serials(crl_pem, ca.cert_pem) == frozenset({5, 7})
    crl = x509.load_pem_x509_crl(crl_pem)
    entry = crl.get_revoked_certificate_by_serial_number(7)
    assert entry is not None
    assert entry.revocation_date_utc <= datetime.datetime.now(datetime.UTC)
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value
    assert reason.reason == x509.ReasonFlags.unspecified
    assert crl.next_update_utc is not None
    assert pki.load_crl_serials(pki.make_crl(ca, []), ca.cert_pem) == frozenset()

    with pytest.raises(ValueError, match="not issued by this CA"):
        pki.load_crl_serials(pki.make_crl(other_ca, [5]), ca.cert_pem)
    impostor = pki.create_ca("test CA")  # same issuer name, different key
    with pytest.raises(ValueError, match="signature is not valid"):
        pki.load_crl_serials(pki.make_crl(impostor, [5]), ca.cert_pem)


# --------------------------------------------------------------------------- files


def test_write_private_and_public_modes(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        pki.write_public(tmp_path / "pub", b"a")
    finally:
        os.umask(old)
    old = os.umask(0)
    try:
        pki.write_private(tmp_path / "priv", b"b")
        pki.write_private(tmp_path / "priv", b"c")  # replace keeps 0600
    finally:
        os.umask(old)
    assert mode(tmp_path / "pub") == 0o644
    assert mode(tmp_path / "priv") == 0o600
    assert (tmp_path / "priv").read_bytes() == b"c"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["priv", "pub"]  # no temp files left


def test_pki_paths(tmp_path: Path) -> None:
    paths = pki.PkiPaths.at(tmp_path)
    assert paths.ca_cert == tmp_path / "ca.pem"
    assert paths.ca_key == tmp_path / "ca.key"
    assert paths.crl == tmp_path / "crl.pem"
    assert paths.revoked == tmp_path / "revoked.json"
    assert paths.server_cert == tmp_path / "server.pem"
    assert paths.server_key == tmp_path / "server.key"
    assert paths.client("operator-x") == (
        tmp_path / "clients" / "operator-x.pem",
        tmp_path / "clients" / "operator-x.key",
    )
    for bad in ["../x", "a/b", "", ".hidden"]:
        with pytest.raises(ValueError, match="invalid client name"):
            paths.client(bad)


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_ensure_dev_pki(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    paths = pki.ensure_dev_pki(directory)
    assert mode(directory) == 0o700
    assert mode(paths.clients_dir) == 0o700
    op_cert, op_key = paths.client("operator-contoso-telecom")
    pf_cert, pf_key = paths.client("platform-admin-center")
    ca_keys = [paths.ca(role)[1] for role in pki.CA_ROLES]
    for key in [*ca_keys, paths.server_key, op_key, pf_key]:
        assert mode(key) == 0o600
    ca_certs = [paths.ca(role)[0] for role in pki.CA_ROLES]
    for public in [*ca_certs, paths.server_cert, paths.crl, paths.revoked, op_cert]:
        assert mode(public) == 0o644
    # A CA for each kind of certificate, and each certificate by the CA of its kind only.
    cas = {role: pki.load_ca(paths, role) for role in pki.CA_ROLES}
    assert len({pki.spki_sha256(load(ca.cert_pem)) for ca in cas.values()}) == 4
    for cert, role in [(paths.server_cert, "server"), (op_cert, "operator"), (pf_cert, "platform")]:
        pem = cert.read_bytes()
        assert [r for r in pki.CA_ROLES if pki.issued_by(pem, [cas[r].cert_pem])] == [role]
    assert pki.identity_from_cert(op_cert.read_bytes()).name == "contoso-telecom"
    assert pki.identity_from_cert(pf_cert.read_bytes()).kind == "platform"
    assert json.loads(paths.revoked.read_text()) == {"operator": [], "platform": []}
    assert crl_serials(paths, cas["operator"]) == crl_serials(paths, cas["platform"]) == set()

    before = snapshot(directory)
    dir_mtime = directory.stat().st_mtime_ns
    assert pki.ensure_dev_pki(directory) == paths
    assert snapshot(directory) == before
    assert directory.stat().st_mtime_ns == dir_mtime

    # Only the missing pair is re-created.
    paths.server_key.unlink()
    pki.ensure_dev_pki(directory)
    after = snapshot(directory)
    assert after["server.pem"] != before["server.pem"]
    assert {k: v for k, v in after.items() if not k.startswith("server.")} == {
        k: v for k, v in before.items() if not k.startswith("server.")
    }


def crl_serials(paths: pki.PkiPaths, ca: pki.Issued) -> set[int]:
    """The serials on the CRL of `ca` in crl.pem (a bundle of the operator and platform CRLs)."""
    blocks = re.findall(
        rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----\n", paths.crl.read_bytes(), re.S
    )
    issued = [b for b in blocks if x509.load_pem_x509_crl(b).issuer == load(ca.cert_pem).subject]
    assert len(issued) == 1
    return set(pki.load_crl_serials(issued[0], ca.cert_pem))


def test_ensure_dev_pki_refuses_half_a_ca(tmp_path: Path) -> None:
    paths = pki.ensure_dev_pki(tmp_path / "pki")
    paths.ca_key.unlink()
    with pytest.raises(ValueError, match="incomplete CA"):
        pki.ensure_dev_pki(tmp_path / "pki")
    paths = pki.ensure_dev_pki(tmp_path / "other")
    paths.platform_ca_cert.unlink()
    with pytest.raises(ValueError, match="incomplete CA"):
        pki.ensure_dev_pki(tmp_path / "other")


def test_a_one_ca_pki_is_upgraded(tmp_path: Path) -> None:
    """A directory of the one-CA layout (before the operator, platform and gateway CAs): its CA
    stays the server CA (clients keep verifying the server with ca.pem), and every client pair
    it signed is re-issued by the CA of its kind, but for one it had revoked."""
    directory = tmp_path / "pki"
    clients = directory / "clients"
    old = make_one_ca_pki(directory)
    server = pki.Issued(
        (directory / "server.pem").read_bytes(), (directory / "server.key").read_bytes()
    )
    for name, uri in [
        ("platform-gateway", pki.platform_uri("gateway")),
        ("operator-acme", pki.operator_uri("acme")),
        ("operator-gone", pki.operator_uri("gone")),
    ]:
        pair = pki.issue_client_cert(old, uri)
        pki.write_public(clients / f"{name}.pem", pair.cert_pem)
        pki.write_private(clients / f"{name}.key", pair.key_pem)
    gone = (clients / "operator-gone.pem").read_bytes()
    pki.write_public(directory / "revoked.json", json.dumps([pki.serial_of(gone)]).encode())
    pki.write_public(directory / "crl.pem", pki.make_crl(old, [pki.serial_of(gone)]))

    paths = pki.ensure_dev_pki(directory)
    assert paths.ca_cert.read_bytes() == old.cert_pem
    assert paths.server_cert.read_bytes() == server.cert_pem  # still signed by ca.pem
    cas = {role: pki.load_ca(paths, role) for role in pki.CA_ROLES}
    expected: list[tuple[str, pki.CaRole]] = [
        ("operator-contoso-telecom", "operator"),
        ("platform-admin-center", "platform"),
        ("platform-gateway", "gateway"),
        ("operator-acme", "operator"),
    ]
    for name, role in expected:
        assert pki.issued_by((clients / f"{name}.pem").read_bytes(), [cas[role].cert_pem]), name
    assert (clients / "operator-gone.pem").read_bytes() == gone  # revoked: not re-issued
    assert json.loads(paths.revoked.read_text()) == {
        "operator": [],
        "platform": [],
        "retired": [pki.serial_of(gone)],
    }
    assert crl_serials(paths, cas["operator"]) == set()
    before = snapshot(directory)
    pki.ensure_dev_pki(directory)
    assert snapshot(directory) == before


def test_issue_revoke_rotate(tmp_path: Path, other_ca: pki.Issued) -> None:
    paths = pki.ensure_dev_pki(tmp_path / "pki")
    ca = pki.load_ca(paths, "operator")
    cert_path, key_path = pki.issue_client(paths, "operator", "fabrikam")
    assert cert_path == paths.clients_dir / "operator-fabrikam.pem"
    assert mode(key_path) == 0o600
    cert_pem = cert_path.read_bytes()
    assert pki.identity_from_cert(cert_pem).name == "fabrikam"
    with pytest.raises(ValueError, match="invalid"):
        pki.issue_client(paths, "operator", "../evil")

    pki.revoke(paths, cert_pem)
    pki.revoke(paths, cert_pem)  # idempotent
    serial = pki.serial_of(cert_pem)
    assert json.loads(paths.revoked.read_text()) == {"operator": [serial], "platform": []}
    assert crl_serials(paths, ca) == {serial}
    assert crl_serials(paths, pki.load_ca(paths, "platform")) == set()
    with pytest.raises(ValueError, match="not issued by this PKI"):
        pki.revoke(paths, pki.issue_client_cert(other_ca, pki.operator_uri("x")).cert_pem)
    # A platform certificate is revoked by the platform CA's CRL.
    admin = paths.client("platform-admin-center")[0].read_bytes()
    pki.revoke(paths, admin)
    assert crl_serials(paths, pki.load_ca(paths, "platform")) == {pki.serial_of(admin)}

    # A lost crl.pem is rebuilt from revoked.json, and a lost revoked.json from crl.pem.
    paths.crl.unlink()
    pki.ensure_dev_pki(tmp_path / "pki")
    assert crl_serials(paths, ca) == {serial}
    paths.revoked.unlink()
    pki.ensure_dev_pki(tmp_path / "pki")
    assert json.loads(paths.revoked.read_text())["operator"] == [serial]

    old_server = paths.server_cert.read_bytes()
    pki.rotate_server_cert(paths, ["gw.example"], ["10.0.0.1"])
    new_server = paths.server_cert.read_bytes()
    assert pki.serial_of(new_server) != pki.serial_of(old_server)
    san = load(new_server).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["gw.example"]
    assert mode(paths.server_key) == 0o600


# --------------------------------------------------------------------------- TLS


def handshake(
    paths: pki.PkiPaths, client: tuple[Path, Path], crl_check: bool = False
) -> tuple[bytes | None, BaseException | None]:
    """TLS over a socketpair; returns (client cert PEM seen by the server, server error)."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(paths.server_cert, paths.server_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(paths.operator_ca_cert)
    server_ctx.load_verify_locations(paths.platform_ca_cert)
    if crl_check:
        server_ctx.load_verify_locations(paths.crl)
        server_ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(paths.ca_cert)
    client_ctx.load_cert_chain(*client)

    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    result: dict[str, object] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as tls:
                der = tls.getpeercert(binary_form=True)
                assert der is not None
                result["peer"] = ssl.DER_cert_to_PEM_cert(der).encode()
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            result["error"] = exc
            a.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname="localhost") as tls:
            tls.recv(2)
    except (ssl.SSLError, OSError):
        pass
    thread.join(10)
    peer = result.get("peer")
    error = result.get("error")
    assert peer is None or isinstance(peer, bytes)
    assert error is None or isinstance(error, BaseException)
    return peer, error


def test_tls_handshake(tmp_path: Path) -> None:
    paths = pki.ensure_dev_pki(tmp_path / "pki")
    client = paths.client("operator-contoso-telecom")
    peer, error = handshake(paths, client, crl_check=True)
    assert error is None
    assert peer is not None
    assert pki.identity_from_cert(peer).name == "contoso-telecom"

    # Unknown CA: refused by the server.
    stranger = pki.ensure_dev_pki(tmp_path / "other")
    _, error = handshake(paths, stranger.client("operator-contoso-telecom"))
    assert isinstance(error, ssl.SSLError)

    # Revoked: refused once the CRL is checked.
    pki.revoke(paths, client[0].read_bytes())
    _, error = handshake(paths, client, crl_check=True)
    assert isinstance(error, ssl.SSLError)
