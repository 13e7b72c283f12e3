"""fastrec.app vs flwr 1.42.0's flwr.app (records and the object wire format).

Run in an environment with flwr >= 1.19 (e.g. the one `.ci/flwr-next` builds):
    python bench/bench_app.py
With an older flwr (the test extra's 1.15.2) it prints a note and measures nothing.
"""

from __future__ import annotations

import hashlib
import os
import sys
from importlib.metadata import version

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import child_main, compare, row_in_child, table  # noqa: E402

from fastrec import app  # noqa: E402

FLWR = version("flwr")
NEXT = tuple(int(x) for x in FLWR.split(".")[:2]) >= (1, 19)
NOTES = "" if NEXT else (f"Skipped: the installed flwr is {FLWR}; fastrec.app is compared with "
                         "flwr >= 1.19. Run `bash .ci/flwr-next` or use a flwr 1.42.0 venv.")
if NEXT:
    import flwr.app as fa


def _small_records(mod, n=10_000):
    return [mod.MetricRecord({"acc": 0.5 + i * 1e-6, "loss": 1.25, "n": i, "h": [0.1, 0.2]})
            for i in range(n)]


def _array_record_row():
    arrays = [np.random.default_rng(i).standard_normal(10_000).astype(np.float32)
              for i in range(100)]
    return compare("`ArrayRecord.from_numpy_ndarrays` 100 × 10k float32", "flwr 1.42.0",
                   lambda: fa.ArrayRecord.from_numpy_ndarrays(arrays),
                   lambda: app.ArrayRecord.from_numpy_ndarrays(arrays), "≥ 5×")


def _big_array_row():
    x = np.random.default_rng(0).standard_normal(10_000_000).astype(np.float32)  # 40 MB
    src = app.Array(x)
    data = src.data

    def baseline():
        hashlib.sha256(data).hexdigest()
        return bytearray(data)

    def ours():
        a = app.Array(src.dtype, src.shape, src.stype, data)  # fresh: no cached chunk ids
        return a.deflate(), [ch.deflate() for ch in a.children.values()]

    row = compare("`Array.deflate` 40 MB float32 + its chunks' deflate (ids included)",
                  "sha256 + one copy", baseline, ours, "within 1.3× (speed-up ≥ 0.77×)",
                  repeats=5, min_time=0.2)
    return row


def _flower_big_array_row():
    x = np.random.default_rng(0).standard_normal(10_000_000).astype(np.float32)
    src = app.Array(x)
    data = src.data

    def theirs():
        a = fa.Array(src.dtype, src.shape, src.stype, data)
        return a.deflate(), [ch.deflate() for ch in a.children.values()]

    def ours():
        a = app.Array(src.dtype, src.shape, src.stype, data)
        return a.deflate(), [ch.deflate() for ch in a.children.values()]

    return compare("`Array.deflate` 40 MB float32 + chunks", "flwr 1.42.0", theirs, ours, "",
                   repeats=3, min_time=0.2)


def _deflate_row():
    theirs, ours = _small_records(fa), _small_records(app)
    return compare("`MetricRecord.deflate` × 10,000 small records", "flwr 1.42.0",
                   lambda: [r.deflate() for r in theirs],
                   lambda: [r.deflate() for r in ours], "≥ 30×", repeats=5, min_time=0.2)


def _inflate_row():
    contents = [r.deflate() for r in _small_records(fa)]
    assert contents == [r.deflate() for r in _small_records(app)]
    return compare("`MetricRecord.inflate` × 10,000 small records", "flwr 1.42.0",
                   lambda: [fa.MetricRecord.inflate(c) for c in contents],
                   lambda: [app.MetricRecord.inflate(c) for c in contents], "≥ 30×",
                   repeats=5, min_time=0.2)


def _columns_row():
    from fastrec import TensorSpec
    from fastrec.wire import metrics_columns
    contents = [r.deflate() for r in _small_records(fa)]
    spec = {"acc": TensorSpec("float64"), "loss": TensorSpec("float64"), "n": TensorSpec("int64"),
            "h": TensorSpec("float64", (2,))}

    def theirs():  # what a Flower 1.42 server does to get the same columns
        recs = [fa.MetricRecord.inflate(c) for c in contents]
        return {"acc": np.array([r["acc"] for r in recs], dtype=np.float64),
                "loss": np.array([r["loss"] for r in recs], dtype=np.float64),
                "n": np.array([r["n"] for r in recs], dtype=np.int64),
                "h": np.array([r["h"] for r in recs], dtype=np.float64)}

    def ours():
        return metrics_columns(contents, None, spec, wire="metric-record-object")

    want, got = theirs(), ours()
    assert all(np.array_equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want)
    return compare("`metrics_columns(wire=\"metric-record-object\")` × 10,000 small records",
                   "flwr 1.42.0 `inflate` + numpy columns", theirs, ours, "≥ 300×",
                   repeats=5, min_time=0.2)


# Rows that allocate tens of thousands of objects per call run in their own
# interpreter, so neither side's garbage (and the collector's passes over it)
# is charged to the other.
ROWS = {"array_record": _array_record_row, "deflate": _deflate_row, "inflate": _inflate_row,
        "columns": _columns_row}


def run() -> list[dict]:
    if not NEXT:
        print(NOTES)
        return []
    floats = {f"m{i}": i * 0.001 for i in range(1000)}
    x33 = np.random.default_rng(0).standard_normal((3, 3))
    rows = [
        compare("`MetricRecord` from 1,000 floats", "flwr 1.42.0",
                lambda: fa.MetricRecord(floats), lambda: app.MetricRecord(floats), "≥ 30×"),
        compare("`Array(ndarray)` 3×3 float64", "flwr 1.42.0",
                lambda: fa.Array(x33), lambda: app.Array(x33), "≥ 20×"),
    ]
    rows.append(row_in_child(os.path.abspath(__file__), "array_record", warm=True))
    rows.append(row_in_child(os.path.abspath(__file__), "deflate", warm=True))
    rows.append(row_in_child(os.path.abspath(__file__), "inflate", warm=True))
    rows.append(row_in_child(os.path.abspath(__file__), "columns", warm=True))
    rows.append(_big_array_row())
    rows.append(_flower_big_array_row())
    return rows


if __name__ == "__main__":
    if not child_main(ROWS):
        print(table(run()) if NEXT else NOTES)
