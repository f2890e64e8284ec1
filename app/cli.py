"""`opconnect`: run the system, manage the development PKI and the operator registry.

    opconnect serve                        gateway + every service, one process
    opconnect serve --role R               one process of the separate-processes mode:
                                           numbers|records|usage (one service), gateway
    opconnect pki init                     make the development PKI (serve does it on first run)
    opconnect pki issue operator ID        a client certificate for a new operator
    opconnect pki issue platform NAME      a client certificate for a platform system
    opconnect pki revoke CERT.pem          revoke a certificate (CRL reloaded while running)
    opconnect pki rotate-server            re-issue the server certificate (no restart needed)
    opconnect operators add ID [--name N] --ca FILE | --pin-cert FILE | --pin SHA256
                                           register an operator (active) and the trust
                                           anchors that may speak for it
    opconnect operators trust ID [--ca FILE] [--pin-cert FILE] [--pin SHA256]
                              [--remove SHA256] [--replace]
                                           change its anchors (within registry_cache_s)
    opconnect operators suspend ID         refuse its calls (UNAUTHENTICATED), keep its data
    opconnect operators reactivate ID
    opconnect operators list               operators, their status and anchors
    opconnect simulate [--rate R]          realistic calls into a running system, to watch
    opconnect operator submit FILE.csv     as an operator: submit call durations (resumable)
    opconnect operator usage|reconcile     as an operator: usage, reconciliation report
    opconnect operator numbers ...         as an operator: list|get|upload|update|release|watch
    opconnect operator addresses ...       as an operator: list|get|create|update|delete
    opconnect operator records ...         as an operator: follow (to a file)|get|summary
    opconnect operator consents list|watch|accept|decline|terminate
                                           as an operator: its consents with customers
    opconnect audit [--operator ID]        the audit log of operator reads, newest first
    opconnect tokens rotate                a new key seals cursors and page tokens (old ones
                                           still open theirs); restart the services to use it
    opconnect tokens list                  the ids of the token keys, the sealing one first

Settings come from --config FILE (TOML) or OPCONNECT_CONFIG, then OPCONNECT_* variables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import signal
import sys
from pathlib import Path

from app import runtime as server
from app.roles import ROLES
from gateway import pki, registry
from opconnect_client import Connection
from operator_client import cli as operator
from plumbing import audit, tokens
from plumbing.config import DEV_OPERATOR, DEV_PLATFORM, Settings, describe, load_settings
from plumbing.db import Database
from plumbing.logs import configure_logging
from simulator import run as simulator


def connect_help(runtime: server.Runtime) -> str:
    dev = runtime.dev_pki
    if dev is None:
        return f"opconnect is serving on {runtime.address} (mutual TLS)."
    op_cert, op_key = dev.client(f"operator-{DEV_OPERATOR}")
    pf_cert, pf_key = dev.client(f"platform-{DEV_PLATFORM}")
    url = f"https://{runtime.address}"
    return f"""
opconnect is serving on {runtime.address} (mutual TLS; development PKI in {dev.directory})

  CA certificate: {dev.ca_cert}
  operator {DEV_OPERATOR}:
    certificate:  {op_cert}
    key:          {op_key}
  platform {DEV_PLATFORM} (the Teams admin center and call controller):
    certificate:  {pf_cert}
    key:          {pf_key}

As the operator (buf from `npm ci`; the schema comes from server reflection):
  node_modules/.bin/buf curl --protocol grpc --cacert {dev.ca_cert} \\
    --cert {op_cert} --key {op_key} \\
    {url}/opconnect.numbers.v1.NumberService/ListNumbers -d '{{}}'

As the admin center, assign a number the operator uploaded:
  node_modules/.bin/buf curl --protocol grpc --cacert {dev.ca_cert} \\
    --cert {pf_cert} --key {pf_key} \\
    {url}/opconnect.numbers.v1.NumberAdminService/AssignNumber -d '{{...}}'

See calls flow: in another terminal, publish realistic traffic (5 calls a second)...
  .venv/bin/opconnect simulate

...and stream the operator's call records as they are published:
  node_modules/.bin/buf curl --protocol grpc --cacert {dev.ca_cert} \\
    --cert {op_cert} --key {op_key} \\
    {url}/opconnect.records.v1.CallRecordService/StreamCallRecords -d '{{"follow":true}}'

