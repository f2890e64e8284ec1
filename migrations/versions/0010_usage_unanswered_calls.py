"""usage of unanswered calls: an operator's record of a call the platform has as not answered
counts nowhere

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29 07:30:00.000000

Until this revision, `usage_daily` counted an operator's record of a call the platform has as
not answered (canceled, busy, failed) at the record's start, as if the platform had no call of
it. The platform's record now decides whether a call was answered (services/usage/usage_days.py):
such a record counts nowhere. This revision takes what those records added out of
`usage_daily`, in one statement; the calls and records themselves are unchanged. Downgrading
adds it back.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# What each operator's records of calls its platform side has as not answered added to the usage
# by day (at the record's start, operator source, whole seconds rounded up), times `sign`.
_CHANGE = """
INSERT INTO usage_daily (operator_id, tenant_id, day, direction, source, calls, billed_s)
SELECT d.operator_id, d.tenant_id, {start_day}, d.direction, 'operator',
    {sign} * count(*), {sign} * sum((d.duration_us + 999999) / 1000000)
FROM call_durations AS d
JOIN usage_platform_calls AS p ON p.operator_id = d.operator_id AND p.call_id = d.call_id
WHERE p.answer_time IS NULL
GROUP BY d.operator_id, d.tenant_id, {start_day}, d.direction
ON CONFLICT (operator_id, tenant_id, day, direction, source) DO UPDATE SET
    calls = usage_daily.calls + excluded.calls,
    billed_s = usage_daily.billed_s + excluded.billed_s
"""


def _change(sign: int) -> None:
    if op.get_bind().dialect.name == "postgresql":
        start_day = "((d.start_time) AT TIME ZONE 'UTC')::date"
    else:  # SQLite keeps times as UTC text and a Date as YYYY-MM-DD
        start_day = "substr(d.start_time, 1, 10)"
    op.execute(_CHANGE.format(start_day=start_day, sign=sign))


def upgrade() -> None:
    _change(-1)


def downgrade() -> None:
    _change(1)
