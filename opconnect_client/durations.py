"""`SubmitCallDurations` that never loses a record (on `batches.pipelined`): batches of up to
1,000 records, pipelined, resent after a break, each yielded once committed with one result
per record."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass

from opconnect.usage.v1 import usage_pb2 as pb
from opconnect.usage.v1 import usage_pb2_grpc as pb_grpc
from opconnect_client.batches import Batch, pipelined
from opconnect_client.errors import ClientError

MAX_BATCH = 1_000  # the server's limit of records per batch


@dataclass(frozen=True)
class Acknowledged:
    """A batch the server committed: its records in the order sent, and one result each."""

    batch_id: str
    records: list[pb.CallDurationRecord]
    results: list[pb.CallDurationResult]
    accepted: int
    duplicate: int
    refused: int


async def chunks(
    items: Iterable[pb.CallDurationRecord] | AsyncIterable[pb.CallDurationRecord], size: int
) -> AsyncIterator[list[pb.CallDurationRecord]]:
    """`items` in lists of `size` (the last one shorter), sync or async alike."""
    current: list[pb.CallDurationRecord] = []
    if isinstance(items, AsyncIterable):
        async for item in items:
            current.append(item)
            if len(current) == size:
                yield current
                current = []
    else:
        for item in items:
            current.append(item)
            if len(current) == size:
                yield current
                current = []
    if current:
        yield current


async def _requests(
    records: Iterable[pb.CallDurationRecord] | AsyncIterable[pb.CallDurationRecord], size: int
) -> AsyncIterator[Batch[pb.CallDurationRecord]]:
    prefix = uuid.uuid4().hex[:12]  # batch ids unique to this submission
    numbers = itertools.count(1)
    async for part in chunks(records, size):
        batch_id = f"{prefix}-{next(numbers)}"
        request = pb.SubmitCallDurationsRequest(batch_id=batch_id, records=part)
        yield Batch(batch_id, request, part)


async def submit(
    stub: pb_grpc.UsageServiceStub,
    records: Iterable[pb.CallDurationRecord] | AsyncIterable[pb.CallDurationRecord],
    batch_size: int = MAX_BATCH,
    max_unacknowledged: int = 4,
) -> AsyncGenerator[Acknowledged]:
    """Send `records` in batches of `batch_size`, at most `max_unacknowledged` batches sent and
    not yet acknowledged; yield each batch as it is acknowledged, in order (see `batches`)."""
    if not 1 <= batch_size <= MAX_BATCH:
        raise ClientError(f"batch_size must be 1 to {MAX_BATCH}")
    async for batch, response in pipelined(
        "call durations",
        stub.SubmitCallDurations,
        _requests(records, batch_size),
        max_unacknowledged,
    ):
        yield Acknowledged(
            batch.id,
            batch.items,
            list(response.results),
            response.accepted_count,
            response.duplicate_count,
            response.refused_count,
        )
