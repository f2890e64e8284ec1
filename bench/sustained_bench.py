"""Sustained-load benchmark: a fixed offered publish rate for minutes, with live followers and
durations submitted alongside; acknowledgement and delivery latency, memory, over time.

Run from the repository root:

    .venv/bin/python bench/sustained_bench.py [--rate 1000] [--minutes 3] [--mode one|split]
                                              [--database URL] [--json] [--profile]

The system runs in child processes (this script again, `--role serve`): the one-process system
(`--mode one`), or the split system (`--mode split`: a records process, a usage process that
follows the records' call feed, and a gateway forwarding both), on SQLite in a temporary
directory or on `--database` (a schema of its own), with its Prometheus metrics on and the
usage service's call feed on (a `platform/usage` certificate), as in production. Ten operators
are registered, each with a certificate of its own.

Two client processes drive it, on a schedule shared through the wall clock:

- `--role publish`, the platform's call controller and the operators' billing systems: for
  each operator, one PublishCallRecords stream (as the platform) that sends a batch every
  `--tick` seconds, so that all together offer `--rate` records/s, and one
  SubmitCallDurations stream (as the operator) that submits the durations of the answered
  calls of each batch as soon as the batch is sent. Open loop: a batch is sent at its
  scheduled time whatever the answers' latency (queued in the client if the stream cannot
  take it), and its latency runs from that scheduled time to its answer, so queueing counts.
- `--role follow`, the carriers: 5 StreamCallRecords followers per operator (`follow`, from
  now, one channel each), opened before publishing starts. Each record's delivery latency is
  its receipt minus the `publish_time` it carries (the commit's clock: same machine); each
  follower checks it got every record of its operator that was accepted exactly once.

Both clients measure their own event loop's lag (a client that falls behind would inflate the
figures). The orchestrator samples every `--sample-s` seconds the servers' RSS, the SQLite WAL
file's size and the servers' metrics (database unit wait and duration, by kind); the servers
report their event loop's lag and Python's GC pauses (`gc.callbacks`), each by time.

Reported: publish and submit acknowledgement latency p50/p90/p99/max, commit -> delivery
p50/p90/p99/max, the exactly-once check, RSS over time (flat or growing, least-squares slope;
each server's first and last),
whether the offered rate was held (every batch sent within `HELD_LAG_S` of its schedule and
acknowledged, and 95% of the offer acknowledged before its end), a timeline per `--window`
seconds (latencies, loop lag, GC, database waits, WAL and RSS) so that a stall is seen when it
happens, and verdicts against the targets: publish ack p99 < 100 ms, delivery p99 < 250 ms,
memory flat. The first `--warmup` seconds are in the timeline but not in the summaries.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import gc
import json
import math
import os
import random
import sqlite3
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import runner
from prometheus_client.parser import text_string_to_metric_families
from report import machine, print_figures, print_header, profile_text, summary_ms, verdict
from runner import PLATFORM, Child, Spec, credentials

from app import runtime as gateway_server
from gateway.identity import GATEWAY_NAME
from gateway.pki import PeerKind, PkiPaths
from gateway.registry import ca_anchors
from opconnect.records.v1 import records_pb2 as pb
from opconnect.records.v1 import records_pb2_grpc as pb_grpc
from opconnect.usage.v1 import usage_pb2 as usage_pb
from opconnect.usage.v1 import usage_pb2_grpc as usage_grpc
from plumbing.config import Settings
from plumbing.logs import configure_logging
from simulator import calls

OPERATORS = tuple(f"sustained-op{k:02d}" for k in range(10))
FEED_CLIENT = "usage"  # the platform certificate the usage service follows the call feed with
TEMPLATES = 400  # realistic records made per operator, sent again under new call ids
ACK_TARGET_MS = 100.0
DELIVERY_TARGET_MS = 250.0
FLAT_TOLERANCE_MB = 8.0  # RSS growth from the first to the last third still called flat
HELD_LAG_S = 1.0  # a batch sent later than this after its schedule: the rate was not held
DRAIN_S = 60.0  # after the last batch, how long the clients wait for answers and records
STOP_WAIT_S = 90.0
PERCENTILES = (50, 90, 99)
# The metrics sampled for the timeline: histogram family -> label that splits it.
HISTOGRAMS = {"opconnect_db_unit_wait_seconds": "kind", "opconnect_db_unit_seconds": "kind"}
# Seconds of database work by kind and unit (the storage function): what held the writer.
UNIT_BUSY = "opconnect_db_unit_busy_seconds"
UNIT_CPU = "opconnect_db_unit_cpu_seconds"
UNITS_SHOWN = 8


def tenant_of(k: int) -> str:
    """Operator k's customer tenant (a GUID of its own)."""
    return f"5e7a0c1d-0000-4000-8000-{k:012d}"


def call_id(tag: str, k: int, seq: int) -> str:
    return f"{tag}-{k:02d}-{seq:09d}"


def seq_of(call: str) -> int:
    return int(call[-9:])


