"""Tests of fastrec.sampling: count_non_finite, keys, reservoir, FinalizeThenSample process."""

import collections
import collections.abc
import doctest
import math
import os
import pickle
import sys
import threading
import time
import types
import warnings
import weakref

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from _optional import OptionalModule

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


def assert_tree_equal(a, b):
    """Equal nested structures (dict/list/tuple) with array leaves compared by value."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            assert_tree_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_tree_equal(x, y)
    else:
        assert np.shape(a) == np.shape(b) and np.array_equal(a, b, equal_nan=True), (a, b)


def test_docstrings():
    import fastrec.spec
    for module in (fastrec.sampling, fastrec.spec):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0 and result.attempted > 0


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


@settings(max_examples=150)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=0, max_dims=4, max_side=5),
                  elements=st.sampled_from(SPECIALS)),
       st.sampled_from(FLOAT_DTYPES), st.booleans(), st.data())
def test_count_non_finite_matches_numpy(a, dtype, transpose, data):
    # Cast here, not in hypothesis: 1e300 -> float16 is inf and 5e-324 -> float32 is 0 by
    # design, which hypothesis (rightly, for its own strategies) refuses under some NumPys.
    with np.errstate(over="ignore", under="ignore"):
        a = a.astype(dtype)
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


# ----------------------------------------------------------------------------------------------
# keys and reservoir kernels
# ----------------------------------------------------------------------------------------------

def test_client_keys_are_counter_based():
    full = _sampling.client_keys(11, 22, 3, 0, 1000)
    assert np.array_equal(_sampling.client_keys(11, 22, 3, 250, 500), full[250:750])
    assert not np.array_equal(_sampling.client_keys(11, 22, 4, 0, 1000), full)
    assert not np.array_equal(_sampling.client_keys(11, 23, 3, 0, 1000), full)
    assert len(np.unique(full)) == 1000
    with pytest.raises(ValueError):
        _sampling.client_keys(1, 2, 0, -1, 5)
    with pytest.raises(ValueError):
        _sampling.client_keys(1, 2, 0, 2**63 - 3, 5)  # offset + n overflows int64


def test_client_keys_bits_are_uniform():
    keys = _sampling.client_keys(5, 6, 0, 0, 1 << 16)
    # Each of the 64 bits is set about half the time (binomial sd = 128 at n = 65536).
    bits = np.unpackbits(keys.view(np.uint8)).reshape(-1, 64).sum(axis=0).astype(np.int64)
    assert np.all(np.abs(bits - (1 << 15)) < 6 * 128)
    # Top 4 bits: 16 equiprobable cells; chi-square, 15 dof, 1e-6 critical value 53.
    cells = np.bincount((keys >> np.uint64(60)).astype(np.int64), minlength=16)
    exp = len(keys) / 16
    assert ((cells - exp) ** 2 / exp).sum() < 53.0


def _top_nibble_chi_square(keys):
    cells = np.bincount((keys >> np.uint64(60)).astype(np.int64), minlength=16)
    exp = len(keys) / 16
    return ((cells - exp) ** 2 / exp).sum()


def test_client_keys_are_uniform_across_rounds_and_unordered_along_a_stream():
    # One client's key over 8192 rounds: uniform (chi-square, 15 dof, 1e-6 critical value 53).
    across = np.array([_sampling.client_keys(5, 6, r, 7, 1)[0] for r in range(8192)])
    assert _top_nibble_chi_square(across) < 53.0
    # Along a stream, a key exceeds its predecessor half the time (a Weyl sequence's
    # regularity would show here): binomial sd = 128 at n = 65536, bound at 6 sd.
    keys = _sampling.client_keys(5, 6, 0, 0, 1 << 16)
    ups = int(np.count_nonzero(keys[1:] > keys[:-1]))
    assert abs(ups - (len(keys) - 1) / 2) < 6 * 128
    # Neighbouring clients' top nibbles are independent: 256-cell joint chi-square,
    # 255 dof, 1e-6 critical value 377.
    hi = (keys >> np.uint64(60)).astype(np.int64)
    joint = np.bincount(hi[:-1] * 16 + hi[1:], minlength=256)
    exp = (len(keys) - 1) / 256
    assert ((joint - exp) ** 2 / exp).sum() < 377.0


def brute_force_top(seed, round_, n, k, offset=0):
    keys = _sampling.client_keys(seed[0], seed[1], round_, offset, n)
    order = sorted(range(n), key=lambda i: (-int(keys[i]), i))[:k]
    return [offset + i for i in order], keys


def test_round_sample_with_empty_reservoir_does_not_walk_the_round():
    # k = 0 keeps nothing; the kernel used to draw all n keys anyway (2**62 here: a hang).
    result = []
    t = threading.Thread(target=lambda: result.append(_sampling.round_sample(7, 9, 0, 0, 2**62, 0)),
                         daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive()
    assert [len(x) for x in result[0]] == [0, 0, 0]
    with pytest.raises(ValueError):   # the overflow check still comes first
        _sampling.round_sample(7, 9, 0, 2**63 - 1, 2, 0)


@settings(max_examples=60)
@given(st.integers(0, 300), st.integers(0, 40), st.integers(0, 1000), st.integers(0, 10))
def test_round_sample_is_top_k_of_keys(n, k, offset, round_):
    expected, keys = brute_force_top((7, 9), round_, n, k, offset)
    got_keys, got_idx, got_pos = _sampling.round_sample(7, 9, round_, offset, n, k)
    assert got_idx.tolist() == expected
    assert np.array_equal(got_pos, got_idx - offset)
    assert np.array_equal(got_keys, keys[got_pos])


def test_union_ties_keep_the_first_position():
    # Larger key first; equal keys in position order (TFF's top_k keeps the first of ties):
    # the top 3 of these keys are positions 1 and 4 (the 9s) and 0 (the first 5), returned in
    # arrival order. Across the two sides, a tie goes to a (its positions come first).
    keys = np.array([5, 9, 5, 5, 9], np.uint64)
    rounds, indices = np.zeros(5, np.int64), np.arange(5, dtype=np.int64)
    def union(k):   # all on b's side
        return _sampling.union_entries(keys[:0], rounds[:0], indices[:0], keys, rounds, indices,
                                       k)[0].tolist()
    assert union(10) == [0, 1, 2, 3, 4]
    assert union(3) == [0, 1, 4]
    assert union(0) == []
    # a: key 5 at index 2; b: key 9 at index 0 and key 5 at index 1.
    two = np.array([5, 9, 5], np.uint64)
    sel = _sampling.union_entries(two[:1], rounds[:1], indices[2:3], two[1:], rounds[1:3],
                                  indices[:2], 2)[0].tolist()
    assert sel == [1, 0]   # b's 9, then a's 5 (index 2): b's 5 (position 2) lost the tie
    for bad in (keys.reshape(5, 1), keys[0]):
        with pytest.raises(ValueError):
            _sampling.union_entries(bad, rounds, indices, keys[:0], 0, indices[:0], 2)
    with pytest.raises(ValueError):
        union(-1)


def test_gather_rows():
    a = np.arange(60.0).reshape(10, 3, 2)
    pos = np.array([7, 0, 7], np.int64)
    for arr in (a, a[::-1], a[:, :, 0], a[:, 0, 0], a.transpose(0, 2, 1), a.astype(object)):
        assert np.array_equal(_sampling.gather_rows(arr, pos), arr[pos])
    with pytest.raises(ValueError):
        _sampling.gather_rows(a, np.array([10]))
    with pytest.raises(ValueError):
        _sampling.gather_rows(a, np.array([-1]))
    with pytest.raises(ValueError):
        _sampling.gather_rows(a, np.array([[1, 2]]))


@settings(max_examples=60)
@given(st.integers(0, 300), st.integers(0, 40), st.integers(0, 10))
def test_round_sample_in_arrival_order(n, k, round_):
    best = _sampling.round_sample(7, 9, round_, 3, n, k)
    order = np.argsort(best[2], kind="stable")
    for got, want in zip(_sampling.round_sample(7, 9, round_, 3, n, k, arrival=True), best):
        np.testing.assert_array_equal(got, want[order])
    drawn = _sampling.RoundDraw(7, 9, round_, 3, n, k, 16, True).finish(arrival=True)
    for got, want in zip(drawn, best):
        np.testing.assert_array_equal(got, want[order])


_entries = st.integers(0, 12).flatmap(lambda m: st.tuples(
    st.lists(st.integers(0, 3), min_size=m, max_size=m),          # keys: ties are common
    st.lists(st.integers(0, 4), min_size=m, max_size=m),          # rounds
    st.lists(st.integers(0, 5), min_size=m, max_size=m)))         # indices


@settings(max_examples=300)
@given(_entries, _entries, st.integers(0, 30), st.booleans())
def test_union_entries_is_top_k_then_arrival_order(a, b, k, one_round):
    """union_entries against its definition in NumPy: top k of the concatenation (larger key,
    then earlier position), ordered by (round, index, position)."""
    ak, ar, ai = (np.array(x, dt) for x, dt in zip(a, (np.uint64, np.int64, np.int64)))
    bk, br, bi = (np.array(x, dt) for x, dt in zip(b, (np.uint64, np.int64, np.int64)))
    if one_round:
        br = np.full(len(bk), 2, np.int64)
    keys, rounds, indices = (np.concatenate(p) for p in ((ak, bk), (ar, br), (ai, bi)))
    top = np.lexsort((np.arange(len(keys)), -keys.astype(np.int64)))[:k]
    want = top[np.lexsort((top, indices[top], rounds[top]))]
    got = _sampling.union_entries(ak, ar, ai, bk, 2 if one_round else br, bi, k)
    np.testing.assert_array_equal(got[0], want)
    for g, w in zip(got[1:], (keys, rounds, indices)):
        np.testing.assert_array_equal(g, w[want])
        assert g.dtype == w.dtype
    with pytest.raises(ValueError):
        _sampling.union_entries(ak, ar, ai, bk, np.zeros(len(bk) + 1, np.int64), bi, k)
    with pytest.raises(ValueError):
        _sampling.union_entries(ak, ar, ai, bk, br, bi, -1)


def test_gather_union():
    a = np.arange(24.0).reshape(4, 3, 2)
    b = -np.arange(12.0).reshape(2, 3, 2)
    sel = np.array([5, 0, 4, 3, 3], np.int64)
    pairs = [(a, b), (a[::-1], b), (a[:, :, 0], b[:, :, 0]),
             (a.transpose(0, 2, 1), b.transpose(0, 2, 1)), (a.astype(np.float32), b),
             (a.astype(object), b), (a[:, 0, 0], b[:, 0, 0]),
             (a.astype(">f8"), b.astype(">f8")), (a[:, :0], b[:, :0]), (a > 3, b > -3),
             (a.astype(np.int64), b.astype(np.longlong)), (a.astype("M8[s]"), b.astype("M8[s]")),
             (a.astype(np.float16), b.astype(np.float16)), (a.astype(np.complex64), b + 1j)]
    for s in (sel, sel.astype(">i8"), np.repeat(sel, 2)[::2]):
        got = _sampling.gather_union([x for x, _ in pairs], [y for _, y in pairs], s)
        for g, (x, y) in zip(got, pairs):
            want = np.concatenate([x, y])[sel]
            np.testing.assert_array_equal(g, want)
            assert g.dtype == want.dtype
    with pytest.raises(ValueError):   # rows of other shapes do not concatenate
        _sampling.gather_union([a[:, :2]], [b], sel)
    for bad in (np.array([6], np.int64), np.array([-1], np.int64)):
        with pytest.raises(ValueError):
            _sampling.gather_union([a], [b], bad)
    with pytest.raises(ValueError):
        _sampling.gather_union([a], [], sel)
    with pytest.raises(TypeError):
        _sampling.gather_union([a], [[1.0]], sel)


# ----------------------------------------------------------------------------------------------
# TensorSpec, spec_of, factory and create validation
# ----------------------------------------------------------------------------------------------

def test_tensor_spec():
    s = TensorSpec("float32", (None, 2))
    assert s == TensorSpec(np.float32, [None, 2]) and hash(s) == hash(TensorSpec("f4", (None, 2)))
    assert s != TensorSpec("float64", (None, 2))
    assert pickle.loads(pickle.dumps(s)) == s
    assert TensorSpec("int8", 3).shape == (3,)
    for bad_dtype in ("U5", object, "not a dtype", "datetime64[s]"):
        with pytest.raises(TypeError):
            TensorSpec(bad_dtype)
    for bad_shape in ((-1,), (1.5,), "ab", (True,)):
        with pytest.raises(TypeError):
            TensorSpec("float32", bad_shape)
    with pytest.raises(AttributeError):
        s.dtype = np.dtype("int8")


def test_spec_of():
    spec = spec_of({"a": 1.0, "b": 2, "c": [1.0, 2.0], "d": np.float32(1), "e": np.zeros((2, 3)),
                    "f": True})
    assert spec == {"a": TensorSpec("float64"), "b": TensorSpec("int64"),
                    "c": TensorSpec("float64", (2,)), "d": TensorSpec("float32"),
                    "e": TensorSpec("float64", (2, 3)), "f": TensorSpec("bool")}
    with pytest.raises(TypeError):
        spec_of([1.0])
    with pytest.raises(TypeError):
        spec_of({"a": "text"})
    with pytest.raises(ValueError):
        spec_of({"a": [[1.0], [1.0, 2.0]]})


@pytest.mark.parametrize("bad", [1.0, True, "3", None, 2.0 + 0j])
def test_factory_sample_size_type(bad):
    with pytest.raises(TypeError):
        FinalizeThenSampleFactory(bad)


@pytest.mark.parametrize("bad", [0, -5, 2**63, 2**64])
def test_factory_sample_size_value(bad):
    # Past int64 the kernels cannot take it: a ValueError up front, not an OverflowError
    # from the first round.
    with pytest.raises(ValueError):
        FinalizeThenSampleFactory(bad)


def test_factory_sample_size_int64_max_is_usable():
    p = FinalizeThenSampleFactory(2**63 - 1, seed=0).create({"x": lambda v: v},
                                                            {"x": TensorSpec("float64")})
    assert p.next(p.initialize(), [{"x": 1.0}, {"x": 2.0}]).state["indices"].size == 2


def test_factory_seed_validation():
    FinalizeThenSampleFactory(3, seed=2**100)
    with pytest.raises(TypeError):
        FinalizeThenSampleFactory(3, seed=1.5)
    with pytest.raises(ValueError):
        FinalizeThenSampleFactory(3, seed=-1)


SPEC = {"a": TensorSpec("float32"), "b": TensorSpec("float32", (2,))}
IDENT = {"a": lambda v: v, "b": lambda v: v}


@pytest.mark.parametrize("bad", [[lambda v: v], 3, "a", None, ("a",)])
def test_create_rejects_bad_finalizers(bad):
    with pytest.raises(TypeError, match="metric_finalizers"):
        FinalizeThenSampleFactory(3).create(bad, SPEC)


def test_create_rejects_non_callable_finalizer_and_name_mismatch():
    with pytest.raises(TypeError, match="metric_finalizers"):
        FinalizeThenSampleFactory(3).create({"a": 1, "b": len}, SPEC)
    with pytest.raises(ValueError, match="The metric names in `metric_finalizers` do not match"):
        FinalizeThenSampleFactory(3).create({"a": len, "c": len}, SPEC)
    with pytest.raises(ValueError, match="do not match"):
        FinalizeThenSampleFactory(3).create({"a": len}, SPEC)


@pytest.mark.parametrize("bad", [np.float32, TensorSpec("float32"), [TensorSpec("float32")],
                                 "float32", {"a": np.float32, "b": TensorSpec("float32")},
                                 {"a": [TensorSpec("float32"), "x"], "b": TensorSpec("int8")},
                                 {1: TensorSpec("float32")}])
def test_create_rejects_bad_metrics_type(bad):
    with pytest.raises(TypeError):
        FinalizeThenSampleFactory(3).create(lambda m: m, bad)


# ----------------------------------------------------------------------------------------------
# The process
# ----------------------------------------------------------------------------------------------

def fails_after_probe(exc, then=lambda v: v):
    """A finalizer that works on create()'s example of ones and raises ``exc`` afterwards."""
    calls = []

    def fin(v):
        calls.append(1)
        if len(calls) > 1:
            raise exc("boom")
        return then(v)
    return fin


def make_process(k=3, seed=0, finalizers=None, spec=None):
    return FinalizeThenSampleFactory(k, seed=seed).create(finalizers or IDENT, spec or SPEC)


def clients_ab(n, start=0):
    return [{"a": float(start + i), "b": [float(start + i), 2.0 * (start + i)]} for i in range(n)]


def test_tff_docstring_example():
    spec = {"a": TensorSpec("float32", (2,)), "b": TensorSpec("float32", (2,))}
    clients = [collections.OrderedDict(a=[1.0, 2.0], b=[1.0, np.nan]),
               collections.OrderedDict(a=[np.nan, np.inf], b=[1.0, 2.0]),
               collections.OrderedDict(a=[1.0, 2.0], b=[np.inf, np.nan])]
    p = make_process(k=2, spec=spec)
    out = p.next(p.initialize(), clients)
    assert isinstance(out, MeasuredProcessOutput)
    assert out.measurements == {"a": 1, "b": 2}
    current, total = out.result
    assert current["a"].shape == (2, 2) and current["a"].dtype == np.float32
    assert_tree_equal(current, total)


def test_next_samples_top_keys_and_pairs_metrics():
    p = make_process(k=4, seed=3)
    state = p.initialize()
    all_keys = []
    for r, n in enumerate([10, 3, 25]):
        out = p.next(state, clients_ab(n))
        expected, keys = brute_force_top(state["seed"], r, n, 4)
        current, total = out.result
        # Arrival order: the top keys' clients by index.
        assert current["a"].tolist() == sorted(expected)
        assert current["a"].dtype == np.float32 and current["b"].shape == (len(expected), 2)
        # Same client at the same position in every metric.
        for a, b in zip(current["a"], current["b"]):
            assert np.array_equal(b, np.array([a, 2 * a], np.float32))
        all_keys += [(int(keys[i]), r, i) for i in range(n)]
        best = sorted(sorted(all_keys, key=lambda t: (-t[0], t[1], t[2]))[:4],
                      key=lambda t: (t[1], t[2]))
        assert out.state["indices"].tolist() == [t[2] for t in best]
        assert out.state["rounds"].tolist() == [t[1] for t in best]
        assert [int(x) for x in total["a"]] == [t[2] for t in best]
        assert out.state["round"] == r + 1
        state = out.state


def test_sample_size_larger_than_round_keeps_everyone():
    p = make_process(k=50)
    out = p.next(p.initialize(), clients_ab(7))
    assert out.result[0]["a"].tolist() == list(range(7))   # every client, in order


def test_seed_reproducible_and_entropy_when_unseeded():
    clients = clients_ab(200)

    def run(process):
        return process.next(process.initialize(), clients).result[0]["a"]

    assert run(make_process(seed=42)).tolist() == run(make_process(seed=42)).tolist()
    assert run(make_process(seed=42)).tolist() != run(make_process(seed=43)).tolist()
    assert run(make_process(seed=None)).tolist() != run(make_process(seed=None)).tolist()
    # Unseeded: fresh entropy per initialize(), not per process.
    p = make_process(seed=None)
    assert len({run(p).tobytes() for _ in range(5)}) > 1
    assert len({p.initialize()["seed"] for _ in range(20)}) == 20


