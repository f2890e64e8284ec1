"""Cursors and page tokens are authenticated and encrypted (plumbing/tokens.py): a client can
neither read one (no log position) nor make or change one; anything but a token this deployment
sealed for this purpose answers exactly as a malformed token does; keys come from a key file
made on first run (0600) or the settings, and rotate."""

from __future__ import annotations

import base64
import datetime as dt
import os
import stat
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from app.cli import main
from opconnect.numbers.v1 import numbers_pb2 as pb
from opconnect.records.v1 import records_pb2 as rpb
from plumbing import tokens
from plumbing.changelog import decode_cursor, encode_cursor
from plumbing.config import Settings, load_settings
from plumbing.errors import ApiError, Kind
from services.usage import feed
from services.usage import platform_calls as usage_platform_calls
from services.usage import tables as usage_tables
from tests.conftest import (
    OPERATOR,
    Pki,
    RichError,
    RunningSystem,
    Watcher,
    rich_error,
    settings_for,
    start_system,
)
from tests.helpers import eventually, feed_system, kept, start_follower, upload
from tests.records_data import publish_records, record, stamp

NUMBERS = "+14255550100", "+14255550101", "+14255550102"
LIST_FILTERS = f"{OPERATOR}||"  # what a ListNumbers page token of no filters is bound to


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def flipped(token: str, at: int) -> str:
    raw = bytearray(unb64(token))
    raw[at] ^= 1
    return b64(bytes(raw))


def v1_token(purpose: str, body: bytes) -> str:
    """A token made the way version 1 made them (checksummed, not keyed): anyone could."""
    raw = bytes([1]) + purpose.encode() + b"\0" + body
    return b64(raw + zlib.crc32(raw).to_bytes(4, "big"))


def v1_page_token(purpose: str, request: str, after: list[str]) -> str:
    binding = zlib.crc32(request.encode()).to_bytes(4, "big")
    return v1_token(purpose, binding + "\x1f".join(after).encode())


# --- sealing and opening -----------------------------------------------------------------------


def test_a_token_opens_with_its_purpose_and_hides_its_body() -> None:
    ring = tokens.Keyring.generate()
    body = struct.pack(">Q", 42)
    first, second = ring.seal("cursor:numbers", body), ring.seal("cursor:numbers", body)
    assert first != second  # a random nonce each: equal positions do not show
    for token in (first, second):
        raw = unb64(token)
        assert body not in raw and b"cursor" not in raw
        assert raw[0] == tokens.VERSION and raw[1:5].hex() == ring.ids[0]
        assert ring.unseal(token, "cursor:numbers") == body
        assert ring.unseal(token, "cursor:records") is None
        assert ring.unseal(token, "cursor:numbers", request="") is None  # not a page token
    page = ring.seal("numbers.list", b"key", request="op||")
    assert ring.unseal(page, "numbers.list", request="op||") == b"key"
    assert ring.unseal(page, "numbers.list", request="op||ASSIGNED") is None
    assert ring.unseal(page, "numbers.list") is None


def nonce(token: str) -> bytes:
    return unb64(token)[5:17]


