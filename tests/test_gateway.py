"""The gateway and identity, through real servers over real mutual TLS: who may connect, who may
call what, isolation between operators, trust files reloaded while running (CRL, deny list,
server certificate), limits, health, reflection, stock tools and a second-language client."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from app import runtime as server
from gateway import pki, registry
from gateway.identity import check_certificate
from gateway.registry import OperatorStatus, ca_anchors
from gateway.trust import Trust, TrustFiles, TrustStore
from opconnect.numbers.v1 import numbers_pb2 as pb
from opconnect.numbers.v1 import numbers_pb2_grpc as pb_grpc
from opconnect.type.v1 import assignment_state_pb2 as state_pb
from plumbing.changelog import decode_cursor
from plumbing.config import Settings
from plumbing.db import Database
from services.numbers.rules import DOMAIN, LOG
from tests.conftest import (
    OPERATOR,
    OTHER_OPERATOR,
    PLATFORM,
    REVOKED_OPERATOR,
    SUSPENDED_OPERATOR,
    TENANT,
    UNKNOWN_OPERATOR,
    USER_ID,
    Pki,
    RunningSystem,
    Watcher,
    rich_error,
    settings_for,
    start_system,
)
from tests.helpers import make_one_ca_pki, poll, start_split
from tests.records_data import audio, ids, publish_records, record

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / "node_modules" / ".bin" / "buf"
JS_CLIENT = Path(__file__).resolve().parent / "clients" / "grpc_js_client.js"

OK = (grpc.StatusCode.OK, "")
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
REVOKED = (UNAUTHENTICATED, "CERTIFICATE_REVOKED")
NUMBER = "+14255550100"
MISSING_NUMBER = "+14255550199"
SIP_URI = "sip:+14255550100@sbc1.contoso.example;user=phone"
BOTH = pb.Capabilities(inbound=True, outbound=True)


# --- helpers -------------------------------------------------------------------------------------


def outcome(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """(status code, ErrorInfo reason) of a call; (OK, "") when it succeeds."""
    try:
        call()
    except grpc.RpcError as error:
        found = rich_error(error)
        return found.code, found.reason
    return OK


def eventual_outcome(
    expected: tuple[grpc.StatusCode, str], call: Callable[[], object], timeout: float = 10
) -> tuple[grpc.StatusCode, str]:
    """Repeat `call` until its outcome is `expected` or the deadline passes; the last outcome."""
    return poll(lambda: outcome(call), lambda found: found == expected, timeout)


def handshake_fails(system: RunningSystem, cert: tuple[bytes, bytes] | None) -> bool:
    """Whether a new connection with `cert` is refused during the TLS handshake."""
    with tls_channel(system, cert, fresh=True) as channel:
        try:
            list_call(pb_grpc.NumberServiceStub(channel))()
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                return True
            raise
    return False


def list_call(stub: pb_grpc.NumberServiceStub) -> Callable[[], object]:
    return lambda: stub.ListNumbers(pb.ListNumbersRequest(), timeout=10)


def upload(stub: pb_grpc.NumberServiceStub, *numbers: str) -> pb.UploadNumbersResponse:
    response: pb.UploadNumbersResponse = stub.UploadNumbers(
        pb.UploadNumbersRequest(
            tenant_id=TENANT,
            numbers=[
                pb.NumberUpload(
                    phone_number=n,
                    usage=pb.NUMBER_USAGE_USER,
                    capabilities=BOTH,
                    allow_tenant_address_update=True,
                )
                for n in numbers
            ],
        ),
        timeout=10,
    )
    return response


def assign_request(number: str = NUMBER) -> pb.AssignNumberRequest:
    return pb.AssignNumberRequest(
        phone_number=number,
        tenant_id=TENANT,
        sip_uri=SIP_URI,
        target=pb.AssignmentTarget(kind=pb.AssignmentTarget.KIND_USER, id=USER_ID),
    )


def tls_channel(
    system: RunningSystem, cert: tuple[bytes, bytes] | None, *, fresh: bool = False
) -> grpc.Channel:
    """A channel of our own: `cert` None sends no client certificate; `fresh` forces a new
    connection (no subchannel shared with other channels of this process)."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=system.pki.paths.ca_cert.read_bytes(),
        private_key=cert[1] if cert else None,
        certificate_chain=cert[0] if cert else None,
    )
    options = [("grpc.use_local_subchannel_pool", 1)] if fresh else []
    return grpc.secure_channel(system.address, credentials, options=options)


