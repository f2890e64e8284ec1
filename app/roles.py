"""What each process runs: every service of the system, and the roles a process can take.

Adding a service: its folder (with a `service.py` face, plumbing.service) and one line in
`SERVICES`; it is then served by the one-process system, forwarded by the gateway, and can run
as a role of its own (`opconnect serve --role NAME`, reached through `NAME_target`).
"""

from __future__ import annotations

from dataclasses import dataclass

from plumbing.service import Service
from services.numbers.service import Numbers
from services.records.service import Records
from services.usage.service import Usage

# Every service, in the order a process starts them (one instance of each per process).
SERVICES: tuple[type[Service], ...] = (Numbers, Records, Usage)
NAMES: tuple[str, ...] = tuple(s.name for s in SERVICES)


@dataclass(frozen=True)
class Role:
    """A kind of process: the services it serves itself; whether it is the edge (callers'
    certificates authenticated here) or behind the gateway (its principal header believed
    from the pinned gateway only); whether it forwards every service to its process."""

    name: str
    serves: tuple[str, ...]
    edge: bool
    forwards: bool = False

    @property
    def behind_gateway(self) -> bool:
        return not self.edge


ROLES: dict[str, Role] = {
    "all": Role("all", serves=NAMES, edge=True),  # gateway and every service, one process
    "gateway": Role("gateway", serves=(), edge=True, forwards=True),
    **{name: Role(name, serves=(name,), edge=False) for name in NAMES},
}
