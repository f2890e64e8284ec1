"""Consents through real servers over mutual TLS, on both backends: every allowed and refused
move of the state machine, upload under consent, ending a consent with numbers assigned, watch
with resume and expiry, isolation between operators and principals, the metrics, the numbers
stored before migration 0011, and a grpc-js client reading the watch."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from opconnect.numbers.v1 import consents_pb2 as pb
from opconnect.numbers.v1 import consents_pb2_grpc
from opconnect.numbers.v1 import numbers_pb2 as numbers_pb
from plumbing.changelog import decode_cursor
from services.numbers import consent_storage
from services.numbers.consents import LOG
from services.numbers.rules import DOMAIN
from tests.conftest import (
    NO_POSTGRES,
    OPERATOR,
    OTHER_OPERATOR,
    PLATFORM,
    POSTGRES_URL,
    USER_ID,
    Pki,
    RunningSystem,
    StreamReader,
    migrated_postgres,
    rich_error,
    settings_for,
    start_system,
)
from tests.helpers import assign, migrate, sample, scrape, start_two, upload

REQUESTED, ACTIVE, DECLINED, TERMINATED, WITHDRAWN = (
    pb.CONSENT_STATE_REQUESTED,
    pb.CONSENT_STATE_ACTIVE,
    pb.CONSENT_STATE_DECLINED,
    pb.CONSENT_STATE_TERMINATED,
    pb.CONSENT_STATE_WITHDRAWN,
)
NO_REASON = pb.CONSENT_REASON_UNSPECIFIED
NOT_SERVED = pb.CONSENT_REASON_REGION_NOT_SERVED
NON_PAYMENT = pb.CONSENT_REASON_NON_PAYMENT


def fresh_tenant() -> str:
    return str(uuid.uuid4())


def consents(system: RunningSystem, ident: str = OPERATOR) -> consents_pb2_grpc.ConsentServiceStub:
    return consents_pb2_grpc.ConsentServiceStub(system.channel("operator", ident))


def consent_admin(
    system: RunningSystem, ident: str = PLATFORM
) -> consents_pb2_grpc.ConsentAdminServiceStub:
    return consents_pb2_grpc.ConsentAdminServiceStub(system.channel("platform", ident))


def create(system: RunningSystem, tenant: str, operator: str = OPERATOR) -> pb.Consent:
    request = pb.CreateConsentRequest(tenant_id=tenant, operator_id=operator)
    response: pb.CreateConsentResponse = consent_admin(system).CreateConsent(request)
    return response.consent


def withdraw(system: RunningSystem, tenant: str, operator: str = OPERATOR) -> pb.Consent:
    request = pb.WithdrawConsentRequest(tenant_id=tenant, operator_id=operator)
    response: pb.WithdrawConsentResponse = consent_admin(system).WithdrawConsent(request)
    return response.consent


def update(
    system: RunningSystem,
    tenant: str,
    state: pb.ConsentState.ValueType,
    reason: pb.ConsentReason.ValueType = NO_REASON,
    operator: str = OPERATOR,
) -> pb.Consent:
    request = pb.UpdateConsentStatusRequest(tenant_id=tenant, state=state, reason=reason)
    response: pb.UpdateConsentStatusResponse = consents(system, operator).UpdateConsentStatus(
        request
    )
    return response.consent


def get(system: RunningSystem, tenant: str, operator: str = OPERATOR) -> pb.Consent:
    response = consents(system, operator).GetConsent(pb.GetConsentRequest(tenant_id=tenant))
    consent: pb.Consent = response.consent
    return consent


# How to bring a fresh tenant's consent into each state.
def reach(system: RunningSystem, tenant: str, state: pb.ConsentState.ValueType) -> None:
    create(system, tenant)
    if state in (ACTIVE, TERMINATED):
        update(system, tenant, ACTIVE)
    if state == DECLINED:
        update(system, tenant, DECLINED, NOT_SERVED)
    if state == TERMINATED:
        update(system, tenant, TERMINATED, NON_PAYMENT)
    if state == WITHDRAWN:
        withdraw(system, tenant)
    assert get(system, tenant).state == state


STATES = (REQUESTED, ACTIVE, DECLINED, TERMINATED, WITHDRAWN)
# Every move anyone may ask for: (name, the call). Allowed from the states in ALLOWED below.
Call = Callable[[RunningSystem, str], pb.Consent]
MOVES: dict[str, Call] = {
    "accept": lambda s, t: update(s, t, ACTIVE),
    "decline": lambda s, t: update(s, t, DECLINED, NOT_SERVED),
    "terminate": lambda s, t: update(s, t, TERMINATED, NON_PAYMENT),
    "withdraw": withdraw,
    "request": create,
}
# (move, from) -> the state after it. A move to the state a consent is in changes nothing; any
# pair not listed is refused with CONSENT_TRANSITION_INVALID.
ALLOWED = {
    ("accept", REQUESTED): ACTIVE,
    ("accept", ACTIVE): ACTIVE,
    ("decline", REQUESTED): DECLINED,
    ("decline", DECLINED): DECLINED,
    ("terminate", ACTIVE): TERMINATED,
    ("terminate", TERMINATED): TERMINATED,
    ("withdraw", REQUESTED): WITHDRAWN,
    ("withdraw", ACTIVE): WITHDRAWN,
    ("withdraw", WITHDRAWN): WITHDRAWN,
    ("request", REQUESTED): REQUESTED,
    ("request", ACTIVE): ACTIVE,
    ("request", DECLINED): REQUESTED,
    ("request", TERMINATED): REQUESTED,
    ("request", WITHDRAWN): REQUESTED,
}


def test_every_move_from_every_state(system: RunningSystem) -> None:
    for state in STATES:
        for name, call in MOVES.items():
            tenant = fresh_tenant()
            reach(system, tenant, state)
            before = get(system, tenant)
            expected = ALLOWED.get((name, state))
            if expected is None:
                with pytest.raises(grpc.RpcError) as refused:
                    call(system, tenant)
                error = rich_error(refused.value)
                assert (error.code, error.reason, error.domain) == (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "CONSENT_TRANSITION_INVALID",
                    DOMAIN,
                ), (name, state)
                assert pb.ConsentState.Name(state).removeprefix("CONSENT_STATE_") in error.message
                assert get(system, tenant) == before, "a refused move changes nothing"
            else:
                after = call(system, tenant)
                assert after.state == expected, (name, state)
                assert get(system, tenant) == after
                if expected == state:
                    assert after == before, f"{name} from {state}: nothing changes"


def test_a_new_consent_is_requested_with_its_times_and_no_reason(system: RunningSystem) -> None:
    tenant = fresh_tenant()
    made = create(system, tenant.upper())  # tenant ids are kept lowercase
    assert (made.tenant_id, made.operator_id, made.state, made.reason) == (
        tenant,
        OPERATOR,
        REQUESTED,
        NO_REASON,
    )
    assert made.create_time == made.update_time
    declined = update(system, tenant, DECLINED, NOT_SERVED)
    assert (declined.reason, declined.create_time) == (NOT_SERVED, made.create_time)
    again = create(system, tenant)
    assert (again.state, again.reason) == (REQUESTED, NO_REASON)


def test_a_reason_is_required_to_decline_or_terminate_and_refused_to_accept(
    system: RunningSystem,
) -> None:
    tenant = fresh_tenant()
    create(system, tenant)
    for state, reason, expected in (
        (DECLINED, NO_REASON, "REASON_REQUIRED"),
        (TERMINATED, NO_REASON, "REASON_REQUIRED"),
        (ACTIVE, NOT_SERVED, "REASON_INVALID"),
        (REQUESTED, NO_REASON, "STATE_INVALID"),
        (WITHDRAWN, NO_REASON, "STATE_INVALID"),
        (pb.CONSENT_STATE_UNSPECIFIED, NO_REASON, "STATE_INVALID"),
        (ACTIVE, 99, "REASON_INVALID"),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            update(system, tenant, state, reason)  # type: ignore[arg-type]
        error = rich_error(refused.value)
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, expected)
    assert get(system, tenant).state == REQUESTED


def test_upload_needs_an_active_consent(system: RunningSystem) -> None:
    tenant = fresh_tenant()

    def outcome(number: str) -> tuple[int, str]:
        result = upload(system, number, tenant=tenant).results[0]
        return result.outcome, result.reason

    refused = (numbers_pb.NUMBER_OUTCOME_REFUSED, "CONSENT_NOT_ACTIVE")
    assert outcome("+14255550100") == refused  # no consent at all
    create(system, tenant)
    assert outcome("+14255550100") == refused  # requested, not accepted
    update(system, tenant, ACTIVE)
    assert outcome("+14255550100") == (numbers_pb.NUMBER_OUTCOME_DONE, "")
    # Every other rule of upload stays: a bad number is refused for what it is.
    mixed = upload(system, "+14255550100", "0042", tenant=tenant)
    assert [(r.outcome, r.reason) for r in mixed.results] == [
        (numbers_pb.NUMBER_OUTCOME_ALREADY_PRESENT, ""),
        (numbers_pb.NUMBER_OUTCOME_REFUSED, "PHONE_NUMBER_INVALID"),
    ]
    update(system, tenant, TERMINATED, NON_PAYMENT)
    assert outcome("+14255550101") == refused
    # The consent is the operator's own: another operator's active consent does not count.
    assert consents(system, OTHER_OPERATOR).ListConsents(pb.ListConsentsRequest()).consents
    assert outcome("+14255550102") == refused
    # Numbers held stay the operator's (release them, or keep them for a new consent).
    number = system.numbers().GetNumber(numbers_pb.GetNumberRequest(phone_number="+14255550100"))
    assert number.number.tenant_id == tenant


def test_an_active_consent_ends_only_once_its_numbers_are_unassigned(
    system: RunningSystem,
) -> None:
    tenant = fresh_tenant()
    create(system, tenant)
    update(system, tenant, ACTIVE)
    upload(system, "+14255550100", "+14255550101", tenant=tenant)
    assign(system, "+14255550100", tenant=tenant)
    ends: list[Callable[[], pb.Consent]] = [
        lambda: update(system, tenant, TERMINATED, NON_PAYMENT),
        lambda: withdraw(system, tenant),
    ]
    for end in ends:
        with pytest.raises(grpc.RpcError) as refused:
            end()
        error = rich_error(refused.value)
        assert (error.code, error.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "CONSENT_NUMBERS_ASSIGNED",
        )
        assert get(system, tenant).state == ACTIVE
    system.admin().UnassignNumber(
        numbers_pb.UnassignNumberRequest(phone_number="+14255550100", tenant_id=tenant)
    )
    assert withdraw(system, tenant).state == WITHDRAWN


def test_list_pages_by_tenant_with_a_state_filter(system: RunningSystem) -> None:
    tenants = sorted(fresh_tenant() for _ in range(5))
    for tenant in tenants:
        create(system, tenant, OTHER_OPERATOR)
    accepted = tenants[1::2]
    for tenant in accepted:
        update(system, tenant, ACTIVE, operator=OTHER_OPERATOR)
    stub = consents(system, OTHER_OPERATOR)
    seen: list[str] = []
    token = ""
    while True:
        page = stub.ListConsents(pb.ListConsentsRequest(page_size=2, page_token=token))
        seen += [c.tenant_id for c in page.consents]
        token = page.next_page_token
        if not token:
            break
    # The test systems' own consents (conftest CONSENTED) are listed too.
    assert [t for t in seen if t in tenants] == tenants and seen == sorted(seen)
    only = stub.ListConsents(pb.ListConsentsRequest(state=REQUESTED)).consents
    assert sorted(c.tenant_id for c in only) == sorted(set(tenants) - set(accepted))
    with pytest.raises(grpc.RpcError) as other_filter:
        first = stub.ListConsents(pb.ListConsentsRequest(page_size=1))
        stub.ListConsents(
            pb.ListConsentsRequest(page_size=1, page_token=first.next_page_token, state=ACTIVE)
        )
    assert rich_error(other_filter.value).reason == "PAGE_TOKEN_INVALID"


class ConsentWatcher(StreamReader[pb.WatchConsentsResponse]):
    def __init__(self, system: RunningSystem, cursor: str = "", operator: str = OPERATOR) -> None:
        request = pb.WatchConsentsRequest(cursor=cursor)
        super().__init__(consents(system, operator).WatchConsents(request))

    def next(self, timeout: float = 10) -> pb.WatchConsentsResponse:
        response = super().next(timeout)
        assert response is not None, "a watch never ends with OK"
        return response

    def events(self, count: int) -> list[pb.ConsentEvent]:
        found: list[pb.ConsentEvent] = []
        while len(found) < count:
            found += self.next().events
        return found


def position(cursor: str) -> int:
    return decode_cursor(cursor, LOG, DOMAIN)


def test_watch_from_now_follows_live_with_each_change(system: RunningSystem) -> None:
    tenant = fresh_tenant()
    watcher = ConsentWatcher(system)
    assert not watcher.next().events, "a watch from now opens with a heartbeat"
    create(system, tenant)
    update(system, tenant, ACTIVE)
    withdraw(system, tenant)
    events = watcher.events(3)
    watcher.cancel()
    assert [(e.previous_state, e.consent.state) for e in events] == [
        (pb.CONSENT_STATE_UNSPECIFIED, REQUESTED),
        (REQUESTED, ACTIVE),
        (ACTIVE, WITHDRAWN),
    ]
    assert all(e.consent.tenant_id == tenant for e in events)
    assert [e.event_time for e in events] == [e.consent.update_time for e in events]
    positions = [position(e.cursor) for e in events]
    assert positions == sorted(set(positions))


def test_list_then_watch_resumes_after_a_cut_with_no_gap_and_no_repeat(
    system: RunningSystem,
) -> None:
    tenants = [fresh_tenant() for _ in range(6)]
    create(system, tenants[0])
    start = consents(system).ListConsents(pb.ListConsentsRequest()).watch_cursor
    expected: list[tuple[str, int]] = []
    for tenant in tenants[1:]:
        create(system, tenant)
        expected.append((tenant, REQUESTED))
    update(system, tenants[0], ACTIVE)
    expected.append((tenants[0], ACTIVE))
    # Another operator's changes move the log on but are never shown to this one.
    create(system, fresh_tenant(), OTHER_OPERATOR)
    for tenant in tenants[1:3]:
        update(system, tenant, DECLINED, NOT_SERVED)
        expected.append((tenant, DECLINED))
    seen: list[tuple[str, int]] = []
    cursor = start
    while len(seen) < len(expected):
        watcher = ConsentWatcher(system, cursor)
        response = watcher.next()  # cut after the first response, resume from its last cursor
        watcher.cancel()
        seen += [(e.consent.tenant_id, e.consent.state) for e in response.events]
        cursor = response.events[-1].cursor if response.events else response.cursor
    assert seen == expected


def test_a_cursor_older_than_retention_expires(system: RunningSystem) -> None:
    old = consents(system).ListConsents(pb.ListConsentsRequest()).watch_cursor
    create(system, fresh_tenant())
    future = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    db = system.runtime.db
    assert system.call(db.run(consent_storage.purge_events, future, write=True)) >= 1
    watcher = ConsentWatcher(system, old)
    with pytest.raises(grpc.RpcError) as expired:
        watcher.next()
    error = rich_error(expired.value)
    assert (error.code, error.reason, error.domain) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "CURSOR_EXPIRED",
        DOMAIN,
    )
    with pytest.raises(grpc.RpcError) as invalid:
        ConsentWatcher(system, "not-a-cursor").next()
    assert rich_error(invalid.value).reason == "CURSOR_INVALID"


def test_another_operators_consent_is_as_if_it_did_not_exist(system: RunningSystem) -> None:
    tenant = fresh_tenant()
    create(system, tenant)
    watcher = ConsentWatcher(system, operator=OTHER_OPERATOR)
    opened = watcher.next()
    calls: list[Callable[[], pb.Consent]] = [
        lambda: get(system, tenant, OTHER_OPERATOR),
        lambda: update(system, tenant, ACTIVE, operator=OTHER_OPERATOR),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as hidden:
            call()
        error = rich_error(hidden.value)
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "CONSENT_NOT_FOUND")
    listed = consents(system, OTHER_OPERATOR).ListConsents(pb.ListConsentsRequest()).consents
    assert tenant not in {c.tenant_id for c in listed}
    update(system, tenant, ACTIVE)
    # The other operator's watch moves past the change (a heartbeat) without showing it.
    while True:
        beat = watcher.next()
        assert not beat.events
        if position(beat.cursor) > position(opened.cursor):
            break
    watcher.cancel()
    with pytest.raises(grpc.RpcError) as missing:
        withdraw(system, fresh_tenant())
    assert rich_error(missing.value).reason == "CONSENT_NOT_FOUND"


def test_each_side_calls_only_its_own_service(system: RunningSystem) -> None:
    tenant = fresh_tenant()
    as_operator = consents_pb2_grpc.ConsentAdminServiceStub(system.channel("operator", OPERATOR))
    with pytest.raises(grpc.RpcError) as operator_refused:
        as_operator.CreateConsent(pb.CreateConsentRequest(tenant_id=tenant, operator_id=OPERATOR))
    as_platform = consents_pb2_grpc.ConsentServiceStub(system.channel("platform", PLATFORM))
    with pytest.raises(grpc.RpcError) as platform_refused:
        as_platform.GetConsent(pb.GetConsentRequest(tenant_id=tenant))
    assert [
        (rich_error(e.value).code, rich_error(e.value).reason)
        for e in (operator_refused, platform_refused)
    ] == [
        (grpc.StatusCode.PERMISSION_DENIED, "PLATFORM_ONLY"),
        (grpc.StatusCode.PERMISSION_DENIED, "OPERATOR_ONLY"),
    ]


def test_transitions_are_counted_by_operator_and_states(
    session_pki: Pki, migrated_url: str, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, session_pki.paths, migrated_url, metrics_listen="127.0.0.1:0")
    system = start_system(settings, session_pki)
    try:
        _count_transitions(system)
    finally:
        system.stop()


def _count_transitions(system: RunningSystem) -> None:
    tenant = fresh_tenant()
    create(system, tenant)
    update(system, tenant, ACTIVE)
    update(system, tenant, ACTIVE)  # no change: not counted
    samples = scrape(system)
    labels = {"operator": OPERATOR}
    name = "opconnect_consent_transitions_total"
    created = sample(samples, name, **labels, **{"from": "none", "to": "requested"})
    accepted = sample(samples, name, **labels, **{"from": "requested", "to": "active"})
    # conftest's own consents were made in the database directly, not through the service.
    assert (created, accepted) == (1, 1)


# --- migration 0011 --------------------------------------------------------------------------

OLD_TENANT = "2a3b4c5d-6e7f-4a8b-9c0d-1e2f3a4b5c6d"  # not among conftest's CONSENTED
OLDER_TENANT = "9f8e7d6c-5b4a-4c3d-8e2f-1a0b9c8d7e6f"


def _numbers_before_consents(url: str) -> dt.datetime:
    """Numbers as the system stored them before 0011 (through SQL): two of OPERATOR's for
    OLD_TENANT (one assigned), one of OTHER_OPERATOR's for OLDER_TENANT. The first's upload
    time."""
    first = dt.datetime(2026, 11, 1, 9, 0, tzinfo=dt.UTC)
    rows = [
        ("+14255550100", OPERATOR, OLD_TENANT, "assigned", first),
        ("+14255550101", OPERATOR, OLD_TENANT, "unassigned", first + dt.timedelta(days=1)),
        ("+14255550102", OTHER_OPERATOR, OLDER_TENANT, "unassigned", first),
    ]
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for number, operator, tenant, state, at in rows:
            sip = f"sip:{number}@sbc1.contoso.example" if state == "assigned" else ""
            conn.execute(
                sa.text(
                    "INSERT INTO numbers (phone_number, operator_id, tenant_id, usage, inbound,"
                    " outbound, state, sip_uri, target_kind, target_id, created_at, updated_at)"
                    " VALUES (:n, :op, :t, 'user', true, true, :state, :sip, :kind, :target,"
                    " :at, :at)"
                ),
                {
                    "n": number,
                    "op": operator,
                    "t": tenant,
                    "state": state,
                    "sip": sip,
                    "kind": "user" if sip else "",
                    "target": USER_ID if sip else "",
                    "at": at,
                },
            )
    engine.dispose()
    return first


def _consent_rows(url: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            query = "SELECT operator_id, tenant_id, state, reason FROM consents ORDER BY 1, 2"
            return [tuple(row) for row in conn.execute(sa.text(query))]
    finally:
        engine.dispose()


def test_numbers_stored_before_consents_keep_working_under_an_active_consent(
    session_pki: Pki, database_url: str, tmp_path: Path
) -> None:
    migrate(database_url, "0010")
    first = _numbers_before_consents(database_url)
    migrate(database_url, "head")
    assert _consent_rows(database_url) == [
        (OPERATOR, OLD_TENANT, "active", ""),
        (OTHER_OPERATOR, OLDER_TENANT, "active", ""),
    ]
    system = start_system(settings_for(tmp_path, session_pki.paths, database_url), session_pki)
    try:
        consent = get(system, OLD_TENANT)
        assert consent.state == ACTIVE and consent.create_time.ToDatetime(dt.UTC) == first
        assert get(system, OLDER_TENANT, OTHER_OPERATOR).state == ACTIVE
        # The numbers are all there, and uploads for their tenants go on.
        listed = system.numbers().ListNumbers(numbers_pb.ListNumbersRequest(tenant_id=OLD_TENANT))
        assert [n.phone_number for n in listed.numbers] == ["+14255550100", "+14255550101"]
        added = upload(system, "+14255550103", tenant=OLD_TENANT)
        assert added.added_count == 1
        # The consent lives on as any other: it cannot end while a number is assigned.
        with pytest.raises(grpc.RpcError) as refused:
            update(system, OLD_TENANT, TERMINATED, NON_PAYMENT)
        assert rich_error(refused.value).reason == "CONSENT_NUMBERS_ASSIGNED"
    finally:
        system.stop()
    migrate(database_url, "0010", down=True)
    migrate(database_url, "head")
    assert (OPERATOR, OLD_TENANT, "active", "") in _consent_rows(database_url)


# --- another language ------------------------------------------------------------------------

JS_CONSENTS = Path(__file__).resolve().parent / "clients" / "grpc_js_consents.js"


def _node_watch(
    system: RunningSystem, events: int, cursor: str = "", listed: Callable[[], object] = str
) -> dict[str, Any]:
    """Run the node client; `listed()` once it says its listing is done (without a cursor)."""
    cert, key = system.pki.paths.client(f"operator-{OPERATOR}")
    command = [
        "node",
        str(JS_CONSENTS),
        *("--address", system.address),
        *("--ca", str(system.pki.paths.ca_cert)),
        *("--cert", str(cert)),
        *("--key", str(key)),
        *("--events", str(events)),
        *(("--cursor", cursor) if cursor else ()),
    ]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stderr is not None
        if not cursor:
            assert process.stderr.readline() == "listed\n"
            listed()
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    answer: dict[str, Any] = json.loads(out)
    return answer


def test_a_grpc_js_client_lists_then_watches_and_resumes(sqlite_system: RunningSystem) -> None:
    system = sqlite_system
    first, second, third = (fresh_tenant() for _ in range(3))
    create(system, first)
    update(system, first, ACTIVE)  # before the listing: listed, not watched
    create(system, second)
    # The node client lists, then watches from the listing's cursor: the change after it.
    answer = _node_watch(system, 1, listed=lambda: update(system, second, ACTIVE))
    listed = {c["tenant_id"]: c["state"] for c in answer["listed"]}
    assert (listed[first], listed[second]) == ("CONSENT_STATE_ACTIVE", "CONSENT_STATE_REQUESTED")
    (event,) = answer["events"]
    assert (event["consent"]["tenant_id"], event["previous_state"], event["consent"]["state"]) == (
        second,
        "CONSENT_STATE_REQUESTED",
        "CONSENT_STATE_ACTIVE",
    )
    # Cut; meanwhile two more changes; it resumes strictly after its last cursor.
    create(system, third)
    update(system, third, DECLINED, NOT_SERVED)
    resumed = _node_watch(system, 2, answer["cursor"])
    assert [(e["consent"]["tenant_id"], e["consent"]["state"]) for e in resumed["events"]] == [
        (third, "CONSENT_STATE_REQUESTED"),
        (third, "CONSENT_STATE_DECLINED"),
    ]
    assert resumed["events"][1]["consent"]["reason"] == "CONSENT_REASON_REGION_NOT_SERVED"


# --- replicas ----------------------------------------------------------------------------------


@pytest.mark.postgres
def test_a_consent_change_through_one_replica_wakes_a_watcher_on_another(
    session_pki: Pki, tmp_path: Path
) -> None:
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    first, second = start_two(session_pki, tmp_path, migrated_postgres(POSTGRES_URL))
    try:
        tenant = fresh_tenant()
        watcher = ConsentWatcher(second)
        watcher.next()  # open, from now
        create(first, tenant)
        update(first, tenant, ACTIVE)
        events = watcher.events(2)  # the other replica hears of them by NOTIFY
        watcher.cancel()
        assert [(e.consent.tenant_id, e.consent.state) for e in events] == [
            (tenant, REQUESTED),
            (tenant, ACTIVE),
        ]
    finally:
        first.stop()
        second.stop()


def test_concurrent_requests_create_one_consent(system: RunningSystem) -> None:
    """The admin center's retries racing each other: every one answers the consent, and it is
    created once (one event)."""
    tenant = fresh_tenant()
    start = consents(system).ListConsents(pb.ListConsentsRequest()).watch_cursor
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: create(system, tenant), range(8)))
    assert {(c.tenant_id, c.state) for c in made} == {(tenant, REQUESTED)}
    update(system, tenant, ACTIVE)  # the next change: the watch stops at it
    watcher = ConsentWatcher(system, start)
    events = watcher.events(2)
    watcher.cancel()
    assert [(e.previous_state, e.consent.state) for e in events] == [
        (pb.CONSENT_STATE_UNSPECIFIED, REQUESTED),
        (REQUESTED, ACTIVE),
    ]
