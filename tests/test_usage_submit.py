"""SubmitCallDurations through the gateway: acknowledged after commit, idempotent by record_id,
one record per call, bad records rejected alone, and a stream cut and resent counting each
record exactly once."""

from __future__ import annotations

import datetime as dt
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import runtime as server
from opconnect.usage.v1 import usage_pb2 as pb
from opconnect.usage.v1 import usage_pb2_grpc as pb_grpc
from services.usage import tables
from tests.conftest import (
    OTHER_OPERATOR,
    RunningSystem,
    rich_error,
)
from tests.helpers import stored, submit, usage_stub
from tests.records_data import duration_record, stamp


def test_submit_is_acknowledged_per_record(system: RunningSystem) -> None:
    records = [duration_record() for _ in range(3)]
    (response,) = submit(usage_stub(system), records)
    assert response.batch_id == "b0"
    assert [(r.record_id, r.outcome) for r in response.results] == [
        (r.record_id, pb.CALL_DURATION_OUTCOME_ACCEPTED) for r in records
    ]
    assert (response.accepted_count, response.duplicate_count, response.refused_count) == (3, 0, 0)
    assert stored(system) == sorted(r.record_id for r in records)


def test_duplicates_conflicts_and_one_record_per_call(system: RunningSystem) -> None:
    first = duration_record()
    changed = pb.CallDurationRecord()
    changed.CopyFrom(first)
    changed.duration.FromSeconds(first.duration.seconds - 1)
    same_call = duration_record(call_id=first.call_id)
    other = duration_record()
    one, two = submit(
        usage_stub(system),
        [first],
        [first, changed, same_call, other, other],
    )
    assert one.accepted_count == 1
    assert [(r.outcome, r.reason, r.field) for r in two.results] == [
        (pb.CALL_DURATION_OUTCOME_DUPLICATE, "", ""),
        (pb.CALL_DURATION_OUTCOME_REFUSED, "RECORD_ID_CONFLICT", "record_id"),
        (pb.CALL_DURATION_OUTCOME_REFUSED, "CALL_ALREADY_REPORTED", "call_id"),
        (pb.CALL_DURATION_OUTCOME_ACCEPTED, "", ""),
        (pb.CALL_DURATION_OUTCOME_DUPLICATE, "", ""),
    ]
    assert (two.accepted_count, two.duplicate_count, two.refused_count) == (1, 2, 2)
    assert stored(system) == sorted([first.record_id, other.record_id])
    # Another operator's ids are its own: the same record_id and call_id are new there.
    (theirs,) = submit(usage_stub(system, OTHER_OPERATOR), [first])
    assert theirs.accepted_count == 1


def _set(name: str, value: Any) -> Any:
    return lambda r: setattr(r, name, value)


def _clear(name: str) -> Any:
    return lambda r: r.ClearField(name)


def _shift(name: str, delta: dt.timedelta) -> Any:
    def change(r: pb.CallDurationRecord) -> None:
        getattr(r, name).CopyFrom(stamp(getattr(r, name).ToDatetime(dt.UTC) + delta))

    return change


CASES: list[tuple[Any, str, str]] = [
    (_set("record_id", ""), "RECORD_ID_INVALID", "record_id"),
    (_set("record_id", "x" * 129), "RECORD_ID_INVALID", "record_id"),
    (_set("record_id", "tab\there"), "RECORD_ID_INVALID", "record_id"),
    (_set("call_id", "a b"), "CALL_ID_INVALID", "call_id"),
    (_set("tenant_id", "nope"), "TENANT_ID_INVALID", "tenant_id"),
    (_set("caller", "sip:alice@contoso.example"), "CALLER_INVALID", "caller"),
    (_set("callee", "0142685300"), "CALLEE_INVALID", "callee"),
    (_set("direction", 0), "DIRECTION_INVALID", "direction"),
    (_clear("start_time"), "START_TIME_INVALID", "start_time"),
    (_shift("start_time", dt.timedelta(days=2)), "START_TIME_INVALID", "start_time"),
    (_shift("start_time", -dt.timedelta(days=400)), "RECORD_EXPIRED", "start_time"),
    (_clear("end_time"), "END_TIME_INVALID", "end_time"),
    (_shift("end_time", -dt.timedelta(hours=2)), "END_TIME_INVALID", "end_time"),
    (_shift("end_time", dt.timedelta(hours=49)), "END_TIME_INVALID", "end_time"),
    (_shift("end_time", dt.timedelta(hours=2)), "END_TIME_INVALID", "end_time"),  # future
    (_clear("duration"), "DURATION_INVALID", "duration"),
    (lambda r: r.duration.FromSeconds(-1), "DURATION_INVALID", "duration"),
    (lambda r: r.duration.FromSeconds(r.duration.seconds + 2), "DURATION_INVALID", "duration"),
    (lambda r: setattr(r.start_time, "nanos", -1), "START_TIME_INVALID", "start_time"),
]