def server_serial(system: RunningSystem) -> int:
    """The serial of the certificate the server shows a new TLS connection."""
    context = ssl.create_default_context(cafile=str(system.pki.paths.ca_cert))
    cert, key = system.pki.paths.client(f"operator-{OPERATOR}")
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("localhost", system.runtime.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def cert_path(the_pki: Pki, kind: str, ident: str) -> Path:
    return the_pki.paths.client(f"{kind}-{ident}")[0]


def pair(issued: pki.Issued) -> tuple[bytes, bytes]:
    """(certificate chain, key) as a channel presents them."""
    return issued.cert_pem, issued.key_pem


def own_channel(system: RunningSystem, issued: pki.Issued) -> grpc.Channel:
    """A channel presenting `issued`, on a connection of its own (none shared with another
    channel of this process, whose certificate would speak instead)."""
    return system.channel(cert=pair(issued), options=[("grpc.use_local_subchannel_pool", 1)])


def make_cert(
    issuer: pki.Issued | None,
    name: str,
    *,
    ca: bool = False,
    path_length: int | None = None,
    usages: list[x509.ObjectIdentifier] | None = None,
    chain: bytes = b"",
) -> pki.Issued:
    """A certificate of our own making: a CA (self-signed without `issuer`) or a client
    certificate for the URI `name`, with the extended key usages given (default clientAuth;
    none: no extension). `chain` is appended to the certificate, as a client sends it."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[-60:])])
    signer = key
    issuer_name = subject
    if issuer is not None:
        issuer_cert = x509.load_pem_x509_certificate(issuer.cert_pem)
        loaded = serialization.load_pem_private_key(issuer.key_pem, password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        signer, issuer_name = loaded, issuer_cert.subject
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca or name.startswith("spiffe:"),
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if name.startswith("spiffe:"):
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(name)]), critical=False
        )
    if usages is None:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if name.startswith("spiffe:") else []
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    cert = builder.sign(signer, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pki.Issued(cert.public_bytes(serialization.Encoding.PEM) + chain, key_pem)


@pytest.fixture
def start(session_pki: Pki, tmp_path: Path) -> Iterator[Callable[..., RunningSystem]]:
    """Start the system on SQLite with changed settings (and a PKI of the test's own)."""
    started: list[RunningSystem] = []

    def run(the_pki: Pki = session_pki, **changes: object) -> RunningSystem:
        url = f"sqlite:///{tmp_path / 'opconnect.db'}"
        running = start_system(settings_for(tmp_path, the_pki.paths, url, **changes), the_pki)
        started.append(running)
        return running

    yield run
    for running in started:
        running.stop()


# --- who may connect -----------------------------------------------------------------------------


def test_a_client_without_a_certificate_fails_the_handshake(sqlite_system: RunningSystem) -> None:
    assert handshake_fails(sqlite_system, None)
    assert outcome(list_call(sqlite_system.numbers())) == OK  # the server is unharmed


def test_a_certificate_from_another_ca_fails_the_handshake(
    sqlite_system: RunningSystem, session_pki: Pki
) -> None:
    foreign = (session_pki.foreign_client.cert_pem, session_pki.foreign_client.key_pem)
    assert handshake_fails(sqlite_system, foreign)


def test_a_revoked_operator_is_unauthenticated(sqlite_system: RunningSystem) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        sqlite_system.numbers(REVOKED_OPERATOR).ListNumbers(pb.ListNumbersRequest())
    error = rich_error(caught.value)
    assert (error.code, error.reason, error.domain) == (
        UNAUTHENTICATED,
        "CERTIFICATE_REVOKED",
        "gateway.opconnect",
    )


def test_an_operator_missing_from_the_registry_is_unauthenticated(
    sqlite_system: RunningSystem,
) -> None:
    stub = sqlite_system.numbers(UNKNOWN_OPERATOR)
    assert outcome(list_call(stub)) == (UNAUTHENTICATED, "OPERATOR_UNKNOWN")


def test_a_suspended_operator_is_unauthenticated_until_reactivated(
    sqlite_system: RunningSystem,
) -> None:
    stub = sqlite_system.numbers(SUSPENDED_OPERATOR)
    assert outcome(list_call(stub)) == (UNAUTHENTICATED, "OPERATOR_SUSPENDED")
    registry = sqlite_system.runtime.registry
    sqlite_system.call(registry.set_status(SUSPENDED_OPERATOR, OperatorStatus.ACTIVE))
    assert outcome(list_call(stub)) == OK  # same channel, no reconnect
    sqlite_system.call(registry.set_status(SUSPENDED_OPERATOR, OperatorStatus.SUSPENDED))
    assert outcome(list_call(stub)) == (UNAUTHENTICATED, "OPERATOR_SUSPENDED")


def test_a_certificate_naming_no_opconnect_identity_is_unauthenticated(
    sqlite_system: RunningSystem, session_pki: Pki
) -> None:
    ca = pki.load_ca(session_pki.paths, "operator")
    stranger = pki.issue_client_cert(ca, "spiffe://elsewhere/operator/contoso-telecom")
    stub = pb_grpc.NumberServiceStub(
        sqlite_system.channel(cert=(stranger.cert_pem, stranger.key_pem))
    )
    assert outcome(list_call(stub)) == (UNAUTHENTICATED, "IDENTITY_INVALID")


def test_each_kind_of_certificate_must_come_from_its_own_ca(
    sqlite_system: RunningSystem, session_pki: Pki
) -> None:
    """An operator CA cannot mint a platform identity (the admin center's, say), nor the
    platform CA an operator's."""
    paths = session_pki.paths
    minted = pki.issue_client_cert(pki.load_ca(paths, "operator"), pki.platform_uri(PLATFORM))
    admin = pb_grpc.NumberAdminServiceStub(own_channel(sqlite_system, minted))
    unassign = pb.UnassignNumberRequest(phone_number=MISSING_NUMBER, tenant_id=TENANT)
    assert outcome(lambda: admin.UnassignNumber(unassign)) == (
        UNAUTHENTICATED,
        "ISSUER_NOT_TRUSTED",
    )
    assert outcome(lambda: sqlite_system.admin().UnassignNumber(unassign)) == (  # past the gateway
        grpc.StatusCode.NOT_FOUND,
        "NUMBER_NOT_FOUND",
    )
    wrong = pki.issue_client_cert(pki.load_ca(paths, "platform"), pki.operator_uri(OPERATOR))
    operator = pb_grpc.NumberServiceStub(own_channel(sqlite_system, wrong))
    assert outcome(list_call(operator)) == (UNAUTHENTICATED, "ISSUER_NOT_TRUSTED")
    assert outcome(list_call(sqlite_system.numbers(OPERATOR))) == OK


def test_an_operator_is_spoken_for_only_by_its_own_anchors(
    start: Callable[..., RunningSystem], own_pki: Pki
) -> None:
    """Operator B's CA, trusted for B, cannot mint operator A: each operator is bound to the
    anchors registered for it, whatever CA of the operator bundle signed the certificate."""
    ca_b = pki.create_ca("fabrikam's own CA")
    bundle = own_pki.paths.operator_ca_cert
    ca_a = bundle.read_bytes()
    pki.write_public(bundle, ca_a + ca_b.cert_pem)  # both trusted for operators
    system = start(own_pki)
    registry = system.runtime.registry
    system.call(registry.trust(OPERATOR, ca_anchors(ca_a), replace=True))
    system.call(registry.trust(OTHER_OPERATOR, ca_anchors(ca_b.cert_pem), replace=True))
    as_a = pki.issue_client_cert(ca_b, pki.operator_uri(OPERATOR))
    as_b = pki.issue_client_cert(ca_b, pki.operator_uri(OTHER_OPERATOR))
    refused = (UNAUTHENTICATED, "ISSUER_NOT_BOUND")
    assert outcome(list_call(pb_grpc.NumberServiceStub(own_channel(system, as_a)))) == refused
    assert outcome(list_call(pb_grpc.NumberServiceStub(own_channel(system, as_b)))) == OK
    assert outcome(list_call(system.numbers(OPERATOR))) == OK  # A's own, by A's CA
    # B's certificate from the shared operator CA is no longer B's: its anchor is B's CA.
    assert outcome(list_call(system.numbers(OTHER_OPERATOR))) == refused
    # A certificate of the unregistered CA is refused at the handshake, as before.
    assert handshake_fails(system, pair(own_pki.foreign_client))


def test_an_operator_bound_to_its_root_ca_speaks_through_an_intermediate(
    start: Callable[..., RunningSystem], own_pki: Pki
) -> None:
    """The chain a client sends is validated, and any CA on it may be the operator's anchor:
    its root (in the operator bundle) or its issuing CA."""
    root = make_cert(None, "fabrikam root CA", ca=True)
    issuing = make_cert(root, "fabrikam issuing CA", ca=True, path_length=0)
    bundle = own_pki.paths.operator_ca_cert
    ca_a = bundle.read_bytes()
    pki.write_public(bundle, ca_a + root.cert_pem)
    system = start(own_pki)
    registry = system.runtime.registry
    system.call(registry.trust(OPERATOR, ca_anchors(ca_a), replace=True))
    system.call(registry.trust(OTHER_OPERATOR, ca_anchors(root.cert_pem), replace=True))
    as_b = make_cert(issuing, pki.operator_uri(OTHER_OPERATOR), chain=issuing.cert_pem)
    as_a = make_cert(issuing, pki.operator_uri(OPERATOR), chain=issuing.cert_pem)
    assert outcome(list_call(pb_grpc.NumberServiceStub(own_channel(system, as_b)))) == OK
    refused = (UNAUTHENTICATED, "ISSUER_NOT_BOUND")
    assert outcome(list_call(pb_grpc.NumberServiceStub(own_channel(system, as_a)))) == refused
    system.call(registry.trust(OTHER_OPERATOR, ca_anchors(issuing.cert_pem), replace=True))
    assert outcome(list_call(pb_grpc.NumberServiceStub(own_channel(system, as_b)))) == OK


def test_operators_trust_takes_effect_within_the_registry_cache(
    start: Callable[..., RunningSystem], own_pki: Pki, tmp_path: Path
) -> None:
    """`opconnect operators trust` (here its function, on a database connection of its own, as
    the command runs in another process) changes who may speak for an operator within
    registry_cache_s; a pinned certificate is accepted by its fingerprint alone."""
    system = start(own_pki, registry_cache_s=0.2)
    other = system.numbers(OTHER_OPERATOR)
    assert outcome(list_call(other)) == OK
    own_pem = cert_path(own_pki, "operator", OTHER_OPERATOR).read_bytes()
    elsewhere = pki.fingerprint_sha256(cert_path(own_pki, "operator", OPERATOR).read_bytes())
    admin = Database(system.runtime.settings.sqlalchemy_url, threads=1)
    try:

        def trust(*anchors: registry.Anchor) -> None:
            admin.transaction(
                registry.trust_operator, OTHER_OPERATOR, anchors, (), True, write=True
            )

        trust(registry.pinned_anchor(elsewhere))  # pinned: another certificate only
        refused = (UNAUTHENTICATED, "ISSUER_NOT_BOUND")
        assert eventual_outcome(refused, list_call(other)) == refused
        trust(registry.pinned_anchor(cert_pem=own_pem))  # pinned: its own
        assert eventual_outcome(OK, list_call(other)) == OK
        trust()  # no anchor at all: fail closed
        unbound = (UNAUTHENTICATED, "NO_TRUST_ANCHOR")
        assert eventual_outcome(unbound, list_call(other)) == unbound
    finally:
        admin.close()
    assert outcome(list_call(system.numbers(OPERATOR))) == OK


def test_a_client_certificate_is_checked_by_our_own_path_validation(
    start: Callable[..., RunningSystem], own_pki: Pki, tmp_path: Path
) -> None:
    """What the TLS layer lets through, our check refuses, each with its reason: a CA
    certificate as a client's, one without the clientAuth extended key usage, and a chain
    through a CA that its issuer's path length constraint forbids (the TLS layer does not
    apply a trust anchor's: it accepted this one)."""
    anchor = make_cert(None, "platform CA", ca=True, path_length=0)  # may sign leaves only
    bundle = tmp_path / "platform-ca.pem"
    pki.write_public(bundle, anchor.cert_pem)
    system = start(own_pki, platform_ca_file=str(bundle), crl_file="")
    uri = pki.platform_uri(PLATFORM)
    below = make_cert(anchor, "sub CA", ca=True)  # forbidden by the anchor's pathlen 0
    cases = {
        "good": make_cert(anchor, uri),
        "a CA certificate": make_cert(anchor, uri, ca=True),
        "client authentication": make_cert(anchor, uri, usages=[]),
        "client authentication (serverAuth)": make_cert(
            anchor, uri, usages=[ExtendedKeyUsageOID.SERVER_AUTH]
        ),
        "path length": make_cert(below, uri, chain=below.cert_pem),
    }
    # An internal RPC (health and reflection would answer any certificate that chained).
    request = pb.UnassignNumberRequest(phone_number="+14255550100")
    for name, issued in cases.items():
        stub = pb_grpc.NumberAdminServiceStub(own_channel(system, issued))
        with pytest.raises(grpc.RpcError) as caught:
            stub.UnassignNumber(request, timeout=10)
        if name == "good":  # let in: its (empty) request is what is refused
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            continue
        if "serverAuth" in name:  # this one the TLS layer refuses itself
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            continue
        error = rich_error(caught.value)
        assert (error.code, error.reason) == (UNAUTHENTICATED, "CERTIFICATE_INVALID"), name
        assert name in error.message, (name, error.message)
    # Our own check refuses what the TLS layer happened to as well.
    trust = Trust(1, (), (anchor.cert_pem,), frozenset(), frozenset(), frozenset())
    checked = check_certificate(cases["client authentication (serverAuth)"].cert_pem, trust)
    assert checked.principal is None
    assert checked.problem[0] == "CERTIFICATE_INVALID"
    assert "client authentication" in checked.problem[1]
    assert check_certificate(cases["good"].cert_pem, trust).principal is not None


def test_start_up_refuses_a_platform_bundle_that_is_not_its_own(
    own_pki: Pki, tmp_path: Path
) -> None:
    """Outside the development PKI: no platform bundle, or one sharing a CA with the operator
    bundle (an operator CA could mint the admin center), is refused at start; so is a service
    process with no pinned gateway, or a gateway CA that signs others too."""
    paths = own_pki.paths
    base = settings_for(tmp_path, paths, f"sqlite:///{tmp_path / 'opconnect.db'}")
    both = tmp_path / "both.pem"
    pki.write_public(
        both, paths.platform_ca_cert.read_bytes() + paths.operator_ca_cert.read_bytes()
    )
    subordinate = tmp_path / "subordinate.pem"  # a platform CA the operator CA signed
    below = make_cert(pki.load_ca(paths, "operator"), "platform sub CA", ca=True)
    pki.write_public(subordinate, below.cert_pem)
    cases: list[tuple[dict[str, str], str, str]] = [
        ({"platform_ca_file": ""}, "all", "platform_ca_file is not set"),
        ({"platform_ca_file": str(paths.operator_ca_cert)}, "all", "share a CA"),
        ({"platform_ca_file": str(both)}, "gateway", "share a CA"),
        ({"platform_ca_file": str(subordinate)}, "all", "share a CA"),
        ({"gateway_ca_file": ""}, "numbers", "pinned gateway"),
        ({"gateway_ca_file": str(paths.platform_ca_cert)}, "records", "share a CA"),
    ]
    for changes, role, message in cases:
        with pytest.raises(ValueError, match=message):
            asyncio.run(server.start(base.replace(**changes), role))


def test_the_development_pki_of_one_ca_is_upgraded_and_serves(tmp_path: Path) -> None:
    """`make run` on a data directory made before the operator, platform and gateway CAs: the
    old CA stays the one clients verify the server with, the development pairs are re-issued
    by the CAs of their kind, the development operator is bound to its CA, and the old CA
    can sign no client any more."""
    old = make_one_ca_pki(tmp_path / "pki")
    settings = Settings(
        data_dir=tmp_path, listen="127.0.0.1:0", log_format="json", log_level="warning"
    )
    paths = pki.PkiPaths.at(tmp_path / "pki")
    database = Database(settings.sqlalchemy_url, threads=1)  # registered before anchors were
    database.migrate()
    database.transaction(registry.add_operator, OPERATOR, write=True)
    database.close()
    foreign = pki.issue_client_cert(old, pki.operator_uri(OPERATOR))
    system = RunningSystem(settings, Pki(paths, old, foreign))
    try:
        assert outcome(list_call(system.numbers(OPERATOR))) == OK
        health = health_pb2_grpc.HealthStub(system.channel("platform", PLATFORM))
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        assert handshake_fails(system, pair(foreign))  # the old CA signs no client now
        minted = pki.issue_client_cert(pki.load_ca(paths, "operator"), pki.platform_uri(PLATFORM))
        admin = pb_grpc.NumberAdminServiceStub(own_channel(system, minted))
        request = pb.UnassignNumberRequest()
        assert outcome(lambda: admin.UnassignNumber(request, timeout=10)) == (
            UNAUTHENTICATED,
            "ISSUER_NOT_TRUSTED",
        )
    finally:
        system.stop()


# --- who may call what ---------------------------------------------------------------------------


def test_an_operator_may_not_call_an_internal_rpc(sqlite_system: RunningSystem) -> None:
    upload(sqlite_system.numbers(), NUMBER)
    as_operator = pb_grpc.NumberAdminServiceStub(sqlite_system.channel("operator", OPERATOR))
    with pytest.raises(grpc.RpcError) as caught:
        as_operator.AssignNumber(assign_request())
    error = rich_error(caught.value)
    assert (error.code, error.reason, error.domain) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "PLATFORM_ONLY",
        "gateway.opconnect",
    )
    number = sqlite_system.numbers().GetNumber(pb.GetNumberRequest(phone_number=NUMBER)).number
    assert number.sip_uri == ""  # nothing was assigned


def test_a_platform_principal_may_not_call_an_operator_rpc(sqlite_system: RunningSystem) -> None:
    as_platform = pb_grpc.NumberServiceStub(sqlite_system.channel("platform", PLATFORM))
    assert outcome(list_call(as_platform)) == (grpc.StatusCode.PERMISSION_DENIED, "OPERATOR_ONLY")
    assert outcome(lambda: upload(as_platform, NUMBER)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "OPERATOR_ONLY",
    )


# --- isolation between operators (both backends) -------------------------------------------------


def test_another_operators_number_answers_as_if_it_did_not_exist(system: RunningSystem) -> None:
    upload(system.numbers(OPERATOR), NUMBER)
    other = system.numbers(OTHER_OPERATOR)
    errors = []
    for number in (NUMBER, MISSING_NUMBER):
        with pytest.raises(grpc.RpcError) as caught:
            other.GetNumber(pb.GetNumberRequest(phone_number=number))
        errors.append(rich_error(caught.value))
    held, missing = errors
    assert (held.code, held.reason, held.domain) == (
        grpc.StatusCode.NOT_FOUND,
        "NUMBER_NOT_FOUND",
        DOMAIN,
    )
    assert held == missing


def test_another_operators_numbers_are_not_listed(system: RunningSystem) -> None:
    upload(system.numbers(OPERATOR), NUMBER, "+14255550101")
    system.admin().AssignNumber(assign_request())
    other = system.numbers(OTHER_OPERATOR)
    for request in (
        pb.ListNumbersRequest(),
        pb.ListNumbersRequest(tenant_id=TENANT),
        pb.ListNumbersRequest(state=state_pb.ASSIGNMENT_STATE_ASSIGNED),
    ):
        page = other.ListNumbers(request)
        assert (list(page.numbers), page.next_page_token) == ([], "")
    assert len(system.numbers(OPERATOR).ListNumbers(pb.ListNumbersRequest()).numbers) == 2


def test_another_operator_cannot_release_numbers(system: RunningSystem) -> None:
    owner = system.numbers(OPERATOR)
    upload(owner, NUMBER, "+14255550101")
    system.admin().AssignNumber(assign_request(NUMBER))  # assigned: must not say NUMBER_ASSIGNED
    released = system.numbers(OTHER_OPERATOR).ReleaseNumbers(
        pb.ReleaseNumbersRequest(phone_numbers=[NUMBER, "+14255550101", MISSING_NUMBER])
    )
    assert released.released_count == 0
    answers = {(r.outcome, r.reason, r.message) for r in released.results}
    assert len(answers) == 1, "held, assigned and missing numbers all answer the same"
    assert answers.pop()[:2] == (pb.NUMBER_OUTCOME_REFUSED, "NUMBER_NOT_FOUND")
    assert len(owner.ListNumbers(pb.ListNumbersRequest()).numbers) == 2


def test_another_operator_does_not_see_assignments(system: RunningSystem) -> None:
    upload(system.numbers(OPERATOR), NUMBER)
    owner_watch = Watcher(system.numbers(OPERATOR))
    other_watch = Watcher(system.numbers(OTHER_OPERATOR))
    try:
        owner_watch.next()  # first heartbeats: both streams are open and start before the change
        other_watch.next()
        system.admin().AssignNumber(assign_request())
        events = owner_watch.next().events
        while not events:  # heartbeats that were on their way
            events = owner_watch.next().events
        (event,) = events
        assert (event.type, event.phone_number) == (pb.ASSIGNMENT_EVENT_TYPE_ASSIGNED, NUMBER)
        change = decode_cursor(event.cursor, LOG, DOMAIN)
        seen: list[pb.WatchAssignmentsResponse] = []
        while not seen or decode_cursor(seen[-1].cursor, LOG, DOMAIN) < change:
            seen.append(other_watch.next())
        assert [list(r.events) for r in seen] == [[]] * len(seen)  # heartbeats only
    finally:
        owner_watch.cancel()
        other_watch.cancel()


# --- trust files reloaded while running ----------------------------------------------------------


def test_a_revocation_takes_effect_without_a_restart(
    start: Callable[..., RunningSystem], own_pki: Pki
) -> None:
    system = start(own_pki)
    stub = system.numbers(OPERATOR)
    assert outcome(list_call(stub)) == OK
    pki.revoke(own_pki.paths, cert_path(own_pki, "operator", OPERATOR).read_bytes())
    assert eventual_outcome(REVOKED, list_call(stub)) == REVOKED  # even on the open connection
    assert outcome(list_call(system.numbers(OPERATOR))) == REVOKED
    assert outcome(list_call(system.numbers(OTHER_OPERATOR))) == OK


def test_the_deny_list_refuses_fingerprints_and_serials_and_follows_edits(
    start: Callable[..., RunningSystem], session_pki: Pki, tmp_path: Path
) -> None:
    other_pem = cert_path(session_pki, "operator", OTHER_OPERATOR).read_bytes()
    fingerprint = pki.fingerprint_sha256(other_pem).upper()
    colons = ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2))  # as openssl prints it
    deny = tmp_path / "deny-list.txt"
    pki.write_public(deny, f"# leaked key\n{colons}\n".encode())
    system = start(deny_list_file=str(deny))
    operator, other = system.numbers(OPERATOR), system.numbers(OTHER_OPERATOR)
    assert outcome(list_call(other)) == REVOKED
    assert outcome(list_call(operator)) == OK

    serial = pki.serial_of(cert_path(session_pki, "operator", OPERATOR).read_bytes())
    pki.write_public(deny, f"{serial:#x}  # lost laptop\n".encode())
    assert eventual_outcome(REVOKED, list_call(operator)) == REVOKED
    assert outcome(list_call(other)) == OK


