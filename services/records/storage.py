"""The call records tables and the units of work on them.

`call_records` is the record log itself: one row per published record, keyed by its position in
the `records` change log, holding the columns streams and summaries select on and the record's
serialized bytes (`body`), made once at publish and sent as they are. `call_media_streams` holds
the quality metrics of each audio stream, with the call's grouping columns copied in, so that
summaries are one scan of one table each. Each function takes a `Session` inside a transaction
(run it with `Database.run`).
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    CursorResult,
    DateTime,
    Double,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    case,
    delete,
    func,
    or_,
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from plumbing.changelog import allocate, mark_purged, notify_commit, read_head
from plumbing.db import (
    Base,
    Unit,
    driver_fetch,
    driver_fetch_rows,
    driver_insert_many,
    driver_time,
    insert_sql,
    rows_sql,
    stored_time,
    time_form,
    utc,
)
from plumbing.partitions import RECORDS as PARTITIONS
from plumbing.partitions import period_start
from plumbing.validation import Outcome, Refusal
from services.records.quality import Quality
from services.records.rules import (
    LOG,
    CallFact,
    Candidate,
    GroupBy,
    MediaType,
    Percentiles,
    QualityGroup,
    Result,
    StreamFilter,
    SummaryQuery,
)

CHUNK = 500  # call ids per IN (...) list: inside SQLite's variable limit
PURGE_CHUNK = 5_000  # records deleted per transaction
# SQLite makes an INTEGER PRIMARY KEY the table's rowid: streams read the log in key order.
POSITION = BigInteger().with_variant(Integer, "sqlite")


class CallRecordRow(Base):
    """A published call record, at its position in the `records` log. Immutable."""

    __tablename__ = "call_records"

    position: Mapped[int] = mapped_column(POSITION, primary_key=True, autoincrement=False)
    # Unique, though no constraint says so: PostgreSQL's partitioned table can only enforce
    # uniqueness with the partition key (publish_time) included. `publish` keeps it: see there.
    call_id: Mapped[str] = mapped_column(String(64))
    operator_id: Mapped[str] = mapped_column(String(63))
    tenant_id: Mapped[str] = mapped_column(String(36))
    direction: Mapped[str] = mapped_column(String(8))
    caller: Mapped[str] = mapped_column(String(512))
    callee: Mapped[str] = mapped_column(String(512))
    trunk_fqdn: Mapped[str] = mapped_column(String(253))
    invite_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    answer_time: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    end_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[int] = mapped_column(BigInteger)
    final_sip_code: Mapped[int] = mapped_column(Integer)
    quality: Mapped[str] = mapped_column(String(16))
    # The partition key on PostgreSQL (plumbing/partitions.py), so part of the primary key
    # there; SQLite keeps `position` alone as its key (the rowid: log order on disk).
    publish_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    # SHA-256 of the operator id and the record as published: same call_id, same digest is a
    # duplicate; another digest is a conflict.
    digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    # The record as streams send it: an encoded opconnect.records.v1.StreamCallRecordsResponse
    # holding this record alone (a batch is such bytes joined, then the cursor).
    body: Mapped[bytes] = mapped_column(LargeBinary)

    __table_args__ = (
        Index("ix_call_records_operator_position", "operator_id", "position"),
        Index("ix_call_records_operator_invite", "operator_id", "invite_time"),
        Index("ix_call_records_publish_time", "publish_time"),
        Index("ix_call_records_call_id", "call_id"),
        {"postgresql_partition_by": "RANGE (publish_time)"},
    )


class MediaStreamRow(Base):
    """The quality metrics of one audio stream of a call, for summaries (time metrics in ms)."""

    __tablename__ = "call_media_streams"

    position: Mapped[int] = mapped_column(POSITION, primary_key=True, autoincrement=False)
    stream_index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    operator_id: Mapped[str] = mapped_column(String(63))
    tenant_id: Mapped[str] = mapped_column(String(36))
    trunk_fqdn: Mapped[str] = mapped_column(String(253))
    direction: Mapped[str] = mapped_column(String(8))
    invite_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    jitter_ms: Mapped[float | None] = mapped_column(Double)
    packet_loss_rate: Mapped[float | None] = mapped_column(Double)
    round_trip_ms: Mapped[float | None] = mapped_column(Double)
    # Its record's publish time: the partition key on PostgreSQL, so that a day's streams are
    # dropped with the day's records.
    publish_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), primary_key=True)

    __table_args__ = (
        Index("ix_call_media_streams_operator_invite", "operator_id", "invite_time"),
        {"postgresql_partition_by": "RANGE (publish_time)"},
    )


class CallRecordKeyRow(Base):
    """The key of each published record, on PostgreSQL: one narrow table, not partitioned, so
    that the database enforces `call_id`'s uniqueness again (a partitioned `call_records`
    cannot without its partition key) and publish's duplicate look-up is one index probe per
    call id instead of one per daily partition. Claimed before the publish takes the log's
    lock (`publish_many`), committed with its record, and forgotten with it (`purge_records`,
    and the drop of a `call_records` partition by `plumbing.partitions`, in the same
    transaction, by `publish_time`). Empty on SQLite, where `call_records` is a plain table
    whose `call_id` index answers the look-up in one probe, under its one writer's lock."""

    __tablename__ = "call_record_keys"

    call_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    # In the same UTC day (the partition) as its record's publish_time: taken when the key is
    # claimed, before the log's lock, and moved to the publish time when the day turned between
    # (`publish_many`), so that dropping a day's partition drops exactly that day's keys.
    publish_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_call_record_keys_publish_time", "publish_time"),)