def test_bad_records_are_rejected_alone(system: RunningSystem) -> None:
    batch: list[pb.CallDurationRecord] = []
    good: list[pb.CallDurationRecord] = []
    for change, _, _ in CASES:
        bad = duration_record()
        change(bad)
        ok = duration_record()
        batch += [bad, ok]
        good.append(ok)
    (response,) = submit(usage_stub(system), batch)
    for (_, reason, field), bad_result, good_result in zip(
        CASES, response.results[::2], response.results[1::2], strict=True
    ):
        assert (bad_result.outcome, bad_result.reason, bad_result.field) == (
            pb.CALL_DURATION_OUTCOME_REFUSED,
            reason,
            field,
        )
        assert bad_result.message
        assert good_result.outcome == pb.CALL_DURATION_OUTCOME_ACCEPTED
    assert stored(system) == sorted(r.record_id for r in good)
    # Rounding up to the next second is allowed.
    rounded = duration_record(talk_s=95.4)
    rounded.duration.FromSeconds(96)
    (response,) = submit(usage_stub(system), [rounded])
    assert response.accepted_count == 1


def test_a_cut_stream_resent_counts_each_record_once(system: RunningSystem) -> None:
    records = [duration_record() for _ in range(50)]
    batches = [records[i : i + 10] for i in range(0, 50, 10)]
    call = usage_stub(system).SubmitCallDurations(
        iter(
            pb.SubmitCallDurationsRequest(batch_id=str(i), records=b) for i, b in enumerate(batches)
        )
    )
    acknowledged = [next(call), next(call)]
    call.cancel()  # cut after two acknowledgements; later batches may or may not be committed
    assert sum(r.accepted_count for r in acknowledged) == 20
    # Resend every batch that was not acknowledged: nothing is lost, nothing counted twice.
    responses = submit(usage_stub(system), *batches[2:])
    assert all(
        r.outcome in (pb.CALL_DURATION_OUTCOME_ACCEPTED, pb.CALL_DURATION_OUTCOME_DUPLICATE)
        for response in responses
        for r in response.results
    )
    assert stored(system) == sorted(r.record_id for r in records)


def test_bad_batches_end_the_stream_and_keep_what_was_acknowledged(
    sqlite_system: RunningSystem,
) -> None:
    kept = duration_record()
    for batch, batch_id, reason in (
        ([], "", "BATCH_EMPTY"),
        ([duration_record() for _ in range(1_001)], "", "BATCH_TOO_LARGE"),
        ([duration_record()], "y" * 129, "BATCH_ID_INVALID"),
    ):
        requests = [
            pb.SubmitCallDurationsRequest(batch_id="ok", records=[kept]),
            pb.SubmitCallDurationsRequest(batch_id=batch_id, records=batch),
        ]
        call = usage_stub(sqlite_system).SubmitCallDurations(iter(requests), timeout=30)
        assert next(call).batch_id == "ok"
        with pytest.raises(grpc.RpcError) as caught:
            next(call)
        error = rich_error(caught.value)
        assert (error.code, error.reason, error.domain) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            reason,
            "usage.opconnect",
        )
    assert stored(sqlite_system) == [kept.record_id]


def test_only_operators_submit(sqlite_system: RunningSystem) -> None:
    as_platform = pb_grpc.UsageServiceStub(sqlite_system.channel("platform", "admin-center"))
    with pytest.raises(grpc.RpcError) as caught:
        submit(as_platform, [duration_record()])
    assert rich_error(caught.value).reason == "OPERATOR_ONLY"


TEXT_FIELDS = {
    "record_id": "RECORD_ID_INVALID",
    "call_id": "CALL_ID_INVALID",
    "tenant_id": "TENANT_ID_INVALID",
    "caller": "CALLER_INVALID",
    "callee": "CALLEE_INVALID",
}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=st.sampled_from(sorted(TEXT_FIELDS)), value=st.text(max_size=200))
def test_fuzzed_fields_are_accepted_or_rejected_for_that_field(
    fuzz_system: RunningSystem, name: str, value: str
) -> None:
    bad = duration_record()
    setattr(bad, name, value)
    before, after = duration_record(), duration_record()
    (response,) = submit(usage_stub(fuzz_system), [before, bad, after])
    first, middle, last = response.results
    assert first.outcome == last.outcome == pb.CALL_DURATION_OUTCOME_ACCEPTED
    if middle.outcome == pb.CALL_DURATION_OUTCOME_REFUSED:
        assert (middle.reason, middle.field) == (TEXT_FIELDS[name], name)
    else:
        assert middle.outcome == pb.CALL_DURATION_OUTCOME_ACCEPTED


def test_durations_past_the_retention_are_purged(sqlite_system: RunningSystem) -> None:
    old, recent = duration_record(), duration_record()
    submit(usage_stub(sqlite_system), [old, recent])

    def age(session: sa.orm.Session) -> None:
        c = tables.DURATIONS.c
        then = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
        session.execute(
            sa.update(tables.DURATIONS).where(c.record_id == old.record_id).values(start_time=then)
        )

    sqlite_system.call(sqlite_system.runtime.db.run(age, write=True))
    sqlite_system.call(server.purge(sqlite_system.runtime))
    assert stored(sqlite_system) == [recent.record_id]