def test_empty_round_leaves_state_unchanged():
    p = make_process()
    state = p.next(p.initialize(), clients_ab(5)).state
    out = p.next(state, [])
    assert out.state is state
    assert_tree_equal(out.result[0], {"a": np.zeros(0, np.float32),
                                      "b": np.zeros((0, 2), np.float32)})
    assert out.result[0]["b"].dtype == np.float32
    assert_tree_equal(out.result[1], state["samples"])
    assert out.measurements == {"a": 0, "b": 0}
    assert p.next(state, iter([])).state is state


def test_state_is_picklable_and_resumable():
    p = make_process(seed=5)
    s1 = p.next(p.initialize(), clients_ab(20)).state
    s1b = pickle.loads(pickle.dumps(s1))
    o1 = p.next(s1, clients_ab(20, 100))
    o2 = p.next(s1b, clients_ab(20, 100))
    assert_tree_equal(o1.result[1], o2.result[1])
    assert np.array_equal(o1.state["keys"], o2.state["keys"])


@pytest.mark.parametrize("mutate, exc", [
    (lambda s: s.pop("keys"), TypeError),
    (lambda s: s.__setitem__("seed", (1, -2)), ValueError),
    (lambda s: s.__setitem__("round", -1), ValueError),
    (lambda s: s.__setitem__("keys", s["keys"].astype(np.int64)), ValueError),
    (lambda s: s.__setitem__("indices", s["indices"][:1]), ValueError),
    (lambda s: s["samples"].__setitem__("a", s["samples"]["a"][:-1]), ValueError),
])
def test_bad_state(mutate, exc):
    p = make_process()
    state = p.next(p.initialize(), clients_ab(5)).state
    mutate(state)
    with pytest.raises(exc):
        p.next(state, clients_ab(3))
    with pytest.raises(TypeError):
        p.next([], clients_ab(3))


def test_partitioned_workers_merge_to_one_machine_state():
    p = make_process(k=5, seed=9)
    state = p.next(p.initialize(), clients_ab(30)).state  # a non-empty reservoir to start from
    clients = clients_ab(60, 1000)
    whole = p.next(state, clients)
    parts = [p.next(state, clients[a:b], client_offset=a) for a, b in [(0, 17), (17, 17), (17, 60)]]
    merged = p.merge(p.merge(parts[0].state, parts[1].state), parts[2].state)
    for key in ("keys", "rounds", "indices"):
        assert np.array_equal(merged[key], whole.state[key])
    assert_tree_equal(merged["samples"], whole.state["samples"])
    assert merged["round"] == whole.state["round"]
    # Measurements of the parts add up.
    assert sum(o.measurements["a"] for o in parts) == whole.measurements["a"]
    # merge is commutative and idempotent
    m2 = p.merge(parts[2].state, parts[0].state)
    assert np.array_equal(m2["keys"], p.merge(parts[0].state, parts[2].state)["keys"])
    assert np.array_equal(p.merge(merged, merged)["indices"], merged["indices"])


@settings(max_examples=25)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=4), st.integers(1, 12), st.data())
def test_merge_property(round_sizes, k, data):
    p = make_process(k=k, seed=1)
    state = p.initialize()
    for n in round_sizes:
        clients = clients_ab(n)
        cut = data.draw(st.integers(0, n))
        whole = p.next(state, clients)
        a = p.next(state, clients[:cut], client_offset=0)
        b = p.next(state, clients[cut:], client_offset=cut)
        merged = p.merge(b.state, a.state)
        assert np.array_equal(merged["indices"], whole.state["indices"])
        assert_tree_equal(merged["samples"], whole.state["samples"])
        state = whole.state


def test_merge_rejects_different_seeds():
    a = make_process(seed=1)
    b = make_process(seed=2)
    with pytest.raises(ValueError, match="seed"):
        a.merge(a.next(a.initialize(), clients_ab(3)).state,
                b.next(b.initialize(), clients_ab(3)).state)


@pytest.mark.parametrize("client, exc, words", [
    ({"a": 1.0}, ValueError, ["client 2", "missing", "'b'"]),
    ({"a": 1.0, "b": [1.0, 2.0], "c": 3}, ValueError, ["client 2", "unexpected", "'c'"]),
    ({"a": 1.0, "b": [1.0, 2.0, 3.0]}, ValueError, ["client 2", "'b'", "shape"]),
    ({"a": "x", "b": [1.0, 2.0]}, TypeError, ["client 2", "'a'", "non-numeric"]),
    ({"a": 1.0, "b": ["x", "y"]}, TypeError, ["client 2", "'b'", "non-numeric"]),
    ({"a": None, "b": [1.0, 2.0]}, TypeError, ["client 2", "'a'"]),
    ({"a": True, "b": [1.0, 2.0]}, TypeError, ["client 2", "'a'"]),
    ({"a": 1 + 2j, "b": [1.0, 2.0]}, TypeError, ["client 2", "'a'"]),
    ({"a": [1.0], "b": [1.0, 2.0]}, ValueError, ["client 2", "'a'", "shape"]),
    ({"a": 1.0, "b": [[1.0], [2.0, 3.0]]}, ValueError, ["client 2", "'b'"]),
    ([("a", 1.0)], TypeError, ["client 2", "mapping"]),
])
def test_client_value_errors_name_client_and_metric(client, exc, words):
    p = make_process()
    clients = clients_ab(2) + [client] + clients_ab(2)
    with pytest.raises(exc) as info:
        p.next(p.initialize(), clients)
    for w in words:
        assert w in str(info.value)


def test_int_and_struct_specs():
    spec = {"n": TensorSpec("int32"), "pair": [TensorSpec("float64"), TensorSpec("int64")],
            "flag": TensorSpec("bool"), "u": TensorSpec("uint8", (None,))}
    fins = {"n": lambda v: v, "pair": lambda v: v[0] * v[1], "flag": lambda v: v,
            "u": lambda v: v.sum()}
    p = make_process(k=10, finalizers=fins, spec=spec)
    ok = {"n": np.int16(3), "pair": (2.5, 4), "flag": np.bool_(True), "u": [1, 2, 255]}
    out = p.next(p.initialize(), [ok, dict(ok, u=[])])
    assert out.result[0]["pair"].tolist() == [10.0, 10.0]
    assert out.result[0]["u"].tolist() == [258, 0]
    assert out.result[0]["n"].dtype == np.int32 and out.result[0]["u"].dtype == np.uint64
    class Count(int):
        pass

    class Real(float):
        pass

    subclassed = dict(ok, n=Count(5), pair=[Real(0.5), np.uint8(4)])
    out = p.next(p.initialize(), [subclassed])
    assert out.result[0]["n"].tolist() == [5] and out.result[0]["pair"].tolist() == [2.0]
    for bad, exc in [({"n": 2**31}, ValueError), ({"n": 1.0}, TypeError),
                     ({"n": Real(1.0)}, TypeError), ({"n": np.float64(1.0)}, TypeError),
                     ({"pair": (complex(1, 0), 1)}, TypeError),
                     ({"pair": (1.0,)}, ValueError), ({"pair": 3.0}, TypeError),
                     ({"pair": (1.0, 2.5)}, TypeError), ({"u": [256]}, ValueError),
                     ({"u": [-1]}, ValueError), ({"flag": 1}, TypeError)]:
        with pytest.raises(exc, match="client 1"):
            p.next(p.initialize(), [ok, dict(ok, **bad)])


def test_flwr_metrics_record_clients_match_dicts():
    FlwrMetricsRecord = pytest.importorskip("flwr.common").MetricsRecord
    records = [FlwrMetricsRecord({"a": float(i), "b": [float(i), 2.0 * i]}) for i in range(40)]
    p = make_process(k=5, seed=2)
    expected = p.next(p.initialize(), clients_ab(40))
    got = p.next(p.initialize(), records)
    assert_tree_equal(got.result, expected.result)
    assert got.measurements == expected.measurements
    proxies = [types.MappingProxyType(c) for c in clients_ab(40)]
    mixed = [proxies[i] if i % 3 else records[i] for i in range(40)]
    assert_tree_equal(p.next(p.initialize(), mixed).result, expected.result)
    bad = records[:3] + [FlwrMetricsRecord({"a": 1.0})]
    with pytest.raises(ValueError, match="client 3.*missing"):
        p.next(p.initialize(), bad)


def test_fastrec_metrics_record_if_available():
    record_cls = getattr(fastrec, "MetricsRecord", None)
    if record_cls is None:
        pytest.skip("fastrec.MetricsRecord is not in this build")
    p = make_process(k=5, seed=2)
    records = [record_cls({"a": float(i), "b": [float(i), 2.0 * i]}) for i in range(40)]
    assert_tree_equal(p.next(p.initialize(), records).result,
                      p.next(p.initialize(), clients_ab(40)).result)


def test_non_finite_measurements_over_all_clients():
    spec = {"x": TensorSpec("float64"), "v": TensorSpec("float32", (3,))}
    fins = {"x": lambda v: v, "v": lambda v: v}
    p = make_process(k=1, finalizers=fins, spec=spec)
    rng = np.random.default_rng(4)
    clients, bad_x, bad_v = [], 0, 0
    for _ in range(300):
        x = float(rng.choice([1.0, np.nan, np.inf, -np.inf, 0.5]))
        v = rng.choice([1.0, 2.0, np.nan, -np.inf], size=3, p=[0.5, 0.4, 0.05, 0.05])
        bad_x += not math.isfinite(x)
        bad_v += not np.isfinite(v).all()
        clients.append({"x": x, "v": v})
    assert p.next(p.initialize(), clients).measurements == {"x": bad_x, "v": bad_v}


@pytest.mark.parametrize("value, bad", [
    (np.float32("nan"), 1), (np.float16("inf"), 1), (np.float64(2), 0), (complex(1, np.nan), 1),
    (np.complex64(1), 0), (3, 0), (True, 0), (np.int8(4), 0), (np.array([1.0, np.inf]), 1),
    (np.longdouble("inf"), 1), (np.array([1, 2]), 0), (float("-inf"), 1)])
def test_finalized_leaf_kinds(value, bad):
    p = make_process(k=1, finalizers={"a": lambda v: value, "b": lambda v: 0})
    assert p.next(p.initialize(), clients_ab(3)).measurements == {"a": 3 * bad, "b": 0}


def test_nested_finalized_values():
    fins = {"a": lambda v: [v, {"inv": 1.0 / v if v else float("inf")}], "b": lambda v: tuple(v)}
    p = make_process(k=10, finalizers=fins)
    out = p.next(p.initialize(), clients_ab(4))
    assert out.measurements == {"a": [0, {"inv": 1}], "b": (0, 0)}
    assert p.next(out.state, []).measurements == {"a": [0, {"inv": 0}], "b": (0, 0)}
    bad = {"a": lambda v: [v] if v else v, "b": lambda v: 0}
    q = make_process(finalizers=bad)
    with pytest.raises(ValueError, match=r"client 0, metric 'a'.*create\(\)"):
        q.next(q.initialize(), clients_ab(3))


def test_non_numeric_finalized_value_names_client_and_metric():
    p = make_process(finalizers={"a": lambda v: "oops" if v == 2 else v, "b": lambda v: 0})
    with pytest.raises(TypeError, match="client 2, metric 'a'"):
        p.next(p.initialize(), clients_ab(4))


def test_finalizer_exception_propagates_with_note():
    p = make_process(finalizers={"a": fails_after_probe(ZeroDivisionError), "b": lambda v: 0})
    with pytest.raises(ZeroDivisionError) as info:
        p.next(p.initialize(), clients_ab(2))
    assert "metric 'a' of client 0" in "".join(info.value.__notes__)


def test_functional_finalizer():
    def finalize(m):
        return collections.OrderedDict(mean_b=float(np.mean(m["b"])), a=m["a"])

    p = make_process(k=3, seed=6, finalizers=finalize)
    q = make_process(k=3, seed=6)
    assert list(p.initialize()["samples"]) == ["mean_b", "a"]
    out = p.next(p.initialize(), clients_ab(10))
    ref = q.next(q.initialize(), clients_ab(10))
    assert list(out.result[0]) == ["mean_b", "a"]
    assert_tree_equal(out.result[0]["a"], ref.result[0]["a"])
    assert out.result[0]["mean_b"].dtype == np.float64
    assert out.result[0]["mean_b"].tolist() == [1.5 * a for a in ref.result[0]["a"].tolist()]
    assert out.measurements == {"mean_b": 0, "a": 0}
    with pytest.raises(TypeError, match="mapping"):
        make_process(finalizers=lambda m: 3)
    flaky = make_process(finalizers=lambda m: {"x": 1} if m["a"] < 1.5 else {"y": 1})
    with pytest.raises(ValueError, match="client 2"):
        flaky.next(flaky.initialize(), clients_ab(3))


# ----------------------------------------------------------------------------------------------
# Columnar rounds and vectorized finalizers
# ----------------------------------------------------------------------------------------------

COL_SPEC = {"loss": [TensorSpec("float32"), TensorSpec("float32")],
            "hist": TensorSpec("float64", (3,)), "n": TensorSpec("int64")}


def col_batch(n, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 9, n).astype(np.float32)
    loss = (rng.random(n) * counts).astype(np.float32)
    loss[rng.random(n) < 0.1] = np.nan
    hist = rng.random((n, 3))
    hist[rng.random((n, 3)) < 0.05] = np.inf
    return {"loss": [loss, counts], "hist": hist, "n": counts.astype(np.int64)}


def batch_rows(batch):
    n = len(batch["n"])
    return [{"loss": [batch["loss"][0][i], batch["loss"][1][i]], "hist": batch["hist"][i],
             "n": batch["n"][i]} for i in range(n)]


COL_FINS = {"loss": lambda v: v[0] / v[1], "hist": lambda v: v * 2, "n": lambda v: v}


@pytest.mark.parametrize("vectorize", [True, False])
def test_columnar_matches_per_client(vectorize):
    fins = {k: vectorized(f) for k, f in COL_FINS.items()} if vectorize else COL_FINS
    p = FinalizeThenSampleFactory(6, seed=8).create(fins, COL_SPEC)
    q = FinalizeThenSampleFactory(6, seed=8).create(COL_FINS, COL_SPEC)
    s_p, s_q = p.initialize(), q.initialize()
    for r in range(3):
        batch = col_batch(50 + 10 * r, seed=r)
        with np.errstate(invalid="ignore"):
            out = p.next_columnar(s_p, batch)
            ref = q.next(s_q, batch_rows(batch))
        assert out.measurements == ref.measurements
        assert out.measurements["loss"] > 0 and out.measurements["hist"] > 0
        for res, exp in zip(out.result, ref.result):
            for name in COL_SPEC:
                np.testing.assert_array_equal(np.array(res[name]), np.array(exp[name]))
        assert np.array_equal(out.state["keys"], ref.state["keys"])
        s_p, s_q = out.state, ref.state


def test_columnar_functional_vectorized_and_offset():
    fin = vectorized(lambda m: {"ratio": m["loss"][0] / m["loss"][1], "both": [m["n"], m["hist"]]})
    p = FinalizeThenSampleFactory(4, seed=1).create(fin, COL_SPEC)
    batch = col_batch(40)
    whole = p.next_columnar(p.initialize(), batch)
    half = {"loss": [batch["loss"][0][20:], batch["loss"][1][20:]], "hist": batch["hist"][20:],
            "n": batch["n"][20:]}
    first = {"loss": [batch["loss"][0][:20], batch["loss"][1][:20]], "hist": batch["hist"][:20],
             "n": batch["n"][:20]}
    a = p.next_columnar(p.initialize(), first)
    b = p.next_columnar(p.initialize(), half, client_offset=20)
    merged = p.merge(a.state, b.state)
    assert np.array_equal(merged["indices"], whole.state["indices"])
    assert whole.measurements["both"] == [0, int((~np.isfinite(batch["hist"])).any(axis=1).sum())]
    both = whole.result[0]["both"]   # per leaf: the n column, then the hist rows
    assert isinstance(both, list) and both[0].shape == (4,) and both[1].shape == (4, 3)
    assert both[0].dtype == np.int64 and both[1].dtype == np.float64
    # The same vectorized finalizer also runs per client.
    per_client = p.next(p.initialize(), batch_rows(batch))
    np.testing.assert_allclose(per_client.result[0]["ratio"], whole.result[0]["ratio"])


def test_columns_whose_paths_print_alike_are_still_checked_for_length():
    # Metric "a"'s first column and a metric named "a[0]" are both called a[0] in messages:
    # one shorter than the other was cut to its length, or was an IndexError.
    spec = {"a": [TensorSpec("float64")], "a[0]": TensorSpec("float64")}
    p = FinalizeThenSampleFactory(10, seed=0).create(
        {"a": vectorized(lambda v: v[0]), "a[0]": vectorized(lambda v: v)}, spec)
    q = FinalizeThenSampleFactory(10, seed=0).create(
        {"a": lambda v: v[0], "a[0]": lambda v: v}, spec)
    for proc in (p, q):
        for na, nb in ((5, 3), (3, 5)):
            with pytest.raises(ValueError, match=rf"different numbers of clients.*: {na}.*: {nb}"):
                proc.next_columnar(proc.initialize(), {"a": [np.arange(na, dtype=float)],
                                                       "a[0]": np.arange(nb, dtype=float)})
        out = proc.next_columnar(proc.initialize(), {"a": [np.arange(4.0)], "a[0]": -np.arange(4.0)})
        assert out.result[0]["a"].tolist() == [0, 1, 2, 3]
        assert out.result[0]["a[0]"].tolist() == [0, -1, -2, -3]


def test_columnar_errors():
    p = FinalizeThenSampleFactory(4, seed=1).create(
        {k: vectorized(f) for k, f in COL_FINS.items()}, COL_SPEC)
    s = p.initialize()
    batch = col_batch(10)
    with pytest.raises(TypeError):
        p.next_columnar(s, batch_rows(batch))
    with pytest.raises(ValueError, match="metrics"):
        p.next_columnar(s, {"loss": batch["loss"], "n": batch["n"]})
    with pytest.raises(ValueError, match="different numbers of clients"):
        p.next_columnar(s, dict(batch, n=batch["n"][:5]))
    with pytest.raises(ValueError, match="'hist'"):
        p.next_columnar(s, dict(batch, hist=batch["hist"][:, :2]))
    with pytest.raises(TypeError, match="'hist'"):
        p.next_columnar(s, dict(batch, hist=batch["hist"].astype(str)))
    with pytest.raises(TypeError, match="'n'"):
        p.next_columnar(s, dict(batch, n=batch["n"] + 0.5))
    with pytest.raises(TypeError, match="loss"):
        p.next_columnar(s, dict(batch, loss=batch["loss"][0]))
    short = FinalizeThenSampleFactory(4).create(
        {"loss": vectorized(lambda v: v[0][:3]), "hist": vectorized(lambda v: v),
         "n": vectorized(lambda v: v)}, COL_SPEC)
    with pytest.raises(ValueError, match="leading axis of 10"):
        short.next_columnar(short.initialize(), batch)
    empty = {"loss": [np.zeros(0, np.float32)] * 2, "hist": np.zeros((0, 3)), "n": np.zeros(0, int)}
    assert p.next_columnar(s, empty).state is s


# ----------------------------------------------------------------------------------------------
# Uniform inclusion probabilities
# ----------------------------------------------------------------------------------------------