RECORDS = cast(Table, CallRecordRow.__table__)
STREAMS = cast(Table, MediaStreamRow.__table__)
KEYS = cast(Table, CallRecordKeyRow.__table__)


@dataclass(frozen=True)
class Stored:
    """What a publish committed: each candidate's result, and the operators whose logs grew."""

    results: list[Result]
    operators: set[str]


def _conflict(call_id: str) -> Result:
    return Result(
        call_id,
        Outcome.REFUSED,
        Refusal(
            "CALL_ID_CONFLICT",
            "record.call_id",
            "a record with this call_id and other content is stored; records are immutable",
        ),
    )


# The columns publish writes, in the order of its rows (on the driver: plumbing.db).
RECORD_COLUMNS = (
    "position",
    "call_id",
    "operator_id",
    "tenant_id",
    "direction",
    "caller",
    "callee",
    "trunk_fqdn",
    "invite_time",
    "answer_time",
    "end_time",
    "duration_ms",
    "final_sip_code",
    "quality",
    "digest",
    "publish_time",
    "body",
)
STREAM_COLUMNS = (
    "position",
    "stream_index",
    "operator_id",
    "tenant_id",
    "trunk_fqdn",
    "direction",
    "invite_time",
    "jitter_ms",
    "packet_loss_rate",
    "round_trip_ms",
    "publish_time",
)


def _select_digests(count: int) -> str:
    """(call_id, digest) of the stored records whose call_id is among `count` values."""
    return f"SELECT call_id, digest FROM call_records WHERE call_id IN ({','.join('?' * count)})"  # noqa: S608


@dataclass(frozen=True)
class Staged:
    """Candidates with their rows built, all but the position, the publish time and the stored
    body: the work of a publish done before it takes the log's lock (off the event loop, with
    the record's checks). `records[i]` is candidate i's call_records row from call_id through
    digest; `streams[i]` its call_media_streams rows from stream_index on. Times are in the
    driver's form for the database (`sqlite`: SQLite's, else PostgreSQL's)."""

    candidates: Sequence[Candidate]
    records: list[tuple[Any, ...]]
    streams: list[list[tuple[Any, ...]]]
    sqlite: bool


