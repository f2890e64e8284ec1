"""`opconnect operator records ...`: the operator's call records.

`follow` appends records to a file (JSON lines, or CSV by the file's suffix) exactly once
across kills. Its checkpoint holds the stream's cursor and the file's length after the batch
that cursor follows; a batch is written, flushed to disk (fsync), and only then is the
checkpoint replaced (atomically: the library's `FileCheckpoint`). On start the file is cut back
to the saved length, which drops a batch written but not checkpointed, and the stream resumes
strictly after the saved cursor: after any crash the file holds every record once, in order.

CSV columns (one header line; the operator's own data, whole):

    call_id,tenant_id,direction,caller,callee,trunk_fqdn,invite_time,answer_time,end_time,
    duration_s,final_sip_code,final_sip_phrase,end_reason,quality_class,quality_reasons,
    media_stream_count,publish_time

Times are RFC 3339 UTC (`answer_time` empty for an unanswered call), `duration_s` seconds,
enums in lower case without their prefix (`inbound`, `caller_hang_up`, `poor`), and
`quality_reasons` the metrics that decided the class as `metric@stream` joined by `;`
(`packet_loss_rate@0;jitter@1`).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
from pathlib import Path
from typing import Any

from opconnect.records.v1 import records_pb2 as pb
from opconnect.type.v1 import call_direction_pb2 as direction_pb
from opconnect_client import Client, ClientError, FileCheckpoint, timestamp
from operator_client.locks import held
from operator_client.output import Output, as_dict, seconds

CSV_COLUMNS = (
    "call_id",
    "tenant_id",
    "direction",
    "caller",
    "callee",
    "trunk_fqdn",
    "invite_time",
    "answer_time",
    "end_time",
    "duration_s",
    "final_sip_code",
    "final_sip_phrase",
    "end_reason",
    "quality_class",
    "quality_reasons",
    "media_stream_count",
    "publish_time",
)
GROUP_BY = {
    "none": pb.QUALITY_GROUP_BY_UNSPECIFIED,
    "tenant": pb.QUALITY_GROUP_BY_TENANT,
    "trunk": pb.QUALITY_GROUP_BY_TRUNK,
}


def _name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def _rfc3339(stamp: Any) -> str:
    return str(stamp.ToJsonString()) if (stamp.seconds or stamp.nanos) else ""


def csv_row(record: pb.CallRecord) -> list[str]:
    reasons = ";".join(
        f"{_name(pb.QualityMetric, r.metric, 'QUALITY_METRIC_')}@{r.media_stream_index}"
        for r in record.quality_reasons
    )
    return [
        record.call_id,
        record.tenant_id,
        _name(direction_pb.CallDirection, record.direction, "CALL_DIRECTION_"),
        record.caller,
        record.callee,
        record.trunk_fqdn,
        _rfc3339(record.invite_time),
        _rfc3339(record.answer_time) if record.HasField("answer_time") else "",
        _rfc3339(record.end_time),
        seconds(record.duration),
        str(record.final_sip_code),
        record.final_sip_phrase,
        _name(pb.CallEndReason, record.end_reason, "CALL_END_REASON_"),
        _name(pb.QualityClass, record.quality_class, "QUALITY_CLASS_"),
        reasons,
        str(len(record.media_streams)),
        _rfc3339(record.publish_time),
    ]


def _csv_text(rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


class FollowCheckpoint:
    """The library's checkpoint store for `follow`: the cursor and the output file's length
    after the last batch written and flushed, saved together in one file replaced atomically."""

    def __init__(self, path: Path, out: Path) -> None:
        self.file = FileCheckpoint(path)
        self.path = path
        self.out = out
        self.cursor = ""
        self.length = -1  # -1: no checkpoint yet
        text = self.file.load()
        if text:
            try:
                saved = json.loads(text)
                self.cursor, self.length = str(saved["cursor"]), int(saved["length"])
                named = str(saved["out"])
            except (ValueError, KeyError, TypeError):
                raise ClientError(f"{path}: not a checkpoint of `records follow`") from None
            if named != str(out.resolve()):
                raise ClientError(f"{path} is the checkpoint of {named}, not of {out}")

    def load(self) -> str:
        return self.cursor

    def save(self, cursor: str) -> None:
        """Save `cursor` with the file's length now (everything before it flushed to disk)."""
        state = {"cursor": cursor, "length": self.length, "out": str(self.out.resolve())}
        self.file.save(json.dumps(state, separators=(",", ":")))
        self.cursor = cursor


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view) :]


