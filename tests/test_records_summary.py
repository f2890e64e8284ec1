"""GetQualitySummary: figures checked against values computed here, independently, from the
records the test published (classes by construction, nearest-rank percentiles by sorting)."""

from __future__ import annotations

import datetime as dt
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc
import pytest

from opconnect.records.v1 import records_pb2 as pb
from tests.conftest import OTHER_OPERATOR, OTHER_TENANT, TENANT, RunningSystem, rich_error
from tests.records_data import INBOUND, OUTBOUND, audio, chunks, publish_records, record, stamp

START = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=2)
END = START + dt.timedelta(days=1)
TRUNKS = ("sbc1.contoso-telecom.example", "sbc2.contoso-telecom.example")


@dataclass
class Expected:
    """The figures of one group, or the audio metrics of one call."""

    calls: int = 0
    good: int = 0
    poor: int = 0
    unclassified: int = 0
    jitter: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    round_trip: list[float] = field(default_factory=list)


# Each call inside the period: (tenant, trunk, direction, class, its audio metrics).
Inside: TypeAlias = list[tuple[str, str, int, str, "Expected"]]


def nearest_rank(values: list[float], percent: int) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(percent / 100 * len(ordered)) - 1]


def dataset(
    rng: random.Random,
) -> tuple[list[pb.CallRecord], Inside]:
    """Records in and around the period, and for each one inside it: (tenant, trunk, direction,
    class, its audio metrics) to sum up independently."""
    records: list[pb.CallRecord] = []
    inside: Inside = []
    for index in range(120):
        tenant = rng.choice((TENANT, OTHER_TENANT))
        trunk = rng.choice(TRUNKS)
        direction = rng.choice((INBOUND, OUTBOUND))
        kind = rng.choice(("good", "good", "good", "poor", "unclassified", "no_audio"))
        metrics = Expected()
        streams: list[pb.MediaStream] = []
        if kind != "no_audio":
            for side in (pb.MEDIA_DIRECTION_CALLER_TO_CALLEE, pb.MEDIA_DIRECTION_CALLEE_TO_CALLER):
                jitter = rng.randint(1, 25) + rng.choice((0.0, 0.5))
                loss = rng.randint(0, 90) / 1000
                rtt = float(rng.randint(20, 400))
                if kind == "poor" and side == pb.MEDIA_DIRECTION_CALLER_TO_CALLEE:
                    jitter = rng.randint(31, 80) + 0.25
                missing_loss = (
                    kind == "unclassified" and side == pb.MEDIA_DIRECTION_CALLEE_TO_CALLER
                )
                streams.append(
                    audio(
                        side,
                        jitter_ms=jitter,
                        loss=None if missing_loss else loss,
                        round_trip_ms=rtt,
                    )
                )
                metrics.jitter.append(jitter)
                metrics.round_trip.append(rtt)
                if not missing_loss:
                    metrics.loss.append(loss)
            video = pb.MediaStream(  # not audio: never in the percentiles
                direction=pb.MEDIA_DIRECTION_CALLER_TO_CALLEE,
                media_type=pb.MEDIA_TYPE_VIDEO,
                codec="H264",
                packet_count=9000,
            )
            video.average_jitter.FromMilliseconds(999)
            streams.append(video)
        # Setup times spread over the period, with the edges: start is in, end is out.
        offset = {0: dt.timedelta(0), 1: END - START, 2: -dt.timedelta(seconds=1)}.get(
            index, dt.timedelta(seconds=rng.randint(1, 86_399))
        )
        invite = START + offset
        talk = 60.0
        message = record(
            tenant=tenant,
            direction=direction,
            caller="+442071838750" if direction == INBOUND else "+14255550100",
            callee="+14255550100" if direction == INBOUND else "+442071838750",
            trunk=trunk,
            end=invite + dt.timedelta(seconds=talk + 5),
            talk_s=talk,
            streams=streams,
        )
        records.append(message)
        if START <= invite < END:
            label = "unclassified" if kind == "no_audio" else kind
            inside.append((tenant, trunk, direction, label, metrics))
    return records, inside


def expected_groups(inside: Inside, key_of: int | None, **only: object) -> dict[str, Expected]:
    groups: dict[str, Expected] = defaultdict(Expected)
    for item in inside:
        tenant, trunk, direction, label, metrics = item
        if only.get("tenant") not in (None, tenant) or only.get("trunk") not in (None, trunk):
            continue
        if only.get("direction") not in (None, direction):
            continue
        group = groups[item[key_of] if key_of is not None else ""]  # type: ignore[index]
        group.calls += 1
        setattr(group, label, getattr(group, label) + 1)
        group.jitter += metrics.jitter
        group.loss += metrics.loss
        group.round_trip += metrics.round_trip
    return dict(groups)


def check(actual: pb.QualityGroup, expected: Expected) -> None:
    assert actual.call_count == expected.calls
    assert actual.good_call_count == expected.good
    assert actual.poor_call_count == expected.poor
    assert actual.unclassified_call_count == expected.unclassified
    classified = expected.good + expected.poor
    assert actual.poor_call_rate == pytest.approx(expected.poor / classified if classified else 0)
    for name, values, to_float in (
        ("jitter", expected.jitter, lambda d: d.ToNanoseconds() / 1e6),
        ("round_trip", expected.round_trip, lambda d: d.ToNanoseconds() / 1e6),
        ("packet_loss_rate", expected.loss, float),
    ):
        percentiles = getattr(actual, name)
        if not values:
            assert not actual.HasField(name)  # type: ignore[arg-type]
            continue
        assert percentiles.stream_count == len(values)
        for percent in (50, 90, 99):
            got = to_float(getattr(percentiles, f"p{percent}"))
            assert got == pytest.approx(nearest_rank(values, percent), abs=1e-6), (name, percent)