def chi_square_inclusion(counts, trials, p):
    """Sum of squared binomial z-scores of per-client inclusion counts."""
    counts = np.asarray(counts, float)
    return float((((counts - trials * p) ** 2) / (trials * p * (1 - p))).sum())


def round_inclusions(n, k, trials, biased=False):
    counts = np.zeros(n)
    for t in range(trials):
        if not biased:
            _, idx, _ = _sampling.round_sample(12345, 678, t, 0, n, k)
        else:
            # A subtly wrong sampler for the power check: client 0 gets the better of two keys.
            keys = _sampling.client_keys(12345, 678, t, 0, n)
            keys[0] = max(keys[0], _sampling.client_keys(999, 1, t, 0, 1)[0])
            idx = np.argsort(-keys.astype(float), kind="stable")[:k]
        counts[idx] += 1
    return counts


def test_round_inclusion_is_uniform():
    n, k, trials = 20, 5, 4000
    counts = round_inclusions(n, k, trials)
    assert counts.sum() == k * trials
    # 19 dof; critical value at p = 1e-6 is 63.7. Fixed seeds: deterministic, and a fair
    # sampler sits far below (expected ~19).
    assert chi_square_inclusion(counts, trials, k / n) < 63.7


def test_inclusion_check_catches_a_biased_sampler():
    n, k, trials = 20, 5, 4000
    assert chi_square_inclusion(round_inclusions(n, k, trials, biased=True), trials, k / n) > 63.7


def test_total_inclusion_is_uniform_across_rounds():
    sizes, k, trials = [7, 13, 10], 5, 2500
    total = sum(sizes)
    counts = np.zeros(total)
    current_counts = np.zeros(total)
    spec = {"id": TensorSpec("int64")}
    for seed in range(trials):
        p = FinalizeThenSampleFactory(k, seed=seed).create({"id": lambda v: v}, spec)
        state, start = p.initialize(), 0
        for n in sizes:
            out = p.next(state, [{"id": start + i} for i in range(n)])
            if n == 13:
                current_counts[out.result[0]["id"]] += 1
            state, start = out.state, start + n
        counts[state["samples"]["id"]] += 1
    # 29 dof, 1e-6 critical value 80.4; every client, whatever its round's size, has p = k/N.
    assert chi_square_inclusion(counts, trials, k / total) < 80.4
    # Round 2 alone (13 clients): p = 5/13 each; 12 dof, 1e-6 critical value 48.
    assert chi_square_inclusion(current_counts[7:20], trials, k / 13) < 48.0
    # Rounds are weighted by size: a sampler that picked k per round uniformly from the union
    # of per-round samples would over-include the small round. Check round shares directly.
    shares = [counts[a:a + n].sum() / (k * trials)
              for a, n in zip(np.cumsum([0] + sizes[:-1]), sizes)]
    assert np.allclose(shares, np.array(sizes) / total, atol=0.03)


def test_client_offset_validation_and_ordered_dict_clients():
    p = make_process()
    s = p.initialize()
    with pytest.raises(ValueError):
        p.next(s, clients_ab(3), client_offset=-1)
    with pytest.raises(TypeError):
        p.next(s, clients_ab(3), client_offset=1.0)
    with pytest.raises(ValueError):
        p.next(s, clients_ab(3), client_offset=2**63)
    with pytest.raises(ValueError):
        p.next(s, clients_ab(3), client_offset=2**63 - 2)  # offset + n overflows int64
    with pytest.raises(ValueError):
        p.next(dict(s, round=2**63), clients_ab(3))
    with pytest.raises(TypeError, match="next_columnar"):
        p.next(s, {"a": [1.0], "b": [[1.0, 2.0]]})
    ordered = [collections.OrderedDict(c) for c in clients_ab(9)]
    got, ref = p.next(s, ordered), p.next(s, clients_ab(9))
    assert_tree_equal(got.result, ref.result)
    assert np.array_equal(got.state["keys"], ref.state["keys"])


@settings(max_examples=40)
@given(st.lists(st.tuples(st.sampled_from([0.5, -2.0, np.nan, np.inf, -np.inf, 1e308]),
                          st.lists(st.sampled_from([1.0, np.nan, -np.inf]), min_size=2,
                                   max_size=2)),
                max_size=60),
       st.integers(1, 8), st.integers(0, 2**64 - 1))
def test_process_matches_reference_for_any_round(values, k, seed):
    p = make_process(k=k, seed=seed)
    state = p.initialize()
    clients = [{"a": a, "b": b} for a, b in values]
    out = p.next(state, clients)
    # Values are cast to the spec's float32 first: 1e308 becomes inf, as in TFF.
    with np.errstate(over="ignore"):
        assert out.measurements == {
            "a": sum(not np.isfinite(np.float32(a)) for a, _ in values),
            "b": sum(not all(math.isfinite(x) for x in b) for _, b in values)}
    expected, _ = brute_force_top(state["seed"], 0, len(values), k)
    expected = sorted(expected)   # arrival order
    assert out.state["indices"].tolist() == expected
    assert [np.asarray(x).tobytes() for x in out.result[0]["b"]] == \
        [np.asarray(values[i][1], np.float32).tobytes() for i in expected]


def test_context_survives_exception_types_without_message_constructor():
    err = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad")
    wrapped = _sampling.with_context(err, "client 3, metric 'a'")
    assert isinstance(wrapped, ValueError) and "client 3, metric 'a'" in str(wrapped)

    def raise_err(v):
        raise err

    # An exception raised by a finalizer itself propagates unchanged (with a note).
    q = make_process(finalizers={"a": fails_after_probe(lambda _: err), "b": lambda v: v})
    with pytest.raises(UnicodeDecodeError):
        q.next(q.initialize(), clients_ab(2))


# ----------------------------------------------------------------------------------------------
# Hostile inputs: finalizers and values that run Python code mid-round must never make the
# compiled loops read or write past a container (each of these crashed, or corrupted the heap
# under AddressSanitizer, before its fix).
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change", ["clear", "append", "replace a later client",
                                    "replace a read client"])
def test_finalizer_changing_the_client_list(change):
    # A list is read in place: a change before a client is read is a RuntimeError naming it;
    # a change to clients already read leaves the round as given.
    spec = {"x": TensorSpec("float64")}
    clients = [{"x": float(i)} for i in range(50)]
    ref = FinalizeThenSampleFactory(5, seed=3).create({"x": lambda v: v}, spec)
    expected = ref.next(ref.initialize(), list(clients))
    armed = []

    def change_once(v):
        if armed and armed.pop():
            if change == "clear":
                clients.clear()
            elif change == "append":
                clients.append({"x": 1.0})
            elif change == "replace a later client":
                clients[7] = {"x": -1.0}
            else:
                clients[0] = {"x": -1.0}
        return v

    p = FinalizeThenSampleFactory(5, seed=3).create({"x": change_once}, spec)
    armed.append(True)
    if change == "replace a read client":
        out = p.next(p.initialize(), clients)
        assert_tree_equal(out.result[0], expected.result[0])
        assert out.state["indices"].tolist() == expected.state["indices"].tolist()
        return
    first_unread = 7 if change == "replace a later client" else 1
    with pytest.raises(RuntimeError, match=f"before client {first_unread} was read"):
        p.next(p.initialize(), clients)
    # A tuple cannot change: the same finalizer changing the list it came from is harmless.
    clients[:] = [{"x": float(i)} for i in range(50)]
    armed.append(True)
    out = p.next(p.initialize(), tuple(clients))
    assert out.state["indices"].tolist() == expected.state["indices"].tolist()


class _ShiftingMapping(collections.abc.Mapping):
    """A mapping whose keys change after the first iteration."""

    def __init__(self):
        self.calls = 0

    def __iter__(self):
        self.calls += 1
        return iter(["a"] if self.calls == 1 else [f"k{i}" for i in range(200)])

    def __len__(self):
        return 1

    def __getitem__(self, key):
        return math.nan


def test_finalized_mapping_is_read_once_even_if_its_keys_change():
    calls = []

    def finalize(v):
        calls.append(v)
        return {"a": 1.0} if len(calls) == 1 else _ShiftingMapping()

    p = make_process(finalizers={"a": finalize, "b": lambda v: v})   # probe: {"a": 1.0}
    out = p.next(p.initialize(), clients_ab(4))
    # Structure and non-finite flags come from one reading of each value: {"a": nan}.
    assert out.measurements["a"] == {"a": 4}
    assert out.result[0]["a"]["a"].shape == (3,)

    def finalize_shifted_first(v):
        calls.append(v)
        m = _ShiftingMapping()
        m.calls = 1   # its first reading already has the 200 other keys
        return {"a": 1.0} if len(calls) == 6 else m

    q = make_process(finalizers={"a": finalize_shifted_first, "b": lambda v: v})
    with pytest.raises(ValueError, match=r"client 0, metric 'a'.*create\(\)"):
        q.next(q.initialize(), clients_ab(2))


def test_finalized_mapping_repeating_a_key_is_rejected():
    class Twice(collections.abc.Mapping):
        def __iter__(self):
            return iter(["a", "a"])

        def __len__(self):
            return 2

        def __getitem__(self, key):
            return math.nan

    with pytest.raises(TypeError, match="key 'a' twice"):
        make_process(finalizers={"a": lambda v: Twice(), "b": lambda v: v})
    calls = []
    p = make_process(finalizers={"a": lambda v: calls.append(v) or ({"a": 1.0} if len(calls) == 1
                                                                     else Twice()),
                                 "b": lambda v: v})
    with pytest.raises(ValueError, match="client 0, metric 'a'.*key 'a' twice"):
        p.next(p.initialize(), clients_ab(3))


def test_finalizer_reusing_and_growing_one_list_is_rejected():
    shared = [1.0, 2.0]

    def finalize(v):
        # The same list object every time, grown after the first client: the template
        # must be the first client's structure, not an alias of the grown list.
        if len(shared) < 4 and v != 0.0:
            shared.append(math.nan)
        return shared

    p = make_process(k=2, finalizers={"a": finalize, "b": lambda v: v})
    with pytest.raises(ValueError, match=r"client 1, metric 'a'.*create\(\)"):
        p.next(p.initialize(), clients_ab(3))


class _SneakyInt(int):
    """An int whose range check (int(v)) runs ``on_int``; the converter hands it over as is."""

    def __new__(cls, value, on_int):
        self = super().__new__(cls, value)
        self.on_int = on_int
        return self

    def __int__(self):
        self.on_int()
        return int.__int__(self)


@pytest.mark.parametrize("keep", ["nothing", "return", "list", "view", "weakref",
                                  "reshape", "retype", "readonly", "functional"])
def test_list_values_refilled_only_when_nobody_kept_them(keep):
    """A list under a 1-d float spec becomes an ndarray; fastrec refills the previous
    client's array when nothing but itself holds it. Whatever the finalizer keeps or does
    to its input, every client must see, and every sample hold, that client's own values."""
    import weakref
    seen, kept = [], []

    def fin(v):
        seen.append((v.dtype, v.shape, v.tolist()))
        if keep == "list":
            kept.append(v)
        elif keep == "view":
            kept.append(v[:])
        elif keep == "weakref":
            kept.append(weakref.ref(v))
        elif keep == "reshape":
            v.shape = (1, 2)
            return v.reshape(2).copy()
        elif keep == "retype":
            v.dtype = np.int32
            return v.view(np.float32).copy()
        elif keep == "readonly":
            v.flags.writeable = False
        return v if keep in ("return", "list", "view") else v.copy()

    spec = {"p": TensorSpec("float32", (2,)), "q": TensorSpec("float64")}
    clients = [{"p": [float(i), float(-i)], "q": 0.5 * i} for i in range(40)]
    if keep == "functional":
        proc = FinalizeThenSampleFactory(40, seed=1).create(
            lambda d: {"p": fin(d["p"]), "q": d["q"]}, spec)
    else:
        proc = FinalizeThenSampleFactory(40, seed=1).create({"p": fin, "q": lambda v: v}, spec)
    seen.clear()
    kept.clear()   # the probe's call at create()
    out = proc.next(proc.initialize(), clients)
    assert [x[2] for x in seen] == [[float(i), float(-i)] for i in range(40)]
    assert all(x[0] == np.float32 and x[1] == (2,) for x in seen)
    assert out.result[0]["p"].tolist() == [[float(i), float(-i)] for i in range(40)]
    if keep == "list":
        assert [a.tolist() for a in kept] == [[float(i), float(-i)] for i in range(40)]
    if keep == "view":
        assert [a.tolist() for a in kept] == [[float(i), float(-i)] for i in range(40)]
    if keep == "weakref":
        live = [r() for r in kept]
        assert all(a is None or a.tolist() == [float(i), float(-i)]
                   for i, a in enumerate(live))


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "int32", "int16", "int8",
                                   "uint32", "uint8"])
@pytest.mark.parametrize("keep", ["nothing", "return", "list", "functional"])
def test_number_scalars_reused_only_when_nobody_kept_them(dtype, keep):
    """A Python number becomes a numpy scalar of the spec's dtype; fastrec stores the next
    client's number into the previous client's scalar when nothing but itself holds it.
    Every client must see, and every kept scalar and sample hold, that client's own value."""
    seen, kept = [], []

    def fin(v):
        seen.append((type(v), v.item()))
        if keep == "list":
            kept.append(v)
        return v if keep in ("return", "list", "functional") else v + 0

    spec = {"x": TensorSpec(dtype), "y": TensorSpec("float64")}
    values = [i % 100 for i in range(60)] if "int" in dtype else [i / 7 for i in range(60)]
    clients = [{"x": x, "y": float(i)} for i, x in enumerate(values)]
    if keep == "functional":
        proc = FinalizeThenSampleFactory(60, seed=1).create(
            lambda d: {"x": fin(d["x"]), "y": d["y"]}, spec)
    else:
        proc = FinalizeThenSampleFactory(60, seed=1).create({"x": fin, "y": lambda v: v},
                                                            spec)
    seen.clear()
    kept.clear()   # the probe's call at create()
    out = proc.next(proc.initialize(), clients)
    want = [np.dtype(dtype).type(x).item() for x in values]
    assert seen == [(np.dtype(dtype).type, w) for w in want]
    assert out.result[0]["x"].tolist() == want
    assert out.result[0]["y"].tolist() == [float(i) for i in range(60)]
    if keep == "list":
        assert [v.item() for v in kept] == want
        assert len({id(v) for v in kept}) == len(kept)


def test_one_process_on_several_threads_at_once():
    """A process holds no round's state, so threads may run it at once: the values it reuses
    from client to client (scalars, list arrays) are shared by the process's calls. Finalizers
    that give up the GIL between a client's values make the threads' rounds interleave; each
    thread must still get the rounds one thread alone gets, and each finalizer its own
    client's values."""
    seen = threading.local()
    seen.values = []   # the probe's call at create()

    def ratio(v):
        seen.values.append(v.tolist())
        time.sleep(0)   # let another thread run while this client's values are held
        return v[0] / v[1]

    def count(v):
        seen.values.append(int(v))
        return v

    spec = {"accuracy": TensorSpec("float32"), "loss": TensorSpec("float32", (2,)),
            "num_examples": TensorSpec("int64")}
    proc = FinalizeThenSampleFactory(20, seed=3).create(
        {"accuracy": lambda v: v, "loss": ratio, "num_examples": count}, spec)
    rng = np.random.default_rng(5)
    rounds = [[{"accuracy": float(rng.random()),
                "loss": [float(rng.random() * 9), float(rng.integers(1, 50))],
                "num_examples": int(rng.integers(1, 500))} for _ in range(400)]
              for _ in range(5)]

    def run_rounds():
        seen.values = []
        state, outs = proc.initialize(), []
        for clients in rounds:
            out = proc.next(state, clients)
            state = out.state
            outs.append(out)
        return outs, seen.values

    want, want_seen = run_rounds()
    got = [None] * 4
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, run_rounds()))
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    for outs, values in got:
        assert values == want_seen
        for a, b in zip(outs, want):
            assert a.measurements == b.measurements
            assert_tree_equal(a.result, b.result)   # result[1] is the state's samples
            for field in ("keys", "rounds", "indices"):
                assert np.array_equal(a.state[field], b.state[field])


_FAST_DTYPES = ["float32", "float64", "int64", "int32", "int16", "int8", "uint32", "uint16",
                "uint8"]


@settings(max_examples=300)
@given(dtype=st.sampled_from(_FAST_DTYPES),
       values=st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                 st.integers(-2**70, 2**70), st.integers(-300, 300),
                                 st.sampled_from([10**400, -10**400])),
                       min_size=1, max_size=6))
def test_python_numbers_cast_as_numpy_casts_them(dtype, values):
    """Exact Python floats and ints are written straight into numpy scalars (reused across
    calls): each must be the scalar numpy's own cast gives, of the exact type, or the
    spec's ValueError/TypeError where the value does not fit or is not accepted."""
    leaf = _sampling.CompiledSpec.leaf(np.dtype(dtype), ())
    dt = np.dtype(dtype)
    for v in values:
        if dt.kind == "f" and isinstance(v, int) and abs(v) > 10**300:
            want = ValueError   # no double holds it
        elif dt.kind == "f":
            with np.errstate(over="ignore"):
                want = np.array(float(v)).astype(dt)[()]
        elif isinstance(v, float):
            want = TypeError
        else:
            info = np.iinfo(dt)
            want = dt.type(v) if info.min <= v <= info.max else ValueError
        if isinstance(want, type):
            with pytest.raises(want):
                _sampling.convert_value(leaf, v)
            continue
        got = _sampling.convert_value(leaf, v)
        assert type(got) is dt.type
        assert got.tobytes() == want.tobytes() or (np.isnan(want) and np.isnan(got)), (v, got)


_ANY_VALUE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**65, 2**65),
    st.integers(-3, 3), st.booleans(), st.none(), st.text(max_size=2),
    st.lists(st.floats(width=32), max_size=3),
    st.lists(st.one_of(st.floats(), st.integers(-3, 3)), min_size=2, max_size=2),
    st.tuples(st.floats(), st.floats()),
    st.builds(np.float32, st.floats(width=32)), st.builds(np.float64, st.floats()),
    st.builds(np.int64, st.integers(-2**63, 2**63 - 1)), st.builds(np.int8, st.integers(-128, 127)),
    st.builds(lambda a, b, t: np.array([a, b], t), st.integers(-5, 5), st.floats(width=32),
              st.sampled_from(["float32", "float64", ">f4"])),
    st.builds(lambda a, b: np.array([a, b], np.int64), st.integers(-5, 5), st.integers(-5, 5)),
    st.builds(lambda a: np.array(a, np.float32), st.floats(width=32)))

_DIFF_SPEC = {"a": TensorSpec("float32"), "b": TensorSpec("float32", (2,)),
              "c": TensorSpec("int64"), "d": TensorSpec("float64", (None,)),
              "e": TensorSpec("int8")}


def _finalizer_of(kind, kept):
    if kind == "same":
        return lambda v: v
    if kind == "keep":
        return lambda v: (kept.append(v), v)[1]
    if kind == "sum":
        return lambda v: np.sum(v)
    if kind == "float":
        return lambda v: float(np.sum(v))
    if kind == "pair":
        return lambda v: [v, v]
    return lambda v: 1 / 0 if np.any(np.asarray(v) == 3) else v   # "raise", now and then