def stage(candidates: Sequence[Candidate], sqlite: bool) -> Staged:
    """Build the rows of checked candidates (see `Staged`)."""
    time_of = time_form(sqlite=sqlite)
    records: list[tuple[Any, ...]] = []
    streams: list[list[tuple[Any, ...]]] = []
    for candidate in candidates:
        published, record = candidate.published, candidate.published.record
        direction, invite, end = record.direction, record.invite_time, record.end_time
        if direction is None or invite is None or end is None:
            raise ValueError("publish() stores checked records only")
        tenant, trunk, operator = record.tenant_id.lower(), record.trunk_fqdn, published.operator_id
        invite_value = time_of(invite)
        records.append(
            (
                record.call_id,
                operator,
                tenant,
                direction.value,
                record.caller,
                record.callee,
                trunk,
                invite_value,
                time_of(record.answer_time),
                time_of(end),
                record.duration // _MS,
                record.final_sip_code,
                candidate.quality.value,
                published.digest,
            )
        )
        streams.append(
            [
                (
                    index,
                    operator,
                    tenant,
                    trunk,
                    direction.value,
                    invite_value,
                    stream.average_jitter_ms,
                    stream.packet_loss_rate,
                    stream.average_round_trip_ms,
                )
                for index, stream in enumerate(record.media_streams)
                if stream.media_type is MediaType.AUDIO
            ]
        )
    return Staged(candidates, records, streams, sqlite)


_MS = dt.timedelta(milliseconds=1)


def publish(
    session: Session,
    candidates: Sequence[Candidate] | Staged,
    publish_time_field: Callable[[dt.datetime], bytes],
    stored_form: Callable[[bytes, bytes], bytes],
) -> Stored:
    """Store one batch of candidates: `publish_many` of it alone."""
    (stored,) = publish_many(session, [candidates], publish_time_field, stored_form)
    return stored


def publish_many(
    session: Session,
    batches: Sequence[Sequence[Candidate] | Staged],
    publish_time_field: Callable[[dt.datetime], bytes],
    stored_form: Callable[[bytes, bytes], bytes],
) -> list[Stored]:
    """Store batches of candidates (one or many streams' batches: a group commit) in order, as
    if published one by one: a call_id already stored (or earlier in the batches) is a
    duplicate with the same digest, a conflict with another. Each batch's own `Stored`.

    The rows are built first (`stage`, best done before the transaction). Then the log's
    positions are allocated, once for every batch: that takes the log's lock, held to commit,
    so publishes of the log commit one at a time. Under the lock only what needs it: the
    publish time, each row's position and stored body, the inserts on the driver, and the
    commit straight after. `publish_time_field(time)` encodes the commit time, and
    `stored_form(body, time_field)` gives the bytes to store (convert.py: protobuf stays out of
    storage).

    INVARIANT: a call_id is stored once. On PostgreSQL `call_record_keys` enforces it (its
    primary key; the partitioned `call_records` cannot): the batches' call ids are claimed
    there BEFORE the lock (`_claim`: INSERT ... ON CONFLICT DO NOTHING, one index probe each,
    in call id order so that claimers never deadlock), and a call id another transaction holds
    waits for it to end, then reads as stored (a duplicate or a conflict) if it committed.
    Every writer that holds the log's lock has claimed all its keys already, so nothing under
    the lock waits for a key. On SQLite (one writer, from BEGIN IMMEDIATE) the look-up on
    `call_records`' call_id index is made under the lock (tests/test_partitions.py and
    tests/test_publish_pipeline.py prove both with concurrent writers).
    """
    sqlite = session.get_bind().dialect.name == "sqlite"
    staged = [b if isinstance(b, Staged) else stage(b, sqlite) for b in batches]
    if any(s.sqlite != sqlite for s in staged):
        raise ValueError("rows staged for another database")
    count = sum(len(s.candidates) for s in staged)
    if not count:
        return [Stored([], set()) for _ in staged]
    claimed: list[str] = []
    if sqlite:
        first = allocate(session, LOG, count)
        stored = _stored_digests(session, [row[0] for s in staged for row in s.records])
        now = dt.datetime.now(dt.UTC)
    else:
        claimed_at = dt.datetime.now(dt.UTC)
        stored, claimed = _claim(session, staged, claimed_at)
        first = allocate(session, LOG, count)
        now = dt.datetime.now(dt.UTC)
        if claimed and _day(now) != _day(claimed_at):  # the day turned while it waited
            driver_fetch(session, _MOVE_KEYS, [now, claimed])
    stamp, stamped = publish_time_field(now), time_form(sqlite=sqlite)(now)
    rows: list[tuple[Any, ...]] = []
    stream_rows: list[tuple[Any, ...]] = []
    every_operator: set[str] = set()
    out: list[Stored] = []
    position = first - 1
    for batch in staged:
        results: list[Result] = []
        operators: set[str] = set()
        for candidate, row, streams in zip(
            batch.candidates, batch.records, batch.streams, strict=True
        ):
            position += 1  # a duplicate's position stays unused, as when batches were alone
            call_id, digest = row[0], row[13]
            seen = stored.get(call_id)
            if seen is not None:
                results.append(
                    Result(call_id, Outcome.DUPLICATE) if seen == digest else _conflict(call_id)
                )
                continue
            stored[call_id] = digest
            rows.append((position, *row, stamped, stored_form(candidate.body, stamp)))
            stream_rows += [(position, *stream, stamped) for stream in streams]
            operators.add(row[1])
            results.append(Result(call_id, Outcome.ACCEPTED))
        out.append(Stored(results, operators))
        every_operator |= operators
    if rows:
        driver_insert_many(session, RECORDS, RECORD_COLUMNS, rows)
        if stream_rows:
            driver_insert_many(session, STREAMS, STREAM_COLUMNS, stream_rows)
        notify_commit(session, LOG, first + count - 1, every_operator)
    return out


