"""The `opconnect` command: the one-process system as `make run` starts it, the development PKI
and the operator registry."""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from grpc_health.v1 import health_pb2, health_pb2_grpc

from app.cli import connect_help, main
from app.runtime import freeze_start_up_objects
from gateway import pki
from opconnect.numbers.v1 import numbers_pb2 as pb
from opconnect.numbers.v1 import numbers_pb2_grpc
from plumbing import audit
from plumbing.config import DEV_OPERATOR, DEV_PLATFORM
from plumbing.db import Database


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OPCONNECT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("OPCONNECT_LOG_FORMAT", "json")
    return tmp_path


def test_pki_and_registry_commands(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pki", "init"]) == 0
    pki = data_dir / "pki"
    assert (pki / "ca.pem").exists()
    assert (pki / "ca.key").stat().st_mode & 0o777 == 0o600
    assert main(["pki", "issue", "operator", "acme-telecom"]) == 0
    cert = pki / "clients" / "operator-acme-telecom.pem"
    assert cert.exists()
    assert (pki / "clients" / "operator-acme-telecom.key").stat().st_mode & 0o777 == 0o600
    assert f"operators add acme-telecom --ca {pki / 'operator-ca.pem'}" in capsys.readouterr().out
    assert main(["operators", "add", "acme-telecom", "--name", "Acme"]) == 0
    assert "no trust anchor" in capsys.readouterr().out  # refused until one is registered
    assert main(["operators", "trust", "acme-telecom", "--ca", str(pki / "operator-ca.pem")]) == 0
    assert main(["operators", "trust", "acme-telecom", "--pin-cert", str(cert)]) == 0
    assert main(["operators", "suspend", "acme-telecom"]) == 0
    capsys.readouterr()
    assert main(["operators", "list"]) == 0
    listed = capsys.readouterr().out
    assert "acme-telecom\tsuspended\tAcme" in listed
    ca = x509.load_pem_x509_certificate((pki / "operator-ca.pem").read_bytes())
    fingerprint = cert_fingerprint(cert.read_bytes())
    assert f"ca  sha256={cert_fingerprint((pki / 'operator-ca.pem').read_bytes())}" in listed
    assert ca.subject.rfc4514_string() in listed
    assert f"pin sha256={fingerprint}" in listed
    colons = ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    assert main(["operators", "trust", "acme-telecom", "--remove", colons]) == 0
    assert f"pin sha256={fingerprint}" not in capsys.readouterr().out
    assert main(["operators", "trust", "acme-telecom", "--remove", fingerprint]) == 1  # gone
    # Not a CA: pin a client certificate instead.
    assert main(["operators", "trust", "acme-telecom", "--ca", str(cert)]) == 1
    assert "not a CA certificate" in capsys.readouterr().err
    assert main(["operators", "reactivate", "acme-telecom"]) == 0
    assert main(["pki", "revoke", str(cert)]) == 0
    assert len(json.loads((pki / "revoked.json").read_text())["operator"]) == 1
    assert main(["operators", "suspend", "nobody"]) == 1
    assert main(["pki", "issue", "operator", "Not Valid"]) == 1


def cert_fingerprint(pem: bytes) -> str:
    return x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()


def test_bad_settings_are_refused(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "opconnect.toml"
    config.write_text('listen = "127.0.0.1:1"\nno_such_setting = 1\n')
    assert main(["--config", str(config), "operators", "list"]) == 2
    assert "no_such_setting" in capsys.readouterr().err


def test_serve_refuses_to_start_without_a_platform_bundle_of_its_own(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Outside the development PKI, an unset platform bundle (which once meant "the operator
    bundle") or one equal to the operator bundle stops `opconnect serve` with a message."""
    assert main(["pki", "init"]) == 0
    pki = data_dir / "pki"
    files = (
        f'listen = "127.0.0.1:0"\ntls_cert_file = "{pki / "server.pem"}"\n'
        f'tls_key_file = "{pki / "server.key"}"\noperator_ca_file = "{pki / "operator-ca.pem"}"\n'
    )
    config = tmp_path / "opconnect.toml"
    for extra, message in [
        ("", "platform_ca_file is not set"),
        (f'platform_ca_file = "{pki / "operator-ca.pem"}"\n', "share a CA"),
    ]:
        config.write_text(files + extra)
        capsys.readouterr()
        assert main(["--config", str(config), "serve"]) == 1
        assert message in capsys.readouterr().err


def test_serve_makes_its_pki_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OPCONNECT_DATA_DIR": str(tmp_path),
        "OPCONNECT_LISTEN": "127.0.0.1:0",
        "OPCONNECT_LOG_FORMAT": "json",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        address = ""
        deadline = time.monotonic() + 60
        assert process.stderr is not None
        while not address and time.monotonic() < deadline:
            line = process.stderr.readline()
            found = re.search(r"opconnect is serving on (\S+)", line)
            address = found.group(1) if found else ""
        assert address, "serve never said where it listens"
        pki = tmp_path / "pki"
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(pki / "ca.pem").read_bytes(),
            private_key=(pki / "clients" / "operator-contoso-telecom.key").read_bytes(),
            certificate_chain=(pki / "clients" / "operator-contoso-telecom.pem").read_bytes(),
        )
        with grpc.secure_channel(address, credentials) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            listing = numbers_pb2_grpc.NumberServiceStub(channel).ListNumbers(
                pb.ListNumbersRequest()
            )
            assert listing.watch_cursor
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serving_takes_start_up_objects_out_of_full_collections() -> None:
    """What `opconnect serve` does once started: every object alive then is frozen, so a full
    collection (which stops the whole process while it walks every tracked object) no longer
    walks them."""
    assert gc.get_freeze_count() == 0
    alive = len(gc.get_objects())
    try:
        frozen = freeze_start_up_objects()
        assert frozen == gc.get_freeze_count() > 0
        assert len(gc.get_objects()) < alive - frozen // 2  # what a full collection walks
    finally:
        gc.unfreeze()


def test_audit_command_lists_reads(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = Database(f"sqlite:///{data_dir / 'opconnect.db'}", threads=1)
    db.migrate()
    now = dt.datetime.now(dt.UTC)
    event = audit.AuditEvent(
        at=now - dt.timedelta(hours=2),
        principal="operator/acme-telecom",
        method="StreamCallRecords",
        filters={"phone_number": "+1425555****"},
        record_count=42,
        duration_ms=12.5,
        status="OK",
        request_id="req-1",
    )
    other = dataclasses.replace(event, principal="operator/fabrikam", at=now, request_id="req-2")
    db.transaction(audit.insert_events, [event, other], write=True)
    db.close()
    assert main(["audit"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[6] for line in lines] == ["req-2", "req-1"]  # newest first
    assert "42 records" in lines[1] and "phone_number=+1425555****" in lines[1]
    assert main(["audit", "--operator", "acme-telecom"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    since = (now - dt.timedelta(hours=1)).isoformat()
    assert main(["audit", "--since", since]) == 0
    assert "req-2" in capsys.readouterr().out
    assert main(["audit", "--since", "yesterday"]) == 1


def test_the_banner_keeps_every_name_and_path_apart(tmp_path: Path) -> None:
    """Each file of the development PKI on a line of its own after its label: an operator id
    as long as any never runs into its path (it once printed `contoso-telecomvar/pki/...`)."""
    paths = pki.ensure_dev_pki(tmp_path / "pki", DEV_OPERATOR, DEV_PLATFORM)
    runtime = cast(Any, SimpleNamespace(dev_pki=paths, address="localhost:50051"))
    runtime.metrics_endpoint = None
    text = connect_help(runtime)
    for path in (paths.ca_cert, *paths.client(f"operator-{DEV_OPERATOR}")):
        line = next(x for x in text.splitlines() if str(path) in x)
        label, _, rest = line.partition(": ")
        assert rest.strip() == str(path), line
        assert label.strip() in ("CA certificate", "certificate", "key")


def test_serve_on_a_taken_address_says_so_in_one_line(tmp_path: Path) -> None:
    """A second `opconnect serve` on an address in use: one line naming it and what to do, no
    traceback; also where the name resolves to several addresses and one is taken (gRPC would
    quietly serve on the others)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for listen in (f"127.0.0.1:{port}", f"localhost:{port}"):
            env = {
                **os.environ,
                "OPCONNECT_DATA_DIR": str(tmp_path),
                "OPCONNECT_LISTEN": listen,
                "OPCONNECT_LOG_LEVEL": "warning",
            }
            done = subprocess.run(
                [sys.executable, "-m", "app.cli", "serve"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 1
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1, done.stderr
            assert lines[0].startswith(f"opconnect: cannot listen on {listen} (127.0.0.1)")
            assert "in use" in lines[0]