_VALID_VALUE = {
    "a": st.floats() | st.builds(np.float32, st.floats(width=32)) | st.integers(-3, 3)
    | st.builds(np.float64, st.floats()),
    "b": st.lists(st.floats(), min_size=2, max_size=2) | st.lists(st.integers(-3, 3),
                                                                  min_size=2, max_size=2)
    | st.builds(lambda a, b: np.array([a, b], np.float32), st.floats(width=32),
                st.floats(width=32)) | st.tuples(st.floats(), st.floats()),
    "c": st.integers(-2**63, 2**63 - 1) | st.builds(np.int64, st.integers(-9, 9))
    | st.builds(np.int8, st.integers(-9, 9)),
    "d": st.lists(st.floats(), max_size=3) | st.builds(np.array, st.lists(st.floats(),
                                                                        max_size=3)),
    "e": st.integers(-128, 127) | st.builds(np.int8, st.integers(-128, 127)),
}


@st.composite
def _round_of_clients(draw):
    """Mostly well-formed clients in the names' order (what the C step takes), some in
    another order, and now and then one arbitrary client (most of them errors)."""
    clients = []
    for _ in range(draw(st.integers(0, 16))):
        items = [(n, draw(_VALID_VALUE[n])) for n in "abcde"]
        if draw(st.integers(0, 9)) == 0:
            items = draw(st.permutations(items))
        clients.append(dict(items))
    if draw(st.integers(0, 4)) == 0:
        odd = draw(st.dictionaries(st.sampled_from("abcdef"), _ANY_VALUE, min_size=4,
                                   max_size=6))
        clients.insert(draw(st.integers(0, len(clients))), odd)
    return clients


@settings(max_examples=300)
@given(clients=_round_of_clients(),
       kinds=st.lists(st.sampled_from(["same", "same", "keep", "sum", "float", "pair",
                                       "raise"]), min_size=5, max_size=5),
       k=st.integers(1, 3))
def test_c_client_step_matches_the_general_path(clients, kinds, k):
    """next() takes the common clients through its C step (fc_client) and the rest the
    general way: on any mix of values, key orders and finalizers, the result, measurements,
    the values finalizers saw and kept, and any error are those of the general way alone."""
    def run(fast):
        kept = []
        fins = {n: _finalizer_of(kind, kept) for n, kind in zip("abcde", kinds)}
        was = _sampling.set_client_fast_path(fast)
        try:
            try:
                proc = FinalizeThenSampleFactory(k, seed=3).create(fins, _DIFF_SPEC)
            except TypeError as e:   # a finalizer the probe refuses: both ways alike
                return ("create", type(e), str(e))
            kept.clear()
            try:
                out = proc.next(proc.initialize(), [dict(c) for c in clients])
            except Exception as e:
                return ("error", type(e), str(e), getattr(e, "__notes__", None))
            return ("ok", _plain(out.result), out.measurements, _plain(out.state["samples"]),
                    _plain(kept))
        finally:
            _sampling.set_client_fast_path(was)

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        assert run(True) == run(False)


def _plain(v):
    """v with arrays and numpy scalars as (type, dtype, shape, bytes): comparable with ==,
    NaN included."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_plain(x) for x in v)
    if isinstance(v, (np.ndarray, np.generic)):
        return (type(v), v.dtype.str, np.shape(v), np.asarray(v).tobytes())
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return v


def test_metrics_read_in_any_key_order_and_key_identity():
    """Clients whose keys come in the finalizers' order are read item by item; any other
    order, equal keys that are other str objects, str subclasses and dicts mutated by a
    finalizer must read exactly what a lookup by name reads."""
    class Key(str):
        pass

    spec = {"a": TensorSpec("float64"), "b": TensorSpec("float64"), "c": TensorSpec("int64")}
    names = list(spec)

    def copy_of(k):
        return "".join(list(k))   # equal, not the same object

    makers = [lambda v: {k: v[k] for k in names},
              lambda v: {k: v[k] for k in reversed(names)},
              lambda v: {copy_of(k): v[k] for k in names},
              lambda v: {Key(k): v[k] for k in names},
              lambda v: {"b": v["b"], "a": v["a"], "c": v["c"]},
              lambda v: collections.OrderedDict((k, v[k]) for k in names)]
    raw = [{"a": i / 3, "b": -i / 5, "c": i} for i in range(len(makers) * 5)]
    clients = [makers[i % len(makers)](v) for i, v in enumerate(raw)]
    fins = {k: (lambda v: v) for k in names}
    proc = FinalizeThenSampleFactory(len(raw), seed=3).create(fins, spec)
    out = proc.next(proc.initialize(), clients)
    for k in names:
        assert out.result[0][k].tolist() == [v[k] for v in raw]

    # A finalizer that reorders the client's dict between reads: later metrics are read
    # from the dict as it is then, by name.
    def shuffle(v, box=[]):
        for c in clients:
            b = c.pop("b", None)
            if b is not None:
                c["b"] = b
        return v
    proc = FinalizeThenSampleFactory(len(raw), seed=3).create(
        {"a": shuffle, "b": lambda v: v, "c": lambda v: v}, spec)
    out = proc.next(proc.initialize(), clients)
    for k in names:
        assert out.result[0][k].tolist() == [v[k] for v in raw]


def test_every_kind_of_callable_is_a_finalizer():
    """Python functions are called through their vectorcall entry point, everything else
    through PyObject_Vectorcall: the results must not depend on which."""
    import functools

    class Twice:
        def __call__(self, v):
            return v * 2

        def method(self, v):
            return v * 2

    kinds = {"function": lambda v: v * 2, "partial": functools.partial(np.multiply, 2),
             "object": Twice(), "method": Twice().method, "ufunc": np.negative,
             "builtin": abs}
    spec = {k: TensorSpec("float64") for k in kinds}
    clients = [{k: float(i) - 3 for k in kinds} for i in range(7)]
    proc = FinalizeThenSampleFactory(7, seed=0).create(kinds, spec)
    out = proc.next(proc.initialize(), clients)
    for k, fn in kinds.items():
        assert out.result[0][k].tolist() == [float(fn(np.float64(c[k]))) for c in clients]

    def bad(v):
        if v == 2:   # not the probe's 1
            raise ArithmeticError("no")
        return v
    proc = FinalizeThenSampleFactory(7, seed=0).create(
        {"first": abs, "second": bad}, {"first": TensorSpec("float64"),
                                        "second": TensorSpec("float64")})
    with pytest.raises(ArithmeticError) as e:
        proc.next(proc.initialize(), [{"first": 1.0, "second": 3.0},
                                      {"first": 1.0, "second": 2.0}])
    assert "(while finalizing metric 'second' of client 1)" in " ".join(e.value.__notes__)


class _SneakyMapping(collections.abc.Mapping):
    """A mapping whose reads run ``action`` (Python code, run while its struct is read)."""

    def __init__(self, items, action):
        self.items, self.action = dict(items), action

    def __getitem__(self, key):
        self.action()
        return self.items[key]

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def test_struct_value_shrunk_while_its_elements_are_checked():
    spec = {"x": [TensorSpec("int64"), {"k": TensorSpec("int64")}] + [TensorSpec("int64")] * 38}
    value = []
    value.extend([1, _SneakyMapping({"k": 5}, value.clear)] + [2] * 38)
    seen = []
    p = FinalizeThenSampleFactory(2, seed=0).create({"x": lambda v: seen.append(v) or 0.0}, spec)
    p.next(p.initialize(), [{"x": value}])
    # The finalizer got the 40 checked values, not the emptied list (seen[0]: the probe).
    assert value == [] and len(seen) == 2
    assert len(seen[1]) == 40 and seen[1][0] == 1 and seen[1][1] == {"k": 5}
    assert seen[1][2:] == [2] * 38


def test_struct_value_changed_while_checked_hands_over_the_checked_values():
    spec = {"x": [TensorSpec("int8"), {"k": TensorSpec("int8")}, TensorSpec("int8")]}
    value = [0, None, 0]

    def swap():
        value[0] = "not a number"

    value[1] = _SneakyMapping({"k": 1}, swap)
    seen = []
    p = FinalizeThenSampleFactory(2, seed=0).create({"x": lambda v: seen.append(v) or 0.0}, spec)
    p.next(p.initialize(), [{"x": value}])
    assert value[0] == "not a number"
    assert seen[1] == [0, {"k": 1}, 0]   # the checked elements, not the swapped-in string
    assert type(seen[1][0]) is np.int8 and type(seen[1][1]["k"]) is np.int8   # the spec's dtype


def test_finalize_clients_rejects_inconsistent_internal_arguments():
    leaf = _sampling.CompiledSpec.leaf("f8", ())
    lay = _sampling.Layout.of(1.0)
    pos = np.zeros(0, np.int64)
    with pytest.raises(TypeError):
        _sampling.finalize_clients([{"x": 1.0}], ("x",), (leaf,), (float,), None, ("x",),
                                   (lay,), None)
    with pytest.raises(ValueError, match="specs"):
        _sampling.finalize_clients([{"x": 1.0, "y": 2.0}], ("x", "y"), (leaf,), (float, float),
                                   None, ("x", "y"), (lay, lay), pos)
    with pytest.raises(ValueError, match="finalizers"):
        _sampling.finalize_clients([{"x": 1.0, "y": 2.0}], ("x", "y"), (leaf, leaf), (float,),
                                   None, ("x", "y"), (lay, lay), pos)
    with pytest.raises(TypeError, match="Layout"):
        _sampling.finalize_clients([{"x": 1.0}], ("x",), (leaf,), (float,), None, ("x",),
                                   ("not a layout",), pos)
    with pytest.raises(ValueError, match="ascending"):
        _sampling.finalize_clients([{"x": 1.0}] * 3, ("x",), (leaf,), (float,), None, ("x",),
                                   (lay,), np.array([2, 1], np.int64))


@pytest.mark.parametrize("call", [
    lambda: _sampling.union_entries(None, [], [], [], 0, [], 1),
    lambda: _sampling.gather_rows(None, np.zeros(1, np.int64)),
    lambda: _sampling.gather_rows(np.zeros(3), None),
])
def test_kernel_wrappers_reject_none_arrays(call):
    with pytest.raises(TypeError):
        call()



class _ArrayImpostor:
    """isinstance(x, np.ndarray) is True through __class__, but it is no array."""
    dtype = np.dtype("f8")

    @property
    def __class__(self):
        return np.ndarray


class _ScalarImpostor:
    """Claims to be an np.float64 through __class__, without a dtype."""

    @property
    def __class__(self):
        return np.float64


class _LyingDtype(np.ndarray):
    @property
    def dtype(self):
        return np.dtype("f8")

    def astype(self, *args, **kwargs):
        return np.zeros(10**6, np.float64)


class _LyingShape(np.ndarray):
    @property
    def shape(self):
        return (self.size, 1000)


def test_array_impostors_are_type_errors_not_struct_reads():
    with pytest.raises(TypeError, match="numpy.ndarray"):
        count_non_finite(_ArrayImpostor())
    with pytest.raises(TypeError, match="numpy.ndarray"):
        _sampling.count_non_finite_rows(_ArrayImpostor())
    with pytest.raises(TypeError, match="finalized value must be a number"):
        make_process(finalizers={"a": lambda v: _ArrayImpostor(), "b": lambda v: v})
    p = make_process(finalizers={"a": lambda v: _ArrayImpostor() if v == 0 else v,
                                 "b": lambda v: v})
    with pytest.raises(TypeError, match="client 0, metric 'a'.*finalized value must be a number"):
        p.next(p.initialize(), clients_ab(2))


def test_numpy_scalar_impostor_client_value_is_a_type_error():
    p = make_process()
    clients = clients_ab(2)
    clients[1]["a"] = _ScalarImpostor()
    with pytest.raises(TypeError, match="client 1, metric 'a'"):
        p.next(p.initialize(), clients)


@pytest.mark.parametrize("order", ["=", ">"])
def test_ndarray_subclass_attributes_do_not_steer_the_kernels(order):
    base = np.zeros(1000, np.dtype("f2").newbyteorder(order))
    base[[3, 500, 999]] = np.nan
    lying = base.view(_LyingDtype)
    assert count_non_finite(lying) == 3
    assert _sampling.count_non_finite_rows(lying.reshape(10, 100).view(_LyingDtype)) == 3
    rows = np.arange(12, dtype=np.float16).reshape(4, 3)
    pos = np.array([3, 0, 3], np.int64)
    for sub in (_LyingDtype, _LyingShape):
        got = _sampling.gather_rows(rows.view(sub), pos)
        assert type(got) is np.ndarray and got.dtype == np.float16
        assert np.array_equal(got, rows[pos])


def test_gather_rows_reversed_rows_use_numpy():
    rows = np.arange(12.0).reshape(4, 3)[:, ::-1]
    pos = np.array([3, 1], np.int64)
    assert np.array_equal(_sampling.gather_rows(rows, pos), rows[pos])


def test_specs_must_be_compiled_specs():
    with pytest.raises(TypeError, match="CompiledSpec"):
        _sampling.CompiledSpec.struct(list, [TensorSpec("float64")])
    with pytest.raises(TypeError, match="CompiledSpec"):
        _sampling.finalize_clients([{"x": 1.0}], ("x",), ("not a spec",), (float,), None,
                                   ("x",), (_sampling.Layout.of(1.0),), np.zeros(0, np.int64))


class _Trap:
    """A client value that runs ``action`` whenever it is inspected: posing as ``pretend``
    through __class__, and through __float__/__index__/__int__/__len__/__getitem__/__array__."""

    def __init__(self, pretend, action):
        self.pretend, self.action = pretend, action

    @property
    def __class__(self):
        self.action()
        return self.pretend

    def __float__(self):
        self.action()
        return 1.0

    def __index__(self):
        self.action()
        return 1

    __int__ = __index__

    def __len__(self):
        self.action()
        return 2

    def __getitem__(self, i):
        self.action()
        if i >= 2:
            raise IndexError(i)
        return 1.0

    def __array__(self, dtype=None, copy=None):
        self.action()
        return np.array([1.0, math.nan])


_PLAIN = [1.0, math.nan, -math.inf, 3, True, "x", None, [1.0, 2.0], np.float32(np.inf),
          np.array([math.nan, 1.0]), _SneakyInt(2, lambda: None)]
_ACTIONS = ["none", "clear clients", "grow clients", "clear dict", "refill dict",
            "clear struct", "refill struct", "raise"]
_slot = st.one_of(
    st.just(("keep",)), st.just(("keep",)), st.just(("keep",)),   # so that some rounds pass
    st.integers(0, len(_PLAIN) - 1).map(lambda i: ("plain", i)),
    st.tuples(st.just("trap"), st.sampled_from([float, np.float64, list, int] + [np.ndarray] * 4),
              st.sampled_from(_ACTIONS)),
)
hostile_round = st.lists(st.tuples(_slot, _slot, _slot), min_size=1, max_size=8)


def _build_hostile_round(desc):
    """Clients for spec {"a": float64, "b": [float64, (2,) float64]} from a description:
    per client and slot, keep the valid 0.0, a plain value, or a trap whose action mutates
    the client list, the client's dict or its struct list when inspected."""
    clients = [{"a": 0.0, "b": [0.0, [0.0, 0.0]]} for _ in desc]
    for c, slots in zip(list(clients), desc):
        struct = c["b"]

        def act(name, c=c, struct=struct):
            if name == "clear clients":
                clients.clear()
            elif name == "grow clients":
                clients.extend([{"a": 1.0}] * 3)
            elif name == "clear dict":
                c.clear()
            elif name == "refill dict":
                c.update({"a": "y", "b": "z", "extra": 1})
            elif name == "clear struct":
                struct.clear()
            elif name == "refill struct":
                struct[:] = ["y", "z", "w"]
            elif name == "raise":
                raise RuntimeError("trap")

        for where, slot in zip(("a", 0, 1), slots):
            if slot[0] == "keep":
                continue
            v = _PLAIN[slot[1]] if slot[0] == "plain" else \
                _Trap(slot[1], lambda name=slot[2], act=act: act(name))
            if where == "a":
                c["a"] = v
            else:
                struct[where] = v
    return clients


@settings(max_examples=150)
@given(hostile_round, st.integers(1, 4), st.booleans())
def test_fuzz_hostile_client_values_never_crash(desc, k, as_tuple):
    spec = {"a": TensorSpec("float64"), "b": [TensorSpec("float64"), TensorSpec("float64", (2,))]}
    p = FinalizeThenSampleFactory(k, seed=1).create({"a": lambda v: v, "b": lambda v: v}, spec)
    clients = _build_hostile_round(desc)
    n = len(clients)
    try:
        out = p.next(p.initialize(), tuple(clients) if as_tuple else clients)
    except (TypeError, ValueError):
        return
    except RuntimeError as e:
        # the trap's own error propagates unchanged; a list the traps changed is refused
        assert str(e) == "trap" or (not as_tuple and "client_values changed" in str(e))
        return
    # Accepted: the round had its n clients, at most k sampled, each sample checked.
    assert len(out.state["indices"]) == min(n, k)
    assert all(0 <= i < n for i in out.state["indices"].tolist())
    a, b = out.result[0]["a"], out.result[0]["b"]
    m = min(n, k)
    assert a.shape == (m,) and a.dtype == np.float64
    assert len(b) == 2 and b[0].shape == (m,) and b[1].shape == (m, 2)
    assert b[0].dtype == b[1].dtype == np.float64
    assert isinstance(out.measurements["a"], int) and 0 <= out.measurements["a"] <= n
    assert [type(x) for x in out.measurements["b"]] == [int, int]


def test_fuzz_hostile_round_builder_reaches_accepted_rounds():
    # The fuzz is only useful if some hostile rounds are accepted: check a known one.
    desc = [(("trap", float, "clear clients"), ("keep",), ("plain", 10)),
            (("keep",), ("trap", np.ndarray, "refill struct"), ("keep",))]
    clients = _build_hostile_round(desc)
    p = FinalizeThenSampleFactory(2, seed=1).create(
        {"a": lambda v: v, "b": lambda v: v},
        {"a": TensorSpec("float64"), "b": [TensorSpec("float64"), TensorSpec("float64", (2,))]})
    with pytest.raises(TypeError):
        p.next(p.initialize(), clients)   # a float impostor is not a float
    desc = [(("plain", 10), ("keep",), ("trap", np.ndarray, "clear clients"))] * 3
    with pytest.raises(RuntimeError, match="client_values changed"):
        p.next(p.initialize(), _build_hostile_round(desc))
    out = p.next(p.initialize(), tuple(_build_hostile_round(desc)))
    assert len(out.state["indices"]) == 2 and out.measurements == {"a": 0, "b": [0, 3]}


# -- columnar rounds drawn on two threads ---------------------------------------------------------

def _two_thread_case(monkeypatch, threshold):
    from fastrec import sampling
    monkeypatch.setattr(sampling, "_OVERLAP_MIN_CLIENTS", threshold)
    monkeypatch.setattr(sampling, "_KEY_CHUNK", 700)   # several chunks, one shorter
    monkeypatch.setattr(sampling, "_CORES", 2)
    rng = np.random.default_rng(5)
    n = 5_000
    col = rng.standard_normal(n)
    col[rng.random(n) < 0.05] = np.nan
    batch = {"x": col, "y": [rng.integers(0, 9, n), rng.random(n)]}
    spec = {"x": fastrec.TensorSpec("float64"),
            "y": [fastrec.TensorSpec("int64"), fastrec.TensorSpec("float64")]}
    fins = {"x": fastrec.vectorized(lambda c: c * 2),
            "y": fastrec.vectorized(lambda c: [c[0], c[1]])}
    proc = fastrec.FinalizeThenSampleFactory(37, seed=11).create(fins, spec)
    state = proc.next_columnar(proc.initialize(), batch, client_offset=3).state
    return proc.next_columnar(state, batch, client_offset=3)


