"""Records benchmark: StreamCallRecords throughput and memory, PublishCallRecords throughput.

Run from the repository root:

    .venv/bin/python bench/records_bench.py [--records N] [--json] [--profile]

Every figure is set against a raw baseline measured in the same run, because the machines this
runs on are small and noisy:

1. Records/s streamed by StreamCallRecords (`--records`, 1,000,000 by default, of one operator,
   from `start_time` = the epoch, follow=false) through the one-process system (gateway
   interceptor, mutual TLS, SQLite reads in the follow loop, stored bytes joined into responses)
   versus a bare grpc.aio server with the same mutual-TLS credentials streaming already encoded
   responses of the same stored record bytes from memory. Both are read by the same client
   code, which parses every response. Reported as `stream_ratio` = best system records/s / best
   bare records/s at 500 records per response (target >= 0.5, issue 12); 1,000 per response is
   tried too.
   Beside them, in the same rounds, the split system: a records-service process (role
   "records") behind a gateway process (role "gateway") that forwards the stream to it message
   by message as raw bytes, on the same database file and PKI; its whole stream is checked byte
   for byte equal to the system's. Reported as `stream_split_ratio` = best split records/s /
   best system records/s at 500 per response (no target): below 1, what the forwarding hop
   costs; above 1, spreading the work over two processes gained more than the hop costs.
2. The streaming server's resident memory (VmRSS), sampled at every response the client gets:
   before the stream, at 10%, 50% and 100% of it, its peak and VmHWM; then a client that reads
   slowly for a few seconds. Reported as `stream_rss_growth_mb` = the most RSS grew from 10% to
   100% of a stream in any system round (target: flat, below a few MB).
3. Records/s committed by PublishCallRecords (batches of 1,000 realistic records, a few batches
   in flight) versus raw `sqlite3` executemany inserts of the very rows the system wrote into a
   fresh copy of the schema, one durable transaction per batch. Reported as `publish_ratio`.

The million stored records are written straight into SQLite before the system starts, since
publishing them would take minutes: a few thousand realistic records go through the service's
own `convert.prepare` and `storage.publish`, and the rest are copies of those rows with new call
ids, positions and publish times, made exactly as `storage.publish` makes them (the copies of
the first rows are checked byte for byte against what `storage.publish` wrote).

Servers and clients run in their own processes (this script started again with `--role ...`),
so client and server each get a core (the split system's two server processes and the client
share the machine's cores: on 2 cores it is CPU-bound). Everything (PKI, SQLite databases)
lives in a temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import runner
from google.protobuf.timestamp_pb2 import Timestamp
from report import machine, print_figures, print_header, share, shares, verdict
from rows import (
    RAW_METHODS,
    Row,
    as_time,
    bulk_load,
    chunks,
    connect,
    database_mb,
    durable_inserts,
    fetch,
    open_database,
    prefix_range,
    scalar,
    table_columns,
    time_value,
)
from runner import (
    OPERATOR,
    PLATFORM,
    SERVER_OPTIONS,
    TENANT,
    Child,
    Context,
    CpuWindow,
    ServerProcess,
    Spec,
    credentials,
    in_turn,
)

from gateway.identity import GATEWAY_NAME
from opconnect.records.v1 import records_pb2 as pb
from opconnect.records.v1 import records_pb2_grpc as pb_grpc
from plumbing import tokens, wire
from plumbing.changelog import decode_cursor, encode_cursor
from plumbing.config import Settings
from plumbing.validation import Outcome
from services.records import convert, rules, storage
from simulator import calls

TRUNKS = ("sbc1.contoso-telecom.example", "sbc2.contoso-telecom.example")
STREAM_METHOD = "/opconnect.records.v1.CallRecordService/StreamCallRecords"
LOG = rules.LOG

# Issue 12's targets: the stream at least half the bare stream, publishing at least 0.4 of a raw
# insert of the same rows (executemany) on the same backend.
STREAM_TARGET = 0.5
PUBLISH_TARGET = 0.4
FLAT_TOLERANCE_MB = 8.0  # RSS growth from 10% to 100% of a stream still called flat
TEMPLATES = 5_000  # realistic records that go through the service's own code
BARE_SAMPLE = 50_000  # stored records the bare server holds in memory (and cycles through)
FILL_CHUNK = 20_000  # copied records per executemany while filling
PUBLISH_BATCH = rules.MAX_BATCH
INTO_FILLED_RUN = 90  # run id of the informative publish into the filled database
PROFILE_RUN = 91  # run id of the profiled publish
# The stream servers, in table order: `metrics` and `tracing` are the system with its
# Prometheus metrics on, and with every call traced to an OTLP sink (runner.OBSERVED), measured
# at 500 records per response.
KINDS = ("bare", "system", "split", "metrics", "tracing")
OBSERVED_TARGET = 0.95  # metrics on may cost at most 5% of stream throughput
SOURCE = "simulator/calls.py"  # where the realistic records come from
CHECK_RESPONSES = 0  # responses of the split's and the system's streams compared (0: all)
# The stream baseline and the raw inserts, by backend (the report names them).
STREAM_BASELINES = {
    "sqlite": "stored responses sent from memory",
    "postgresql": "keyset reads of the stored bodies (psycopg, WHERE operator_id = %s AND"
    " position > %s ORDER BY position LIMIT n, the next page read while one is sent)",
}
RAW_TEXT = {
    "sqlite": "sqlite3 executemany",
    "postgresql": "psycopg executemany (and COPY: raw (copy))",
}


# --------------------------------------------------------------------------- helpers


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process in kB (Linux /proc); empty if unknown."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value = line.split(":", 1)
                    out[name] = int(value.split()[0])
    except OSError:
        pass
    return out


def rss_kb(pid: int) -> int:
    return memory_kb(pid).get("VmRSS", 0)


def realistic_records(count: int, seed: int, end: dt.datetime) -> list[pb.PublishedCallRecord]:
    """`count` realistic, valid records of OPERATOR (distinct call ids, simulator/calls.py) that
    ended in the ten minutes before `end`."""
    rng = random.Random(seed)
    numbers = calls.operator_numbers(random.Random(seed + 1), 200)
    mix = calls.CallMix(OPERATOR, TENANT, TRUNKS, calls.teams_users(numbers))
    return [
        calls.make_call(rng, mix, end - dt.timedelta(milliseconds=rng.randint(0, 600_000)))
        for _ in range(count)
    ]


# --------------------------------------------------------------------------- filling the database


@dataclass(frozen=True)
class Template:
    """A record stored by the service's own code, and what a copy of its rows under another call
    id, position and publish time needs (in `RowMaker` column order)."""

    call_id: str
    rest: tuple[Any, ...]  # the call_records columns a copy keeps as they are
    body_tail: bytes  # the stored body after its call_id field, without publish_time
    content_tail: bytes  # the digested content (the record as published) after its call_id
    stream_tails: list[tuple[Any, ...]]  # its call_media_streams rows without their position


@dataclass
class FillResult:
    records: int
    media_streams: int
    templates: int
    source: str
    real_path_s: float
    copies_s: float
    seconds: float
    database_mb: float
    checked: int


def _call_id_field(call_id: str) -> bytes:
    """`CallRecord.call_id` encoded (field 1: the first field of a serialized record)."""
    encoded = call_id.encode()
    if len(encoded) < 0x80:  # tag 0x0a, a one-byte length (call ids are 64 characters at most)
        return b"\n" + bytes((len(encoded),)) + encoded
    return wire.field(1, encoded)


class RowMaker:
    """Rows of copies of templates, made as storage.publish makes them: the columns a copy
    changes first (KEYS), then the others in table order."""

    KEYS = ("position", "call_id", "publish_time", "digest", "body")

    def __init__(self, columns: list[str], url: str) -> None:
        self.columns = [*self.KEYS, *(c for c in columns if c not in self.KEYS)]
        self.order = [columns.index(c) for c in self.columns]  # table order -> this order
        self.time_text: Callable[[dt.datetime], Any] = time_value(
            storage.RECORDS.c.publish_time, url
        )
        self.digest_head = OPERATOR.encode() + b"\0"

    def arrange(self, row: Sequence[Any]) -> tuple[Any, ...]:
        """A row read in table order, in this maker's column order."""
        return tuple(row[i] for i in self.order)

    def template(
        self, row: Sequence[Any], streams: list[tuple[Any, ...]], body: bytes, content: bytes
    ) -> Template:
        arranged = self.arrange(row)
        call_id: str = arranged[1]
        head = _call_id_field(call_id)
        if not (body.startswith(head) and content.startswith(head)):
            raise RuntimeError("a stored record does not start with its call_id")
        return Template(
            call_id, arranged[5:], body[len(head) :], content[len(head) :], [s[1:] for s in streams]
        )

    def stamp(self, moment: dt.datetime) -> tuple[Any, bytes]:
        """publish_time as stored in its column, and as the field appended to the body."""
        return self.time_text(moment), convert.publish_time_field(moment)

    def row(
        self, template: Template, call_id: str, position: int, stamp: tuple[Any, bytes]
    ) -> tuple[Any, ...]:
        head = _call_id_field(call_id)
        digest = hashlib.sha256(self.digest_head + head + template.content_tail).digest()
        body = convert.stored(head + template.body_tail, stamp[1])
        return (position, call_id, stamp[0], digest, body, *template.rest)


