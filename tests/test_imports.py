"""What each package may import (docs/architecture.md): plumbing is shared by all and imports
none of them; a service never imports another service, the gateway or the composition root;
the gateway (the edge: TLS identity, trust, registry, forwarding) imports no service; clients
(simulator, operator_client) import neither the servers nor each other, and the operator's
commands (operator_client) stand on the client library alone, with no gRPC of their own; the
operators' client
library (opconnect_client) imports nothing first-party but the generated contract, so that a
carrier can install it without the server; only the composition root (app) knows every
service. Read from the source, so a new import that breaks a rule fails
here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (
    "app",
    "gateway",
    "plumbing",
    "services",
    "simulator",
    "operator_client",
    "opconnect_client",
)

# package -> the first-party packages it must not import ("services.*" means any service).
FORBIDDEN: dict[str, set[str]] = {
    "plumbing": {"app", "gateway", "services.*", "simulator", "operator_client"},
    "gateway": {"app", "services.*", "simulator", "operator_client"},
    "simulator": {"app", "gateway", "services.*", "operator_client"},
    "operator_client": {"app", "gateway", "plumbing", "services.*", "simulator"},
    "opconnect_client": {
        "app",
        "gateway",
        "plumbing",
        "services.*",
        "simulator",
        "operator_client",
    },
}
SERVICE_FORBIDDEN = {"app", "gateway", "simulator", "operator_client"}  # and other services


def owner(module: str) -> str:
    """`services.usage.storage` -> `services.usage`; `gateway.pki` -> `gateway`."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "services" and len(parts) > 1 else parts[0]


def imports_of(path: Path) -> set[str]:
    """The first-party modules a source file imports (absolute imports; we use no others)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def broken_rules(path: Path) -> list[str]:
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    mine = owner(module)
    forbidden = SERVICE_FORBIDDEN if mine.startswith("services.") else FORBIDDEN.get(mine, set())
    broken = []
    for imported in sorted(imports_of(path)):
        theirs = owner(imported)
        if theirs == mine:
            continue
        is_service = theirs.startswith("services.")
        if (
            theirs in forbidden
            or (is_service and "services.*" in forbidden)
            or (is_service and mine.startswith("services."))
        ):
            broken.append(f"{module} imports {imported}")
    return broken


def test_every_package_imports_only_what_it_may() -> None:
    assert [b for path in sources() for b in broken_rules(path)] == []


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("plumbing/x.py", "from services.usage import storage"),
        ("gateway/x.py", "import services.numbers.storage"),
        ("services/usage/x.py", "from services.records.rules import Record"),
        ("services/usage/x.py", "from gateway.pki import PkiPaths"),
        ("simulator/x.py", "from gateway import pki"),
        ("opconnect_client/x.py", "from plumbing.balancing import balanced"),
    ],
)
def test_the_rules_catch_a_forbidden_import(
    module: str, source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / module
    path.parent.mkdir(parents=True)
    path.write_text(source + "\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert broken_rules(path) != []


DOMAIN_MODULES = ("rules", "quality", "consents", "addresses")


def test_the_protobuf_edge_imports_no_storage() -> None:
    """A service's convert.py (protobuf <-> domain) knows the domain types (rules.py, quality.py,
    numbers' consents.py) and no storage module."""
    found = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / "services").glob("*/convert.py"))
        for name in sorted(imports_of(path))
        if name.startswith("services.") and name.split(".")[-1] not in DOMAIN_MODULES
    ]
    assert found == []


# Handlers (`servicer.py`, numbers' `consent_servicer.py`), the face, a gRPC client.
GRPC_EDGE = ("servicer.py", "service.py", "feed.py")


def test_the_domain_speaks_without_grpc() -> None:
    """Rules, storage and conversions raise and return domain errors (plumbing.errors: a Kind,
    a reason, a message); only handlers, faces and gRPC clients import grpc, and the status
    codes are mapped once, at the edge (plumbing.status)."""
    modules = [ROOT / "plumbing" / "errors.py"] + [
        p for p in sorted((ROOT / "services").rglob("*.py")) if not p.name.endswith(GRPC_EDGE)
    ]
    found = [
        str(path.relative_to(ROOT))
        for path in modules
        for node in ast.walk(ast.parse(path.read_text()))
        if (
            isinstance(node, ast.Import) and any(a.name.split(".")[0] == "grpc" for a in node.names)
        )
        or (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "grpc")
    ]
    assert found == []


def test_the_operator_commands_use_the_client_library_not_grpc() -> None:
    """`opconnect operator` is built on opconnect_client (resumable streams, resent durations,
    the server's real status): no stub, channel or grpc error of its own."""
    found = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / "operator_client").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        )
        if name.split(".")[0] == "grpc" or name.endswith("_pb2_grpc")
    ]
    assert found == []