def _stored_digests(session: Session, ids: list[str]) -> dict[str, bytes]:
    """SQLite: the digests of the stored records among `ids`, by call id (its index)."""
    stored: dict[str, bytes] = {}
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        found = driver_fetch(session, _select_digests(len(chunk)), chunk)
        stored.update((call_id, bytes(digest)) for call_id, digest in found)
    return stored


# PostgreSQL: claim call ids (with their digests and the claim time), in call id order; the
# call ids claimed. A call id another transaction claimed waits for it, then is skipped if it
# committed.
_CLAIM = (
    "INSERT INTO call_record_keys (call_id, digest, publish_time)"
    " SELECT claim.call_id, claim.digest, CAST(? AS timestamptz)"
    " FROM unnest(CAST(? AS text[]), CAST(? AS bytea[])) AS claim(call_id, digest)"
    " ORDER BY claim.call_id ON CONFLICT (call_id) DO NOTHING RETURNING call_id"
)
# PostgreSQL: the stored keys among an array of call ids (a new snapshot: READ COMMITTED).
_KEYS_OF = "SELECT call_id, digest FROM call_record_keys WHERE call_id = ANY(CAST(? AS text[]))"
# PostgreSQL: claimed keys moved to their records' publish time (the day turned meanwhile).
_MOVE_KEYS = "UPDATE call_record_keys SET publish_time = ? WHERE call_id = ANY(CAST(? AS text[]))"


def _claim(
    session: Session, staged: Sequence[Staged], at: dt.datetime
) -> tuple[dict[str, bytes], list[str]]:
    """PostgreSQL: the batches' call ids claimed in `call_record_keys` (the first digest of
    each); returns the digests stored by others (a duplicate or a conflict, by call id) and the
    call ids claimed. Runs before the log's lock (see `publish_many`)."""
    digests: dict[str, bytes] = {}
    for batch in staged:
        for row in batch.records:
            digests.setdefault(row[0], row[13])
    stored: dict[str, bytes] = {}
    claimed: list[str] = []
    pending = list(digests)
    while pending:  # again only for a key forgotten between its conflict and its read
        got = {
            call_id
            for (call_id,) in driver_fetch(
                session, _CLAIM, [at, pending, [digests[c] for c in pending]]
            )
        }
        claimed += got
        others = [c for c in pending if c not in got]
        if others:
            found = driver_fetch(session, _KEYS_OF, [others])
            stored.update((call_id, bytes(digest)) for call_id, digest in found)
        pending = [c for c in others if c not in stored]
    return stored, claimed


