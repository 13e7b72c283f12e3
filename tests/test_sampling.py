"""Tests of fastrec.sampling: count_non_finite, keys, reservoir, FinalizeThenSample process."""

import collections
import doctest
import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastrec
import fastrec.sampling
from fastrec import (FinalizeThenSampleFactory, MeasuredProcessOutput, TensorSpec,
                     count_non_finite, spec_of, vectorized)
from fastrec import _sampling

FLOAT_DTYPES = [np.float16, np.float32, np.float64, np.complex64, np.complex128]
SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, 5e-324, 1e300, -2.5]


def reference_count(a):
    a = np.asarray(a)
    if a.dtype.kind in "biu":
        return 0
    return int(np.count_nonzero(~np.isfinite(a)))


def test_docstrings():
    assert doctest.testmod(fastrec.sampling, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


# ----------------------------------------------------------------------------------------------
# count_non_finite
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_count_non_finite_specials(dtype):
    with np.errstate(over="ignore"):
        a = np.array(SPECIALS * 3, dtype=dtype)
    assert count_non_finite(a) == reference_count(a)
    assert count_non_finite(a[::-2]) == reference_count(a[::-2])
    assert count_non_finite(a.astype(np.dtype(dtype).newbyteorder())) == reference_count(a)


def test_count_non_finite_complex_counts_element_once():
    a = np.array([complex(np.nan, np.inf), complex(1, np.nan), complex(np.inf, 1), 1 + 1j])
    assert count_non_finite(a) == 3
    assert count_non_finite(a.astype(np.complex64)) == 3


@pytest.mark.parametrize("dtype", [np.int8, np.uint64, np.int32, np.bool_])
def test_count_non_finite_ints_bools_are_finite(dtype):
    assert count_non_finite(np.ones((3, 4), dtype=dtype)) == 0


def test_count_non_finite_longdouble_falls_back():
    a = np.array([1, np.nan, np.inf], dtype=np.longdouble)
    assert count_non_finite(a) == 2


@pytest.mark.parametrize("bad", [np.array(["a"]), np.array([object()]), [1.0, np.nan], 3.0,
                                 np.array(["2020-01-01"], dtype="datetime64[D]")])
def test_count_non_finite_rejects_non_numeric(bad):
    with pytest.raises(TypeError):
        count_non_finite(bad)


def test_count_non_finite_layouts():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 6, 7))
    a[rng.random(a.shape) < 0.1] = np.nan
    a[rng.random(a.shape) < 0.05] = -np.inf
    expected = reference_count(a)
    assert count_non_finite(a) == expected
    assert count_non_finite(a.T) == expected
    assert count_non_finite(np.asfortranarray(a)) == expected
    assert count_non_finite(a.transpose(1, 0, 2)[::-1, :, ::3]) == reference_count(
        a.transpose(1, 0, 2)[::-1, :, ::3])
    assert count_non_finite(a[:, 0:0]) == 0
    assert count_non_finite(np.full((), np.nan, np.float32)) == 1
    # broadcast (zero strides) and unaligned data
    assert count_non_finite(np.broadcast_to(np.array([np.nan, 1.0]), (4, 2))) == 4
    raw = np.zeros(8 * 10 + 1, np.uint8)[1:].view(np.float64)
    raw[3] = np.inf
    assert not raw.flags.aligned and count_non_finite(raw) == 1


def test_count_non_finite_rows():
    m = np.ones((4, 3))
    m[1, 2] = np.nan
    m[3, 0] = np.inf
    m[3, 1] = np.nan
    assert _sampling.count_non_finite_rows(m) == 2
    assert _sampling.count_non_finite_rows(m.T) == 3
    assert _sampling.count_non_finite_rows(m[:, 2]) == 1
    assert _sampling.count_non_finite_rows(m[:, :0]) == 0
    with pytest.raises(ValueError):
        _sampling.count_non_finite_rows(np.array(1.0))


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@settings(max_examples=150, deadline=None)
@given(hnp.arrays(st.sampled_from(FLOAT_DTYPES), hnp.array_shapes(min_dims=0, max_dims=4,
                                                                  max_side=5),
                  elements=st.sampled_from(SPECIALS)),
       st.booleans(), st.data())
def test_count_non_finite_matches_numpy(a, transpose, data):
    if transpose:
        a = a.T
    if a.ndim:
        step = data.draw(st.sampled_from([1, 2, -1, -3]))
        a = a[::step]
    assert count_non_finite(a) == reference_count(a)
    if a.ndim:
        per_row = np.count_nonzero(~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)) \
            if a.size else 0
        assert _sampling.count_non_finite_rows(a) == per_row
