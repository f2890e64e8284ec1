"""`opconnect simulate`: realistic traffic against a running system, so records flow to an
operator's stream.

Against the gateway at `Options.target`, over mutual TLS with the development PKI:

1. as the operator, upload `numbers` numbers for the tenant (rerunning uploads the same numbers:
   they are drawn from a seed of operator and tenant; ALREADY_PRESENT is fine, a refused number
   is left out);
2. as the platform (the Teams admin center), assign each one that is not assigned yet to a user
   of the tenant, number i routed to `sip:user<i>@contoso.example`;
2b. as the operator, edit the civic address of the first number, and watch its assignments
   until the UPDATED event with the new emergency location comes (`simulator.emergency`): a
   watch that does not see it within 30 s fails the run;
3. as the platform (the call controller), publish calls (`simulator.calls`) at `rate` calls a
   second on `PublishCallRecords`, a batch per 0.2 s tick, reading the acknowledgements as they
   come; for `calls` calls, for `duration` seconds, or until Ctrl-C. The stream is the client
   library's (`opconnect_client.batches`): a broken stream is resumed with the unacknowledged
   batches sent again, and a failure shows the server's real status; the operator's durations
   go the same way on `SubmitCallDurations`.

It prints a live line, a summary, the first refusals and the `buf curl` command that shows the
records on the operator's stream. Exit status: 0 when every published record was accepted (or a
duplicate), 1 when the system cannot be reached or a step failed (a refused or unacknowledged
record included), 2 for bad options. Phone numbers are only ever printed masked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import random
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from opconnect.numbers.v1 import civic_addresses_pb2 as addresses_pb
from opconnect.numbers.v1 import civic_addresses_pb2_grpc as addresses_grpc
from opconnect.numbers.v1 import consents_pb2 as consents_pb
from opconnect.numbers.v1 import consents_pb2_grpc as consents_grpc
from opconnect.numbers.v1 import numbers_pb2 as numbers_pb
from opconnect.numbers.v1 import numbers_pb2_grpc as numbers_grpc
from opconnect.records.v1 import records_pb2 as records_pb
from opconnect.records.v1 import records_pb2_grpc as records_grpc
from opconnect.type.v1 import assignment_state_pb2 as state_pb
from opconnect.usage.v1 import usage_pb2 as usage_pb
from opconnect.usage.v1 import usage_pb2_grpc as usage_grpc
from opconnect_client import ClientError, Connection, ServerError
from opconnect_client.batches import Batch, pipelined
from plumbing.balancing import one_address
from plumbing.config import DEV_OPERATOR, DEV_PLATFORM
from plumbing.logs import mask_number, redact
from plumbing.validation import IDENTITY, IDENTITY_PATTERN, check_guid
from simulator import calls, emergency

# The customer tenant the simulated calls belong to unless --tenant says otherwise.
DEV_TENANT = "6f1a4b2c-8d3e-4f5a-9b6c-7d8e9f0a1b2c"
# The Entra object ids of the simulated users: uuid5 of "<tenant>/<index>" in this namespace.
USERS_NAMESPACE = uuid.UUID("3b4c1e0a-6d2f-5a7b-8c9d-0e1f2a3b4c5d")

TICK_S = 0.2  # a batch is published per tick
MAX_BATCH = 1_000  # records per request: the server's limit
MAX_IN_FLIGHT = 32  # batches published and not acknowledged yet
CONNECT_TIMEOUT_S = 5.0
CALL_TIMEOUT_S = 30.0  # each unary call of the set-up
DRAIN_TIMEOUT_S = 30.0  # waiting for the last acknowledgements after the last batch
STOP_DRAIN_TIMEOUT_S = 5.0  # the same after Ctrl-C
SHOWN_REFUSALS = 5
MAX_RATE = 100_000.0
MAX_NUMBERS = 10_000


@dataclass(frozen=True)
class Options:
    """What to simulate and against what.

    `target` is the gateway's host:port, or a gRPC target naming several gateways (calls are
    spread across them: plumbing.balancing); `pki_dir` the development PKI (CA `ca.pem`, client
    certificates in `clients/`); `operator` the operator whose trunks carry the calls and
    `platform` the platform system publishing them (both need certificates there); `tenant` the
    customer tenant (GUID); `numbers` how many numbers to upload and assign; `rate` calls a
    second; `calls` or `duration` (seconds) when to stop (neither: at Ctrl-C); `poor_share` the
    share of answered calls of poor quality; `seed` makes the mix of calls repeatable (call ids
    are new on every run, so a rerun never collides with records already published).
    """

    target: str = "localhost:50051"
    pki_dir: Path = Path("var/pki")
    operator: str = DEV_OPERATOR
    platform: str = DEV_PLATFORM
    tenant: str = DEV_TENANT
    numbers: int = 20
    rate: float = 5.0
    calls: int | None = None
    duration: float | None = None
    poor_share: float = 0.1
    seed: int | None = None
    # The operator's side: durations reported for the calls, with these shares off on purpose
    # (see calls.ReportMix); `report` False leaves the operator silent.
    report: bool = True
    missing_share: float = 0.03
    mismatch_share: float = 0.02
    extra_share: float = 0.01
    unanswered_share: float = 0.01


def check_options(options: Options) -> str | None:
    """What is wrong with the options, or None."""
    if not options.target:
        return "--target is required (host:port)"
    for what, ident in (("operator", options.operator), ("platform", options.platform)):
        if IDENTITY.fullmatch(ident) is None:
            return f"--{what} must match {IDENTITY_PATTERN}"
    if problem := check_guid(options.tenant):
        return f"--tenant: {problem}"
    if not 1 <= options.numbers <= MAX_NUMBERS:
        return f"--numbers must be 1 to {MAX_NUMBERS}"
    if not 0 < options.rate <= MAX_RATE:
        return f"--rate must be above 0 and at most {MAX_RATE:,.0f} calls a second"
    if options.calls is not None and options.duration is not None:
        return "give --calls or --duration, not both"
    if options.calls is not None and options.calls < 1:
        return "--calls must be at least 1"
    if options.duration is not None and not options.duration > 0:
        return "--duration must be above 0 seconds"
    if not 0 <= options.poor_share <= 1:
        return "--poor-share must be 0 to 1"
    for name in ("missing_share", "mismatch_share", "extra_share", "unanswered_share"):
        if not 0 <= getattr(options, name) <= 1:
            return f"--{name.replace('_', '-')} must be 0 to 1"
    return None


class SetupError(Exception):
    """A step before publishing failed; the message says what to do."""


@dataclass
class Tally:
    """What the publish stream did: records published and acknowledged (by outcome), batches
    awaiting their acknowledgement (batch id -> record count), the first refusals (printable,
    redacted) and the error that ended the stream, if any."""

    published: int = 0
    accepted: int = 0
    duplicate: int = 0
    refused: int = 0
    pending: dict[str, int] = field(default_factory=dict)
    refusals: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def acknowledged(self) -> int:
        return self.accepted + self.duplicate + self.refused

    def line(self, elapsed: float) -> str:
        rate = f"  ({self.published / elapsed:.1f} calls/s)" if elapsed >= 1 else ""
        return (
            f"{elapsed:7.1f}s  published {self.published}  accepted {self.accepted}  "
            f"duplicate {self.duplicate}  refused {self.refused}  "
            f"awaiting ack {self.published - self.acknowledged}{rate}"
        )


def _dev_pki_files(pki_dir: Path, name: str) -> tuple[Path, Path, Path]:
    """The development PKI as clients see it (README): the CA of the server certificate, and
    the client's certificate and key."""
    clients = pki_dir / "clients"
    return pki_dir / "ca.pem", clients / f"{name}.pem", clients / f"{name}.key"