def _day(at: dt.datetime) -> dt.datetime:
    """The partition (UTC day) of `call_records` a publish time falls in."""
    return period_start(at, PARTITIONS.period)


# The statements of publish written by hand (an IN list of one), as tests/test_sql.py checks them.
SQL = (
    insert_sql(RECORDS, RECORD_COLUMNS),
    insert_sql(STREAMS, STREAM_COLUMNS),
    _select_digests(1),
)
POSTGRES_SQL = (_CLAIM, _KEYS_OF, _MOVE_KEYS)  # PostgreSQL's own


# --- reads ---------------------------------------------------------------------------------------


class Chunk(NamedTuple):
    """Records of one stream, consecutive in its reads, as it sends them: their stored bodies
    joined in position order (each body is a whole `records` field of a response, see
    convert.stream_response), with what the stream's metrics and filters need of them."""

    position: int  # the last record's
    records: int  # how many it holds
    body: bytes
    # One record: its publish time as the driver gives it, `positions` empty. Several: their
    # positions and publish times, on SQLite joined by commas (text), on PostgreSQL as the
    # driver gives them (tuples); read only by metrics.
    times: Any
    positions: str | tuple[int, ...] = ""
    fields: tuple[Any, ...] = ()  # the shared tail's: tenant, caller, callee, quality
    operator: str = ""  # the shared tail's: the operator whose record it is


def read_records(
    session: Session,
    after: int,
    upto: int,
    limit: int,
    *,
    selection: StreamFilter,
    size: int = 0,
) -> list[Chunk]:
    """The operator's records with after < position <= upto that the filter selects, at most
    `limit`, in position order, as chunks of `size` records (0: `limit`). The hot path of every
    stream that catches up, on the (operator_id, position) index. On SQLite each chunk is read
    as one row, the records' columns joined by group_concat over the page (in the order the page
    gives them: a subquery with a LIMIT is not flattened into the aggregate): pysqlite lets go
    of the GIL for every column of every row it fetches and takes it back, so a page of 500 rows
    cost 2,000 hand-overs of the GIL with the event loop sending the page before, and a Python
    tuple a row, more than reading the page. On PostgreSQL (psycopg keeps the GIL while it
    makes rows) the page is read row by row, its bodies joined here: joining in the server
    (string_agg, and the times as text) cost it more than it saved."""
    page = [
        "SELECT position, body, publish_time FROM call_records",
        "WHERE operator_id = ? AND position > ? AND position <= ?",
    ]
    params: list[Any] = [selection.operator_id, after, upto]
    if selection.tenant_id is not None:
        page.append("AND tenant_id = ?")
        params.append(selection.tenant_id)
    if selection.phone_number is not None:
        page.append("AND (caller = ? OR callee = ?)")
        params += [selection.phone_number, selection.phone_number]
    if selection.poor_only:
        page.append("AND quality = ?")
        params.append(Quality.POOR.value)
    if selection.end_time is not None:
        page.append("AND publish_time < ?")
        params.append(driver_time(session)(selection.end_time))
    page.append("ORDER BY position LIMIT ?")
    size = size or limit
    if session.get_bind().dialect.name != "sqlite":
        # Both drivers hand back int and bytes for these columns.
        rows = driver_fetch(session, " ".join(page), [*params, limit])
        return [_joined(rows[start : start + size]) for start in range(0, len(rows), size)]
    joined = _JOINED.format(" ".join(page))
    chunks: list[Chunk] = []
    left = limit
    while left > 0:
        asked = min(size, left)
        ((count, last, body, positions, times),) = driver_fetch(session, joined, [*params, asked])
        if not count:
            break
        chunks.append(Chunk(int(last), int(count), bytes(body), times, positions))
        if count < asked:
            break
        left -= count
        params[1] = last
    return chunks


# SQLite: a page of `read_records` as one row (its count, last position, bodies, positions and
# publish times).
_JOINED = (
    "SELECT count(*), max(position), CAST(group_concat(body, x'') AS BLOB),"
    " group_concat(position), group_concat(publish_time) FROM ({}) AS page"
)