@pytest.mark.parametrize("threshold", [1, 4_000])
def test_columnar_keys_on_a_second_thread_give_the_one_thread_result(monkeypatch, threshold):
    serial = _two_thread_case(monkeypatch, 10**12)
    split = _two_thread_case(monkeypatch, threshold)
    assert split.measurements == serial.measurements
    for a, b in ((split.state, serial.state),):
        np.testing.assert_array_equal(a["keys"], b["keys"])
        np.testing.assert_array_equal(a["indices"], b["indices"])
        np.testing.assert_array_equal(a["rounds"], b["rounds"])
    assert repr(split.result) == repr(serial.result)


def _helpers_end(timeout=10.0):
    """Wait (a little) for every RoundDraw helper thread to end; how many still run."""
    deadline = time.monotonic() + timeout
    while _sampling.helpers_running() and time.monotonic() < deadline:
        time.sleep(0.001)
    return _sampling.helpers_running()


def test_columnar_finalizer_error_with_keys_on_a_helper_thread(monkeypatch):
    from fastrec import sampling
    monkeypatch.setattr(sampling, "_OVERLAP_MIN_CLIENTS", 1)
    monkeypatch.setattr(sampling, "_CORES", 2)
    boom = fails_after_probe(RuntimeError)
    proc = fastrec.FinalizeThenSampleFactory(3, seed=0).create(
        {"x": fastrec.vectorized(boom)}, {"x": fastrec.TensorSpec("float64")})
    with pytest.raises(RuntimeError, match="boom"):
        proc.next_columnar(proc.initialize(), {"x": np.ones(100_000)})
    assert _helpers_end() == 0   # the helper thread let go and ended


@settings(max_examples=200)
@given(st.integers(0, 3000), st.integers(0, 60), st.integers(1, 500), st.integers(0, 10**6),
       st.integers(0, 10), st.booleans())
def test_round_draw_on_two_threads_is_round_sample(n, k, chunk, offset, round_, helper):
    want = _sampling.round_sample(7, 9, round_, offset, n, k)
    got = _sampling.RoundDraw(7, 9, round_, offset, n, k, chunk, helper).finish()
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_round_draw_redraws_the_chunk_a_slow_helper_is_still_drawing():
    # One big chunk and a tiny one: the helper, started while the caller sleeps, takes the big
    # one; the caller takes the tiny one and is done long before the helper, so it draws the
    # big chunk again itself rather than wait (the helper's copy is dropped). Which thread
    # gets which chunk is up to the scheduler: every split must give round_sample's result.
    n, chunk = 4_001_000, 4_000_000
    want = _sampling.round_sample(1, 2, 3, 5, n, 50)
    paths = set()
    for _ in range(10):
        d = _sampling.RoundDraw(1, 2, 3, 5, n, 50, chunk, True)
        time.sleep(0.0003)
        got = d.finish()
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        assert (d.helper_chunks, d.redrawn) in {(0, 0), (1, 0), (2, 0), (0, chunk), (0, 1000)}
        paths.add(d.redrawn)
    # On an idle machine (seen: 39 times in 40) the caller redraws; don't fail a busy one.
    if chunk not in paths:
        pytest.skip(f"the helper never ran during the caller's sleep (paths {paths})")


def test_round_draw_checks_its_arguments_and_closes_once():
    for bad in [(-1, 5, 1), (5, -1, 1), (5, 5, 0)]:
        with pytest.raises(ValueError):
            _sampling.RoundDraw(1, 2, 0, 0, *bad)
    with pytest.raises(ValueError):
        _sampling.RoundDraw(1, 2, -1, 0, 5, 5)
    with pytest.raises(OverflowError):
        _sampling.RoundDraw(1, 2, 0, 2**63 - 1, 2, 1)
    d = _sampling.RoundDraw(1, 2, 0, 0, 100_000, 5, 64)
    d.finish()
    with pytest.raises(RuntimeError, match="closed"):
        d.finish()
    d.close()
    d = _sampling.RoundDraw(1, 2, 0, 0, 100_000, 5, 64)
    d.close()
    d.close()
    with pytest.raises(RuntimeError, match="closed"):
        d.finish()
    # An empty reservoir draws nothing, even over 2**62 clients (no helper is started).
    assert [len(x) for x in _sampling.RoundDraw(1, 2, 0, 0, 2**62, 0).finish()] == [0, 0, 0]


def test_round_draw_closed_from_another_thread_while_finishing():
    # finish() draws without the GIL, so another thread can call close() meanwhile: the draw
    # must not be freed under finish(), which closes it itself when done.
    n = 3_000_000
    want = _sampling.round_sample(1, 2, 3, 0, n, 30)
    for helper in (False, True):
        d = _sampling.RoundDraw(1, 2, 3, 0, n, 30, 1 << 14, helper)
        got = []
        t = threading.Thread(target=lambda: got.append(d.finish()))
        t.start()
        while t.is_alive():
            d.close()
            time.sleep(0.0001)
        t.join()
        for a, b in zip(got[0], want):
            np.testing.assert_array_equal(a, b)
        with pytest.raises(RuntimeError, match="closed"):
            d.finish()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_round_draw_made_before_a_fork_is_redrawn_alone_in_the_child():
    # The child has none of the parent's helper threads; one may have held the draw's lock
    # or been publishing its reservoir at the fork. The child draws the whole round itself.
    want = _sampling.round_sample(1, 2, 3, 0, 400_000, 20)
    drawn = _sampling.RoundDraw(1, 2, 3, 0, 400_000, 20, 1000, True)
    dropped = _sampling.RoundDraw(1, 2, 4, 0, 400_000, 20, 1000, True)
    with warnings.catch_warnings():   # 3.12+: "this process is multi-threaded" (it may be)
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:   # the child: report by exit status only
        ok = False
        try:
            got = drawn.finish()
            dropped.close()
            again = _sampling.RoundDraw(1, 2, 3, 0, 400_000, 20, 1000, True).finish()
            ok = (drawn.helper_chunks == 0 and _helpers_end() == 0 and
                  all(np.array_equal(a, b) for a, b in zip(got, want)) and
                  all(np.array_equal(a, b) for a, b in zip(again, want)))
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    for a, b in zip(drawn.finish(), want):   # the parent's draw is untouched
        np.testing.assert_array_equal(a, b)
    dropped.close()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_round_draws_dropped_unfinished_leave_no_threads():
    assert _helpers_end() == 0
    started = False
    for i in range(300):
        d = _sampling.RoundDraw(1, 2, i, 0, 50_000 + i, 10, 1000 + i)
        started = started or _sampling.helpers_running() > 0
        if i % 3 == 0:
            d.close()
        elif i % 3 == 1:
            d.finish()
        del d   # i % 3 == 2: dropped mid-draw
    assert started   # the count sees helpers ...
    assert _helpers_end() == 0   # ... and every one ended


# ----------------------------------------------------------------------------------------------
# Distributed rounds: round_start, client_offset, merge
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("functional", [False, True])
def test_round_start_partitions_merge_to_the_one_machine_round(functional):
    fins = (lambda m: {"a": m["a"], "b": m["b"]}) if functional else IDENT
    p = make_process(k=5, seed=11, finalizers=fins)
    state = p.initialize()
    rng = np.random.default_rng(0)
    for r, n in enumerate([13, 0, 40, 7, 25]):
        clients = clients_ab(n, start=100 * r)
        cuts = sorted(rng.integers(0, n + 1, 3).tolist()) if n else []
        bounds = [0] + cuts + [n]
        start = p.round_start(state)
        assert start["seed"] == state["seed"] and start["round"] == state["round"]
        assert start["keys"].size == 0 and all(len(v) == 0 for v in start["samples"].values())
        parts = [p.next(start, clients[a:b], client_offset=a).state
                 for a, b in zip(bounds, bounds[1:])]
        one = p.next(state, clients)
        if n == 0:
            assert one.state is state
            continue
        round_reservoir = parts[0]
        for part in parts[1:]:
            round_reservoir = p.merge(round_reservoir, part)
        assert_tree_equal(round_reservoir["samples"], one.result[0])
        merged = p.merge(state, round_reservoir)
        for key in ("keys", "rounds", "indices"):
            assert np.array_equal(merged[key], one.state[key])
        assert_tree_equal(merged["samples"], one.state["samples"])
        assert merged["round"] == one.state["round"] == state["round"] + 1
        state = merged


def test_round_start_validates_state():
    p = make_process()
    with pytest.raises(TypeError):
        p.round_start({"seed": (1, 2)})


@pytest.mark.parametrize("functional", [False, True])
def test_errors_name_the_global_client_index(functional):
    fins = (lambda m: {"a": m["a"], "b": m["b"]}) if functional else IDENT
    p = make_process(finalizers=fins)
    clients = clients_ab(6)
    clients[2] = {"a": "bad", "b": [1.0, 2.0]}
    clients[4] = {"a": 1.0}
    with pytest.raises(TypeError, match=r"client 102\b"):
        p.next(p.initialize(), clients, client_offset=100)
    with pytest.raises(ValueError, match=r"client 104\b"):
        p.next(p.initialize(), clients[3:], client_offset=103)

    q = make_process(finalizers={"a": fails_after_probe(ZeroDivisionError), "b": lambda v: v})
    with pytest.raises(ZeroDivisionError) as info:
        q.next(q.initialize(), clients_ab(3), client_offset=7)
    assert "client 7" in " ".join(getattr(info.value, "__notes__", []))


# ----------------------------------------------------------------------------------------------
# Ported from TFF 0.87: learning/metrics/sampling_aggregation_factory_test.py
# ----------------------------------------------------------------------------------------------

TFF_SPEC = {"accuracy": TensorSpec("float32"), "loss": TensorSpec("float32", (2,)),
            "custom_sum": [TensorSpec("float32", (1,)), TensorSpec("float32", (2,))]}


def _divide_no_nan(a, b):
    return a / b if b != 0 else np.float32(0.0) * a


TFF_FINALIZERS = {"accuracy": lambda x: x, "loss": lambda x: _divide_no_nan(x[0], x[1]),
                  "custom_sum": lambda x: np.add.reduce([np.sum(t) for t in x])}


def tff_functional_finalizer(m):
    return {"accuracy": m["accuracy"], "loss": _divide_no_nan(m["loss"][0], m["loss"][1]),
            "custom_sum": np.add.reduce([np.sum(t) for t in m["custom_sum"]])}


def tff_random_metrics(seed):
    rng = np.random.default_rng(seed)
    return {"accuracy": np.float32(rng.random()),
            "loss": rng.random(2).astype(np.float32),
            "custom_sum": [rng.random(1).astype(np.float32), rng.random(2).astype(np.float32)]}


@pytest.mark.parametrize("bad, exc, message", [(0, ValueError, "must be positive"),
                                               (-1, ValueError, "must be positive"),
                                               (None, TypeError, "sample_size"),
                                               ("5", TypeError, "sample_size")])
def test_tff_build_factory_fails_with_invalid_sample_size(bad, exc, message):
    with pytest.raises(exc, match=message):
        FinalizeThenSampleFactory(sample_size=bad)


@pytest.mark.parametrize("bad", [1.0, [lambda x: x, lambda x: x + 1]])
def test_tff_create_fails_with_invalid_metric_finalizers(bad):
    with pytest.raises(TypeError, match="metric_finalizers"):
        FinalizeThenSampleFactory(10).create(bad, TFF_SPEC)


def test_tff_create_fails_with_mismatched_finalizers_and_metrics_type():
    with pytest.raises(ValueError, match="The metric names in `metric_finalizers` do not match "
                                         "those"):
        FinalizeThenSampleFactory(10).create({"num_examples": lambda x: x}, TFF_SPEC)


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("sample_size, per_round", [(5, 2), (3, 3), (2, 3)])
def test_tff_finalize_then_sample_returns_expected_samples(sample_size, per_round, functional):
    fins = tff_functional_finalizer if functional else TFF_FINALIZERS
    process = FinalizeThenSampleFactory(sample_size).create(fins, TFF_SPEC)
    state = process.initialize()
    everyone = []
    for round_i in range(5):
        clients = [tff_random_metrics(round_i + c) for c in range(per_round)]
        everyone += clients
        out = process.next(state, clients)
        state = out.state
        current, total = out.result
        expected_current = [tff_functional_finalizer(c) for c in clients]
        expected_total = [tff_functional_finalizer(c) for c in everyone]
        for name in TFF_SPEC:
            assert current[name].shape == (min(sample_size, per_round),)
            # float32 as in TFF under NumPy 2; NumPy 1's value-based casting may widen a
            # finalizer's result, and the sample keeps the dtype the finalizer gives.
            assert current[name].dtype == np.asarray(expected_current[0][name]).dtype
            if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
                assert current[name].dtype == np.float32
            assert set(current[name].tolist()) <= {float(e[name]) for e in expected_current}
            assert total[name].shape == (min(sample_size, per_round * (round_i + 1)),)
            assert set(total[name].tolist()) <= {float(e[name]) for e in expected_total}


@pytest.mark.parametrize("sample_size", [6, 5, 1])
def test_tff_finalize_then_sample_returns_correct_measurements(sample_size):
    process = FinalizeThenSampleFactory(sample_size).create(lambda x: x,
                                                           {"loss": TensorSpec("float32")})
    out = process.next(process.initialize(),
                       [collections.OrderedDict(loss=v) for v in [1.0, np.nan, np.inf, 2.0, 3.0]])
    assert out.measurements == collections.OrderedDict(loss=np.array(2, dtype=np.int64))
    out = process.next(out.state,
                       [collections.OrderedDict(loss=v) for v in [1.0, 4.0, np.inf, 2.0, 3.0]])
    assert out.measurements == collections.OrderedDict(loss=np.array(1, dtype=np.int64))


# ----------------------------------------------------------------------------------------------
# Ported from TFF 0.87: aggregators/sampling_test.py (reservoir structure and merge)
# ----------------------------------------------------------------------------------------------

STRUCT_SPEC = {"a": TensorSpec("int32", (3,)), "b": [TensorSpec("float32"), TensorSpec("bool")]}


def test_tff_initial_reservoir_of_a_structure_of_tensors():
    p = FinalizeThenSampleFactory(5, seed=42).create(lambda m: m, {
        "a": TensorSpec("float32"), "b": [TensorSpec("int64", (2,)), TensorSpec("bool")]})
    state = p.initialize()
    assert state["keys"].shape == (0,) and state["keys"].dtype == np.uint64
    assert_tree_equal(state["samples"], {"a": np.zeros(0, np.float32),
                                         "b": [np.zeros((0, 2), np.int64), np.zeros(0, bool)]})
    assert state["samples"]["b"][0].dtype == np.int64 and state["samples"]["b"][1].dtype == bool


def test_tff_sample_value_of_a_structure_of_tensors():
    # TFF's exact random values are its int32 chain's; ours are the documented 64-bit keys.
    # What carries over: a sample of one from a structure is that client's rows, per leaf.
    p = FinalizeThenSampleFactory(1, seed=42).create(lambda m: m, STRUCT_SPEC)
    clients = [collections.OrderedDict(a=list(range(i, i + 3)), b=[float(i), i % 2 == 0])
               for i in range(6)]
    out = p.next(p.initialize(), clients[:1])
    assert_tree_equal(out.result[0], {"a": np.array([[0, 1, 2]], np.int32),
                                      "b": [np.array([0.0], np.float32), np.array([True])]})
    out = p.next(p.initialize(), clients)
    (i,) = out.state["indices"].tolist()
    assert_tree_equal(out.result[0], {"a": np.array([[i, i + 1, i + 2]], np.int32),
                                      "b": [np.array([float(i)], np.float32),
                                            np.array([i % 2 == 0])]})


def _hand_state(p, keys, samples, first_index=0, round_=1):
    n = len(keys)
    return {"seed": p.initialize()["seed"], "round": round_,
            "keys": np.array(keys, np.uint64), "rounds": np.zeros(n, np.int64),
            "indices": np.arange(first_index, first_index + n, dtype=np.int64),
            "samples": samples}


@pytest.mark.parametrize("b_keys, b_samples, keys, samples", [
    ([2, 4, 6, 8], [6, 12, 18, 24], [3, 5, 4, 6, 8], [9, 15, 12, 18, 24]),   # downsample
    ([2], [6], [1, 3, 5, 2], [3, 9, 15, 6]),                                   # keep all
    ([5, 5, 5, 5, 5], [-1] * 5, [5] * 5, [15, -1, -1, -1, -1]),                # ties: a first
])
def test_tff_merge_scalar(b_keys, b_samples, keys, samples):
    p = FinalizeThenSampleFactory(5, seed=42).create({"x": lambda v: v},
                                                    {"x": TensorSpec("int32")})
    a = _hand_state(p, [1, 3, 5], {"x": np.array([3, 9, 15], np.int32)})
    b = _hand_state(p, b_keys, {"x": np.array(b_samples, np.int32)}, first_index=3)
    merged = p.merge(a, b)
    assert merged["keys"].tolist() == keys
    assert merged["samples"]["x"].tolist() == samples
    assert merged["samples"]["x"].dtype == np.int32


def test_tff_merge_structure_of_tensors():
    p = FinalizeThenSampleFactory(5, seed=42).create(lambda m: m, STRUCT_SPEC)
    a_samples = {"a": np.array([[0, 1, 2], [1, 2, 3], [2, 3, 4]], np.int32),
                 "b": [np.array([0.0, 1.0, 2.0], np.float32), np.array([True, False, True])]}
    b_samples = {"a": np.array([[0, -1, -2], [-1, -2, -3], [-2, -3, -4], [-3, -4, -5]], np.int32),
                 "b": [np.array([-1.0, -2.0, -3.0, -4.0], np.float32),
                       np.array([True, False, False, True])]}
    a = _hand_state(p, [1, 3, 5], a_samples)
    b = _hand_state(p, [2, 4, 6, 8], b_samples, first_index=3)
    merged = p.merge(a, b)
    assert merged["keys"].tolist() == [3, 5, 4, 6, 8]
    kept = [1, 2, 4, 5, 6]   # positions in the concatenation of a's and b's entries

    def cat(x, y):
        return np.concatenate([x, y])[kept]
    assert_tree_equal(merged["samples"], {"a": cat(a_samples["a"], b_samples["a"]),
                                          "b": [cat(a_samples["b"][0], b_samples["b"][0]),
                                                cat(a_samples["b"][1], b_samples["b"][1])]})


# ----------------------------------------------------------------------------------------------
# Differential against a live TFF 0.87 (skipped without it; `bash .ci/tff` installs and runs it)
# ----------------------------------------------------------------------------------------------

_TFF_REASON = "needs TensorFlow Federated 0.87 (bash .ci/tff)"
tff = OptionalModule("tensorflow_federated", _TFF_REASON)
tff_sampling = OptionalModule(
    "tensorflow_federated.python.learning.metrics.sampling_aggregation_factory", _TFF_REASON)


