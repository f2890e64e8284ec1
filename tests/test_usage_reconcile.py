"""GetReconciliation checked against figures computed here, independently, on a data set with
every kind of call: matching exactly, within the absolute or the relative allowance, beyond
both, only on the platform's side, only on the operator's, reported by the operator but not
answered on the platform's; and the last of these, with the usage it counts in, in both
arrival orders (the operator's record first, or the platform's call)."""

from __future__ import annotations

import base64
import datetime as dt
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from opconnect.usage.v1 import usage_pb2 as pb
from plumbing.tokens import Keyring
from tests.conftest import (
    NO_POSTGRES,
    OPERATOR,
    OTHER_OPERATOR,
    OTHER_TENANT,
    POSTGRES_URL,
    TENANT,
    Pki,
    RunningSystem,
    migrated_postgres,
    rich_error,
)
from tests.helpers import eventually, feed_system, kept, submit, usage_stub
from tests.records_data import duration_record, publish_records, record, stamp

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
START = NOW - dt.timedelta(days=3)
END = NOW + dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Call:
    """One call of the data set: the platform's duration (None: not an answered platform
    call) and the operator's (None: not reported), in seconds, and its tenant; `unanswered`: the
    platform has the call, not answered."""

    tenant: str
    platform_s: float | None
    operator_s: float | None
    call_id: str = ""
    start: dt.datetime | None = None  # the platform's answer time, else the operator's start
    unanswered: bool = False


def expected(calls: list[Call], absolute_s: float, relative: float) -> dict[str, Any]:
    out = {"matched": 0, "mismatch": 0, "platform_only": 0, "operator_only": 0, "unanswered": 0}
    platform_total = operator_total = 0.0
    for call in calls:
        if call.platform_s is not None:
            platform_total += call.platform_s
        if call.operator_s is not None:
            operator_total += call.operator_s
        if call.platform_s is not None and call.operator_s is not None:
            allowed = max(absolute_s, relative * max(call.platform_s, call.operator_s))
            kind = "matched" if abs(call.platform_s - call.operator_s) <= allowed else "mismatch"
            out[kind] += 1
        elif call.platform_s is not None:
            out["platform_only"] += 1
        elif call.unanswered:
            out["unanswered"] += 1
        else:
            out["operator_only"] += 1
    out["platform_total_ms"] = round(platform_total * 1000)
    out["operator_total_ms"] = round(operator_total * 1000)
    return out


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def data(
    request: pytest.FixtureRequest, session_pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningSystem, list[Call]]]:
    url = None
    if request.param == "postgres":
        if not POSTGRES_URL:
            pytest.skip(NO_POSTGRES)
        url = migrated_postgres(POSTGRES_URL)
    system = feed_system(session_pki, tmp_path_factory.mktemp("reconcile"), url)
    rng = random.Random(5)
    calls: list[Call] = []
    published = []
    reports = []
    # (platform talk seconds, operator's offset in seconds or None, answered on the platform)
    shapes = [
        (60.0, 0.0, True),  # exact
        (60.0, 0.8, True),  # within 1 s
        (60.0, 1.0, True),  # at 1 s: within
        (60.0, -2.0, True),  # beyond 1 s and 1%
        (600.0, 5.0, True),  # within 1% of 605 s
        (600.0, 7.0, True),  # beyond 1% of 607 s
        (120.0, None, True),  # the operator did not report it
        (30.0, 0.0, False),  # the platform has it, not answered: UNANSWERED_ON_PLATFORM
    ]
    for index in range(48):
        talk, offset, answered = shapes[index % len(shapes)]
        tenant = rng.choice((TENANT, OTHER_TENANT))
        end = NOW - dt.timedelta(hours=rng.randint(1, 60))
        message = record(tenant=tenant, end=end, talk_s=talk, answered=answered)
        published.append(message)
        if offset is None:
            start = message.answer_time.ToDatetime(dt.UTC)
            calls.append(Call(tenant, talk, None, message.call_id, start))
            continue
        start = (
            message.answer_time.ToDatetime(dt.UTC) if answered else end - dt.timedelta(seconds=talk)
        )
        report = duration_record(call_id=message.call_id, start=start, talk_s=talk + max(offset, 0))
        report.tenant_id = tenant
        report.duration.FromNanoseconds(round((talk + offset) * 1e9))
        reports.append(report)
        calls.append(
            Call(
                tenant,
                talk if answered else None,
                talk + offset,
                message.call_id,
                start,
                unanswered=not answered,
            )
        )
    for _ in range(4):  # calls the platform never heard of
        start = NOW - dt.timedelta(hours=2, minutes=rng.randint(0, 59))
        report = duration_record(start=start, talk_s=33.3)
        reports.append(report)
        calls.append(Call(TENANT, None, 33.3, report.call_id, start))
    publish_records(system.ingest(), published)
    (response,) = submit(usage_stub(system), reports)
    assert response.accepted_count == len(reports), response
    # Another operator's calls and records never count.
    other = record(end=NOW - dt.timedelta(hours=3))
    publish_records(system.ingest(), [other], operator=OTHER_OPERATOR)
    submit(usage_stub(system, OTHER_OPERATOR), [duration_record(start=NOW - dt.timedelta(hours=3))])
    eventually(lambda: len(kept(system)) >= len(published) + 1, timeout=15)  # the feed caught up
    yield system, calls
    system.stop()