def copy_id(position: int, template_id: str) -> str:
    """A call id for the copy of a template at `position`: GUID-shaped like the template's,
    with the UUID version digit 0 so that it never equals a (version 4) template id."""
    if len(template_id) == 36 and template_id[14] == "4":
        return f"{position:08x}{template_id[8:14]}0{template_id[15:]}"
    return f"{position:08x}.{template_id}"[:64]


def fill(settings: Settings, records: int, seed: int) -> FillResult:
    """Migrate the database of `settings` (SQLite or PostgreSQL), register OPERATOR, and store
    `records` records of it: the first TEMPLATES through the service's own code, the rest
    copies (the same rows on either backend)."""
    started = time.perf_counter()
    url = settings.sqlalchemy_url
    messages = realistic_records(
        min(TEMPLATES, records), seed, dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2)
    )
    db = open_database(settings)
    try:
        prepared = convert.prepare(messages, {OPERATOR}, settings, rules.thresholds(settings))
        candidates = [p for p in prepared if isinstance(p, rules.Candidate)]
        if len(candidates) != len(messages):
            refused = Counter(
                p.refusal.reason for p in prepared if isinstance(p, rules.Result) and p.refusal
            )
            raise RuntimeError(f"realistic records refused: {dict(refused)}")
        for chunk in chunks(candidates, PUBLISH_BATCH):
            stored = db.transaction(
                storage.publish, chunk, convert.publish_time_field, convert.stored, write=True
            )
            if any(r.outcome is not Outcome.ACCEPTED for r in stored.results):
                raise RuntimeError("a template record was not accepted")
    finally:
        db.close()
    real_path_s = time.perf_counter() - started

    maker = RowMaker(table_columns(url, "call_records"), url)
    stored_rows = fetch(url, "SELECT * FROM call_records ORDER BY position")
    stream_columns = table_columns(url, "call_media_streams")
    stream_rows = fetch(url, "SELECT * FROM call_media_streams ORDER BY position, stream_index")
    if stream_columns[0] != "position":
        raise RuntimeError("call_media_streams does not start with position")
    by_position: dict[int, list[Row]] = {}
    for stream_row in stream_rows:
        by_position.setdefault(stream_row[0], []).append(stream_row)
    templates: list[Template] = []
    for row, candidate, message in zip(stored_rows, candidates, messages, strict=True):
        converted = convert.published_in(message)
        if not isinstance(converted, tuple):
            raise RuntimeError("a template record cannot be read")
        content = converted[1].SerializeToString(deterministic=True)
        template = maker.template(row, by_position.get(row[0], []), candidate.body, content)
        # Its copy under its own id, position and publish time must be its very rows.
        arranged = maker.arrange(row)
        moment = as_time(arranged[2])
        again = maker.row(template, template.call_id, arranged[0], maker.stamp(moment))
        streams_again = [(arranged[0], *t) for t in template.stream_tails]
        if again != arranged or streams_again != by_position.get(row[0], []):
            raise RuntimeError(f"a copied row differs from storage.publish's: {row[0]}")
        templates.append(template)

    copies_started = time.perf_counter()
    last = as_time(maker.arrange(stored_rows[-1])[2])
    streams_n = sum(len(t.stream_tails) for t in templates)
    position = len(templates)
    with bulk_load(url, ["call_records", "call_media_streams"]) as loader:
        while position < records:
            upto = min(records, position + FILL_CHUNK)
            record_rows: list[Row] = []
            copied_streams: list[Row] = []
            stamp = maker.stamp(last)
            for p in range(position + 1, upto + 1):
                if (p - 1) % PUBLISH_BATCH == 0:  # one publish time per batch, as publish does
                    last += dt.timedelta(milliseconds=1)
                    stamp = maker.stamp(last)
                template = templates[(p - 1) % len(templates)]
                record_rows.append(maker.row(template, copy_id(p, template.call_id), p, stamp))
                copied_streams.extend([(p, *tail) for tail in template.stream_tails])
            loader.rows("call_records", maker.columns, record_rows)
            loader.rows("call_media_streams", stream_columns, copied_streams)
            loader.execute("UPDATE change_log_heads SET position = ? WHERE log = ?", upto, LOG)
            loader.commit()
            streams_n += len(copied_streams)
            position = upto
    head = scalar(url, "SELECT position FROM change_log_heads WHERE log = ?", LOG)
    stored_n = scalar(url, "SELECT count(*) FROM call_records")
    if head != records or stored_n != records:
        raise RuntimeError(f"filled {stored_n} records, head {head}, wanted {records}")
    os.sync()  # no writeback of the fill left to slow down the measurements
    return FillResult(
        records=records,
        media_streams=streams_n,
        templates=len(templates),
        source=SOURCE,
        real_path_s=real_path_s,
        copies_s=time.perf_counter() - copies_started,
        seconds=time.perf_counter() - started,
        database_mb=database_mb(url),
        checked=len(templates),
    )


