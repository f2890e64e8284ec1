"""usage by day: kept as calls arrive, filled from what is stored

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 10:20:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The usage of every call stored so far, as services/usage/usage_days.py counts it: an answered
# platform call at its answer (the operator's duration if reported, its own otherwise), an
# operator's record the platform has no answered call for at its start; whole seconds, rounded
# up.
_FILL = """
INSERT INTO usage_daily (operator_id, tenant_id, day, direction, source, calls, billed_s)
SELECT operator_id, tenant_id, day, direction, source, count(*), sum(billed)
FROM (
    SELECT p.operator_id, p.tenant_id, {answer_day} AS day, p.direction,
        CASE WHEN d.record_id IS NOT NULL THEN 'operator' ELSE 'platform' END AS source,
        CASE WHEN d.record_id IS NOT NULL THEN (d.duration_us + 999999) / 1000000
            ELSE (p.duration_ms + 999) / 1000 END AS billed
    FROM usage_platform_calls AS p
    LEFT OUTER JOIN call_durations AS d
        ON d.operator_id = p.operator_id AND d.call_id = p.call_id
    WHERE p.answer_time IS NOT NULL
    UNION ALL
    SELECT d.operator_id, d.tenant_id, {start_day}, d.direction, 'operator',
        (d.duration_us + 999999) / 1000000
    FROM call_durations AS d
    LEFT OUTER JOIN usage_platform_calls AS p
        ON p.operator_id = d.operator_id AND p.call_id = d.call_id
        AND p.answer_time IS NOT NULL
    WHERE p.call_id IS NULL
) AS calls
GROUP BY operator_id, tenant_id, day, direction, source
"""


def upgrade() -> None:
    op.create_table(
        "usage_daily",
        sa.Column("operator_id", sa.String(length=63), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("direction", sa.String(length=8), nullable=False),
        sa.Column("source", sa.String(length=8), nullable=False),
        sa.Column("calls", sa.BigInteger(), nullable=False),
        sa.Column("billed_s", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("operator_id", "tenant_id", "day", "direction", "source"),
    )
    with op.batch_alter_table("usage_daily", schema=None) as batch_op:
        batch_op.create_index("ix_usage_daily_tenant_day", ["tenant_id", "day"], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        day = "(({0}) AT TIME ZONE 'UTC')::date"
    else:  # SQLite keeps times as UTC text and a Date as YYYY-MM-DD
        day = "substr({0}, 1, 10)"
    op.execute(
        _FILL.format(answer_day=day.format("p.answer_time"), start_day=day.format("d.start_time"))
    )


def downgrade() -> None:
    with op.batch_alter_table("usage_daily", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_daily_tenant_day")
    op.drop_table("usage_daily")
