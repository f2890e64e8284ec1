"""The README's `buf curl` examples work as written, on any day: every shell block of "Connecting
as an operator" and the sections after it that calls `$BUF curl` is run, in order, by bash
against a server started as `make run` starts it (its data in `var/`), with only the port
changed. A stream that follows (a watch, `"follow":true`) is stopped after 3 s, as a reader
would press Ctrl-C; every other command must succeed."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import grpc

from opconnect.records.v1 import records_pb2_grpc
from tests.helpers import ServerProcess
from tests.records_data import publish_records, record

ROOT = Path(__file__).resolve().parent.parent
FIRST, LAST = "## Connecting as an operator", "### Errors"


def commands() -> list[str]:
    """The commands of the README's examples that use buf, continuation lines joined."""
    text = ROOT.joinpath("README.md").read_text()
    section = text[text.index(FIRST) : text.index(LAST)]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    found: list[str] = []
    for block in blocks:
        if "$BUF" not in block and "BUF=" not in block:
            continue
        joined = block.replace("\\\n", " ")
        found += [line for line in joined.splitlines() if line.strip() and not line.startswith("#")]
    return found


def script(port: int) -> str:
    lines = ["set -euo pipefail"]
    for written in commands():
        run = written.replace("localhost:50051", f"localhost:{port}")
        run = run.replace("BUF=node_modules/.bin/buf", f"BUF={ROOT}/node_modules/.bin/buf")
        if "/Watch" in run or '"follow":true' in run:
            run = f"timeout 3 {run} || test $? -eq 124"
        lines.append(f"echo {shlex.quote('>>> ' + written[:70])}")
        lines.append(run)
    return "\n".join(lines) + "\n"


def test_the_readme_examples_work_as_written(tmp_path: Path) -> None:
    assert len(commands()) >= 15, commands()
    server = ServerProcess(tmp_path / "var")
    try:
        # A call of the dev operator, published today, for the records examples to read.
        pki = tmp_path / "var" / "pki"
        credentials = grpc.ssl_channel_credentials(
            (pki / "ca.pem").read_bytes(),
            (pki / "clients" / "platform-admin-center.key").read_bytes(),
            (pki / "clients" / "platform-admin-center.pem").read_bytes(),
        )
        with grpc.secure_channel(server.address, credentials) as channel:
            publish_records(records_pb2_grpc.CallRecordIngestServiceStub(channel), [record()])
        done = subprocess.run(
            ["bash", "-c", script(server.port)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        server.stop()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert '"outcome": "CALL_DURATION_OUTCOME_ACCEPTED"' in done.stdout
    assert '"releasedCount": 1' in done.stdout
    assert '"callId"' in done.stdout