def _client_files(options: Options, name: str) -> tuple[Path, Path]:
    _, cert, key = _dev_pki_files(options.pki_dir, name)
    for path in (cert, key):
        if not path.exists():
            raise SetupError(
                f"no {path}: is `make run` running? It makes the development PKI in var/pki on "
                f"first run (another client: `opconnect pki issue operator|platform NAME`)."
            )
    return cert, key


def _connection(options: Options, name: str) -> Connection:
    ca, _, _ = _dev_pki_files(options.pki_dir, name)
    if not ca.exists():
        raise SetupError(f"no {ca}: is `make run` running? It makes the development PKI.")
    cert, key = _client_files(options, name)
    return Connection(options.target, ca, cert, key)


async def _connect(options: Options, name: str) -> Any:
    """A channel to the gateway as the client `name` (e.g. `operator-contoso-telecom`), ready:
    the client library's (files checked first, calls spread over every gateway of the target,
    keepalive)."""
    try:
        channel = _connection(options, name).channel()
    except ClientError as error:
        raise SetupError(str(error)) from None
    try:
        await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
    except TimeoutError:
        await channel.close()
        raise SetupError(
            f"cannot reach opconnect at {options.target} within {CONNECT_TIMEOUT_S:.0f} s "
            f"(or the TLS handshake failed): is `make run` running?"
        ) from None
    return channel


