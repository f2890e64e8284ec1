"""`opconnect operator addresses ...`: the civic addresses of the operator's customers, where
their numbers' emergency calls are located, on the client library (`opconnect_client`).

`list` shows them (of a tenant), `get` one with its locations, `create` one from options (a
`--location DESC[=ELIN]` for each place inside it) or from a JSON file (the contract's
`CivicAddress` in the proto3 JSON mapping; options given as well override its fields),
`update` changes only the fields whose options are given (they make the update mask: an empty
value clears an optional field), and `delete` removes one no number refers to.

A location is written `DESC[=ELIN]`: what the place is, and after the last `=` the ELIN the
operator's network gives it, if any (`Floor 3, east wing=ELIN-0301`). `update` keeps the
locations it is not told about: `--location` adds one, `--set-location ID:DESC[=ELIN]` changes
one, `--remove-location ID` removes one (the server refuses LOCATION_IN_USE while a number
refers to it).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from opconnect.numbers.v1 import civic_addresses_pb2 as pb
from opconnect_client import Client, ClientError
from operator_client.output import Output, as_dict, read_text, when

# The address's text fields: (option, field, help). `tenant_id` is create's alone (fixed).
TEXT_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("--country", "country_code", "the country, ISO 3166-1 alpha-2 (US, GB, DE)"),
    ("--house-number", "house_number", "the house number, up to 10 characters (221, 12-14)"),
    ("--house-number-suffix", "house_number_suffix", "a suffix of the house number (B)"),
    ("--pre-directional", "pre_directional", "a direction before the street name (NE)"),
    ("--street", "street_name", "the street name, 1 to 64 characters"),
    ("--street-suffix", "street_suffix", "the street's suffix (St, Ave)"),
    ("--post-directional", "post_directional", "a direction after the street name"),
    ("--city", "city", "the city, 1 to 64 characters"),
    ("--city-alias", "city_alias", "another name of the city"),
    ("--state", "state_or_province", "the state or province (required in US, CA, AU)"),
    ("--postal-code", "postal_code", "the postal or ZIP code (required in US and CA)"),
    ("--company", "company_name", "the customer's company name, 1 to 64 characters"),
    ("--company-tax-id", "company_tax_id", "the customer's tax id, up to 32 characters"),
    ("--description", "description", "a note for people, up to 256 characters"),
)
CREATED_BY = {
    pb.CIVIC_ADDRESS_AUTHOR_OPERATOR: "operator",
    pb.CIVIC_ADDRESS_AUTHOR_CUSTOMER: "customer",
}
# The fields an update never sends, also when a JSON file holds them: the tenant cannot change,
# the others are the server's.
FIXED = ("tenant_id", "civic_address_id", "created_by", "create_time", "update_time")
LOCATION_HELP = (
    "a place inside the address: its description, and after the last = its ELIN if your"
    " network uses one ('Floor 3=ELIN-0301')"
)


def add_parser(operator_commands: Any, output: argparse.ArgumentParser) -> None:
    """The `addresses` sub-commands, under `opconnect operator` (its sub-parsers); `output`
    is the parent parser of the `--output` option."""
    top = operator_commands.add_parser(
        "addresses",
        help="your customers' civic addresses: list, get, create, update, delete",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = top.add_subparsers(dest="addresses", required=True, metavar="COMMAND")
    listing = sub.add_parser("list", parents=[output], help="your civic addresses, by tenant")
    listing.add_argument("--tenant", default="", help="only this tenant's addresses (GUID)")
    got = sub.add_parser("get", parents=[output], help="one address, with its locations")
    got.add_argument("id", metavar="ID", help="the address's id")

    create = sub.add_parser(
        "create",
        parents=[output],
        help="create an address for a tenant (under an active consent)",
        description="Create a civic address from options, or from a JSON file (a CivicAddress"
        " as the proto3 JSON mapping writes it); options given override the file's fields.",
    )
    create.add_argument("--tenant", help="the customer tenant (GUID); fixed once created")
    _field_options(create)
    create.add_argument(
        "--location", action="append", default=[], metavar="DESC[=ELIN]", help=LOCATION_HELP
    )
    create.add_argument("--from-json", type=Path, metavar="FILE", help="the address as JSON")
    create.add_argument(
        "--request-id",
        default="",
        help="a UUID of your choice: running the command again with it creates nothing twice",
    )

    update = sub.add_parser(
        "update",
        parents=[output],
        help="change the fields whose options are given (an empty value clears one)",
        description="Change an address: only the fields whose options are given are sent (the"
        " update mask); an empty value clears an optional field. Each assigned number that"
        " refers to the address gets an UPDATED assignment event with its new emergency"
        " location.",
    )
    update.add_argument("id", metavar="ID", help="the address's id")
    _field_options(update)
    update.add_argument("--no-geo", action="store_true", help="forget where the address is")
    update.add_argument(
        "--location",
        action="append",
        default=[],
        metavar="DESC[=ELIN]",
        help=f"add {LOCATION_HELP[2:]}",
    )
    update.add_argument(
        "--set-location",
        action="append",
        default=[],
        metavar="ID:DESC[=ELIN]",
        help="change the description (and ELIN) of the location with this id",
    )
    update.add_argument(
        "--remove-location",
        action="append",
        default=[],
        metavar="ID",
        help="remove the location with this id (refused while a number refers to it)",
    )
    update.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="new values as JSON (a CivicAddress): every field it holds is changed (its"
        " tenant_id and the server's own fields are ignored)",
    )

    delete = sub.add_parser(
        "delete", parents=[output], help="delete an address no number refers to"
    )
    delete.add_argument("id", metavar="ID", help="the address's id")


def _field_options(parser: argparse.ArgumentParser) -> None:
    for option, field, text in TEXT_FIELDS:
        metavar = option.removeprefix("--").upper().replace("-", "_")
        parser.add_argument(option, dest=field, metavar=metavar, help=text)
    parser.add_argument("--latitude", type=float, help="where the address is: degrees, -90 to 90")
    parser.add_argument(
        "--longitude", type=float, help="where the address is: degrees, -180 to 180"
    )


# --- reading what was given ----------------------------------------------------------------


def parse_location(text: str) -> pb.Location:
    """`DESC[=ELIN]` as a Location; ClientError when the description is empty."""
    description, elin = text, ""
    if "=" in text:
        description, elin = text.rsplit("=", 1)
    if not description.strip():
        raise ClientError(f"--location {text!r}: the description is empty (DESC[=ELIN])")
    return pb.Location(description=description.strip(), elin=elin.strip())


def _set_location(text: str) -> tuple[str, pb.Location]:
    ident, colon, rest = text.partition(":")
    if not colon or not ident.strip():
        raise ClientError(f"--set-location {text!r}: write it ID:DESC[=ELIN]")
    return ident.strip(), parse_location(rest)


def read_json(path: Path) -> pb.CivicAddress:
    """A CivicAddress from a JSON file; ClientError naming the file when it cannot be used."""
    text = read_text(path)
    address = pb.CivicAddress()
    try:
        json_format.Parse(text, address)
    except json_format.ParseError as error:
        problem = " ".join(str(error).split())
        raise ClientError(f"{path}: not a CivicAddress in JSON: {problem}") from None
    return address


def _json_paths(path: Path) -> list[str]:
    """The fields a JSON file holds, as update-mask paths (the proto's field names)."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        return []
    by_json = {f.json_name: f.name for f in pb.CivicAddress.DESCRIPTOR.fields}
    by_json.update({f.name: f.name for f in pb.CivicAddress.DESCRIPTOR.fields})
    return [by_json[key] for key in raw if key in by_json]


@dataclass
class Given:
    """What the options of `create` or `update` said: the fields they set, by path."""

    address: pb.CivicAddress
    paths: list[str]


def _geo(args: argparse.Namespace, address: pb.CivicAddress) -> bool:
    """Sets the geo point from --latitude and --longitude (both or neither); whether given."""
    latitude, longitude = args.latitude, args.longitude
    if latitude is None and longitude is None:
        return False
    if latitude is None or longitude is None:
        raise ClientError("give --latitude and --longitude together")
    if not (math.isfinite(latitude) and math.isfinite(longitude)):
        raise ClientError("--latitude and --longitude must be numbers")
    address.geo_point.CopyFrom(pb.GeoPoint(latitude=latitude, longitude=longitude))
    return True


def _given(args: argparse.Namespace, address: pb.CivicAddress) -> list[str]:
    """Copy the field options given onto `address`; their paths."""
    paths = []
    for _, field, _ in TEXT_FIELDS:
        value = getattr(args, field)
        if value is not None:
            setattr(address, field, value)
            paths.append(field)
    if _geo(args, address):
        paths.append("geo_point")
    return paths


def for_create(args: argparse.Namespace) -> pb.CivicAddress:
    """The address `create` sends: the JSON file's, with the options given over it."""
    address = read_json(args.from_json) if args.from_json else pb.CivicAddress()
    if args.tenant is not None:
        address.tenant_id = args.tenant
    _given(args, address)
    if args.location:
        if args.from_json:
            del address.locations[:]
        address.locations.extend(parse_location(text) for text in args.location)
    if not address.tenant_id:
        raise ClientError("give the tenant: --tenant GUID (or tenant_id in --from-json)")
    return address


def for_update(args: argparse.Namespace, current: pb.CivicAddress | None) -> Given:
    """The address and mask `update` sends. `current` (the address as it is) is needed only
    when locations change: the list is sent whole, the ones not named kept as they are."""
    address = read_json(args.from_json) if args.from_json else pb.CivicAddress()
    paths = [p for p in _json_paths(args.from_json) if p not in FIXED] if args.from_json else []
    address.civic_address_id = args.id
    paths += [p for p in _given(args, address) if p not in paths]
    if args.no_geo:
        if "geo_point" in paths:
            raise ClientError("--no-geo and a geo point cannot go together")
        address.ClearField("geo_point")
        paths.append("geo_point")
    if locations_changed(args):
        if current is None:
            raise ClientError("the address as it is is needed to change its locations")
        if "locations" in paths:
            raise ClientError("locations come from --from-json or the location options, not both")
        address.ClearField("locations")
        address.locations.extend(_new_locations(args, current))
        paths.append("locations")
    if not paths:
        raise ClientError("nothing to change: give the options of the fields to change")
    return Given(address, paths)


def locations_changed(args: argparse.Namespace) -> bool:
    return bool(args.location or args.set_location or args.remove_location)


def _new_locations(args: argparse.Namespace, current: pb.CivicAddress) -> list[pb.Location]:
    known = {location.location_id for location in current.locations}
    removed = {ident.strip() for ident in args.remove_location}
    changed = dict(_set_location(text) for text in args.set_location)
    for ident in sorted((removed | set(changed)) - known):
        raise ClientError(f"the address has no location {ident}")
    kept = []
    for location in current.locations:
        if location.location_id in removed:
            continue
        new = changed.get(location.location_id)
        if new is not None:
            new.location_id = location.location_id
        kept.append(new if new is not None else location)
    return kept + [parse_location(text) for text in args.location]


# --- what is shown -------------------------------------------------------------------------


def one_line(address: pb.CivicAddress) -> str:
    """The street address on one line: `221B Baker St, London, NW1 6XE, GB`."""
    house = address.house_number + address.house_number_suffix
    street = " ".join(
        part
        for part in (
            house,
            address.pre_directional,
            address.street_name,
            address.street_suffix,
            address.post_directional,
        )
        if part
    )
    region = " ".join(p for p in (address.state_or_province, address.postal_code) if p)
    return ", ".join(p for p in (street, address.city, region, address.country_code) if p)


def location_text(location: pb.Location) -> str:
    return (
        f"{location.description} (ELIN {location.elin})" if location.elin else location.description
    )


ROW_COLUMNS = ["id", "tenant", "address", "company", "locations", "by", "updated (UTC)"]


def _row(address: pb.CivicAddress) -> list[str]:
    return [
        address.civic_address_id,
        address.tenant_id,
        one_line(address),
        address.company_name,
        str(len(address.locations)),
        CREATED_BY.get(address.created_by, ""),
        when(address.update_time),
    ]


def show(address: pb.CivicAddress, out: Output, title: str = "") -> None:
    """One address: JSON (every field), or its fields and a table of its locations."""
    if out.json:
        out.data(as_dict(address))
        return
    fields = list(zip(ROW_COLUMNS, _row(address), strict=True))
    fields = [f for f in fields if f[0] != "locations"]
    for _, field, _ in TEXT_FIELDS:
        value = getattr(address, field)
        if value:
            fields.append((field.replace("_", " "), value))
    if address.HasField("geo_point"):
        point = address.geo_point
        fields.append(("geo point", f"{point.latitude:g}, {point.longitude:g}"))
    fields.append(("created (UTC)", when(address.create_time)))
    out.table(title or address.civic_address_id, ["", ""], fields)
    if address.locations:
        rows = [[x.location_id, x.description, x.elin] for x in address.locations]
        out.table("Locations", ["location id", "description", "ELIN"], rows)


# --- the commands --------------------------------------------------------------------------


async def list_addresses(client: Client, tenant: str, out: Output) -> int:
    pages = client.list_civic_addresses(tenant)
    items = (address async for page in pages for address in page.civic_addresses)
    await out.listing("addresses", ROW_COLUMNS, items, _row)
    return 0


async def run(client: Client, args: argparse.Namespace, out: Output) -> int:
    """One `opconnect operator addresses` command; its exit status."""
    if args.addresses == "list":
        return await list_addresses(client, args.tenant, out)
    if args.addresses == "get":
        show(await client.get_civic_address(args.id), out)
        return 0
    if args.addresses == "create":
        address = for_create(args)
        created = await client.create_civic_address(address, args.request_id)
        out.note(f"created {created.civic_address_id}")
        show(created, out)
        return 0
    if args.addresses == "update":
        current = await client.get_civic_address(args.id) if locations_changed(args) else None
        given = for_update(args, current)
        show(await client.update_civic_address(given.address, given.paths), out)
        out.note(f"updated {', '.join(given.paths)}")
        return 0
    await client.delete_civic_address(args.id)
    if out.json:
        out.data({"civic_address_id": args.id, "deleted": True})
    else:
        out.line(f"deleted {args.id}")
    return 0