def _figures(response: pb.GetReconciliationResponse) -> dict[str, Any]:
    return {
        "matched": response.matched_count,
        "mismatch": response.mismatch_count,
        "platform_only": response.platform_only_count,
        "operator_only": response.operator_only_count,
        "unanswered": response.unanswered_on_platform_count,
        "platform_total_ms": response.platform_total_duration.ToMilliseconds(),
        "operator_total_ms": response.operator_total_duration.ToMilliseconds(),
    }


def test_reconciliation_with_the_default_tolerance(data: tuple[RunningSystem, list[Call]]) -> None:
    system, calls = data
    response = usage_stub(system).GetReconciliation(
        pb.GetReconciliationRequest(start_time=stamp(START), end_time=stamp(END))
    )
    want = expected(calls, 1.0, 0.01)
    assert want["mismatch"] and want["platform_only"] and want["operator_only"]
    assert want["unanswered"]
    assert _figures(response) == want
    assert response.tolerance.absolute.ToSeconds() == 1 and response.tolerance.relative == 0.01
    assert response.compute_time.ToDatetime(dt.UTC) >= NOW


def test_reconciliation_with_a_tolerance_and_a_tenant(
    data: tuple[RunningSystem, list[Call]],
) -> None:
    system, calls = data
    tolerance = pb.Tolerance(relative=0.0)
    tolerance.absolute.FromMilliseconds(900)
    response = usage_stub(system).GetReconciliation(
        pb.GetReconciliationRequest(
            start_time=stamp(START),
            end_time=stamp(END),
            tenant_id=OTHER_TENANT,
            tolerance=tolerance,
        )
    )
    assert _figures(response) == expected([c for c in calls if c.tenant == OTHER_TENANT], 0.9, 0.0)