def test_a_deny_list_that_does_not_parse_keeps_the_previous_one(
    start: Callable[..., RunningSystem], session_pki: Pki, tmp_path: Path
) -> None:
    serial = pki.serial_of(cert_path(session_pki, "operator", OTHER_OPERATOR).read_bytes())
    deny = tmp_path / "deny-list.txt"
    pki.write_public(deny, f"{serial}\n".encode())
    system = start(deny_list_file=str(deny))
    other = system.numbers(OTHER_OPERATOR)
    assert outcome(list_call(other)) == REVOKED
    pki.write_public(deny, b"this is not a serial\n")
    time.sleep(system.runtime.settings.reload_interval_s * 4)  # the next call rereads the files
    assert outcome(list_call(other)) == REVOKED
    assert outcome(list_call(system.numbers(OPERATOR))) == OK


def _deny_list_deleted(path: Path) -> None:
    path.unlink()


def _deny_list_a_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _deny_list_not_utf8(path: Path) -> None:
    pki.write_public(path, b"\xff\xfe not text\n")


@pytest.mark.parametrize("spoil", [_deny_list_deleted, _deny_list_a_directory, _deny_list_not_utf8])
def test_a_deny_list_that_vanishes_or_cannot_be_read_keeps_the_previous_one(
    start: Callable[..., RunningSystem],
    session_pki: Pki,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    spoil: Callable[[Path], None],
) -> None:
    serial = pki.serial_of(cert_path(session_pki, "operator", OTHER_OPERATOR).read_bytes())
    deny = tmp_path / "deny-list.txt"
    pki.write_public(deny, f"{serial}\n".encode())
    system = start(deny_list_file=str(deny))
    other = system.numbers(OTHER_OPERATOR)
    assert outcome(list_call(other)) == REVOKED
    spoil(deny)
    # Calls reread the files; wait for the reload's error, the certificate denied all along.
    logged, deadline = "", time.monotonic() + 10
    while "trust files not reloaded" not in logged:
        assert outcome(list_call(other)) == REVOKED
        assert time.monotonic() < deadline, "the spoilt deny list was never noticed"
        logged += capsys.readouterr().err
    assert outcome(list_call(other)) == REVOKED
    assert outcome(list_call(system.numbers(OPERATOR))) == OK
    # A good deny list written afterwards is taken up again.
    if deny.is_dir():
        deny.rmdir()
    serial = pki.serial_of(cert_path(session_pki, "operator", OPERATOR).read_bytes())
    pki.write_public(deny, f"{serial}\n".encode())
    assert eventual_outcome(REVOKED, list_call(system.numbers(OPERATOR))) == REVOKED
    assert outcome(list_call(other)) == OK


