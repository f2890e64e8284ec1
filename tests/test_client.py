"""The operators' client library (opconnect_client) against real servers over mutual TLS: files
checked before any call, list-then-watch with checkpoints (saved only once a batch is
processed, re-listed after CURSOR_EXPIRED), records followed across a server restart, durations
submitted across a cut, and the server's real status where grpc.aio would report its own
INTERNAL (grpc/grpc#36066)."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from opconnect.numbers.v1 import civic_addresses_pb2 as addresses_pb
from opconnect.numbers.v1 import numbers_pb2 as numbers_pb
from opconnect.records.v1 import records_pb2 as records_pb
from opconnect.usage.v1 import usage_pb2 as usage_pb
from opconnect_client import (
    Batch,
    Client,
    ClientError,
    Connection,
    FileCheckpoint,
    MemoryCheckpoint,
    ServerError,
    SqliteCheckpoint,
    timestamp,
)
from opconnect_client.backoff import Backoff
from services.numbers import storage as numbers_storage
from tests.conftest import (
    OPERATOR,
    OTHER_OPERATOR,
    OTHER_TENANT,
    PLATFORM,
    TENANT,
    Pki,
    RunningSystem,
    settings_for,
    start_system,
)
from tests.helpers import assign, stored, upload
from tests.records_data import (
    duration_record,
    ids,
    publish_records,
    record,
)

NUMBERS = ["+14255550100", "+14255550101", "+14255550102"]


def connection(system: RunningSystem, kind: str = "operator", ident: str = OPERATOR) -> Connection:
    cert, key = system.pki.paths.client(f"{kind}-{ident}")
    return Connection(system.address, system.pki.paths.ca_cert, cert, key)


async def take(stream: AsyncIterator[Batch[Any]], count: int) -> list[Batch[Any]]:
    """The next `count` batches of `stream` (each earlier one counts as processed)."""
    return [await asyncio.wait_for(anext(stream), 20) for _ in range(count)]


# --- the channel ---------------------------------------------------------------------------------


def test_a_key_that_is_not_the_certificates_is_named_in_one_line(
    session_pki: Pki, tmp_path: Path
) -> None:
    cert, _ = session_pki.paths.client(f"operator-{OPERATOR}")
    _, other_key = session_pki.paths.client(f"platform-{PLATFORM}")
    wrong = Connection("localhost:1", session_pki.paths.ca_cert, cert, other_key)
    with pytest.raises(ClientError, match="does not belong to the certificate") as raised:
        wrong.credentials()
    assert "\n" not in str(raised.value)
    missing = Connection("localhost:1", tmp_path / "nope.pem", cert, other_key)
    with pytest.raises(ClientError, match="cannot read the CA certificate"):
        missing.credentials()
    (tmp_path / "junk.pem").write_text("not a certificate")
    junk = Connection("localhost:1", session_pki.paths.ca_cert, tmp_path / "junk.pem", other_key)
    with pytest.raises(ClientError, match="not a PEM certificate"):
        junk.credentials()


def test_backoff_honours_retry_info_and_grows_with_jitter() -> None:
    backoff = Backoff(initial_s=1.0, maximum_s=8.0)
    delays = [backoff.delay() for _ in range(6)]
    assert all(0.5 <= d <= 8.0 for d in delays)
    told = ServerError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", retry_after_s=3.0)
    assert told.retryable
    assert 3.0 <= backoff.delay(told) <= 3.6
    assert not ServerError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too large").retryable
    backoff.reset()
    assert backoff.delay() <= 1.0


# --- checkpoints ---------------------------------------------------------------------------------


def test_checkpoints_keep_the_last_saved_cursor(tmp_path: Path) -> None:
    on_file = FileCheckpoint(tmp_path / "watch.cursor")
    assert on_file.load() == ""
    on_file.save("c1")
    on_file.save("c2")
    assert FileCheckpoint(tmp_path / "watch.cursor").load() == "c2"
    assert (tmp_path / "watch.cursor").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["watch.cursor"]  # no temporary left

    in_sqlite = SqliteCheckpoint(tmp_path / "app.db", "records")
    assert in_sqlite.load() == ""
    in_sqlite.save("r1")
    # Saved in the application's own transaction: rolled back with it, committed with it.
    own = sqlite3.connect(tmp_path / "app.db")
    in_sqlite.save("r2", own)
    own.rollback()
    assert SqliteCheckpoint(tmp_path / "app.db", "records").load() == "r1"
    in_sqlite.save("r3", own)
    own.commit()
    own.close()
    assert SqliteCheckpoint(tmp_path / "app.db", "records").load() == "r3"
    assert SqliteCheckpoint(tmp_path / "app.db", "other").load() == ""


# --- numbers -------------------------------------------------------------------------------------


async def test_watch_lists_then_watches_saving_only_processed_batches(
    system: RunningSystem, tmp_path: Path
) -> None:
    upload(system, *NUMBERS)
    assign(system, NUMBERS[0])
    checkpoint = FileCheckpoint(tmp_path / "watch.cursor")
    async with Client(connection(system)) as client:
        stream = client.watch_assignments(checkpoint=checkpoint)
        (listing,) = await take(stream, 1)
        assert listing.listing
        assert sorted(n.phone_number for n in listing.items) == NUMBERS
        assert listing.cursor
        assert checkpoint.load() == ""  # not processed yet: nothing saved
        assign(system, NUMBERS[1])
        (first,) = await take(stream, 1)
        assert checkpoint.load() == listing.cursor  # the listing was processed
        assert [(e.phone_number, e.type) for e in first.items] == [
            (NUMBERS[1], numbers_pb.ASSIGNMENT_EVENT_TYPE_ASSIGNED)
        ]
        await stream.aclose()  # stopped while "processing" the event: it comes again

    assign(system, NUMBERS[2])
    async with Client(connection(system)) as client:
        stream = client.watch_assignments(checkpoint=checkpoint)
        seen: list[str] = []
        while len(seen) < 2:
            (batch,) = await take(stream, 1)
            assert not batch.listing
            seen += [e.phone_number for e in batch.items]
        await stream.aclose()
    assert seen == NUMBERS[1:]


async def test_watch_lists_again_after_cursor_expired(
    system: RunningSystem, tmp_path: Path
) -> None:
    upload(system, *NUMBERS)
    old = system.numbers().ListNumbers(numbers_pb.ListNumbersRequest()).watch_cursor
    assign(system, NUMBERS[0])
    future = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    system.call(system.runtime.db.run(numbers_storage.purge_events, future, write=True))
    checkpoint = MemoryCheckpoint(old)
    async with Client(connection(system)) as client:
        stream = client.watch_assignments(checkpoint=checkpoint, max_batch_size=1)
        (listing,) = await take(stream, 1)
        assert listing.listing  # the state again, since the changes after `old` are gone
        states = {n.phone_number: n.state for n in listing.items}
        assert len(states) == 3
        assign(system, NUMBERS[1])
        (event,) = await take(stream, 1)
        assert [e.phone_number for e in event.items] == [NUMBERS[1]]
        await stream.aclose()
    assert checkpoint.load() == listing.cursor


async def test_unary_failures_carry_the_servers_details(sqlite_system: RunningSystem) -> None:
    async with Client(connection(sqlite_system)) as client:
        with pytest.raises(ServerError) as raised:
            await client.get_number("+14255550199")
        assert raised.value.code == grpc.StatusCode.NOT_FOUND
        assert raised.value.reason == "NUMBER_NOT_FOUND"
        with pytest.raises(ServerError) as bad:
            await client.get_number("not a number")
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "phone_number" in bad.value.violations
        uploaded = await client.upload_numbers(
            "6f1a4b2c-8d3e-4f5a-9b6c-7d8e9f0a1b2c",
            [
                numbers_pb.NumberUpload(
                    phone_number=n,
                    usage=numbers_pb.NUMBER_USAGE_USER,
                    capabilities=numbers_pb.Capabilities(inbound=True, outbound=True),
                    allow_tenant_address_update=True,
                )
                for n in NUMBERS
            ],
        )
        assert uploaded.added_count == 3
        listed = [
            n.phone_number async for page in client.list_numbers(page_size=2) for n in page.numbers
        ]
        assert sorted(listed) == NUMBERS
        released = await client.release_numbers(NUMBERS[:1])
        assert released.released_count == 1


# --- civic addresses -----------------------------------------------------------------------------


def an_address(tenant: str = TENANT, street: str = "Microsoft") -> addresses_pb.CivicAddress:
    return addresses_pb.CivicAddress(
        tenant_id=tenant,
        country_code="US",
        house_number="1",
        street_name=street,
        city="Redmond",
        state_or_province="WA",
        postal_code="98052",
        company_name="Contoso",
        locations=[addresses_pb.Location(description="Floor 1", elin="ELIN-1")],
    )


async def test_civic_addresses_created_listed_updated_and_deleted(
    system: RunningSystem,
) -> None:
    async with Client(connection(system)) as client:
        request_id = str(uuid.uuid4())
        first = await client.create_civic_address(an_address(), request_id)
        assert first.civic_address_id and first.locations[0].location_id
        assert first.created_by == addresses_pb.CIVIC_ADDRESS_AUTHOR_OPERATOR
        again = await client.create_civic_address(an_address(street="Other"), request_id)
        assert again.civic_address_id == first.civic_address_id  # a retry creates nothing
        made = [first] + [
            await client.create_civic_address(an_address(tenant, f"Street {n}"))
            for n, tenant in enumerate([TENANT, OTHER_TENANT, OTHER_TENANT])
        ]
        # Listed by pages with the test system's own (one per consented tenant).
        theirs = {v for (o, _), v in system.addresses.items() if o == OPERATOR}
        pages = [page async for page in client.list_civic_addresses(page_size=2)]
        assert [len(page.civic_addresses) for page in pages] == [2, 2, 2]
        listed = [a.civic_address_id for page in pages for a in page.civic_addresses]
        assert sorted(listed) == sorted([*(a.civic_address_id for a in made), *theirs])
        of_tenant = [
            a.tenant_id
            async for page in client.list_civic_addresses(OTHER_TENANT)
            for a in page.civic_addresses
        ]
        assert of_tenant == [OTHER_TENANT] * 3
        assert (await client.get_civic_address(first.civic_address_id)) == first

        # Only the fields the mask names change; a location sent with its id is kept.
        change = addresses_pb.CivicAddress(
            civic_address_id=first.civic_address_id,
            street_name="Ignored",
            postal_code="98053",
            locations=[
                addresses_pb.Location(
                    location_id=first.locations[0].location_id, description="Ground floor"
                ),
                addresses_pb.Location(description="Roof"),
            ],
        )
        updated = await client.update_civic_address(change, ["postal_code", "locations"])
        assert (updated.street_name, updated.postal_code) == ("Microsoft", "98053")
        assert updated.locations[0].location_id == first.locations[0].location_id
        assert [x.description for x in updated.locations] == ["Ground floor", "Roof"]
        assert not updated.locations[0].elin  # as sent: the ELIN left out is cleared

        # The number's address: set at upload, changed with a mask.
        number = numbers_pb.NumberUpload(
            phone_number=NUMBERS[0],
            usage=numbers_pb.NUMBER_USAGE_USER,
            capabilities=numbers_pb.Capabilities(inbound=True, outbound=True),
            civic_address_id=first.civic_address_id,
        )
        assert (await client.upload_numbers(TENANT, [number])).added_count == 1
        moved = await client.update_number(
            numbers_pb.PhoneNumber(
                phone_number=NUMBERS[0],
                civic_address_id=made[1].civic_address_id,
                ticket_id="T-1",
                calling_profile_id="not looked at: not in the mask",
            ),
            ["civic_address_id", "ticket_id"],
        )
        assert (moved.civic_address_id, moved.ticket_id) == (made[1].civic_address_id, "T-1")
        assert moved.emergency_location.civic_address.street_name == "Street 0"

        # Errors carry the server's reason and the field at fault.
        bad = an_address()
        bad.country_code = "XX"
        bad.locations[0].description = ""
        with pytest.raises(ServerError) as raised:
            await client.create_civic_address(bad)
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.reason == "CIVIC_ADDRESS_INVALID"
        assert {"civic_address.country_code", "civic_address.locations[0].description"} <= set(
            raised.value.violations
        )
        with pytest.raises(ServerError) as raised:
            await client.update_civic_address(change, [])
        assert raised.value.reason == "UPDATE_MASK_INVALID"
        with pytest.raises(ServerError) as raised:
            await client.update_number(numbers_pb.PhoneNumber(phone_number=NUMBERS[0]), ["usage"])
        assert raised.value.reason == "UPDATE_MASK_INVALID"
        with pytest.raises(ServerError) as raised:
            await client.delete_civic_address(made[1].civic_address_id)
        assert (raised.value.code, raised.value.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "CIVIC_ADDRESS_IN_USE",
        )
        await client.delete_civic_address(first.civic_address_id)
        with pytest.raises(ServerError) as raised:
            await client.get_civic_address(first.civic_address_id)
        assert raised.value.reason == "CIVIC_ADDRESS_NOT_FOUND"

    # Another operator sees none of them.
    async with Client(connection(system, ident=OTHER_OPERATOR)) as other:
        listed = [
            a.civic_address_id
            async for page in other.list_civic_addresses()
            for a in page.civic_addresses
        ]
        assert not set(listed) & {a.civic_address_id for a in made}
        with pytest.raises(ServerError) as raised:
            await other.get_civic_address(made[1].civic_address_id)
        assert raised.value.reason == "CIVIC_ADDRESS_NOT_FOUND"


# --- call records --------------------------------------------------------------------------------


async def test_records_followed_across_a_server_restart_arrive_once_in_order(
    session_pki: Pki, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'opconnect.db'}"
    first = start_system(settings_for(tmp_path, session_pki.paths, url), session_pki)
    port = first.runtime.port
    published = [record() for _ in range(120)]
    publish_records(first.ingest(), published)
    checkpoint = FileCheckpoint(tmp_path / "records.cursor")
    target = Connection(
        f"localhost:{port}",
        session_pki.paths.ca_cert,
        *session_pki.paths.client(f"operator-{OPERATOR}"),
    )
    seen: list[str] = []
    second: RunningSystem | None = None
    try:
        async with Client(target) as client:
            stream = client.follow_records(
                checkpoint=checkpoint,
                start_time=dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
                max_batch_size=20,
            )
            for batch in await take(stream, 2):
                seen += ids(batch.items)
            await asyncio.to_thread(first.stop)  # mid-stream: the client waits, then resumes
            settings = settings_for(tmp_path, session_pki.paths, url, listen=f"127.0.0.1:{port}")
            second = await asyncio.to_thread(start_system, settings, session_pki)
            later = [record() for _ in range(30)]
            publish_records(second.ingest(), later)
            while len(seen) < 150:
                (batch,) = await take(stream, 1)
                assert not batch.gap
                seen += ids(batch.items)
            await stream.aclose()
    finally:
        if second is not None:
            second.stop()
    assert seen == ids(published) + ids(later)


# --- call durations ------------------------------------------------------------------------------


async def test_durations_submitted_are_each_acknowledged_once(system: RunningSystem) -> None:
    records = [duration_record() for _ in range(2_500)]
    async with Client(connection(system)) as client:
        acknowledged = [
            a async for a in client.submit_durations(records, batch_size=200, max_unacknowledged=3)
        ]
    assert [r.record_id for a in acknowledged for r in a.results] == [r.record_id for r in records]
    assert sum(a.accepted for a in acknowledged) == 2_500
    assert sorted(stored(system)) == sorted(r.record_id for r in records)


async def test_a_server_ending_the_stream_is_reported_with_its_own_status(
    sqlite_system: RunningSystem,
) -> None:
    """A platform principal may not submit durations: the server ends the stream at once with
    PERMISSION_DENIED while the client has batches in flight; grpc.aio would often report
    INTERNAL instead (grpc/grpc#36066). The library reports what the server said, every time."""
    records = [duration_record() for _ in range(8_000)]
    async with Client(connection(sqlite_system, "platform", PLATFORM)) as client:
        for _ in range(5):
            with pytest.raises(ServerError) as raised:
                async for _acknowledged in client.submit_durations(
                    records, batch_size=1_000, max_unacknowledged=8
                ):
                    pass
            assert (raised.value.code, raised.value.reason) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "OPERATOR_ONLY",
            )


