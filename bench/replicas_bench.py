"""Assignment -> watcher event latency across replicas: AssignNumber through one gateway, the
event received on a WatchAssignments stream through another.

Four server processes of the separate-processes mode on one database: two numbers processes
and two gateways, gateway A forwarding to numbers process 1 and gateway B to numbers process 2
(`numbers_target`). On PostgreSQL (`--database postgresql+psycopg://...`) a change committed
by process 1 wakes the watcher's stream on process 2 through LISTEN/NOTIFY, the production
path with replicas. On SQLite there is no wake-up between processes, so there both gateways
forward to numbers process 1 and only the gateways are crossed (said in the report).

Two ways, in the same run, alternating in rounds: `cross` (assign through A, watch through B)
and `same` (assign and watch through A: one numbers process, woken in-process), each change
timed from sending AssignNumber (or UnassignNumber) to its event arriving, and the change's own
call (to its answer) beside it: what the event waits for before it can be sent at all. The
headline is the cross-replica p99 (target < 50 ms on PostgreSQL) and its ratio to the
same-replica p99.

With `--pgbouncer`, the same four processes again with their pools behind a pgbouncer of the
run's own (transaction pooling; each numbers process's LISTEN connection direct, statements
never prepared), as two more ways taken in turn with the others: the ratio of their p50s to
the direct ones is the pooler's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import runner
import sqlalchemy as sa
from numbers_bench import POOL, notify_latency
from report import machine, print_figures, print_header, summary_ms, verdict
from runner import OPERATOR, TENANT, ServerProcess, credentials, grant_consent

from gateway.pki import GATEWAY_NAME
from opconnect.numbers.v1 import numbers_pb2 as pb
from opconnect.numbers.v1 import numbers_pb2_grpc as pb_grpc

TARGET_P99_MS = 50.0
WARMUP = 10


async def upload(address: str, root: Path) -> None:
    civic_address = await grant_consent(address, root, OPERATOR, TENANT)
    async with grpc.aio.secure_channel(address, credentials(root, "operator", OPERATOR)) as channel:
        both = pb.Capabilities(inbound=True, outbound=True)
        uploaded = await pb_grpc.NumberServiceStub(channel).UploadNumbers(
            pb.UploadNumbersRequest(
                tenant_id=TENANT,
                numbers=[
                    pb.NumberUpload(
                        phone_number=n,
                        usage=pb.NUMBER_USAGE_USER,
                        capabilities=both,
                        civic_address_id=civic_address,
                    )
                    for n in POOL
                ],
            )
        )
    if uploaded.added_count != len(POOL):
        raise RuntimeError(f"upload failed: {uploaded}")


async def timed_changes(
    change_at: str, watch_at: str, root: Path, changes: int, start: int
) -> tuple[list[float], list[float], int]:
    """`changes` assignment changes made through `change_at` (after WARMUP untimed ones), each
    timed from its call to its event on a watcher through `watch_at` (numbers_bench.py's
    `notify_latency`); the times (seconds), the change calls' own round trips (seconds), and
    how many events never came. `start`: where in the pool's assign/unassign cycle to begin."""
    result = await notify_latency(change_at, root, changes, WARMUP, watch_at=watch_at, start=start)
    return result.notify, result.rpc, result.timeouts


