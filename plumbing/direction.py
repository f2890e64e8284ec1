"""A call's direction, shared by the services as the contract shares
`opconnect.type.v1.CallDirection`: the domain enum and its protobuf mapping, in one place."""

from __future__ import annotations

from enum import StrEnum

from opconnect.type.v1 import call_direction_pb2 as direction_pb


class Direction(StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


DIRECTION_IN: dict[direction_pb.CallDirection.ValueType, Direction] = {
    direction_pb.CALL_DIRECTION_INBOUND: Direction.INBOUND,
    direction_pb.CALL_DIRECTION_OUTBOUND: Direction.OUTBOUND,
}
DIRECTION_OUT = {v: k for k, v in DIRECTION_IN.items()}