# --------------------------------------------------------------------------- server processes


def bare_responses(
    database: str, sample: int, batch_sizes: Sequence[int]
) -> dict[int, list[bytes]]:
    """Encoded StreamCallRecordsResponses of the first `sample` stored records, per batch size,
    made as the system makes them (stored bodies joined, the cursor of the last record)."""
    rows = fetch(
        database, "SELECT position, body FROM call_records ORDER BY position LIMIT ?", sample
    )
    out: dict[int, list[bytes]] = {}
    for size in batch_sizes:
        out[size] = [
            convert.stream_response([bytes(r[1]) for r in batch], encode_cursor(LOG, batch[-1][0]))
            for batch in chunks(rows, size)
            if len(batch) == size
        ]
    return out


class BareStream:
    """StreamCallRecords answered from memory: `records` records in responses of the asked
    size, cycling through the prebuilt ones: the raw gRPC + mutual TLS baseline (SQLite)."""

    def __init__(self, responses: dict[int, list[bytes]], records: int, settings: Settings) -> None:
        self._responses = responses
        self._records = records
        self._default = settings.stream_batch_size
        self._maximum = settings.max_stream_batch_size

    async def stream(
        self, request: pb.StreamCallRecordsRequest, context: Context
    ) -> AsyncIterator[bytes]:
        size = min(request.max_batch_size or self._default, self._maximum)
        prebuilt = self._responses[size]
        left = self._records
        index = 0
        while left >= size:
            yield prebuilt[index]
            index = (index + 1) % len(prebuilt)
            left -= size
        if left:
            whole = pb.StreamCallRecordsResponse.FromString(prebuilt[0])
            yield pb.StreamCallRecordsResponse(
                records=whole.records[:left], cursor=whole.cursor
            ).SerializeToString()


KEYSET_SQL = (
    "SELECT position, body FROM call_records WHERE operator_id = %s AND position > %s"
    " ORDER BY position LIMIT %s"
)


class KeysetStream:
    """StreamCallRecords answered by keyset reads of the stored records (PostgreSQL, psycopg,
    one connection on a thread of its own, the next page read while the current one is sent):
    each page's stored bodies joined with the cursor of its last record, as the system makes
    its responses. The raw baseline of reading the log and sending it over gRPC + mutual TLS,
    without the system's follow loop, gateway, or SQLAlchemy."""

    def __init__(self, database: str, settings: Settings) -> None:
        self._connection = connect(database)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="keyset")
        self._default = settings.stream_batch_size
        self._maximum = settings.max_stream_batch_size

    def _page(self, after: int, size: int) -> list[tuple[int, bytes]]:
        rows: list[tuple[int, bytes]] = self._connection.execute(
            KEYSET_SQL, (OPERATOR, after, size)
        ).fetchall()
        return rows

    async def stream(
        self, request: pb.StreamCallRecordsRequest, context: Context
    ) -> AsyncIterator[bytes]:
        size = min(request.max_batch_size or self._default, self._maximum)
        loop = asyncio.get_running_loop()
        page = loop.run_in_executor(self._reader, self._page, 0, size)
        while rows := await page:
            after = rows[-1][0]
            page = loop.run_in_executor(self._reader, self._page, after, size)  # one ahead
            yield convert.stream_response([r[1] for r in rows], encode_cursor(LOG, after))


async def serve_bare(spec: Spec) -> None:
    """The stream baseline: on SQLite StreamCallRecords answered from memory (see BareStream),
    the first `spec["sample"]` stored records of `spec["database"]` cycled through until
    `spec["records"]` are sent; on PostgreSQL by keyset reads of that database (KeysetStream)."""
    settings = Settings()
    tokens.install(tokens.Keyring.generate())  # its cursors are sealed as the system's are
    handler: BareStream | KeysetStream
    if spec["backend"] == "postgresql":
        handler = KeysetStream(spec["database"], settings)
    else:
        responses = bare_responses(spec["database"], spec["sample"], spec["batch_sizes"])
        handler = BareStream(responses, spec["records"], settings)
    bare = grpc.aio.server(options=SERVER_OPTIONS)
    bare.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "opconnect.records.v1.CallRecordService",
                {
                    # No response serializer: the handler yields encoded responses, sent as is.
                    "StreamCallRecords": grpc.unary_stream_rpc_method_handler(
                        handler.stream,
                        request_deserializer=pb.StreamCallRecordsRequest.FromString,
                    )
                },
            ),
        )
    )
    await runner.serve_bare(bare, spec)


async def serve(spec: Spec) -> None:
    await runner.serve(spec, "records", serve_bare)


# --------------------------------------------------------------------------- stream client


def stream_request(batch: int) -> pb.StreamCallRecordsRequest:
    return pb.StreamCallRecordsRequest(
        start_time=Timestamp(seconds=0), follow=False, max_batch_size=batch
    )


async def stream_once(method: Any, pids: Sequence[int], batch: int) -> dict[str, Any]:
    """Read a whole stream, parsing every response as a client does; time it, take the
    server's CPU time (each of its processes) and the RSS of the process called (the first) at
    every response."""
    pid = pids[0]
    before = memory_kb(pid)
    window = CpuWindow(pids)
    records = size = messages = 0
    samples: list[tuple[int, int]] = []
    async for raw in method(stream_request(batch), timeout=900):
        response = pb.StreamCallRecordsResponse.FromString(raw)
        records += len(response.records)
        size += len(raw)
        messages += 1
        samples.append((records, rss_kb(pid)))
    cpu = window.end()
    return {
        "records": records,
        "bytes": size,
        "messages": messages,
        **cpu.figures(),
        "server_cpu_by_process": cpu.server_cpu_by_process,
        "rss_before_kb": before.get("VmRSS", 0),
        "hwm_before_kb": before.get("VmHWM", 0),
        "hwm_after_kb": memory_kb(pid).get("VmHWM", 0),
        "rss_samples": samples,
    }


async def stream_check(method: Any, batch: int, responses: int) -> dict[str, Any]:
    """The SHA-256 of a stream's responses (its first `responses`, 0: all of it), each as its
    records' bytes and the position its cursor names, and the records they hold: what the
    split's stream is compared with the system's by. (A cursor is sealed with a random nonce,
    so two streams of the same records never carry the same cursor bytes; the position in it
    is opened with the servers' token keys, installed by `stream_worker`.)"""
    digest = hashlib.sha256()
    records = messages = 0
    call = method(stream_request(batch), timeout=900)
    async for raw in call:
        response = pb.StreamCallRecordsResponse.FromString(raw)
        position = decode_cursor(response.cursor, LOG, rules.DOMAIN)
        response.ClearField("cursor")
        body = response.SerializeToString()
        digest.update(len(body).to_bytes(4, "big"))
        digest.update(body)
        digest.update(position.to_bytes(8, "big"))
        records += len(response.records)
        messages += 1
        if messages == responses:
            break
    call.cancel()
    return {"records": records, "messages": messages, "sha256": digest.hexdigest()}