def test_reconciliation_request_errors(data: tuple[RunningSystem, list[Call]]) -> None:
    system, _ = data
    base: dict[str, Any] = {"start_time": stamp(START), "end_time": stamp(END)}
    too_long = pb.Tolerance()
    too_long.absolute.FromSeconds(3601)
    negative = pb.Tolerance()
    negative.absolute.FromSeconds(-1)
    for request, reason, field in (
        ({"end_time": stamp(END)}, "PERIOD_INVALID", "start_time"),
        ({**base, "end_time": stamp(START + dt.timedelta(days=32))}, "PERIOD_TOO_LONG", "end_time"),
        ({**base, "tenant_id": "x"}, "TENANT_ID_INVALID", "tenant_id"),
        ({**base, "tolerance": too_long}, "TOLERANCE_INVALID", "tolerance.absolute"),
        ({**base, "tolerance": negative}, "TOLERANCE_INVALID", "tolerance.absolute"),
        (
            {**base, "tolerance": pb.Tolerance(relative=1.5)},
            "TOLERANCE_INVALID",
            "tolerance.relative",
        ),
        (
            {**base, "tolerance": pb.Tolerance(relative=float("nan"))},
            "TOLERANCE_INVALID",
            "tolerance.relative",
        ),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            usage_stub(system).GetReconciliation(pb.GetReconciliationRequest(**request))
        error = rich_error(caught.value)
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason), request
        assert field in error.fields
    assert OPERATOR


def expected_discrepancies(
    calls: list[Call], absolute_s: float, relative: float
) -> list[tuple[int, str, int | None, int | None]]:
    """(kind, call_id, platform ms, operator ms) in (start, call_id) order."""
    out = []
    for call in calls:
        if call.platform_s is not None and call.operator_s is not None:
            allowed = max(absolute_s, relative * max(call.platform_s, call.operator_s))
            if abs(call.platform_s - call.operator_s) <= allowed:
                continue
            kind = pb.DISCREPANCY_KIND_MISMATCH
        elif call.platform_s is not None:
            kind = pb.DISCREPANCY_KIND_MISSING_FROM_OPERATOR
        elif call.unanswered:
            kind = pb.DISCREPANCY_KIND_UNANSWERED_ON_PLATFORM
        else:
            kind = pb.DISCREPANCY_KIND_UNKNOWN_TO_PLATFORM
        ms = [None if v is None else round(v * 1000) for v in (call.platform_s, call.operator_s)]
        if call.unanswered:
            ms[0] = 0  # the platform's duration of a call it did not answer
        assert call.start is not None
        out.append((call.start, call.call_id, kind, ms[0], ms[1]))
    return [(kind, call_id, p, o) for _, call_id, kind, p, o in sorted(out)]


def _streamed(responses: list[pb.StreamDiscrepanciesResponse]) -> list[tuple[int, str, Any, Any]]:
    return [
        (
            x.kind,
            x.call_id,
            x.platform_duration.ToMilliseconds() if x.HasField("platform_duration") else None,
            x.operator_duration.ToMilliseconds() if x.HasField("operator_duration") else None,
        )
        for response in responses
        for x in response.discrepancies
    ]


def test_discrepancies_one_by_one_in_order(data: tuple[RunningSystem, list[Call]]) -> None:
    system, calls = data
    request = pb.StreamDiscrepanciesRequest(
        start_time=stamp(START), end_time=stamp(END), max_batch_size=4
    )
    responses = list(usage_stub(system).StreamDiscrepancies(request, timeout=30))
    want = expected_discrepancies(calls, 1.0, 0.01)
    assert _streamed(responses) == want
    assert all(0 < len(r.discrepancies) <= 4 for r in responses)
    # Every response carries a cursor, each sealed afresh.
    cursors = [r.cursor for r in responses]
    assert all(cursors) and len(set(cursors)) == len(cursors)
    assert {x[0] for x in want} == {
        pb.DISCREPANCY_KIND_MISMATCH,
        pb.DISCREPANCY_KIND_MISSING_FROM_OPERATOR,
        pb.DISCREPANCY_KIND_UNKNOWN_TO_PLATFORM,
        pb.DISCREPANCY_KIND_UNANSWERED_ON_PLATFORM,
    }
    # One kind only, and a tenant.
    for kind in (
        pb.DISCREPANCY_KIND_UNKNOWN_TO_PLATFORM,
        pb.DISCREPANCY_KIND_UNANSWERED_ON_PLATFORM,
        pb.DISCREPANCY_KIND_MISMATCH,
    ):
        found = 0
        for tenant in (TENANT, OTHER_TENANT):
            request = pb.StreamDiscrepanciesRequest(
                start_time=stamp(START), end_time=stamp(END), kind=kind, tenant_id=tenant
            )
            only = _streamed(list(usage_stub(system).StreamDiscrepancies(request, timeout=30)))
            tenant_calls = [c for c in calls if c.tenant == tenant]
            assert only == [
                x for x in expected_discrepancies(tenant_calls, 1.0, 0.01) if x[0] == kind
            ], (kind, tenant)
            found += len(only)
        assert found, kind


