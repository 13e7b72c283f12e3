"""Robustness of Array.numpy() on untrusted bytes: a differential fuzz against numpy.load
and regression tests from the memory-safety audit (ASan/UBSan build).

tests/test_array.py holds the format and API tests of the same module; this file holds the
hostile-input ones, which run longer.
"""

import io
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrec import Array, array_from_numpy

NUMPY_STYPE = "numpy.ndarray"


def npy_header(text, data=b"", major=1):
    """.npy bytes with the header dict ``text`` padded the way numpy.save pads it."""
    t = text.encode("latin1" if major < 3 else "utf8")
    prefix = 10 if major == 1 else 12
    t += b" " * (63 - (prefix + len(t)) % 64) + b"\n"
    length = len(t).to_bytes(2 if major == 1 else 4, "little")
    return b"\x93NUMPY" + bytes([major, 0]) + length + t + data


def np_load(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.load(io.BytesIO(data), allow_pickle=False)


def ours(data, copy=True, wrap=bytes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Array("x", [], NUMPY_STYPE, wrap(data)).numpy(copy=copy)


# ---------------------------------------------------------------------------
# Differential fuzz: mutated .npy bytes
# ---------------------------------------------------------------------------

SEEDS = [
    np.arange(6, dtype="<f8").reshape(2, 3),
    np.asfortranarray(np.arange(6, dtype=">i4").reshape(3, 2)),
    np.array([1 + 2j, np.nan], dtype="c8"),
    np.array(3.5, dtype="f2"),
    np.zeros((0, 4), dtype="u1"),
    np.array([b"ab", b"c"], dtype="S2"),
    np.array([(1, 2.0)], dtype=[("a", "<i2"), ("b", "<f4")]),
]
SEED_BYTES = [array_from_numpy(a).data for a in SEEDS]


@st.composite
def mutated_npy(draw):
    data = bytearray(draw(st.sampled_from(SEED_BYTES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "header"]))
        if not data:
            break
        # Most of the interesting structure is in the header: aim there half the time.
        hi = min(len(data), 128) if draw(st.booleans()) else len(data)
        i = draw(st.integers(0, hi - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.sampled_from(b"0123456789,()[]{}:'\" \n#\\xLTrue-+_<>|SUVfic\x00\xff"))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 4))]
        elif op == "truncate":
            del data[i:]
        else:  # rewrite one header token
            text = data.decode("latin1")
            for token, repl in [("(2, 3)", draw(st.sampled_from(["(9223372036854775807, 3)",
                                                                 "(0, 4611686018427387904)",
                                                                 "(2, 3, 1)", "()", "(-1, 3)"]))),
                                ("'<f8'", draw(st.sampled_from(["'|V0'", "'<f16'", "'O'",
                                                                "[('a', 'O')]", "'(2,)f8'"])))]:
                text = text.replace(token, repl, 1)
            data[:] = text.encode("latin1")
    return bytes(data)


@settings(max_examples=300)
@given(mutated_npy(), st.booleans(), st.sampled_from([bytes, bytearray, memoryview]))
def test_mutated_npy_bytes_either_load_like_numpy_or_raise_valueerror(data, copy, wrap):
    try:
        got = ours(data, copy=copy, wrap=wrap)
    except ValueError:
        return  # bad input, clearly reported (also numpy's trailing bytes, rejected here)
    # Whatever we accept, numpy.load accepts and reads the same way.
    want = np_load(data)
    if want.dtype.itemsize == 0:
        return  # zero-size items: see test_zero_itemsize_descr_matches_numpy_load
    assert got.dtype == want.dtype and got.dtype.str == want.dtype.str
    assert got.shape == want.shape
    assert got.flags.f_contiguous == want.flags.f_contiguous
    assert got.tobytes(order="A") == want.tobytes(order="A")
    assert got.flags.writeable == copy


# ---------------------------------------------------------------------------
# Zero-size items
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("descr,copy", [
    ("'|V0'", True), ("'|V0'", False), ("[]", True), ("[]", False),
    ("'|S0'", True), ("'|S0'", False), ("'<U0'", True), ("'<U0'", False),
])
def test_zero_itemsize_descr_matches_numpy_load(descr, copy):
    data = npy_header("{'descr': %s, 'fortran_order': False, 'shape': (4096,)}" % descr)
    want = np_load(data)
    got = ours(data, copy=copy)
    assert (got.dtype, got.shape, got.nbytes) == (want.dtype, want.shape, want.nbytes) == \
        (want.dtype, (4096,), 0)


@pytest.mark.parametrize("descr", ["'|V0'", "'|S0'", "'<U0'"])
@pytest.mark.parametrize("fortran,shape", [(True, (2, 3)), (False, (2, 3)), (True, (4, 0, 2)),
                                           (False, ()), (True, (5,))])
@pytest.mark.parametrize("copy", [True, False])
def test_zero_itemsize_layout_matches_numpy_load(descr, fortran, shape, copy):
    # Fuzz finding: a Fortran-order U0 array came back C-contiguous=False where numpy.load's
    # (a transposed view) is both, so np.ascontiguousarray copied it into a U1 array.
    data = npy_header("{'descr': %s, 'fortran_order': %s, 'shape': %r}" % (descr, fortran, shape))
    want = np_load(data)
    got = ours(data, copy=copy)
    assert (got.dtype, got.shape, got.strides) == (want.dtype, want.shape, want.strides)
    assert (got.flags.c_contiguous, got.flags.f_contiguous) == \
        (want.flags.c_contiguous, want.flags.f_contiguous)
    assert np.ascontiguousarray(got).dtype == np.ascontiguousarray(want).dtype
    assert np.asfortranarray(got).dtype == np.asfortranarray(want).dtype
    assert got.flags.writeable == copy


def test_zero_itemsize_huge_shape_allocates_nothing():
    data = npy_header("{'descr': '|V0', 'fortran_order': True, 'shape': (9223372036854775807,)}")
    assert ours(data).shape == np_load(data).shape == (2**63 - 1,)
    data = npy_header("{'descr': [], 'fortran_order': False, "
                      "'shape': (9223372036854775807, 2)}")
    with pytest.raises(ValueError, match="overflows"):
        ours(data)


@pytest.mark.parametrize("copy", [True, False])
def test_non_contiguous_buffer_is_a_value_error(copy):
    good = array_from_numpy(np.arange(6.0)).data
    with pytest.raises(ValueError, match="contiguous"):
        ours(memoryview(good + good)[::2], copy=copy, wrap=lambda d: d)


@pytest.mark.parametrize("descr", ["'|S0'", "'<U0'", "'|V0'"])
def test_zero_itemsize_copy_does_not_leak_the_dtype(descr):
    # The unsized-dtype branch once took a reference to the dtype before returning early.
    import sys
    data = npy_header("{'descr': %s, 'fortran_order': False, 'shape': (3,)}" % descr)
    arr = Array("x", [], NUMPY_STYPE, data)
    dt = arr.numpy().dtype
    before = sys.getrefcount(dt)
    for _ in range(1000):
        arr.numpy()
    assert sys.getrefcount(dt) - before < 10