def _joined(rows: Sequence[tuple[Any, ...]]) -> Chunk:
    """A chunk of `read_records` rows (position, body, publish time)."""
    positions, bodies, times = zip(*rows, strict=True)
    if len(rows) == 1:
        return Chunk(int(positions[0]), 1, bytes(bodies[0]), times[0])
    return Chunk(int(positions[-1]), len(rows), b"".join(bodies), times, positions)


# The shared tail's read: its columns (then the body) and the rows it reads.
_TAIL_COLUMNS = (
    "position",
    "operator_id",
    "publish_time",
    "tenant_id",
    "caller",
    "callee",
    "quality",
)
_TAIL_ROWS = "FROM call_records WHERE position > ? AND position <= ? ORDER BY position LIMIT ?"
# The statements of the shared tail's read written by hand, as tests/test_sql.py checks them.
TAIL_SQL = (rows_sql(_TAIL_COLUMNS, _TAIL_ROWS, "body"),)


def read_tail_records(session: Session | Unit, after: int, upto: int, limit: int) -> list[Chunk]:
    """Every operator's records with after < position <= upto, in position order, a chunk each
    with its operator and what stream filters select on (tenant, caller, callee, quality): what
    the shared tail of live streams holds (plumbing.changelog.Tail, one read of the log for every
    operator followed), each stream keeping its operator's with `tail_filter`."""
    rows = driver_fetch_rows(session, _TAIL_COLUMNS, _TAIL_ROWS, (after, upto, limit), blob="body")
    return [
        Chunk(int(position), 1, bytes(body), time, "", (tenant, caller, callee, quality), operator)
        for position, operator, time, tenant, caller, callee, quality, body in rows
    ]


def chunk_operator(chunk: Chunk) -> str:
    """The operator of a `read_tail_records` chunk (its key in the shared tail)."""
    return chunk.operator


def tail_filter(selection: StreamFilter) -> Callable[[Chunk], bool] | None:
    """Whether a `read_tail_records` chunk is a record `read_records` with `selection` gives
    (None: every record of the operator is)."""
    tenant, number, poor = selection.tenant_id, selection.phone_number, selection.poor_only
    end = selection.end_time.timestamp() if selection.end_time is not None else None
    if tenant is None and number is None and not poor and end is None:
        return None
    wanted_quality = Quality.POOR.value

    def keep(chunk: Chunk) -> bool:
        fields = chunk.fields
        return (
            (tenant is None or fields[0] == tenant)
            and (number is None or fields[1] == number or fields[2] == number)
            and (not poor or fields[3] == wanted_quality)
            and (end is None or _epoch(chunk.times) < end)
        )

    return keep


def chunk_records(chunk: Chunk) -> int:
    return chunk.records


def first_commit_time(chunk: Chunk) -> float:
    """The publish (commit) time of a chunk's first record, epoch seconds."""
    times = chunk.times
    if chunk.records == 1:
        return _epoch(times)
    if isinstance(times, str):
        return _epoch(times[: times.find(",")])
    return _epoch(times[0])


def last_commit_time(chunk: Chunk) -> float:
    """The publish (commit) time of a chunk's last record, epoch seconds."""
    times = chunk.times
    if chunk.records == 1:
        return _epoch(times)
    if isinstance(times, str):
        return _epoch(times[times.rfind(",") + 1 :])
    return _epoch(times[-1])


def commit_times(chunk: Chunk) -> list[tuple[int, float]]:
    """(position, publish time) of each record of a chunk."""
    if chunk.records == 1:
        return [(chunk.position, _epoch(chunk.times))]
    positions, times = chunk.positions, chunk.times
    if isinstance(positions, str):
        positions, times = tuple(map(int, positions.split(","))), times.split(",")
    return [(int(p), _epoch(t)) for p, t in zip(positions, times, strict=True)]


@functools.lru_cache(maxsize=64)  # one publish time per published batch: read once
def _epoch(value: str | dt.datetime) -> float:
    """A publish time as the driver gives it (SQLite: UTC text; PostgreSQL: a datetime)."""
    if isinstance(value, str):
        return dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC).timestamp()
    return utc(value).timestamp()


