"""`opconnect operator consents`: an operator lists, accepts, declines and terminates its
consents, and watches them change (resuming from its checkpoint file), on the client library."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from app.cli import main
from opconnect.numbers.v1 import consents_pb2 as pb
from opconnect.numbers.v1 import consents_pb2_grpc
from tests.conftest import OPERATOR, PLATFORM, RunningSystem


def _client(system: RunningSystem) -> list[str]:
    cert, key = system.pki.paths.client(f"operator-{OPERATOR}")
    return [
        "operator",
        *("--target", system.address),
        *("--ca", str(system.pki.paths.ca_cert)),
        *("--cert", str(cert)),
        *("--key", str(key)),
        "consents",
    ]


def _request(system: RunningSystem, tenant: str) -> None:
    admin = consents_pb2_grpc.ConsentAdminServiceStub(system.channel("platform", PLATFORM))
    admin.CreateConsent(pb.CreateConsentRequest(tenant_id=tenant, operator_id=OPERATOR))


def test_list_accept_decline_terminate_and_watch(
    sqlite_system: RunningSystem, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    system = sqlite_system
    first, second = sorted(str(uuid.uuid4()) for _ in range(2))
    for tenant in (first, second):
        _request(system, tenant)
    checkpoint = tmp_path / "consents.cursor"
    watch = [*_client(system), "watch", "--checkpoint", str(checkpoint), "--count", "0"]
    assert main(watch) == 0  # the first run lists (and saves the listing's cursor)
    listed = capsys.readouterr().out
    assert f"{first}  requested" in listed and f"{second}  requested" in listed
    assert main([*_client(system), "list", "--state", "requested"]) == 0
    out = capsys.readouterr().out
    assert first in out and second in out
    assert main([*_client(system), "accept", first]) == 0
    assert f"{first}: active" in capsys.readouterr().out
    assert main([*_client(system), "decline", second, "--reason", "region-not-served"]) == 0
    assert f"{second}: declined region-not-served" in capsys.readouterr().out
    assert main([*_client(system), "terminate", first, "--reason", "non-payment"]) == 0
    assert f"{first}: terminated non-payment" in capsys.readouterr().out
    # The watch resumes after the listing: exactly the three changes since, in order.
    assert main([*_client(system), "watch", "--checkpoint", str(checkpoint), "--count", "3"]) == 0
    changes = [line.split("  ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert changes == [
        f"{first}  requested -> active",
        f"{second}  requested -> declined region-not-served",
        f"{first}  active -> terminated non-payment",
    ]
    # A refused move says why, with the server's reason.
    assert main([*_client(system), "accept", first]) == 1
    assert "CONSENT_TRANSITION_INVALID" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a reason is required to decline
        main([*_client(system), "decline", second])
