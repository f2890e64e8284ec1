"""call duration keys: the keys of every stored duration record in one unpartitioned table

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29 07:00:00.000000

PostgreSQL: `call_durations` is partitioned by week on `start_time` (0008), so it cannot keep
(operator_id, record_id) and (operator_id, call_id) unique, and a look-up by either visits
every partition. `call_duration_keys` holds each record's keys, digest and start time: its
primary key and unique constraint are enforced by the database again, and ingest's duplicate
look-ups are one index probe per key. This revision fills it from every stored record (one
statement; it fails, changing nothing, if two stored records of an operator share a record_id
or a call_id, which the operator's lock has kept from happening).

SQLite: the table is made (one schema on both backends) and stays empty; `call_durations` is a
plain table there, keyed by (operator_id, record_id), with its (operator_id, call_id) index.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "call_duration_keys",
        sa.Column("operator_id", sa.String(length=63), nullable=False),
        sa.Column("record_id", sa.String(length=128), nullable=False),
        sa.Column("call_id", sa.String(length=64), nullable=False),
        sa.Column("digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("operator_id", "record_id"),
        sa.UniqueConstraint("operator_id", "call_id", name="uq_call_duration_keys_operator_call"),
    )
    op.create_index("ix_call_duration_keys_start", "call_duration_keys", ["start_time"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "INSERT INTO call_duration_keys (operator_id, record_id, call_id, digest, start_time)"
            " SELECT operator_id, record_id, call_id, digest, start_time FROM call_durations"
        )


def downgrade() -> None:
    op.drop_index("ix_call_duration_keys_start", table_name="call_duration_keys")
    op.drop_table("call_duration_keys")