def summary(system: RunningSystem, **request: Any) -> list[pb.QualityGroup]:
    """Every page of a summary, following next_page_token."""
    groups: list[pb.QualityGroup] = []
    token = ""
    while True:
        response = system.records().GetQualitySummary(
            pb.GetQualitySummaryRequest(
                start_time=stamp(START), end_time=stamp(END), page_token=token, **request
            )
        )
        groups += response.groups
        token = response.next_page_token
        if not token:
            return groups


@pytest.fixture
def published_dataset(system: RunningSystem) -> Inside:
    records, inside = dataset(random.Random(7))
    for batch in chunks(records, 50):
        response = publish_records(system.ingest(), batch)
        assert response.accepted_count == len(batch), response
    # Another operator's calls in the same period never count.
    publish_records(system.ingest(), [record(end=START + dt.timedelta(hours=1))], OTHER_OPERATOR)
    return inside


def test_summary_of_all_calls(system: RunningSystem, published_dataset: Inside) -> None:
    (group,) = summary(system)
    assert group.key == ""
    check(group, expected_groups(published_dataset, None)[""])


@pytest.mark.parametrize(
    ("group_by", "key_of"), [(pb.QUALITY_GROUP_BY_TENANT, 0), (pb.QUALITY_GROUP_BY_TRUNK, 1)]
)
def test_summary_grouped_and_paged(
    system: RunningSystem,
    published_dataset: Inside,
    group_by: int,
    key_of: int,
) -> None:
    expected = expected_groups(published_dataset, key_of)
    groups = summary(system, group_by=group_by, page_size=1)  # one group a page
    assert [g.key for g in groups] == sorted(expected)
    for group in groups:
        check(group, expected[group.key])


def test_summary_filters(system: RunningSystem, published_dataset: Inside) -> None:
    for request, only in (
        ({"tenant_id": OTHER_TENANT}, {"tenant": OTHER_TENANT}),
        ({"trunk_fqdn": TRUNKS[1]}, {"trunk": TRUNKS[1]}),
        ({"direction": OUTBOUND}, {"direction": OUTBOUND}),
        ({"direction": INBOUND, "tenant_id": TENANT}, {"direction": INBOUND, "tenant": TENANT}),
    ):
        (group,) = summary(system, **request)
        check(group, expected_groups(published_dataset, None, **only)[""])


def test_summary_of_a_quiet_period_is_empty(sqlite_system: RunningSystem) -> None:
    response = sqlite_system.records().GetQualitySummary(
        pb.GetQualitySummaryRequest(
            start_time=stamp(START), end_time=stamp(END), group_by=pb.QUALITY_GROUP_BY_TENANT
        )
    )
    assert list(response.groups) == [] and response.next_page_token == ""
    response = sqlite_system.records().GetQualitySummary(
        pb.GetQualitySummaryRequest(start_time=stamp(START), end_time=stamp(END))
    )
    assert list(response.groups) == []


def test_summary_request_errors(sqlite_system: RunningSystem) -> None:
    publish_records(
        sqlite_system.ingest(),
        [
            record(end=START + dt.timedelta(hours=1)),
            record(end=START + dt.timedelta(hours=2), tenant=OTHER_TENANT),
        ],
    )
    stub = sqlite_system.records()
    base: dict[str, Any] = {"start_time": stamp(START), "end_time": stamp(END)}
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"end_time": stamp(END)}, "PERIOD_INVALID", "start_time"),
        ({"start_time": stamp(START)}, "PERIOD_INVALID", "end_time"),
        ({**base, "end_time": stamp(START)}, "PERIOD_INVALID", "end_time"),
        (
            {**base, "end_time": stamp(START + dt.timedelta(days=31, seconds=1))},
            "PERIOD_TOO_LONG",
            "end_time",
        ),
        ({**base, "group_by": 99}, "GROUP_BY_INVALID", "group_by"),
        ({**base, "tenant_id": "nope"}, "TENANT_ID_INVALID", "tenant_id"),
        ({**base, "trunk_fqdn": "not a host"}, "TRUNK_FQDN_INVALID", "trunk_fqdn"),
        ({**base, "page_size": -1}, "PAGE_SIZE_INVALID", "page_size"),
        ({**base, "page_token": "garbage"}, "PAGE_TOKEN_INVALID", "page_token"),
        ({**base, "direction": 7}, "DIRECTION_INVALID", "direction"),
    ]
    for request, reason, field_path in cases:
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetQualitySummary(pb.GetQualitySummaryRequest(**request))
        error = rich_error(caught.value)
        assert (error.code, error.reason, error.domain) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            reason,
            "records.opconnect",
        ), request
        assert field_path in error.fields
    # A page token is bound to the request that made it.
    first = stub.GetQualitySummary(
        pb.GetQualitySummaryRequest(**base, group_by=pb.QUALITY_GROUP_BY_TENANT, page_size=1)
    )
    assert first.next_page_token
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetQualitySummary(
            pb.GetQualitySummaryRequest(
                **base,
                group_by=pb.QUALITY_GROUP_BY_TRUNK,
                page_token=first.next_page_token,
            )
        )
    assert rich_error(caught.value).reason == "PAGE_TOKEN_INVALID"