@pytest.fixture(scope="module")
def tff_factory():
    tff.backends.native.set_sync_local_cpp_execution_context()
    return tff_sampling.FinalizeThenSampleFactory


def _tff_type(spec):
    """The tff type of a fastrec spec: TensorSpec -> TensorType, mapping -> OrderedDict struct,
    list -> list struct."""
    if isinstance(spec, TensorSpec):
        return tff.TensorType(spec.dtype.type, spec.shape)
    if isinstance(spec, collections.abc.Mapping):
        return tff.types.StructWithPythonType([(k, _tff_type(v)) for k, v in spec.items()],
                                              collections.OrderedDict)
    return tff.types.StructWithPythonType([(None, _tff_type(v)) for v in spec], list)


# Finalizers written with operators only, so the same function runs on TFF's traced tensors
# and on fastrec's numpy values, and only between values of one dtype: TFF needs NumPy 1,
# whose value-based casting widens a numpy scalar times a Python float where TF keeps the
# dtype (a difference of NumPy, not of sampling). Divisions by zero are part of the data.
# No subnormals: TF's CPU kernels treat them as zero (flush-to-zero), numpy keeps them.
_EDGE = {"f": [0.0, -0.0, 1.5, -2.25, 0.1, np.nan, np.inf, -np.inf, 3e38, -3e38, 65504.0],
         "i": [0, 1, -1, 7, 2**31 - 1, -2**31], "b": [True, False]}

_TFF_CASES = {
    # name: (spec, finalizers, functional)
    "scalars and a ratio": (
        {"acc": TensorSpec("float32"), "loss": TensorSpec("float32", (2,)),
         "n": TensorSpec("int64")},
        {"acc": lambda x: x, "loss": lambda x: x[0] / x[1], "n": lambda x: x}),
    "overflow in the finalizer": (
        {"a": TensorSpec("float32", (2,)), "h": TensorSpec("float16")},
        {"a": lambda x: x * x, "h": lambda x: x * x * x}),
    "structured results": (
        {"a": TensorSpec("float32", (2,)), "b": TensorSpec("float64", (3,))},
        {"a": lambda x: [x, x[0] * x[1]], "b": lambda x: {"s": x[0] + x[1], "p": x - x[0]}}),
    "integer arithmetic": (
        {"n": TensorSpec("int64"), "m": TensorSpec("int32", (3,)), "f": TensorSpec("bool")},
        {"n": lambda x: x / 2, "m": lambda x: x * 2, "f": lambda x: x}),
    "mapping and list specs": (
        {"m": {"a": TensorSpec("float32"), "b": TensorSpec("float32", (3,))},
         "l": [TensorSpec("float32"), TensorSpec("int64", (2,))]},
        {"m": lambda d: d["a"] * d["b"], "l": lambda x: [x[0] + x[0], x[1] * x[1]]}),
    "functional finalizer": (
        {"a": TensorSpec("float32"), "b": TensorSpec("float64"), "c": TensorSpec("int32", (2,))},
        lambda m: {"x": m["a"] + m["a"], "y": [m["b"], m["b"] * m["b"]], "z": m["c"] * 3}),
}


def _tff_leaf_value(spec, rng):
    """One client value for a leaf, of a kind TFF 0.87 accepts: a numpy value of the declared
    dtype, or (in range) Python numbers and lists."""
    kind = spec.dtype.kind
    pool = _EDGE["f" if kind == "f" else "b" if kind == "b" else "i"]
    vals = [pool[j] for j in rng.integers(0, len(pool), int(np.prod(spec.shape, dtype=int)))]
    vals = [rng.standard_normal() * 100 if rng.random() < 0.4 and kind == "f" else v
            for v in vals]
    with np.errstate(over="ignore"):
        arr = np.array(vals).astype(spec.dtype).reshape(spec.shape)
    # Python numbers are made from the cast values, so they are in the dtype's range (TFF
    # refuses a Python float that is not, and any under float16; fastrec casts them).
    python_ok = spec.dtype != np.float16
    return arr.tolist() if python_ok and rng.random() < 0.5 else arr if spec.shape else arr[()]


def _tff_clients(spec, n, rng):
    def value(s):
        if isinstance(s, TensorSpec):
            return _tff_leaf_value(s, rng)
        if isinstance(s, collections.abc.Mapping):
            return collections.OrderedDict((k, value(v)) for k, v in s.items())
        return [value(v) for v in s]
    return [value(spec) for _ in range(n)]


def _flush_subnormals(a):
    """Subnormal floats as signed zeros: TF's CPU kernels flush a subnormal result to zero
    (numpy keeps it), so 0.1 / 3e38 finalized is 0.0 in TFF and 3.3e-40 here."""
    if a.dtype.kind != "f":
        return a
    return np.where(np.abs(a) < np.finfo(a.dtype).tiny, np.copysign(a.dtype.type(0), a), a)


def _assert_same_tree(ours, theirs, where="result"):
    """fastrec's structure and leaves equal TFF's: containers (mapping keys in order, list
    lengths), each leaf's dtype, shape and values bit for bit (NaN where NaN)."""
    if isinstance(theirs, collections.abc.Mapping):
        assert isinstance(ours, collections.abc.Mapping), where
        assert list(ours) == list(theirs), where
        for k in theirs:
            _assert_same_tree(ours[k], theirs[k], f"{where}[{k!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert isinstance(ours, (list, tuple)) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _assert_same_tree(a, b, f"{where}[{i}]")
    else:
        a, b = _flush_subnormals(np.asarray(ours)), _flush_subnormals(np.asarray(theirs))
        assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype, a.shape,
                                                          b.shape)
        same = (a == b) | (np.isnan(a) & np.isnan(b) if a.dtype.kind in "fc" else False)
        assert np.all(same), (where, a, b)
        if a.dtype.kind == "f":   # -0.0 stays -0.0 (NaN's sign bit is not compared)
            assert np.array_equal(np.signbit(a) & ~np.isnan(a),
                                  np.signbit(b) & ~np.isnan(b)), (where, a, b)


def _row_key(row):
    return tuple("nan" if v != v else v for v in np.ravel(row).tolist())


def _tff_finalizers(fins):
    return collections.OrderedDict(fins) if isinstance(fins, dict) else fins


@pytest.mark.parametrize("case", list(_TFF_CASES))
def test_tff_live_results_and_measurements_equal(tff_factory, case):
    """Everyone kept (sample_size above all clients): both keep arrival order, so every round's
    samples and measurements must be equal, including an empty first round."""
    spec, fins = _TFF_CASES[case]
    rng = np.random.default_rng(sorted(_TFF_CASES).index(case))
    theirs = tff_factory(50).create(_tff_finalizers(fins), _tff_type(spec))
    ours = FinalizeThenSampleFactory(50, seed=1).create(fins, spec)
    t_state, o_state = theirs.initialize(), ours.initialize()
    for n in (0, 4, 3):
        clients = _tff_clients(spec, n, rng)
        with np.errstate(all="ignore"):
            t_out = theirs.next(t_state, clients)
            o_out = ours.next(o_state, clients)
        t_state, o_state = t_out.state, o_out.state
        _assert_same_tree(o_out.result[0], t_out.result[0], "current round")
        _assert_same_tree(o_out.result[1], t_out.result[1], "all rounds")
        _assert_same_tree(o_out.measurements, t_out.measurements, "measurements")


def test_tff_live_sample_is_a_subset_of_the_same_size(tff_factory):
    spec, fins = _TFF_CASES["scalars and a ratio"]
    rng = np.random.default_rng(7)
    theirs = tff_factory(3).create(_tff_finalizers(fins), _tff_type(spec))
    ours = FinalizeThenSampleFactory(3).create(fins, spec)
    everyone = FinalizeThenSampleFactory(100).create(fins, spec)
    t_state, o_state, e_state = theirs.initialize(), ours.initialize(), everyone.initialize()
    for n in (5, 2, 6):
        clients = _tff_clients(spec, n, rng)
        with np.errstate(all="ignore"):
            t_out, o_out = theirs.next(t_state, clients), ours.next(o_state, clients)
            e_out = everyone.next(e_state, clients)
        t_state, o_state, e_state = t_out.state, o_out.state, e_out.state
        _assert_same_tree(o_out.measurements, t_out.measurements, "measurements")
        for i in (0, 1):
            for name in spec:
                t, o = np.asarray(t_out.result[i][name]), o_out.result[i][name]
                assert o.dtype == t.dtype and o.shape == t.shape
                # each sampled row is one of the clients' finalized rows
                pool = {_row_key(r) for r in e_out.result[i][name]}
                assert {_row_key(r) for r in o} <= pool and {_row_key(r) for r in t} <= pool


# (dtype, shape, client value, what fastrec does): "same" where TFF accepts the value, else TFF
# raises TypeError and fastrec either casts it ("cast", a documented difference) or raises.
_TFF_VALUE_KINDS = [
    ("float32", (), 1.5, "same"), ("float32", (), np.float32(2.5), "same"),
    ("float32", (), np.float16(2.5), "same"), ("float32", (), np.array(1.5, np.float32), "same"),
    ("float64", (), np.float32(0.1), "same"), ("float32", (2,), (1.0, 2.0), "same"),
    ("float32", (2, 2), [[1.0, 2.0], [3.0, 4.0]], "same"), ("int64", (), 5, "same"),
    ("int32", (), np.uint8(7), "same"), ("uint64", (), 2**63, "same"),
    ("bool", (), True, "same"), ("bool", (), np.bool_(True), "same"),
    ("complex64", (), 1 + 2j, "same"),
    ("float32", (), 3, "cast"), ("float32", (), np.float64(0.1), "cast"),
    ("float32", (2,), [1, 2], "cast"), ("float32", (2,), np.array([1, 2], np.int32), "cast"),
    ("int32", (), np.int64(5), "cast"),
    # out of an integer dtype's range, or of the shape: ValueError here
    ("int32", (), 2**31, ValueError), ("int32", (), np.int64(2**40), ValueError),
    ("uint8", (), -1, ValueError), ("int64", (), 2**63, ValueError),
    ("float32", (2,), [1.0, 2.0, 3.0], ValueError), ("float32", (1,), 1.5, ValueError),
    ("float32", (), np.array([1.5], np.float32), ValueError),
    # of the wrong kind: TypeError in both
    ("float32", (), True, TypeError), ("int32", (), 1.5, TypeError), ("int32", (), True, TypeError),
    ("bool", (), 1, TypeError), ("float32", (), "1.0", TypeError),
]


@pytest.mark.parametrize("dtype, shape, value, ours", _TFF_VALUE_KINDS)
def test_tff_live_value_kinds(tff_factory, dtype, shape, value, ours):
    spec = {"a": TensorSpec(dtype, shape)}
    process = FinalizeThenSampleFactory(5).create({"a": lambda x: x}, spec)
    theirs = tff_factory(5).create(collections.OrderedDict(a=lambda x: x), _tff_type(spec))
    clients = [collections.OrderedDict(a=value)]
    if ours == "same":
        _assert_same_tree(process.next(process.initialize(), clients).result[1],
                          theirs.next(theirs.initialize(), clients).result[1])
        return
    with pytest.raises(TypeError):
        theirs.next(theirs.initialize(), clients)
    if ours == "cast":
        got = process.next(process.initialize(), clients).result[1]["a"]
        assert got.dtype == np.dtype(dtype) and got.shape == (1,) + shape
        assert np.array_equal(got[0], np.asarray(value).astype(dtype))
    else:
        with pytest.raises(ours):
            process.next(process.initialize(), clients)


def test_tff_live_none_dimension(tff_factory):
    """Values of a (None,) spec vary in length; reduced by the finalizer they sample alike
    (the reduction is TF's or numpy's, whichever the value is)."""
    import tensorflow as tf
    spec = {"a": TensorSpec("float32", (None,))}
    fins = {"a": lambda x: tf.reduce_sum(x) if isinstance(x, tf.Tensor) else np.sum(x)}
    clients = [collections.OrderedDict(a=v) for v in ([1.0, 2.0], [3.0], [4.0, 5.0, np.inf])]
    theirs = tff_factory(5).create(_tff_finalizers(fins), _tff_type(spec))
    ours = FinalizeThenSampleFactory(5).create(fins, spec)
    t_out, o_out = theirs.next(theirs.initialize(), clients), ours.next(ours.initialize(), clients)
    _assert_same_tree(o_out.result, t_out.result)
    _assert_same_tree(o_out.measurements, t_out.measurements)


def test_tff_live_both_refuse_a_finalizer_that_cannot_run(tff_factory):
    spec = {"a": TensorSpec("float32", (2,))}
    fins = {"a": lambda x: x[5]}   # out of range for a (2,) value: fails when traced / probed
    with pytest.raises(Exception):
        tff_factory(5).create(_tff_finalizers(fins), _tff_type(spec))
    with pytest.raises(TypeError, match="'a'"):
        FinalizeThenSampleFactory(5).create(fins, spec)


# ----------------------------------------------------------------------------------------------
# Semantics: fresh entropy, per-leaf arrays, arrival order, casts, mappings, the probe
# ----------------------------------------------------------------------------------------------

def test_unseeded_trials_are_fresh_and_uniform():
    n, k, trials = 20, 5, 4000
    p = FinalizeThenSampleFactory(k).create({"id": lambda v: v}, {"id": TensorSpec("int64")})
    clients = [{"id": i} for i in range(n)]
    counts = np.zeros(n)
    seen = set()
    for _ in range(trials):
        state = p.initialize()
        seen.add(state["seed"])
        counts[p.next(state, clients).result[0]["id"]] += 1
    assert len(seen) == trials
    assert counts.sum() == k * trials
    # 19 dof, critical value at p = 1e-6: 63.7 (fresh entropy: a fair sampler fails 1e-6).
    assert chi_square_inclusion(counts, trials, k / n) < 63.7


def test_workers_sharing_an_unseeded_start_state_agree():
    p = FinalizeThenSampleFactory(4).create({"x": lambda v: v}, {"x": TensorSpec("float64")})
    start = p.initialize()
    clients = [{"x": float(i)} for i in range(30)]
    whole = p.next(start, clients)
    merged = p.merge(p.next(p.round_start(start), clients[:11]).state,
                     p.next(p.round_start(start), clients[11:], client_offset=11).state)
    assert_tree_equal(merged["samples"], whole.state["samples"])


def test_samples_are_per_leaf_arrays_with_one_client_per_row():
    spec = {"loss": TensorSpec("float32", (2,)), "hist": TensorSpec("int64", (3,))}
    fins = {"loss": lambda v: [v[0], v[1]], "hist": lambda v: {"sum": v.sum(), "raw": v}}
    p = FinalizeThenSampleFactory(4, seed=3).create(fins, spec)
    clients = [{"loss": [float(i), -float(i)], "hist": [i, 2 * i, 3 * i]} for i in range(10)]
    out = p.next(p.initialize(), clients)
    current, total = out.result
    loss, hist = current["loss"], current["hist"]
    assert isinstance(loss, list) and [x.shape for x in loss] == [(4,), (4,)]
    assert loss[0].dtype == np.float32 and hist["sum"].dtype == np.int64
    assert hist["raw"].shape == (4, 3)
    ids = out.state["indices"]
    assert loss[0].tolist() == ids.tolist() and loss[1].tolist() == (-ids).tolist()
    assert hist["raw"].tolist() == [[i, 2 * i, 3 * i] for i in ids.tolist()]
    assert out.measurements == {"loss": [0, 0], "hist": {"sum": 0, "raw": 0}}
    assert_tree_equal(total, out.state["samples"])


def test_arrival_order_over_rounds():
    p = FinalizeThenSampleFactory(8, seed=1).create({"x": lambda v: v}, {"x": TensorSpec("int64")})
    state = p.initialize()
    for r in range(6):
        out = p.next(state, [{"x": 100 * r + i} for i in range(7)])
        state = out.state
        pairs = list(zip(state["rounds"].tolist(), state["indices"].tolist()))
        assert pairs == sorted(pairs)
        assert state["samples"]["x"].tolist() == [100 * r_ + i for r_, i in pairs]
        assert out.result[0]["x"].tolist() == sorted(out.result[0]["x"].tolist())
    everyone = p.next(p.initialize(), [{"x": i} for i in range(8)])
    assert everyone.result[0]["x"].tolist() == list(range(8))


def test_values_reach_finalizers_in_the_declared_dtype():
    seen = []
    spec = {"s": TensorSpec("float32"), "p": TensorSpec("float32", (2,)), "n": TensorSpec("int16")}
    fins = {"s": lambda v: seen.append(("s", v)) or v, "p": lambda v: seen.append(("p", v)) or v[0] * v[1],
            "n": lambda v: seen.append(("n", v)) or v}
    p = FinalizeThenSampleFactory(10, seed=0).create(fins, spec)
    seen.clear()
    clients = [{"s": 0.1, "p": [3e38, 10.0], "n": 7},
               {"s": 2, "p": np.array([1.5, 2.0]), "n": np.int64(-3)},
               {"s": np.float64(0.25), "p": (1, 2), "n": np.uint8(4)}]
    with np.errstate(over="ignore"):
        out = p.next(p.initialize(), clients)
    for name, v in seen:
        if name == "p":
            assert type(v) is np.ndarray and v.dtype == np.float32 and v.shape == (2,)
        else:
            assert type(v) is (np.float32 if name == "s" else np.int16)
    assert seen[0][1] == np.float32(0.1)
    # 3e38 * 10 overflows float32: inf, counted non-finite, as in TFF.
    assert out.measurements == {"s": 0, "p": 1, "n": 0}
    assert out.result[0]["p"].tolist()[0] == np.inf
    for bad in ({"n": 2**15}, {"n": -2**15 - 1}, {"p": [2**2000, 1.0]}):
        with pytest.raises(ValueError, match="client 1"):
            p.next(p.initialize(), [clients[0], dict(clients[0], **bad)])


@pytest.mark.parametrize("spec, value, expected", [
    (TensorSpec("uint64", (2,)), [2**63, 1], [2**63, 1]),
    (TensorSpec("float64", (1,)), [2**64], [2.0**64]),
    (TensorSpec("int64", (2,)), [2**62, -2**63], [2**62, -2**63]),
    (TensorSpec("uint64"), 2**64 - 1, 2**64 - 1),
])
def test_list_values_are_typed_by_the_spec(spec, value, expected):
    p = FinalizeThenSampleFactory(2, seed=0).create({"x": lambda v: v}, {"x": spec})
    out = p.next(p.initialize(), [{"x": value}])
    assert out.result[0]["x"][0].tolist() == expected
    assert out.result[0]["x"].dtype == spec.dtype


@pytest.mark.parametrize("spec, value, exc", [
    (TensorSpec("uint64", (2,)), [2**64, 1], ValueError),
    (TensorSpec("uint64", (1,)), [-1], ValueError),
    (TensorSpec("int64", (2,)), [1.5, 2], TypeError),
    (TensorSpec("int64", (1,)), [True], TypeError),
    (TensorSpec("float64", (1,)), [10**400], ValueError),
    (TensorSpec("float64", (1,)), ["1.5"], TypeError),
    (TensorSpec("float64", (2,)), [[1.0], [2.0, 3.0]], ValueError),
])
def test_list_values_out_of_the_spec_are_rejected(spec, value, exc):
    p = FinalizeThenSampleFactory(2, seed=0).create({"x": lambda v: v}, {"x": spec})
    with pytest.raises(exc, match="client 0, metric 'x'"):
        p.next(p.initialize(), [{"x": value}])


