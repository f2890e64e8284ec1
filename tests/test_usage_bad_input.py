"""Bad input to the usage queries through the real server (GetUsageSummary, GetTenantUsage,
GetReconciliation, StreamDiscrepancies): any period, tenant, granularity, kind, tolerance, page
size, page token and cursor answers either a page or INVALID_ARGUMENT with an ErrorInfo of the
usage domain and a BadRequest violation naming the field; never INTERNAL or UNKNOWN; the server
keeps serving."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from opconnect.usage.v1 import usage_pb2 as pb
from opconnect.usage.v1 import usage_pb2_grpc as pb_grpc
from tests.conftest import PLATFORM, TENANT, RunningSystem, rich_error

DOMAIN = "usage.opconnect"
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)

fuzz = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Timestamps and durations as a client may send them: valid, near the edges, or not valid at
# all (nanos out of range, seconds beyond year 9999, signs that disagree).
seconds = st.one_of(
    st.integers(int(NOW.timestamp()) - 40 * 86_400, int(NOW.timestamp()) + 86_400),
    st.sampled_from([-1, 0, 253_402_300_799, 253_402_300_800, -62_135_596_801]),
    st.integers(-(2**63), 2**63 - 1),
)
nanos = st.one_of(st.just(0), st.integers(-(2**31), 2**31 - 1))
stamps = st.builds(timestamp_pb2.Timestamp, seconds=seconds, nanos=nanos)
spans = st.builds(
    duration_pb2.Duration,
    seconds=st.one_of(st.integers(-5, 7_200), st.integers(-(2**63), 2**63 - 1)),
    nanos=nanos,
)
tenants = st.one_of(st.just(""), st.just(TENANT), st.text(max_size=60))
tokens = st.one_of(st.just(""), st.text(max_size=80), st.from_regex(r"[A-Za-z0-9_-]{1,120}"))
enums = st.integers(-3, 5)
sizes = st.integers(-5, 2_000)


def maybe(field: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(st.just({}), values.map(lambda v: {field: v}))


def request_fields(*extra: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    parts = [maybe("start_time", stamps), maybe("end_time", stamps), maybe("tenant_id", tenants)]
    return st.tuples(*parts, *extra).map(lambda dicts: {k: v for d in dicts for k, v in d.items()})


def answered_or_refused(call: Callable[[], object]) -> None:
    """The call answers, or is refused as the contract says: INVALID_ARGUMENT, usage domain,
    the offending field named."""
    try:
        call()
    except grpc.RpcError as error:
        rich = rich_error(error)
        assert rich.code is grpc.StatusCode.INVALID_ARGUMENT, (rich.code, rich.message)
        assert rich.domain == DOMAIN
        assert rich.fields, "a BadRequest violation names the field"


def still_serving(system: RunningSystem) -> None:
    stub = pb_grpc.UsageServiceStub(system.channel())
    start, end = NOW - dt.timedelta(days=1), NOW
    request = pb.GetReconciliationRequest()
    request.start_time.FromDatetime(start)
    request.end_time.FromDatetime(end)
    stub.GetReconciliation(request, timeout=10)


@fuzz
@given(
    fields=request_fields(
        maybe("granularity", enums), maybe("page_size", sizes), maybe("page_token", tokens)
    )
)
@example(  # a period within the last day there is (no midnight after it): was INTERNAL
    fields={
        "start_time": timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=0),
        "end_time": timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_000),
        "granularity": 1,
    }
)
def test_usage_summary_with_any_input(fuzz_system: RunningSystem, fields: dict[str, Any]) -> None:
    stub = pb_grpc.UsageServiceStub(fuzz_system.channel())
    request = pb.GetUsageSummaryRequest(**fields)
    answered_or_refused(lambda: stub.GetUsageSummary(request, timeout=10))
    still_serving(fuzz_system)


@fuzz
@given(
    fields=request_fields(
        maybe("granularity", enums),
        maybe("operator_id", st.text(max_size=70)),
        maybe("page_size", sizes),
        maybe("page_token", tokens),
    )
)
def test_tenant_usage_with_any_input(fuzz_system: RunningSystem, fields: dict[str, Any]) -> None:
    stub = pb_grpc.UsageReportServiceStub(fuzz_system.channel("platform", PLATFORM))
    request = pb.GetTenantUsageRequest(**fields)
    answered_or_refused(lambda: stub.GetTenantUsage(request, timeout=10))
    still_serving(fuzz_system)


tolerances = st.builds(
    pb.Tolerance,
    absolute=spans,
    relative=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1)),
)


@fuzz
@given(fields=request_fields(maybe("tolerance", tolerances)))
def test_reconciliation_with_any_input(fuzz_system: RunningSystem, fields: dict[str, Any]) -> None:
    stub = pb_grpc.UsageServiceStub(fuzz_system.channel())
    request = pb.GetReconciliationRequest(**fields)
    answered_or_refused(lambda: stub.GetReconciliation(request, timeout=10))
    still_serving(fuzz_system)


@fuzz
@given(
    fields=request_fields(
        maybe("tolerance", tolerances),
        maybe("kind", enums),
        maybe("max_batch_size", sizes),
        maybe("cursor", tokens),
    )
)
def test_discrepancies_with_any_input(fuzz_system: RunningSystem, fields: dict[str, Any]) -> None:
    stub = pb_grpc.UsageServiceStub(fuzz_system.channel())
    request = pb.StreamDiscrepanciesRequest(**fields)
    answered_or_refused(lambda: list(stub.StreamDiscrepancies(request, timeout=10)))
    still_serving(fuzz_system)
