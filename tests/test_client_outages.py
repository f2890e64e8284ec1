"""The client library end to end through outages, mid-stream: the server SIGKILLed and started
again, and PostgreSQL stopped and started under a running server. A follower of call records
gets every record exactly once, in order; a submitter of call durations gets every batch
acknowledged once and every record is stored once; the submitter sees the server's own
UNAVAILABLE where grpc.aio alone would often report INTERNAL (grpc/grpc#36066)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from opconnect.records.v1 import records_pb2 as records_pb
from opconnect.records.v1 import records_pb2_grpc as records_grpc
from opconnect.usage.v1 import usage_pb2 as usage_pb
from opconnect_client import EPOCH, Client, Connection, FileCheckpoint
from tests.conftest import OPERATOR, PLATFORM, Pki, settings_for, start_system
from tests.helpers import PrivatePostgres, ServerProcess
from tests.records_data import duration_record, ids, published, record

RECORDS_BEFORE, RECORDS_AFTER = 300, 200
DURATIONS, EARLY = 4_000, 1_000


class Flows:
    """A follower of the operator's records and a submitter of its durations, run by the
    library against `target`, until told to stop."""

    def __init__(self, connection: Connection, directory: Path) -> None:
        self.connection = connection
        self.checkpoint = FileCheckpoint(directory / "records.cursor")
        self.seen: list[str] = []
        self.cursors: list[str] = []
        self.records = [duration_record() for _ in range(DURATIONS)]
        self.acknowledged: list[str] = []
        self.outage = asyncio.Event()  # the submitter holds its last records until it starts

    async def _source(self) -> AsyncIterator[usage_pb.CallDurationRecord]:
        for index, item in enumerate(self.records):
            if index == EARLY:
                await self.outage.wait()
            yield item

    async def follow(self, client: Client, until: int) -> None:
        stream = client.follow_records(
            checkpoint=self.checkpoint, start_time=EPOCH, max_batch_size=50
        )
        async for batch in stream:
            self.seen += ids(batch.items)
            self.cursors.append(batch.cursor)
            if len(self.seen) >= until:
                await stream.aclose()
                return

    async def submit(self, client: Client) -> None:
        async for done in client.submit_durations(
            self._source(), batch_size=250, max_unacknowledged=4
        ):
            self.acknowledged += [r.record_id for r in done.results]


def publish(target: str, pki_ca: bytes, client: tuple[bytes, bytes], count: int) -> list[str]:
    """Publish `count` new records as the call controller, retrying while the system is still
    coming back; their call ids in publish order."""
    cert, key = client
    credentials = grpc.ssl_channel_credentials(pki_ca, key, cert)
    made = [record() for _ in range(count)]
    request = records_pb.PublishCallRecordsRequest(
        batch_id="b", records=[published(r, OPERATOR) for r in made]
    )
    deadline = time.monotonic() + 60
    while True:
        with grpc.secure_channel(target, credentials) as channel:
            stub = records_grpc.CallRecordIngestServiceStub(channel)
            try:
                (answer,) = list(stub.PublishCallRecords(iter([request]), timeout=20))
                assert answer.accepted_count == count
                return ids(made)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
        time.sleep(0.5)


async def until(check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_server_killed_and_restarted_mid_stream_loses_and_repeats_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = ServerProcess(tmp_path)
    pki = tmp_path / "pki"
    ca = (pki / "ca.pem").read_bytes()
    platform = (
        (pki / "clients" / f"platform-{PLATFORM}.pem").read_bytes(),
        (pki / "clients" / f"platform-{PLATFORM}.key").read_bytes(),
    )
    target = f"localhost:{server.port}"
    connection = Connection(
        target,
        pki / "ca.pem",
        pki / "clients" / f"operator-{OPERATOR}.pem",
        pki / "clients" / f"operator-{OPERATOR}.key",
    )
    flows = Flows(connection, tmp_path)
    expected = publish(target, ca, platform, RECORDS_BEFORE)
    caplog.set_level(logging.INFO, "opconnect_client")
    restarted: ServerProcess | None = None
    try:
        async with Client(connection) as client:
            follower = asyncio.create_task(flows.follow(client, RECORDS_BEFORE + RECORDS_AFTER))
            submitter = asyncio.create_task(flows.submit(client))
            await until(lambda: len(flows.seen) >= 100 and len(flows.acknowledged) >= 250)
            await asyncio.to_thread(server.kill)
            flows.outage.set()
            await asyncio.sleep(1)
            restarted = await asyncio.to_thread(ServerProcess, tmp_path, server.port)
            expected += await asyncio.to_thread(publish, target, ca, platform, RECORDS_AFTER)
            await asyncio.wait_for(asyncio.gather(follower, submitter), 120)
    finally:
        server.stop()
        if restarted is not None:
            restarted.stop()

    assert flows.seen == expected  # every record once, in order
    assert len(set(flows.cursors)) == len(flows.cursors)
    assert flows.acknowledged == [r.record_id for r in flows.records]
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'opconnect.db'}")
    with engine.connect() as connection_:
        count = connection_.execute(
            sa.text("SELECT count(*), count(DISTINCT record_id) FROM call_durations")
        ).one()
    engine.dispose()
    assert tuple(count) == (DURATIONS, DURATIONS)
    assert any("resumed after" in r.getMessage() for r in caplog.records)


@pytest.mark.postgres
async def test_postgres_stopped_and_started_mid_stream_loses_and_repeats_nothing(
    session_pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    database = PrivatePostgres()
    system = None
    try:
        system = start_system(settings_for(tmp_path, session_pki.paths, database.url), session_pki)
        paths = session_pki.paths
        ca = paths.ca_cert.read_bytes()
        platform = session_pki.client("platform", PLATFORM)
        connection = Connection(
            system.address, paths.ca_cert, *paths.client(f"operator-{OPERATOR}")
        )
        flows = Flows(connection, tmp_path)
        expected = publish(system.address, ca, platform, RECORDS_BEFORE)
        caplog.set_level(logging.INFO, "opconnect_client")
        async with Client(connection) as client:
            follower = asyncio.create_task(flows.follow(client, RECORDS_BEFORE + RECORDS_AFTER))
            submitter = asyncio.create_task(flows.submit(client))
            await until(lambda: len(flows.seen) >= 100 and len(flows.acknowledged) >= 250)
            await asyncio.to_thread(database.stop)
            flows.outage.set()  # the submitter sends on while the database is down
            await asyncio.sleep(3)
            await asyncio.to_thread(database.start)
            expected += await asyncio.to_thread(
                publish, system.address, ca, platform, RECORDS_AFTER
            )
            await asyncio.wait_for(asyncio.gather(follower, submitter), 120)
        assert flows.seen == expected
        assert flows.acknowledged == [r.record_id for r in flows.records]
        engine = sa.create_engine(database.url)
        with engine.connect() as connection_:
            count = connection_.execute(
                sa.text("SELECT count(*), count(DISTINCT record_id) FROM call_durations")
            ).one()
        engine.dispose()
        assert tuple(count) == (DURATIONS, DURATIONS)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("call durations interrupted (UNAVAILABLE" in w for w in warnings), warnings
    finally:
        if system is not None:
            system.stop()
        database.remove()