async def stream_slow(method: Any, pid: int, seconds: float, pause: float) -> dict[str, Any]:
    """Read a stream slowly (a pause after every response) for `seconds`, then cancel it;
    the server's RSS at every response."""
    before = rss_kb(pid)
    call = method(stream_request(500), timeout=900)
    records = messages = 0
    samples: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    async for raw in call:
        records += len(pb.StreamCallRecordsResponse.FromString(raw).records)
        messages += 1
        samples.append((time.perf_counter() - t0, rss_kb(pid)))
        if time.perf_counter() - t0 >= seconds:
            break
        await asyncio.sleep(pause)
    call.cancel()
    await asyncio.sleep(0.5)  # let the server notice and drop the stream
    return {
        "records": records,
        "messages": messages,
        "seconds": time.perf_counter() - t0,
        "pause_s": pause,
        "rss_before_kb": before,
        "rss_after_cancel_kb": rss_kb(pid),
        "rss_samples": samples,
    }


async def stream_worker(spec: Spec) -> None:
    """The stream client process: one channel per server, kept for the whole benchmark.

    Says READY once connected and warm; then answers each command on stdin with a JSON line:
    `GO <server> <batch>` reads a whole stream, `SLOW <server> <seconds> <pause>` a slow one,
    `CHECK <server> <batch> <responses>` digests a stream's responses (untimed).
    """
    creds = credentials(spec["root"], "operator", OPERATOR)
    keys = Path(spec["token_keys"])  # the servers' keys, to open the cursors CHECK compares
    tokens.install(tokens.Keyring(tokens.parse_keys(keys.read_text(), str(keys))))
    targets: dict[str, dict[str, Any]] = spec["targets"]
    channels = {kind: grpc.aio.secure_channel(t["address"], creds) for kind, t in targets.items()}
    try:
        methods = {
            kind: channel.unary_stream(
                STREAM_METHOD,
                request_serializer=pb.StreamCallRecordsRequest.SerializeToString,
                response_deserializer=None,  # bytes: parsed in the loop, and their size counted
            )
            for kind, channel in channels.items()
        }
        for method in methods.values():  # warm up: connect, and read a little of a stream
            call = method(stream_request(500), timeout=60)
            for _ in range(3):
                await call.read()
            call.cancel()
        print("READY", flush=True)
        async for line in runner.commands():
            command, kind, *rest = line.split()
            pids: list[int] = targets[kind]["pids"]
            try:
                if command == "GO":
                    result = await stream_once(methods[kind], pids, int(rest[0]))
                elif command == "CHECK":
                    result = await stream_check(methods[kind], int(rest[0]), int(rest[1]))
                else:
                    result = await stream_slow(
                        methods[kind], pids[0], float(rest[0]), float(rest[1])
                    )
            except grpc.aio.AioRpcError as error:
                result = {"error": f"{error.code().name}: {error.details()}"}
            print(json.dumps(result), flush=True)
    finally:
        for channel in channels.values():
            await channel.close()


# --------------------------------------------------------------------------- publish client


async def publish_once(
    channel: grpc.aio.Channel,
    requests: list[pb.PublishCallRecordsRequest],
    in_flight: int,
    pid: int,
) -> dict[str, Any]:
    """Publish the batches on one stream with at most `in_flight` unacknowledged; time from
    the first send to the last acknowledgement."""
    stub = pb_grpc.CallRecordIngestServiceStub(channel)
    outcomes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    acks = 0

    def answered(response: pb.PublishCallRecordsResponse) -> None:
        nonlocal acks
        acks += 1
        outcomes["accepted"] += response.accepted_count
        outcomes["duplicate"] += response.duplicate_count
        outcomes["refused"] += response.refused_count
        reasons.update(r.reason for r in response.results if r.reason)

    window = CpuWindow([pid])
    await runner.write_windowed(stub.PublishCallRecords(timeout=900), requests, in_flight, answered)
    cpu = window.end()
    return {
        "records": sum(len(r.records) for r in requests),
        "batches": len(requests),
        "acks": acks,
        **outcomes,
        "reasons": dict(reasons.most_common(5)),
        **cpu.figures(),
    }


async def publish_worker(spec: Spec) -> None:
    """The publishing client process (the call controller): makes its realistic records once,
    says READY; then each `GO <server> <run>` publishes them all under call ids of that run
    (`r<run>-<id>`, distinct across runs) and answers with a JSON line."""
    creds = credentials(spec["root"], "platform", PLATFORM)
    targets: dict[str, dict[str, Any]] = spec["targets"]
    channels = {kind: grpc.aio.secure_channel(t["address"], creds) for kind, t in targets.items()}
    try:
        messages = realistic_records(
            spec["records"], spec["seed"], dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2)
        )
        ids = [m.record.call_id for m in messages]
        for channel in channels.values():
            await channel.channel_ready()
        print("READY", flush=True)
        async for line in runner.commands():
            _, kind, run = line.split()
            for message, call_id in zip(messages, ids, strict=True):
                message.record.call_id = f"r{run}-{call_id}"[:64]
            requests = [
                pb.PublishCallRecordsRequest(batch_id=f"r{run}-{i}", records=batch)
                for i, batch in enumerate(chunks(messages, spec["batch"]))
            ]
            try:
                result = await publish_once(
                    channels[kind], requests, spec["in_flight"], targets[kind]["pid"]
                )
            except grpc.aio.AioRpcError as error:
                result = {"error": f"{error.code().name}: {error.details()}"}
            print(json.dumps(result), flush=True)
    finally:
        for channel in channels.values():
            await channel.close()


# --------------------------------------------------------------------------- raw baseline


def raw_inserts(source: str, prefix: str, target: str, batch: int, method: str) -> dict[str, Any]:
    """The rows the system wrote for call ids starting with `prefix` (read back from its
    database at `source`), inserted durably into a fresh copy of the schema at `target`, `batch`
    records (and their media streams) per transaction, by `method`: `rows.durable_inserts`."""
    records = fetch(
        source,
        "SELECT * FROM call_records WHERE call_id >= ? AND call_id < ? ORDER BY position",
        *prefix_range(prefix),
    )
    if not records:
        raise RuntimeError(f"no stored records with call ids {prefix}*")
    by_position: dict[int, list[Row]] = {}
    for row in fetch(
        source,
        "SELECT * FROM call_media_streams WHERE position BETWEEN ? AND ?"
        " ORDER BY position, stream_index",
        records[0][0],
        records[-1][0],
    ):
        by_position.setdefault(row[0], []).append(row)
    batches = [
        (chunk, [s for r in chunk for s in by_position.get(r[0], [])])
        for chunk in chunks(records, batch)
    ]
    tables = [
        ("call_records", table_columns(source, "call_records")),
        ("call_media_streams", table_columns(source, "call_media_streams")),
    ]
    return durable_inserts(target, tables, batches, method)