def test_a_configured_deny_list_that_is_missing_stops_the_start(
    session_pki: Pki, tmp_path: Path
) -> None:
    paths = session_pki.paths
    files = TrustFiles(
        paths.server_cert,
        paths.server_key,
        paths.operator_ca_cert,
        paths.platform_ca_cert,
        paths.crl,
        tmp_path / "deny-list.txt",
    )
    with pytest.raises(FileNotFoundError, match=r"deny-list\.txt"):
        TrustStore(files, 1.0)


# Every way a CRL file can go bad while running; the previous CRL must stay in force.


def _not_pem(crl: bytes, foreign: pki.Issued) -> bytes | None:
    return b"this is not a CRL\n"


def _truncated(crl: bytes, foreign: pki.Issued) -> bytes | None:
    return crl[: len(crl) // 2]


def _empty(crl: bytes, foreign: pki.Issued) -> bytes | None:
    return b""


def _deleted(crl: bytes, foreign: pki.Issued) -> bytes | None:
    return None


def _corrupt_body(crl: bytes, foreign: pki.Issued) -> bytes | None:
    return b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"


def _from_another_ca(crl: bytes, foreign: pki.Issued) -> bytes | None:
    return pki.make_crl(foreign, [])


@pytest.mark.parametrize(
    "bad_crl",
    [
        _not_pem,
        _truncated,
        _empty,
        _deleted,
        _corrupt_body,
        _from_another_ca,
    ],
)
def test_a_bad_crl_file_keeps_the_previous_crl(
    start: Callable[..., RunningSystem],
    own_pki: Pki,
    bad_crl: Callable[[bytes, pki.Issued], bytes | None],
) -> None:
    system = start(own_pki)
    revoked, operator = system.numbers(REVOKED_OPERATOR), system.numbers(OPERATOR)
    assert outcome(list_call(revoked)) == REVOKED
    replacement = bad_crl(own_pki.paths.crl.read_bytes(), own_pki.foreign_ca)
    if replacement is None:
        own_pki.paths.crl.unlink()
    else:
        pki.write_public(own_pki.paths.crl, replacement)
    time.sleep(system.runtime.settings.reload_interval_s * 4)  # the next call rereads the files
    assert outcome(list_call(revoked)) == REVOKED
    assert outcome(list_call(operator)) == OK
    # A good CRL written afterwards is taken up again.
    pki.revoke(own_pki.paths, cert_path(own_pki, "operator", OPERATOR).read_bytes())
    assert eventual_outcome(REVOKED, list_call(operator)) == REVOKED
    assert outcome(list_call(revoked)) == REVOKED


def test_the_server_certificate_rotates_without_a_restart(
    start: Callable[..., RunningSystem], own_pki: Pki
) -> None:
    system = start(own_pki)
    before = server_serial(system)
    assert before == pki.serial_of(own_pki.paths.server_cert.read_bytes())
    old_stub = system.numbers(OPERATOR)
    assert outcome(list_call(old_stub)) == OK

    pki.rotate_server_cert(own_pki.paths, ["localhost"], ["127.0.0.1"])
    rotated = pki.serial_of(own_pki.paths.server_cert.read_bytes())
    deadline = time.monotonic() + 10
    while (seen := server_serial(system)) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen == rotated != before

    with tls_channel(system, own_pki.client("operator", OPERATOR), fresh=True) as channel:
        assert outcome(list_call(pb_grpc.NumberServiceStub(channel))) == OK
    assert outcome(list_call(old_stub)) == OK  # the open connection carries on


def test_the_operator_ca_bundle_follows_edits(
    start: Callable[..., RunningSystem], own_pki: Pki
) -> None:
    system = start(own_pki)
    bundle = own_pki.paths.operator_ca_cert
    original = bundle.read_bytes()
    new_ca = pki.create_ca("opconnect operator CA 2")
    issued = pki.issue_client_cert(new_ca, pki.operator_uri(OTHER_OPERATOR))
    cert = (issued.cert_pem, issued.key_pem)
    system.call(system.runtime.registry.trust(OTHER_OPERATOR, ca_anchors(new_ca.cert_pem)))
    assert handshake_fails(system, cert)

    pki.write_public(bundle, original + new_ca.cert_pem)
    deadline = time.monotonic() + 10
    while handshake_fails(system, cert):
        assert time.monotonic() < deadline, "the new CA was never trusted"
        time.sleep(0.05)
    open_stub = pb_grpc.NumberServiceStub(system.channel(cert=cert))
    assert outcome(list_call(open_stub)) == OK

    pki.write_public(bundle, original)  # the CA is withdrawn again
    withdrawn = (UNAUTHENTICATED, "ISSUER_NOT_TRUSTED")
    # Even on the open connection:
    assert eventual_outcome(withdrawn, list_call(open_stub)) == withdrawn
    assert handshake_fails(system, cert)
    assert outcome(list_call(system.numbers(OPERATOR))) == OK


def test_a_same_size_edit_within_one_timestamp_tick_is_reloaded(
    start: Callable[..., RunningSystem], session_pki: Pki, tmp_path: Path
) -> None:
    def entry(ident: str) -> bytes:
        return pki.fingerprint_sha256(
            cert_path(session_pki, "operator", ident).read_bytes()
        ).encode()

    deny = tmp_path / "deny-list.txt"
    pki.write_public(deny, entry(OTHER_OPERATOR) + b"\n")
    system = start(deny_list_file=str(deny))
    operator, other = system.numbers(OPERATOR), system.numbers(OTHER_OPERATOR)
    assert outcome(list_call(other)) == REVOKED
    assert outcome(list_call(operator)) == OK
    before = deny.stat()
    pki.write_public(deny, entry(OPERATOR) + b"\n")  # same size: one fingerprint for another
    os.utime(deny, ns=(before.st_atime_ns, before.st_mtime_ns))  # as if in the same tick
    assert eventual_outcome(REVOKED, list_call(operator), timeout=3) == REVOKED


# --- limits --------------------------------------------------------------------------------------


def test_the_request_rate_per_operator_is_limited(start: Callable[..., RunningSystem]) -> None:
    system = start(rate_per_operator=5, rate_burst=5)
    stub = system.numbers(OPERATOR)
    for _ in range(5):
        assert outcome(list_call(stub)) == OK  # the burst
    # Tokens refill at 5/s: a slow machine may earn one more call before the bucket is dry.
    for _ in range(5):
        try:
            stub.ListNumbers(pb.ListNumbersRequest(), timeout=10)
        except grpc.RpcError as caught:
            error = rich_error(caught)
            break
    else:
        pytest.fail("the rate limit never answered")
    assert (error.code, error.reason, error.domain) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
        "gateway.opconnect",
    )
    assert error.retry_delay_s is not None
    assert 0 < error.retry_delay_s <= 1 / 5
    assert outcome(list_call(system.numbers(OTHER_OPERATOR))) == OK  # per operator