def test_discrepancies_resume_from_the_last_cursor_after_a_cut(
    data: tuple[RunningSystem, list[Call]],
) -> None:
    """A stream cut after any response and resumed with the last cursor received gives every
    discrepancy exactly once; resuming after the last gives one response without any."""
    system, calls = data
    want = expected_discrepancies(calls, 1.0, 0.01)
    base: dict[str, Any] = {"start_time": stamp(START), "end_time": stamp(END)}
    stub = usage_stub(system)
    batches = -(-len(want) // 3)
    assert batches >= 3
    for cut in range(1, batches + 1):
        call = stub.StreamDiscrepancies(
            pb.StreamDiscrepanciesRequest(**base, max_batch_size=3), timeout=30
        )
        received = [next(call) for _ in range(cut)]
        call.cancel()  # the stream breaks here
        rest = list(
            stub.StreamDiscrepancies(
                pb.StreamDiscrepanciesRequest(**base, max_batch_size=3, cursor=received[-1].cursor),
                timeout=30,
            )
        )
        assert _streamed(received + rest) == want, cut
        assert all(r.cursor for r in rest)
    (last,) = rest
    assert list(last.discrepancies) == []
    # From the cursor of a response without discrepancies: again nothing, and a cursor.
    (again,) = stub.StreamDiscrepancies(
        pb.StreamDiscrepanciesRequest(**base, cursor=last.cursor), timeout=30
    )
    assert (list(again.discrepancies), bool(again.cursor)) == ([], True)
    # A period without discrepancies: one response, none in it, and a cursor that resumes.
    empty: dict[str, Any] = {
        "start_time": stamp(END),
        "end_time": stamp(END + dt.timedelta(hours=1)),
    }
    (nothing,) = stub.StreamDiscrepancies(pb.StreamDiscrepanciesRequest(**empty), timeout=30)
    assert (list(nothing.discrepancies), bool(nothing.cursor)) == ([], True)
    request = pb.StreamDiscrepanciesRequest(**empty, cursor=nothing.cursor)
    assert [list(r.discrepancies) for r in stub.StreamDiscrepancies(request)] == [[]]


def _refusal(system: RunningSystem, fields: dict[str, Any], operator: str = OPERATOR) -> Any:
    with pytest.raises(grpc.RpcError) as caught:
        list(
            usage_stub(system, operator).StreamDiscrepancies(
                pb.StreamDiscrepanciesRequest(**fields), timeout=30
            )
        )
    return rich_error(caught.value)


def test_discrepancy_request_errors(data: tuple[RunningSystem, list[Call]]) -> None:
    system, _ = data
    base: dict[str, Any] = {"start_time": stamp(START), "end_time": stamp(END)}
    call = usage_stub(system).StreamDiscrepancies(
        pb.StreamDiscrepanciesRequest(**base, max_batch_size=1), timeout=30
    )
    first = next(call)
    call.cancel()
    for request, reason in (
        ({**base, "kind": 9}, "KIND_INVALID"),
        ({**base, "max_batch_size": -1}, "MAX_BATCH_SIZE_INVALID"),
        ({**base, "cursor": "junk"}, "CURSOR_INVALID"),
        ({"end_time": stamp(END)}, "PERIOD_INVALID"),
    ):
        assert _refusal(system, request).reason == reason, request
    # A cursor is bound to the caller, period, filters and tolerance that made it: with any
    # other, it is refused exactly as a malformed one.
    malformed = _refusal(system, {**base, "cursor": "junk"})
    assert (malformed.code, malformed.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        {"cursor": "CURSOR_INVALID"},
    )
    cursor = first.cursor
    later = stamp(START + dt.timedelta(seconds=1))
    tolerance = pb.Tolerance(relative=0.5)
    tolerance.absolute.FromSeconds(1)
    for name, request in {
        "another start": {**base, "start_time": later, "cursor": cursor},
        "another end": {**base, "end_time": stamp(END + dt.timedelta(days=1)), "cursor": cursor},
        "a tenant": {**base, "tenant_id": TENANT, "cursor": cursor},
        "a kind": {**base, "kind": pb.DISCREPANCY_KIND_MISMATCH, "cursor": cursor},
        "a tolerance": {**base, "tolerance": tolerance, "cursor": cursor},
    }.items():
        assert _refusal(system, request) == malformed, name
    assert _refusal(system, {**base, "cursor": cursor}, OTHER_OPERATOR) == malformed


def test_forged_and_foreign_discrepancy_cursors_answer_as_malformed_ones(
    data: tuple[RunningSystem, list[Call]],
) -> None:
    system, _ = data
    base: dict[str, Any] = {"start_time": stamp(START), "end_time": stamp(END)}
    call = usage_stub(system).StreamDiscrepancies(
        pb.StreamDiscrepanciesRequest(**base, max_batch_size=1), timeout=30
    )
    real = next(call).cursor
    call.cancel()
    summary = usage_stub(system).GetUsageSummary(
        pb.GetUsageSummaryRequest(**base, granularity=pb.GRANULARITY_DAY, page_size=1)
    )
    assert summary.next_page_token
    raw = bytearray(base64.urlsafe_b64decode(real + "=" * (-len(real) % 4)))
    raw[-1] ^= 1
    body = f"{START.isoformat()}\x1f{'x' * 8}".encode()
    forged = {
        "another deployment's": Keyring.generate().seal("usage.discrepancies", body, "x"),
        "truncated": real[:-3],
        "a bit of its tag flipped": base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode(),
        "a usage page token": summary.next_page_token,
        "made of base64url": "A" * len(real),
    }
    malformed = _refusal(system, {**base, "cursor": "junk"})
    assert malformed.reason == "CURSOR_INVALID"
    for name, cursor in forged.items():
        assert _refusal(system, {**base, "cursor": cursor}) == malformed, name


def _usage(system: RunningSystem, start: dt.datetime, end: dt.datetime) -> dict[int, list[int]]:
    """The operator's usage of a period summed per duration source: [calls, billed seconds]."""
    request = pb.GetUsageSummaryRequest(
        start_time=stamp(start), end_time=stamp(end), granularity=pb.GRANULARITY_DAY
    )
    out: dict[int, list[int]] = {}
    for row in usage_stub(system).GetUsageSummary(request).rows:
        for s in row.by_source:
            total = out.setdefault(s.source, [0, 0])
            total[0] += s.call_count
            total[1] += s.billed_duration.seconds
    return out


def test_a_duration_of_a_call_the_platform_did_not_answer(
    session_pki: Pki, database_url: str, tmp_path: Any
) -> None:
    """The platform has the call as not answered (busy, 0 s) and the operator reported 120 s
    of it: the record is accepted and kept, counts in no usage, and reconciliation names it
    UNANSWERED_ON_PLATFORM with both durations, whether the operator's record came first (until
    the platform's call arrives, the platform has no call of that id: UNKNOWN_TO_PLATFORM,
    counted at its start) or the platform's call did. A record of a call id the platform has no
    call of stays UNKNOWN_TO_PLATFORM and counts at its start."""
    system = feed_system(session_pki, tmp_path, database_url)
    try:
        stub = usage_stub(system)
        end = NOW - dt.timedelta(hours=1)
        busy = [record(end=end - dt.timedelta(minutes=m), answered=False) for m in (10, 20)]
        record_first, platform_first = busy

        def report(call_id: str | None, start: dt.datetime) -> pb.CallDurationRecord:
            return duration_record(call_id=call_id, start=start, talk_s=120.0)

        reports = {
            "record first": report(record_first.call_id, end - dt.timedelta(minutes=13)),
            "unknown": report(None, end - dt.timedelta(minutes=30)),
            "platform first": report(platform_first.call_id, end - dt.timedelta(minutes=23)),
        }
        midnight = NOW.replace(hour=0, minute=0, second=0)
        whole_days = (midnight - dt.timedelta(days=2), midnight + dt.timedelta(days=1))
        partial = (NOW - dt.timedelta(hours=3), END)  # read from the calls themselves
        operator = pb.DURATION_SOURCE_OPERATOR

        def reconciled() -> dict[str, Any]:
            return _figures(
                stub.GetReconciliation(
                    pb.GetReconciliationRequest(start_time=stamp(START), end_time=stamp(END))
                )
            )

        # The operator's record first: the platform has no call of that id yet.
        (response,) = submit(stub, [reports["record first"], reports["unknown"]])
        assert response.accepted_count == 2, response
        for period in (whole_days, partial):
            assert _usage(system, *period) == {operator: [2, 240]}, period
        assert reconciled() | {"operator_total_ms": 0} == {
            **dict.fromkeys(("matched", "mismatch", "platform_only", "unanswered"), 0),
            "operator_only": 2,
            "platform_total_ms": 0,
            "operator_total_ms": 0,
        }
        # Then the platform's calls; then the operator's record of the second.
        publish_records(system.ingest(), busy)
        eventually(lambda: len(kept(system)) == 2, timeout=15)
        (response,) = submit(stub, [reports["platform first"]])
        assert response.accepted_count == 1, response
        for period in (whole_days, partial):
            assert _usage(system, *period) == {operator: [1, 120]}, period
        assert reconciled() == {
            **dict.fromkeys(("matched", "mismatch", "platform_only"), 0),
            "operator_only": 1,
            "unanswered": 2,
            "platform_total_ms": 0,
            "operator_total_ms": 360_000,  # every record the operator reported
        }
        base: dict[str, Any] = {"start_time": stamp(START), "end_time": stamp(END)}
        listed = [
            x
            for r in stub.StreamDiscrepancies(pb.StreamDiscrepanciesRequest(**base), timeout=30)
            for x in r.discrepancies
        ]
        unanswered = pb.DISCREPANCY_KIND_UNANSWERED_ON_PLATFORM
        unknown = pb.DISCREPANCY_KIND_UNKNOWN_TO_PLATFORM
        assert [(x.kind, x.call_id, x.record_id) for x in listed] == [
            (unknown, reports["unknown"].call_id, reports["unknown"].record_id),
            (unanswered, platform_first.call_id, reports["platform first"].record_id),
            (unanswered, record_first.call_id, reports["record first"].record_id),
        ]
        for x in listed:  # the operator's start and tenant, both durations where there are two
            report_of = {r.record_id: r for r in reports.values()}[x.record_id]
            assert (x.start_time, x.tenant_id) == (report_of.start_time, report_of.tenant_id)
            assert x.operator_duration.ToSeconds() == 120
            assert x.HasField("platform_duration") == (x.kind == unanswered)
            assert x.platform_duration.ToMilliseconds() == 0
        for kind in (unanswered, unknown):
            request = pb.StreamDiscrepanciesRequest(**base, kind=kind)
            only = [
                x for r in stub.StreamDiscrepancies(request, timeout=30) for x in r.discrepancies
            ]
            assert only == [x for x in listed if x.kind == kind], kind
    finally:
        system.stop()
