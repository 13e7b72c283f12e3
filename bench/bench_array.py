"""Benchmark: fastrec.Array / array_from_numpy against Flower's numpy.save / numpy.load path.

Flower 1.15 serializes with ``numpy.save`` into a BytesIO and deserializes with
``numpy.load(BytesIO(data), allow_pickle=False)``; ``ndarray.copy()`` is the floor
for any conversion that must copy the data.

    python bench/bench_array.py
"""

from __future__ import annotations

import io
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import compare, table  # noqa: E402

from fastrec import Array, array_from_numpy  # noqa: E402


def flwr_array_from_numpy(a):
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return Array(str(a.dtype), list(a.shape), "numpy.ndarray", buf.getvalue())


def flwr_numpy(arr):
    return np.load(io.BytesIO(arr.data), allow_pickle=False)


NOTES = """
Speed-up is baseline time ÷ fastrec time, so a "≤ 1.3× copy" row passes at a speed-up of 0.77 or more.
"""


def run() -> list[dict]:
    rows = []
    small = np.random.default_rng(0).standard_normal((3, 3))
    s_arr = array_from_numpy(small)
    rows.append(compare("3×3 float64: array_from_numpy", "numpy.save path",
                        lambda: flwr_array_from_numpy(small), lambda: array_from_numpy(small),
                        "≥ 20×"))
    # A fresh Array each call (no cached header parse) and a reused one.
    s_data = s_arr.data
    rows.append(compare("3×3 float64: Array(...).numpy() (fresh, parses header)", "numpy.load path",
                        lambda: flwr_numpy(s_arr),
                        lambda: Array("float64", [3, 3], "numpy.ndarray", s_data).numpy(), "≥ 30×"))
    rows.append(compare("3×3 float64: .numpy() (same Array)", "numpy.load path",
                        lambda: flwr_numpy(s_arr), lambda: s_arr.numpy(), "≥ 30×"))
    rows.append(compare("3×3 float64: .numpy(copy=False)", "numpy.load path",
                        lambda: flwr_numpy(s_arr), lambda: s_arr.numpy(copy=False), "< 2 µs"))

    big = np.random.default_rng(1).standard_normal(10_000_000).astype(np.float32)  # 40 MB
    b_arr = array_from_numpy(big)
    b_data = b_arr.data
    kw = {"repeats": 5, "min_time": 0.1}
    rows.append(compare("40 MB float32: array_from_numpy", "ndarray.copy()",
                        big.copy, lambda: array_from_numpy(big), "≤ 1.3× copy", **kw))
    rows.append(compare("40 MB float32: array_from_numpy", "numpy.save path",
                        lambda: flwr_array_from_numpy(big), lambda: array_from_numpy(big), "", **kw))
    rows.append(compare("40 MB float32: .numpy()", "ndarray.copy()",
                        big.copy, lambda: Array("float32", [big.size], "numpy.ndarray", b_data).numpy(),
                        "≤ 1.3× copy", **kw))
    rows.append(compare("40 MB float32: .numpy()", "numpy.load path",
                        lambda: flwr_numpy(b_arr), lambda: b_arr.numpy(), "", **kw))
    rows.append(compare("40 MB float32: .numpy(copy=False)", "numpy.load path",
                        lambda: flwr_numpy(b_arr),
                        lambda: Array("float32", [big.size], "numpy.ndarray", b_data).numpy(copy=False),
                        "< 2 µs", **kw))

    # The same conversions through the real Flower package, for the record.
    try:
        import flwr.common as fc
    except ImportError:  # pragma: no cover - flwr is in the test extra
        fc = None
    if fc is not None:
        f_arr = fc.array_from_numpy(small)
        rows.append(compare("3×3 float64: array_from_numpy", "flwr 1.15.2",
                            lambda: fc.array_from_numpy(small), lambda: array_from_numpy(small)))
        rows.append(compare("3×3 float64: .numpy()", "flwr 1.15.2",
                            f_arr.numpy, s_arr.numpy))
        fb_arr = fc.array_from_numpy(big)
        rows.append(compare("40 MB float32: array_from_numpy", "flwr 1.15.2",
                            lambda: fc.array_from_numpy(big), lambda: array_from_numpy(big), **kw))
        rows.append(compare("40 MB float32: .numpy()", "flwr 1.15.2",
                            fb_arr.numpy, b_arr.numpy, **kw))

    strided = np.random.default_rng(2).standard_normal((2000, 4000)).astype(np.float32)[:, ::2]  # 16 MB view
    rows.append(compare("16 MB float32 strided [:, ::2]: array_from_numpy", "numpy.save path",
                        lambda: flwr_array_from_numpy(strided), lambda: array_from_numpy(strided), "",
                        **kw))
    rows.append(compare("16 MB float32 strided [:, ::2]: array_from_numpy", "ndarray.copy()",
                        strided.copy, lambda: array_from_numpy(strided), "", **kw))
    return rows


if __name__ == "__main__":
    print(table(run()))
