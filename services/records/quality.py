"""Call quality classification: each audio stream and each call is GOOD, POOR or UNCLASSIFIED,
with the reasons (which metric crossed which threshold, or which metric is missing).

The defaults are the Teams Call Quality Dashboard's stream rules: a stream of more than 500
packets is POOR when any of round trip > 500 ms, packet loss rate > 0.1, jitter > 30 ms, network
MOS degradation > 1.0 or concealed-samples ratio > 0.07. A stream of at most the minimum packet
count is never POOR (too short to judge) and counts as GOOD. Thresholds are strict: a value equal
to its threshold is not a crossing. Only audio is classified.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple


class Quality(StrEnum):
    GOOD = "good"
    POOR = "poor"
    UNCLASSIFIED = "unclassified"


class Metric(StrEnum):
    PACKET_COUNT = "packet_count"
    ROUND_TRIP = "round_trip"
    PACKET_LOSS_RATE = "packet_loss_rate"
    JITTER = "jitter"
    NETWORK_MOS_DEGRADATION = "network_mos_degradation"
    CONCEALED_SAMPLES_RATIO = "concealed_samples_ratio"


@dataclass(frozen=True)
class Thresholds:
    """The configurable rules; the defaults are the Call Quality Dashboard's."""

    min_packets: int = 500
    round_trip_ms: float = 500.0
    packet_loss_rate: float = 0.1
    jitter_ms: float = 30.0
    mos_degradation: float = 1.0
    concealed_ratio: float = 0.07

    def limits(self) -> dict[Metric, float]:
        return {
            Metric.ROUND_TRIP: self.round_trip_ms,
            Metric.PACKET_LOSS_RATE: self.packet_loss_rate,
            Metric.JITTER: self.jitter_ms,
            Metric.NETWORK_MOS_DEGRADATION: self.mos_degradation,
            Metric.CONCEALED_SAMPLES_RATIO: self.concealed_ratio,
        }


class StreamMetrics(NamedTuple):
    """What the classification reads of one media stream; None is a missing metric. (Named
    tuples, as the other values made per published record: a frozen dataclass costs several
    times more to make, and publish makes a few per record.)"""

    audio: bool
    packet_count: int | None
    round_trip_ms: float | None
    packet_loss_rate: float | None
    jitter_ms: float | None
    mos_degradation: float | None
    concealed_ratio: float | None

    def value(self, metric: Metric) -> float | None:
        value: float | None = getattr(self, _FIELD_OF[metric])
        return value


# The StreamMetrics field each metric reads.
_FIELD_OF = {
    Metric.PACKET_COUNT: "packet_count",
    Metric.ROUND_TRIP: "round_trip_ms",
    Metric.PACKET_LOSS_RATE: "packet_loss_rate",
    Metric.JITTER: "jitter_ms",
    Metric.NETWORK_MOS_DEGRADATION: "mos_degradation",
    Metric.CONCEALED_SAMPLES_RATIO: "concealed_ratio",
}


class Reason(NamedTuple):
    """One metric against its threshold: crossed (POOR), or missing (observed None)."""

    metric: Metric
    observed: float | None
    threshold: float
    stream_index: int


class Verdict(NamedTuple):
    quality: Quality
    reasons: tuple[Reason, ...] = ()


GOOD = Verdict(Quality.GOOD)
UNCLASSIFIED = Verdict(Quality.UNCLASSIFIED)


def classify_stream(index: int, stream: StreamMetrics, rules: Thresholds) -> Verdict:
    return _classify(index, stream, rules.min_packets, _limits(rules))


def _classify(
    index: int, stream: StreamMetrics, min_packets: int, limits: tuple[float, ...]
) -> Verdict:
    """`classify_stream` with the thresholds read once per call (the publish hot path)."""
    if not stream.audio:
        return UNCLASSIFIED
    if stream.packet_count is None:
        reason = Reason(Metric.PACKET_COUNT, None, min_packets, index)
        return Verdict(Quality.UNCLASSIFIED, (reason,))
    if stream.packet_count <= min_packets:
        return GOOD
    values = _observed(stream)
    if None in values:
        missing = zip(_JUDGED, limits, values, strict=True)
        return Verdict(
            Quality.UNCLASSIFIED,
            tuple(Reason(m, None, limit, index) for m, limit, v in missing if v is None),
        )
    if not any(map(operator.gt, values, limits)):
        return GOOD
    observed = zip(_JUDGED, limits, values, strict=True)
    return Verdict(
        Quality.POOR,
        tuple(Reason(m, v, limit, index) for m, limit, v in observed if v > limit),
    )


# The metrics a stream is judged on, in the order its reasons list them; and a getter of their
# values from a StreamMetrics, in that order.
_JUDGED = tuple(Thresholds().limits())
_observed = operator.itemgetter(*(StreamMetrics._fields.index(_FIELD_OF[m]) for m in _JUDGED))


@functools.lru_cache(maxsize=8)  # one set of thresholds per process: made once, not per stream
def _limits(rules: Thresholds) -> tuple[float, ...]:
    """The thresholds of `_JUDGED`, in that order."""
    limits = rules.limits()
    return tuple(limits[m] for m in _JUDGED)


def classify_call(
    streams: Sequence[StreamMetrics], rules: Thresholds
) -> tuple[Verdict, list[Verdict]]:
    """The call's verdict and each stream's. A call is POOR if any audio stream is; otherwise
    UNCLASSIFIED if any audio stream is, or if it has no audio; otherwise GOOD."""
    min_packets, limits = rules.min_packets, _limits(rules)
    verdicts = [_classify(i, s, min_packets, limits) for i, s in enumerate(streams)]
    audio = [v for v, s in zip(verdicts, streams, strict=True) if s.audio]
    if audio and all(v is GOOD for v in audio):
        return GOOD, verdicts
    poor = [v for v in audio if v.quality is Quality.POOR]
    if poor:
        return Verdict(Quality.POOR, tuple(r for v in poor for r in v.reasons)), verdicts
    unclassified = [v for v in audio if v.quality is Quality.UNCLASSIFIED]
    if unclassified or not audio:
        reasons = tuple(r for v in unclassified for r in v.reasons)
        return Verdict(Quality.UNCLASSIFIED, reasons), verdicts
    return GOOD, verdicts
