"""Fuzz harness: ``Array.numpy()`` on hostile ``Array.data`` (the .npy header parser and copies).

Contract (tests/fuzz/README.md): any bytes either raise ``ValueError`` with a message or give the
array that the bytes describe, identical between ``numpy()`` and ``numpy(copy=False)``, that
``array_from_numpy`` serializes back to bytes reading as the same array, and that equals what
``numpy.load`` gives whenever numpy.load reads the same bytes too.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from fastrec import Array, array_from_numpy


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    # raw bytes, so NaN payloads, -0.0 and structured/void dtypes compare exactly
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def TestOneInput(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            got = Array("float64", [], "numpy.ndarray", data).numpy()
        except ValueError as exc:
            assert str(exc), "ValueError without a message"
            return
        view = Array("float64", [], "numpy.ndarray", data).numpy(copy=False)
        assert _same(got, view), "numpy() and numpy(copy=False) differ"
        again = array_from_numpy(got)
        assert _same(Array(again.dtype, again.shape, again.stype, again.data).numpy(), got), \
            "re-serialized array reads back differently"
        try:  # fastrec accepted it, so the data holds what the header declares: bounded work
            ref = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception:  # numpy's tokenizer may refuse a header fastrec reads (see test_array)
            return
        if isinstance(ref, np.ndarray):
            assert _same(got, ref), "fastrec and numpy.load read the same bytes differently"


if __name__ == "__main__":  # python tests/fuzz/run.py runs this under atheris
    import sys

    for path in sys.argv[1:]:
        with open(path, "rb") as f:
            TestOneInput(f.read())
