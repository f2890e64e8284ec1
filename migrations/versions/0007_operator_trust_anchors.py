"""operator trust anchors: which CAs or pinned certificates may speak for each operator

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 22:40:00.000000

Operators registered before this revision have no anchor, and are refused (UNAUTHENTICATED,
NO_TRUST_ANCHOR) until one is registered: `opconnect operators trust ID --ca FILE` (the CA that
issues its certificates) or `--pin-cert FILE` (its certificate). The development PKI registers
its operator with the development operator CA at start.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "operator_anchors",
        sa.Column("operator_id", sa.String(length=63), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("key_sha256", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=1024), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["operator_id"], ["operators.operator_id"]),
        sa.PrimaryKeyConstraint("operator_id", "fingerprint"),
    )


def downgrade() -> None:
    op.drop_table("operator_anchors")