def test_mapping_specs_values_and_columns():
    spec = {"m": {"x": TensorSpec("float32"), "y": [TensorSpec("int64"), TensorSpec("float64", (2,))]}}
    fins = {"m": lambda v: {"ratio": v["x"] / v["y"][0], "y": v["y"][1]}}
    p = FinalizeThenSampleFactory(3, seed=2).create(fins, spec)
    assert_tree_equal(p.initialize()["samples"], {"m": {"ratio": np.zeros(0, np.float32),
                                                        "y": np.zeros((0, 2))}})
    clients = [{"m": {"y": [i + 1, [i, -i]], "x": 2.0 * (i + 1)}} for i in range(8)]
    out = p.next(p.initialize(), clients)
    assert out.result[0]["m"]["ratio"].tolist() == [2.0] * 3
    assert out.result[0]["m"]["y"][:, 0].tolist() == out.state["indices"].tolist()
    with pytest.raises(ValueError, match="client 3, metric 'm'.*keys"):
        p.next(p.initialize(), clients[:3] + [{"m": {"x": 1.0}}])
    with pytest.raises(TypeError, match="client 0, metric 'm'"):
        p.next(p.initialize(), [{"m": [1.0, [1, [1.0, 2.0]]]}])
    vec = FinalizeThenSampleFactory(3, seed=2).create({"m": vectorized(fins["m"])}, spec)
    cols = {"m": {"x": np.array([2.0 * (i + 1) for i in range(8)], np.float32),
                  "y": [np.arange(1, 9), np.array([[i, -i] for i in range(8)], float)]}}
    col_out = vec.next_columnar(vec.initialize(), cols)
    assert_tree_equal(col_out.result, out.result)
    rows = FinalizeThenSampleFactory(3, seed=2).create(fins, spec).next_columnar(
        p.initialize(), cols)
    assert_tree_equal(rows.result, out.result)


def test_probe_at_create():
    with pytest.raises(TypeError, match="metric 'x'") as info:
        FinalizeThenSampleFactory(2).create({"x": lambda v: v["missing"]},
                                            {"x": TensorSpec("float32")})
    assert info.value.__cause__ is not None
    with pytest.raises(TypeError, match="metric 'x'"):
        FinalizeThenSampleFactory(2).create({"x": lambda v: "text"}, {"x": TensorSpec("float32")})
    with pytest.raises(TypeError, match="metric finalizer"):
        FinalizeThenSampleFactory(2).create(lambda m: m["nope"], {"x": TensorSpec("float32")})
    shapes = []
    FinalizeThenSampleFactory(2).create({"x": lambda v: shapes.append(v.shape) or v.sum()},
                                        {"x": TensorSpec("float32", (None, 3))})
    assert shapes == [(1, 3)]
    FinalizeThenSampleFactory(2).create({"x": vectorized(lambda c: shapes.append(c.shape) or c)},
                                        {"x": TensorSpec("int8", (2,))})
    assert shapes[-1] == (1, 2)
    with np.errstate(all="raise"):   # the probe's 1/0-style warnings are silenced
        FinalizeThenSampleFactory(2).create({"x": lambda v: v / (v - v)},
                                            {"x": TensorSpec("float32")})


@pytest.mark.parametrize("functional", [False, True])
def test_empty_first_round_returns_the_full_structure(functional):
    fins = ((lambda m: {"r": m["loss"][0] / m["loss"][1], "h": [m["h"], m["h"].sum()]})
            if functional else {"loss": lambda v: v[0] / v[1], "h": lambda v: [v, v.sum()]})
    spec = {"loss": TensorSpec("float32", (2,)), "h": TensorSpec("int32", (3,))}
    p = FinalizeThenSampleFactory(3, seed=0).create(fins, spec)
    out = p.next(p.initialize(), [])
    if functional:
        assert out.measurements == {"r": 0, "h": [0, 0]}
        expect = {"r": np.zeros(0, np.float32), "h": [np.zeros((0, 3), np.int32),
                                                      np.zeros(0, np.int64)]}
    else:
        assert out.measurements == {"loss": 0, "h": [0, 0]}
        expect = {"loss": np.zeros(0, np.float32), "h": [np.zeros((0, 3), np.int32),
                                                         np.zeros(0, np.int64)]}
    assert_tree_equal(out.result[0], expect)
    assert_tree_equal(out.result[1], expect)
    leaf = out.result[0]["h"][0]
    assert leaf.dtype == np.int32
    col = p.next_columnar(p.initialize(), {"loss": np.zeros((0, 2)), "h": np.zeros((0, 3), int)})
    assert_tree_equal(col.result[0], expect)


def test_client_structure_differing_from_the_probe_names_metric_and_global_index():
    p = FinalizeThenSampleFactory(2, seed=0).create(
        {"x": lambda v: [v, v] if v < 5 else [v]}, {"x": TensorSpec("float64")})
    with pytest.raises(ValueError, match=r"client 17, metric 'x'.*create\(\)"):
        p.next(p.initialize(), [{"x": float(i)} for i in range(10)], client_offset=12)
    q = FinalizeThenSampleFactory(2, seed=0).create(
        {"x": lambda v: np.ones(3) if v < 5 else np.ones(4)}, {"x": TensorSpec("float64")})
    with pytest.raises(ValueError, match="client 5, metric 'x'.*shape"):
        q.next(q.initialize(), [{"x": float(i)} for i in range(10)])
    f = FinalizeThenSampleFactory(2, seed=0).create(
        lambda m: {"a": m["x"]} if m["x"] < 5 else {"b": m["x"]}, {"x": TensorSpec("float64")})
    with pytest.raises(ValueError, match="client 5.*'b'.*create"):
        f.next(f.initialize(), [{"x": float(i)} for i in range(10)])
    # A lone scalar of the first leaf's own type where the probe returned a structure.
    for make in (lambda v: [v, v], lambda v: {"a": v}, lambda v: (v,)):
        g = FinalizeThenSampleFactory(2, seed=0).create(
            {"x": lambda v, make=make: make(v) if v < 5 else v}, {"x": TensorSpec("float64")})
        with pytest.raises(ValueError, match="client 5, metric 'x'"):
            g.next(g.initialize(), [{"x": float(i)} for i in range(10)])


# ----------------------------------------------------------------------------------------------
# Crash cases found by fuzzing: each a clear exception
# ----------------------------------------------------------------------------------------------

def _deep(n):
    v = 1.0
    for _ in range(n):
        v = [v]
    return v


def _cyclic():
    v = []
    v.append(v)
    return v


@pytest.mark.parametrize("make", [lambda: _deep(100_000), _cyclic])
def test_deep_and_cyclic_values_raise(make):
    value = make()
    with pytest.raises((ValueError, RecursionError)):
        _sampling.map_leaves(lambda x: x, value)
    with pytest.raises(TypeError, match="deeper"):
        FinalizeThenSampleFactory(2).create({"x": lambda v: value}, {"x": TensorSpec("float64")})
    calls = []
    p = FinalizeThenSampleFactory(2, seed=0).create(
        {"x": lambda v: calls.append(1) or (v if len(calls) == 1 else value)},
        {"x": TensorSpec("float64")})
    with pytest.raises(ValueError, match="client 0, metric 'x'"):
        p.next(p.initialize(), [{"x": 1.0}])
    for spec in (TensorSpec("float64"), TensorSpec("float64", (None,))):
        q = FinalizeThenSampleFactory(2, seed=0).create({"x": lambda v: v}, {"x": spec})
        with pytest.raises((TypeError, ValueError), match="client 0, metric 'x'"):
            q.next(q.initialize(), [{"x": value}])
    state = dict(p.initialize(), samples={"x": value})
    with pytest.raises(ValueError, match=r"state\['samples'\]\['x'\]"):
        p.next(state, [{"x": 1.0}])
    with pytest.raises(ValueError, match=r"state_b\['samples'\]\['x'\]"):
        p.merge(p.initialize(), state)
    spec = [TensorSpec("float64")]
    spec.append(spec)
    with pytest.raises(ValueError, match="deeper"):
        FinalizeThenSampleFactory(2).create(lambda m: m, {"x": spec})


def test_small_numpy_integer_round_is_normalised():
    p = FinalizeThenSampleFactory(2, seed=0).create({"x": lambda v: v}, {"x": TensorSpec("int64")})
    state = p.next(p.initialize(), [{"x": 1}]).state
    state["round"] = np.int8(127)
    out = p.next(state, [{"x": 2}])
    assert out.state["round"] == 128 and type(out.state["round"]) is int
    assert out.state["rounds"].tolist()[-1] in (0, 127)
    assert p.round_start(state)["round"] == 127
    for bad in (True, 1.0, np.float64(2), -1, 2**63):
        with pytest.raises((TypeError, ValueError), match="round"):
            p.next(dict(state, round=bad), [{"x": 2}])


class _LyingInt(int):
    """An int whose methods give another value than the one it holds."""

    def __int__(self):
        return -7

    def __index__(self):
        return 2**70

    def __lt__(self, other):
        return False

    def __gt__(self, other):
        return False

    __le__ = __ge__ = __lt__


class _LyingInt64(np.int64):
    def __int__(self):
        return -7

    def __index__(self):
        return 2**70

    def item(self):
        return -7


class _LyingUInt64(np.uint64):
    def __int__(self):
        return 7

    def __index__(self):
        return 2**70


def test_state_integers_are_read_as_stored_not_through_their_methods():
    """A state's round and seed words, and client_offset, are checked and used as the value
    the object holds: a subclass whose __int__, __index__ or comparisons lie passed the check
    with one value and was used with another (round -7 or a seed word of 2**70)."""
    p = FinalizeThenSampleFactory(2, seed=0).create({"x": lambda v: v}, {"x": TensorSpec("int64")})
    start = p.initialize()
    ref = p.next(dict(start, round=3), [{"x": 1}, {"x": 2}, {"x": 3}], client_offset=5)
    for cls, word in ((_LyingInt, _LyingInt), (_LyingInt64, _LyingUInt64)):
        state = dict(start, round=cls(3), seed=tuple(word(w) for w in start["seed"]))
        out = p.next(state, [{"x": 1}, {"x": 2}, {"x": 3}], client_offset=cls(5))
        assert out.state["round"] == 4 and type(out.state["round"]) is int
        assert out.state["seed"] == ref.state["seed"]
        assert all(type(w) is int for w in out.state["seed"])
        assert np.array_equal(out.state["keys"], ref.state["keys"])
        assert np.array_equal(out.state["indices"], ref.state["indices"])
        merged = p.merge(state, ref.state)
        assert merged["seed"] == ref.state["seed"] and merged["round"] == 4
    with pytest.raises(ValueError, match="non-negative"):
        p.next(dict(start, round=_LyingInt(-1)), [{"x": 1}])
    with pytest.raises(ValueError, match="seed"):
        p.next(dict(start, seed=(_LyingInt(2**64), 1)), [{"x": 1}])


def test_client_offset_past_the_last_index_is_a_clear_value_error():
    vec = FinalizeThenSampleFactory(2, seed=0).create({"x": vectorized(lambda c: c)},
                                                      {"x": TensorSpec("float64")})
    per = FinalizeThenSampleFactory(2, seed=0).create({"x": lambda v: v},
                                                      {"x": TensorSpec("float64")})
    for offset in (2**63 - 1, 2**63 - 3):
        with pytest.raises(ValueError, match="client_offset .* exceeds the largest client"):
            per.next(per.initialize(), [{"x": 1.0}] * 3, client_offset=offset)
        for p in (vec, per):
            with pytest.raises(ValueError, match="client_offset .* exceeds the largest client"):
                p.next_columnar(p.initialize(), {"x": np.ones(3)}, client_offset=offset)
    for p in (vec, per):   # the last clients that fit
        out = p.next_columnar(p.initialize(), {"x": np.ones(3)}, client_offset=2**63 - 4)
        assert out.state["indices"].max() == 2**63 - 2


@pytest.mark.parametrize("fast", [True, False])
def test_python_ints_under_a_float_spec_are_cast_as_numpy_casts_int64(fast):
    """A Python int is cast to float32 once, as NumPy casts an int64 (uint64) array: through
    a double, 2**60 + 2**36 + 1 rounded twice (to 2**60) where the cast gives 2**60 + 2**37.
    The scalar and list paths agree."""
    values = [2**60 + 2**36 + 1, -(2**60 + 2**36 + 1), 2**63 + 2**39 + 1, 2**24 + 1, -2**63, 7]
    was = _sampling.set_client_fast_path(fast)
    try:
        for dtype in ("float32", "float64"):
            p = FinalizeThenSampleFactory(len(values), seed=0).create(
                {"s": lambda v: v, "l": lambda v: v},
                {"s": TensorSpec(dtype), "l": TensorSpec(dtype, (1,))})
            out = p.next(p.initialize(), [{"s": v, "l": [v]} for v in values])
            current, _ = out.result
            want = np.array([np.asarray([v]).astype(dtype)[0] for v in values])
            assert current["s"].tobytes() == want.tobytes()
            assert current["l"][:, 0].tobytes() == want.tobytes()
    finally:
        _sampling.set_client_fast_path(was)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("b_spec", [TensorSpec("float64"), [TensorSpec("float64")]])
def test_a_finalizer_editing_its_client_changes_nothing_this_round(fast, b_spec):
    """Every value of a client is read before its first finalizer runs, on the C step and
    the general way alike (a list spec takes the general way): a finalizer that writes into
    its client's dict does not change what the next finalizer receives."""
    scalar = isinstance(b_spec, TensorSpec)
    clients = []

    def fin_a(v):
        for c in clients:
            c["b"] = -1.0 if scalar else [-1.0]
            c.pop("a", None)
        return v

    was = _sampling.set_client_fast_path(fast)
    try:
        p = FinalizeThenSampleFactory(6, seed=0).create({"a": fin_a, "b": lambda v: v},
                                                        {"a": TensorSpec("float64"), "b": b_spec})
        clients[:] = [{"a": 1.0, "b": 2.0 if scalar else [2.0]}]
        got, _ = p.next(p.initialize(), clients).result
    finally:
        _sampling.set_client_fast_path(was)
    assert clients == [{"b": -1.0 if scalar else [-1.0]}]   # the finalizer did edit it
    b = got["b"] if scalar else got["b"][0]
    assert got["a"].tolist() == [1.0] and b.tolist() == [2.0]


@pytest.mark.parametrize("fast", [True, False])
def test_a_weak_reference_callback_cannot_free_a_list_being_read(fast):
    """A list of floats is read into the spec's spare array; when the spare cannot be reused
    (a finalizer made a weak reference to it) a new one replaces it, and freeing the old one
    runs the reference's callback. That callback replaced the client's list, freeing it
    while it was still being read (SIGSEGV); the old spare is now let go after the read."""
    n = 300
    clients, refs, now = [], [], {"i": -1}

    def callback(_):
        i = now["i"] + 1
        if 0 < i < len(clients):
            clients[i]["loss"] = [9.0, 9.0]              # frees the list being read
            [[float(j), float(j)] for j in range(64)]    # and reuses its memory

    def fin_loss(v):
        refs.append(weakref.ref(v, callback))
        return v[0] / v[1]

    def fin_index(v):
        now["i"] = int(v)
        return v

    was = _sampling.set_client_fast_path(fast)
    try:
        p = FinalizeThenSampleFactory(n, seed=0).create(
            {"i": fin_index, "loss": fin_loss},
            {"i": TensorSpec("int64"), "loss": TensorSpec("float32", (2,))})
        clients[:] = [{"i": i, "loss": [i + 0.5, 2.0]} for i in range(n)]
        want = np.array([(i + 0.5) / 2.0 for i in range(n)], np.float32)
        got, _ = p.next(p.initialize(), clients).result
    finally:
        _sampling.set_client_fast_path(was)
    assert clients[1]["loss"] == [9.0, 9.0]   # the callbacks did run mid-round
    assert np.array_equal(got["loss"], want)


def test_a_timedelta_is_not_a_number_under_any_spec():
    """np.timedelta64 is a numpy signedinteger, but a duration: refused like datetime64."""
    for dtype in ("float32", "float64", "int64"):
        p = FinalizeThenSampleFactory(2, seed=0).create({"x": lambda v: v},
                                                        {"x": TensorSpec(dtype)})
        for value in (np.timedelta64(3), np.timedelta64(3, "s"), [np.timedelta64(3)]):
            with pytest.raises(TypeError, match="client 0, metric 'x'"):
                p.next(p.initialize(), [{"x": value}])


def test_a_metric_name_of_a_str_subclass_cannot_free_a_value_being_read():
    """Clients are read in order with PyDict_Next, whose value is borrowed: a name of a str
    subclass whose __hash__ replaced the client's value freed it while it was read
    (SIGSEGV). Such names are looked up."""
    clients = []

    class Name(str):
        def __hash__(self):
            for c in clients:
                c["a"] = np.float32(-1.0) * np.float32(len(c))   # a new object; the old freed
            return str.__hash__(self)

        __eq__ = str.__eq__

    name = Name("a")
    p = FinalizeThenSampleFactory(3, seed=0).create({name: lambda v: v},
                                                    {name: TensorSpec("float32")})
    clients[:] = [{"a": np.float32(i) + np.float32(0.5)} for i in range(20)]
    out = p.next(p.initialize(), clients)
    current, _ = out.result
    assert current["a"].dtype == np.float32 and len(current["a"]) == 3
    assert set(current["a"].tolist()) <= {-1.0} | {i + 0.5 for i in range(20)}


@pytest.mark.skipif(np.dtype(np.longdouble).itemsize == 8, reason="long double is double here")
def test_python_float_results_under_a_long_double_leaf_are_counted_as_long_double():
    """A finalizer whose probe result was a long double, returning Python floats: 2e300 is
    finite in a long double (it was narrowed to float32 to be counted: inf)."""
    p = FinalizeThenSampleFactory(2, seed=0).create(
        {"x": lambda v: np.longdouble(v) if v == 1.0 else float(v) * 1e300},
        {"x": TensorSpec("float64")})
    out = p.next(p.initialize(), [{"x": 2.0}, {"x": float("inf")}, {"x": 3.0}])
    assert out.measurements == {"x": 1}
    current, _ = out.result
    assert current["x"].dtype == np.longdouble


def test_a_process_without_finalized_metrics_accepts_its_own_states():
    p = FinalizeThenSampleFactory(2, seed=0).create(lambda m: {}, {"x": TensorSpec("float64")})
    state = p.next(p.initialize(), [{"x": 1.0}]).state
    assert state["samples"] == {}
    out = p.next(state, [{"x": 2.0}, {"x": 3.0}])
    assert out.measurements == {} and len(out.state["keys"]) == 2
    assert p.merge(state, out.state)["samples"] == {}


def test_vectorized_finalizer_returning_a_scalar_is_a_value_error():
    with pytest.raises(ValueError, match="leading axis of 1"):
        vectorized(lambda v: 3.0)(np.float64(1.0))
    with pytest.raises(TypeError, match="leading axis of 1"):
        FinalizeThenSampleFactory(2).create({"x": vectorized(lambda v: 3.0)},
                                            {"x": TensorSpec("float64")})
    calls = []
    p = FinalizeThenSampleFactory(2, seed=0).create(
        {"x": vectorized(lambda v: calls.append(1) or (v if len(calls) == 1 else 3.0))},
        {"x": TensorSpec("float64")})
    with pytest.raises(ValueError, match="leading axis of 3"):
        p.next_columnar(p.initialize(), {"x": np.ones(3)})
    with pytest.raises(ValueError, match="leading axis of 1"):
        p.next(p.initialize(), [{"x": 1.0}])


