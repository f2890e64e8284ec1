"""Several replicas on one PostgreSQL database: a change made through one reaches streams and
reads on another (LISTEN/NOTIFY wakes, the tables are the log); and the read cache is exact."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest
import sqlalchemy as sa

from opconnect.numbers.v1 import numbers_pb2 as pb
from opconnect.numbers.v1.numbers_pb2_grpc import NumberServiceStub
from opconnect.type.v1 import assignment_state_pb2 as state_pb
from plumbing.cache import MISSING, ReadCache
from plumbing.changelog import ANY_KEY
from tests.conftest import (
    NO_POSTGRES,
    POSTGRES_URL,
    TENANT,
    Pki,
    RunningSystem,
    Watcher,
    migrated_postgres,
    settings_for,
    start_system,
)
from tests.helpers import assign, eventually, sample, scrape, start_two, upload


def test_the_cache_drops_a_read_that_raced_with_a_change() -> None:
    cache: ReadCache[str] = ReadCache(10)
    generation = cache.generation("op")
    cache.invalidate(["op"])  # a change commits while the read is in flight
    cache.fill("op", "k", "stale", generation)
    assert cache.get("op", "k") is MISSING
    cache.fill("op", "k", "fresh", cache.generation("op"))
    assert cache.get("op", "k") == "fresh"
    cache.invalidate(["someone-else"])
    assert cache.get("op", "k") == "fresh"
    cache.invalidate([ANY_KEY])
    assert cache.get("op", "k") is MISSING


def test_the_cache_is_bounded_and_bypassed_when_unusable() -> None:
    usable = [True]
    cache: ReadCache[int] = ReadCache(3, lambda: usable[0])
    for i in range(5):
        cache.fill("op", i, i, cache.generation("op"))
    assert [cache.get("op", i) for i in range(5)] == [MISSING, MISSING, 2, 3, 4]
    usable[0] = False
    assert cache.get("op", 4) is MISSING
    cache.fill("op", 9, 9, cache.generation("op"))
    usable[0] = True
    assert cache.get("op", 9) is MISSING


def test_get_number_sees_every_change_at_once_on_its_replica(sqlite_system: RunningSystem) -> None:
    numbers = sqlite_system.numbers()
    upload(sqlite_system, "+14255550100")
    request = pb.GetNumberRequest(phone_number="+14255550100")
    assert numbers.GetNumber(request).number.state == state_pb.ASSIGNMENT_STATE_UNASSIGNED
    assign(sqlite_system, "+14255550100")
    assert numbers.GetNumber(request).number.state == state_pb.ASSIGNMENT_STATE_ASSIGNED


@pytest.fixture
def replicas(session_pki: Pki, tmp_path: Path) -> Iterator[tuple[RunningSystem, RunningSystem]]:
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    first, second = start_two(session_pki, tmp_path, migrated_postgres(POSTGRES_URL))
    yield first, second
    first.stop()
    second.stop()


def test_a_change_through_one_replica_reaches_a_watcher_on_another(
    replicas: tuple[RunningSystem, RunningSystem],
) -> None:
    first, second = replicas
    upload(first, "+14255550100")
    watcher = Watcher(second.numbers())
    watcher.next()  # open, from now
    assign(first, "+14255550100")
    events = watcher.events(1)
    watcher.cancel()
    assert [(e.phone_number, e.type) for e in events] == [
        ("+14255550100", pb.ASSIGNMENT_EVENT_TYPE_ASSIGNED)
    ]


def test_a_cached_read_on_one_replica_follows_changes_made_through_another(
    replicas: tuple[RunningSystem, RunningSystem],
) -> None:
    first, second = replicas
    upload(first, "+14255550100")
    request = pb.GetNumberRequest(phone_number="+14255550100")
    reader = second.numbers()
    assert reader.GetNumber(request).number.state == state_pb.ASSIGNMENT_STATE_UNASSIGNED
    assign(first, "+14255550100")
    eventually(lambda: reader.GetNumber(request).number.state == state_pb.ASSIGNMENT_STATE_ASSIGNED)
    first.admin().UnassignNumber(
        pb.UnassignNumberRequest(phone_number="+14255550100", tenant_id=TENANT)
    )
    first.numbers().ReleaseNumbers(pb.ReleaseNumbersRequest(phone_numbers=["+14255550100"]))
    eventually(lambda: _absent(reader, request))


def _absent(reader: NumberServiceStub, request: pb.GetNumberRequest) -> bool:
    try:
        reader.GetNumber(request)
    except grpc.RpcError as error:
        return cast(bool, error.code() == grpc.StatusCode.NOT_FOUND)
    return False


def test_pool_sizes_come_from_settings_and_the_listener_state_is_exported(
    session_pki: Pki, tmp_path: Path
) -> None:
    """A process's pool is `db_pool_size` + `db_max_overflow` connections; its LISTEN
    connection, when lost, is counted and opened again, and wakes its streams again."""
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    url = migrated_postgres(POSTGRES_URL)
    settings = settings_for(
        tmp_path,
        session_pki.paths,
        url,
        db_pool_size=3,
        db_max_overflow=1,
        metrics_listen="127.0.0.1:0",
    )
    running = start_system(settings, session_pki)
    try:
        listener = running.runtime.listener
        assert listener is not None
        running.call(listener.ready.wait(), timeout=10)
        assert running.runtime.db.engine.pool.size() == 3  # type: ignore[attr-defined]
        got = scrape(running)
        assert sample(got, "opconnect_db_pool_max_connections") == 4
        assert sample(got, "opconnect_changelog_listener_connected") == 1
        assert sample(got, "opconnect_changelog_listener_reconnects_total") == 0
        lost = listener.backend_pid
        with sa.create_engine(POSTGRES_URL).connect() as admin:
            admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": lost})
        eventually(lambda: listener.ready.is_set() and listener.backend_pid != lost)
        got = scrape(running)
        assert sample(got, "opconnect_changelog_listener_reconnects_total") == 1
        assert sample(got, "opconnect_changelog_listener_connected") == 1
    finally:
        running.stop()
