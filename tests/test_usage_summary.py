"""Customer usage (GetUsageSummary for an operator, GetTenantUsage for the platform) checked
against figures computed here, independently: a call counts once at its start, with the
operator's duration where reported and the platform's otherwise, each rounded up to a second."""

from __future__ import annotations

import datetime as dt
import math
import random
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from opconnect.records.v1 import records_pb2
from opconnect.type.v1 import call_direction_pb2 as direction_pb
from opconnect.usage.v1 import usage_pb2 as pb
from opconnect.usage.v1 import usage_pb2_grpc as pb_grpc
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
from tests.records_data import (
    INBOUND,
    OUTBOUND,
    duration_record,
    publish_records,
    record,
    stamp,
)

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
START = NOW - dt.timedelta(days=4)
END = NOW + dt.timedelta(minutes=5)
Key = tuple[str, str, int]  # tenant, day, direction


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def system(
    request: pytest.FixtureRequest, session_pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningSystem]:
    """One system (and data set) per backend for the module."""
    directory = tmp_path_factory.mktemp("usage-summary")
    url = None
    if request.param == "postgres":
        if not POSTGRES_URL:
            pytest.skip(NO_POSTGRES)
        url = migrated_postgres(POSTGRES_URL)
    running = feed_system(session_pki, directory, url)
    yield running
    running.stop()


