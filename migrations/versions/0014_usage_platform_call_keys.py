"""usage platform call keys: the key of every platform call kept, in one unpartitioned table

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-29 10:30:00.000000

PostgreSQL: `usage_platform_calls` is partitioned by week on `invite_time` (0008), so it cannot
keep a call's id unique, and a look-up by call id (ingest pairing each record with the
platform's call) visits every partition. `usage_platform_call_keys` holds each call's id,
operator and invite time: its primary key keeps each call once, and a look-up is one index
probe per id, then a read of the partitions of the invite times found. This revision fills it
from every stored call (one statement; a call id stored twice with two invite times, which the
feed never delivers, is kept once, with its earliest).

SQLite: the table is made (one schema on both backends) and stays empty; `usage_platform_calls`
is a plain table there.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_platform_call_keys",
        sa.Column("call_id", sa.String(length=64), nullable=False),
        sa.Column("operator_id", sa.String(length=63), nullable=False),
        sa.Column("invite_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("call_id"),
    )
    op.create_index(
        "ix_usage_platform_call_keys_invite", "usage_platform_call_keys", ["invite_time"]
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "INSERT INTO usage_platform_call_keys (call_id, operator_id, invite_time)"
            " SELECT DISTINCT ON (call_id) call_id, operator_id, invite_time"
            " FROM usage_platform_calls ORDER BY call_id, invite_time"
        )


def downgrade() -> None:
    op.drop_index("ix_usage_platform_call_keys_invite", table_name="usage_platform_call_keys")
    op.drop_table("usage_platform_call_keys")
