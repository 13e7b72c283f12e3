"""fastrec.app against Flower 1.42's flwr.app.

The differential tests need flwr >= 1.19 (the object wire format); with the
test extra's flwr 1.15.2 they skip. Run them with `bash .ci/flwr-next`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastrec
import fastrec._app
from fastrec import app



def _flwr_version():
    from importlib.metadata import PackageNotFoundError, version
    try:
        return tuple(int(x) for x in version("flwr").split(".")[:2])
    except PackageNotFoundError:
        return (0, 0)


# The API tests need no Flower; the differential ones need flwr >= 1.19.
NEXT = _flwr_version() >= (1, 19)
needs_next = pytest.mark.skipif(not NEXT, reason="needs flwr >= 1.19 (run .ci/flwr-next)")

if NEXT:
    import flwr.app as fa
    from flwr.app.message.arraychunk import ArrayChunk as FArrayChunk
    from flwr.supercore.inflatable.inflatable_object import (
        get_object_children_ids_from_object_content)
    from flwr.supercore.inflatable.inflatable_utils import validate_object_content


def _outcome(fn, *args, **kwargs):
    """('ok', result) or (exception type, message)."""
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - we compare what both raise
        return (type(exc), str(exc))


# ---------------------------------------------------------------------------
# API without Flower: shape of the objects, header, round trips
# ---------------------------------------------------------------------------

def test_metric_record_round_trip_and_header():
    r = app.MetricRecord({"acc": 0.5, "n": 3, "h": [1.0, 2.0], "big": 2**63, "e": []})
    content = r.deflate()
    head, body = content.split(b"\x00", 1)
    assert head == b"MetricRecord  %d" % len(body)
    assert app.MetricRecord.inflate(content) == r
    assert r.object_id == hashlib.sha256(content).hexdigest()
    assert r.children is None and r.is_dirty


def test_config_record_round_trip():
    r = app.ConfigRecord({"b": True, "s": "é", "y": b"\x00", "l": ["a", ""], "f": [False],
                          "i": [-1, 5], "u": [2**64 - 1, 0], "": 1.5})
    assert app.ConfigRecord.inflate(r.deflate()) == r


def test_array_strict_constructor():
    a = app.Array("float32", (2,), "numpy.ndarray", b"")
    assert a.shape == (2,)
    with pytest.raises(TypeError, match="Invalid arguments for Array"):
        app.Array("float32", [2], "numpy.ndarray", b"")
    with pytest.raises(TypeError, match="Invalid arguments for Array"):
        app.Array("float32", (2,), "numpy.ndarray", bytearray())
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(app.Array(x).numpy(), x)
    assert app.Array(ndarray=x) == app.Array(x) == app.Array.from_numpy_ndarray(x)


def test_array_dirty_and_chunks(monkeypatch):
    monkeypatch.setattr(fastrec._app, "MAX_ARRAY_CHUNK_SIZE", 4)
    a = app.Array("u1", (9,), "raw", bytes(9))
    assert a.is_dirty
    oid = a.object_id
    assert not a.is_dirty
    a.stype = "raw"
    assert a.is_dirty and a.object_id == oid


def test_record_dict_views_and_deprecations(caplog):
    m = app.MetricRecord({"a": 1})
    rd = app.RecordDict({"m": m, "c": app.ConfigRecord({"x": "y"})})
    assert dict(rd.metric_records) == {"m": m}
    view = rd.config_records
    view["c2"] = app.ConfigRecord()
    assert "c2" in rd
    del view["c2"]
    assert "c2" not in rd
    with pytest.raises(TypeError):
        view["bad"] = m
    with caplog.at_level(logging.WARNING):
        app.RecordDict(metrics_records={"m": m})
    assert "deprecated" in caplog.text


_OVERWRITE = """
import logging
from fastrec import app
logging.basicConfig(level=logging.WARNING, format="%(message)s")
rd = app.RecordDict({"a": app.MetricRecord({"x": 1.0})})
rd["a"] = app.ConfigRecord({"y": 1.0})   # the dict held the only reference to the old one
rd.metric_records["a"] = app.MetricRecord()
"""


def test_overwriting_a_record_of_another_type_reads_the_old_type_safely(caplog):
    """The warning names the replaced record's type, which the replacement may free: it
    must be read from a reference of our own (PYTHONMALLOC=debug poisons freed memory)."""
    import os
    import subprocess
    import sys
    rd = app.RecordDict({"a": app.MetricRecord({"x": 1.0})})
    with caplog.at_level(logging.WARNING):
        rd["a"] = app.ConfigRecord({"y": 1.0})
    assert "record of type `MetricRecord` replaced with type `ConfigRecord`" in caplog.text
    out = subprocess.run([sys.executable, "-c", _OVERWRITE], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONMALLOC="debug"), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "`MetricRecord` replaced with type `ConfigRecord`" in out.stderr
    assert "`ConfigRecord` replaced with type `MetricRecord`" in out.stderr


def test_typeddict_copy():
    r = app.ArrayRecord([np.zeros(2)])
    r.object_id
    c = r.copy()
    assert type(c) is app.ArrayRecord and c == r and c is not r and c.is_dirty
    c["x"] = app.Array(np.ones(1))
    assert "x" not in r


def test_pickle_round_trip():
    rd = app.RecordDict({"a": app.ArrayRecord([np.arange(3)]),
                         "m": app.MetricRecord({"x": 1.0})})
    back = pickle.loads(pickle.dumps(rd))
    assert back.deflate() == rd.deflate()


def test_top_level_115_api_unchanged():
    assert fastrec.MetricsRecord({"a": 1}).count_bytes() == 9
    with pytest.raises(TypeError, match=r"typing\.Union"):
        fastrec.MetricsRecord({"a": "x"})
    with pytest.raises(TypeError, match=r"int \| float \| list"):
        app.MetricRecord({"a": "x"})


def test_torch_paths_without_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="PyTorch is required"):
            app.Array.from_torch_tensor(object())
        with pytest.raises(ImportError, match="PyTorch is required"):
            app.ArrayRecord().to_torch_state_dict()
    else:
        pytest.skip("torch is installed")


def test_torch_paths_with_torch():
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    a = app.Array(t)
    assert np.array_equal(a.numpy(), t.numpy())
    rec = app.ArrayRecord({"w": t})
    sd = rec.to_torch_state_dict()
    assert torch.equal(sd["w"], t)
    if NEXT:
        assert app.Array(t).deflate() == fa.Array(t).deflate()
        assert rec.deflate() == fa.ArrayRecord({"w": t}).deflate()


HOSTILE = [b"", b"\x00", b"MetricRecord", b"MetricRecord  1\x00", b"MetricRecord 1\x00",
           b"MetricRecord  x\x00", b"MetricRecord  0 \x00", b"Array  0\x00",
           b"MetricRecord  2\x00\x0a\xff", b"MetricRecord  3\x00\x0a\x01\x00",
           b"MetricRecord  2\x00\x0a\x00", b"\xff\xfe  0\x00", b"RecordDict  2\x00[]",
           b"ArrayRecord  4\x00null", b"Array  2\x00{}", b"ConfigRecord  2\x00\x0b\x0c"]


@pytest.mark.parametrize("content", HOSTILE)
def test_hostile_content_is_a_value_error(content):
    for cls in (app.MetricRecord, app.ConfigRecord, app.Array, app.ArrayRecord,
                app.RecordDict, app.ArrayChunk):
        try:
            cls.inflate(content)
        except (ValueError, TypeError):
            pass


@given(st.binary(max_size=64))
@settings(max_examples=300)
def test_random_bodies_only_value_or_type_errors(body):
    for name, cls in (("MetricRecord", app.MetricRecord), ("ConfigRecord", app.ConfigRecord)):
        content = b"%s  %d\x00" % (name.encode(), len(body)) + body
        try:
            cls.inflate(content)
        except (ValueError, TypeError):
            pass


# ---------------------------------------------------------------------------
# Differential against flwr 1.42 (>= 1.19)
# ---------------------------------------------------------------------------

finite = st.floats(allow_nan=False)
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
metric_vals = st.one_of(finite, ints, st.lists(finite, max_size=4),
                        st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4),
                        st.lists(st.integers(0, 2**64 - 1), max_size=4))
config_vals = st.one_of(metric_vals, st.booleans(), st.text(max_size=6), st.binary(max_size=6),
                        st.lists(st.booleans(), max_size=4), st.lists(st.text(max_size=3), max_size=3),
                        st.lists(st.binary(max_size=3), max_size=3))
keys = st.text(max_size=5)


def _same_values(a, b):
    assert list(a.keys()) == list(b.keys())
    for k in a:
        x, y = a[k], b[k]
        assert type(x) is type(y)
        if isinstance(x, float) and math.isnan(x):
            assert math.isnan(y)
        else:
            assert x == y


@needs_next
@given(st.dictionaries(keys, metric_vals, max_size=5))
@settings(max_examples=200)
def test_metric_deflate_inflate_equal_flower(d):
    ours, theirs = app.MetricRecord(d), fa.MetricRecord(d)
    assert ours.deflate() == theirs.deflate()
    assert ours.object_id == theirs.object_id
    _same_values(app.MetricRecord.inflate(theirs.deflate()),
                 fa.MetricRecord.inflate(theirs.deflate()))


@needs_next
@given(st.dictionaries(keys, config_vals, max_size=5))
@settings(max_examples=200)
def test_config_deflate_inflate_equal_flower(d):
    ours, theirs = app.ConfigRecord(d), fa.ConfigRecord(d)
    assert ours.deflate() == theirs.deflate()
    _same_values(app.ConfigRecord.inflate(theirs.deflate()),
                 fa.ConfigRecord.inflate(theirs.deflate()))


@needs_next
@pytest.mark.parametrize("n", [1, 4, 64, 65])
def test_deflate_fast_path_edges_equal_flower(n):
    """Records of exact scalars and int64/float lists deflate through a compiled arena
    (up to 64 entries, record order kept); the rest through the general encoder."""
    m_vals = [0.5, [0.1, 0.2], [1, -(2**63), 2**63 - 1], [], [2**63, 1], 2**64 - 1, -7,
              [1, 2.0], math.inf, [1.5] * 300]
    c_vals = m_vals[:5] + [True, [True, False], "x\u00e9", [b"a", b""], b"", ""]
    keys = ["", "b", "a", "\u00e9t\u00e9"] + [f"k{i}" for i in range(n)]
    for cls, vals in (("MetricRecord", m_vals), ("ConfigRecord", c_vals)):
        d = {k: vals[i % len(vals)] for i, k in enumerate(keys[:n])}
        if cls == "MetricRecord":
            d = {k: v for k, v in d.items() if v != [1, 2.0]} or {"": 1.0}
        ours, theirs = getattr(app, cls)(d), getattr(fa, cls)(d)
        assert ours.deflate() == theirs.deflate()
        _same_values(getattr(app, cls).inflate(ours.deflate()), theirs)


class _NoisyBytes(bytes):
    def __bytes__(self):  # protobuf reads the buffer, never this
        return b"other"


@needs_next
def test_deflate_odd_str_and_bytes_values_like_flower():
    for d in ({"k": _NoisyBytes(b"abc")}, {"k": [b"x", _NoisyBytes(b"abc")]}):
        assert app.ConfigRecord(d).deflate() == fa.ConfigRecord(d).deflate()
    # a lone surrogate: protobuf's UnicodeEncodeError, in a key or a value
    for cls, d in (("MetricRecord", {"\ud800": 1.0}), ("MetricRecord", {"\ud800": [1]}),
                   ("ConfigRecord", {"k": "\udc80"}), ("ConfigRecord", {"k": ["\udc80"]})):
        ours = _outcome(getattr(app, cls)(d).deflate)
        theirs = _outcome(getattr(fa, cls)(d).deflate)
        assert ours[0] is theirs[0] is UnicodeEncodeError
    # several failing entries: Flower converts every value, then the keys
    for cls, d, err in (("MetricRecord", {"\ud800": 2**64, "a": 1.0}, ValueError),
                        ("ConfigRecord", {"\ud800": "x", "b": [1, -1, 2**64]}, ValueError)):
        ours = _outcome(getattr(app, cls)(d).deflate)
        theirs = _outcome(getattr(fa, cls)(d).deflate)
        assert ours[0] is theirs[0] is err


VALUES = [1, 1.5, True, "s", b"b", None, [1, True], [True, 1], [1, 2.0], [1.0, 2], [], ["a", 1],
          [b"a"], [[1]], {"a": 1}, np.float64(1.0), np.int64(3), 2**64, -(2**63) - 1, (1, 2),
          float("nan"), [np.float64(1.0), 2.0], [2.0, np.float64(1.0)]]


@needs_next
@pytest.mark.parametrize("value", VALUES, ids=repr)
@pytest.mark.parametrize("names", [("MetricRecord", "MetricRecord"),
                                   ("ConfigRecord", "ConfigRecord")])
def test_value_table(value, names):
    ours_cls, theirs_cls = getattr(app, names[0]), getattr(fa, names[1])
    o, t = _outcome(ours_cls, {"k": value}), _outcome(theirs_cls, {"k": value})
    assert o[0] == "ok" if t[0] == "ok" else o == t
    if t[0] == "ok":
        od, td = _outcome(o[1].deflate), _outcome(t[1].deflate)
        if td[0] == "ok":
            assert od == td
        else:
            assert issubclass(od[0], (ValueError, TypeError))
    for key in (1, None, b"k"):
        assert _outcome(ours_cls, {key: 1}) == _outcome(theirs_cls, {key: 1})


@needs_next
@pytest.mark.parametrize("name", ["MetricRecord", "ConfigRecord"])
@given(ops=st.lists(st.tuples(st.sampled_from(["get", "pop", "popitem", "setdefault", "update",
                                               "clear", "set", "del", "copy"]),
                              keys, st.one_of(metric_vals, st.just("s"), st.just(None))),
                    max_size=12))
@settings(max_examples=100)
def test_mapping_methods_match(name, ops):
    ours, theirs = getattr(app, name)({"a": 1}), getattr(fa, name)({"a": 1})
    for op, k, v in ops:
        if op == "set":
            calls = [lambda r: r.__setitem__(k, v)]
        elif op == "del":
            calls = [lambda r: r.__delitem__(k)]
        elif op in ("get", "pop"):
            calls = [lambda r: getattr(r, op)(k), lambda r: getattr(r, op)(k, None)]
        elif op == "setdefault":
            calls = [lambda r: r.setdefault(k, v)]
        elif op == "update":
            calls = [lambda r: r.update({k: v})]
        elif op == "copy":
            calls = [lambda r: dict(r.copy())]
        else:
            calls = [lambda r: getattr(r, op)()]
        for call in calls:
            o, t = _outcome(call, ours), _outcome(call, theirs)
            assert o[0] == t[0]
            if o[0] != "ok":
                assert o[1] == t[1]  # same message
        assert dict(ours) == dict(theirs)
        assert ours.deflate() == theirs.deflate()


def _pair_arrays(shape=(3, 4), dtype=np.float32, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    return app.Array(x), fa.Array(x)


@needs_next
def test_array_and_record_dict_objects_equal(monkeypatch):
    import flwr.app.message.array as farray
    # small chunks, with repeats (zeros), to exercise the chunk index and dedup
    monkeypatch.setattr(fastrec._app, "MAX_ARRAY_CHUNK_SIZE", 64)
    monkeypatch.setattr(farray, "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", 64)
    x = np.zeros(100, dtype=np.float32)
    x[-3:] = 1
    oa, ta = app.Array(x), fa.Array(x)
    assert oa.deflate() == ta.deflate()
    assert oa.object_id == ta.object_id
    assert list(oa.children) == list(ta.children)
    assert [c for c, _ in oa.slice_array()] == [c for c, _ in ta.slice_array()]
    for cid, ch in oa.children.items():
        assert ch.deflate() == ta.children[cid].deflate()
        assert ch.object_id == cid
    rec_o = app.ArrayRecord({"w": oa, "v": app.Array(x)})
    rec_t = fa.ArrayRecord({"w": ta, "v": fa.Array(x)})
    assert rec_o.deflate() == rec_t.deflate() and rec_o.object_id == rec_t.object_id
    rd_o = app.RecordDict({"p": rec_o, "m": app.MetricRecord({"a": 1}),
                           "c": app.ConfigRecord({"s": "x"}), "q": rec_o})
    rd_t = fa.RecordDict({"p": rec_t, "m": fa.MetricRecord({"a": 1}),
                          "c": fa.ConfigRecord({"s": "x"}), "q": rec_t})
    assert rd_o.deflate() == rd_t.deflate()
    assert list(rd_o.children) == list(rd_t.children)
    assert repr(rd_o) == repr(rd_t)
    # inflate Flower's object tree with our classes
    chunks = {cid: app.ArrayChunk.inflate(ch.deflate()) for cid, ch in ta.children.items()}
    arr = app.Array.inflate(ta.deflate(), chunks)
    assert arr == oa
    rec = app.ArrayRecord.inflate(rec_t.deflate(), {oa.object_id: arr})
    assert rec.deflate() == rec_t.deflate()
    kids = {rec.object_id: rec, app.MetricRecord({"a": 1}).object_id: app.MetricRecord({"a": 1}),
            app.ConfigRecord({"s": "x"}).object_id: app.ConfigRecord({"s": "x"})}
    assert app.RecordDict.inflate(rd_t.deflate(), kids).deflate() == rd_t.deflate()


@needs_next
def test_subclass_objects_carry_the_subclass_name_like_flower():
    """Flower's header names ``type(obj).__qualname__`` and inflate checks it against
    ``cls.__qualname__``: a subclass's objects (and so their ids) carry its own name."""
    def sub(base, name):
        return type(name, (base,), {})

    x = np.arange(3.0)
    pairs = {}
    for side, m in (("ours", app), ("theirs", fa)):
        arr = sub(m.Array, "MyArray")(x)
        pairs[side] = [sub(m.MetricRecord, "MyMetrics")({"a": 1.0, "l": [1, 2]}),
                       sub(m.ConfigRecord, "MyConfig")({"s": "x", "b": b"y"}),
                       arr, sub(m.ArrayRecord, "MyArrays")({"w": arr})]
        pairs[side].append(sub(m.RecordDict, "MyRecords")({"m": pairs[side][0],
                                                             "a": pairs[side][3]}))
    for ours, theirs in zip(pairs["ours"], pairs["theirs"]):
        content = theirs.deflate()
        assert content.startswith(type(theirs).__qualname__.encode() + b" ")
        assert ours.deflate() == content and ours.object_id == theirs.object_id
    mo, co = pairs["ours"][:2]
    mt, ct = pairs["theirs"][:2]
    for ours, theirs in ((mo, mt), (co, ct)):
        back = type(ours).inflate(theirs.deflate())
        assert type(back) is type(ours) and dict(back) == dict(theirs)
        # a subclass does not read its base's objects, nor the base a subclass's
        base_o, base_t = type(ours).__mro__[1], type(theirs).__mro__[1]
        for o_cls, t_cls, content in ((type(ours), type(theirs), base_t(dict(theirs)).deflate()),
                                      (base_o, base_t, theirs.deflate())):
            assert _outcome(o_cls.inflate, content)[0] is ValueError
            assert _outcome(t_cls.inflate, content)[0] is ValueError
    arr_o, arr_t = pairs["ours"][2], pairs["theirs"][2]
    kids = {cid: app.ArrayChunk.inflate(ch.deflate()) for cid, ch in arr_t.children.items()}
    back = type(arr_o).inflate(arr_t.deflate(), kids)
    assert type(back) is type(arr_o) and back.data == arr_t.data
    assert _outcome(app.Array.inflate, arr_t.deflate(), kids)[0] is ValueError
    rec_o, rec_t = pairs["ours"][3], pairs["theirs"][3]
    kids = {a.object_id: a for a in rec_o.values()}   # the record holds base-class copies
    back = type(rec_o).inflate(rec_t.deflate(), kids)
    assert type(back) is app.ArrayRecord   # Flower's inflate builds the base class
    assert back.deflate() == fa.ArrayRecord(dict(rec_t)).deflate()
    assert _outcome(app.ArrayRecord.inflate, rec_t.deflate(), kids)[0] is ValueError


