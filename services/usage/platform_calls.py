"""The platform's side of every call, as the records feed delivers it (`feed.py`), kept with the
feed's cursor, and forgotten after the retention.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select
from sqlalchemy.orm import Session

from plumbing.db import dialect_insert
from services.usage.rules import PlatformCall
from services.usage.tables import CHUNK, CURSORS, PLATFORM_CALLS, lock_operators
from services.usage.usage_days import count_platform


def feed_cursor(session: Session, feed: str) -> str:
    """The saved cursor of a feed; empty when it was never followed."""
    return session.scalar(select(CURSORS.c.cursor).where(CURSORS.c.feed == feed)) or ""


def store_platform_calls(
    session: Session, feed: str, calls: Sequence[PlatformCall], cursor: str
) -> int:
    """Keep the calls (each once: a call delivered again is ignored) and the feed's cursor, in
    one transaction, so a restart resumes exactly after what was kept; the usage by day counts
    the new ones. Returns how many were new."""
    lock_operators(session, [c.operator_id for c in calls])
    insert = dialect_insert(session)
    new: set[str] = set()
    for first in range(0, len(calls), CHUNK):
        rows = [
            {
                "call_id": c.call_id,
                "operator_id": c.operator_id,
                "tenant_id": c.tenant_id,
                "direction": c.direction,
                "invite_time": c.invite_time,
                "answer_time": c.answer_time,
                "duration_ms": c.duration_ms,
            }
            for c in calls[first : first + CHUNK]
        ]
        statement = (
            insert(PLATFORM_CALLS)
            .values(rows)
            .on_conflict_do_nothing()  # a call delivered again: its key (call_id, invite_time)
            .returning(PLATFORM_CALLS.c.call_id)
        )
        new.update(session.scalars(statement))
    first_of = {c.call_id: c for c in reversed(calls)}  # a call twice in `calls`: kept once
    count_platform(session, [first_of[call_id] for call_id in new])
    session.execute(
        insert(CURSORS)
        .values(feed=feed, cursor=cursor)
        .on_conflict_do_update(index_elements=["feed"], set_={"cursor": cursor})
    )
    return len(new)


def purge_platform_calls(session: Session, older_than: dt.datetime) -> int:
    """Forget calls set up before the retention."""
    result = session.execute(
        delete(PLATFORM_CALLS).where(PLATFORM_CALLS.c.invite_time < older_than)
    )
    return cast(CursorResult[Any], result).rowcount
