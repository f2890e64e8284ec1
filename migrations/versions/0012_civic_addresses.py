"""civic addresses, the number's new fields, and the emergency location in assignment events

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-29 10:30:00.000000

Creates `civic_addresses` (an operator's addresses of its customers' tenants, AIP-155 request
ids unique per operator) and `civic_address_locations` (the places inside each). `numbers` gets
the fields an upload now carries (calling profile, civic address and location, whether the
customer may set the address, ISO country, ticket id) and the number's emergency location as it
is now; `number_events` the emergency location as it was at each change (PostgreSQL: on the
partitioned parent, so every partition has it). Existing numbers keep working with none of them
(empty: no address; a USER number uploaded before keeps its place without one), existing events
carry no emergency location.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TEXT = (
    ("house_number", 10),
    ("house_number_suffix", 10),
    ("pre_directional", 10),
    ("street_name", 64),
    ("street_suffix", 10),
    ("post_directional", 10),
    ("city", 64),
    ("city_alias", 64),
    ("state_or_province", 64),
    ("postal_code", 10),
    ("company_name", 64),
    ("company_tax_id", 32),
    ("description", 256),
)
NUMBER_COLUMNS = (
    ("calling_profile_id", sa.String(length=36), sa.text("''")),
    ("civic_address_id", sa.String(length=36), sa.text("''")),
    ("location_id", sa.String(length=36), sa.text("''")),
    ("allow_tenant_address_update", sa.Boolean(), sa.false()),
    ("iso_country_code", sa.String(length=2), sa.text("''")),
    ("ticket_id", sa.String(length=256), sa.text("''")),
    ("emergency_location", sa.Text(), sa.text("''")),
)


def upgrade() -> None:
    op.create_table(
        "civic_addresses",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("operator_id", sa.String(length=63), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("country_code", sa.String(length=2), nullable=False),
        *(sa.Column(name, sa.String(length=size), nullable=False) for name, size in TEXT),
        sa.Column("latitude", sa.Float(), nullable=True),
        sa.Column("longitude", sa.Float(), nullable=True),
        sa.Column("created_by", sa.String(length=16), nullable=False),
        sa.Column("request_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("operator_id", "request_id", name="uq_civic_addresses_request"),
    )
    op.create_index(
        "ix_civic_addresses_operator_tenant_id",
        "civic_addresses",
        ["operator_id", "tenant_id", "id"],
        unique=False,
    )
    op.create_table(
        "civic_address_locations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("civic_address_id", sa.String(length=36), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("description", sa.String(length=64), nullable=False),
        sa.Column("elin", sa.String(length=20), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_civic_address_locations_address",
        "civic_address_locations",
        ["civic_address_id", "ordinal"],
        unique=False,
    )
    # Columns with a server default, so that the rows already stored take it (and keep it:
    # the ORM always writes its own value).
    with op.batch_alter_table("numbers", schema=None) as batch_op:
        for name, kind, default in NUMBER_COLUMNS:
            batch_op.add_column(sa.Column(name, kind, nullable=False, server_default=default))
        batch_op.create_index(
            "ix_numbers_operator_address", ["operator_id", "civic_address_id"], unique=False
        )
    op.add_column(
        "number_events",
        sa.Column("emergency_location", sa.Text(), nullable=False, server_default=sa.text("''")),
    )


def downgrade() -> None:
    op.drop_column("number_events", "emergency_location")
    with op.batch_alter_table("numbers", schema=None) as batch_op:
        batch_op.drop_index("ix_numbers_operator_address")
        for name, _, _ in reversed(NUMBER_COLUMNS):
            batch_op.drop_column(name)
    op.drop_index("ix_civic_address_locations_address", table_name="civic_address_locations")
    op.drop_table("civic_address_locations")
    op.drop_index("ix_civic_addresses_operator_tenant_id", table_name="civic_addresses")
    op.drop_table("civic_addresses")
