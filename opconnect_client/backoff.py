"""How long to wait before calling again: exponential backoff with full jitter, and the
server's RetryInfo when it gives one (a limit knows best when it frees up)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from opconnect_client.errors import ServerError


@dataclass
class Backoff:
    """Delays of `initial_s`, doubling up to `maximum_s`, each drawn uniformly below its cap
    ("full jitter", so that many clients cut at once do not come back at once); `reset()` after
    a call that went well."""

    initial_s: float = 0.5
    maximum_s: float = 30.0
    attempt: int = 0

    def delay(self, error: ServerError | None = None) -> float:
        """The wait before the next attempt after `error`: the RetryInfo delay when the server
        sent one (with up to 20% added, so that clients told the same delay spread), else the
        next jittered exponential delay."""
        cap = min(self.maximum_s, self.initial_s * (2**self.attempt))
        self.attempt += 1
        if error is not None and error.retry_after_s is not None:
            return error.retry_after_s * (1 + 0.2 * random.random())
        return random.uniform(self.initial_s / 2, cap)

    def reset(self) -> None:
        self.attempt = 0
