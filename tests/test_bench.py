"""The benchmarks still run: each one at its tiny `--quick` size, as a script in a process of its
own (as `make bench` runs them), exits 0 and prints its report and then its figures as JSON; on
SQLite, and on PostgreSQL too when OPCONNECT_TEST_POSTGRES_URL is set (`--database`: the run's
schemas on that server, its raw baselines on PostgreSQL).

Only that the figures are there and make sense (positive rates, checks passed) is asserted,
never how fast anything was: the machines these run on are small and noisy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NO_POSTGRES, POSTGRES_URL

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "postgresql" and not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    return str(request.param)


def run_bench(name: str, backend: str = "sqlite") -> dict[str, Any]:
    """Run `bench/<name>_bench.py --quick --json` from the repository root on `backend`; its
    JSON document (what follows the report on stdout)."""
    database = ["--database", POSTGRES_URL] if backend == "postgresql" else []
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}_bench.py"), "--quick", "--json", *database],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    start = done.stdout.index("\n{\n") + 1
    report: dict[str, Any] = json.loads(done.stdout[start:])
    assert report["elapsed_s"] > 0
    assert {"machine", "settings", "params"} <= report.keys()
    assert report["backend"] == backend  # every baseline measured on the backend named
    return report


def positive(*values: Any) -> bool:
    return all(isinstance(v, int | float) and v > 0 for v in values)


def test_numbers_bench(backend: str) -> None:
    report = run_bench("numbers", backend)
    best = report["getnumber"]["best"]
    assert positive(best["bare"], best["system"], best["split"])
    assert positive(report["getnumber_ratio"], report["split_ratio"], report["notify_p99_ms"])
    assert positive(report["metrics_ratio"], report["tracing_ratio"])
    assert report["getnumber"]["spans_exported"] > 0  # the traced system exported its spans
    notify = report["notify"]
    assert notify["latency_ms"]["n"] > 0
    assert positive(notify["getnumber_rtt_ms"]["system"]["p99"], notify["raw_commit_ms"]["p99"])
    assert positive(report["assign_commit_ratio"])


def test_records_bench(backend: str) -> None:
    report = run_bench("records", backend)
    records = report["params"]["records"]
    assert report["fill"]["records"] == records
    assert report["fill"]["checked"] == report["fill"]["templates"] > 0
    best = report["stream"]["best"]["500"]
    assert positive(best["bare"], best["system"], best["split"])
    assert report["stream"]["split_check"]["records"] == records
    assert all(r["records"] == records for r in report["stream"]["runs"])
    assert positive(report["stream_ratio"], report["stream_split_ratio"])
    assert positive(report["stream_metrics_ratio"], report["stream_tracing_ratio"])
    assert report["stream"]["spans_exported"] > 0
    assert "growth_10_to_100_mb_worst" in report["memory"]
    assert isinstance(report["stream_rss_growth_mb"], float)
    publish = report["publish"]
    assert positive(publish["best"]["system"], publish["best"]["raw"], report["publish_ratio"])
    kinds = {run["kind"] for run in publish["runs"]}
    if backend == "postgresql":  # raw inserts by executemany and by COPY
        assert {"raw", "raw (copy)"} <= kinds and positive(publish["copy_ratio"])
    else:
        assert "raw (copy)" not in kinds and publish["copy_ratio"] is None
    for run in publish["runs"]:
        if run["kind"] == "system":
            assert run["accepted"] == report["params"]["publish_records"]


def test_usage_bench(backend: str) -> None:
    report = run_bench("usage", backend)
    ingest = report["ingest"]
    assert positive(ingest["best"]["system"], ingest["best"]["raw"], report["ingest_ratio"])
    assert (ingest["copy_ratio"] is not None) == (backend == "postgresql")
    for run in ingest["runs"]:
        if run["kind"] == "system":
            assert run["accepted"] == report["params"]["records"]
    assert report["fill"]["platform_calls"] == report["params"]["calls"]
    assert report["month"]["problems"] == []  # every answer equal to what was filled
    assert report["expected"]["discrepancies"] > 0
    assert positive(report["reconcile_s"], report["discrepancies_s"], report["usage_summary_s"])


def test_fairness_bench(backend: str) -> None:
    report = run_bench("fairness", backend)
    samples = report["params"]["samples"]
    for phase in ("alone", "loaded"):
        assert 0 < report[phase]["read_ms"]["n"] <= report[phase]["write_ms"]["n"] <= samples
        assert positive(report[phase]["write_ms"]["p99"], report[phase]["read_ms"]["p99"])
    assert positive(report["write_p99_ratio"], report["read_p99_ratio"])
    assert not any(k.startswith("UNAVAILABLE") for k in report["busy"])


def test_sustained_bench() -> None:
    report = run_bench("sustained")
    publish, submit, delivery = report["publish"], report["submit"], report["delivery"]
    assert publish["records"] > 0 and publish["accepted"] + publish["refused"] <= publish["records"]
    assert publish["ack_ms"]["n"] > 0 and submit["ack_ms"]["n"] > 0
    assert submit["accepted"] > 0  # the answered calls' durations went alongside
    assert delivery["followers"] == report["params"]["followers"] == 50
    assert delivery["latency_ms"]["n"] > 0
    # Each follower got each accepted record of its operator exactly once (the mechanism,
    # whatever the speed).
    assert delivery["missing"] == delivery["duplicated"] == delivery["unexpected"] == 0
    assert report["exactly_once"] is True
    assert len(report["memory"]["samples"]) >= 2
    assert isinstance(report["memory"]["slope_mb_per_min"], float)
    assert {"ack_p99", "delivery_p99", "memory_flat", "rate_held"} <= report["verdicts"].keys()
    assert report["timeline"] and all("t" in row for row in report["timeline"])
    assert "system" in report["probes"]


def test_log_lock_bench() -> None:
    report = run_bench("log_lock")
    assert report["duplicated_call_ids"] == 0
    assert positive(
        report["storage_ratio"], report["lock_mean_ms"], report["lock_allows_batches_per_s"]
    )


def test_replicas_bench() -> None:
    report = run_bench("replicas")  # SQLite: across the gateways only
    for way in ("cross", "same"):
        assert report["latency_ms"][way]["n"] > 0
    assert positive(report["cross_p99_ms"], report["cross_over_same_p99"])
