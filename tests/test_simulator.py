"""The traffic simulator against a running system: numbers assigned, a realistic mix of calls
published, and the operator's stream shows them with their quality."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from pathlib import Path

import pytest

from opconnect.numbers.v1 import consents_pb2, consents_pb2_grpc, numbers_pb2
from opconnect.records.v1 import records_pb2 as pb
from opconnect.type.v1 import assignment_state_pb2
from opconnect.usage.v1 import usage_pb2 as usage_pb
from simulator import run
from simulator.run import Options, simulate
from tests.conftest import Pki, RunningSystem
from tests.helpers import eventually, feed_system, kept, usage_stub
from tests.records_data import stamp, stream_all


def test_simulator_feeds_an_operator_stream(
    sqlite_system: RunningSystem, capsys: pytest.CaptureFixture[str]
) -> None:
    started = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    options = Options(
        target=sqlite_system.address,
        pki_dir=sqlite_system.pki.paths.directory,
        numbers=10,
        rate=2_000.0,
        calls=400,
        poor_share=0.3,
        seed=3,
        tenant="5e4d3c2b-1a0f-4e9d-8c7b-6a5f4e3d2c1b",  # no consent yet: the simulator makes one
    )
    assert asyncio.run(simulate(options)) == 0
    said = capsys.readouterr().out
    # The address change: the operator edited the numbers' address, and the watch saw the
    # UPDATED event of every assigned number referring to it (all ten: they share it).
    assert "address change: the operator edited civic address" in said
    assert "the watch saw 10 UPDATED event(s) with the new emergency location" in said
    consents = consents_pb2_grpc.ConsentServiceStub(sqlite_system.channel())
    consent = consents.GetConsent(consents_pb2.GetConsentRequest(tenant_id=options.tenant))
    assert consent.consent.state == consents_pb2.CONSENT_STATE_ACTIVE
    assigned = sqlite_system.numbers().ListNumbers(
        numbers_pb2.ListNumbersRequest(
            tenant_id=options.tenant, state=assignment_state_pb2.ASSIGNMENT_STATE_ASSIGNED
        )
    )
    numbers = {n.phone_number for n in assigned.numbers}
    assert len(numbers) == 10
    note = assigned.numbers[0].emergency_location.civic_address.description
    assert note.startswith("emergency address checked by opconnect simulate at")
    records, _, _ = stream_all(sqlite_system.records(), start_time=stamp(started))
    assert len(records) == 400
    assert all(
        r.caller in numbers or r.callee in numbers or r.caller.startswith("sip:") for r in records
    )
    classes = Counter(r.quality_class for r in records)
    assert classes[pb.QUALITY_CLASS_POOR] > 40
    assert classes[pb.QUALITY_CLASS_GOOD] > 100
    codes = Counter(r.final_sip_code for r in records)
    assert codes[200] > 200 and len(codes) >= 5
    # A second run reuses the numbers and adds new calls; its edit of the address is its own
    # (also within the same second as the first run's), so its watch sees the events again.
    assert asyncio.run(simulate(Options(**{**options.__dict__, "calls": 50}))) == 0
    assert "the watch saw 10 UPDATED event(s)" in capsys.readouterr().out
    records, _, _ = stream_all(sqlite_system.records(), start_time=stamp(started))
    assert len(records) == 450


def test_simulator_says_when_the_system_is_down(
    session_pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens there (no system started): no need to wait its whole connect timeout.
    monkeypatch.setattr(run, "CONNECT_TIMEOUT_S", 0.5)
    options = Options(target="127.0.0.1:1", pki_dir=session_pki.paths.directory, calls=1)
    assert asyncio.run(simulate(options)) == 1


def test_the_simulated_operator_gives_reconciliation_something_to_find(
    session_pki: Pki, tmp_path: Path
) -> None:
    system = feed_system(session_pki, tmp_path)
    try:
        started = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        options = Options(
            target=system.address,
            pki_dir=system.pki.paths.directory,
            rate=2_000.0,
            calls=400,
            seed=8,
            missing_share=0.1,
            mismatch_share=0.1,
            extra_share=0.05,
            unanswered_share=0.1,
        )
        assert asyncio.run(simulate(options)) == 0
        eventually(lambda: len(kept(system)) == 400)
        found = usage_stub(system).GetReconciliation(
            usage_pb.GetReconciliationRequest(
                start_time=stamp(started - dt.timedelta(hours=3)),
                end_time=stamp(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)),
            )
        )
        assert found.matched_count > 150
        assert found.mismatch_count > 5
        assert found.platform_only_count > 5
        assert found.operator_only_count > 2
        assert found.unanswered_on_platform_count > 2
    finally:
        system.stop()