class PgBouncer:
    """pgbouncer in transaction pooling mode on a free port, in front of the server of the
    workspace's URL, each server connection set to that URL's schema (pgbouncer refuses the
    URL's `options`); as `nobody` when run by root. `url` reaches it."""

    def __init__(self, direct: str, directory: Path) -> None:
        server = sa.make_url(direct)
        schema = str(server.query["options"]).rsplit("=", 1)[1]
        directory.mkdir(mode=0o755)
        directory.chmod(0o755)  # readable by nobody
        (directory / "users.txt").write_text(f'"{server.username}" ""\n')
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        lines = [
            "[databases]",
            f"bench = host={server.host} port={server.port or 5432} dbname={server.database}"
            f" connect_query='SET search_path TO {schema}'",
            "[pgbouncer]",
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =",
            f"auth_type = trust\nauth_file = {directory / 'users.txt'}",
            "pool_mode = transaction\ndefault_pool_size = 20\nlogfile =\npidfile =",
        ]
        (directory / "pgbouncer.ini").write_text("\n".join(lines) + "\n")
        for path in directory.iterdir():
            path.chmod(0o644)
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        self.process = subprocess.Popen(
            [binary, "-q", *user, str(directory / "pgbouncer.ini")], stdin=subprocess.DEVNULL
        )
        self.url = f"postgresql+psycopg://{server.username}@127.0.0.1:{port}/bench"
        deadline = time.monotonic() + 30
        while not _listening(port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("pgbouncer did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    postgres = args.database.startswith("postgresql")
    with (
        runner.workspace(
            "opconnect-bench-", [("platform", GATEWAY_NAME)], database_url=args.database
        ) as ws,
        runner.Children() as children,
    ):
        root = ws.root
        # One data folder: the numbers processes share the token keys, as replicas must.
        first = children.add(ServerProcess("split-numbers", ws.spec()))
        second = children.add(ServerProcess("split-numbers", ws.spec())) if postgres else first
        gateway_a = children.add(ServerProcess("split", ws.spec(numbers_target=first.address)))
        gateway_b = children.add(ServerProcess("split", ws.spec(numbers_target=second.address)))
        asyncio.run(upload(gateway_a.address, root))
        ways = {"cross": (gateway_a, gateway_b), "same": (gateway_a, gateway_a)}
        if args.pgbouncer:  # the same four processes again, their pools behind pgbouncer
            pooler = children.add(PgBouncer(ws.database_url, root / "pgbouncer"))
            behind = ws.spec(
                database_url=pooler.url,
                database_listen_url=ws.database_url,
                db_prepare_threshold=0,
            )
            one = children.add(ServerProcess("split-numbers", behind))
            two = children.add(ServerProcess("split-numbers", behind))
            a = children.add(ServerProcess("split", {**behind, "numbers_target": one.address}))
            b = children.add(ServerProcess("split", {**behind, "numbers_target": two.address}))
            ways |= {"cross-pgbouncer": (a, b), "same-pgbouncer": (a, a)}
        times: dict[str, list[float]] = {way: [] for way in ways}
        calls: dict[str, list[float]] = {way: [] for way in ways}
        missed = dict.fromkeys(ways, 0)
        position = 0
        for round_no in range(1, args.rounds + 1):
            for way in runner.in_turn(list(ways), round_no):
                change_at, watch_at = ways[way]
                got, answered, lost = asyncio.run(
                    timed_changes(change_at.address, watch_at.address, root, args.changes, position)
                )
                position += WARMUP + args.changes  # even: each number unassigned again
                times[way] += got
                calls[way] += answered
                missed[way] += lost
    latency = {way: summary_ms(found) for way, found in times.items()}
    cross_p99 = latency["cross"]["p99"]
    pooled: dict[str, float] = {}
    if args.pgbouncer:  # pooled p50 / direct p50, each way
        for way in ("cross", "same"):
            pooled[way] = latency[f"{way}-pgbouncer"]["p50"] / latency[way]["p50"]
    return {
        "machine": machine(),
        "backend": "postgresql" if postgres else "sqlite",
        "settings": {
            "database": "postgresql" if postgres else "sqlite (WAL) in a temp dir",
            "processes": "2 gateways, 2 numbers" if postgres else "2 gateways, 1 numbers",
        },
        "params": {"changes": args.changes, "rounds": args.rounds, "warmup": WARMUP},
        "latency_ms": latency,
        "change_rpc_ms": {way: summary_ms(found) for way, found in calls.items()},
        "missed": missed,
        "cross_replicas": postgres,
        "target_p99_ms": TARGET_P99_MS,
        "cross_p99_ms": round(cross_p99, 3),
        "cross_over_same_p99": cross_p99 / latency["same"]["p99"],
        "pgbouncer_over_direct_p50": pooled,
    }


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    print_header("assignment -> watcher event, across replicas", report)
    print()
    print(
        f"{'way':<16}{'n':>6}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'max ms':>10}{'missed':>8}"
    )
    for way, found in report["latency_ms"].items():
        print(
            f"{way:<16}{found['n']:>6.0f}{found['p50']:>10.1f}{found['p90']:>10.1f}"
            f"{found['p99']:>10.1f}{found['max']:>10.1f}{report['missed'][way]:>8}"
        )
    print("the change's own call (AssignNumber / UnassignNumber through gateway A), same changes:")
    for way, found in report["change_rpc_ms"].items():
        print(
            f"{way:<16}{found['n']:>6.0f}{found['p50']:>10.1f}{found['p90']:>10.1f}{found['p99']:>10.1f}{found['max']:>10.1f}"
        )
    crossing = "numbers processes and gateways" if report["cross_replicas"] else "gateways only"
    print()
    print(
        f"cross ({crossing}): p99 {report['cross_p99_ms']:.1f} ms, target <"
        f" {report['target_p99_ms']:.0f} ms: {verdict(report['cross_p99_ms'] < TARGET_P99_MS)};"
        f" {report['cross_over_same_p99']:.2f}x the same-replica p99"
    )
    pooled = report["pgbouncer_over_direct_p50"]
    for way, ratio in pooled.items():
        print(f"{way} through pgbouncer: p50 {ratio:.2f}x the direct p50")
    print_figures(
        report,
        [
            ("cross_p99_ms", f"{report['cross_p99_ms']:.1f}"),
            ("cross_over_same_p99", f"{report['cross_over_same_p99']:.2f}"),
            *[(f"pgbouncer_{way}_p50_ratio", f"{ratio:.2f}") for way, ratio in pooled.items()],
        ],
    )


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--changes", type=int, default=300, help="timed changes per way and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, the ways in turn")
    p.add_argument(
        "--pgbouncer",
        action="store_true",
        help="PostgreSQL: also the same processes with their pools behind pgbouncer (transaction"
        " pooling, Debian's `pgbouncer`; LISTEN direct, statements never prepared)",
    )


def check(args: argparse.Namespace) -> str | None:
    args.changes += args.changes % 2  # each number assigned, then unassigned
    if args.pgbouncer and not args.database.startswith("postgresql"):
        return "--pgbouncer needs --database postgresql+psycopg://..."
    return None


async def serve(spec: runner.Spec) -> None:
    await runner.serve(spec, service="numbers")


SCENARIO = runner.Scenario(
    description=__doc__ or "",
    options=options,
    quick={"changes": 20, "rounds": 1},
    roles={"serve": serve},
    run=run,
    print_report=print_report,
    check=check,
)

if __name__ == "__main__":
    sys.exit(runner.main(SCENARIO))
