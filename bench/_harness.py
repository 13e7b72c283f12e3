"""Shared timing and table helpers for the bench/ scripts.

Every benchmark measures fastrec and its baseline in the same process, interleaved,
and reports medians of several repeats, so the ratio survives a noisy 2-core machine.
"""

from __future__ import annotations

import gc
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
    """Time ``baseline`` and ``fastrec`` alternately; return one table row (medians).

    The cyclic garbage collector stays on (both sides pay for the collections their own
    allocations trigger), but each side's turn starts with a full collection, so neither
    pays for a collection that the other side's garbage made due."""
    b_runs: list[float] = []
    f_runs: list[float] = []
    for _ in range(repeats):
        gc.collect()
        b_runs += per_call(baseline, repeats=1, min_time=min_time)
        gc.collect()
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


def warm_allocator() -> None:
    """Allocate and free one 16 MB buffer, as any process that has handled a model-sized
    array has: glibc then raises its dynamic mmap threshold to that size (and its trim
    threshold to twice it) and stops returning freed heap to the kernel after every call, so
    temporaries up to that size no longer page-fault."""
    import numpy as np

    np.ones(1 << 22, dtype=np.float32).sum()


def row_in_child(script: str, case: str, warm: bool) -> dict:
    """Run ``script --row CASE fresh|warm`` in a new interpreter and return the row it prints.

    A fresh interpreter controls the allocator's history, which decides whether rows that
    allocate megabytes per call measure the work or the kernel's page faults.
    """
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, script, "--row", case, "warm" if warm else "fresh"],
                         capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["case"] += (" — steady state (process has freed one 16 MB buffer)" if warm else
                    " — fresh process")
    return row


def child_main(rows: dict) -> bool:
    """If invoked as ``--row CASE fresh|warm``, print that row as JSON and return True."""
    import json
    import sys

    if sys.argv[1:2] != ["--row"]:
        return False
    case, regime = sys.argv[2], sys.argv[3]
    if regime == "warm":
        warm_allocator()
    print(json.dumps(rows[case]()))
    return True
