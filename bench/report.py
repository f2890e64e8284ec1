"""How the benchmarks report: the header (machine, settings, parameters), latency summaries,
CPU shares, verdicts, cProfile texts, and the closing lines of headline figures.

A benchmark's report is one dict (printed as JSON with `--json`, see runner.py); its
`machine`, `settings` and `params` make the header.
"""

from __future__ import annotations

import io
import math
import os
import platform
import pstats
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from google import protobuf
from google.protobuf.internal import api_implementation


def machine() -> dict[str, Any]:
    """The machine and the versions the figures were measured with."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "nproc": affinity or os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": f"{protobuf.__version__} ({api_implementation.Type()})",
        "sqlite": sqlite3.sqlite_version,
    }


def print_header(title: str, report: dict[str, Any]) -> None:
    """The title, then the machine, settings and benchmark parameters of `report`."""
    m = report["machine"]
    print(title)
    print(
        f"machine:  nproc={m['nproc']} (cpu_count {m['cpu_count']}), {m['platform']}, "
        f"python {m['python']}, grpcio {m['grpcio']}, protobuf {m['protobuf']}, "
        f"sqlite {m['sqlite']}"
    )
    print("settings: " + ", ".join(f"{k}={v}" for k, v in report["settings"].items()))
    print("bench:    " + ", ".join(f"{k}={v}" for k, v in report["params"].items()))


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary_ms(
    samples_s: Sequence[float], percentiles: Sequence[int] = (50, 90, 99)
) -> dict[str, float]:
    """Latencies given in seconds, summarised in ms: `n`, `p<percentile>` for each of
    `percentiles` (nearest rank), and `max` (NaN but `n` when there are none)."""
    ordered = sorted(s * 1000 for s in samples_s)
    out: dict[str, float] = {"n": len(ordered)}
    for p in percentiles:
        out[f"p{p}"] = percentile(ordered, p) if ordered else math.nan
    out["max"] = ordered[-1] if ordered else math.nan
    return out


def share(value: float | None, missing: str = "n/a") -> str:
    """A CPU reading in shares of one core (`83%`), or `missing` when it could not be read."""
    return missing if value is None else f"{value:.0%}"


def shares(values: Sequence[float]) -> str:
    """CPU readings of several processes, `91% + 57%`."""
    return " + ".join(f"{v:.0%}" for v in values)


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def profile_text(path: Path, top: int) -> str:
    """The `top` functions of the cProfile stats in `path`, by own time and by cumulative time."""
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def print_figures(report: dict[str, Any], figures: Sequence[tuple[str, str]]) -> None:
    """The closing lines: how long the run took, then one `name=value` line per headline
    figure, each (name, its text)."""
    print()
    print(f"(took {report['elapsed_s']:.0f} s)")
    for name, text in figures:
        print(f"{name}={text}")
