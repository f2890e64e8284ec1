"""The protobuf edge of the usage service: messages in, domain types out, and back."""

from __future__ import annotations

import datetime as dt
import hashlib

from google.protobuf import duration_pb2

from opconnect.usage.v1 import usage_pb2 as pb
from plumbing.config import Settings
from plumbing.direction import DIRECTION_IN, DIRECTION_OUT
from plumbing.validation import Outcome, Refusal
from plumbing.wellknown import duration_in, time_in, timestamp
from services.usage.rules import (
    Discrepancy,
    DiscrepancyKind,
    DurationRecord,
    Granularity,
    Reconciliation,
    Result,
    Source,
    Submitted,
    Tolerance,
    UsageRow,
    check_record,
)

OUTCOME_OUT = {
    Outcome.ACCEPTED: pb.CALL_DURATION_OUTCOME_ACCEPTED,
    Outcome.DUPLICATE: pb.CALL_DURATION_OUTCOME_DUPLICATE,
    Outcome.REFUSED: pb.CALL_DURATION_OUTCOME_REFUSED,
}


_START_INVALID = Refusal("START_TIME_INVALID", "start_time", "not a valid timestamp")
_END_INVALID = Refusal("END_TIME_INVALID", "end_time", "not a valid timestamp")
_DURATION_INVALID = Refusal("DURATION_INVALID", "duration", "not a valid duration")


def submitted_in(message: pb.CallDurationRecord) -> Submitted | Refusal:
    """The domain record and the digest of its content, or why it cannot even be read (the
    first of its times and duration that is set and not valid). Unknown fields must have been
    dropped (`DiscardUnknownFields` on the request). Once per record: no helper calls."""
    has = message.HasField
    start = end = None
    duration = None
    if has("start_time") and (start := time_in(message.start_time)) is None:
        return _START_INVALID
    if has("end_time") and (end := time_in(message.end_time)) is None:
        return _END_INVALID
    if has("duration") and (duration := duration_in(message.duration)) is None:
        return _DURATION_INVALID
    record = DurationRecord(
        record_id=message.record_id,
        call_id=message.call_id,
        tenant_id=message.tenant_id,
        caller=message.caller,
        callee=message.callee,
        direction=DIRECTION_IN.get(message.direction),
        start_time=start,
        end_time=end,
        duration=duration,
    )
    digest = hashlib.sha256(message.SerializeToString(deterministic=True)).digest()
    return Submitted(record, digest)


def check(messages: list[pb.CallDurationRecord], settings: Settings) -> list[Submitted | Result]:
    """Each record read and checked: ready to store, or its refusal. Unknown fields must have
    been dropped, as for `submitted_in`."""
    now = dt.datetime.now(dt.UTC)
    retention = dt.timedelta(seconds=settings.usage_retention_s)
    skew = dt.timedelta(seconds=settings.clock_skew_s)
    out: list[Submitted | Result] = []
    for message in messages:
        submitted = submitted_in(message)
        if isinstance(submitted, Refusal):
            out.append(Result(message.record_id, Outcome.REFUSED, submitted))
            continue
        refusal = check_record(submitted.record, now, retention, skew)
        if refusal is None:
            out.append(submitted)
        else:
            out.append(Result(message.record_id, Outcome.REFUSED, refusal))
    return out


def add_results(out: pb.SubmitCallDurationsResponse, results: list[Result]) -> None:
    """The results of a batch into its response, in order: an accepted or duplicate record's as
    two fields (most of a batch), a refused one's with its reason, field and message."""
    add = out.results.add
    for result in results:
        refusal = result.refusal
        if refusal is None:
            add(record_id=result.record_id, outcome=OUTCOME_OUT[result.outcome])
        else:
            add(
                record_id=result.record_id,
                outcome=OUTCOME_OUT[result.outcome],
                reason=refusal.reason,
                field=refusal.field,
                message=refusal.message,
            )


SOURCE_OUT = {
    Source.OPERATOR: pb.DURATION_SOURCE_OPERATOR,
    Source.PLATFORM: pb.DURATION_SOURCE_PLATFORM,
}
GRANULARITY_IN = {
    pb.GRANULARITY_DAY: Granularity.DAY,
    pb.GRANULARITY_MONTH: Granularity.MONTH,
}


def row_out(row: UsageRow) -> pb.UsageRow:
    return pb.UsageRow(
        tenant_id=row.tenant_id,
        period_start_time=timestamp(row.period_start),
        direction=DIRECTION_OUT[row.direction],
        call_count=row.calls,
        billed_duration=duration_pb2.Duration(seconds=row.billed_seconds),
        by_source=[
            pb.SourceUsage(
                source=SOURCE_OUT[s.source],
                call_count=s.calls,
                billed_duration=duration_pb2.Duration(seconds=s.billed_seconds),
            )
            for s in row.by_source
        ],
    )


def _us(value: int) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromMicroseconds(value)
    return out


def reconciliation_out(
    found: Reconciliation, tolerance: Tolerance, computed: dt.datetime
) -> pb.GetReconciliationResponse:
    absolute = duration_pb2.Duration()
    absolute.FromTimedelta(tolerance.absolute)
    return pb.GetReconciliationResponse(
        matched_count=found.matched,
        mismatch_count=found.mismatched,
        platform_only_count=found.platform_only,
        operator_only_count=found.operator_only,
        unanswered_on_platform_count=found.unanswered_on_platform,
        platform_total_duration=_us(found.platform_total_us),
        operator_total_duration=_us(found.operator_total_us),
        tolerance=pb.Tolerance(absolute=absolute, relative=tolerance.relative),
        compute_time=timestamp(computed),
    )


KIND_IN = {
    pb.DISCREPANCY_KIND_MISMATCH: DiscrepancyKind.MISMATCH,
    pb.DISCREPANCY_KIND_MISSING_FROM_OPERATOR: DiscrepancyKind.MISSING_FROM_OPERATOR,
    pb.DISCREPANCY_KIND_UNKNOWN_TO_PLATFORM: DiscrepancyKind.UNKNOWN_TO_PLATFORM,
    pb.DISCREPANCY_KIND_UNANSWERED_ON_PLATFORM: DiscrepancyKind.UNANSWERED_ON_PLATFORM,
}
KIND_OUT = {v: k for k, v in KIND_IN.items()}


def discrepancy_out(found: Discrepancy) -> pb.Discrepancy:
    out = pb.Discrepancy(
        kind=KIND_OUT[found.kind],
        call_id=found.call_id,
        record_id=found.record_id,
        tenant_id=found.tenant_id,
        start_time=timestamp(found.start),
    )
    if found.platform_us is not None:
        out.platform_duration.CopyFrom(_us(found.platform_us))
    if found.operator_us is not None:
        out.operator_duration.CopyFrom(_us(found.operator_us))
    return out
