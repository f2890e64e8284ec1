"""The whole number and its emergency location through real servers over mutual TLS, on both
backends: upload with the new fields and every refusal, ALREADY_PRESENT and DATA_CONFLICT on
them, UpdateNumber, the customer's UpdateNumberEmergencyAddress, GetNumber and ListNumbers
showing the emergency location, ASSIGNED and UPDATED events carrying it across a cut and a
resume (an edit of the address fans out, the earlier event still shows the old address when
replayed), isolation, the metrics, and the numbers and events stored before migration 0013."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import uuid
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session

from opconnect.numbers.v1 import civic_addresses_pb2 as addresses_pb
from opconnect.numbers.v1 import civic_addresses_pb2_grpc as addresses_grpc
from opconnect.numbers.v1 import numbers_pb2 as pb
from opconnect.type.v1 import assignment_state_pb2 as state_pb
from plumbing import partitions
from plumbing.changelog import encode_cursor
from services.numbers import address_storage
from services.numbers.convert import address_in as addresses_in
from services.numbers.rules import LOG
from tests.conftest import (
    NO_POSTGRES,
    OPERATOR,
    OTHER_OPERATOR,
    OTHER_TENANT,
    POSTGRES_URL,
    TENANT,
    USER_ID,
    Pki,
    RunningSystem,
    Watcher,
    address_message,
    migrated_postgres,
    rich_error,
    settings_for,
    start_system,
)
from tests.helpers import BOTH, USER, assign, migrate, sample, scrape

DOMAIN = "numbers.opconnect"
PROFILE = "7a8b9c0d-1e2f-4a3b-8c4d-5e6f7a8b9c0d"
ASSIGNED, UNASSIGNED, UPDATED = (
    pb.ASSIGNMENT_EVENT_TYPE_ASSIGNED,
    pb.ASSIGNMENT_EVENT_TYPE_UNASSIGNED,
    pb.ASSIGNMENT_EVENT_TYPE_UPDATED,
)


def addresses(
    system: RunningSystem, operator: str = OPERATOR
) -> addresses_grpc.CivicAddressServiceStub:
    return addresses_grpc.CivicAddressServiceStub(system.channel("operator", operator))


def new_address(
    system: RunningSystem, tenant: str = TENANT, street: str = "Microsoft Way"
) -> addresses_pb.CivicAddress:
    message = address_message(tenant, street_name=street)
    response: addresses_pb.CreateCivicAddressResponse = addresses(system).CreateCivicAddress(
        addresses_pb.CreateCivicAddressRequest(civic_address=message)
    )
    return response.civic_address


def upload_one(
    system: RunningSystem, item: pb.NumberUpload, tenant: str = TENANT, operator: str = OPERATOR
) -> pb.NumberResult:
    answer: pb.UploadNumbersResponse = system.numbers(operator).UploadNumbers(
        pb.UploadNumbersRequest(tenant_id=tenant, numbers=[item])
    )
    (result,) = answer.results
    return result


def item(number: str, **fields: object) -> pb.NumberUpload:
    upload = pb.NumberUpload(phone_number=number, usage=USER, capabilities=BOTH)
    for name, value in fields.items():
        setattr(upload, name, value)
    return upload


def update_number(
    system: RunningSystem, number: pb.PhoneNumber, *paths: str, operator: str = OPERATOR
) -> pb.PhoneNumber:
    response: pb.UpdateNumberResponse = system.numbers(operator).UpdateNumber(
        pb.UpdateNumberRequest(number=number, update_mask=field_mask_pb2.FieldMask(paths=paths))
    )
    return response.number


def customer_sets(
    system: RunningSystem, number: str, address_id: str, location_id: str = "", tenant: str = TENANT
) -> pb.PhoneNumber:
    response: pb.UpdateNumberEmergencyAddressResponse = system.admin().UpdateNumberEmergencyAddress(
        pb.UpdateNumberEmergencyAddressRequest(
            phone_number=number,
            tenant_id=tenant,
            civic_address_id=address_id,
            location_id=location_id,
        )
    )
    return response.number


def refused(call: object) -> tuple[grpc.StatusCode, str]:
    assert callable(call)
    with pytest.raises(grpc.RpcError) as caught:
        call()
    rich = rich_error(caught.value)
    return rich.code, rich.reason


def get(system: RunningSystem, number: str, operator: str = OPERATOR) -> pb.PhoneNumber:
    response: pb.GetNumberResponse = system.numbers(operator).GetNumber(
        pb.GetNumberRequest(phone_number=number)
    )
    return response.number


def test_an_upload_keeps_every_field_and_shows_the_emergency_location(
    system: RunningSystem,
) -> None:
    made = new_address(system)
    floor = made.locations[0]
    result = upload_one(
        system,
        item(
            "+14255550100",
            calling_profile_id=PROFILE.upper(),
            civic_address_id=made.civic_address_id,
            location_id=floor.location_id,
            iso_country_code="us",
            ticket_id="ORDER-1234",
        ),
    )
    assert result.outcome == pb.NUMBER_OUTCOME_DONE, result
    number = get(system, "+14255550100")
    assert (
        number.calling_profile_id,
        number.civic_address_id,
        number.location_id,
        number.iso_country_code,
        number.ticket_id,
        number.allow_tenant_address_update,
    ) == (PROFILE, made.civic_address_id, floor.location_id, "US", "ORDER-1234", False)
    where = number.emergency_location
    assert where.civic_address.street_name == "Microsoft Way"
    assert list(where.civic_address.locations) == []  # the number's own is `location`
    assert where.location == floor
    listed = system.numbers().ListNumbers(pb.ListNumbersRequest(tenant_id=TENANT))
    assert [n for n in listed.numbers if n.phone_number == "+14255550100"] == [number]
    # The same again: already present; anything else different: a conflict.
    same = item(
        "+14255550100",
        calling_profile_id=PROFILE,
        civic_address_id=made.civic_address_id,
        location_id=floor.location_id,
        iso_country_code="US",
        ticket_id="ORDER-1234",
    )
    assert upload_one(system, same).outcome == pb.NUMBER_OUTCOME_ALREADY_PRESENT
    same.ticket_id = "ORDER-9"
    assert upload_one(system, same).reason == "DATA_CONFLICT"


def test_every_refusal_of_the_new_fields(system: RunningSystem) -> None:
    ours = new_address(system)
    theirs = new_address(system, OTHER_TENANT)
    cases = {
        "+14255550110": (item("+14255550110"), "CIVIC_ADDRESS_REQUIRED"),
        "+14255550111": (
            item("+14255550111", civic_address_id=ours.civic_address_id, calling_profile_id="x"),
            "CALLING_PROFILE_ID_INVALID",
        ),
        "+14255550112": (
            item("+14255550112", civic_address_id=str(uuid.uuid4())),
            "CIVIC_ADDRESS_NOT_FOUND",
        ),
        "+14255550113": (
            item("+14255550113", civic_address_id=theirs.civic_address_id),
            "CIVIC_ADDRESS_NOT_FOUND",  # another tenant's: not one of this tenant's
        ),
        "+14255550114": (
            item(
                "+14255550114",
                civic_address_id=ours.civic_address_id,
                location_id=theirs.locations[0].location_id,
            ),
            "LOCATION_NOT_FOUND",
        ),
        "+18005550115": (
            item("+18005550115", civic_address_id=ours.civic_address_id),
            "ISO_COUNTRY_CODE_REQUIRED",
        ),
        "+14255550116": (
            item("+14255550116", civic_address_id=ours.civic_address_id, iso_country_code="GB"),
            "ISO_COUNTRY_CODE_INVALID",
        ),
        "+14255550117": (
            item("+14255550117", civic_address_id=ours.civic_address_id, ticket_id="x" * 65),
            "TICKET_ID_INVALID",
        ),
    }
    answer = system.numbers().UploadNumbers(
        pb.UploadNumbersRequest(tenant_id=TENANT, numbers=[i for i, _ in cases.values()])
    )
    got = {r.phone_number: r.reason for r in answer.results}
    assert got == {n: reason for n, (_, reason) in cases.items()}
    assert answer.refused_count == len(cases) and answer.added_count == 0
    # A toll-free number with its country, and a USER number the customer will address.
    fine = [
        item("+18005550118", civic_address_id=ours.civic_address_id, iso_country_code="CA"),
        item("+14255550119", allow_tenant_address_update=True),
    ]
    answer = system.numbers().UploadNumbers(pb.UploadNumbersRequest(tenant_id=TENANT, numbers=fine))
    assert answer.added_count == 2, answer
    assert not get(system, "+14255550119").HasField("emergency_location")


def test_update_number(system: RunningSystem) -> None:
    first, second = new_address(system), new_address(system, street="NE 36th St")
    upload_one(system, item("+14255550120", civic_address_id=first.civic_address_id))
    changed = update_number(
        system,
        pb.PhoneNumber(
            phone_number="+14255550120",
            civic_address_id=second.civic_address_id,
            location_id=second.locations[1].location_id,
            ticket_id="T-2",
            calling_profile_id=PROFILE,
            usage=pb.NUMBER_USAGE_CONFERENCE,  # not in the mask: ignored
        ),
        "civic_address_id",
        "location_id",
        "ticket_id",
        "calling_profile_id",
    )
    assert (changed.civic_address_id, changed.location_id, changed.ticket_id) == (
        second.civic_address_id,
        second.locations[1].location_id,
        "T-2",
    )
    assert changed.usage == pb.NUMBER_USAGE_USER
    assert changed.emergency_location.civic_address.street_name == "NE 36th St"
    assert changed.emergency_location.location.description == "Floor 2"
    assert get(system, "+14255550120") == changed
    # A new address without a location in the mask drops the old address's location.
    moved = update_number(
        system,
        pb.PhoneNumber(phone_number="+14255550120", civic_address_id=first.civic_address_id),
        "civic_address_id",
    )
    assert (moved.location_id, moved.emergency_location.HasField("location")) == ("", False)
    unchanged = update_number(
        system, pb.PhoneNumber(phone_number="+14255550120", ticket_id="T-2"), "ticket_id"
    )
    assert unchanged.update_time == moved.update_time
    theirs = new_address(system, OTHER_TENANT)
    number = "+14255550120"
    cases = {
        "mask empty": (pb.PhoneNumber(phone_number=number), ()),
        "mask usage": (pb.PhoneNumber(phone_number=number), ("usage",)),
        "bad number": (pb.PhoneNumber(phone_number="42", ticket_id="x"), ("ticket_id",)),
        "unknown number": (pb.PhoneNumber(phone_number="+14255550999"), ("ticket_id",)),
        "profile": (
            pb.PhoneNumber(phone_number=number, calling_profile_id="p"),
            ("calling_profile_id",),
        ),
        "ticket": (pb.PhoneNumber(phone_number=number, ticket_id="\x00"), ("ticket_id",)),
        "address gone": (
            pb.PhoneNumber(phone_number=number, civic_address_id=str(uuid.uuid4())),
            ("civic_address_id",),
        ),
        "location": (
            pb.PhoneNumber(phone_number=number, location_id=theirs.locations[0].location_id),
            ("location_id",),
        ),
        "address of another tenant": (
            pb.PhoneNumber(phone_number=number, civic_address_id=theirs.civic_address_id),
            ("civic_address_id",),
        ),
        "no address": (pb.PhoneNumber(phone_number=number), ("civic_address_id",)),
    }
    got = {
        name: refused(lambda m=message, p=paths: update_number(system, m, *p))
        for name, (message, paths) in cases.items()
    }
    invalid, missing, state = (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert got == {
        "mask empty": (invalid, "UPDATE_MASK_INVALID"),
        "mask usage": (invalid, "UPDATE_MASK_INVALID"),
        "bad number": (invalid, "PHONE_NUMBER_INVALID"),
        "unknown number": (missing, "NUMBER_NOT_FOUND"),
        "profile": (invalid, "NUMBER_INVALID"),
        "ticket": (invalid, "NUMBER_INVALID"),
        "address gone": (missing, "CIVIC_ADDRESS_NOT_FOUND"),
        "location": (missing, "LOCATION_NOT_FOUND"),
        "address of another tenant": (state, "TENANT_MISMATCH"),
        "no address": (state, "CIVIC_ADDRESS_REQUIRED"),
    }
    # The customer may set it: then the address may go.
    allowed = update_number(
        system,
        pb.PhoneNumber(phone_number=number, allow_tenant_address_update=True),
        "allow_tenant_address_update",
        "civic_address_id",
    )
    assert (allowed.civic_address_id, allowed.HasField("emergency_location")) == ("", False)
    # Another operator's number is no number of this one.
    assert refused(
        lambda: update_number(
            system,
            pb.PhoneNumber(phone_number=number, ticket_id="x"),
            "ticket_id",
            operator=OTHER_OPERATOR,
        )
    ) == (missing, "NUMBER_NOT_FOUND")


def test_the_customer_sets_the_address_where_allowed(system: RunningSystem) -> None:
    made = new_address(system)
    upload_one(system, item("+14255550130", allow_tenant_address_update=True))
    upload_one(system, item("+14255550131", civic_address_id=made.civic_address_id))
    floor = made.locations[0].location_id
    number = customer_sets(system, "+14255550130", made.civic_address_id, floor)
    assert (number.civic_address_id, number.emergency_location.location.location_id) == (
        made.civic_address_id,
        floor,
    )
    again = customer_sets(system, "+14255550130", made.civic_address_id, floor)
    assert again.update_time == number.update_time  # what is set already: nothing changes
    cleared = customer_sets(system, "+14255550130", "")
    assert not cleared.HasField("emergency_location")
    invalid, missing, state = (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    theirs = new_address(system, OTHER_TENANT)
    cases = {
        "not allowed": (lambda: customer_sets(system, "+14255550131", made.civic_address_id)),
        "other tenant's number": (
            lambda: customer_sets(
                system, "+14255550130", made.civic_address_id, tenant=OTHER_TENANT
            )
        ),
        "other tenant's address": (
            lambda: customer_sets(system, "+14255550130", theirs.civic_address_id)
        ),
        "unknown address": (lambda: customer_sets(system, "+14255550130", str(uuid.uuid4()))),
        "unknown location": (
            lambda: customer_sets(system, "+14255550130", made.civic_address_id, str(uuid.uuid4()))
        ),
        "unknown number": (lambda: customer_sets(system, "+14255550999", made.civic_address_id)),
        "bad number": (lambda: customer_sets(system, "42", made.civic_address_id)),
        "bad tenant": (lambda: customer_sets(system, "+14255550130", "", tenant="x")),
        "bad address": (lambda: customer_sets(system, "+14255550130", "x")),
        "bad location": (lambda: customer_sets(system, "+14255550130", made.civic_address_id, "x")),
        "location alone": (lambda: customer_sets(system, "+14255550130", "", floor)),
    }
    got = {name: refused(call) for name, call in cases.items()}
    assert got == {
        "not allowed": (state, "ADDRESS_UPDATE_NOT_ALLOWED"),
        "other tenant's number": (state, "TENANT_MISMATCH"),
        "other tenant's address": (state, "TENANT_MISMATCH"),
        "unknown address": (missing, "CIVIC_ADDRESS_NOT_FOUND"),
        "unknown location": (missing, "LOCATION_NOT_FOUND"),
        "unknown number": (missing, "NUMBER_NOT_FOUND"),
        "bad number": (invalid, "PHONE_NUMBER_INVALID"),
        "bad tenant": (invalid, "TENANT_ID_INVALID"),
        "bad address": (invalid, "CIVIC_ADDRESS_ID_INVALID"),
        "bad location": (invalid, "LOCATION_ID_INVALID"),
        "location alone": (invalid, "LOCATION_ID_INVALID"),
    }


def watch(system: RunningSystem, cursor: str, operator: str = OPERATOR) -> Watcher:
    return Watcher(system.numbers(operator), pb.WatchAssignmentsRequest(cursor=cursor))


def test_events_carry_the_emergency_location_across_a_cut_and_a_resume(
    system: RunningSystem,
) -> None:
    made = new_address(system)
    floor = made.locations[0]
    upload_one(
        system,
        item(
            "+14255550140",
            civic_address_id=made.civic_address_id,
            location_id=floor.location_id,
        ),
    )
    upload_one(system, item("+14255550141", civic_address_id=made.civic_address_id))
    upload_one(system, item("+14255550142", allow_tenant_address_update=True))
    start = system.numbers().ListNumbers(pb.ListNumbersRequest()).watch_cursor
    watcher = watch(system, start)
    assign(system, "+14255550140")
    assign(system, "+14255550142")
    first = watcher.events(2)
    watcher.cancel()  # the cut
    assert [(e.phone_number, e.type) for e in first] == [
        ("+14255550140", ASSIGNED),
        ("+14255550142", ASSIGNED),
    ]
    assert first[0].emergency_location.civic_address.street_name == "Microsoft Way"
    assert first[0].emergency_location.location.description == "Floor 1"
    assert not first[1].HasField("emergency_location")  # the customer has not set it yet
    saved = first[-1].cursor
    # While nobody watches: the address is edited (the assigned number that refers to it gets
    # an UPDATED event; the unassigned one none), the customer sets the other's address, and
    # an unassignment.
    edit = addresses_pb.CivicAddress(
        civic_address_id=made.civic_address_id,
        street_name="NE 36th St",
        locations=[
            addresses_pb.Location(location_id=floor.location_id, description="Floor 1, east"),
            addresses_pb.Location(location_id=made.locations[1].location_id, description="Floor 2"),
        ],
    )
    addresses(system).UpdateCivicAddress(
        addresses_pb.UpdateCivicAddressRequest(
            civic_address=edit,
            update_mask=field_mask_pb2.FieldMask(paths=["street_name", "locations"]),
        )
    )
    customer_sets(system, "+14255550142", made.civic_address_id)
    system.admin().UnassignNumber(
        pb.UnassignNumberRequest(phone_number="+14255550140", tenant_id=TENANT)
    )
    resumed = watch(system, saved)
    later = resumed.events(3)
    resumed.cancel()
    assert [(e.phone_number, e.type) for e in later] == [
        ("+14255550140", UPDATED),
        ("+14255550142", UPDATED),
        ("+14255550140", UNASSIGNED),
    ]
    assert later[0].emergency_location.civic_address.street_name == "NE 36th St"
    assert later[0].emergency_location.location.description == "Floor 1, east"
    assert later[0].sip_uri == first[0].sip_uri and later[0].target == first[0].target
    assert later[1].emergency_location.civic_address.civic_address_id == made.civic_address_id
    assert not later[2].HasField("emergency_location")
    # Replayed from the start, the ASSIGNED event still shows the address as it was then.
    replay = watch(system, start)
    again = replay.events(5)
    replay.cancel()
    for replayed, seen in zip(again[:2], first, strict=True):
        replayed.ClearField("cursor")
        seen.ClearField("cursor")  # sealed anew each time: the same position, other bytes
        assert replayed == seen
    assert again[0].emergency_location.civic_address.street_name == "Microsoft Way"
    # The unassigned number's location changed too (seen on the number), with no event.
    assert get(system, "+14255550141").emergency_location.civic_address.street_name == "NE 36th St"
    # Another operator's watch sees none of it.
    other = watch(system, start, OTHER_OPERATOR)
    heartbeat = other.next()
    other.cancel()
    assert list(heartbeat.events) == []


def test_emergency_location_updates_are_counted_by_cause(
    session_pki: Pki, migrated_url: str, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, session_pki.paths, migrated_url, metrics_listen="127.0.0.1:0")
    system = start_system(settings, session_pki)
    try:
        made, other = new_address(system), new_address(system, street="Other St")
        upload_one(system, item("+14255550170", civic_address_id=made.civic_address_id))
        upload_one(
            system,
            item(
                "+14255550171",
                civic_address_id=made.civic_address_id,
                allow_tenant_address_update=True,
            ),
        )
        assign(system, "+14255550170")
        assign(system, "+14255550171")
        update_number(
            system,
            pb.PhoneNumber(phone_number="+14255550170", civic_address_id=other.civic_address_id),
            "civic_address_id",
        )
        customer_sets(system, "+14255550171", other.civic_address_id)
        addresses(system).UpdateCivicAddress(
            addresses_pb.UpdateCivicAddressRequest(
                civic_address=addresses_pb.CivicAddress(
                    civic_address_id=other.civic_address_id, city="Bellevue"
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["city"]),
            )
        )
        samples = scrape(system)
        name = "opconnect_emergency_location_updates_total"
        got = {
            cause: sample(samples, name, operator=OPERATOR, cause=cause)
            for cause in ("number", "customer", "address")
        }
        assert got == {"number": 1, "customer": 1, "address": 2}
    finally:
        system.stop()


# --- migration 0013 --------------------------------------------------------------------------


def test_numbers_and_events_stored_before_addresses_keep_working(
    session_pki: Pki, database_url: str, tmp_path: Path
) -> None:
    migrate(database_url, "0012")
    at = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=5)
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO consents (operator_id, tenant_id, state, reason, created_at,"
                " updated_at) VALUES (:op, :t, 'active', '', :at, :at)"
            ),
            {"op": OPERATOR, "t": TENANT, "at": at},
        )
        conn.execute(
            sa.text(
                "INSERT INTO numbers (phone_number, operator_id, tenant_id, usage, inbound,"
                " outbound, state, sip_uri, target_kind, target_id, created_at, updated_at)"
                " VALUES ('+14255550100', :op, :t, 'user', true, true, 'assigned',"
                " 'sip:+14255550100@sbc1.contoso.example', 'user', :user, :at, :at)"
            ),
            {"op": OPERATOR, "t": TENANT, "user": USER_ID, "at": at},
        )
        position = conn.execute(
            sa.text(
                "UPDATE change_log_heads SET position = position + 1 WHERE log = 'numbers'"
                " RETURNING position"
            )
        ).scalar_one()
        if database_url.startswith("postgresql"):  # the day's partition, as the service names it
            day = partitions.period_start(at, partitions.Period.DAY)
            name = partitions.partition_name("number_events", day)
            end = partitions.period_end(day, partitions.Period.DAY)
            conn.execute(
                sa.text(
                    f'CREATE TABLE IF NOT EXISTS "{name}" PARTITION OF number_events'
                    f" FOR VALUES FROM ('{day.isoformat()}') TO ('{end.isoformat()}')"
                )
            )
        conn.execute(
            sa.text(
                "INSERT INTO number_events (position, operator_id, tenant_id, phone_number,"
                " type, sip_uri, target_kind, target_id, occurred_at) VALUES (:p, :op, :t,"
                " '+14255550100', 'assigned', 'sip:+14255550100@sbc1.contoso.example', 'user',"
                " :user, :at)"
            ),
            {"p": position, "op": OPERATOR, "t": TENANT, "user": USER_ID, "at": at},
        )
    engine.dispose()
    migrate(database_url, "head")
    system = start_system(settings_for(tmp_path, session_pki.paths, database_url), session_pki)
    try:
        number = get(system, "+14255550100")
        assert (number.civic_address_id, number.HasField("emergency_location")) == ("", False)
        assert number.state == state_pb.ASSIGNMENT_STATE_ASSIGNED and number.sip_uri
        watcher = watch(system, encode_cursor(LOG, position - 1))
        (event,) = watcher.events(1)
        watcher.cancel()
        assert (event.type, event.HasField("emergency_location")) == (ASSIGNED, False)
        # The number gets an address now, and its watchers hear of it.
        made = new_address(system)
        changed = update_number(
            system,
            pb.PhoneNumber(phone_number="+14255550100", civic_address_id=made.civic_address_id),
            "civic_address_id",
        )
        assert changed.emergency_location.civic_address.civic_address_id == made.civic_address_id
    finally:
        system.stop()
    migrate(database_url, "0012", down=True)
    migrate(database_url, "head")


@pytest.mark.skipif(not POSTGRES_URL, reason=NO_POSTGRES)
def test_a_number_given_an_address_while_it_is_edited_keeps_the_edit(
    session_pki: Pki, tmp_path: Path
) -> None:
    """UpdateNumber gives a number an address while an edit of that address is uncommitted: the
    change waits for the edit (the address's row lock) and stores the edited address, not the
    one it would have read beside the edit."""
    url = migrated_postgres(POSTGRES_URL)
    system = start_system(settings_for(tmp_path, session_pki.paths, url), session_pki)
    try:
        made = new_address(system)
        upload_one(system, item("+14255550180", allow_tenant_address_update=True))
        entered, release = threading.Event(), threading.Event()
        pid: list[int] = []
        edited = dataclasses.replace(
            addresses_in(address_message()), id=made.civic_address_id, street_name="NE 36th St"
        )

        def edit(session: Session) -> None:
            mask = frozenset({"street_name"})
            address_storage.update_address(session, OPERATOR, made.civic_address_id, edited, mask)
            pid.append(int(session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()))
            entered.set()
            release.wait(60)

        editing = threading.Thread(
            target=system.runtime.db.transaction, args=(edit,), kwargs={"write": True}
        )
        editing.start()
        assert entered.wait(60)
        call = system.numbers().UpdateNumber.future(
            pb.UpdateNumberRequest(
                number=pb.PhoneNumber(
                    phone_number="+14255550180", civic_address_id=made.civic_address_id
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["civic_address_id"]),
            )
        )
        engine = sa.create_engine(url)
        try:
            while not call.done():  # it waits for the edit's lock (or, unlocked, is done)
                with engine.connect() as conn:
                    blocked = conn.execute(
                        sa.text(
                            "SELECT count(*) FROM pg_stat_activity"
                            " WHERE :pid = ANY(pg_blocking_pids(pid))"
                        ),
                        {"pid": pid[0]},
                    ).scalar_one()
                if blocked:
                    break
        finally:
            engine.dispose()
        release.set()
        editing.join(60)
        call.result(60)
        where = get(system, "+14255550180").emergency_location
        assert where.civic_address.street_name == "NE 36th St"
    finally:
        release.set()
        system.stop()


# --- hypothesis on every new field ------------------------------------------------------------

fuzz = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
UPLOAD_REASONS = {
    "CALLING_PROFILE_ID_INVALID",
    "CIVIC_ADDRESS_NOT_FOUND",
    "LOCATION_NOT_FOUND",
    "ISO_COUNTRY_CODE_INVALID",
    "ISO_COUNTRY_CODE_REQUIRED",
    "TICKET_ID_INVALID",
    "CIVIC_ADDRESS_REQUIRED",
}
ids = st.one_of(st.text(max_size=40), st.uuids().map(str), st.just(""))


@fuzz
@given(
    suffix=st.integers(0, 9999),
    profile=ids,
    address=ids,
    location=ids,
    country=st.text(max_size=4),
    ticket=st.text(max_size=80),
    allow=st.booleans(),
)
def test_any_new_field_is_stored_or_refused_with_its_reason(
    fuzz_system: RunningSystem,
    suffix: int,
    profile: str,
    address: str,
    location: str,
    country: str,
    ticket: str,
    allow: bool,
) -> None:
    number = f"+1206555{suffix:04d}"
    upload = item(
        number,
        calling_profile_id=profile,
        civic_address_id=address,
        location_id=location,
        iso_country_code=country,
        ticket_id=ticket,
        allow_tenant_address_update=allow,
    )
    result = upload_one(fuzz_system, upload)
    if result.outcome == pb.NUMBER_OUTCOME_REFUSED:
        assert result.reason in UPLOAD_REASONS | {"DATA_CONFLICT"}, result
    else:
        got = get(fuzz_system, number)
        assert (got.ticket_id, got.iso_country_code) == (ticket, country.upper())
    # UpdateNumber with the same values answers the number or a clear error, never a crash.
    message = pb.PhoneNumber(
        phone_number=number,
        calling_profile_id=profile,
        civic_address_id=address,
        location_id=location,
        ticket_id=ticket,
        allow_tenant_address_update=allow,
    )
    paths = ("calling_profile_id", "civic_address_id", "location_id", "ticket_id")
    try:
        update_number(fuzz_system, message, *paths)
    except grpc.RpcError as error:
        rich = rich_error(error)
        assert rich.domain == DOMAIN and rich.code in {
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.FAILED_PRECONDITION,
        }, rich