@needs_next
def test_dirty_tracking_matches_flower():
    oa, ta = _pair_arrays()
    ro, rt = app.ArrayRecord({"w": oa}), fa.ArrayRecord({"w": ta})
    seq_o, seq_t = [], []
    for rec, seq in ((ro, seq_o), (rt, seq_t)):
        seq.append(rec.is_dirty)
        rec.object_id
        seq.append(rec.is_dirty)
        rec["w"].dtype = rec["w"].dtype
        seq.append(rec.is_dirty)
        rec.object_id
        seq.append((rec.is_dirty, rec["w"].is_dirty))
        rec.pop("w")
        seq.append(rec.is_dirty)
        seq.append(rec.copy().is_dirty)
    assert seq_o == seq_t


ARRAY_ARGS = [((), {}), (("f", (1,), "s", b""), {}), (("f", [1], "s", b""), {}),
              (("f", (1,), "s"), {}), ((), {"dtype": "f", "shape": (1,), "stype": "s", "data": b""}),
              (("f",), {"shape": (1,), "stype": "s", "data": b""}),
              (("f",), {"dtype": "g", "shape": (1,), "stype": "s", "data": b""}),
              ((np.zeros(2),), {}), ((), {"ndarray": np.zeros(2)}),
              ((np.zeros(2),), {"ndarray": np.zeros(2)}), (("f", (True,), "s", b""), {}),
              (("f", (1,), "s", bytearray()), {}), ((1, 2, 3, 4, 5), {}), (([1, 2],), {})]