def _explain(error: grpc.aio.AioRpcError, what: str, options: Options) -> SetupError:
    """A SetupError for a failed call, with a hint for the usual causes."""
    code = error.code()
    details = redact(error.details() or "")
    hint = ""
    if code == grpc.StatusCode.UNAVAILABLE:
        hint = " Is `make run` running?"
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        hint = (
            f" Is operator {options.operator} registered and active (`opconnect operators list`)?"
        )
    elif code == grpc.StatusCode.UNIMPLEMENTED:
        hint = " This server does not serve it yet."
    return SetupError(f"{what} failed: {code.name}: {details}.{hint}")


def _number_uploads(numbers: list[str], civic_address_id: str) -> list[numbers_pb.NumberUpload]:
    both = numbers_pb.Capabilities(inbound=True, outbound=True)
    return [
        numbers_pb.NumberUpload(
            phone_number=number,
            usage=numbers_pb.NUMBER_USAGE_USER,
            capabilities=both,
            civic_address_id=civic_address_id,
        )
        for number in numbers
    ]


async def _civic_address(options: Options, operator: Any) -> str:
    """The tenant's civic address the simulated numbers are uploaded with (a USER number needs
    one), made once: its request id is the operator's and tenant's own. Its id."""
    request_id = uuid.uuid5(USERS_NAMESPACE, f"address/{options.operator}/{options.tenant}")
    address = addresses_pb.CivicAddress(
        tenant_id=options.tenant,
        country_code="US",
        house_number="1",
        street_name="Microsoft Way",
        city="Redmond",
        state_or_province="WA",
        postal_code="98052",
        company_name="Contoso",
        geo_point=addresses_pb.GeoPoint(latitude=47.6395, longitude=-122.1281),
        locations=[addresses_pb.Location(description="Building 92, floor 1")],
    )
    try:
        made = await addresses_grpc.CivicAddressServiceStub(operator).CreateCivicAddress(
            addresses_pb.CreateCivicAddressRequest(
                civic_address=address, request_id=str(request_id)
            ),
            timeout=CALL_TIMEOUT_S,
        )
    except grpc.aio.AioRpcError as error:
        raise _explain(error, "CreateCivicAddress (as the operator)", options) from None
    print(f"civic address: {made.civic_address.civic_address_id} (tenant {options.tenant})")
    return str(made.civic_address.civic_address_id)