def test_concurrent_streams_per_operator_are_limited(start: Callable[..., RunningSystem]) -> None:
    system = start(max_streams_per_operator=2)
    stub = system.numbers(OPERATOR)
    watches = [Watcher(stub), Watcher(stub)]
    try:
        for watch in watches:
            watch.next()  # admitted: a first heartbeat arrived
        third = Watcher(stub)
        with pytest.raises(grpc.RpcError) as caught:
            third.next()
        error = rich_error(caught.value)
        assert (error.code, error.reason, error.domain) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_STREAMS",
            "gateway.opconnect",
        )
        assert error.retry_delay_s is not None and error.retry_delay_s > 0
        assert outcome(list_call(stub)) == OK  # unary calls are not streams

        other = Watcher(system.numbers(OTHER_OPERATOR))  # another operator has slots of its own
        watches.append(other)
        other.next()

        watches.pop(0).cancel()
        deadline = time.monotonic() + 10
        while True:  # the slot is freed when the server has seen the cancellation
            replacement = Watcher(stub)
            watches.append(replacement)
            found = outcome(replacement.next)
            if found == OK:
                break
            assert found == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS")
            assert time.monotonic() < deadline, "a cancelled stream's slot was never freed"
            time.sleep(0.05)
    finally:
        for watch in watches:
            watch.cancel()