@needs_next
@pytest.mark.parametrize("args,kwargs", ARRAY_ARGS, ids=repr)
def test_array_constructor_table(args, kwargs):
    o, t = _outcome(app.Array, *args, **kwargs), _outcome(fa.Array, *args, **kwargs)
    assert o[0] == "ok" if t[0] == "ok" else o == t
    if t[0] == "ok":
        assert o[1].deflate() == t[1].deflate()
        assert repr(o[1]) == repr(t[1])


REC_ARGS = [((), {}), (({},), {}), (([],), {}), (([np.zeros(2)],), {}),
            ((), {"numpy_ndarrays": [np.zeros(2)]}), (([np.zeros(2)], [np.zeros(2)]), {}),
            (([np.zeros(2)],), {"array_dict": {}}), (({"a": 1},), {}), (([1],), {}),
            ((), {"array_dict": {1: None}})]


@needs_next
@pytest.mark.parametrize("args,kwargs", REC_ARGS, ids=repr)
def test_array_record_constructor_table(args, kwargs):
    o = _outcome(app.ArrayRecord, *args, **kwargs)
    t = _outcome(fa.ArrayRecord, *args, **kwargs)
    assert o[0] == "ok" if t[0] == "ok" else o == t
    if t[0] == "ok":
        assert o[1].deflate() == t[1].deflate()
        assert o[1].count_bytes() == t[1].count_bytes()


