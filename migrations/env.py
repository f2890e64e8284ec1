"""Alembic environment: one schema for every service (the embedded default keeps them in one
database). Run by `Database.migrate()` at start, or by hand with `alembic upgrade head`."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection, create_engine, text

import gateway.registry
import plumbing.audit
import plumbing.changelog
import services.numbers.storage
import services.records.storage
import services.usage.tables
from plumbing.db import Base
from plumbing.partitions import include_name

target_metadata = Base.metadata
LOCK_ID = 0x6F70636F  # "opco": one migrator at a time across replicas on PostgreSQL

del gateway, plumbing, services  # imported for their tables only


def run(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": LOCK_ID})
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        include_name=include_name,  # the time partitions are no model's
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    url = os.environ.get("OPCONNECT_DATABASE_URL") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    engine = create_engine(url or "sqlite:///var/opconnect.db")
    with engine.begin() as conn:
        run(conn)