async def _assigned_numbers(stub: Any, tenant: str) -> dict[str, str]:
    """The tenant's numbers the operator has that are assigned: number -> SIP URI."""
    assigned: dict[str, str] = {}
    token = ""
    while True:
        page = await stub.ListNumbers(
            numbers_pb.ListNumbersRequest(
                page_size=1_000,
                page_token=token,
                tenant_id=tenant,
                state=state_pb.ASSIGNMENT_STATE_ASSIGNED,
            ),
            timeout=CALL_TIMEOUT_S,
        )
        assigned.update((n.phone_number, n.sip_uri) for n in page.numbers)
        token = page.next_page_token
        if not token:
            return assigned


async def _consent(options: Options, operator: Any, platform: Any) -> None:
    """The customer asks for the operator's service (as the admin center) and the operator
    accepts it: uploads need an active consent (both safe to repeat)."""
    try:
        await consents_grpc.ConsentAdminServiceStub(platform).CreateConsent(
            consents_pb.CreateConsentRequest(
                tenant_id=options.tenant, operator_id=options.operator
            ),
            timeout=CALL_TIMEOUT_S,
        )
    except grpc.aio.AioRpcError as error:
        raise _explain(error, "CreateConsent (as the admin center)", options) from None
    try:
        await consents_grpc.ConsentServiceStub(operator).UpdateConsentStatus(
            consents_pb.UpdateConsentStatusRequest(
                tenant_id=options.tenant, state=consents_pb.CONSENT_STATE_ACTIVE
            ),
            timeout=CALL_TIMEOUT_S,
        )
    except grpc.aio.AioRpcError as error:
        raise _explain(error, "UpdateConsentStatus (as the operator)", options) from None
    print(f"consent: active (tenant {options.tenant})")


async def setup_numbers(options: Options, operator: Any, platform: Any) -> list[calls.TeamsUser]:
    """Upload and assign the operator's numbers; the tenant's users that have one."""
    numbers = calls.operator_numbers(
        random.Random(f"{options.operator}/{options.tenant}"), options.numbers
    )
    number_service = numbers_grpc.NumberServiceStub(operator)
    admin = numbers_grpc.NumberAdminServiceStub(platform)
    await _consent(options, operator, platform)
    civic_address_id = await _civic_address(options, operator)
    try:
        uploaded = await number_service.UploadNumbers(
            numbers_pb.UploadNumbersRequest(
                tenant_id=options.tenant, numbers=_number_uploads(numbers, civic_address_id)
            ),
            timeout=CALL_TIMEOUT_S,
        )
    except grpc.aio.AioRpcError as error:
        raise _explain(error, "UploadNumbers (as the operator)", options) from None
    usable: list[tuple[int, str]] = []
    for index, result in enumerate(uploaded.results):
        if result.outcome == numbers_pb.NUMBER_OUTCOME_REFUSED:
            print(f"  {mask_number(result.phone_number)} left out: {result.reason}")
        else:
            usable.append((index, result.phone_number))
    print(
        f"numbers: {uploaded.added_count} uploaded, {uploaded.already_present_count} already "
        f"there, {uploaded.refused_count} refused (tenant {options.tenant})"
    )
    try:
        assigned = await _assigned_numbers(number_service, options.tenant)
    except grpc.aio.AioRpcError as error:
        raise _explain(error, "ListNumbers (as the operator)", options) from None
    users: list[calls.TeamsUser] = []
    newly = 0
    for index, number in usable:
        if number in assigned:
            users.append(calls.TeamsUser(number, assigned[number]))
            continue
        user_id = uuid.uuid5(USERS_NAMESPACE, f"{options.tenant}/{index}")
        request = numbers_pb.AssignNumberRequest(
            phone_number=number,
            tenant_id=options.tenant,
            sip_uri=calls.sip_uri_for(index),
            target=numbers_pb.AssignmentTarget(
                kind=numbers_pb.AssignmentTarget.KIND_USER, id=str(user_id)
            ),
        )
        try:
            await admin.AssignNumber(request, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            if error.code() not in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.FAILED_PRECONDITION,
            ):
                raise _explain(error, "AssignNumber (as the platform)", options) from None
            print(f"  {mask_number(number)} left out: {redact(error.details() or '')}")
            continue
        newly += 1
        users.append(calls.TeamsUser(number, calls.sip_uri_for(index)))
    print(f"numbers: {len(users)} assigned ({newly} just now, {len(users) - newly} already)")
    if not users:
        raise SetupError("no number could be uploaded and assigned; nothing to call")
    return users