# --------------------------------------------------------------------------- orchestrator


@dataclass
class StreamRun:
    server: str
    batch: int
    round: int
    records: int
    messages: int
    records_per_s: float
    mb_per_s: float
    seconds: float
    client_cpu: float
    server_cpu: float | None  # all the server's threads (split: both its processes)
    other_cpu: float | None  # cores busy with anything but server and client: noise
    memory: dict[str, float] | None  # system runs: RSS figures in MB
    server_cpu_by_process: list[float] | None = None  # split: gateway, records service


@dataclass
class PublishRun:
    kind: str  # "system", "raw" (executemany), "raw (copy)" (PostgreSQL), or "system (filled)"
    round: int
    records: int
    records_per_s: float
    seconds: float
    client_cpu: float | None
    server_cpu: float | None  # for raw: the inserting process's CPU
    other_cpu: float | None  # cores busy with anything else (system runs): noise
    accepted: int | None
    refused: int | None


def stream_memory(result: dict[str, Any]) -> dict[str, float]:
    """RSS before the stream, at 10%, 50% and 100% of it and its peak (MB), and the growth."""
    samples: list[list[int]] = result["rss_samples"]
    total = result["records"]
    before = result["rss_before_kb"] / 1024

    def at(share: float) -> float:
        for records, kb in samples:
            if records >= share * total:
                return kb / 1024
        return samples[-1][1] / 1024 if samples else 0.0

    out = {
        "rss_before": before,
        "rss_10": at(0.1),
        "rss_50": at(0.5),
        "rss_100": at(1.0),
        "rss_peak": max((kb for _, kb in samples), default=0) / 1024,
        "hwm_before": result["hwm_before_kb"] / 1024,
        "hwm_after": result["hwm_after_kb"] / 1024,
    }
    out["growth_10"] = out["rss_10"] - before
    out["growth_50"] = out["rss_50"] - before
    out["growth_100"] = out["rss_100"] - before
    out["growth_10_to_100"] = out["rss_100"] - out["rss_10"]
    return out


def stream_run(
    client: Child, server: ServerProcess, batch: int, round_no: int, expected: int
) -> StreamRun:
    result = client.ask(f"GO {server.kind} {batch}")
    if result["records"] != expected:
        raise RuntimeError(f"{server.kind} streamed {result['records']} records, not {expected}")
    seconds = result["seconds"]
    return StreamRun(
        server=server.kind,
        batch=batch,
        round=round_no,
        records=result["records"],
        messages=result["messages"],
        records_per_s=result["records"] / seconds,
        mb_per_s=result["bytes"] / seconds / 1e6,
        seconds=seconds,
        client_cpu=result["client_cpu"],
        server_cpu=result["server_cpu"],
        other_cpu=result["other_cpu"],
        memory=stream_memory(result) if server.kind == "system" else None,
        server_cpu_by_process=result["server_cpu_by_process"],
    )


def publish_run(
    client: Child, kind: str, label: str, round_no: int, run: int
) -> tuple[PublishRun, dict[str, Any]]:
    result = client.ask(f"GO {kind} {run}")
    seconds = result["seconds"]
    return (
        PublishRun(
            kind=label,
            round=round_no,
            records=result["records"],
            records_per_s=result.get("accepted", 0) / seconds,
            seconds=seconds,
            client_cpu=result["client_cpu"],
            server_cpu=result["server_cpu"],
            other_cpu=result["other_cpu"],
            accepted=result.get("accepted", 0),
            refused=result.get("refused", 0),
        ),
        result,
    )


def raw_run(
    source: str, run: int, target: str, round_no: int, batch: int, method: str
) -> PublishRun:
    raw = raw_inserts(source, f"r{run}-", target, batch, method)
    return PublishRun(
        kind="raw" if method == "executemany" else f"raw ({method})",
        round=round_no,
        records=raw["records"],
        records_per_s=raw["records"] / raw["seconds"],
        seconds=raw["seconds"],
        client_cpu=None,
        server_cpu=raw["cpu"],
        other_cpu=None,
        accepted=None,
        refused=None,
    )


def best(runs: Sequence[StreamRun], server: str, batch: int) -> StreamRun:
    return max((r for r in runs if r.server == server and r.batch == batch), key=_rate)


def _rate(run: StreamRun | PublishRun) -> float:
    return run.records_per_s


