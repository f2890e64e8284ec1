"""Call records for tests: a valid record by default, any field overridable, and helpers to
publish them and read a stream to its end; and an operator's call duration records (usage)."""

from __future__ import annotations

import datetime as dt
import itertools
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any, cast

from google.protobuf import duration_pb2, timestamp_pb2

from opconnect.records.v1 import records_pb2 as pb
from opconnect.records.v1 import records_pb2_grpc as pb_grpc
from opconnect.type.v1 import call_direction_pb2 as direction_pb
from opconnect.usage.v1 import usage_pb2
from tests.conftest import OPERATOR, TENANT, StreamReader

INBOUND = direction_pb.CALL_DIRECTION_INBOUND
OUTBOUND = direction_pb.CALL_DIRECTION_OUTBOUND
TRUNK = "sbc1.contoso-telecom.example"
_ids = itertools.count(1)
_duration_ids = itertools.count(1)
NOW = dt.datetime.now(dt.UTC)


def stamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def ms(value: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(round(value * 1_000_000))
    return out


def audio(
    direction: int = pb.MEDIA_DIRECTION_CALLER_TO_CALLEE,
    *,
    packets: int | None = 6_000,
    jitter_ms: float | None = 5.0,
    loss: float | None = 0.01,
    round_trip_ms: float | None = 60.0,
    degradation: float | None = 0.2,
    concealed: float | None = 0.01,
    codec: str = "SILK",
) -> pb.MediaStream:
    stream = pb.MediaStream(
        direction=cast(Any, direction), media_type=pb.MEDIA_TYPE_AUDIO, codec=codec
    )
    if packets is not None:
        stream.packet_count = packets
    if jitter_ms is not None:
        stream.average_jitter.CopyFrom(ms(jitter_ms))
        stream.max_jitter.CopyFrom(ms(jitter_ms * 2))
    if loss is not None:
        stream.packet_loss_rate = loss
    if round_trip_ms is not None:
        stream.average_round_trip.CopyFrom(ms(round_trip_ms))
        stream.max_round_trip.CopyFrom(ms(round_trip_ms * 1.5))
    if degradation is not None:
        stream.network_mos_degradation = degradation
    if concealed is not None:
        stream.concealed_samples_ratio = concealed
    return stream


def record(
    call_id: str | None = None,
    *,
    tenant: str = TENANT,
    direction: int = INBOUND,
    caller: str = "+442071838750",
    callee: str = "+14255550100",
    trunk: str = TRUNK,
    end: dt.datetime | None = None,
    talk_s: float = 120.0,
    answered: bool = True,
    streams: Iterable[pb.MediaStream] | None = None,
) -> pb.CallRecord:
    """A valid record of a call that ended at `end` (default: a minute ago)."""
    end = end or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    invite = end - dt.timedelta(seconds=talk_s + 5)
    message = pb.CallRecord(
        call_id=call_id or f"call-{next(_ids)}-{uuid.uuid4().hex[:8]}",
        tenant_id=tenant,
        direction=cast(Any, direction),
        caller=caller,
        callee=callee,
        trunk_fqdn=trunk,
        invite_time=stamp(invite),
        end_time=stamp(end),
    )
    if answered:
        answer = invite + dt.timedelta(seconds=5)
        message.answer_time.CopyFrom(stamp(answer))
        message.duration.FromTimedelta(end - answer)
        message.final_sip_code = 200
        message.final_sip_phrase = "OK"
        message.end_reason = pb.CALL_END_REASON_CALLER_HANG_UP
        default = [audio(), audio(pb.MEDIA_DIRECTION_CALLEE_TO_CALLER)]
        message.media_streams.extend(default if streams is None else streams)
    else:
        message.final_sip_code = 486
        message.final_sip_phrase = "Busy Here"
        message.end_reason = pb.CALL_END_REASON_BUSY
        message.media_streams.extend(streams or [])
    return message


def published(message: pb.CallRecord, operator: str = OPERATOR) -> pb.PublishedCallRecord:
    return pb.PublishedCallRecord(operator_id=operator, record=message)


def publish(
    stub: pb_grpc.CallRecordIngestServiceStub, *batches: list[pb.PublishedCallRecord]
) -> list[pb.PublishCallRecordsResponse]:
    """Publish batches on one stream; the responses, one per batch."""
    requests = (
        pb.PublishCallRecordsRequest(batch_id=f"batch-{i}", records=batch)
        for i, batch in enumerate(batches)
    )
    return list(stub.PublishCallRecords(requests, timeout=30))


def publish_records(
    stub: pb_grpc.CallRecordIngestServiceStub,
    records: list[pb.CallRecord],
    operator: str = OPERATOR,
) -> pb.PublishCallRecordsResponse:
    (response,) = publish(stub, [published(r, operator) for r in records])
    return response


def stream_all(
    stub: pb_grpc.CallRecordServiceStub, **request: Any
) -> tuple[list[pb.CallRecord], str, list[pb.StreamCallRecordsResponse]]:
    """Read a non-following stream to its end: its records, its last cursor, its responses."""
    request.setdefault("follow", False)
    responses = list(stub.StreamCallRecords(pb.StreamCallRecordsRequest(**request), timeout=30))
    records = [r for response in responses for r in response.records]
    return records, (responses[-1].cursor if responses else ""), responses


def ids(records: Iterable[pb.CallRecord]) -> list[str]:
    return [r.call_id for r in records]


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Follower(StreamReader[pb.StreamCallRecordsResponse]):
    """An open StreamCallRecords stream, read on a thread."""

    def __init__(
        self, stub: pb_grpc.CallRecordServiceStub, request: pb.StreamCallRecordsRequest
    ) -> None:
        super().__init__(stub.StreamCallRecords(request))

    def records(self, count: int, timeout: float = 10) -> tuple[list[pb.CallRecord], str]:
        """Read until `count` records arrived; them and the last cursor."""
        found: list[pb.CallRecord] = []
        cursor = ""
        deadline = time.monotonic() + timeout
        while len(found) < count:
            response = self.next(max(0.01, deadline - time.monotonic()))
            if response is None:
                break
            found += response.records
            cursor = response.cursor
        return found, cursor


def duration_record(
    record_id: str | None = None,
    call_id: str | None = None,
    *,
    start: dt.datetime | None = None,
    talk_s: float = 95.0,
) -> usage_pb2.CallDurationRecord:
    """A valid operator's record of a call that started at `start` (default: an hour before the
    test run)."""
    start = start or NOW - dt.timedelta(hours=1)
    end = start + dt.timedelta(seconds=talk_s)
    message = usage_pb2.CallDurationRecord(
        record_id=record_id or f"cdr-{next(_duration_ids)}",
        call_id=call_id or str(uuid.uuid4()),
        tenant_id=TENANT,
        caller="+442071838750",
        callee="+14255550100",
        direction=INBOUND,
        start_time=stamp(start),
        end_time=stamp(end),
    )
    message.duration.FromTimedelta(end - start)
    return message
