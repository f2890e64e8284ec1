"""call record keys: the key of every published record in one unpartitioned table

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-29 10:00:00.000000

PostgreSQL: `call_records` is partitioned by day on `publish_time` (0008), so it cannot keep
`call_id` unique, and publish's duplicate look-up by call id visits every partition while the
publish holds the `records` log's lock. `call_record_keys` holds each record's call id, digest
and publish time: its primary key is enforced by the database again, and the look-up is one
index probe per call id, made before the lock (services/records/storage.py `publish_many`).
This revision fills it from every stored record (one statement; it fails, changing nothing, if
two stored records share a call id, which the log's lock has kept from happening).

SQLite: the table is made (one schema on both backends) and stays empty; `call_records` is a
plain table there, whose `call_id` index answers the look-up under the one writer's lock.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "call_record_keys",
        sa.Column("call_id", sa.String(length=64), nullable=False),
        sa.Column("digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("publish_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("call_id"),
    )
    op.create_index("ix_call_record_keys_publish_time", "call_record_keys", ["publish_time"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "INSERT INTO call_record_keys (call_id, digest, publish_time)"
            " SELECT call_id, digest, publish_time FROM call_records"
        )


def downgrade() -> None:
    op.drop_index("ix_call_record_keys_publish_time", table_name="call_record_keys")
    op.drop_table("call_record_keys")