def run(args: argparse.Namespace) -> dict[str, Any]:
    batch_sizes = [500, 1000]
    rounds = {500: args.rounds, 1000: max(1, args.rounds - 1)}
    split_rounds = {500: args.split_rounds, 1000: max(0, args.split_rounds - 1)}
    stream_runs: list[StreamRun] = []
    publish_runs: list[PublishRun] = []
    profile: dict[str, Any] | None = {} if args.profile else None
    # The split gateway's certificate besides the operator's and the platform's.
    with (
        runner.workspace(
            "opconnect-records-bench-", [("platform", GATEWAY_NAME)], database_url=args.database
        ) as ws,
        runner.Children() as children,
    ):
        root = ws.root
        settings = ws.settings("stream")
        print(f"filling the database with {args.records:,} records ...", flush=True)
        filled = fill(settings, args.records, args.seed)
        print(
            f"filled in {filled.seconds:.1f} s; streaming {args.records:,} records"
            f" ({sum(rounds.values())} rounds per server, {sum(split_rounds.values())} for"
            " split) ...",
            flush=True,
        )
        spec = ws.spec("stream", profile=args.profile)
        system = children.add(ServerProcess("system", spec))
        bare = children.add(
            ServerProcess(
                "bare",
                {
                    **spec,
                    "database": ws.database("stream"),
                    "sample": min(BARE_SAMPLE, args.records),
                    "records": args.records,
                    "batch_sizes": batch_sizes,
                },
            )
        )
        # The split system on the system's database file (filled, operator registered).
        split_records = children.add(ServerProcess("split-records", spec))
        split = children.add(
            ServerProcess("split", {**spec, "records_target": split_records.address})
        )
        # The system again, on the same database, with metrics on, and with tracing on.
        metered = children.add(ServerProcess("metrics", spec))
        sink = children.add(ServerProcess("otlp-sink", spec))
        traced = children.add(
            ServerProcess("tracing", {**spec, "otlp_endpoint": f"http://{sink.address}"})
        )
        servers: dict[str, list[ServerProcess]] = {
            "bare": [bare],
            "system": [system],
            "split": [split, split_records],
            "metrics": [metered],
            "tracing": [traced],
        }
        targets = {
            kind: {"address": ps[0].address, "pids": [p.pid for p in ps]}
            for kind, ps in servers.items()
        }
        streamer = children.add(
            Child("stream", ws.spec(targets=targets, token_keys=str(settings.token_keys_path)))
        )
        streamer.expect("READY")
        for batch in batch_sizes:
            for round_no in range(1, rounds[batch] + 1):
                # The split in its first rounds only.
                kinds = [
                    k
                    for k in KINDS
                    if (k != "split" or round_no <= split_rounds[batch])
                    and (k not in ("metrics", "tracing") or batch == 500)
                ]
                stream_runs.extend(
                    stream_run(streamer, servers[kind][0], batch, round_no, args.records)
                    for kind in in_turn(kinds, round_no)
                )
        # The split streams what the system streams: the same records and cursors (checked
        # after the measured rounds, so that their first rounds start as cold as before).
        check = {
            kind: streamer.ask(f"CHECK {kind} 500 {CHECK_RESPONSES}")
            for kind in ("system", "split")
        }
        if check["split"] != check["system"] or (
            CHECK_RESPONSES == 0 and check["system"]["records"] != args.records
        ):
            raise RuntimeError(f"the split's stream differs from the system's: {check}")
        print(f"slow client for {args.slow_seconds:g} s ...", flush=True)
        slow = streamer.ask(f"SLOW system {args.slow_seconds} {args.slow_pause}")
        if profile is not None:
            profiled_stream, text = runner.profiled(
                system,
                root / "stream.prof",
                20,
                lambda: stream_run(streamer, system, 500, 0, args.records),
            )
            profile["stream"] = {"run": asdict(profiled_stream), "text": text}
        for child in (streamer, bare, split, split_records, metered, traced):
            child.stop()
        spans = sink.ask("SPANS")["spans"]

        print(
            f"publishing {args.publish_records:,} records"
            f" ({args.publish_rounds} rounds, and the raw baseline) ...",
            flush=True,
        )
        fresh = children.add(ServerProcess("system", ws.spec("publish", profile=args.profile)))
        publish_targets = {
            "fresh": {"address": fresh.address, "pid": fresh.pid},
            "filled": {"address": system.address, "pid": system.pid},
        }
        publisher = children.add(
            Child(
                "publish",
                ws.spec(
                    targets=publish_targets,
                    records=args.publish_records,
                    batch=PUBLISH_BATCH,
                    in_flight=args.in_flight,
                    seed=args.seed + 1000,
                ),
            )
        )
        publisher.expect("READY")
        fresh_db = ws.database("publish")
        for round_no in range(1, args.publish_rounds + 1):
            for kind in in_turn(["system", "raw"], round_no):
                if kind == "raw":  # the rows of the first system round, each raw method
                    for method in RAW_METHODS[ws.backend]:
                        raw_target = ws.database(f"raw_{method}{round_no}")
                        publish_runs.append(
                            raw_run(fresh_db, 1, raw_target, round_no, PUBLISH_BATCH, method)
                        )
                    continue
                published, result = publish_run(publisher, "fresh", "system", round_no, round_no)
                if result.get("refused"):
                    print(f"   refused in round {round_no}: {result['reasons']}", flush=True)
                publish_runs.append(published)
        filled_publish, _ = publish_run(publisher, "filled", "system (filled)", 1, INTO_FILLED_RUN)
        system.stop()
        if profile is not None:
            (profiled, _), text = runner.profiled(
                fresh,
                root / "publish.prof",
                20,
                lambda: publish_run(publisher, "fresh", "system", 0, PROFILE_RUN),
            )
            profile["publish"] = {"run": asdict(profiled), "text": text}

    report = make_report(
        args, settings, filled, stream_runs, slow, publish_runs, filled_publish, profile
    )
    report["settings"]["database"] = ws.described()
    report["backend"] = ws.backend
    report["stream"]["baseline"] = STREAM_BASELINES[ws.backend]
    report["publish"]["source"] = SOURCE
    report["stream"]["split_check"] = {**check["split"], "responses_compared": CHECK_RESPONSES}
    report["stream"]["spans_exported"] = spans
    return report