async def follow(
    client: Client,
    *,
    out_path: Path,
    checkpoint_path: Path,
    start: dt.datetime | None,
    follow: bool,
    tenant: str,
    number: str,
    poor_only: bool,
    out: Output,
) -> int:
    """Append the operator's records to `out_path` from the checkpoint (or from `start`, or
    from now), exactly once across kills; for ever with `follow`, else until caught up."""
    suffix = out_path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ClientError(f"--out {out_path}: name a .jsonl or a .csv file")
    lock = checkpoint_path.with_name(checkpoint_path.name + ".lock")
    with held(lock, f"records follow with the checkpoint {checkpoint_path}"):
        checkpoint = FollowCheckpoint(checkpoint_path, out_path)
        try:
            descriptor = os.open(out_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            raise ClientError(f"cannot open {out_path}: {error.strerror}") from None
        try:
            return await _follow(
                client,
                descriptor,
                suffix,
                checkpoint,
                start=start,
                follow=follow,
                tenant=tenant,
                number=number,
                poor_only=poor_only,
                out=out,
            )
        finally:
            os.close(descriptor)


async def _follow(
    client: Client,
    descriptor: int,
    suffix: str,
    checkpoint: FollowCheckpoint,
    *,
    start: dt.datetime | None,
    follow: bool,
    tenant: str,
    number: str,
    poor_only: bool,
    out: Output,
) -> int:
    size = os.fstat(descriptor).st_size
    if checkpoint.length >= 0:
        if size < checkpoint.length:
            raise ClientError(
                f"{checkpoint.out} holds {size:,} bytes but its checkpoint {checkpoint.path}"
                f" says {checkpoint.length:,}: something else changed the file; move one of"
                " them away to start again"
            )
        if size > checkpoint.length:
            out.note(
                f"{checkpoint.out}: dropping {size - checkpoint.length:,} bytes written after"
                " the last checkpoint (they are fetched again)"
            )
            os.ftruncate(descriptor, checkpoint.length)
            os.fsync(descriptor)
    else:
        if suffix == ".csv" and size == 0:
            _write_all(descriptor, _csv_text([list(CSV_COLUMNS)]).encode())
            size = len(_csv_text([list(CSV_COLUMNS)]).encode())
        os.fsync(descriptor)
        checkpoint.length = size
        checkpoint.save("")  # the file's length to come back to, before any record
    os.lseek(descriptor, checkpoint.length, os.SEEK_SET)
    written = 0
    unsaved = ""  # the cursor of a batch written and flushed, not yet in the checkpoint
    batches = client.follow_records(
        checkpoint=checkpoint,
        start_time=start,
        follow=follow,
        tenant_id=tenant,
        phone_number=number,
        poor_quality_only=poor_only,
    )
    try:
        async for batch in batches:
            if batch.gap:
                out.note("some records were purged (past retention) before they could be read")
            if suffix == ".csv":
                text = _csv_text([csv_row(r) for r in batch.items])
            else:
                text = "".join(
                    json.dumps(as_dict(r), separators=(",", ":")) + "\n" for r in batch.items
                )
            data = text.encode()
            _write_all(descriptor, data)
            os.fsync(descriptor)
            checkpoint.length += len(data)
            written += len(batch.items)
            unsaved = batch.cursor
    finally:
        await batches.aclose()
        if unsaved and unsaved != checkpoint.cursor:  # flushed: a clean stop keeps it
            checkpoint.save(unsaved)
        if out.json:
            out.data({"out": str(checkpoint.out), "records": written, "bytes": checkpoint.length})
        else:
            out.note(f"{checkpoint.out}: {written:,} records appended")
    return 0


def _record_fields(record: pb.CallRecord) -> list[tuple[str, str]]:
    return list(zip(CSV_COLUMNS, csv_row(record), strict=True))


async def get(client: Client, call_id: str, out: Output) -> int:
    record = await client.get_call_record(call_id)
    if out.json:
        out.data(as_dict(record))
    else:
        out.table(record.call_id, ["", ""], _record_fields(record)[1:])
    return 0


def _ms(value: Any) -> str:
    return f"{value.ToNanoseconds() / 1e6:g}"


async def summary(
    client: Client,
    *,
    start: dt.datetime,
    end: dt.datetime,
    group_by: str,
    tenant: str,
    out: Output,
) -> int:
    """The quality of the calls set up in a period, per group."""
    request = pb.GetQualitySummaryRequest(
        start_time=timestamp(start),
        end_time=timestamp(end),
        group_by=GROUP_BY[group_by],
        tenant_id=tenant,
        page_size=1_000,
    )
    groups: list[pb.QualityGroup] = []
    while True:
        page = await client.get_quality_summary(request)
        groups += page.groups
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    if out.json:
        out.data(
            {
                "start_time": start.isoformat(),
                "end_time": end.isoformat(),
                "group_by": group_by,
                "groups": [as_dict(g) for g in groups],
            }
        )
        return 0
    if not groups:
        out.line(f"no calls set up from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC")
        return 0
    columns = ["group", "calls", "good", "poor", "unclassified", "poor rate"]
    columns += ["jitter p50/p90 ms", "loss p50/p90", "round trip p50/p90 ms"]
    rows = []
    for g in groups:
        rows.append(
            [
                g.key or "(all)",
                f"{g.call_count:,}",
                f"{g.good_call_count:,}",
                f"{g.poor_call_count:,}",
                f"{g.unclassified_call_count:,}",
                f"{g.poor_call_rate:.1%}",
                f"{_ms(g.jitter.p50)}/{_ms(g.jitter.p90)}" if g.HasField("jitter") else "",
                f"{g.packet_loss_rate.p50:.2%}/{g.packet_loss_rate.p90:.2%}"
                if g.HasField("packet_loss_rate")
                else "",
                f"{_ms(g.round_trip.p50)}/{_ms(g.round_trip.p90)}"
                if g.HasField("round_trip")
                else "",
            ]
        )
    out.table(
        f"Call quality {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC",
        columns,
        rows,
        right=columns[1:],
    )
    return 0