def windowed(samples: Sequence[tuple[float, float]], window: float) -> dict[int, list[float]]:
    """(time since t0, value) samples grouped by window index."""
    out: dict[int, list[float]] = {}
    for at, value in samples:
        out.setdefault(int(at // window), []).append(value)
    return out


def window_summary(values: Sequence[float]) -> dict[str, float]:
    """Latencies in seconds of one window, in ms: n, p50, p99, max."""
    return summary_ms(values, (50, 99))


class LoopLag:
    """How late the event loop runs a 20 ms sleep, by wall-clock time (seconds)."""

    PERIOD_S = 0.02

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (wall time, lag)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.PERIOD_S)
            self.samples.append((time.time(), loop.time() - before - self.PERIOD_S))

    def since(self, t0: float) -> list[tuple[float, float]]:
        return [(at - t0, lag) for at, lag in self.samples if at >= t0]


class GcPauses:
    """Python's garbage collections, each (wall time, generation, seconds), via gc.callbacks."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, int, float]] = []
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append(
                (time.time(), int(info["generation"]), time.perf_counter() - self._started)
            )


def probe_stats(lag: LoopLag, pauses: GcPauses, t0: float, window: float) -> dict[str, Any]:
    """What a process's probes saw from `t0` on: loop lag and GC pauses, overall and by window."""
    lags = lag.since(t0)
    gcs = [(at - t0, gen, s) for at, gen, s in pauses.pauses if at >= t0]
    by_window: dict[int, dict[str, float]] = {}
    for index, values in windowed(lags, window).items():
        by_window.setdefault(index, {})["loop_lag_max_ms"] = max(values) * 1000
    for at, _, seconds in gcs:
        slot = by_window.setdefault(int(at // window), {})
        slot["gc_max_ms"] = max(slot.get("gc_max_ms", 0.0), seconds * 1000)
        slot["gc_ms"] = slot.get("gc_ms", 0.0) + seconds * 1000
    return {
        "loop_lag_ms": summary_ms([v for _, v in lags], (50, 99, 100)),
        "gc": {
            f"gen{gen}": {
                "count": sum(1 for _, g, _ in gcs if g == gen),
                "total_ms": sum(s for _, g, s in gcs if g == gen) * 1000,
                "max_ms": max((s for _, g, s in gcs if g == gen), default=0.0) * 1000,
            }
            for gen in (0, 1, 2)
        },
        "windows": {str(k): v for k, v in sorted(by_window.items())},
    }


# --------------------------------------------------------------------------- servers


def server_settings(spec: Spec) -> Any:
    """The benchmarks' settings (runner.system_settings), with metrics on and the usage
    service's call feed on (as the `platform/usage` certificate)."""
    paths = PkiPaths.at(Path(spec["root"]) / "pki")
    cert, key = paths.client(f"platform-{FEED_CLIENT}")
    return runner.system_settings(spec).replace(
        metrics_listen="127.0.0.1:0",
        feed_ca_file=str(paths.ca_cert),
        feed_cert_file=str(cert),
        feed_key_file=str(key),
        **spec.get("overrides", {}),
    )


def overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` options as Settings fields, each of its field's type."""
    defaults = Settings()
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not hasattr(defaults, key):
            raise ValueError(f"--set {pair}: no setting {key!r}")
        kind = type(getattr(defaults, key))
        out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


def server_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The servers' settings changed by `--set` and `--switch-interval` (a shorthand for
    `--set gil_switch_interval_s=S`)."""
    changed = overrides(args.set)
    if args.switch_interval:
        changed["gil_switch_interval_s"] = args.switch_interval
    return changed


def server_settings_of(args: argparse.Namespace) -> Settings:
    """The defaults with the servers' overrides (what the report says they ran with)."""
    return Settings().replace(**server_overrides(args))


async def serve(spec: Spec) -> None:
    """The `serve` role: by `spec["kind"]`, the one-process system (`system`), or a process of
    the split system (`records`, `usage` with `records_target`, `gateway` with
    `records_target` and `usage_target`). Says `READY <port> <metrics port>`; then answers
    `STATS <t0> <window>` with its probes' figures (and `--profile`'s commands)."""
    kind = spec["kind"]
    settings = server_settings(spec)
    paths = PkiPaths.at(Path(spec["root"]) / "pki")
    role = "all" if kind == "system" else kind
    if kind == "usage":
        settings = settings.replace(records_target=spec["records_target"])
    elif kind == "gateway":
        cert, key = paths.client(f"platform-{GATEWAY_NAME}")
        settings = settings.replace(
            records_target=spec["records_target"],
            usage_target=spec["usage_target"],
            internal_ca_file=str(paths.ca_cert),
            internal_cert_file=str(cert),
            internal_key_file=str(key),
        )
    configure_logging(settings.log_format, settings.log_level)
    lag, pauses = LoopLag(), GcPauses()
    runtime = await gateway_server.start(settings, role)
    if kind in ("system", "gateway"):  # the registry is in the database: once is enough
        anchors = ca_anchors(paths.operator_ca_cert.read_bytes())
        for operator in OPERATORS:
            await runtime.registry.add(operator, "sustained benchmark operator", anchors)
    gateway_server.freeze_start_up_objects()  # as `opconnect serve` does
    profiles: runner.ThreadProfiles | None = None
    if spec.get("profile"):  # the loop, the database threads and the default executor
        profiles = runner.ThreadProfiles()
        old = runtime.db._executor
        runtime.db._executor = runner.ProfilingExecutor(settings.db_threads, "db", profiles)
        old.shutdown(wait=False)
        asyncio.get_running_loop().set_default_executor(
            runner.ProfilingExecutor(None, "default", profiles)
        )
    lag.start()
    endpoint = runtime.metrics_endpoint
    print(f"READY {runtime.port} {endpoint.port if endpoint else 0}", flush=True)

    def answer(line: str) -> Any:
        _, t0, window = line.split()
        return probe_stats(lag, pauses, float(t0), float(window))

    await runner.serve_commands(profiles, answer)
    await runtime.stop(grace_s=1.0)


class Server(runner.ServerProcess):
    """A server child process of this benchmark, with its metrics port."""

    def __init__(self, kind: str, spec: Spec) -> None:
        runner.Child.__init__(self, "serve", {**spec, "kind": kind}, STOP_WAIT_S)
        self.kind = kind
        _, port, metrics_port = self.expect("READY ").split()
        self.port, self.metrics_port = int(port), int(metrics_port)
        self.address = f"127.0.0.1:{self.port}"


def start_servers(children: runner.Children, spec: Spec, mode: str) -> list[Server]:
    """The servers of `mode`; the one clients call first."""
    if mode == "one":
        return [children.add(Server("system", spec))]
    records = children.add(Server("records", spec))
    usage = children.add(Server("usage", {**spec, "records_target": records.address}))
    gateway = children.add(
        Server(
            "gateway",
            {**spec, "records_target": records.address, "usage_target": usage.address},
        )
    )
    return [gateway, records, usage]


# --------------------------------------------------------------------------- the publisher


Template = tuple[pb.PublishedCallRecord, usage_pb.CallDurationRecord | None]


def templates(k: int, seed: int) -> list[Template]:
    """Operator k's realistic records (ended in the last minute), each with the duration
    record its operator reports of it (None for an unanswered call)."""
    rng = random.Random(seed * 100 + k)
    users = calls.teams_users(calls.operator_numbers(rng, 50))
    trunks = (f"sbc1.op{k:02d}.example", f"sbc2.op{k:02d}.example")
    mix = calls.CallMix(OPERATORS[k], tenant_of(k), trunks, users)
    now = dt.datetime.now(dt.UTC)
    exact = calls.ReportMix(missing=0.0, mismatched=0.0, extra=0.0)
    out: list[Template] = []
    for _ in range(TEMPLATES):
        record = calls.make_call(rng, mix, now - dt.timedelta(milliseconds=rng.randint(0, 60_000)))
        reports = calls.operator_reports(rng, [record], users, exact)
        out.append((record, reports[0] if reports else None))
    return out


def batch_sizes(rate_per_operator: float, tick: float, count: int) -> list[int]:
    """Records in each of `count` batches so that the running total follows the rate."""
    return [
        math.floor(rate_per_operator * tick * (i + 1)) - math.floor(rate_per_operator * tick * i)
        for i in range(count)
    ]


class Stream:
    """One open-loop client stream: requests queued at their scheduled time, written in
    order by a writer, answers timed from the schedule by a reader."""

    def __init__(self, call: Any, t0: float) -> None:
        self.call = call
        self.t0 = t0
        self.queue: asyncio.Queue[tuple[int, float, Any] | None] = asyncio.Queue()
        self.due: dict[str, tuple[float, int]] = {}  # batch id -> (scheduled time, records)
        self.sent_late: list[float] = []  # seconds each batch was written after its schedule
        self.answers: list[tuple[float, float, int, int]] = []  # (due - t0, latency, n, accepted)
        self.error = ""

    async def write(self) -> None:
        try:
            while (item := await self.queue.get()) is not None:
                _, due, request = item
                self.sent_late.append(time.time() - due)
                await self.call.write(request)
            await self.call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
            self.error = self.error or repr(error)[:300]

    async def read(self) -> None:
        try:
            async for response in self.call:
                now = time.time()
                due, n = self.due.pop(response.batch_id)
                self.answers.append((due - self.t0, now - due, n, response.accepted_count))
        except grpc.aio.AioRpcError as error:
            self.error = self.error or f"{error.code().name}: {error.details()}"


class Load:
    """What the publisher process offers: the records each operator has had published (its
    sequence numbers), its durations waiting to be submitted, and the records of batches
    never answered (maybe stored, maybe not: left out of the followers' check)."""

    def __init__(self, spec: Spec, made: list[list[Template]]) -> None:
        self.spec = spec
        self.made = made
        self.published = [0] * len(OPERATORS)
        self.durations: list[list[usage_pb.CallDurationRecord]] = [[] for _ in OPERATORS]
        self.members: dict[tuple[int, str], list[tuple[int, int]]] = {}  # batch -> (k, seq)

    def add_record(self, request: pb.PublishCallRecordsRequest, k: int) -> tuple[int, int]:
        seq = self.published[k]
        self.published[k] += 1
        template, duration = self.made[k][seq % TEMPLATES]
        ident = call_id(self.spec["tag"], k, seq)
        record = request.records.add()
        record.CopyFrom(template)
        record.record.call_id = ident
        if duration is not None:
            reported = usage_pb.CallDurationRecord()
            reported.CopyFrom(duration)
            reported.record_id = f"d{ident}"
            reported.call_id = ident
            self.durations[k].append(reported)
        return k, seq


async def schedule(stream: Stream, dues: Sequence[float], make: Callable[[int], Any]) -> None:
    """Queue `make(i)` on the stream at each due time (None: nothing to send then), then
    close it."""
    for i, due in enumerate(dues):
        await asyncio.sleep(max(0.0, due - time.time()))
        request = make(i)
        if request is not None:
            stream.due[request.batch_id] = (due, len(request.records))
            stream.queue.put_nowait((i, due, request))
    stream.queue.put_nowait(None)


def stream_figures(stream: Stream) -> dict[str, Any]:
    return {
        "answers": stream.answers,
        "sent_late": stream.sent_late,
        "unanswered": len(stream.due),
        "error": stream.error,
    }


async def offer(
    platform: grpc.aio.Channel,
    operators: Sequence[grpc.aio.Channel],
    spec: Spec,
    t0: float,
    made: list[list[Template]],
) -> dict[str, Any]:
    """The whole run's load: `publishers` PublishCallRecords streams (the platform), each a
    batch every tick of records of every operator in turn, the streams' ticks spread over a
    tick; and each operator's SubmitCallDurations stream, the durations of its answered
    calls published since its last batch every `submit_s`, the operators spread too."""
    load = Load(spec, made)
    tick, publishers, seconds = spec["tick"], spec["publishers"], spec["seconds"]
    count = int(seconds / tick)
    sizes = batch_sizes(spec["rate"] / publishers, tick, count)
    turn = [0]  # the operator of the next record, all streams together

    def publish_batch(j: int) -> Callable[[int], Any]:
        def make(i: int) -> pb.PublishCallRecordsRequest | None:
            if not sizes[i]:
                return None
            request = pb.PublishCallRecordsRequest(batch_id=f"p{j}-{i}")
            members = []
            for _ in range(sizes[i]):
                members.append(load.add_record(request, turn[0] % len(OPERATORS)))
                turn[0] += 1
            load.members[j, request.batch_id] = members
            return request

        return make

    def submit_batch(k: int) -> Callable[[int], Any]:
        def make(i: int) -> usage_pb.SubmitCallDurationsRequest | None:
            ready, load.durations[k] = load.durations[k], []
            if not ready:
                return None
            return usage_pb.SubmitCallDurationsRequest(batch_id=f"d{k}-{i}", records=ready)

        return make

    ingest = pb_grpc.CallRecordIngestServiceStub(platform)
    publish = [Stream(ingest.PublishCallRecords(), t0) for _ in range(publishers)]
    submit = [
        Stream(usage_grpc.UsageServiceStub(channel).SubmitCallDurations(), t0)
        for channel in operators
    ]
    submit_s = spec["submit_s"]
    # The last submission after the last publish: every duration goes.
    submits = int(seconds / submit_s) + 1
    tasks = [asyncio.create_task(s.write()) for s in (*publish, *submit)]
    tasks += [asyncio.create_task(s.read()) for s in (*publish, *submit)]
    schedules = [
        schedule(
            stream,
            [t0 + tick * j / publishers + i * tick for i in range(count)],
            publish_batch(j),
        )
        for j, stream in enumerate(publish)
    ]
    schedules += [
        schedule(
            stream,
            [t0 + submit_s * (k / len(OPERATORS) + i) for i in range(submits)],
            submit_batch(k),
        )
        for k, stream in enumerate(submit)
    ]
    await asyncio.gather(*schedules)
    _, pending = await asyncio.wait(tasks, timeout=max(1.0, t0 + seconds + DRAIN_S - time.time()))
    for task in pending:
        task.cancel()
    for stream in (*publish, *submit):
        stream.call.cancel()
    unknown: list[list[int]] = [[] for _ in OPERATORS]
    for j, stream in enumerate(publish):
        for batch in stream.due:
            for k, seq in load.members[j, batch]:
                unknown[k].append(seq)
    return {
        "published": load.published,
        "unknown": unknown,
        "publish": [stream_figures(s) for s in publish],
        "submit": [stream_figures(s) for s in submit],
    }


async def publisher(spec: Spec) -> None:
    """The `publish` role: opens its channels, says READY; on `GO <t0>` offers the load from
    wall-clock time t0 and answers with a JSON line."""
    root = spec["root"]
    made = [templates(k, spec["seed"]) for k in range(len(OPERATORS))]
    platform = grpc.aio.secure_channel(spec["address"], credentials(root, "platform", PLATFORM))
    operators = [
        grpc.aio.secure_channel(spec["address"], credentials(root, "operator", op))
        for op in OPERATORS
    ]
    for channel in (platform, *operators):
        await channel.channel_ready()
    lag = LoopLag()
    lag.start()
    print("READY", flush=True)
    line = await runner.read_line()
    t0 = float(line.split()[1])
    offered = await offer(platform, operators, spec, t0, made)
    for channel in (platform, *operators):
        await channel.close()
    print(json.dumps({**offered, "loop_lag": lag.since(t0)}), flush=True)
    await runner.read_line()


# --------------------------------------------------------------------------- the followers


class Follower:
    """One operator's live StreamCallRecords follower: what it received, and when."""

    def __init__(self, k: int, capacity: int) -> None:
        self.k = k
        self.seen = bytearray(capacity)  # times each sequence number was received
        self.beyond = 0  # records whose sequence number is past the capacity
        self.foreign = 0  # records of another run or operator (never expected)
        self.latencies: list[tuple[float, float]] = []  # (receipt - t0, receipt - publish)
        self.error = ""

    async def run(self, call: Any, t0: list[float], tag: str, opened: asyncio.Event) -> None:
        prefix = f"{tag}-{self.k:02d}-"
        try:
            await call.read()  # "now": the cursor of the stream's start
            opened.set()
            while (response := await call.read()) is not grpc.aio.EOF:
                now = time.time()
                since = now - t0[0]
                for record in response.records:
                    ident = record.call_id
                    if not ident.startswith(prefix):
                        self.foreign += 1
                        continue
                    seq = seq_of(ident)
                    if seq >= len(self.seen):
                        self.beyond += 1
                        continue
                    if self.seen[seq] < 255:
                        self.seen[seq] += 1
                    published = record.publish_time
                    self.latencies.append((since, now - published.seconds - published.nanos / 1e9))
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.error = f"{error.code().name}: {error.details()}"
        except asyncio.CancelledError:
            pass

    def check(self, published: int, unknown: set[int]) -> dict[str, int]:
        """Against the operator's `published` records (those of `unknown` left out)."""
        missing = duplicated = 0
        for seq in range(min(published, len(self.seen))):
            if seq in unknown:
                continue
            got = self.seen[seq]
            missing += got == 0
            duplicated += got > 1
        unexpected = sum(1 for v in self.seen[published:] if v) + self.beyond + self.foreign
        return {"missing": missing, "duplicated": duplicated, "unexpected": unexpected}


async def following(spec: Spec) -> None:
    """The `follow` role: opens every follower, says READY once each has its start; on
    `GO <t0>` times receipts from t0; on `STOP <json>` (each operator's published count and
    unknown sequence numbers) waits until every follower has what it should (or DRAIN_S),
    then answers with a JSON line."""
    root = spec["root"]
    capacity = int(spec["rate"] / len(OPERATORS) * spec["seconds"]) + 1_000
    t0 = [time.time()]
    followers: list[Follower] = []
    channels: list[grpc.aio.Channel] = []
    tasks: list[asyncio.Task[None]] = []
    opened: list[asyncio.Event] = []
    for k, operator in enumerate(OPERATORS):
        for _ in range(spec["followers"]):
            channel = grpc.aio.secure_channel(
                spec["address"], credentials(root, "operator", operator)
            )
            channels.append(channel)
            stub = pb_grpc.CallRecordServiceStub(channel)
            call = stub.StreamCallRecords(pb.StreamCallRecordsRequest(follow=True))
            follower = Follower(k, capacity)
            followers.append(follower)
            opened.append(asyncio.Event())
            tasks.append(asyncio.create_task(follower.run(call, t0, spec["tag"], opened[-1])))
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), 120)
    lag = LoopLag()
    lag.start()
    print("READY", flush=True)
    line = await runner.read_line()
    t0[0] = float(line.split()[1])
    line = await runner.read_line()
    expected = json.loads(line.split(maxsplit=1)[1])
    unknown = [set(u) for u in expected["unknown"]]

    def complete(f: Follower) -> bool:
        return all(f.seen[s] or s in unknown[f.k] for s in range(expected["published"][f.k]))

    deadline = time.time() + DRAIN_S
    while time.time() < deadline and not all(complete(f) for f in followers):
        await asyncio.sleep(0.5)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    checks = [f.check(expected["published"][f.k], unknown[f.k]) for f in followers]
    latencies = [sample for f in followers for sample in f.latencies]
    warm = spec["warmup"]
    by_window = windowed(latencies, spec["window"])
    print(
        json.dumps(
            {
                "followers": len(followers),
                "records": sum(len(f.latencies) for f in followers),
                "latency_ms": summary_ms([v for at, v in latencies if at >= warm], PERCENTILES),
                "windows": {str(i): window_summary(v) for i, v in sorted(by_window.items())},
                "missing": sum(c["missing"] for c in checks),
                "duplicated": sum(c["duplicated"] for c in checks),
                "unexpected": sum(c["unexpected"] for c in checks),
                "errors": [f.error for f in followers if f.error][:5],
                "loop_lag": lag.since(t0[0]),
            }
        ),
        flush=True,
    )
    await runner.read_line()


# --------------------------------------------------------------------------- sampling


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


Reading = dict[str, dict[str, dict[str, Any]]]  # family -> label value -> buckets, sum


def scrape(port: int) -> Reading:
    """The HISTOGRAMS of a server's metrics endpoint: family -> label value -> cumulative
    `buckets` [(upper bound, count)] and `sum` (seconds)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return {}
    out: Reading = {}
    for family in text_string_to_metric_families(text):
        if family.name in (UNIT_BUSY, UNIT_CPU):
            out[family.name] = {
                f"{sample.labels['kind']} {sample.labels['unit']}": {"sum": sample.value}
                for sample in family.samples
                if sample.name.endswith("_total")
            }
            continue
        label = HISTOGRAMS.get(family.name)
        if label is None:
            continue
        for sample in family.samples:
            slot = out.setdefault(family.name, {}).setdefault(
                sample.labels[label], {"buckets": [], "sum": 0.0}
            )
            if sample.name.endswith("_bucket"):
                slot["buckets"].append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_sum"):
                slot["sum"] = sample.value
    return out


def bucket_p(
    before: list[tuple[float, float]], after: list[tuple[float, float]], p: float
) -> tuple[float, float]:
    """From two readings of a cumulative histogram: how many were observed between them, and
    the upper bound of the bucket holding their p-th percentile (inf: past the last bound)."""
    counts = dict(before)
    delta = [(bound, n - counts.get(bound, 0.0)) for bound, n in after]
    total = delta[-1][1] if delta else 0.0
    if total <= 0:
        return 0.0, 0.0
    for bound, n in delta:
        if n >= p / 100 * total:
            return total, bound
    return total, math.inf


class Sampler:
    """Readings every few seconds: RSS of each server, the WAL file, the servers' database
    histograms (per interval: units, p99 bucket, mean, and seconds of work per second)."""

    def __init__(
        self, servers: Sequence[Server], wal: Path | None, t0: float, warmup: float
    ) -> None:
        self.servers = servers
        self.wal = wal
        self.t0 = t0
        self.rows: list[dict[str, Any]] = []
        self._last: list[Reading] = [scrape(s.metrics_port) for s in servers]
        self._when = time.time()
        self.warm_at = t0 + warmup
        # Seconds of work per unit: each server's reading when the warm-up ended, and the last.
        self.units_warm: list[dict[str, float]] | None = None
        self._warm_when = t0
        self.units_last: list[dict[str, float]] = [{} for _ in servers]

    def sample(self) -> None:
        now_t = time.time()
        elapsed = max(1e-9, now_t - self._when)
        self._when = now_t
        row: dict[str, Any] = {
            "t": now_t - self.t0,
            "rss_mb": [rss_mb(s.pid) for s in self.servers],
        }
        if self.wal is not None:
            row["wal_mb"] = self.wal.stat().st_size / 2**20 if self.wal.exists() else 0.0
        for i, server in enumerate(self.servers):
            now = scrape(server.metrics_port)
            self.units_last[i] = {
                f"{family} {k}": v["sum"]
                for family in (UNIT_BUSY, UNIT_CPU)
                for k, v in now.pop(family, {}).items()
            }
            for family, by_label in now.items():
                short = family.removeprefix("opconnect_db_").removesuffix("_seconds")
                for value, reading in by_label.items():
                    before = self._last[i].get(family, {}).get(value, {"buckets": [], "sum": 0.0})
                    n, p99 = bucket_p(before["buckets"], reading["buckets"], 99)
                    if n:
                        spent = reading["sum"] - before["sum"]
                        key = f"{server.kind}_{short}_{value}"
                        row[f"{key}_n"] = n
                        row[f"{key}_p99_le_ms"] = p99 * 1000
                        row[f"{key}_mean_ms"] = spent / n * 1000
                        row[f"{key}_busy"] = spent / elapsed  # seconds of it per second
            self._last[i] = now
        self.rows.append(row)
        if self.units_warm is None and now_t >= self.warm_at:
            self.units_warm = [dict(units) for units in self.units_last]
            self._warm_when = now_t

    def units(self) -> dict[str, list[dict[str, Any]]]:
        """Per server, the units that did the most database work from the end of the warm-up to
        the last reading: seconds, and seconds of it per second of the run (`busy`: on SQLite
        the write units' busy adds up to the one writer's share of the time)."""
        if self.units_warm is None:
            return {}
        elapsed = max(1e-9, self._when - self._warm_when)
        out: dict[str, list[dict[str, Any]]] = {}
        for server, warm, last in zip(self.servers, self.units_warm, self.units_last, strict=True):
            spent = functools.partial(_spent, warm, last)
            units = {key.split(" ", 1)[1] for key in last if key.startswith(UNIT_BUSY + " ")}
            busiest = sorted(units, key=lambda unit: -spent(UNIT_BUSY, unit))[:UNITS_SHOWN]
            out[server.kind] = [
                {
                    "unit": unit,
                    "seconds": round(spent(UNIT_BUSY, unit), 3),
                    "busy": round(spent(UNIT_BUSY, unit) / elapsed, 3),
                    "cpu_seconds": round(spent(UNIT_CPU, unit), 3),
                }
                for unit in busiest
                if spent(UNIT_BUSY, unit) > 0
            ]
        return out


def _spent(warm: dict[str, float], last: dict[str, float], family: str, unit: str) -> float:
    """A unit's seconds (of `family`: busy or CPU) from the end of the warm-up to the last
    reading."""
    key = f"{family} {unit}"
    return last.get(key, 0.0) - warm.get(key, 0.0)


class RawCommits:
    """The raw baseline, measured beside the system for the whole run: a durable commit of one
    small row every `PERIOD_S` straight on the driver, on the same database (SQLite: a file of
    its own in the same directory, WAL, synchronous=FULL as the system sets it; PostgreSQL: a
    table of the run's schema), each timed, by wall-clock time. What any acknowledgement waits
    at least, on this machine at that moment: when it grows, the machine was the cause."""

    PERIOD_S = 0.05

    def __init__(self, database_url: str, folder: Path) -> None:
        self.samples: list[tuple[float, float]] = []  # (wall time, seconds)
        self._stop = threading.Event()
        self._connect = functools.partial(self._open, database_url, folder)
        self._thread = threading.Thread(target=self._run, name="raw-commits", daemon=True)
        self._thread.start()

    @staticmethod
    def _open(database_url: str, folder: Path) -> Any:
        if database_url.startswith("postgresql"):
            server = psycopg.connect(database_url.replace("postgresql+psycopg", "postgresql"))
            server.execute("CREATE TABLE raw_commits (id bigserial PRIMARY KEY, body bytea)")
            server.commit()
            return server
        embedded = sqlite3.connect(folder / "raw-commits.db", isolation_level=None)
        embedded.execute("PRAGMA journal_mode=WAL")
        embedded.execute("PRAGMA synchronous=FULL")
        embedded.execute("CREATE TABLE raw_commits (id INTEGER PRIMARY KEY, body BLOB)")
        return embedded

    def _run(self) -> None:
        connection = self._connect()
        postgres = isinstance(connection, psycopg.Connection)
        body = os.urandom(800)  # about a stored record's size
        try:
            while not self._stop.wait(self.PERIOD_S):
                started = time.perf_counter()
                if postgres:
                    connection.execute("INSERT INTO raw_commits (body) VALUES (%s)", (body,))
                    connection.commit()
                else:
                    connection.execute("BEGIN IMMEDIATE")
                    connection.execute("INSERT INTO raw_commits (body) VALUES (?)", (body,))
                    connection.execute("COMMIT")
                self.samples.append((time.time(), time.perf_counter() - started))
        finally:
            connection.close()

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join(10)
        return self.samples


def slope_per_min(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 2:
        return 0.0
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return 60 * sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def memory(rows: Sequence[dict[str, Any]], warmup: float, names: Sequence[str]) -> dict[str, Any]:
    """The servers' RSS (summed) after the warm-up: first and last, slope, growth from the
    first third's mean to the last third's, flat or growing; and each server's first and last
    (`names`: the servers' kinds, in the order of the samples)."""
    kept = [r for r in rows if r["t"] >= warmup]
    if len(kept) < 3:
        kept = list(rows)
    points = [(r["t"], sum(r["rss_mb"])) for r in kept]
    third = max(1, len(points) // 3)
    growth = sum(y for _, y in points[-third:]) / third - sum(y for _, y in points[:third]) / third
    return {
        "samples": [[round(x, 1), round(y, 1)] for x, y in points],
        "first_mb": points[0][1] if points else math.nan,
        "last_mb": points[-1][1] if points else math.nan,
        "peak_mb": max((y for _, y in points), default=math.nan),
        "slope_mb_per_min": slope_per_min(points),
        "growth_mb": growth,
        "flat": growth < FLAT_TOLERANCE_MB,
        "by_server": {
            name: [round(kept[0]["rss_mb"][i], 1), round(kept[-1]["rss_mb"][i], 1)]
            for i, name in enumerate(names)
        }
        if kept
        else {},
    }


# --------------------------------------------------------------------------- the run


def answers_of(offered: dict[str, Any], kind: str) -> list[tuple[float, float, int, int]]:
    """Every answer of the `kind` streams (publish, submit): (scheduled - t0, latency,
    records, accepted)."""
    return [(a[0], a[1], a[2], a[3]) for stream in offered[kind] for a in stream["answers"]]


def latency_figures(
    answers: Sequence[tuple[float, float, int, int]], warmup: float
) -> dict[str, float]:
    return summary_ms([lat for at, lat, _, _ in answers if at >= warmup], PERCENTILES)


@dataclass(frozen=True)
class Measured:
    """What a run brought back: the publisher's answers, the followers' figures, the servers'
    probes, the clients' loop lags, the orchestrator's samples, the raw commits (seconds
    since t0, seconds) and the servers' busiest database units."""

    offered: dict[str, Any]
    delivered: dict[str, Any]
    probes: dict[str, dict[str, Any]]
    client_lags: dict[str, list[tuple[float, float]]]
    samples: Sequence[dict[str, Any]]
    raw: Sequence[tuple[float, float]]
    units: dict[str, list[dict[str, Any]]]


def timeline(args: argparse.Namespace, measured: Measured) -> list[dict[str, Any]]:
    """One row per window: the latencies of what was scheduled in it, and what the probes and
    samples saw in it."""
    offered, delivered, probes = measured.offered, measured.delivered, measured.probes
    client_lags, samples, raw = measured.client_lags, measured.samples, measured.raw
    window = args.window
    rows: dict[int, dict[str, Any]] = {}
    for kind in ("publish", "submit"):
        for index, values in windowed(
            [(at, lat) for at, lat, _, _ in answers_of(offered, kind)], window
        ).items():
            s = window_summary(values)
            rows.setdefault(index, {})[kind] = [s["n"], s["p50"], s["p99"], s["max"]]
    for index_text, s in delivered["windows"].items():
        rows.setdefault(int(index_text), {})["delivery"] = [s["n"], s["p50"], s["p99"], s["max"]]
    for name, stats in probes.items():
        for index_text, figures in stats["windows"].items():
            slot = rows.setdefault(int(index_text), {})
            slot[f"{name}_loop_lag_max_ms"] = figures.get("loop_lag_max_ms", 0.0)
            slot[f"{name}_gc_max_ms"] = figures.get("gc_max_ms", 0.0)
    for name, lags in client_lags.items():
        for index, values in windowed(lags, window).items():
            rows.setdefault(index, {})[f"client_{name}_loop_lag_max_ms"] = max(values) * 1000
    for index, values in windowed(raw, window).items():
        rows.setdefault(index, {})["raw_commit"] = [
            window_summary(values)[k] for k in ("n", "p50", "p99", "max")
        ]
    for sample in samples:
        slot = rows.setdefault(int(max(0.0, sample["t"] - 0.001) // window), {})
        slot.update({k: v for k, v in sample.items() if k != "t"})
    return [{"t": index * window, **rows[index]} for index in sorted(rows) if index >= 0]


def run(args: argparse.Namespace) -> dict[str, Any]:
    seconds = args.minutes * 60
    clients: list[tuple[PeerKind, str]] = [("operator", op) for op in OPERATORS]
    clients += [("platform", GATEWAY_NAME), ("platform", FEED_CLIENT)]
    tag = f"s{random.getrandbits(24):06x}"
    with (
        runner.workspace("opconnect-sustained-", clients, database_url=args.database) as ws,
        runner.Children() as children,
    ):
        spec = ws.spec(profile=args.profile, overrides=server_overrides(args))
        servers = start_servers(children, spec, args.mode)
        load_spec = ws.spec(
            address=servers[0].address,
            rate=args.rate,
            seconds=seconds,
            tick=args.tick,
            publishers=args.publishers,
            submit_s=args.submit_s,
            seed=args.seed,
            tag=tag,
            warmup=args.warmup,
            window=args.window,
            followers=args.followers,
        )
        print(f"opening {len(OPERATORS) * args.followers} followers ...", flush=True)
        follow = children.add(Child("follow", load_spec, STOP_WAIT_S))
        follow.expect("READY")
        publish = children.add(Child("publish", load_spec, STOP_WAIT_S))
        publish.expect("READY")
        t0 = time.time() + 1.0
        print(
            f"offering {args.rate:g} records/s for {seconds:g} s ({args.mode}, "
            f"{'PostgreSQL' if args.database.startswith('postgresql') else 'SQLite'}) ...",
            flush=True,
        )
        for child in (follow, publish):
            child.send(f"GO {t0}")
        wal = None if ws.database_url else ws.settings().data_dir / "opconnect.db-wal"
        raw = RawCommits(ws.database_url, ws.root)
        sampler = Sampler(servers, wal, t0, args.warmup)
        profiled = servers[0] if args.mode == "one" else servers[1]
        profile_path = ws.root / "sustained.prof"
        profiling = False
        while time.time() < t0 + seconds:
            time.sleep(min(args.sample_s, max(0.0, t0 + seconds - time.time())))
            sampler.sample()
            if args.profile and not profiling and time.time() >= t0 + args.warmup:
                profiled.profile_start()
                profiling = True
        if profiling:
            profiled.profile_stop(profile_path)
        offered: dict[str, Any] = json.loads(publish.line())
        sampler.sample()
        raw_commits = [(at - t0, seconds) for at, seconds in raw.stop() if at >= t0]
        expected = {"published": offered["published"], "unknown": offered["unknown"]}
        follow.send("STOP " + json.dumps(expected))
        delivered: dict[str, Any] = json.loads(follow.line())
        sampler.sample()
        probes = {s.kind: s.ask(f"STATS {t0} {args.window}") for s in servers}
        profiled_text = profile_text(profile_path, 25) if profiling else ""
    client_lags = {"publisher": offered.pop("loop_lag"), "follower": delivered.pop("loop_lag")}
    measured = Measured(
        offered, delivered, probes, client_lags, sampler.rows, raw_commits, sampler.units()
    )
    return make_report(args, measured, servers, profiled_text)


def make_report(
    args: argparse.Namespace, measured: Measured, servers: Sequence[Server], profile_text: str
) -> dict[str, Any]:
    offered, delivered, probes = measured.offered, measured.delivered, measured.probes
    client_lags, samples = measured.client_lags, measured.samples
    seconds = args.minutes * 60
    warm = args.warmup
    publish_answers = answers_of(offered, "publish")
    submit_answers = answers_of(offered, "submit")
    streams = [*offered["publish"], *offered["submit"]]
    # Acknowledged while the rate was offered (answered before its end): a backlog that the
    # system works off only afterwards is a rate not held.
    acked = sum(a[3] for a in publish_answers if a[0] >= warm and a[0] + a[1] <= seconds)
    offer_count = args.rate * max(1e-9, seconds - warm)
    late = [v for stream in streams for v in stream["sent_late"]]
    unanswered = sum(stream["unanswered"] for stream in streams)
    errors = [stream["error"] for stream in streams if stream["error"]]
    published = sum(offered["published"])
    refused = sum(a[2] - a[3] for a in publish_answers)
    held = (
        not unanswered
        and not errors
        and max(late, default=0.0) <= HELD_LAG_S
        and acked >= 0.95 * offer_count
    )
    ack = latency_figures(publish_answers, warm)
    submit = latency_figures(submit_answers, warm)
    rss = memory(samples, warm, [s.kind for s in servers])
    raw_ms = summary_ms([v for at, v in measured.raw if at >= warm], PERCENTILES)
    exactly_once = (
        delivered["missing"] == 0
        and delivered["duplicated"] == 0
        and delivered["unexpected"] == 0
        and not delivered["errors"]
    )
    return {
        "machine": machine(),
        "backend": "postgresql" if args.database.startswith("postgresql") else "sqlite",
        "settings": {
            "database": args.database.split("@")[-1].split("?")[0] or "sqlite (WAL) in a temp dir",
            "mode": args.mode,
            "servers": " + ".join(s.kind for s in servers),
            "metrics": "on",
            "usage_feed": "on",
            **server_overrides(args),
            "gil_switch_interval_s": server_settings_of(args).gil_switch_interval_s,
        },
        "params": {
            "rate": args.rate,
            "minutes": args.minutes,
            "tick_s": args.tick,
            "publishers": args.publishers,
            "submit_s": args.submit_s,
            "operators": len(OPERATORS),
            "followers": len(OPERATORS) * args.followers,
            "warmup_s": warm,
            "window_s": args.window,
            "sample_s": args.sample_s,
        },
        "publish": {
            "ack_ms": ack,
            "records": published,
            "batches": len(publish_answers),
            "accepted": sum(a[3] for a in publish_answers),
            "refused": refused,
            "unanswered_batches": unanswered,
            "errors": errors[:5],
        },
        "submit": {
            "ack_ms": submit,
            "records": sum(a[2] for a in submit_answers),
            "accepted": sum(a[3] for a in submit_answers),
        },
        "rate": {
            "offered_per_s": args.rate,
            "acknowledged_per_s": acked / max(1e-9, seconds - warm),
            "sent_late_max_s": max(late, default=0.0),
            "sent_late_p99_s": summary_ms(late, (99,))["p99"] / 1000 if late else 0.0,
            "held": held,
        },
        "delivery": delivered,
        "raw_commit_ms": raw_ms,
        # The system against the raw durable commit beside it, same moments (p99 / p99).
        "ack_p99_to_raw_commit_p99": ack["p99"] / raw_ms["p99"] if raw_ms["n"] else math.nan,
        "exactly_once": exactly_once,
        "memory": rss,
        "probes": {
            **{name: {k: v for k, v in p.items() if k != "windows"} for name, p in probes.items()},
            **{
                f"{name} (client)": {
                    "loop_lag_ms": summary_ms([v for at, v in lags if at >= warm], (50, 99, 100))
                }
                for name, lags in client_lags.items()
            },
        },
        "timeline": timeline(args, measured),
        "units": measured.units,
        "verdicts": {
            "ack_p99": ack["p99"] < ACK_TARGET_MS,
            "delivery_p99": delivered["latency_ms"]["p99"] < DELIVERY_TARGET_MS,
            "memory_flat": rss["flat"],
            "rate_held": held,
            "exactly_once": exactly_once,
        },
        "sustained_ack_p99_ms": ack["p99"],
        "sustained_delivery_p99_ms": delivered["latency_ms"]["p99"],
        "profile": {"text": profile_text} if profile_text else {},
    }


def _ms(s: dict[str, float]) -> str:
    return " ".join(f"{k} {s[k]:.1f}" for k in ("p50", "p90", "p99", "max") if k in s) + (
        f"  (n {int(s['n'])})"
    )


def timeline_text(row: dict[str, Any]) -> list[str]:
    """A timeline row's figures, short: latencies p50/p99/max (publish, submit, delivery, the
    raw commit),
    the largest loop lag of a server and of a client, the longest GC pause, the p99 bucket of
    write units' wait and work, the writer's busy share, the WAL's size, the servers' RSS."""
    parts = [f"t={row['t']:>5.0f}"]
    for kind in ("publish", "submit", "delivery", "raw_commit"):
        if kind in row:
            _, p50, p99, top = row[kind]
            parts.append(f"{kind[:3]} {p50:.0f}/{p99:.0f}/{top:.0f}")

    def most(suffix: str, client: bool = False) -> float | None:
        values = [
            v for k, v in row.items() if k.endswith(suffix) and k.startswith("client_") == client
        ]
        return max(values) if values else None

    shown = (
        ("srv-lag", most("loop_lag_max_ms"), "{:.0f}"),
        ("cli-lag", most("loop_lag_max_ms", client=True), "{:.0f}"),
        ("gc", most("gc_max_ms"), "{:.0f}"),
        ("wwait<=", most("unit_wait_write_p99_le_ms"), "{:.0f}"),
        ("wunit<=", most("unit_write_p99_le_ms"), "{:.0f}"),
        ("wbusy", most("unit_write_busy"), "{:.2f}"),
        ("wal", row.get("wal_mb"), "{:.1f}MB"),
        ("rss", sum(row["rss_mb"]) if "rss_mb" in row else None, "{:.0f}MB"),
    )
    for name, value, form in shown:
        if value is not None:
            parts.append(f"{name}{'' if name.endswith('=') else ' '}{form.format(value)}")
    return parts


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    print_header("opconnect sustained-load benchmark", report)
    if report["profile"]:
        print(report["profile"]["text"])
    p, s, d, r, m = (report[k] for k in ("publish", "submit", "delivery", "rate", "memory"))
    print()
    print(f"publish ack ms:      {_ms(p['ack_ms'])}")
    print(f"submit ack ms:       {_ms(s['ack_ms'])}")
    print(f"commit -> follower:  {_ms(d['latency_ms'])}")
    print(f"raw commit ms:       {_ms(report['raw_commit_ms'])}  (the baseline, beside it)")
    print(f"publish ack p99 / raw commit p99 = {report['ack_p99_to_raw_commit_p99']:.1f}")
    print(
        f"records: {p['records']:,} published, {p['accepted']:,} accepted, {p['refused']} refused,"
        f" {p['unanswered_batches']} batches unanswered; {s['accepted']:,} durations accepted"
    )
    print(
        f"followers: {d['followers']} received {d['records']:,} records; missing {d['missing']},"
        f" duplicated {d['duplicated']}, unexpected {d['unexpected']}"
        f" -> exactly once: {report['exactly_once']}"
    )
    print(
        f"rate: offered {r['offered_per_s']:g}/s, acknowledged {r['acknowledged_per_s']:.0f}/s,"
        f" sent late at most {r['sent_late_max_s'] * 1000:.0f} ms -> held: {r['held']}"
    )
    print(
        f"server RSS: {m['first_mb']:.0f} -> {m['last_mb']:.0f} MB (peak {m['peak_mb']:.0f}),"
        f" slope {m['slope_mb_per_min']:+.2f} MB/min, growth {m['growth_mb']:+.1f} MB"
        f" -> {'flat' if m['flat'] else 'GROWING'}"
        + "".join(
            f"; {name} {first:.0f} -> {last:.0f}" for name, (first, last) in m["by_server"].items()
        )
    )
    for name, probe in report["probes"].items():
        lag = probe["loop_lag_ms"]
        gcs = probe.get("gc", {})
        gen2 = gcs.get("gen2", {})
        print(
            f"{name}: loop lag p99 {lag['p99']:.1f} max {lag['max']:.1f} ms"
            + (f"; gen2 GC {gen2['count']}x, max {gen2['max_ms']:.1f} ms" if gen2 else "")
        )
    print()
    print(f"timeline (per {args.window:g} s; ms; n p50 p99 max of what was scheduled then):")
    for row in report["timeline"]:
        print("  " + "  ".join(timeline_text(row)))
    for kind, units in report["units"].items():
        print()
        print(
            f"database work after the warm-up, {kind}"
            " (unit: seconds, per second of the run, of which the thread's CPU):"
        )
        for unit in units:
            print(
                f"  {unit['unit']:<40} {unit['seconds']:9.1f} s  {unit['busy']:5.2f}"
                f"  cpu {unit['cpu_seconds']:7.1f} s"
            )
    v = report["verdicts"]
    print()
    print(
        f"targets: publish ack p99 < {ACK_TARGET_MS:g} ms {verdict(v['ack_p99'])};"
        f" delivery p99 < {DELIVERY_TARGET_MS:g} ms {verdict(v['delivery_p99'])};"
        f" memory flat {verdict(v['memory_flat'])}; rate held {verdict(v['rate_held'])};"
        f" exactly once {verdict(v['exactly_once'])}"
    )
    print_figures(
        report,
        [
            ("sustained_ack_p99_ms", f"{report['sustained_ack_p99_ms']:.1f}"),
            ("sustained_delivery_p99_ms", f"{report['sustained_delivery_p99_ms']:.1f}"),
        ],
    )


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, default=1000.0, help="records/s offered, all operators")
    p.add_argument("--minutes", type=float, default=3.0, help="how long the rate is offered")
    p.add_argument("--mode", choices=("one", "split"), default="one", help="the system's shape")
    p.add_argument(
        "--followers", type=int, default=5, help="live StreamCallRecords followers per operator"
    )
    p.add_argument("--tick", type=float, default=0.1, help="seconds between a publisher's batches")
    p.add_argument(
        "--publishers", type=int, default=2, help="PublishCallRecords streams (the platform)"
    )
    p.add_argument(
        "--submit-s",
        type=float,
        default=1.0,
        help="seconds between an operator's SubmitCallDurations batches",
    )
    p.add_argument("--warmup", type=float, default=10.0, help="seconds left out of the summaries")
    p.add_argument("--window", type=float, default=10.0, help="seconds per timeline row")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a server setting other than the benchmarks' (plumbing/config.py), e.g."
        " db_threads=4; repeatable",
    )
    p.add_argument(
        "--switch-interval",
        type=float,
        default=0.0,
        metavar="S",
        help="the servers' GIL switch interval, seconds (the gil_switch_interval_s setting;"
        " 0: the setting's default)",
    )
    p.add_argument("--seed", type=int, default=12, help="seed of the records")


def check(args: argparse.Namespace) -> str | None:
    if args.rate <= 0 or args.minutes <= 0 or args.tick <= 0:
        return "--rate, --minutes and --tick must be above 0"
    try:
        overrides(args.set)
    except ValueError as error:
        return str(error)
    return None


SCENARIO = runner.Scenario(
    description=__doc__ or "",
    options=options,
    quick={"rate": 200, "minutes": 0.1, "warmup": 1.0, "window": 2.0, "sample_s": 1.0},
    roles={"serve": serve, "publish": publisher, "follow": following},
    run=run,
    print_report=print_report,
    profile="profile the server (the records process when split) after the warm-up",
    check=check,
)

if __name__ == "__main__":
    sys.exit(runner.main(SCENARIO))