def make_report(
    args: argparse.Namespace,
    settings: Settings,
    filled: FillResult,
    stream_runs: list[StreamRun],
    slow: dict[str, Any],
    publish_runs: list[PublishRun],
    filled_publish: PublishRun | None,
    profile: dict[str, Any] | None,
) -> dict[str, Any]:
    batches = sorted({r.batch for r in stream_runs})
    ratios = {
        b: best(stream_runs, "system", b).records_per_s / best(stream_runs, "bare", b).records_per_s
        for b in batches
    }
    split_batches = sorted({r.batch for r in stream_runs if r.server == "split"})
    split_ratios = {
        b: _rate(best(stream_runs, "split", b)) / _rate(best(stream_runs, "system", b))
        for b in split_batches
    }
    observed = {
        kind: _rate(best(stream_runs, kind, 500)) / _rate(best(stream_runs, "system", 500))
        for kind in ("metrics", "tracing")
    }
    system_500 = [r for r in stream_runs if r.server == "system" and r.batch == 500]
    growth = max((r.memory or {}).get("growth_10_to_100", 0.0) for r in system_500)
    slow_samples: list[list[float]] = slow.get("rss_samples", [])
    slow_rss = [kb / 1024 for _, kb in slow_samples]
    best_system = max((r for r in publish_runs if r.kind == "system"), key=_rate)
    best_raw = max((r for r in publish_runs if r.kind == "raw"), key=_rate)
    best_copy = max((r for r in publish_runs if r.kind == "raw (copy)"), key=_rate, default=None)
    return {
        "machine": machine(),
        "settings": {
            "database": "",  # the workspace's (run)
            "tls": "mutual, dev PKI in a temp dir",
            "log_level": settings.log_level,
            "rate_per_operator": f"{settings.rate_per_operator:g}",
            "rate_burst": settings.rate_burst,
            "db_threads": settings.db_threads,
            "stream_batch_size": settings.stream_batch_size,
            "max_stream_batch_size": settings.max_stream_batch_size,
        },
        "params": {
            "records": args.records,
            "rounds": args.rounds,
            "split_rounds": args.split_rounds,
            "publish_records": args.publish_records,
            "publish_rounds": args.publish_rounds,
            "in_flight": args.in_flight,
            "slow_seconds": args.slow_seconds,
            "slow_pause": args.slow_pause,
            "seed": args.seed,
        },
        "fill": asdict(filled),
        "stream": {
            "runs": [asdict(r) for r in stream_runs],
            "best": {
                str(b): {
                    k: best(stream_runs, k, b).records_per_s
                    for k in KINDS
                    if (k != "split" or b in split_batches)
                    and (k not in ("metrics", "tracing") or b == 500)
                }
                for b in batches
            },
            "ratio_by_batch": {str(b): ratios[b] for b in batches},
            "ratio": ratios[500],
            "target": STREAM_TARGET,
            "split_ratio_by_batch": {str(b): split_ratios[b] for b in split_batches},
            "split_ratio": split_ratios[500],
            "metrics_ratio": observed["metrics"],
            "tracing_ratio": observed["tracing"],
            "observed_target": OBSERVED_TARGET,
        },
        "memory": {
            "growth_10_to_100_mb_worst": growth,
            "tolerance_mb": FLAT_TOLERANCE_MB,
            "slow": {
                "records": slow.get("records", 0),
                "messages": slow.get("messages", 0),
                "seconds": slow.get("seconds", 0.0),
                "pause_s": slow.get("pause_s", 0.0),
                "rss_before_mb": slow.get("rss_before_kb", 0) / 1024,
                "rss_min_mb": min(slow_rss, default=0.0),
                "rss_max_mb": max(slow_rss, default=0.0),
                "rss_last_mb": slow_rss[-1] if slow_rss else 0.0,
                "rss_after_cancel_mb": slow.get("rss_after_cancel_kb", 0) / 1024,
            },
        },
        "publish": {
            "runs": [asdict(r) for r in publish_runs],
            "into_filled": asdict(filled_publish) if filled_publish else None,
            "best": {"system": best_system.records_per_s, "raw": best_raw.records_per_s},
            "ratio": best_system.records_per_s / best_raw.records_per_s,
            # PostgreSQL: against COPY of the same rows too (None on SQLite)
            "copy_ratio": best_system.records_per_s / best_copy.records_per_s
            if best_copy
            else None,
        },
        "profile": profile,
        "stream_ratio": round(ratios[500], 4),
        "stream_split_ratio": round(split_ratios[500], 4),
        "stream_metrics_ratio": round(observed["metrics"], 4),
        "stream_tracing_ratio": round(observed["tracing"], 4),
        "stream_rss_growth_mb": round(growth, 2),
        "publish_ratio": round(best_system.records_per_s / best_raw.records_per_s, 4),
    }


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    stream_runs = [StreamRun(**r) for r in report["stream"]["runs"]]
    publish_runs = [PublishRun(**r) for r in report["publish"]["runs"]]
    print()
    print_header("opconnect records benchmark", report)
    f = report["fill"]
    print(
        f"fill:     {f['records']:,} records, {f['media_streams']:,} media stream rows,"
        f" {f['database_mb']:,.0f} MB, in {f['seconds']:.1f} s ({f['templates']:,} records from"
        f" {f['source']} through convert.prepare + storage.publish in {f['real_path_s']:.1f} s, the"
        f" rest copied in {f['copies_s']:.1f} s; {f['checked']:,} copies checked identical to"
        " storage.publish's rows). Not a figure of merit."
    )
    print()

    s = report["stream"]
    print(
        f"1. StreamCallRecords throughput: {args.records:,} records of one operator from"
        " start_time=epoch, follow=false, one client process parsing every response"
    )
    print(
        "   (CPU of the best round in shares of one core; client and server CPU count all their"
        " threads; other CPU is the rest of the machine: noise; MB/s counts encoded responses)"
    )
    print(
        "   (split: the records service in a process of its own (role records) behind a gateway"
        " process (role gateway) forwarding each response as raw bytes; its server CPU is"
        " gateway + records)"
    )
    print(
        f"   {'server':<8}{'batch':>6}{'best rec/s':>12}{'MB/s':>8}   {'every round':<36}"
        f"{'client CPU':>11}{'server CPU':>14}{'other CPU':>10}"
    )
    for batch in sorted({r.batch for r in stream_runs}):
        for kind in KINDS:
            mine = [r for r in stream_runs if r.server == kind and r.batch == batch]
            if not mine:
                continue
            top = max(mine, key=_rate)
            rounds = " / ".join(f"{r.records_per_s:,.0f}" for r in mine)
            if top.server_cpu_by_process is not None and len(top.server_cpu_by_process) > 1:
                server_cpu = shares(top.server_cpu_by_process)
            else:
                server_cpu = share(top.server_cpu)
            other = share(top.other_cpu)
            print(
                f"   {kind:<8}{batch:>6}{top.records_per_s:>12,.0f}{top.mb_per_s:>8.1f}"
                f"   {rounds:<36}{top.client_cpu:>11.0%}{server_cpu:>14}{other:>10}"
            )
    per = ", ".join(f"{b} per response {r:.2f}" for b, r in s["ratio_by_batch"].items())
    print(f"   ratio system/bare at the same batch size: {per}")
    top_bare = best(stream_runs, "bare", 500)
    side = "client" if top_bare.client_cpu >= 0.9 else "server"
    print(
        f"   the bare server's best run (500) kept the client at {top_bare.client_cpu:.0%} of a"
        f" core ({side} side was the limit of the baseline)"
    )
    print(f"   (bare on {report['backend']}: {s['baseline']})")
    print(
        f"   best system {s['best']['500']['system']:,.0f} / best bare"
        f" {s['best']['500']['bare']:,.0f} records/s (500 per response) = {s['ratio']:.2f}"
        f" (target >= {STREAM_TARGET}: {verdict(s['ratio'] >= STREAM_TARGET)})"
    )
    per = ", ".join(f"{b} per response {r:.2f}" for b, r in s["split_ratio_by_batch"].items())
    print(f"   ratio split/system at the same batch size: {per}")
    print(
        f"   best split {s['best']['500']['split']:,.0f} / best system"
        f" {s['best']['500']['system']:,.0f} records/s (500 per response) ="
        f" {s['split_ratio']:.2f} (no target: below 1, what the forwarding hop costs; above 1,"
        " spreading the work over two processes gained more than the hop costs)"
    )
    met = verdict(s["metrics_ratio"] >= OBSERVED_TARGET)
    print(
        f"   best metrics {s['best']['500']['metrics']:,.0f} / best system"
        f" {s['best']['500']['system']:,.0f} records/s (500 per response) ="
        f" {s['metrics_ratio']:.2f}, the system with its Prometheus metrics on (target >="
        f" {OBSERVED_TARGET}: {met})"
    )
    print(
        f"   best tracing {s['best']['500']['tracing']:,.0f} / best system"
        f" {s['best']['500']['system']:,.0f} records/s (500 per response) ="
        f" {s['tracing_ratio']:.2f}, every call traced and exported to an OTLP sink"
        f" ({s['spans_exported']:,} spans received; no target)"
    )
    cores = report["machine"]["nproc"]
    busy = 3  # the split's two server processes and the client
    bound = "CPU-bound" if busy > cores else "not short of cores"
    print(
        f"   split on {cores} cores: 2 server processes + 1 client process busy at once ({bound}:"
        " the figure includes the processes' competition for CPU, not only the hop's own work;"
        " see the client and server CPU above)"
    )
    c = s["split_check"]
    compared = "the whole stream" if c["responses_compared"] == 0 else "its first responses"
    print(
        f"   split stream checked against the system's after the rounds ({compared}, 500 per"
        f" response): {c['messages']:,} responses, {c['records']:,} records, byte for byte"
        " equal, their cursors at the same positions; every round's record count checked as for"
        " the others"
    )
    print()

    mem = report["memory"]
    print(
        "2. Streaming server memory (VmRSS of the system process, MB, sampled at every response;"
        " growth is from the RSS just before the stream)"
    )
    print(
        f"   {'batch':>7}{'round':>6}{'before':>9}{'+@10%':>8}{'+@50%':>8}{'+@100%':>8}"
        f"{'10%->100%':>11}{'peak':>8}{'VmHWM':>8}"
    )
    for r in stream_runs:
        if r.memory is None:
            continue
        g = r.memory
        print(
            f"   {r.batch:>7}{r.round:>6}{g['rss_before']:>9.1f}{g['growth_10']:>+8.1f}"
            f"{g['growth_50']:>+8.1f}{g['growth_100']:>+8.1f}{g['growth_10_to_100']:>+11.1f}"
            f"{g['rss_peak']:>8.1f}{g['hwm_after']:>8.1f}"
        )
    sl = mem["slow"]
    print(
        f"   slow client: {sl['records']:,} records in {sl['messages']} responses over"
        f" {sl['seconds']:.1f} s ({sl['pause_s'] * 1000:.0f} ms pause after each); RSS before"
        f" {sl['rss_before_mb']:.1f}, during {sl['rss_min_mb']:.1f} to {sl['rss_max_mb']:.1f},"
        f" after cancel {sl['rss_after_cancel_mb']:.1f}"
    )
    worst = mem["growth_10_to_100_mb_worst"]
    system_run = next(r for r in stream_runs if r.server == "system")
    streamed_mb = system_run.mb_per_s * system_run.seconds
    flat = "flat" if worst <= FLAT_TOLERANCE_MB else "GROWS"
    print(
        f"   worst growth from 10% to 100% of a stream (500 per response): {worst:+.1f} MB while"
        f" about {0.9 * streamed_mb:,.0f} MB of responses were sent (target: flat,"
        f" <= {FLAT_TOLERANCE_MB:g} MB: {flat})"
    )
    print()

    p = report["publish"]
    print(
        f"3. PublishCallRecords throughput: {args.publish_records:,} realistic records"
        f" ({p['source']}) in batches of {PUBLISH_BATCH:,}, at most {args.in_flight} batches in"
        " flight, one platform client process, first send to last ack; raw: the same rows"
        f" (call_records + call_media_streams) by {RAW_TEXT[report['backend']]} into a fresh"
        " schema, one"
        " durable transaction per batch"
    )
    print(
        f"   {'kind':<18}{'round':>6}{'records/s':>11}{'seconds':>9}{'client CPU':>12}"
        f"{'server CPU':>12}{'other CPU':>11}{'accepted':>10}{'refused':>9}"
    )
    runs = list(publish_runs)
    if report["publish"]["into_filled"] is not None:
        runs.append(PublishRun(**report["publish"]["into_filled"]))
    for pr in runs:
        client_cpu = share(pr.client_cpu, "-")
        server_cpu = share(pr.server_cpu)
        other = share(pr.other_cpu, "-")
        accepted = f"{pr.accepted:,}" if pr.accepted is not None else "-"
        refused = f"{pr.refused:,}" if pr.refused is not None else "-"
        print(
            f"   {pr.kind:<18}{pr.round:>6}{pr.records_per_s:>11,.0f}{pr.seconds:>9.2f}"
            f"{client_cpu:>12}{server_cpu:>12}{other:>11}{accepted:>10}{refused:>9}"
        )
    print(
        "   (raw's CPU is the inserting process's; 'system (filled)' published into the database"
        f" holding the {args.records:,} streamed records, for information, not in the ratio)"
    )
    print(
        f"   best system {p['best']['system']:,.0f} / best raw {p['best']['raw']:,.0f}"
        f" records/s = {p['ratio']:.2f} (raw: executemany; target >= {PUBLISH_TARGET}:"
        f" {verdict(p['ratio'] >= PUBLISH_TARGET)})"
    )
    if p["copy_ratio"] is not None:
        print(f"   against COPY of the same rows (best raw (copy)): {p['copy_ratio']:.2f}")
    for name, what in (("stream", "stream (500 per response)"), ("publish", "publish run")):
        if not report["profile"] or name not in report["profile"]:
            continue
        profiled = report["profile"][name]
        print()
        print(
            f"Server profile of one more {what}: cProfile of the event-loop thread and of every"
            " executor thread, merged (validation runs on the loop's default executor, storage"
            " on the database threads; C code that releases the GIL is not seen;"
            f" {profiled['run']['records_per_s']:,.0f} records/s while profiled):"
        )
        print(profiled["text"].rstrip())
    print_figures(
        report,
        [
            ("stream_ratio", f"{report['stream_ratio']:.2f}"),
            ("stream_split_ratio", f"{report['stream_split_ratio']:.2f}"),
            ("stream_metrics_ratio", f"{report['stream_metrics_ratio']:.2f}"),
            ("stream_tracing_ratio", f"{report['stream_tracing_ratio']:.2f}"),
            ("stream_rss_growth_mb", f"{report['stream_rss_growth_mb']:.1f}"),
            ("publish_ratio", f"{report['publish_ratio']:.2f}"),
        ],
    )


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--records", type=int, default=1_000_000, help="records stored and streamed")
    p.add_argument("--rounds", type=int, default=3, help="stream rounds per server (500/resp)")
    p.add_argument(
        "--split-rounds", type=int, help="stream rounds of the split (500/resp; --rounds if unset)"
    )
    p.add_argument("--publish-records", type=int, default=50_000, help="records per publish run")
    p.add_argument("--publish-rounds", type=int, default=2, help="publish rounds (and raw)")
    p.add_argument("--in-flight", type=int, default=4, help="publish batches unacknowledged")
    p.add_argument("--slow-seconds", type=float, default=5.0, help="slow client: how long")
    p.add_argument("--slow-pause", type=float, default=0.05, help="slow client: pause, seconds")
    p.add_argument("--seed", type=int, default=20261123, help="seed of the realistic records")


def check(args: argparse.Namespace) -> str | None:
    if min(args.records, args.publish_records, args.rounds, args.publish_rounds) < 1:
        return "--records, --publish-records, --rounds, --publish-rounds must be >= 1"
    if args.split_rounds is None:
        args.split_rounds = args.rounds
    if not 1 <= args.split_rounds <= args.rounds:
        return "--split-rounds must be between 1 and --rounds"
    return None


SCENARIO = runner.Scenario(
    description=__doc__ or "",
    options=options,
    quick={
        "records": 3_000,
        "rounds": 1,
        "publish_records": 2_000,
        "publish_rounds": 1,
        "slow_seconds": 0.5,
    },
    roles={"serve": serve, "stream": stream_worker, "publish": publish_worker},
    run=run,
    print_report=print_report,
    profile="cProfile the system (stream, publish)",
    check=check,
)

if __name__ == "__main__":
    sys.exit(runner.main(SCENARIO))