def stream_command(options: Options, started: dt.datetime) -> str:
    """The `buf curl` command that follows the operator's records from `started` on."""
    ca, cert, key = _dev_pki_files(options.pki_dir, f"operator-{options.operator}")
    start = started.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    method = "opconnect.records.v1.CallRecordService/StreamCallRecords"
    return (
        f"node_modules/.bin/buf curl --protocol grpc --cacert {ca} \\\n"
        f"    --cert {cert} --key {key} \\\n"
        f"    https://{one_address(options.target)}/{method} \\\n"
        f'    -d \'{{"startTime":"{start}","follow":true}}\''
    )


def _count(tally: Tally, batch: Batch[records_pb.PublishedCallRecord], response: Any) -> None:
    """Count an acknowledged batch of the publish stream."""
    expected = tally.pending.pop(batch.id, None)
    if expected != len(response.results):
        tally.error = (
            f"batch {batch.id!r}: {len(response.results)} results, {expected} records sent"
        )
    for result in response.results:
        if result.outcome == records_pb.CALL_RECORD_OUTCOME_ACCEPTED:
            tally.accepted += 1
        elif result.outcome == records_pb.CALL_RECORD_OUTCOME_DUPLICATE:
            tally.duplicate += 1
        else:
            tally.refused += 1
            if len(tally.refusals) < SHOWN_REFUSALS:
                tally.refusals.append(
                    f"{result.call_id}: {result.reason or '(no reason)'} at "
                    f"{result.field or '(no field)'}: {redact(result.message)}"
                )


def _show(line: str, tty: bool) -> None:
    if tty:
        print(f"\r{line}\033[K", end="", flush=True)
    else:
        print(line, flush=True)


@dataclass
class Reports:
    """The operator's side: duration records waiting to be sent (None ends them), and how
    the ones sent went."""

    queue: asyncio.Queue[list[usage_pb.CallDurationRecord] | None] = field(
        default_factory=asyncio.Queue
    )
    sent: int = 0
    accepted: int = 0
    duplicate: int = 0
    refused: list[str] = field(default_factory=list)
    error: str = ""


async def _reported(reports: Reports) -> AsyncIterator[Batch[usage_pb.CallDurationRecord]]:
    """The operator's records as they are queued, a batch per publish batch (split at the
    server's limit), until the queue says None."""
    number = 0
    while (records := await reports.queue.get()) is not None:
        for first in range(0, len(records), MAX_BATCH):
            part = records[first : first + MAX_BATCH]
            number += 1
            request = usage_pb.SubmitCallDurationsRequest(batch_id=f"d{number}", records=part)
            yield Batch(f"d{number}", request, part)


async def report_durations(operator: Any, reports: Reports) -> None:
    """Send the operator's duration records on SubmitCallDurations, with the client library's
    resends (nothing lost or counted twice across a broken stream) and the server's real
    status when it fails."""
    stub = usage_grpc.UsageServiceStub(operator)
    try:
        async for batch, response in pipelined(
            "call durations", stub.SubmitCallDurations, _reported(reports), 4
        ):
            reports.sent += len(batch.items)
            for result in response.results:
                if result.outcome == usage_pb.CALL_DURATION_OUTCOME_ACCEPTED:
                    reports.accepted += 1
                elif result.outcome == usage_pb.CALL_DURATION_OUTCOME_DUPLICATE:
                    reports.duplicate += 1
                elif len(reports.refused) < 5:
                    reports.refused.append(f"{result.reason} ({result.field}): {result.message}")
                else:
                    reports.refused.append("")
    except ServerError as error:
        reports.error = redact(str(error))