{metrics_line(runtime)}
Ctrl-C stops it (streams end cleanly; clients resume from their last cursor).
"""


def metrics_line(runtime: server.Runtime) -> str:
    """Where Prometheus scrapes this process, or how to turn metrics on."""
    if runtime.metrics_endpoint is None:
        return "Metrics are off (set metrics_listen, e.g. OPCONNECT_METRICS_LISTEN=127.0.0.1:9464)."
    return f"Prometheus metrics: {runtime.metrics_endpoint.url}"


async def serve(settings: Settings, role: str = "all") -> None:
    runtime = await server.start(settings, role)
    server.freeze_start_up_objects()  # no full collection walks them again (see there)
    if role == "all":
        print(connect_help(runtime), file=sys.stderr, flush=True)
    else:
        print(f"opconnect {role} is serving on {runtime.address}", file=sys.stderr, flush=True)
        print(metrics_line(runtime), file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runtime.stop()


def _pki_paths(settings: Settings) -> pki.PkiPaths:
    return pki.PkiPaths.at(settings.pki_dir)


def cmd_pki(args: argparse.Namespace, settings: Settings) -> int:
    if args.pki == "init":
        paths = pki.ensure_dev_pki(settings.pki_dir, DEV_OPERATOR, DEV_PLATFORM)
        print(f"development PKI ready in {paths.directory}")
    elif args.pki == "issue":
        cert, key = pki.issue_client(_pki_paths(settings), args.kind, args.ident)
        print(f"certificate {cert}\nprivate key {key} (mode 0600: hand it over securely)")
        if args.kind == "operator":
            ca = _pki_paths(settings).operator_ca_cert
            print(f"register the operator too: opconnect operators add {args.ident} --ca {ca}")
    elif args.pki == "revoke":
        pki.revoke(_pki_paths(settings), Path(args.cert).read_bytes())
        print(f"revoked; {_pki_paths(settings).crl} updated (a running server reloads it)")
    elif args.pki == "rotate-server":
        pki.rotate_server_cert(_pki_paths(settings), args.dns, args.ip)
        print("server certificate re-issued (new connections use it; no restart)")
    return 0


def _anchors(args: argparse.Namespace) -> list[registry.Anchor]:
    """The anchors named by --ca, --pin-cert and --pin."""
    anchors: list[registry.Anchor] = []
    for path in args.ca or ():
        anchors += registry.ca_anchors(Path(path).read_bytes())
    for path in args.pin_cert or ():
        anchors.append(registry.pinned_anchor(cert_pem=Path(path).read_bytes()))
    for fingerprint in args.pin or ():
        anchors.append(registry.pinned_anchor(fingerprint))
    return anchors


def _show(operator: registry.Operator) -> None:
    print(f"{operator.operator_id}\t{operator.status.value}\t{operator.display_name}")
    for anchor in operator.anchors:
        print(f"  {anchor}")
    if not operator.anchors:
        print(
            "  no trust anchor: its calls are refused (NO_TRUST_ANCHOR) until"
            f" `opconnect operators trust {operator.operator_id} --ca FILE`"
        )


def cmd_operators(args: argparse.Namespace, settings: Settings) -> int:
    db = Database(settings.sqlalchemy_url, threads=1)
    try:
        db.migrate()
        if args.operators == "add":
            found = db.transaction(
                registry.add_operator, args.id, args.name, _anchors(args), write=True
            )
            _show(found)
            return 0
        if args.operators == "trust":
            found = db.transaction(
                registry.trust_operator,
                args.id,
                _anchors(args),
                args.remove or [],
                args.replace,
                write=True,
            )
            _show(found)
            return 0
        if args.operators in ("suspend", "reactivate"):
            status = (
                registry.OperatorStatus.SUSPENDED
                if args.operators == "suspend"
                else registry.OperatorStatus.ACTIVE
            )
            found = db.transaction(registry.set_status, args.id, status, write=True)
        else:
            for operator in db.transaction(registry.list_operators):
                _show(operator)
            return 0
        print(f"{found.operator_id}: {found.status.value}")
        return 0
    finally:
        db.close()


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    since = dt.datetime.fromisoformat(args.since) if args.since else None
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=dt.UTC)
    principal = f"operator/{args.operator}" if args.operator else None
    db = Database(settings.sqlalchemy_url, threads=1)
    try:
        db.migrate()
        events = db.transaction(audit.list_events, principal, since, args.limit)
    finally:
        db.close()
    for event in events:
        filters = " ".join(f"{k}={v}" for k, v in sorted(event.filters.items()))
        print(
            f"{event.at.isoformat(timespec='milliseconds')}\t{event.principal}\t{event.method}"
            f"\t{event.status}\t{event.record_count} records\t{event.duration_ms:.1f} ms"
            f"\t{event.request_id}\t{filters}"
        )
    return 0


def cmd_tokens(args: argparse.Namespace, settings: Settings) -> int:
    if settings.token_keys:
        if args.tokens == "rotate":
            print(
                "opconnect: the keys come from the token_keys setting: put this new key first"
                f" there, keep the others:\n{tokens.new_key()}",
                file=sys.stderr,
            )
            return 1
        ids = tokens.Keyring(tokens.parse_keys(settings.token_keys, "token_keys")).ids
    elif args.tokens == "rotate":
        path = settings.token_keys_path
        print(
            f"{tokens.rotate_key_file(path)}: the new sealing key in {path}; restart the services"
        )
        return 0
    else:
        ids = tokens.keys_of_file(settings.token_keys_path)
    print("\n".join(ids))
    return 0


def cmd_operator(args: argparse.Namespace, settings: Settings) -> int:
    dev = pki.PkiPaths.at(settings.pki_dir)
    cert, key = dev.client(f"operator-{DEV_OPERATOR}")
    connection = Connection(
        target=args.target,
        ca=Path(args.ca) if args.ca else dev.ca_cert,
        cert=Path(args.cert) if args.cert else cert,
        key=Path(args.key) if args.key else key,
    )
    return operator.run(connection, args)


def cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    options = simulator.Options(
        target=args.target,
        pki_dir=Path(args.pki_dir) if args.pki_dir else settings.pki_dir,
        operator=args.operator,
        tenant=args.tenant,
        numbers=args.numbers,
        rate=args.rate,
        calls=args.calls,
        duration=args.duration,
        poor_share=args.poor_share,
        report=not args.no_durations,
        missing_share=args.missing_share,
        mismatch_share=args.mismatch_share,
        extra_share=args.extra_share,
        unanswered_share=args.unanswered_share,
        seed=args.seed,
    )
    try:
        return asyncio.run(simulator.simulate(options))
    except KeyboardInterrupt:
        return 130


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="opconnect",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="settings (OPCONNECT_<NAME>, default):\n"
        + "\n".join(f"  {name:<26} {value}" for name, value in describe()),
    )
    top.add_argument("--config", help="TOML settings file")
    commands = top.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run gateway and services (one process)")
    serve_cmd.add_argument(
        "--role",
        choices=list(ROLES),
        default="all",
        help="all (default): everything in one process; numbers, records or usage: that"
        " service alone (behind a gateway); gateway: the gateway alone, forwarding to the"
        " processes in the *_target settings",
    )

    pki_cmd = commands.add_parser("pki", help="development PKI").add_subparsers(
        dest="pki", required=True
    )
    pki_cmd.add_parser("init", help="make what is missing of the development PKI")
    issue = pki_cmd.add_parser("issue", help="issue a client certificate")
    issue.add_argument("kind", choices=["operator", "platform"])
    issue.add_argument("ident", help="operator id or platform name: a-z, 0-9, '-'")
    revoke = pki_cmd.add_parser("revoke", help="revoke a certificate")
    revoke.add_argument("cert", help="the certificate's PEM file")
    rotate = pki_cmd.add_parser("rotate-server", help="re-issue the server certificate")
    rotate.add_argument("--dns", nargs="*", default=["localhost"])
    rotate.add_argument("--ip", nargs="*", default=["127.0.0.1", "::1"])

    ops = commands.add_parser("operators", help="the operator registry").add_subparsers(
        dest="operators", required=True
    )
    add = ops.add_parser("add", help="register an operator and its trust anchors")
    add.add_argument("id")
    add.add_argument("--name", default="")
    trust = ops.add_parser("trust", help="change the trust anchors that may speak for an operator")
    trust.add_argument("id")
    trust.add_argument(
        "--remove",
        action="append",
        metavar="SHA256",
        help="drop the anchor of this fingerprint (or CA key-sha256), as `list` shows it",
    )
    trust.add_argument("--replace", action="store_true", help="drop all its anchors first")
    for command in (add, trust):
        command.add_argument(
            "--ca",
            action="append",
            metavar="FILE",
            help="a PEM file of CA certificates whose certificates may speak for it",
        )
        command.add_argument(
            "--pin-cert",
            action="append",
            metavar="FILE",
            help="a PEM client certificate that may speak for it (pinned by fingerprint)",
        )
        command.add_argument(
            "--pin",
            action="append",
            metavar="SHA256",
            help="the SHA-256 fingerprint of a client certificate that may speak for it",
        )
    for name in ("suspend", "reactivate"):
        ops.add_parser(name).add_argument("id")
    ops.add_parser("list")

    aud = commands.add_parser("audit", help="the audit log of operator reads, newest first")
    aud.add_argument("--operator", help="only this operator's reads")
    aud.add_argument("--since", help="only reads from this time on (ISO 8601; UTC if no zone)")
    aud.add_argument("--limit", type=int, default=100, help="most events shown (default 100)")

    tok = commands.add_parser("tokens", help="the keys of cursors and page tokens")
    tok_cmd = tok.add_subparsers(dest="tokens", required=True)
    tok_cmd.add_parser("rotate", help="a new key seals; the old ones still open")
    tok_cmd.add_parser("list", help="the keys' ids, the sealing key's first")

    op = commands.add_parser(
        "operator",
        help="an operator's client: numbers, call records, durations, usage, reconciliation",
        description="Play an operator against the platform: by default the development"
        " operator's certificate and localhost:50051.",
    )
    op.add_argument(
        "--target",
        default="localhost:50051",
        help="the platform's host:port, or several gateways (calls spread, one down skipped):"
        " ipv4:10.0.0.5:50051,10.0.0.6:50051 or dns:///NAME:PORT",
    )
    op.add_argument("--ca", help="CA of the platform's certificate (default: dev PKI)")
    op.add_argument("--cert", help="your client certificate (default: dev operator's)")
    op.add_argument("--key", help="its private key (default: dev operator's)")
    operator.add_commands(op)

    sim = commands.add_parser("simulate", help="publish realistic calls to a running system")
    sim.add_argument(
        "--target",
        default="localhost:50051",
        help="the gateway's host:port, or several gateways (calls spread, one down skipped):"
        " ipv4:10.0.0.5:50051,10.0.0.6:50051 or dns:///NAME:PORT",
    )
    sim.add_argument("--pki-dir", help="development PKI (default <data_dir>/pki)")
    sim.add_argument("--operator", default=DEV_OPERATOR)
    sim.add_argument("--tenant", default=simulator.DEV_TENANT, help="customer tenant (GUID)")
    sim.add_argument("--numbers", type=int, default=20, help="numbers to upload and assign")
    sim.add_argument("--rate", type=float, default=5.0, help="calls a second")
    until = sim.add_mutually_exclusive_group()
    until.add_argument("--calls", type=int, help="stop after N calls (default: at Ctrl-C)")
    until.add_argument("--duration", type=float, help="stop after S seconds")
    sim.add_argument("--poor-share", type=float, default=0.1, help="share of poor calls")
    sim.add_argument(
        "--no-durations", action="store_true", help="the operator reports no call durations"
    )
    sim.add_argument("--missing-share", type=float, default=0.03, help="calls it leaves out")
    sim.add_argument("--mismatch-share", type=float, default=0.02, help="durations it gets wrong")
    sim.add_argument("--extra-share", type=float, default=0.01, help="calls it invents")
    sim.add_argument(
        "--unanswered-share",
        type=float,
        default=0.01,
        help="unanswered calls it reports a duration for",
    )
    sim.add_argument("--seed", type=int, help="repeat a run's mix of calls")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except (OSError, ValueError) as error:
        print(f"opconnect: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    try:
        if args.command == "serve":
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(serve(settings, args.role))
            return 0
        if args.command == "pki":
            return cmd_pki(args, settings)
        if args.command == "simulate":
            return cmd_simulate(args, settings)
        if args.command == "operator":
            return cmd_operator(args, settings)
        if args.command == "audit":
            return cmd_audit(args, settings)
        if args.command == "tokens":
            return cmd_tokens(args, settings)
        return cmd_operators(args, settings)
    except (OSError, ValueError, LookupError) as error:
        print(f"opconnect: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