async def test_durations_are_resent_after_a_server_restart_and_stored_once(
    session_pki: Pki, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'opconnect.db'}"
    first = start_system(settings_for(tmp_path, session_pki.paths, url), session_pki)
    port = first.runtime.port
    target = Connection(
        f"localhost:{port}",
        session_pki.paths.ca_cert,
        *session_pki.paths.client(f"operator-{OPERATOR}"),
    )
    records = [duration_record() for _ in range(6_000)]
    acknowledged: list[Any] = []
    second: RunningSystem | None = None
    try:
        async with Client(target) as client:
            stream = client.submit_durations(records, batch_size=500, max_unacknowledged=4)
            acknowledged.append(await asyncio.wait_for(anext(stream), 30))
            await asyncio.to_thread(first.stop)  # batches in flight
            settings = settings_for(tmp_path, session_pki.paths, url, listen=f"127.0.0.1:{port}")
            second = await asyncio.to_thread(start_system, settings, session_pki)
            acknowledged += [a async for a in stream]
        results = [r for a in acknowledged for r in a.results]
        assert [r.record_id for r in results] == [r.record_id for r in records]
        assert {r.outcome for r in results} <= {
            usage_pb.CALL_DURATION_OUTCOME_ACCEPTED,
            usage_pb.CALL_DURATION_OUTCOME_DUPLICATE,
        }
        assert sorted(stored(second)) == sorted(r.record_id for r in records)
    finally:
        if second is not None:
            second.stop()