def test_no_nonce_is_sealed_twice_across_draws_and_threads() -> None:
    """The nonces come from the system a draw at a time (`_Nonces`): over several draws and
    four threads sealing at once, every token's nonce is new."""
    ring = tokens.Keyring.generate()
    each = 3 * tokens._Nonces.COUNT // 2
    sealed: list[list[str]] = [[] for _ in range(4)]

    def seal(out: list[str]) -> None:
        out.extend(ring.seal("cursor:numbers", b"12345678") for _ in range(each))

    threads = [threading.Thread(target=seal, args=(out,)) for out in sealed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    nonces = [nonce(token) for out in sealed for token in out]
    assert len(nonces) == 4 * each and len(set(nonces)) == len(nonces)
    assert all(len(n) == 12 for n in nonces)
    assert all(ring.unseal(token, "cursor:numbers") == b"12345678" for token in sealed[0])


def test_a_forked_child_never_seals_with_its_parents_nonces() -> None:
    """A child forked mid-draw draws its own: had it kept its parent's, the two would seal
    the same nonces next, and AES-GCM under one key must never see a nonce twice."""
    ring = tokens.Keyring.generate()
    before = {nonce(ring.seal("cursor:numbers", b"x")) for _ in range(10)}
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        os.close(read)
        os.write(write, b"".join(nonce(ring.seal("cursor:numbers", b"x")) for _ in range(100)))
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        raw = pipe.read()
    os.waitpid(child, 0)
    theirs = {raw[at : at + 12] for at in range(0, len(raw), 12)}
    ours = {nonce(ring.seal("cursor:numbers", b"x")) for _ in range(100)}
    assert len(theirs) == 100 and len(ours) == 100
    assert not theirs & ours and not theirs & before


def test_every_flipped_bit_and_every_truncation_is_refused() -> None:
    ring = tokens.Keyring.generate()
    token = ring.seal("cursor:numbers", struct.pack(">Q", 7))
    raw = unb64(token)
    for bit in range(len(raw) * 8):
        changed = bytearray(raw)
        changed[bit // 8] ^= 1 << (bit % 8)
        assert ring.unseal(b64(bytes(changed)), "cursor:numbers") is None, bit
    for size in range(len(token)):
        assert ring.unseal(token[:size], "cursor:numbers") is None, size
    assert ring.unseal(token + "A", "cursor:numbers") is None


def test_another_deployments_token_is_refused() -> None:
    ours, theirs = tokens.Keyring.generate(), tokens.Keyring.generate()
    token = theirs.seal("cursor:numbers", struct.pack(">Q", 7))
    assert ours.unseal(token, "cursor:numbers") is None
    # Even with its key id written over with ours: the tag does not verify.
    raw = unb64(token)
    forged = b64(raw[:1] + bytes.fromhex(ours.ids[0]) + raw[5:])
    assert ours.unseal(forged, "cursor:numbers") is None


def test_a_rotated_out_key_still_opens_while_listed() -> None:
    old, new = tokens.new_key(), tokens.new_key()
    before = tokens.Keyring(tokens.parse_keys(old, "test"))
    token = before.seal("cursor:numbers", b"12345678")
    rotated = tokens.Keyring(tokens.parse_keys(f"{new}\n{old}", "test"))
    assert rotated.unseal(token, "cursor:numbers") == b"12345678"
    assert unb64(rotated.seal("cursor:numbers", b"x"))[1:5].hex() == rotated.ids[0]
    assert rotated.ids == [tokens.Keyring(tokens.parse_keys(new, "test")).ids[0], before.ids[0]]
    removed = tokens.Keyring(tokens.parse_keys(new, "test"))
    assert removed.unseal(token, "cursor:numbers") is None


def test_the_longest_real_token_fits_with_a_margin() -> None:
    """A quality summary's page token after a 253-character trunk FQDN is the longest token
    (usage page tokens hold three short keys; cursors hold a position)."""
    ring = tokens.Keyring.generate()
    fqdn = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(fqdn) == 253
    longest = ring.seal("records.summary", fqdn.encode(), request="x" * 300)
    assert len(longest) + 64 <= tokens.MAX_LENGTH
    usage = ring.seal(
        "usage.rows",
        "\x1f".join(["6f1a4b2c-8d3e-4f5a-9b6c-7d8e9f0a1b2c", "2026-11-28", "outbound"]).encode(),
        request="r",
    )
    assert len(usage) < len(longest)
    assert len(ring.seal("cursor:numbers", struct.pack(">Q", 2**63 - 1))) <= 64


def test_sealing_with_no_keys_installed_is_a_programming_error(
    request: pytest.FixtureRequest,
) -> None:
    keyring = tokens.installed()
    tokens.install(None)
    request.addfinalizer(lambda: tokens.install(keyring))
    with pytest.raises(RuntimeError, match="no token keys"):
        encode_cursor("numbers", 1)
    with pytest.raises(RuntimeError, match="no token keys"):
        tokens.unseal("x", "cursor:numbers")


texts = st.one_of(
    st.text(max_size=600),
    st.from_regex(r"[A-Za-z0-9_-]{0,600}", fullmatch=True),
    st.binary(max_size=400).map(b64),
    st.binary(max_size=40).map(lambda raw: b64(bytes([tokens.VERSION]) + raw)),
)


@given(texts)
def test_any_text_is_refused_as_a_malformed_token_is(value: str) -> None:
    assert tokens.unseal(value, "cursor:numbers") is None
    with pytest.raises(ApiError) as cursor:
        decode_cursor(value, "numbers", "numbers.opconnect")
    with pytest.raises(ApiError) as page:
        tokens.read_page_token(value, "numbers.list", LIST_FILTERS, 2, "numbers.opconnect")
    assert (cursor.value.kind, cursor.value.reason) == (
        Kind.INVALID,
        "CURSOR_INVALID",
    )
    assert page.value.reason == "PAGE_TOKEN_INVALID"
    assert str(page.value) == str(_malformed_page())


def _malformed_page() -> ApiError:
    try:
        tokens.read_page_token("junk", "numbers.list", LIST_FILTERS, 2, "numbers.opconnect")
    except ApiError as error:
        return error
    raise AssertionError("junk read as a page token")


@given(st.data())
def test_a_changed_character_is_refused(data: st.DataObject) -> None:
    token = encode_cursor("numbers", data.draw(st.integers(0, 2**63 - 1)))
    at = data.draw(st.integers(0, len(token) - 1))
    changed = token[:at] + data.draw(st.characters()) + token[at + 1 :]
    if changed != token:
        assert tokens.unseal(changed, "cursor:numbers") is None


# --- keys: the key file, the settings, rotation ------------------------------------------------


def test_the_key_file_is_made_on_first_run_0600_in_a_0700_directory(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var")
    first = tokens.load_keyring(settings)
    path = tmp_path / "var" / "token-keys"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = tokens.load_keyring(settings)  # the next run reads the same key
    assert again.ids == first.ids
    assert again.unseal(first.seal("p", b"body"), "p") == b"body"


def test_processes_starting_at_once_make_one_key_file(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    start = threading.Barrier(8)
    rings: list[tokens.Keyring] = []

    def load() -> None:
        start.wait()
        rings.append(tokens.load_keyring(settings))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(rings) == 8 and len({tuple(r.ids) for r in rings}) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["token-keys"]


def test_a_configured_key_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        tokens.load_keyring(Settings(data_dir=tmp_path, token_keys_file=str(tmp_path / "nope")))


def test_keys_from_the_environment_need_no_file(tmp_path: Path) -> None:
    old, new = tokens.new_key(), tokens.new_key()
    env = {"OPCONNECT_DATA_DIR": str(tmp_path), "OPCONNECT_TOKEN_KEYS": f"{new}, {old}"}
    settings = load_settings(env=env)
    ring = tokens.load_keyring(settings)
    token = tokens.Keyring(tokens.parse_keys(old, "test")).seal("p", b"b")
    assert ring.unseal(token, "p") == b"b"
    assert not (tmp_path / "token-keys").exists()
    assert new not in repr(settings)  # keys never shown with the settings


@pytest.mark.parametrize("text", ["", "# only a comment\n", "not-a-key\n", b64(b"short") + "\n"])
def test_a_bad_key_list_is_refused_without_showing_it(text: str) -> None:
    with pytest.raises(ValueError, match="token-keys") as caught:
        tokens.parse_keys(text, "token-keys")
    assert "token-keys" in str(caught.value)
    assert not text.strip() or text.strip() not in str(caught.value)


def test_the_same_key_twice_is_refused() -> None:
    key = tokens.new_key()
    with pytest.raises(ValueError, match="twice"):
        tokens.Keyring(tokens.parse_keys(f"{key}\n{key}", "test"))


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OPCONNECT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("OPCONNECT_LOG_FORMAT", "json")
    monkeypatch.delenv("OPCONNECT_TOKEN_KEYS", raising=False)
    monkeypatch.delenv("OPCONNECT_TOKEN_KEYS_FILE", raising=False)
    return tmp_path


def test_tokens_rotate_puts_a_new_key_first_and_keeps_the_others(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tokens", "rotate"]) == 0  # no file yet: made, with one key
    path = data_dir / "token-keys"
    (first,) = tokens.keys_of_file(path)
    old = tokens.load_keyring(Settings(data_dir=data_dir))
    token = old.seal("cursor:numbers", b"12345678")
    assert main(["tokens", "rotate"]) == 0
    second, kept = tokens.keys_of_file(path)
    assert kept == first and second != first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert second in capsys.readouterr().out
    rotated = tokens.load_keyring(Settings(data_dir=data_dir))
    assert rotated.unseal(token, "cursor:numbers") == b"12345678"
    assert main(["tokens", "list"]) == 0
    assert capsys.readouterr().out.split() == [second, first]


def test_tokens_rotate_with_keys_in_the_settings_says_what_to_do(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPCONNECT_TOKEN_KEYS", tokens.new_key())
    assert main(["tokens", "rotate"]) == 1
    assert "token_keys setting" in capsys.readouterr().err
    assert not (data_dir / "token-keys").exists()


# --- through a real server ---------------------------------------------------------------------


def stream_refusal(call: Any) -> RichError:
    """The error a server stream ends with before its first response."""
    try:
        with pytest.raises(grpc.RpcError) as caught:
            next(iter(call))
    finally:
        call.cancel()
    return rich_error(caught.value)


def unary_refusal(send: Callable[[], Any]) -> RichError:
    with pytest.raises(grpc.RpcError) as caught:
        send()
    return rich_error(caught.value)


def heartbeat_cursor(system: RunningSystem) -> str:
    watcher = Watcher(system.numbers())
    try:
        return watcher.next().cursor
    finally:
        watcher.cancel()


def test_a_cursor_does_not_show_the_log_position(sqlite_system: RunningSystem) -> None:
    upload(sqlite_system, *NUMBERS)
    first, second = heartbeat_cursor(sqlite_system), heartbeat_cursor(sqlite_system)
    assert first != second  # the same position (nothing changed), not the same text
    listed = [sqlite_system.numbers().ListNumbers(pb.ListNumbersRequest()) for _ in range(2)]
    assert listed[0].watch_cursor != listed[1].watch_cursor
    for cursor in (first, second, listed[0].watch_cursor):
        raw = unb64(cursor)
        assert b"cursor" not in raw and b"numbers" not in raw
        assert raw[0] == tokens.VERSION
    # Both resume: from the same point.
    for cursor in (first, second):
        watcher = Watcher(sqlite_system.numbers(), pb.WatchAssignmentsRequest(cursor=cursor))
        try:
            assert list(watcher.next().events) == []
        finally:
            watcher.cancel()


def test_the_key_file_is_made_by_the_server_0600(sqlite_system: RunningSystem) -> None:
    path = sqlite_system.runtime.settings.data_dir / "token-keys"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert tokens.keys_of_file(path) == tokens.installed().ids  # type: ignore[union-attr]


def test_forged_foreign_and_tampered_cursors_answer_as_malformed_ones(
    sqlite_system: RunningSystem,
) -> None:
    upload(sqlite_system, *NUMBERS)
    numbers, records = sqlite_system.numbers(), sqlite_system.records()
    real = heartbeat_cursor(sqlite_system)
    zero = struct.pack(">Q", 0)
    foreign = tokens.Keyring.generate()
    page = numbers.ListNumbers(pb.ListNumbersRequest(page_size=1)).next_page_token
    records_cursor = encode_cursor("records", 0)
    bad_cursors = {
        "forged as version 1 made them": v1_token("cursor:numbers", zero),
        "another deployment's": foreign.seal("cursor:numbers", zero),
        "truncated": real[:-3],
        "a bit of its body flipped": flipped(real, -20),  # 8 bytes of body, 16 of tag
        "of another log": records_cursor,
        "a page token": page,
    }

    def watch(cursor: str) -> RichError:
        return stream_refusal(
            numbers.WatchAssignments(pb.WatchAssignmentsRequest(cursor=cursor), timeout=10)
        )

    malformed = watch("junk")
    assert (malformed.code, malformed.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "CURSOR_INVALID",
    )
    for name, cursor in bad_cursors.items():
        assert watch(cursor) == malformed, name

    def stream(cursor: str) -> RichError:
        return stream_refusal(
            records.StreamCallRecords(rpb.StreamCallRecordsRequest(cursor=cursor), timeout=10)
        )

    malformed = stream("junk")
    assert malformed.reason == "CURSOR_INVALID"
    bad_cursors["forged as version 1 made them"] = v1_token("cursor:records", zero)
    bad_cursors["another deployment's"] = foreign.seal("cursor:records", zero)
    bad_cursors["of another log"] = real
    for name, cursor in bad_cursors.items():
        assert stream(cursor) == malformed, name


def test_forged_foreign_and_tampered_page_tokens_answer_as_malformed_ones(
    sqlite_system: RunningSystem,
) -> None:
    upload(sqlite_system, *NUMBERS)
    numbers = sqlite_system.numbers()
    real = numbers.ListNumbers(pb.ListNumbersRequest(page_size=1)).next_page_token
    assert numbers.ListNumbers(pb.ListNumbersRequest(page_size=1, page_token=real)).numbers
    key = ["0", NUMBERS[0]]
    foreign = tokens.Keyring.generate()
    bad_tokens = {
        "forged as version 1 made them": v1_page_token("numbers.list", LIST_FILTERS, key),
        "another deployment's": foreign.seal(
            "numbers.list", "\x1f".join(key).encode(), request=LIST_FILTERS
        ),
        "truncated": real[:-3],
        "a bit of its tag flipped": flipped(real, -1),
        "a cursor": heartbeat_cursor(sqlite_system),
    }

    def page(token: str) -> RichError:
        return unary_refusal(
            lambda: numbers.ListNumbers(pb.ListNumbersRequest(page_size=1, page_token=token))
        )

    malformed = page("junk")
    assert (malformed.code, malformed.reason, malformed.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAGE_TOKEN_INVALID",
        {"page_token": "PAGE_TOKEN_INVALID"},
    )
    for name, token in bad_tokens.items():
        assert page(token) == malformed, name


def test_rotation_keeps_old_tokens_readable_until_their_key_is_removed(
    session_pki: Pki, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, session_pki.paths, f"sqlite:///{tmp_path / 'opconnect.db'}")
    path = tmp_path / "token-keys"

    def run(check: Callable[[RunningSystem], None]) -> None:
        system = start_system(settings, session_pki)
        try:
            check(system)
        finally:
            system.stop()

    sealed: dict[str, str] = {}

    def before(system: RunningSystem) -> None:
        upload(system, *NUMBERS)
        sealed["cursor"] = heartbeat_cursor(system)
        sealed["page"] = (
            system.numbers().ListNumbers(pb.ListNumbersRequest(page_size=1)).next_page_token
        )

    def resumes(system: RunningSystem) -> None:
        watcher = Watcher(system.numbers(), pb.WatchAssignmentsRequest(cursor=sealed["cursor"]))
        try:
            sealed["new cursor"] = watcher.next().cursor
        finally:
            watcher.cancel()
        request = pb.ListNumbersRequest(page_size=1, page_token=sealed["page"])
        assert [n.phone_number for n in system.numbers().ListNumbers(request).numbers] == [
            NUMBERS[1]
        ]

    run(before)
    (old_id,) = tokens.keys_of_file(path)
    new_id = tokens.rotate_key_file(path)
    run(resumes)  # the old key, listed second, still opens
    assert unb64(sealed["new cursor"])[1:5].hex() == new_id != old_id

    # The old key removed: its tokens answer as malformed ones; the new key's still read.
    newest = tokens.parse_keys(path.read_text(), "test")[0]
    path.write_text(b64(newest) + "\n")

    def removed(system: RunningSystem) -> None:
        numbers = system.numbers()
        for cursor in (sealed["cursor"], "junk"):
            refusal = stream_refusal(
                numbers.WatchAssignments(pb.WatchAssignmentsRequest(cursor=cursor), timeout=10)
            )
            sealed[cursor] = repr(refusal)
        assert sealed[sealed["cursor"]] == sealed["junk"]
        assert "CURSOR_INVALID" in sealed["junk"]
        watcher = Watcher(numbers, pb.WatchAssignmentsRequest(cursor=sealed["new cursor"]))
        try:
            assert list(watcher.next().events) == []
        finally:
            watcher.cancel()

    run(removed)


def test_a_summary_page_token_after_the_longest_trunk_name_reads(
    sqlite_system: RunningSystem,
) -> None:
    labels = ["a" * 63, "b" * 63, "c" * 63]
    trunks = [".".join([*labels, last * 61]) for last in ("d", "e")]
    assert {len(t) for t in trunks} == {253}
    response = publish_records(sqlite_system.ingest(), [record(trunk=t) for t in trunks])
    assert response.accepted_count == 2, response
    now = dt.datetime.now(dt.UTC)
    keys, token = [], ""
    while True:
        page = sqlite_system.records().GetQualitySummary(
            rpb.GetQualitySummaryRequest(
                start_time=stamp(now - dt.timedelta(hours=1)),
                end_time=stamp(now),
                group_by=rpb.QUALITY_GROUP_BY_TRUNK,
                page_size=1,
                page_token=token,
            )
        )
        keys += [g.key for g in page.groups]
        token = page.next_page_token
        if not token:
            break
        assert len(token) <= tokens.MAX_LENGTH
    assert keys == trunks


def test_the_usage_feed_starts_again_from_the_oldest_when_its_cursor_is_unreadable(
    session_pki: Pki, tmp_path: Path
) -> None:
    """The feed's saved cursor sealed with a key no longer listed (or by an older version)."""
    system = feed_system(session_pki, tmp_path)
    try:
        records = [record(), record()]
        publish_records(system.ingest(), records)
        eventually(lambda: len(kept(system)) == 2)
        follower = system.usage_service.feed
        assert follower is not None
        system.call(follower.stop())
        unreadable = tokens.Keyring.generate().seal("cursor:records", struct.pack(">Q", 0))

        def forget(session: sa.orm.Session) -> None:
            session.execute(sa.delete(usage_tables.PLATFORM_CALLS))
            session.execute(sa.delete(usage_tables.PLATFORM_CALL_KEYS))
            usage_platform_calls.store_platform_calls(session, feed.FEED, [], unreadable)

        system.call(system.runtime.db.run(forget, write=True))
        system.usage_service.feed = feed.CallFeedFollower(system.runtime.db, follower.client)
        system.call(start_follower(system.usage_service.feed))
        eventually(lambda: set(kept(system)) == {r.call_id for r in records})
        saved = system.call(system.runtime.db.run(usage_platform_calls.feed_cursor, feed.FEED))
        assert saved != unreadable
    finally:
        system.stop()