# The call feed's read: its columns, of the rows the shared tail reads.
_FACT_COLUMNS = (
    "position",
    "operator_id",
    "call_id",
    "tenant_id",
    "direction",
    "invite_time",
    "answer_time",
    "duration_ms",
    "publish_time",
)
FACTS_SQL = (rows_sql(_FACT_COLUMNS, _TAIL_ROWS),)  # as tests/test_sql.py checks it


def read_facts(session: Session | Unit, after: int, upto: int, limit: int) -> list[CallFact]:
    """Every operator's calls with after < position <= upto, in position order (on SQLite one
    row joined by SQLite: `driver_fetch_rows`)."""
    rows = driver_fetch_rows(session, _FACT_COLUMNS, _TAIL_ROWS, (after, upto, limit))
    return [
        CallFact(
            position=int(position),
            operator_id=operator,
            call_id=call_id,
            tenant_id=tenant,
            direction=direction,
            invite_time=stored_time(invite),
            answer_time=stored_time(answer) if answer is not None else None,
            duration_ms=int(duration_ms),
            publish_time=stored_time(published),
        )
        for (
            position,
            operator,
            call_id,
            tenant,
            direction,
            invite,
            answer,
            duration_ms,
            published,
        ) in rows
    ]


def position_at(session: Session, start_time: dt.datetime) -> int:
    """Where a stream from `start_time` starts: just before the first record, in log order,
    published at or after it (the oldest kept one if that is purged), or the head if none is.

    Publish times are taken under the log's lock, so they rise with positions (up to the clock
    skew between replicas): the first by time is the first by position.
    """
    head = read_head(session, LOG)
    first = session.scalar(
        select(RECORDS.c.position)
        .where(RECORDS.c.publish_time >= start_time, RECORDS.c.position <= head.position)
        .order_by(RECORDS.c.publish_time, RECORDS.c.position)
        .limit(1)
    )
    if first is None:
        return head.position
    return max(int(first) - 1, head.purged_through)


def find_record(session: Session, operator_id: str, call_id: str) -> bytes | None:
    body = session.scalar(
        select(RECORDS.c.body).where(
            RECORDS.c.call_id == call_id, RECORDS.c.operator_id == operator_id
        )
    )
    return bytes(body) if body is not None else None


# --- quality summary ---------------------------------------------------------------------------

PERCENTS = (50, 90, 99)
METRICS = ("jitter_ms", "packet_loss_rate", "round_trip_ms")


def _group_key(table: Table, group_by: GroupBy) -> ColumnElement[str] | None:
    if group_by is GroupBy.TENANT:
        return cast(ColumnElement[str], table.c.tenant_id)
    if group_by is GroupBy.TRUNK:
        return cast(ColumnElement[str], table.c.trunk_fqdn)
    return None


def _conditions(table: Table, query: SummaryQuery) -> list[ColumnElement[bool]]:
    c = table.c
    conditions = [
        c.operator_id == query.operator_id,
        c.invite_time >= query.start,
        c.invite_time < query.end,
    ]
    if query.tenant_id is not None:
        conditions.append(c.tenant_id == query.tenant_id)
    if query.trunk_fqdn is not None:
        conditions.append(c.trunk_fqdn == query.trunk_fqdn)
    if query.direction is not None:
        conditions.append(c.direction == query.direction.value)
    return conditions


