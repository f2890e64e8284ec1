"""`opconnect operator addresses ...` and the numbers' address fields on the command line
(`numbers update`, the upload CSV's optional columns, `numbers get|list|watch` showing the
address and the emergency location), against real servers over mutual TLS; and what the
commands read from their options and files, checked before anything is sent."""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.cli import main, parser
from opconnect.numbers.v1 import civic_addresses_pb2 as pb
from opconnect.numbers.v1 import numbers_pb2
from opconnect_client import ClientError
from operator_client import addresses, numbers
from tests.conftest import OPERATOR, OTHER_TENANT, TENANT, RunningSystem
from tests.helpers import (
    assign,
    cli_process,
    connect,
    read_line,
    run_json,
    said,
    write_csv,
)

pytestmark = pytest.mark.usefixtures("cli_environment")

UPLOAD_HEADER = "phone_number,usage,inbound,outbound"
NEW_COLUMNS = (
    "calling_profile_id,civic_address_id,location_id,allow_tenant_address_update,"
    "iso_country_code,ticket_id"
)
PROFILE = "7d0f0b5e-1c2a-4b3c-9d4e-5f6a7b8c9d0e"
ADDRESS = [
    *("--country", "US"),
    *("--house-number", "1"),
    *("--street", "Microsoft"),
    *("--street-suffix", "Way"),
    *("--city", "Redmond"),
    *("--state", "WA"),
    *("--postal-code", "98052"),
    *("--company", "Contoso"),
]


def args_of(*argv: str) -> argparse.Namespace:
    return parser().parse_args(["operator", "addresses", *argv])


def create(
    system: RunningSystem, capsys: pytest.CaptureFixture[str], *extra: str, tenant: str = TENANT
) -> dict[str, Any]:
    (created,) = run_json(
        system, capsys, "addresses", "create", "--tenant", tenant, *ADDRESS, *extra
    )
    return created


# --- what the commands read (no server) ------------------------------------------------------


def test_a_location_is_a_description_and_an_optional_elin_after_the_last_equals() -> None:
    assert addresses.parse_location("Floor 3, east wing=ELIN-0301") == pb.Location(
        description="Floor 3, east wing", elin="ELIN-0301"
    )
    assert addresses.parse_location(" Lobby ") == pb.Location(description="Lobby")
    assert addresses.parse_location("a=b=C1").description == "a=b"
    for bad in ("", "=ELIN", "  =x"):
        with pytest.raises(ClientError, match="description is empty"):
            addresses.parse_location(bad)


def test_update_sends_only_the_fields_given_and_keeps_the_locations_not_named() -> None:
    sent = addresses.for_update(
        args_of("update", "a1", "--street", "Main", "--house-number", ""), None
    )
    assert sent.paths == ["house_number", "street_name"]
    assert sent.address.civic_address_id == "a1" and sent.address.street_name == "Main"
    current = pb.CivicAddress(
        civic_address_id="a1",
        locations=[
            pb.Location(location_id="l1", description="Floor 1"),
            pb.Location(location_id="l2", description="Floor 2", elin="E2"),
            pb.Location(location_id="l3", description="Floor 3"),
        ],
    )
    argv = ("update", "a1", "--remove-location", "l1", "--set-location", "l3:Roof=R1")
    sent = addresses.for_update(args_of(*argv, "--location", "Basement"), current)
    assert sent.paths == ["locations"]
    assert [(x.location_id, x.description, x.elin) for x in sent.address.locations] == [
        ("l2", "Floor 2", "E2"),
        ("l3", "Roof", "R1"),
        ("", "Basement", ""),
    ]
    sent = addresses.for_update(args_of("update", "a1", "--no-geo"), None)
    assert sent.paths == ["geo_point"] and not sent.address.HasField("geo_point")
    bad: list[tuple[tuple[str, ...], str]] = [
        (("update", "a1"), "nothing to change"),
        (("update", "a1", "--remove-location", "l9"), "has no location l9"),
        (("update", "a1", "--set-location", "Roof"), "ID:DESC"),
        (("update", "a1", "--latitude", "1"), "--latitude and --longitude together"),
        (("update", "a1", "--latitude", "nan", "--longitude", "1"), "must be numbers"),
    ]
    for words, problem in bad:
        with pytest.raises(ClientError, match=problem):
            addresses.for_update(args_of(*words), current)