async def _calls(
    options: Options,
    mix: calls.CallMix,
    rng: random.Random,
    stop: asyncio.Event,
    *,
    tally: Tally,
    reports: Reports | None,
) -> AsyncIterator[Batch[records_pb.PublishedCallRecord]]:
    """Batches of new calls at the rate, a batch per tick, until done or stopped. The client
    library asks for the next batch only while fewer than MAX_IN_FLIGHT are unacknowledged."""
    loop = asyncio.get_running_loop()
    tty = sys.stdout.isatty()
    every = 1.0 if tty else 10.0
    start = shown = loop.time()
    number = 0
    while not stop.is_set():
        elapsed = loop.time() - start
        if options.duration is not None and elapsed >= options.duration:
            return
        due = int(options.rate * (elapsed + TICK_S)) - tally.published
        if options.calls is not None:
            due = min(due, options.calls - tally.published)
        while due > 0 and not stop.is_set():
            count = min(due, MAX_BATCH)
            now = dt.datetime.now(dt.UTC)
            records = [
                calls.make_call(rng, mix, now, call_id=str(uuid.uuid4())) for _ in range(count)
            ]
            number += 1
            batch_id = f"sim-{number}"
            tally.pending[batch_id] = count
            request = records_pb.PublishCallRecordsRequest(batch_id=batch_id, records=records)
            if reports is not None:
                mix_off = calls.ReportMix(
                    options.missing_share,
                    options.mismatch_share,
                    options.extra_share,
                    options.unanswered_share,
                )
                reports.queue.put_nowait(calls.operator_reports(rng, records, mix.users, mix_off))
            tally.published += count
            due -= count
            yield Batch(batch_id, request, list(records))
        if options.calls is not None and tally.published >= options.calls:
            return
        if loop.time() - shown >= every:
            shown = loop.time()
            _show(tally.line(shown - start), tty)
        next_tick = start + (int((loop.time() - start) / TICK_S) + 1) * TICK_S
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, next_tick - loop.time()))


async def publish(
    options: Options,
    platform: Any,
    mix: calls.CallMix,
    rng: random.Random,
    stop: asyncio.Event,
    *,
    reports: Reports | None = None,
) -> Tally:
    """Publish calls on PublishCallRecords until done or stopped, through the client library's
    pipelined stream (a broken stream resumed, unacknowledged batches sent again, the server's
    real status); what happened. After Ctrl-C, the last acknowledgements get
    STOP_DRAIN_TIMEOUT_S."""
    tally = Tally()
    stub = records_grpc.CallRecordIngestServiceStub(platform)
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def acknowledge() -> None:
        source = _calls(options, mix, rng, stop, tally=tally, reports=reports)
        async for batch, response in pipelined(
            "call records", stub.PublishCallRecords, source, MAX_IN_FLIGHT
        ):
            _count(tally, batch, response)

    consumer = asyncio.create_task(acknowledge())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({consumer, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not consumer.done():  # stopped: the calls end at once, their acknowledgements may come
        await asyncio.wait({consumer}, timeout=STOP_DRAIN_TIMEOUT_S)
    stopped.cancel()
    if not consumer.done():
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        tally.error = tally.error or (
            f"no acknowledgement for {STOP_DRAIN_TIMEOUT_S:.0f} s; stream cancelled"
        )
    elif (error := consumer.exception()) is not None:
        tally.error = redact(str(error))
    elif tally.pending and not tally.error:
        tally.error = "the server ended the stream before acknowledging every batch"
    if sys.stdout.isatty():
        print()
    print(tally.line(loop.time() - start))
    return tally


def _summary(tally: Tally) -> int:
    """Print how publishing went; the exit status."""
    missing = tally.published - tally.acknowledged
    print(
        f"published {tally.published} calls: {tally.accepted} accepted, {tally.duplicate} "
        f"duplicate, {tally.refused} refused, {missing} not acknowledged"
    )
    for refusal in tally.refusals:
        print(f"  refused {refusal}")
    if tally.error:
        print(f"publishing stopped: {tally.error}", file=sys.stderr)
    return 0 if not tally.error and not tally.refused and not missing else 1


def _stop_on_ctrl_c(stop: asyncio.Event) -> Callable[[], None]:
    """Make the first Ctrl-C set `stop` (a clean stop) and a second one interrupt as usual;
    returns what puts the previous handler back."""
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGINT)

    def restore() -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGINT)
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def interrupted() -> None:
        stop.set()
        restore()

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGINT, interrupted)
    return restore