def _mutations(content):
    yield content[:-1]
    yield content + b"x"
    yield content.replace(b"\x00", b"", 1)
    yield content.replace(b" ", b"  ", 1)
    i = content.index(b"\x00")
    for j in range(0, len(content), max(1, len(content) // 12)):
        yield content[:j] + bytes([content[j] ^ 0x41]) + content[j + 1:]
    yield content[:i] + b"\x00" + content[i + 1:][::-1]


def _flower_accepts(cls, content, children):
    try:
        validate_object_content(content)
        return ("ok", cls.inflate(content, children))
    except Exception as exc:  # noqa: BLE001
        return ("err", exc)


@needs_next
def test_hostile_mutations_rejected_like_flower():
    m = {"a": 1.0, "bb": [1, 2], "c": [2.5]}
    c = {"s": "x", "b": b"y", "t": True, "l": ["p", "q"]}
    cases = [(app.MetricRecord, fa.MetricRecord, fa.MetricRecord(m).deflate(), None),
             (app.ConfigRecord, fa.ConfigRecord, fa.ConfigRecord(c).deflate(), None)]
    for ours, theirs, content, children in cases:
        for bad in _mutations(content):
            t = _flower_accepts(theirs, bad, children)
            try:
                o = ("ok", ours.inflate(bad, children))
            except (ValueError, TypeError) as exc:
                o = ("err", exc)
            if t[0] == "ok":
                assert o[0] == "ok", (bad, o)
                _same_values(o[1], t[1])
            else:
                assert o[0] == "err", (bad, t)


@needs_next
@given(st.binary(max_size=48))
@settings(max_examples=400)
def test_random_bodies_like_flower(body):
    for name, ours, theirs in (("MetricRecord", app.MetricRecord, fa.MetricRecord),
                               ("ConfigRecord", app.ConfigRecord, fa.ConfigRecord)):
        content = b"%s  %d\x00" % (name.encode(), len(body)) + body
        t = _flower_accepts(theirs, content, None)
        try:
            o = ("ok", ours.inflate(content))
        except (ValueError, TypeError) as exc:
            o = ("err", exc)
        if t[0] == "ok":
            assert o[0] == "ok", (content, o)
            _same_values(o[1], t[1])
        else:
            assert o[0] == "err", (content, t)


@needs_next
@given(st.text(alphabet="0123456789abcdefABCDEF, x_+-\t", max_size=140), st.text(max_size=4))
@settings(max_examples=300)
def test_header_checks_like_flower(children, length):
    content = f"ArrayChunk {children} {length}".encode() + b"\x00ab"
    t = _flower_accepts(FArrayChunk, content, None)
    o = _outcome(app.ArrayChunk.inflate, content)
    assert (o[0] == "ok") == (t[0] == "ok"), (content, o, t)
    if o[0] != "ok":
        assert issubclass(o[0], ValueError)


@needs_next
def test_interop_round_trip_with_flower_app():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    rd = app.RecordDict({"p": app.ArrayRecord({"w": app.Array(x)}),
                         "m": app.MetricRecord({"acc": 0.9, "l": [1, 2]}),
                         "c": app.ConfigRecord({"s": "x", "b": b"\x00", "f": [True]})})
    f = fastrec.to_flwr(rd)
    assert type(f) is fa.RecordDict and type(f["p"]["w"]) is fa.Array
    assert f.deflate() == rd.deflate()
    back = fastrec.from_flwr(f)
    assert type(back) is app.RecordDict and back.deflate() == rd.deflate()
    assert type(fastrec.from_flwr(fa.Array(x))) is app.Array
    with pytest.raises(TypeError, match="fastrec.app"):
        fastrec.to_flwr(fastrec.MetricsRecord({"a": 1}))
    with pytest.raises(TypeError, match="flwr.app"):
        fastrec.from_flwr(object())


# ---------------------------------------------------------------------------
# fastrec.wire.metrics_columns on Flower's own MetricRecord objects
# ---------------------------------------------------------------------------

COLUMNS = {"acc": fastrec.TensorSpec("float32"), "n": fastrec.TensorSpec("int64"),
           "h": fastrec.TensorSpec("float64", (2,)),
           "p": [fastrec.TensorSpec("uint8"), fastrec.TensorSpec("int32")]}


def _cell(x, dtype):
    """One metric value (or list element) in a column of ``dtype``; ValueError if it cannot be."""
    if isinstance(x, list) or (dtype.kind in "iu" and not isinstance(x, int)):
        raise ValueError(f"{x!r} is not a {dtype} number")
    if dtype.kind in "iu" and not np.iinfo(dtype).min <= x <= np.iinfo(dtype).max:
        raise ValueError(f"{x!r} is outside {dtype}")
    return x if dtype.kind in "iu" else float(x)


def _flower_columns(contents):
    """Flower's route: validate and inflate each object (a MetricRecord has no children), then
    read the COLUMNS metrics with numpy."""
    rows = []
    for content in contents:
        validate_object_content(content)
        if get_object_children_ids_from_object_content(content):
            raise ValueError("`MetricRecord` objects do not have children.")
        rec = fa.MetricRecord.inflate(content)
        h, p = rec["h"], rec["p"]
        if not (isinstance(h, list) and len(h) == 2 and isinstance(p, list) and len(p) == 2):
            raise ValueError("a list of the wrong kind or length")
        rows.append((_cell(rec["acc"], np.dtype(np.float32)), _cell(rec["n"], np.dtype(np.int64)),
                     [_cell(x, np.dtype(np.float64)) for x in h],
                     _cell(p[0], np.dtype(np.uint8)), _cell(p[1], np.dtype(np.int32))))
    acc, n, h, p0, p1 = zip(*rows) if rows else ([], [], np.empty((0, 2)), [], [])
    return {"acc": np.array(acc, dtype=np.float64).astype(np.float32),
            "n": np.array(n, dtype=np.int64), "h": np.array(h, dtype=np.float64),
            "p": [np.array(p0, dtype=np.uint8), np.array(p1, dtype=np.int32)]}


def _same_columns(got, want):
    assert got.keys() == want.keys()
    for k in want:
        pairs = zip(got[k], want[k]) if isinstance(want[k], list) else [(got[k], want[k])]
        for g, w in pairs:
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(g, w)


def _check_like_flower(contents):
    from fastrec.wire import metrics_columns
    try:
        want = _flower_columns(contents)
    except Exception as exc:  # noqa: BLE001 - any refusal of Flower's route
        with pytest.raises(ValueError, match=r"^buffer \d+[:,]"):
            metrics_columns(contents, None, COLUMNS, wire="metric-record-object")
        return exc
    _same_columns(metrics_columns(contents, None, COLUMNS, wire="metric-record-object"), want)
    return None


small = st.integers(0, 255)
column_vals = {"acc": st.one_of(finite, ints), "n": st.integers(-(2**63), 2**63 - 1),
               "h": st.lists(finite, min_size=2, max_size=2),
               "p": st.lists(small, min_size=2, max_size=2)}


@needs_next
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # float32
@given(st.lists(st.fixed_dictionaries(column_vals, optional={"x": metric_vals, "": metric_vals}),
                max_size=6))
@settings(max_examples=150, derandomize=True)
def test_metrics_columns_on_flower_objects(records):
    contents = [fa.MetricRecord(d).deflate() for d in records]
    assert contents == [app.MetricRecord(d).deflate() for d in records]
    assert _check_like_flower(contents) is None


@needs_next
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@given(st.fixed_dictionaries(column_vals), st.sampled_from(sorted(column_vals)), metric_vals)
@settings(max_examples=150, derandomize=True)
def test_metrics_columns_refuse_what_flower_cannot_read(d, name, value):
    d[name] = value  # often of the wrong kind, length or range for its column
    content = fa.MetricRecord(d).deflate()
    _check_like_flower([fa.MetricRecord({"acc": 1.0, "n": 2, "h": [1.0, 2.0],
                                         "p": [3, 4]}).deflate(), content])
    for bad in _mutations(content):
        _check_like_flower([bad])