def test_create_reads_a_json_file_with_the_options_over_it(tmp_path: Path) -> None:
    path = tmp_path / "address.json"
    path.write_text(
        json.dumps(
            {
                "tenantId": TENANT,
                "country_code": "GB",
                "streetName": "Baker Street",
                "city": "London",
                "companyName": "Contoso",
                "locations": [{"description": "Flat B"}],
                "geoPoint": {"latitude": 51.5238, "longitude": -0.1586},
            }
        )
    )
    address = addresses.for_create(args_of("create", "--from-json", str(path), "--city", "Londres"))
    assert (address.tenant_id, address.country_code, address.city) == (TENANT, "GB", "Londres")
    assert [x.description for x in address.locations] == ["Flat B"]
    assert address.geo_point.latitude == pytest.approx(51.5238)
    replaced = args_of("create", "--from-json", str(path), "--location", "Flat C=E1")
    assert [x.elin for x in addresses.for_create(replaced).locations] == ["E1"]
    sent = addresses.for_update(args_of("update", "a1", "--from-json", str(path)), None)
    assert "tenant_id" not in sent.paths  # a file made for create: its tenant is ignored
    assert sent.paths == [
        "country_code",
        "street_name",
        "city",
        "company_name",
        "locations",
        "geo_point",
    ]
    with pytest.raises(ClientError, match="--no-geo and a geo point"):
        addresses.for_update(args_of("update", "a1", "--from-json", str(path), "--no-geo"), None)
    path.write_text(json.dumps({"streetName": "Baker Street", "postalCode": "NW1"}))
    sent = addresses.for_update(args_of("update", "a1", "--from-json", str(path)), None)
    assert sent.paths == ["street_name", "postal_code"]
    for text, problem in [
        ("{not json", "not a CivicAddress in JSON"),
        ('{"street": "x"}', "not a CivicAddress in JSON"),
        ('{"geoPoint": "north"}', "not a CivicAddress in JSON"),
    ]:
        path.write_text(text)
        with pytest.raises(ClientError, match=problem) as raised:
            addresses.for_create(args_of("create", "--from-json", str(path)))
        assert "\n" not in str(raised.value)
    with pytest.raises(ClientError, match="give the tenant"):
        addresses.for_create(args_of("create", "--street", "x"))


@given(st.text(max_size=80))
def test_any_location_text_is_read_or_refused_in_one_line(text: str) -> None:
    description = text.rsplit("=", 1)[0] if "=" in text else text
    if not description.strip():
        with pytest.raises(ClientError, match="description is empty"):
            addresses.parse_location(text)
        return
    location = addresses.parse_location(text)
    assert location.description == description.strip()
    assert location.elin == (text.rsplit("=", 1)[1].strip() if "=" in text else "")


def test_the_upload_file_takes_the_new_columns_each_optional(tmp_path: Path) -> None:
    path = tmp_path / "numbers.csv"
    write_csv(
        path,
        [
            ["+14255550100", "user", "yes", "yes", PROFILE, "a1", "l1", "no", "US", "T-1"],
            ["+18005550100", "voice_app", "yes", "no", "", "", "", "yes", "us", " T 2 "],
            ["+14255550101", "user", "yes", "yes", "", "", "", "maybe", "", ""],
            ["+14255550102", "user", "yes", "yes", "", "a1"],
        ],
        header=f"{UPLOAD_HEADER},{NEW_COLUMNS}",
    )
    rows = numbers.read_upload(path)
    first, second, bad, short = rows
    assert first.upload == numbers_pb2.NumberUpload(
        phone_number="+14255550100",
        usage=numbers_pb2.NUMBER_USAGE_USER,
        capabilities=numbers_pb2.Capabilities(inbound=True, outbound=True),
        calling_profile_id=PROFILE,
        civic_address_id="a1",
        location_id="l1",
        iso_country_code="US",
        ticket_id="T-1",
    )
    assert second.upload is not None
    assert second.upload.allow_tenant_address_update and second.upload.ticket_id == "T 2"
    assert second.upload.iso_country_code == "us"  # as written: the platform judges it
    assert (bad.line, bad.upload) == (4, None)
    assert "allow_tenant_address_update must be yes or no" in bad.problem
    assert (short.line, short.upload, short.problem) == (5, None, "too few fields")
    # Some of the new columns, in another order: the others are simply not sent.
    write_csv(
        path,
        [["T-9", "user", "+14255550100", "a1", "yes", "yes"]],
        header="ticket_id,usage,phone_number,civic_address_id,inbound,outbound",
    )
    (row,) = numbers.read_upload(path)
    assert row.upload is not None
    assert (row.upload.ticket_id, row.upload.civic_address_id, row.upload.location_id) == (
        "T-9",
        "a1",
        "",
    )


