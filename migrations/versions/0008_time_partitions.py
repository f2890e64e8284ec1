"""time partitions: the high-volume tables become RANGE partitioned tables on PostgreSQL

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29 04:00:00.000000

PostgreSQL: call_records and call_media_streams (by publish time, days), number_events (by
occurred_at, days), audit_events (by at, weeks), call_durations (by start_time, weeks) and
usage_platform_calls (by invite_time, weeks) are each rebuilt as a partitioned table with every
row kept: the new table is created, partitions cover the existing rows' periods through the
current one and the next ones (as plumbing/partitions.py makes them: same names, same bounds),
the rows are copied, the old table dropped and the new one renamed, then its primary key (now
with the partition key) and indexes are made; audit_events keeps its id sequence. One
transaction: the services are stopped (or wait at the migration lock) while it runs, and it
copies every row once.

Uniqueness that a partitioned table cannot enforce without the partition key (call_records'
call_id, call_durations' (operator_id, call_id)) becomes a plain index: the writers' locks keep
it (services/records/storage.py `publish`, services/usage/tables.py `lock_operators`).

SQLite keeps plain tables: the same two unique constraints become indexes, and
call_media_streams gets its record's publish time.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DAY, WEEK = 1, 7  # a period, in days
AHEAD = {DAY: 7, WEEK: 4}  # periods made after the current one (plumbing/partitions.py AHEAD)

# table: (partition key, period, primary key, {index: columns}); in the order rebuilt
# (call_media_streams takes its publish times from call_records, so comes first).
TABLES: dict[str, tuple[str, int, tuple[str, ...], dict[str, tuple[str, ...]]]] = {
    "call_media_streams": (
        "publish_time",
        DAY,
        ("position", "stream_index", "publish_time"),
        {"ix_call_media_streams_operator_invite": ("operator_id", "invite_time")},
    ),
    "call_records": (
        "publish_time",
        DAY,
        ("position", "publish_time"),
        {
            "ix_call_records_operator_invite": ("operator_id", "invite_time"),
            "ix_call_records_operator_position": ("operator_id", "position"),
            "ix_call_records_publish_time": ("publish_time",),
            "ix_call_records_call_id": ("call_id",),
        },
    ),
    "number_events": (
        "occurred_at",
        DAY,
        ("position", "occurred_at"),
        {
            "ix_number_events_operator_position": ("operator_id", "position"),
            "ix_number_events_occurred_at": ("occurred_at",),
        },
    ),
    "audit_events": (
        "at",
        WEEK,
        ("id", "at"),
        {
            "ix_audit_events_principal_at": ("principal", "at"),
            "ix_audit_events_at": ("at",),
        },
    ),
    "call_durations": (
        "start_time",
        WEEK,
        ("operator_id", "record_id", "start_time"),
        {
            "ix_call_durations_operator_call": ("operator_id", "call_id"),
            "ix_call_durations_operator_start": ("operator_id", "start_time"),
            "ix_call_durations_tenant_start": ("tenant_id", "start_time"),
        },
    ),
    "usage_platform_calls": (
        "invite_time",
        WEEK,
        ("call_id", "invite_time"),
        {
            "ix_usage_platform_calls_operator_answer": ("operator_id", "answer_time"),
            "ix_usage_platform_calls_tenant_answer": ("tenant_id", "answer_time"),
        },
    ),
}


def period_start(at: dt.datetime, days: int) -> dt.datetime:
    day = at.astimezone(dt.UTC).date()
    if days == WEEK:
        day -= dt.timedelta(days=day.weekday())
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


def _starts(oldest: dt.datetime | None, newest: dt.datetime | None, days: int) -> list[dt.datetime]:
    """The periods from the oldest row's (or now's) through the next AHEAD[days] after now (or
    the newest row's, if later: every row has its partition)."""
    now = dt.datetime.now(dt.UTC)
    first = period_start(min(oldest, now) if oldest is not None else now, days)
    last = period_start(now, days) + dt.timedelta(days=days * AHEAD[days])
    if newest is not None:
        last = max(last, period_start(newest, days))
    starts = [first]
    while starts[-1] < last:
        starts.append(starts[-1] + dt.timedelta(days=days))
    return starts


def _rebuild(table: str) -> None:
    column, days, key, indexes = TABLES[table]
    bind = op.get_bind()
    new = f"{table}_partitioned"
    added = ""
    if table == "call_media_streams":  # its record's publish time, new
        added = ", publish_time TIMESTAMP WITH TIME ZONE NOT NULL"
    op.execute(
        f"CREATE TABLE {new} (LIKE {table} INCLUDING DEFAULTS{added}) PARTITION BY RANGE ({column})"
    )
    if table == "call_media_streams":
        source, column = "call_records", "publish_time"
    else:
        source = table
    oldest, newest = bind.execute(
        sa.text(f"SELECT min({column}), max({column}) FROM {source}")  # noqa: S608
    ).one()
    for start in _starts(oldest, newest, days):
        end = start + dt.timedelta(days=days)
        op.execute(
            f"CREATE TABLE {table}_p{start:%Y%m%d} PARTITION OF {new}"
            f" FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
        )
    names = [c["name"] for c in sa.inspect(bind).get_columns(table)]
    listed = ", ".join(names)
    if table == "call_media_streams":
        chosen = ", ".join(f"m.{name}" for name in names)
        op.execute(
            f"INSERT INTO {new} ({listed}, publish_time) SELECT {chosen}, r.publish_time"  # noqa: S608
            f" FROM {table} m JOIN call_records r ON r.position = m.position"
        )
    else:
        op.execute(f"INSERT INTO {new} ({listed}) SELECT {listed} FROM {table}")  # noqa: S608
    before = bind.scalar(sa.text(f"SELECT count(*) FROM {table}"))  # noqa: S608
    after = bind.scalar(sa.text(f"SELECT count(*) FROM {new}"))  # noqa: S608
    if before != after:
        raise RuntimeError(f"{table}: {before} rows, {after} copied; nothing was changed")
    sequence = None
    if table == "audit_events":
        sequence = bind.scalar(sa.text("SELECT pg_get_serial_sequence('audit_events', 'id')"))
        op.execute(f"ALTER SEQUENCE {sequence} OWNED BY NONE")
    op.execute(f"DROP TABLE {table}")
    op.execute(f"ALTER TABLE {new} RENAME TO {table}")
    op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {table}_pkey PRIMARY KEY ({', '.join(key)})")
    for name, columns in indexes.items():
        op.execute(f"CREATE INDEX {name} ON {table} ({', '.join(columns)})")
    if sequence is not None:
        op.execute(f"ALTER SEQUENCE {sequence} OWNED BY {table}.id")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in TABLES:
            _rebuild(table)
        return
    # SQLite: plain tables; the unique constraints become indexes, as the models declare.
    names = {"uq": "uq_%(table_name)s_%(column_0_name)s"}  # names the unnamed one
    with op.batch_alter_table("call_records", naming_convention=names) as batch_op:
        batch_op.drop_constraint("uq_call_records_call_id", type_="unique")
        batch_op.create_index("ix_call_records_call_id", ["call_id"], unique=False)
    with op.batch_alter_table("call_durations") as batch_op:
        batch_op.drop_constraint("uq_call_durations_operator_call", type_="unique")
        batch_op.create_index(
            "ix_call_durations_operator_call", ["operator_id", "call_id"], unique=False
        )
    with op.batch_alter_table("call_media_streams") as batch_op:
        batch_op.add_column(sa.Column("publish_time", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        "UPDATE call_media_streams SET publish_time = (SELECT r.publish_time FROM call_records r"
        " WHERE r.position = call_media_streams.position)"
    )
    with op.batch_alter_table("call_media_streams") as batch_op:
        batch_op.alter_column(
            "publish_time", existing_type=sa.DateTime(timezone=True), nullable=False
        )


# What 0007 had: each table's primary key, unique constraints and indexes.
BEFORE: dict[
    str, tuple[tuple[str, ...], dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]
] = {
    "call_media_streams": (
        ("position", "stream_index"),
        {},
        {"ix_call_media_streams_operator_invite": ("operator_id", "invite_time")},
    ),
    "call_records": (
        ("position",),
        {"call_records_call_id_key": ("call_id",)},
        {
            "ix_call_records_operator_invite": ("operator_id", "invite_time"),
            "ix_call_records_operator_position": ("operator_id", "position"),
            "ix_call_records_publish_time": ("publish_time",),
        },
    ),
    "number_events": (
        ("position",),
        {},
        {
            "ix_number_events_operator_position": ("operator_id", "position"),
            "ix_number_events_occurred_at": ("occurred_at",),
        },
    ),
    "audit_events": (
        ("id",),
        {},
        {
            "ix_audit_events_principal_at": ("principal", "at"),
            "ix_audit_events_at": ("at",),
        },
    ),
    "call_durations": (
        ("operator_id", "record_id"),
        {"uq_call_durations_operator_call": ("operator_id", "call_id")},
        {
            "ix_call_durations_operator_start": ("operator_id", "start_time"),
            "ix_call_durations_tenant_start": ("tenant_id", "start_time"),
        },
    ),
    "usage_platform_calls": (
        ("call_id",),
        {},
        {
            "ix_usage_platform_calls_operator_answer": ("operator_id", "answer_time"),
            "ix_usage_platform_calls_tenant_answer": ("tenant_id", "answer_time"),
        },
    ),
}


def _unpartition(table: str) -> None:
    """A partitioned table back to a plain one, every row kept."""
    key, unique, indexes = BEFORE[table]
    bind = op.get_bind()
    plain = f"{table}_plain"
    op.execute(f"CREATE TABLE {plain} (LIKE {table} INCLUDING DEFAULTS)")
    op.execute(f"INSERT INTO {plain} SELECT * FROM {table}")  # noqa: S608
    if table == "call_media_streams":
        op.execute(f"ALTER TABLE {plain} DROP COLUMN publish_time")
    sequence = None
    if table == "audit_events":
        sequence = bind.scalar(sa.text("SELECT pg_get_serial_sequence('audit_events', 'id')"))
        op.execute(f"ALTER SEQUENCE {sequence} OWNED BY NONE")
    op.execute(f"DROP TABLE {table}")  # and its partitions
    op.execute(f"ALTER TABLE {plain} RENAME TO {table}")
    op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {table}_pkey PRIMARY KEY ({', '.join(key)})")
    for name, columns in unique.items():
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} UNIQUE ({', '.join(columns)})")
    for name, columns in indexes.items():
        op.execute(f"CREATE INDEX {name} ON {table} ({', '.join(columns)})")
    if sequence is not None:
        op.execute(f"ALTER SEQUENCE {sequence} OWNED BY {table}.id")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in BEFORE:
            _unpartition(table)
        return
    with op.batch_alter_table("call_media_streams") as batch_op:
        batch_op.drop_column("publish_time")
    with op.batch_alter_table("call_durations") as batch_op:
        batch_op.drop_index("ix_call_durations_operator_call")
        batch_op.create_unique_constraint(
            "uq_call_durations_operator_call", ["operator_id", "call_id"]
        )
    with op.batch_alter_table("call_records") as batch_op:
        batch_op.drop_index("ix_call_records_call_id")
        batch_op.create_unique_constraint("uq_call_records_call_id", ["call_id"])