async def test_reads_of_records_usage_and_reconciliation(sqlite_system: RunningSystem) -> None:
    """Every other operator read, through the library: a call record, the quality summary, the
    usage summary, the reconciliation and its discrepancies, the last resumable from a
    checkpoint."""
    system = sqlite_system
    published = record()
    publish_records(system.ingest(), [published])
    mine = [duration_record() for _ in range(5)]  # calls the platform does not know
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    end = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    since, until = timestamp(start), timestamp(end)
    async with Client(connection(system)) as client:
        got = await client.get_call_record(published.call_id)
        assert got.call_id == published.call_id
        quality = await client.get_quality_summary(
            records_pb.GetQualitySummaryRequest(start_time=since, end_time=until)
        )
        assert sum(g.call_count for g in quality.groups) == 1
        async for _ in client.submit_durations(mine):
            pass
        usage = await client.get_usage_summary(
            usage_pb.GetUsageSummaryRequest(
                start_time=since, end_time=until, granularity=usage_pb.GRANULARITY_DAY
            )
        )
        assert usage.rows
        found = await client.get_reconciliation(
            usage_pb.GetReconciliationRequest(start_time=since, end_time=until)
        )
        assert found.operator_only_count == 5
        checkpoint = MemoryCheckpoint()
        request = usage_pb.StreamDiscrepanciesRequest(
            start_time=since, end_time=until, max_batch_size=2
        )
        stream = client.stream_discrepancies(request, checkpoint)
        first = await anext(stream)
        await stream.aclose()  # stopped after one batch, which was not processed yet
        resumed = [
            x.call_id
            async for batch in client.stream_discrepancies(request, checkpoint)
            for x in batch.items
        ]
    assert len(first.items) == 2
    assert sorted(resumed) == sorted(r.call_id for r in mine)  # from the start: none saved
    assert checkpoint.load()
