"""Run every benchmark in bench/ and write the tables to bench/RESULTS.md.

    python bench/run_all.py            # all benchmarks, rewrite bench/RESULTS.md
    python bench/run_all.py array      # only bench_array.py, print without writing
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _harness import table  # noqa: E402

SUITES = [
    ("array", "Arrays: `array_from_numpy` / `Array.numpy()` vs Flower's numpy.save/numpy.load path"),
    ("records", "Records: fastrec vs flwr 1.15.2"),
    ("sampling", "FinalizeThenSample: fastrec vs a plain NumPy implementation"),
    ("wire", "Wire format: fastrec.wire vs flwr 1.15.2's serde + protobuf"),
    ("pipeline", "End to end: serialized client Messages to one round's sample"),
    ("dask", "fastrec.dask: rounds on a LocalCluster of 2 worker processes vs one process"),
    ("app", "fastrec.app (Flower 1.42 records, object wire format) vs flwr 1.42.0 "
            "(run in a flwr 1.42 environment)"),
]


def main(argv: list[str]) -> None:
    chosen = [s for s in SUITES if not argv or s[0] in argv]
    import numpy

    try:
        import flwr
        flwr_version = flwr.__version__
    except ImportError:
        flwr_version = "not installed"
    header = [
        "# Benchmark results",
        "",
        f"Measured {datetime.date.today().isoformat()} with `python bench/run_all.py` "
        f"on {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"numpy {numpy.__version__}, flwr {flwr_version}.",
        "Each row: medians of interleaved repeats of baseline and fastrec in one interpreter, a full garbage collection before each side's turn (rows marked fresh process / steady state get their own); speed-up = baseline time / fastrec time.",
        "",
    ]
    out = list(header)
    for name, title in chosen:
        mod = importlib.import_module(f"bench_{name}")
        rows = mod.run()
        section = [f"## {title}", "", f"`python bench/bench_{name}.py`", "", table(rows), ""]
        notes = getattr(mod, "NOTES", "").strip()
        if notes:
            section += [notes, ""]
        print("\n".join(section), flush=True)
        out += section
    if not argv:
        with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
            f.write("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1:])
