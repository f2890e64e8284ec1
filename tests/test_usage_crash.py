"""A server killed with SIGKILL in the middle of a SubmitCallDurations stream, then restarted on
the same database: every record it acknowledged is there, exactly once, and resending every
batch it had not acknowledged leaves each record stored once."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import sqlalchemy as sa

from opconnect.usage.v1 import usage_pb2 as pb
from opconnect.usage.v1 import usage_pb2_grpc as pb_grpc
from tests.helpers import ServerProcess
from tests.records_data import duration_record

BATCHES, SIZE = 40, 500


def _stub(data_dir: Path, address: str) -> tuple[grpc.Channel, pb_grpc.UsageServiceStub]:
    pki = data_dir / "pki"
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / "clients" / "operator-contoso-telecom.key").read_bytes(),
        certificate_chain=(pki / "clients" / "operator-contoso-telecom.pem").read_bytes(),
    )
    channel = grpc.secure_channel(address, credentials)
    return channel, pb_grpc.UsageServiceStub(channel)


def _requests(
    batches: list[list[pb.CallDurationRecord]],
) -> Iterator[pb.SubmitCallDurationsRequest]:
    for index, batch in enumerate(batches):
        yield pb.SubmitCallDurationsRequest(batch_id=str(index), records=batch)


def test_sigkill_during_ingest_loses_nothing_acknowledged(tmp_path: Path) -> None:
    batches = [[duration_record() for _ in range(SIZE)] for _ in range(BATCHES)]
    server = ServerProcess(tmp_path)
    process, address = server.process, server.address
    acknowledged: list[str] = []
    try:
        channel, stub = _stub(tmp_path, address)
        call = stub.SubmitCallDurations(_requests(batches))
        try:
            for response in call:
                assert response.accepted_count == SIZE
                acknowledged += [r.record_id for r in response.results]
                if len(acknowledged) >= 5 * SIZE:
                    process.send_signal(signal.SIGKILL)  # mid-stream, batches in flight
                    break
        finally:
            channel.close()
        assert process.wait(30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'opconnect.db'}")
    with engine.connect() as connection:
        stored = [r for (r,) in connection.execute(sa.text("SELECT record_id FROM call_durations"))]
    engine.dispose()
    assert set(acknowledged) <= set(stored), "an acknowledged record was lost"
    assert len(stored) == len(set(stored))

    # Restarted on the same database: resend every batch that was not acknowledged.
    server = ServerProcess(tmp_path)
    process, address = server.process, server.address
    try:
        channel, stub = _stub(tmp_path, address)
        with channel:
            resent = list(stub.SubmitCallDurations(_requests(batches[len(acknowledged) // SIZE :])))
        assert all(
            r.outcome in (pb.CALL_DURATION_OUTCOME_ACCEPTED, pb.CALL_DURATION_OUTCOME_DUPLICATE)
            for response in resent
            for r in response.results
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'opconnect.db'}")
    with engine.connect() as connection:
        count = connection.execute(
            sa.text("SELECT count(*), count(DISTINCT record_id) FROM call_durations")
        ).one()
    engine.dispose()
    assert tuple(count) == (BATCHES * SIZE, BATCHES * SIZE)
