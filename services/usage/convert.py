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


class _Unreadable(Exception):
    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal


def _time(message: pb.CallDurationRecord, name: str) -> dt.datetime | None:
    if not message.HasField(name):  # type: ignore[arg-type]
        return None
    value = time_in(getattr(message, name))
    if value is None:
        raise _Unreadable(Refusal(f"{name.upper()}_INVALID", name, "not a valid timestamp"))
    return value


def _duration(message: pb.CallDurationRecord) -> dt.timedelta | None:
    if not message.HasField("duration"):
        return None
    value = duration_in(message.duration)
    if value is None:
        raise _Unreadable(Refusal("DURATION_INVALID", "duration", "not a valid duration"))
    return value


def submitted_in(message: pb.CallDurationRecord) -> Submitted | Refusal:
    """The domain record and the digest of its content, or why it cannot even be read.
    Unknown fields must have been dropped (`DiscardUnknownFields` on the request)."""
    clean = message  # the caller dropped unknown fields from the whole request
    try:
        record = DurationRecord(
            record_id=clean.record_id,
            call_id=clean.call_id,
            tenant_id=clean.tenant_id,
            caller=clean.caller,
            callee=clean.callee,
            direction=DIRECTION_IN.get(clean.direction),
            start_time=_time(clean, "start_time"),
            end_time=_time(clean, "end_time"),
            duration=_duration(clean),
        )
    except _Unreadable as unreadable:
        return unreadable.refusal
    digest = hashlib.sha256(clean.SerializeToString(deterministic=True)).digest()
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