# --- health, reflection, stock tools, other languages, request ids -------------------------------


def test_health_checking(sqlite_system: RunningSystem) -> None:
    health = health_pb2_grpc.HealthStub(sqlite_system.channel("operator", OPERATOR))
    for service in ("", "opconnect.numbers.v1.NumberService"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    platform = health_pb2_grpc.HealthStub(sqlite_system.channel("platform", PLATFORM))
    assert platform.Check(health_pb2.HealthCheckRequest()).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    # Watch too (load balancers follow it): the current status at once, then each change.
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def test_server_reflection_lists_the_services(sqlite_system: RunningSystem) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(sqlite_system.channel("operator", OPERATOR))
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = stub.ServerReflectionInfo(iter([request]), timeout=10)
    names = {s.name for s in response.list_services_response.service}
    assert {
        "opconnect.numbers.v1.NumberService",
        "opconnect.numbers.v1.NumberAdminService",
        "grpc.health.v1.Health",
    } <= names


def buf_curl(system: RunningSystem, *args: str) -> subprocess.CompletedProcess[str]:
    cert, key = system.pki.paths.client(f"operator-{OPERATOR}")
    return subprocess.run(
        [
            str(BUF),
            "curl",
            "--protocol",
            "grpc",
            "--cacert",
            str(system.pki.paths.ca_cert),
            "--cert",
            str(cert),
            "--key",
            str(key),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(params=["one process", "separate processes"])
def entry(
    request: pytest.FixtureRequest, session_pki: Pki, tmp_path: Path
) -> Iterator[RunningSystem]:
    """A fresh system on SQLite: the one-process system, or the gateway in front of the
    services' own processes (tests.test_split)."""
    if request.param == "one process":
        yield request.getfixturevalue("sqlite_system")
        return
    split = start_split(session_pki, tmp_path, f"sqlite:///{tmp_path / 'opconnect.db'}")
    yield split.gateway
    split.stop()


@pytest.mark.skipif(not BUF.exists(), reason="node_modules/.bin/buf is missing (run npm ci)")
def test_buf_curl_calls_through_reflection(entry: RunningSystem) -> None:
    system = entry
    base = f"https://{system.address}"
    body = {
        "tenantId": TENANT,
        "numbers": [
            {
                "phoneNumber": NUMBER,
                "usage": "NUMBER_USAGE_USER",
                "capabilities": {"inbound": True, "outbound": True},
                "allowTenantAddressUpdate": True,
            }
        ],
    }
    done = buf_curl(
        system,
        "-d",
        json.dumps(body),
        f"{base}/opconnect.numbers.v1.NumberService/UploadNumbers",
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["addedCount"] == 1
    assert answer["results"] == [{"phoneNumber": NUMBER, "outcome": "NUMBER_OUTCOME_DONE"}]
    got = system.numbers().GetNumber(pb.GetNumberRequest(phone_number=NUMBER)).number
    assert got.tenant_id == TENANT

    listed = buf_curl(system, "--list-methods", base)
    assert listed.returncode == 0, listed.stderr
    methods = set(listed.stdout.split())
    assert {
        "opconnect.numbers.v1.NumberService/UploadNumbers",
        "opconnect.numbers.v1.NumberService/WatchAssignments",
        "opconnect.numbers.v1.NumberAdminService/AssignNumber",
    } <= methods


@pytest.mark.skipif(
    shutil.which("node") is None
    or not (ROOT / "node_modules" / "@grpc" / "grpc-js").is_dir()
    or not (ROOT / "node_modules" / "@grpc" / "proto-loader").is_dir(),
    reason="node or node_modules/@grpc/grpc-js and proto-loader are missing (run npm ci)",
)
def test_a_grpc_js_client(entry: RunningSystem) -> None:
    system = entry
    published = [record(), record(streams=[audio(loss=0.3)]), record()]
    publish_records(system.ingest(), published)
    cert, key = system.pki.paths.client(f"operator-{OPERATOR}")
    done = subprocess.run(
        [
            "node",
            str(JS_CLIENT),
            *("--address", system.address),
            *("--ca", str(system.pki.paths.ca_cert)),
            *("--cert", str(cert)),
            *("--key", str(key)),
            *("--number", NUMBER),
            *("--tenant", TENANT),
            *("--protos", str(ROOT / "protos")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["upload"]["added_count"] == 1
    assert answer["upload"]["results"][0]["outcome"] == "NUMBER_OUTCOME_DONE"
    number = answer["get"]["number"]
    assert (number["phone_number"], number["tenant_id"], number["usage"]) == (
        NUMBER,
        TENANT,
        "NUMBER_USAGE_USER",
    )

    invalid = answer["invalid"]
    assert invalid["codeName"] == "INVALID_ARGUMENT"
    assert invalid["statusDetailsBin"], "the grpc-status-details-bin trailer reached grpc-js"
    status = status_pb2.Status.FromString(base64.b64decode(invalid["statusDetailsBin"]))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    info = error_details_pb2.ErrorInfo()
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(info)
    assert status.details[1].Unpack(bad)
    assert (info.reason, info.domain) == ("PHONE_NUMBER_INVALID", DOMAIN)
    assert [v.field for v in bad.field_violations] == ["phone_number"]

    # Call records, sent as batches joined from stored bytes, decode in another language too.
    responses = answer["records"]
    assert [len(r["records"]) for r in responses][:2] == [2, 1]
    assert [r["call_id"] for resp in responses for r in resp["records"]] == ids(published)
    poor = responses[0]["records"][1]
    assert poor["quality_class"] == "QUALITY_CLASS_POOR"
    assert poor["media_streams"][0]["packet_loss_rate"] == pytest.approx(0.3)
    assert all(r["cursor"] for r in responses)

    # Call durations on a bidirectional stream: each batch acknowledged, in order, per record.
    first, second = answer["submitted"]
    assert (first["batch_id"], first["accepted_count"], first["refused_count"]) == ("js-1", 2, 0)
    assert [r["outcome"] for r in first["results"]] == ["CALL_DURATION_OUTCOME_ACCEPTED"] * 2
    assert (second["batch_id"], second["refused_count"]) == ("js-2", 1)
    (bad,) = second["results"]
    assert (bad["record_id"], bad["outcome"], bad["field"]) == (
        "js-bad",
        "CALL_DURATION_OUTCOME_REFUSED",
        "caller",
    )


def test_the_request_id_comes_back_in_trailing_metadata(sqlite_system: RunningSystem) -> None:
    stub = sqlite_system.numbers()
    metadata = (("x-request-id", "abc-123"),)
    _, call = stub.ListNumbers.with_call(pb.ListNumbersRequest(), metadata=metadata)
    assert ("x-request-id", "abc-123") in call.trailing_metadata()
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetNumber(pb.GetNumberRequest(phone_number=MISSING_NUMBER), metadata=metadata)
    assert ("x-request-id", "abc-123") in caught.value.trailing_metadata()
    _, call = stub.ListNumbers.with_call(pb.ListNumbersRequest())
    assert dict(call.trailing_metadata())["x-request-id"]  # one is made when none is sent


def test_suspending_an_operator_ends_its_open_streams(sqlite_system: RunningSystem) -> None:
    watcher = Watcher(sqlite_system.numbers(OTHER_OPERATOR))
    watcher.next()  # the stream is open: its first heartbeat
    registry = sqlite_system.runtime.registry
    sqlite_system.call(registry.set_status(OTHER_OPERATOR, OperatorStatus.SUSPENDED))
    with pytest.raises(grpc.RpcError) as ended:
        for _ in range(10):  # the next heartbeat at the latest
            watcher.next()
    found = rich_error(ended.value)
    assert (found.code, found.reason) == (grpc.StatusCode.UNAUTHENTICATED, "OPERATOR_SUSPENDED")