def quality_summary(
    session: Session, query: SummaryQuery, after_key: str | None, limit: int
) -> list[QualityGroup]:
    """One page of groups, ordered by key, after `after_key`. Counts come from one GROUP BY;
    percentiles (nearest rank: the value at rank ceil(p/100 * n)) from window functions over
    the audio streams of the page's groups, one query per metric. Nothing is summed in Python."""
    c = RECORDS.c
    key = _group_key(RECORDS, query.group_by)
    conditions = _conditions(RECORDS, query)
    if key is not None and after_key is not None:
        conditions.append(key > after_key)

    def count(quality: Quality) -> Any:
        return func.sum(case((c.quality == quality.value, 1), else_=0))

    aggregates = (
        func.count(),
        count(Quality.GOOD),
        count(Quality.POOR),
        count(Quality.UNCLASSIFIED),
    )
    if key is None:
        if after_key is not None:
            return []
        rows = [("", *row) for row in session.execute(select(*aggregates).where(*conditions))]
    else:
        statement = (
            select(key, *aggregates).where(*conditions).group_by(key).order_by(key).limit(limit)
        )
        rows = [tuple(row) for row in session.execute(statement)]
    rows = [row for row in rows if row[1]]
    if not rows:
        return []
    keys = [str(row[0]) for row in rows]
    percentiles = {metric: _percentiles(session, query, metric, keys) for metric in METRICS}
    return [
        QualityGroup(
            key=str(k),
            call_count=int(total),
            good=int(good or 0),
            poor=int(poor or 0),
            unclassified=int(unclassified or 0),
            jitter_ms=percentiles["jitter_ms"].get(str(k)),
            packet_loss_rate=percentiles["packet_loss_rate"].get(str(k)),
            round_trip_ms=percentiles["round_trip_ms"].get(str(k)),
        )
        for k, total, good, poor, unclassified in rows
    ]


def _percentiles(
    session: Session, query: SummaryQuery, metric: str, keys: list[str]
) -> dict[str, Percentiles]:
    value = STREAMS.c[metric]
    key = _group_key(STREAMS, query.group_by)
    conditions = [*_conditions(STREAMS, query), value.is_not(None)]
    if key is not None:
        conditions.append(key.in_(keys))
    ranked = (
        select(
            (key if key is not None else STREAMS.c.operator_id).label("key"),
            value.label("value"),
            func.row_number().over(partition_by=key, order_by=value).label("rank"),
            func.count().over(partition_by=key).label("n"),
        )
        .where(*conditions)
        .subquery()
    )
    wanted = [ranked.c.rank == (ranked.c.n * p + 99) // 100 for p in PERCENTS]
    found: dict[str, dict[int, float]] = {}
    counts: dict[str, int] = {}
    statement = select(ranked.c.key, ranked.c.value, ranked.c.rank, ranked.c.n).where(or_(*wanted))
    for row in session.execute(statement):
        group = str(row.key) if key is not None else ""
        counts[group] = int(row.n)
        for p in PERCENTS:
            if int(row.rank) == (int(row.n) * p + 99) // 100:
                found.setdefault(group, {})[p] = float(row.value)
    return {
        group: Percentiles(values[50], values[90], values[99], counts[group])
        for group, values in found.items()
    }


# --- retention ---------------------------------------------------------------------------------


class Purged(NamedTuple):
    """Rows one purge transaction deleted, by table."""

    records: int
    media_streams: int


def purge_records(session: Session, older_than: dt.datetime, limit: int = PURGE_CHUNK) -> Purged:
    """Delete the oldest records, in log order, published before `older_than` (on PostgreSQL
    their keys with them): at most `limit` in one transaction (call it until it returns fewer
    records), so writers never wait long. Cursors before them then answer CURSOR_EXPIRED.
    Returns how many rows were deleted."""
    oldest = session.execute(
        select(RECORDS.c.position, RECORDS.c.publish_time).order_by(RECORDS.c.position).limit(limit)
    ).all()
    through = None
    count = 0
    for position, published in oldest:
        if utc(published) >= older_than:
            break
        through, count = int(position), count + 1
    if through is None:
        return Purged(0, 0)
    if session.get_bind().dialect.name == "postgresql":  # their keys first (SQLite has none)
        purged = select(RECORDS.c.call_id).where(RECORDS.c.position <= through)
        session.execute(delete(KEYS).where(KEYS.c.call_id.in_(purged)))
    streams = cast(
        CursorResult[Any], session.execute(delete(STREAMS).where(STREAMS.c.position <= through))
    )
    deleted = cast(
        CursorResult[Any], session.execute(delete(RECORDS).where(RECORDS.c.position <= through))
    )
    mark_purged(session, LOG, through)
    return Purged(deleted.rowcount if deleted.rowcount >= 0 else count, max(streams.rowcount, 0))
