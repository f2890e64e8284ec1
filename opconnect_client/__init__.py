"""opconnect's client library for operators: every operator RPC, async and typed, with the
hard parts done (resumable streams with checkpoints, durations never lost nor counted twice,
backoff honouring RetryInfo, the server's real status). It needs only grpcio, protobuf,
googleapis-common-protos, cryptography and the generated contract (`opconnect`); it imports
nothing of the server."""

from opconnect_client.checkpoints import (
    Checkpoint,
    FileCheckpoint,
    MemoryCheckpoint,
    SqliteCheckpoint,
)
from opconnect_client.client import EPOCH, Client, timestamp
from opconnect_client.connection import Connection
from opconnect_client.durations import Acknowledged
from opconnect_client.errors import ClientError, ServerError
from opconnect_client.streams import Batch

__all__ = [
    "EPOCH",
    "Acknowledged",
    "Batch",
    "Checkpoint",
    "Client",
    "ClientError",
    "Connection",
    "FileCheckpoint",
    "MemoryCheckpoint",
    "ServerError",
    "SqliteCheckpoint",
    "timestamp",
]