async def simulate(options: Options) -> int:
    """Run the simulation (see the module docstring); the exit status."""
    if problem := check_options(options):
        print(f"opconnect simulate: {problem}", file=sys.stderr)
        return 2
    options = dataclasses.replace(options, tenant=options.tenant.lower())
    started = dt.datetime.now(dt.UTC)
    seed = options.seed if options.seed is not None else random.SystemRandom().getrandbits(32)
    stop = asyncio.Event()
    channels: list[Any] = []
    restore = _stop_on_ctrl_c(stop)
    try:
        operator = await _connect(options, f"operator-{options.operator}")
        channels.append(operator)
        platform = await _connect(options, f"platform-{options.platform}")
        channels.append(platform)
        users = await setup_numbers(options, operator, platform)
        change = await emergency.change_address(
            _connection(options, f"operator-{options.operator}"), options.tenant, users[0].number
        )
        print(change.summary())
        trunk_domain = options.operator.rstrip("-")
        mix = calls.CallMix(
            operator_id=options.operator,
            tenant_id=options.tenant,
            trunks=(f"sbc1.{trunk_domain}.example", f"sbc2.{trunk_domain}.example"),
            users=users,
            poor_share=options.poor_share,
        )
        until = (
            f"{options.calls} calls"
            if options.calls is not None
            else f"{options.duration:g} s"
            if options.duration is not None
            else "Ctrl-C"
        )
        print(f"\nSee the records arrive, as operator {options.operator}:")
        print(f"  {stream_command(options, started)}\n")
        print(f"publishing {options.rate:g} calls/s until {until} (seed {seed})")
        reports = Reports() if options.report else None
        reporter = (
            asyncio.create_task(report_durations(operator, reports))
            if reports is not None
            else None
        )
        tally = await publish(options, platform, mix, random.Random(seed), stop, reports=reports)
        if reports is not None and reporter is not None:
            reports.queue.put_nowait(None)
            await asyncio.wait({reporter}, timeout=DRAIN_TIMEOUT_S)
    except SetupError as error:
        print(f"opconnect simulate: {error}", file=sys.stderr)
        return 1
    finally:
        restore()
        for channel in channels:
            await channel.close()
    status = _summary(tally)
    print(change.summary())
    if change.problem and not change.problem.startswith("skipped"):
        status = status or 1
    if reports is not None:
        refused = len(reports.refused)
        print(
            f"the operator reported {reports.sent} durations: {reports.accepted} accepted, "
            f"{reports.duplicate} duplicate, {refused} refused (with "
            f"{options.missing_share:.0%} missing, {options.mismatch_share:.0%} mismatched, "
            f"{options.extra_share:.0%} extra and {options.unanswered_share:.0%} of the unanswered "
            "on purpose; see `opconnect operator reconcile`)"
        )
        for text in reports.refused[:5]:
            print(f"  refused {text}")
        if reports.error:
            print(f"reporting stopped: {reports.error}", file=sys.stderr)
        if refused or reports.error:
            status = status or 1
    print(f"\nThe records, as operator {options.operator}:\n  {stream_command(options, started)}")
    return status