def _day(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d")


@pytest.fixture(scope="module")
def expected(system: RunningSystem) -> dict[str, dict[Key, dict[str, list[int]]]]:
    """Publish platform calls and submit operator durations; the usage each operator should
    see: operator -> (tenant, day, direction) -> source -> [calls, billed seconds]."""
    rng = random.Random(11)
    usage: dict[str, dict[Key, dict[str, list[int]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(lambda: [0, 0]))
    )

    def count(
        operator: str, tenant: str, start: dt.datetime, direction: int, source: str, seconds: float
    ) -> None:
        cell = usage[operator][(tenant, _day(start), direction)][source]
        cell[0] += 1
        cell[1] += math.ceil(round(seconds, 6))

    for operator in (OPERATOR, OTHER_OPERATOR):
        published: list[records_pb2.CallRecord] = []
        durations: list[pb.CallDurationRecord] = []
        for _ in range(40):
            tenant = rng.choice((TENANT, OTHER_TENANT))
            direction = rng.choice((INBOUND, OUTBOUND))
            end = NOW - dt.timedelta(days=rng.randint(0, 3), minutes=rng.randint(2, 600))
            talk = rng.randint(1, 600) + rng.choice((0.0, 0.25, 0.999))
            answered = rng.random() < 0.85
            message = record(
                tenant=tenant,
                direction=direction,
                caller="+442071838750" if direction == INBOUND else "+14255550100",
                callee="+14255550100" if direction == INBOUND else "+442071838750",
                end=end,
                talk_s=talk,
                answered=answered,
            )
            published.append(message)
            reported = rng.random() < 0.7
            if not answered:
                continue
            answer = message.answer_time.ToDatetime(dt.UTC)
            if reported:
                seconds = talk + rng.choice((0.0, 0.4, -0.3))
                report = duration_record(call_id=message.call_id, start=answer, talk_s=talk)
                report.tenant_id = tenant
                report.direction = direction
                report.duration.FromNanoseconds(round(seconds * 1e9))
                durations.append(report)
                count(operator, tenant, answer, direction, "operator", seconds)
            else:
                count(
                    operator,
                    tenant,
                    answer,
                    direction,
                    "platform",
                    message.duration.ToNanoseconds() / 1e9,
                )
        # Calls only the operator knows: counted at the operator's start, with its duration.
        for _ in range(5):
            start = NOW - dt.timedelta(days=rng.randint(0, 3), hours=rng.randint(1, 10))
            report = duration_record(start=start, talk_s=42.5)
            durations.append(report)
            count(operator, TENANT, start, INBOUND, "operator", 42.5)
        publish_records(system.ingest(), published, operator=operator)
        (response,) = submit(usage_stub(system, operator), durations)
        assert response.accepted_count == len(durations), response
    eventually(lambda: len(kept(system)) >= 80, timeout=15)  # the call feed caught up
    return {op: {k: dict(v) for k, v in rows.items()} for op, rows in usage.items()}


def _rows_of(rows: list[pb.UsageRow]) -> dict[Key, dict[str, list[int]]]:
    out: dict[Key, dict[str, list[int]]] = {}
    for row in rows:
        key = (
            row.tenant_id,
            row.period_start_time.ToDatetime(dt.UTC).strftime("%Y-%m-%d"),
            row.direction,
        )
        assert key not in out, f"row {key} twice"
        sources = {
            {pb.DURATION_SOURCE_OPERATOR: "operator", pb.DURATION_SOURCE_PLATFORM: "platform"}[
                s.source
            ]: [
                s.call_count,
                s.billed_duration.seconds,
            ]
            for s in row.by_source
        }
        assert row.call_count == sum(v[0] for v in sources.values())
        assert row.billed_duration.seconds == sum(v[1] for v in sources.values())
        out[key] = sources
    return out


def _all_pages(call: Any, request: Any) -> list[pb.UsageRow]:
    rows: list[pb.UsageRow] = []
    while True:
        response = call(request)
        rows += response.rows
        if not response.next_page_token:
            return rows
        request.page_token = response.next_page_token


def test_an_operator_sees_its_own_usage_per_tenant_day_and_direction(
    system: RunningSystem, expected: dict[str, dict[Key, dict[str, list[int]]]]
) -> None:
    for operator in (OPERATOR, OTHER_OPERATOR):
        request = pb.GetUsageSummaryRequest(
            start_time=stamp(START),
            end_time=stamp(END),
            granularity=pb.GRANULARITY_DAY,
            page_size=3,
        )
        rows = _all_pages(usage_stub(system, operator).GetUsageSummary, request)
        keys = [(r.tenant_id, r.period_start_time.ToDatetime(dt.UTC), r.direction) for r in rows]
        assert keys == sorted(keys), "ordered by tenant, period, direction"
        assert _rows_of(rows) == expected[operator]


def test_monthly_rows_and_the_tenant_filter(
    system: RunningSystem, expected: dict[str, dict[Key, dict[str, list[int]]]]
) -> None:
    request = pb.GetUsageSummaryRequest(
        start_time=stamp(START),
        end_time=stamp(END),
        granularity=pb.GRANULARITY_MONTH,
        tenant_id=OTHER_TENANT,
    )
    rows = usage_stub(system).GetUsageSummary(request).rows
    months: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for (tenant, _, direction), sources in expected[OPERATOR].items():
        if tenant == OTHER_TENANT:
            for calls, billed in sources.values():
                months[(tenant, direction)][0] += calls
                months[(tenant, direction)][1] += billed
    got = {(r.tenant_id, r.direction): [r.call_count, r.billed_duration.seconds] for r in rows}
    assert got == dict(months)
    # A month row starts at the month's start, clipped to the period.
    assert all(r.period_start_time.ToDatetime(dt.UTC) >= START for r in rows)


def test_the_platform_sees_a_tenant_across_operators(
    system: RunningSystem, expected: dict[str, dict[Key, dict[str, list[int]]]]
) -> None:
    stub = pb_grpc.UsageReportServiceStub(system.channel("platform", "admin-center"))
    request = pb.GetTenantUsageRequest(
        tenant_id=TENANT,
        start_time=stamp(START),
        end_time=stamp(END),
        granularity=pb.GRANULARITY_DAY,
    )
    combined: dict[Key, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for operator_rows in expected.values():
        for key, sources in operator_rows.items():
            if key[0] == TENANT:
                for source, (calls, billed) in sources.items():
                    combined[key][source][0] += calls
                    combined[key][source][1] += billed
    assert _rows_of(_all_pages(stub.GetTenantUsage, request)) == {
        k: dict(v) for k, v in combined.items()
    }
    request = pb.GetTenantUsageRequest(
        tenant_id=TENANT,
        start_time=stamp(START),
        end_time=stamp(END),
        granularity=pb.GRANULARITY_DAY,
        operator_id=OTHER_OPERATOR,
    )
    only = {k: v for k, v in expected[OTHER_OPERATOR].items() if k[0] == TENANT}
    assert _rows_of(_all_pages(stub.GetTenantUsage, request)) == only


def test_usage_request_errors(system: RunningSystem) -> None:
    base: dict[str, Any] = {
        "start_time": stamp(START),
        "end_time": stamp(END),
        "granularity": pb.GRANULARITY_DAY,
    }
    stub = usage_stub(system)
    for request, reason, field in (
        ({**base, "start_time": None}, "PERIOD_INVALID", "start_time"),
        ({**base, "end_time": stamp(START)}, "PERIOD_INVALID", "end_time"),
        (
            {**base, "end_time": stamp(START + dt.timedelta(days=367))},
            "PERIOD_TOO_LONG",
            "end_time",
        ),
        ({**base, "granularity": 0}, "GRANULARITY_INVALID", "granularity"),
        ({**base, "tenant_id": "x"}, "TENANT_ID_INVALID", "tenant_id"),
        ({**base, "page_size": -1}, "PAGE_SIZE_INVALID", "page_size"),
        ({**base, "page_token": "junk"}, "PAGE_TOKEN_INVALID", "page_token"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetUsageSummary(
                pb.GetUsageSummaryRequest(**{k: v for k, v in request.items() if v is not None})
            )
        error = rich_error(caught.value)
        assert (error.code, error.reason, error.domain) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            reason,
            "usage.opconnect",
        )
        assert field in error.fields
    report = pb_grpc.UsageReportServiceStub(system.channel("platform", "admin-center"))
    with pytest.raises(grpc.RpcError) as caught:
        report.GetTenantUsage(pb.GetTenantUsageRequest(**base))
    assert rich_error(caught.value).reason == "TENANT_ID_INVALID"
    with pytest.raises(grpc.RpcError) as caught:
        report.GetTenantUsage(
            pb.GetTenantUsageRequest(**base, tenant_id=TENANT, operator_id="Bad!")
        )
    assert rich_error(caught.value).reason == "OPERATOR_ID_INVALID"
    with pytest.raises(grpc.RpcError) as caught:  # operators never read other tenants' usage
        pb_grpc.UsageReportServiceStub(system.channel("operator", OPERATOR)).GetTenantUsage(
            pb.GetTenantUsageRequest(**base, tenant_id=TENANT)
        )
    assert rich_error(caught.value).reason == "PLATFORM_ONLY"
    assert direction_pb.CALL_DIRECTION_INBOUND == INBOUND