# --- against a server ----------------------------------------------------------------------


def test_create_list_get_update_and_delete_addresses(
    sqlite_system: RunningSystem, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    system = sqlite_system
    first = create(system, capsys, "--location", "Floor 1=ELIN-1", "--location", "Floor 2")
    ident = first["civic_address_id"]
    assert first["created_by"] == "CIVIC_ADDRESS_AUTHOR_OPERATOR"
    assert [x["description"] for x in first["locations"]] == ["Floor 1", "Floor 2"]
    assert first["locations"][0]["elin"] == "ELIN-1"
    # A retry with the same request id creates nothing twice.
    request = str(uuid.uuid4())
    second = create(system, capsys, "--request-id", request, tenant=OTHER_TENANT)
    again = create(
        system, capsys, "--request-id", request, "--city", "Seattle", tenant=OTHER_TENANT
    )
    assert again["civic_address_id"] == second["civic_address_id"]
    assert again["city"] == "Redmond"
    # The test system's own addresses (one per consented tenant) are listed too.
    mine = {ident, second["civic_address_id"]}
    listed = [a["civic_address_id"] for a in run_json(system, capsys, "addresses", "list")]
    assert set(listed) - set(system.addresses.values()) == mine
    assert (
        len(listed)
        == len(set(listed))
        == 2 + len([t for (o, t) in system.addresses if o == OPERATOR])
    )
    only = run_json(system, capsys, "addresses", "list", "--tenant", TENANT)
    assert {a["tenant_id"] for a in only} == {TENANT}
    assert ident in {a["civic_address_id"] for a in only}
    assert second["civic_address_id"] not in {a["civic_address_id"] for a in only}
    capsys.readouterr()
    assert main([*connect(system), "addresses", "list"]) == 0
    out = capsys.readouterr().out
    assert f"{len(listed)} addresses" in out
    assert "1 Microsoft Way, Redmond, WA 98052, US" in out
    assert main([*connect(system), "addresses", "get", ident]) == 0
    out = capsys.readouterr().out
    assert "Floor 1" in out and "ELIN-1" in out and "98052" in out

    # Only the fields given change; locations named are kept, changed or removed.
    (floor1, floor2) = (x["location_id"] for x in first["locations"])
    (updated,) = run_json(
        system,
        capsys,
        *("addresses", "update", ident, "--street", "Microsoft", "--house-number", "2"),
        *("--remove-location", floor2, "--set-location", f"{floor1}:Ground floor=ELIN-0"),
        *("--location", "Roof"),
    )
    assert (updated["house_number"], updated["city"], updated["postal_code"]) == (
        "2",
        "Redmond",
        "98052",
    )
    assert [(x.get("location_id") == floor1, x["description"]) for x in updated["locations"]] == [
        (True, "Ground floor"),
        (False, "Roof"),
    ]
    # Errors are one line with the server's reason and the field at fault; exit status 1.
    for argv, reason in [
        (["update", ident, "--country", "XX"], "civic_address.country_code"),
        (["get", str(uuid.uuid4())], "CIVIC_ADDRESS_NOT_FOUND"),
        (["create", "--tenant", TENANT, *ADDRESS, "--postal-code", "ABC"], "postal_code"),
        (["update", ident], "nothing to change"),
    ]:
        capsys.readouterr()
        assert main([*connect(system), "addresses", *argv]) == 1, argv
        error = said(capsys.readouterr().err)
        assert error.startswith("opconnect: ") and reason in error, error
        assert len(error.splitlines()) == 1
    (deleted,) = run_json(system, capsys, "addresses", "delete", second["civic_address_id"])
    assert deleted == {"civic_address_id": second["civic_address_id"], "deleted": True}
    left = {a["civic_address_id"] for a in run_json(system, capsys, "addresses", "list")}
    assert second["civic_address_id"] not in left and ident in left


def test_numbers_carry_their_address_from_upload_to_update_and_watch(
    sqlite_system: RunningSystem, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    system = sqlite_system
    home = create(system, capsys, "--location", "Floor 1")
    other = create(system, capsys, "--street", "Pine", "--location", "Lobby=ELIN-7")
    floor = home["locations"][0]["location_id"]
    path = tmp_path / "numbers.csv"
    write_csv(
        path,
        [
            [
                "+14255550100",
                "user",
                "yes",
                "yes",
                PROFILE,
                home["civic_address_id"],
                floor,
                "no",
                "US",
                "T-1",
            ],
            ["+14255550101", "user", "yes", "yes", "", "", "", "yes", "", ""],
            ["+14255550102", "user", "yes", "yes", "", "", "", "no", "", ""],  # no address
            ["+18005550100", "voice_app", "yes", "no", "", "", "", "", "", ""],  # no country
            ["+14255550103", "user", "yes", "yes", "", "", "", "perhaps", "", ""],
        ],
        header=f"{UPLOAD_HEADER},{NEW_COLUMNS}",
    )
    (answer,) = run_json(
        system, capsys, "numbers", "upload", str(path), "--tenant", TENANT, status=1
    )
    assert [(r["line"], r["outcome"], r["reason"]) for r in answer["results"]] == [
        (2, "added", ""),
        (3, "added", ""),
        (4, "refused", "CIVIC_ADDRESS_REQUIRED"),
        (5, "refused", "ISO_COUNTRY_CODE_REQUIRED"),
        (6, "unreadable", ""),
    ]
    (number,) = run_json(system, capsys, "numbers", "get", "+14255550100")
    assert (number["civic_address_id"], number["location_id"], number["ticket_id"]) == (
        home["civic_address_id"],
        floor,
        "T-1",
    )
    assert number["emergency_location"]["location"]["description"] == "Floor 1"
    capsys.readouterr()
    assert main([*connect(system), "numbers", "get", "+14255550100"]) == 0
    out = capsys.readouterr().out
    assert home["civic_address_id"] in out and "1 Microsoft Way" in out and "Floor 1" in out
    assert main([*connect(system), "numbers", "list"]) == 0
    assert home["civic_address_id"] in capsys.readouterr().out

    # The watch shows the emergency location of each event: as assigned, after the number
    # moves to another address, and after the operator edits that address.
    watch = cli_process(system, tmp_path, "numbers", "watch", "--checkpoint", str(tmp_path / "c"))
    try:
        listed = [read_line(watch.stdout) for _ in range(2)]
        assert {str(n["phone_number"]) for n in listed} == {"+14255550100", "+14255550101"}
        assign(system, "+14255550100")
        event = read_line(watch.stdout)
        assert event["type"] == "ASSIGNMENT_EVENT_TYPE_ASSIGNED"
        assert located(event) == (home["civic_address_id"], "Floor 1")
        lobby = other["locations"][0]["location_id"]
        (moved,) = run_json(
            system,
            capsys,
            *("numbers", "update", "+14255550100", "--ticket-id", "T-2"),
            *("--civic-address-id", other["civic_address_id"], "--location-id", lobby),
        )
        assert moved["emergency_location"]["location"]["elin"] == "ELIN-7"
        assert (moved["ticket_id"], moved["calling_profile_id"]) == ("T-2", PROFILE)
        event = read_line(watch.stdout)
        assert event["type"] == "ASSIGNMENT_EVENT_TYPE_UPDATED"
        assert located(event) == (other["civic_address_id"], "Lobby")
        argv = ("addresses", "update", other["civic_address_id"], "--set-location")
        run_json(system, capsys, *argv, f"{lobby}:Front desk=ELIN-7")
        event = read_line(watch.stdout)
        assert event["type"] == "ASSIGNMENT_EVENT_TYPE_UPDATED"
        assert located(event) == (other["civic_address_id"], "Front desk")
    finally:
        watch.kill()
        watch.wait()

    # A number whose address the customer may set keeps none until it does; taking the right
    # away leaves a USER number without the address it needs: refused, in one line.
    for options, problem in [
        (["--no-allow-tenant-address-update"], "CIVIC_ADDRESS_REQUIRED"),
        ([], "nothing to change: give at least one of --civic-address-id"),
        (["--civic-address-id", str(uuid.uuid4())], "CIVIC_ADDRESS_NOT_FOUND"),
    ]:
        capsys.readouterr()
        assert main([*connect(system), "numbers", "update", "+14255550101", *options]) == 1
        error = said(capsys.readouterr().err)
        assert error.startswith("opconnect: ") and problem in error, error
        assert len(error.splitlines()) == 1
    # An address a number refers to cannot be deleted.
    capsys.readouterr()
    assert main([*connect(system), "addresses", "delete", other["civic_address_id"]]) == 1
    assert "CIVIC_ADDRESS_IN_USE" in said(capsys.readouterr().err)


def located(event: dict[str, Any]) -> tuple[str, str]:
    """An event's emergency location: its address id and the location's description."""
    where = event["emergency_location"]
    return where["civic_address"]["civic_address_id"], where.get("location", {}).get(
        "description", ""
    )
