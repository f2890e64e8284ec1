"""consents: the relationship between a customer tenant and an operator, and its change log

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29 08:00:00.000000

Creates `consents` (one row per operator and tenant, its state) and `consent_events` (the
`consents` change log that WatchConsents follows), and the log's head. Uploading numbers now
needs an ACTIVE consent: so that nothing already provisioned breaks, every (operator, tenant)
that holds numbers gets an ACTIVE consent, created and updated at its first number's upload
time. No event is logged for them (a watcher lists first; the log starts empty).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "consents",
        sa.Column("operator_id", sa.String(length=63), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("operator_id", "tenant_id"),
    )
    op.create_table(
        "consent_events",
        sa.Column("position", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("operator_id", sa.String(length=63), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("previous_state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("position"),
    )
    with op.batch_alter_table("consent_events", schema=None) as batch_op:
        batch_op.create_index("ix_consent_events_occurred_at", ["occurred_at"], unique=False)
        batch_op.create_index(
            "ix_consent_events_operator_position", ["operator_id", "position"], unique=False
        )
    heads = sa.table(
        "change_log_heads",
        sa.column("log", sa.String),
        sa.column("position", sa.BigInteger),
        sa.column("purged_through", sa.BigInteger),
    )
    op.bulk_insert(heads, [{"log": "consents", "position": 0, "purged_through": 0}])
    op.execute(
        "INSERT INTO consents (operator_id, tenant_id, state, reason, created_at, updated_at)"
        " SELECT operator_id, tenant_id, 'active', '', MIN(created_at), MIN(created_at)"
        " FROM numbers GROUP BY operator_id, tenant_id"
    )


def downgrade() -> None:
    op.execute("DELETE FROM change_log_heads WHERE log = 'consents'")
    with op.batch_alter_table("consent_events", schema=None) as batch_op:
        batch_op.drop_index("ix_consent_events_operator_position")
        batch_op.drop_index("ix_consent_events_occurred_at")
    op.drop_table("consent_events")
    op.drop_table("consents")
