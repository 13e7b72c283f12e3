"""Shared timing and table helpers for the bench/ scripts.

Every benchmark measures fastrec and its baseline in the same process, interleaved,
and reports medians of several repeats, so the ratio survives a noisy 2-core machine.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def per_call(fn: Callable[[], object], *, repeats: int = 7, min_time: float = 0.05) -> list[float]:
    """Seconds per call of ``fn``: one figure per repeat, each over enough calls to last ``min_time``."""
    fn()  # warm-up: first-call caches, page faults
    number = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_time or number >= 1 << 24:
            break
        number *= 2 if dt * 4 >= min_time else 8
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        out.append((time.perf_counter() - t0) / number)
    return out


def compare(case: str, baseline_name: str, baseline: Callable[[], object],
            fastrec: Callable[[], object], target: str = "", *, repeats: int = 7,
            min_time: float = 0.05) -> dict:
    """Time ``baseline`` and ``fastrec`` alternately; return one table row (medians)."""
    b_runs: list[float] = []
    f_runs: list[float] = []
    for _ in range(repeats):
        b_runs += per_call(baseline, repeats=1, min_time=min_time)
        f_runs += per_call(fastrec, repeats=1, min_time=min_time)
    b = statistics.median(b_runs)
    f = statistics.median(f_runs)
    return {"case": case, "baseline": baseline_name, "baseline_s": b, "fastrec_s": f,
            "ratio": b / f, "target": target}


def fmt_time(s: float) -> str:
    if s < 1e-6:
        return f"{s * 1e9:.0f} ns"
    if s < 1e-3:
        return f"{s * 1e6:.2f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def table(rows: list[dict]) -> str:
    """A Markdown table: case | baseline | baseline time | fastrec time | speed-up | target."""
    lines = ["| case | baseline | baseline time | fastrec time | speed-up | target |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['baseline']} | {fmt_time(r['baseline_s'])} | "
                     f"{fmt_time(r['fastrec_s'])} | {r['ratio']:.2f}× | {r['target']} |")
    return "\n".join(lines)