# ----------------------------------------------------------------------------------------------
# Untrusted state: every field validated
# ----------------------------------------------------------------------------------------------

def _valid_state():
    p = make_process(k=4, seed=3)
    s = p.next(p.initialize(), clients_ab(9)).state
    return p, p.next(s, clients_ab(9, 100)).state


@pytest.mark.parametrize("field, value", [
    ("seed", [1, 2, 3]), ("seed", (1.0, 2)), ("seed", (True, 2)), ("seed", (2**64, 0)),
    ("seed", "ab"),
    ("round", "1"), ("round", None), ("round", 0),
    ("keys", [1, 2, 3, 4]), ("keys", np.zeros((4, 1), np.uint64)),
    ("rounds", np.full(4, 5, np.int64)), ("rounds", np.full(4, -1, np.int64)),
    ("indices", np.full(4, -1, np.int64)), ("indices", np.zeros(4, np.int64)),
    ("indices", np.arange(4, 0, -1, dtype=np.int64)),
    ("keys", np.zeros(5, np.uint64)),
    ("samples", None), ("samples", {"a": np.zeros(4, np.float32)}),
    ("samples", {"a": np.zeros(4, np.float32), "b": np.zeros((4, 2), np.float32), "c": 1}),
    ("samples", {"a": np.zeros(4, np.float64), "b": np.zeros((4, 2), np.float32)}),
    ("samples", {"a": np.zeros(3, np.float32), "b": np.zeros((4, 2), np.float32)}),
    ("samples", {"a": np.zeros(4, np.float32), "b": np.zeros((4, 3), np.float32)}),
    ("samples", {"a": [0.0] * 4, "b": np.zeros((4, 2), np.float32)}),
    ("samples", {"a": np.zeros(4, np.float32), "b": [np.zeros(4, np.float32)] * 2}),
])
def test_tampered_state_fields_are_rejected(field, value):
    p, state = _valid_state()
    if field == "rounds" or field == "indices":
        state = dict(state, round=2)
    bad = dict(state, **{field: value})
    with pytest.raises((TypeError, ValueError)):
        p.next(bad, clients_ab(3))
    with pytest.raises((TypeError, ValueError)):
        p.merge(state, bad)
    with pytest.raises((TypeError, ValueError)):
        p.round_start(bad)


def test_state_with_more_clients_than_the_sample_size_is_rejected():
    big = make_process(k=9, seed=3)
    state = big.next(big.initialize(), clients_ab(9)).state
    with pytest.raises(ValueError, match="sample_size"):
        make_process(k=4, seed=3).next(state, clients_ab(2))


def test_merge_of_states_whose_structures_disagree_names_the_metric():
    p = make_process(k=4, seed=3)
    q = make_process(k=4, seed=3, finalizers={"a": lambda v: [v, v], "b": lambda v: v})
    a = p.next(p.initialize(), clients_ab(5)).state
    b = q.next(q.initialize(), clients_ab(5, 10), client_offset=5).state
    with pytest.raises(ValueError, match=r"state_b\['samples'\]\['a'\]"):
        p.merge(a, b)
    with pytest.raises(ValueError, match=r"state_a\['samples'\]\['a'\]"):
        p.merge(b, a)


def test_merge_of_a_client_held_by_both_states_with_different_keys_is_rejected():
    p = make_process(k=4, seed=3)
    a = p.next(p.initialize(), clients_ab(5)).state
    b = dict(a, keys=a["keys"] + np.uint64(1))
    with pytest.raises(ValueError, match="different keys"):
        p.merge(a, b)
    assert_tree_equal(p.merge(a, a)["samples"], a["samples"])


def _fill_entries(s, samples=True):
    s["keys"].fill(2**64 - 1)     # every old client would beat the round's,
    s["rounds"].fill(0)           # all of them the same client of round 0
    s["indices"].fill(0)
    if samples:
        s["samples"]["a"].fill(-1.0)


def _resize_entries(s):
    for name in ("keys", "rounds", "indices"):
        s[name].resize(0, refcheck=False)   # frees the buffer the check saw
    s["samples"]["b"].resize((1000, 2), refcheck=False)


def _replace_entries(s):
    s.update(seed=(1, 2), round=50, keys=np.zeros(0, np.uint64))


STATE_CHANGES = {"filled": _fill_entries, "resized": _resize_entries,
                 "replaced": _replace_entries}


@pytest.mark.parametrize("columnar", [False, True], ids=["next", "next_columnar"])
@pytest.mark.parametrize("change", sorted(STATE_CHANGES))
def test_a_finalizer_changing_the_state_handed_in_does_not_change_the_round(change, columnar):
    # The state is checked when the round starts, and what was checked is what the round
    # uses: a finalizer that then changes the caller's arrays in place changes nothing.
    p, state = _valid_state()
    clients = clients_ab(5, 200)
    cols = {"a": np.array([c["a"] for c in clients], np.float32),
            "b": np.array([c["b"] for c in clients], np.float32)}
    pending = []

    def a(v):
        if pending:
            STATE_CHANGES[change](pending.pop())
        return v

    fins = {"a": vectorized(a), "b": vectorized(lambda v: v)} if columnar else \
        {"a": a, "b": lambda v: v}
    q = make_process(k=4, seed=3, finalizers=fins)
    run = (lambda s: q.next_columnar(s, cols)) if columnar else (lambda s: q.next(s, clients))
    expected = run(pickle.loads(pickle.dumps(state)))
    handed = pickle.loads(pickle.dumps(state))
    pending.append(handed)
    out = run(handed)
    assert not pending
    assert_tree_equal(out.state, expected.state)
    assert_tree_equal(out.result, expected.result)
    q.next(out.state, clients_ab(2))   # and the state it returns is a valid one


def test_a_state_read_through_a_dict_subclass_is_used_as_checked():
    # A dict subclass runs Python code on each read of a field, after the fields read before
    # it were checked (here: the entries, changed when the samples are read); in merge,
    # reading one state's fields can change the other's, all read and checked before.
    p, state = _valid_state()
    expected_next = p.next(pickle.loads(pickle.dumps(state)), clients_ab(3, 300))
    expected_merge = p.merge(state, state)

    class Sneaky(dict):
        victim = None

        def __getitem__(self, key):
            victim = self.victim
            if key == "samples" and victim is not None:
                self.victim = None
                _fill_entries(victim, samples=victim is not self)
            return super().__getitem__(key)

    one = Sneaky(pickle.loads(pickle.dumps(state)))
    one.victim = one
    out = p.next(one, clients_ab(3, 300))
    assert_tree_equal(out.state, expected_next.state)
    a, b = pickle.loads(pickle.dumps(state)), Sneaky(pickle.loads(pickle.dumps(state)))
    b.victim = a
    assert_tree_equal(p.merge(a, b), expected_merge)


def test_record_clients_read_directly_unless_a_subclass_overrides_reading():
    FlwrMetricsRecord = pytest.importorskip("flwr.common").MetricsRecord

    class Doubling(FlwrMetricsRecord):
        def __getitem__(self, key):
            v = super().__getitem__(key)
            return 2 * v if isinstance(v, float) else v

        def items(self):
            return [(k, self[k]) for k in self]

    class FastDoubling(fastrec.MetricsRecord):
        def items(self):
            return [(k, 2 * v if isinstance(v, float) else v) for k, v in dict.items(
                {k: fastrec.MetricsRecord.__getitem__(self, k) for k in self})]

    p = make_process(k=5, seed=2)
    ref = p.next(p.initialize(), [{"a": 2.0 * i, "b": [float(i), 2.0 * i]} for i in range(8)])
    for cls in (Doubling, FastDoubling):
        got = p.next(p.initialize(), [cls({"a": float(i), "b": [float(i), 2.0 * i]})
                                      for i in range(8)])
        assert_tree_equal(got.result, ref.result)
    plain = p.next(p.initialize(), [FlwrMetricsRecord({"a": 2.0 * i, "b": [float(i), 2.0 * i]})
                                    for i in range(8)])
    assert_tree_equal(plain.result, ref.result)


def test_float32_narrowing_matches_numpy_at_the_range_edge():
    edge = [3.4028234663852886e38, 3.4028235e38, 3.4028235677973362e38, 3.4028235677973366e38,
            3.5e38, 1e39, -1e39, -3.4028235677973366e38, -3.4028235677973362e38, -3.5e38,
            -3.4028234663852886e38, float("inf"), float("-inf"), float("nan"), 1e-46, -0.0]
    with np.errstate(over="ignore"):
        expected = np.array(edge, np.float64).astype(np.float32)
    p = FinalizeThenSampleFactory(20, seed=0).create(
        {"s": lambda v: v, "v": lambda v: v}, {"s": TensorSpec("float32"),
                                               "v": TensorSpec("float32", (len(edge),))})
    out = p.next(p.initialize(), [{"s": x, "v": edge} for x in edge])
    assert out.result[0]["s"].tobytes() == expected.tobytes()
    assert out.result[0]["v"][0].tobytes() == expected.tobytes()


# -- pickling the process (worker processes receive it, e.g. fastrec.dask) -------------------

def _double(v):
    return v + v  # keeps float32 under NumPy 1's value-based casting too (v * 2 does not)


def _pair_sum(v):
    return v[0] + v[1]


@pytest.mark.parametrize("seed", [7, None])
def test_process_pickles_and_unpickles_to_the_same_process(seed):
    spec = {"x": TensorSpec("float32"), "p": [TensorSpec("int64"), TensorSpec("int64")]}
    p = FinalizeThenSampleFactory(4, seed=seed).create({"x": _double, "p": _pair_sum}, spec)
    q = pickle.loads(pickle.dumps(p))
    clients = [{"x": float(i), "p": [i, 2 * i]} for i in range(30)]
    start = p.initialize()
    a, b = p.next(start, clients), q.next(start, clients)
    assert np.array_equal(a.state["keys"], b.state["keys"])
    for name in ("x", "p"):
        assert np.array_equal(a.result[0][name], b.result[0][name])
    if seed is not None:  # the seed travels: a fresh initialize() agrees too
        assert q.initialize()["seed"] == p.initialize()["seed"]


def test_pickled_process_snapshots_the_spec_at_create():
    spec = {"x": TensorSpec("float32")}
    p = FinalizeThenSampleFactory(2, seed=0).create({"x": _double}, spec)
    spec["x"] = TensorSpec("int8")   # edited after create: the process keeps what it was given
    q = pickle.loads(pickle.dumps(p))
    out = q.next(q.initialize(), [{"x": 0.5}])
    assert out.result[0]["x"].dtype == np.float32 and out.result[0]["x"].tolist() == [1.0]


def test_functional_process_pickles():
    p = FinalizeThenSampleFactory(3, seed=1).create(dict, {"x": TensorSpec("float64")})
    q = pickle.loads(pickle.dumps(p))
    assert q.next(q.initialize(), [{"x": 2.0}]).result[0]["x"].tolist() == [2.0]


def test_python_ints_in_a_longer_list_under_a_float_spec_are_cast_once():
    """NumPy types [2**63 + 2**39 + 1, 1] as float64 (rounded twice on the way to float32);
    each int is cast as the scalar path casts it, as NumPy casts an int64/uint64 array."""
    big = 2**63 + 2**39 + 1
    rows = [[big, 1], [2**60 + 2**36 + 1, 2**64], [-(2**60 + 2**36 + 1), 2**63]]
    for dtype in ("float32", "float64"):
        p = FinalizeThenSampleFactory(5, seed=0).create(
            {"l": lambda v: v}, {"l": TensorSpec(dtype, (2,))})
        got = p.next(p.initialize(), [{"l": r} for r in rows]).result[0]["l"]
        for row, g in zip(rows, got):
            want = [np.asarray([v], np.uint64 if v >= 2**63 else np.int64).astype(dtype)[0]
                    if v < 2**64 else np.float64(v).astype(dtype) for v in row]
            assert g.tobytes() == np.array(want, dtype).tobytes(), (dtype, row)
        cols = p.next_columnar(p.initialize(), {"l": rows}).result[0]["l"]
        assert cols.tobytes() == got.tobytes()


@pytest.mark.parametrize("spec,value", [
    (TensorSpec("int64", (2,)), [True, 1]), (TensorSpec("float32", (2,)), [True, 2.5]),
    (TensorSpec("float64", (2, 2)), [[1.0, 2.0], [np.bool_(True), 3.0]]),
    (TensorSpec("int8", (2,)), (1, False))])
def test_a_bool_among_numbers_in_a_list_is_not_a_number(spec, value):
    """A bool only matches a bool spec, inside lists too (NumPy's inference would type
    [True, 1] as int64)."""
    p = FinalizeThenSampleFactory(2, seed=0).create({"x": lambda v: v}, {"x": spec})
    with pytest.raises(TypeError, match="bool"):
        p.next(p.initialize(), [{"x": value}])


class _LyingNumbers:
    """Subclasses of the number types whose methods give other values than they hold."""

    class Int(int):
        def __int__(self):
            return 5

        def __index__(self):
            return 5

        def __float__(self):
            return 5.0

    class Float(float):
        def __float__(self):
            return 5.0

        def __complex__(self):
            return 5j

    class F64(np.float64):
        def __float__(self):
            return 5.0

    class I64(np.int64):
        def __int__(self):
            return 5

        def __index__(self):
            return 5


@pytest.mark.parametrize("fast", [True, False])
def test_number_subclasses_are_read_as_stored_in_scalars_and_lists(fast):
    L = _LyingNumbers
    cases = [("float32", L.Int(7), 7.0), ("float64", L.Float(7.5), 7.5),
             ("complex128", L.Float(7.5), 7.5), ("int64", L.Int(7), 7),
             ("float32", L.F64(7.5), 7.5), ("int16", L.I64(7), 7), ("float64", L.I64(7), 7.0)]
    was = _sampling.set_client_fast_path(fast)
    try:
        for dtype, v, want in cases:
            p = FinalizeThenSampleFactory(2, seed=0).create(
                {"s": lambda x: x, "l": lambda x: x},
                {"s": TensorSpec(dtype), "l": TensorSpec(dtype, (2,))})
            cur = p.next(p.initialize(), [{"s": v, "l": [v, v]}]).result[0]
            assert cur["s"].tolist() == [want], (dtype, type(v))
            assert cur["l"].tolist() == [[want, want]], (dtype, type(v))
        # Out of range is out of range, whatever __int__ says.
        for dtype, bad in (("int64", L.Int(2**70)), ("int8", L.Int(300)),
                           ("int8", L.I64(300))):
            p = FinalizeThenSampleFactory(2, seed=0).create(
                {"s": lambda x: x, "l": lambda x: x},
                {"s": TensorSpec(dtype), "l": TensorSpec(dtype, (2,))})
            with pytest.raises(ValueError, match="out of range"):
                p.next(p.initialize(), [{"s": bad, "l": [1, 1]}])
            with pytest.raises(ValueError, match="out of range"):
                p.next(p.initialize(), [{"s": 1, "l": [bad, 1]}])
    finally:
        _sampling.set_client_fast_path(was)


def test_a_long_double_takes_an_int_past_a_double_as_numpy_does():
    ld = np.dtype(np.longdouble)
    p = FinalizeThenSampleFactory(2, seed=0).create(
        {"s": lambda x: x, "l": lambda x: x}, {"s": TensorSpec(ld), "l": TensorSpec(ld, (1,))})
    cur = p.next(p.initialize(), [{"s": 10**300, "l": [10**300]}]).result[0]
    assert cur["s"][0] == np.longdouble(10**300) == cur["l"][0, 0]
    if np.finfo(ld).maxexp > 1024:   # an 80-bit or 128-bit long double (not a double)
        cur = p.next(p.initialize(), [{"s": 10**400, "l": [10**400]}]).result[0]
        assert cur["s"][0] == np.longdouble(10**400) == cur["l"][0, 0]
    else:
        for c in ({"s": 10**400, "l": [1]}, {"s": 1, "l": [10**400]}):
            with pytest.raises(ValueError):
                p.next(p.initialize(), [c])


def test_the_last_round_a_state_can_reach_is_accepted_and_ends_there():
    """A state's round is an int64: a state the process made at round 2**63 - 1 is valid
    (merged, run with no clients), and only a round after it is refused."""
    p = FinalizeThenSampleFactory(2, seed=0).create({"x": lambda v: v},
                                                    {"x": TensorSpec("float64")})
    near = dict(p.initialize(), round=2**63 - 2)
    last = p.next(near, [{"x": 1.0}, {"x": 2.0}]).state
    assert last["round"] == 2**63 - 1 and last["rounds"].tolist() == [2**63 - 2] * 2
    assert p.next(last, []).state is last
    assert p.merge(last, near)["round"] == 2**63 - 1
    with pytest.raises(ValueError, match="no round can follow"):
        p.next(last, [{"x": 1.0}])
    with pytest.raises(ValueError, match="no round can follow"):
        p.next_columnar(last, {"x": np.ones(2)})
    with pytest.raises(ValueError, match="at most"):
        p.next(dict(last, round=2**63), [{"x": 1.0}])


def test_a_dimension_past_ssize_t_is_a_value_error_at_the_spec():
    with pytest.raises(ValueError, match="exceeds"):
        TensorSpec("float32", (2**63,))
    with pytest.raises(ValueError, match="exceeds"):
        TensorSpec("float32", (3, np.uint64(2**64 - 1)))
    TensorSpec("float32", (2**63 - 1,))   # a valid shape, if no value can have it


def test_state_arrays_of_an_equivalent_integer_type_are_accepted():
    """ulonglong is uint64 where both are 64 bits (and longlong int64): same values, same
    rounds; the state returned holds exactly uint64/int64 arrays."""
    p = FinalizeThenSampleFactory(3, seed=0).create({"x": lambda v: v},
                                                    {"x": TensorSpec("float64")})
    s = p.next(p.initialize(), [{"x": float(i)} for i in range(6)]).state
    alt = dict(s, keys=s["keys"].astype(np.ulonglong), rounds=s["rounds"].astype(np.longlong),
               indices=s["indices"].astype(np.longlong))
    clients = [{"x": 10.0 + i} for i in range(9)]
    a, b = p.next(s, clients).state, p.next(alt, clients).state
    for key in ("keys", "rounds", "indices"):
        assert b[key].dtype == a[key].dtype == {"keys": np.uint64}.get(key, np.int64)
        assert b[key].tolist() == a[key].tolist()
    assert b["samples"]["x"].tolist() == a["samples"]["x"].tolist()


def test_a_list_subclass_of_columns_is_read_as_stored():
    class Short(list):
        def __iter__(self):   # says 2 columns (len) but yields 1
            return iter(list(self)[:1])

    seen = []
    spec = {"loss": [TensorSpec("float32"), TensorSpec("float32")]}
    p = FinalizeThenSampleFactory(5, seed=0).create(
        {"loss": vectorized(lambda v: seen.append(len(v)) or v[0] + v[1])}, spec)
    cols = Short([np.ones(3, np.float32), np.full(3, 2, np.float32)])
    out = p.next_columnar(p.initialize(), {"loss": cols})
    assert seen[-1] == 2 and out.result[0]["loss"].tolist() == [3, 3, 3]
