"""fastrec.wire against Flower 1.15.2's serde + protobuf, in both directions.

Flower is imported by the tests that compare with it (skipped without flwr 1.15); the rest,
the object wire among them, run without Flower.
"""

from __future__ import annotations

import copy
import gc
import math
import pickle
import random
import struct
import weakref

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from _optional import OptionalModule

import fastrec
from fastrec import (Array, ConfigsRecord, MetricsRecord, ParametersRecord, RecordSet,
                     from_flwr, to_flwr, wire)

_PROTOS_115 = "needs flwr 1.15's protos (flwr >= 1.19 renamed them; its tests: test_app.py)"
recordset_pb2 = OptionalModule("flwr.proto.recordset_pb2", _PROTOS_115)


class _Flower115(OptionalModule):
    """A module of Flower 1.15: the test skips without flwr, or with flwr >= 1.19's layout."""

    def __getattr__(self, attr):
        if not attr.startswith("__"):
            recordset_pb2.Array
        return super().__getattr__(attr)


fc = _Flower115("flwr.common")
serde = _Flower115("flwr.common.serde")
message_pb2 = _Flower115("flwr.proto.message_pb2")

HYP = settings(max_examples=150)

# ---------------------------------------------------------------- strategies

ints = st.one_of(st.integers(-2**63, 2**63 - 1), st.integers(-2**70, 2**70),
                 st.sampled_from([0, -1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63, -2**63 - 1]))
floats = st.floats(allow_nan=True, allow_infinity=True)
keys = st.text(max_size=6)
metrics_value = st.one_of(
    ints, floats, st.lists(ints, max_size=4), st.lists(floats, max_size=4),
    st.lists(st.integers(0, 3), max_size=3).map(lambda xs: [1] + xs + [True]),  # [1, .., True] is valid
)
configs_value = st.one_of(
    metrics_value, st.booleans(), st.text(max_size=5), st.binary(max_size=5),
    st.lists(st.booleans(), max_size=3), st.lists(st.text(max_size=3), max_size=3),
    st.lists(st.binary(max_size=3), max_size=3),
)
metrics_records = st.dictionaries(keys, metrics_value, max_size=4).map(MetricsRecord)
configs_records = st.dictionaries(keys, configs_value, max_size=4).map(ConfigsRecord)


@st.composite
def arrays(draw):
    kind = draw(st.sampled_from(["npy", "raw"]))
    if kind == "npy":
        shape = draw(st.lists(st.integers(0, 3), max_size=3))  # [] is 0-d
        dt = draw(st.sampled_from(["float32", "int64", "uint8", "bool"]))
        return fastrec.array_from_numpy(np.zeros(shape, dtype=dt))
    shape = draw(st.lists(st.integers(-2**31, 2**31 - 1), max_size=3))
    return Array(draw(st.text(max_size=4)), shape, draw(st.text(max_size=4)),
                 draw(st.binary(max_size=8)))


parameters_records = st.dictionaries(keys, arrays(), max_size=3).map(
    lambda d: ParametersRecord(d, keep_input=True))
recordsets = st.builds(
    RecordSet,
    parameters_records=st.dictionaries(keys, parameters_records, max_size=2),
    metrics_records=st.dictionaries(keys, metrics_records, max_size=2),
    configs_records=st.dictionaries(keys, configs_records, max_size=2),
)

# ---------------------------------------------------------------- Flower's side

_PROTO_NAMES = {
    "array": ("Array", "array"), "parameters": ("ParametersRecord", "parameters_record"),
    "metrics": ("MetricsRecord", "metrics_record"), "configs": ("ConfigsRecord", "configs_record"),
    "recordset": ("RecordSet", "recordset"),
}


def _proto(kind):
    """(protobuf message class, serde's X_to_proto, X_from_proto) of Flower 1.15 for kind."""
    cls, fn = _PROTO_NAMES[kind]
    return (getattr(recordset_pb2, cls), getattr(serde, f"{fn}_to_proto"),
            getattr(serde, f"{fn}_from_proto"))


OURS = {
    "array": (wire.array_to_bytes, wire.array_from_bytes),
    "parameters": (wire.parameters_record_to_bytes, wire.parameters_record_from_bytes),
    "metrics": (wire.metrics_record_to_bytes, wire.metrics_record_from_bytes),
    "configs": (wire.configs_record_to_bytes, wire.configs_record_from_bytes),
    "recordset": (wire.recordset_to_bytes, wire.recordset_from_bytes),
}


def flwr_to_bytes(kind, obj):
    return _proto(kind)[1](to_flwr(obj)).SerializeToString(deterministic=True)


def flwr_from_bytes(kind, data):
    cls, _, from_proto = _proto(kind)
    msg = cls()
    msg.ParseFromString(bytes(data))
    return from_flwr(from_proto(msg))


def outcome(fn, *args):
    try:
        return True, fn(*args)
    except Exception as e:  # noqa: BLE001 - the outcome is what is compared
        return False, e


def norm(x):
    """A comparable form: floats by their bits (NaN == NaN), records by sorted items."""
    if isinstance(x, bool):
        return ("b", x)
    if isinstance(x, float):
        return ("f", struct.pack("<d", x))
    if isinstance(x, int):
        return ("i", x)
    if isinstance(x, (str, bytes)):
        return (type(x).__name__, x)
    if isinstance(x, list):
        return ("l", tuple(norm(v) for v in x))
    if isinstance(x, Array):
        return ("A", x.dtype, tuple(x.shape), x.stype, x.data)
    if isinstance(x, RecordSet):
        return ("RS", norm(x.parameters_records), norm(x.metrics_records),
                norm(x.configs_records))
    if hasattr(x, "items"):
        return (type(x).__name__, tuple(sorted((k, norm(v)) for k, v in x.items())))
    raise TypeError(type(x))


def check_encode(kind, obj):
    ok_f, theirs = outcome(flwr_to_bytes, kind, obj)
    ok_o, ours = outcome(OURS[kind][0], obj)
    if ok_f:
        assert ok_o, ours
        assert ours == theirs
        return ours
    assert not ok_o, f"Flower refused ({theirs!r}), fastrec encoded {ours!r}"
    assert isinstance(ours, type(theirs)) or isinstance(ours, (ValueError, TypeError))
    return None


def check_decode(kind, data, *, allow_int32=True):
    ok_f, theirs = outcome(flwr_from_bytes, kind, data)
    ok_o, ours = outcome(OURS[kind][1], data)
    if ok_o:
        assert ok_f, f"fastrec accepted {bytes(data)!r}, Flower refused: {theirs!r}"
        assert type(ours) is type(theirs)
        assert norm(ours) == norm(theirs)
    elif ok_f:
        # The one documented difference: an int32 shape varint protobuf truncates.
        assert allow_int32 and "outside int32" in str(ours), (bytes(data), ours)
    else:
        assert isinstance(ours, ValueError), repr(ours)
        assert "byte" in str(ours) or "Either" in str(ours)
    return ok_o


# ---------------------------------------------------------------- canonical bytes


@HYP
@given(metrics_records)
def test_metrics_record_bytes_match_flower(rec):
    data = check_encode("metrics", rec)
    if data is not None:
        check_decode("metrics", data)


@HYP
@given(configs_records)
def test_configs_record_bytes_match_flower(rec):
    data = check_encode("configs", rec)
    if data is not None:
        check_decode("configs", data)


@HYP
@given(arrays())
def test_array_bytes_match_flower(a):
    data = check_encode("array", a)
    assert data is not None
    check_decode("array", data)
    back = wire.array_from_bytes(bytearray(data))  # any bytes-like input
    assert back == a


@HYP
@given(parameters_records)
def test_parameters_record_bytes_match_flower(rec):
    data = check_encode("parameters", rec)
    assert data is not None
    check_decode("parameters", data)


@settings(max_examples=80)
@given(recordsets)
def test_recordset_bytes_match_flower(rs):
    data = check_encode("recordset", rs)
    if data is not None:
        check_decode("recordset", data)
        assert wire.recordset_to_bytes(wire.recordset_from_bytes(data)) == data


@pytest.mark.parametrize("n", [1, 3, 63, 64, 65])
def test_small_scalar_records_encode_like_flower(n):
    """Records of exact scalars take a compiled fast path (up to 64 entries): its key
    order (prefix keys, non-ASCII), value kinds and fall-backs must give Flower's bytes."""
    keys = ["ab", "a", "abc", "b", "\u00e9", "\U0001F600", "", "a\x00"]
    keys += [f"k{i:03d}" for i in range(n)]
    keys = keys[:n]
    m_vals = [0.25, -3, 2**63 - 1, -(2**63), math.nan, 0.0, 7, 1e300]
    c_vals = [True, False, "s\u00e9", b"\x00b", 1.5, -1, "", b""]
    m = MetricsRecord({k: m_vals[i % len(m_vals)] for i, k in enumerate(keys)})
    c = ConfigsRecord({k: c_vals[i % len(c_vals)] for i, k in enumerate(keys)})
    assert check_encode("metrics", m) is not None
    assert check_encode("configs", c) is not None
    rs = RecordSet(metrics_records={k: m for k in keys[:5]}, configs_records={"c": c, "": c})
    assert check_encode("recordset", rs) is not None
    data = wire.message_to_bytes({"run_id": 1}, content=rs)
    assert norm(wire.message_from_bytes(data)[1]) == norm(rs)
    # values the fast path hands to the general one: decided exactly as before
    for odd in ({"big": 2**64 - 1}, {"l": [1.0, 2.0]}, {"u": [2**63, 1]}):
        assert check_encode("metrics", MetricsRecord(odd)) is not None


def test_decoded_keys_survive_the_key_cache():
    """Decoded keys come from a small cache of str objects: collisions, evictions and the
    length limit must never hand back another key."""
    keys = [f"k{i}" for i in range(2000)] + ["x" * n for n in (0, 1, 47, 48, 49, 200)]
    keys += ["\u00e9" * 24, "\U0001F600" * 12, "a\x00b"]
    rec = MetricsRecord({k: float(i) for i, k in enumerate(keys)})
    for _ in range(2):   # the second pass decodes against a warm cache
        back = wire.metrics_record_from_bytes(wire.metrics_record_to_bytes(rec))
        assert dict(back.items()) == dict(rec.items()) and len(back) == len(rec)
        assert all(type(k) is str for k in back)


def test_fast_path_refusals_match_general_path():
    rec = MetricsRecord({"a": 1.0})
    rec.__setstate__(({"\ud800": 1.0}, None, None, None, rec.__getstate__()[4]))
    with pytest.raises(ValueError):
        wire.metrics_record_to_bytes(rec)
    # a bool (which validation refuses) is encoded as the int it is, as before
    rec.__setstate__(({"a": True}, None, None, None, rec.__getstate__()[4]))
    assert wire.metrics_record_to_bytes(rec) == wire.metrics_record_to_bytes(
        MetricsRecord({"a": 1}))
    rec.__setstate__(({"a": object()}, None, None, None, rec.__getstate__()[4]))
    with pytest.raises(TypeError):
        wire.metrics_record_to_bytes(rec)
    rs = RecordSet(metrics_records={"m": rec})
    with pytest.raises(TypeError):
        wire.recordset_to_bytes(rs)


class _BytesSub(bytes):
    pass


_ARRAY_FIELDS = [dict(dtype=None), dict(dtype=b"f4"), dict(dtype=b"\xff"), dict(dtype=1),
                 dict(dtype="\ud800"), dict(shape=None), dict(shape=(1, 2)), dict(shape=[True]),
                 dict(shape=[np.int64(3)]), dict(shape=[1.0]), dict(shape="ab"), dict(shape=5),
                 dict(shape=[2**31]), dict(stype=None), dict(stype=b"s"), dict(data=None),
                 dict(data=_BytesSub(b"ab")), dict(data=bytearray(b"a")), dict(data="s"),
                 dict(dtype="\ud800", stype=1), dict(dtype=1, shape=[2**40]),
                 dict(shape=[2**40], data=5)]


@pytest.mark.parametrize("fields", _ARRAY_FIELDS, ids=repr)
def test_array_fields_encode_like_flower(fields):
    """Flower 1.15's Array is an unchecked dataclass and its serde ProtoArray(**vars(a)):
    None leaves a field unset, str fields take UTF-8 bytes, data a bytes subclass, and the
    fields are converted in order (the first bad one decides the exception)."""
    kw = dict(dtype="float32", shape=[1], stype="numpy.ndarray", data=b"abcd")
    kw.update(fields)
    a = Array(**kw)
    for kind, obj in (("array", a), ("parameters", ParametersRecord({"w": a}, keep_input=True))):
        ok, theirs = outcome(flwr_to_bytes, kind, obj)
        ok_o, ours = outcome(OURS[kind][0], obj)
        if ok:
            assert ok_o and ours == theirs, ours
        else:
            assert not ok_o and type(ours) is type(theirs), (theirs, ours)


class _NoisyBytes(bytes):
    def __bytes__(self):  # protobuf reads the buffer, never this
        return b"other"


class _PretendsBytes:
    __class__ = bytes  # passes the records' isinstance checks; protobuf refuses it


def test_bytes_values_encode_their_buffer_like_flower():
    for value in (_NoisyBytes(b"abc"), [b"x", _NoisyBytes(b"abc")]):
        assert check_encode("configs", ConfigsRecord({"k": value})) is not None
    for value in (_PretendsBytes(), [_PretendsBytes()]):
        rec = ConfigsRecord({"k": value})
        assert check_encode("configs", rec) is None
        with pytest.raises(TypeError):
            wire.configs_record_to_bytes(rec)


def test_unencodable_str_raises_unicode_encode_error_like_flower():
    # protobuf's string setter raises UnicodeEncodeError (a ValueError) for a lone surrogate
    for kind, rec in (("metrics", MetricsRecord({"\ud800": 1.0})),
                      ("metrics", MetricsRecord({"\ud800": [1.0]})),
                      ("configs", ConfigsRecord({"k": "\udc80"})),
                      ("configs", ConfigsRecord({"k": ["a", "\udc80"]}))):
        ok, theirs = outcome(flwr_to_bytes, kind, rec)
        assert not ok and type(theirs) is UnicodeEncodeError
        with pytest.raises(UnicodeEncodeError):
            OURS[kind][0](rec)
    with pytest.raises(UnicodeEncodeError):
        wire.message_to_bytes(dict(METADATA, message_id="\ud800"), RecordSet())


def test_first_error_is_flowers_when_several_values_fail():
    """Flower's serde converts a record's values (in its order), then protobuf its keys,
    record by record, group by group, the record names last: that order decides which
    exception a record with several unencodable entries raises."""
    big, sur = 2**64, "\ud800"
    cases = [
        ("metrics", MetricsRecord({sur: big, "c": 1.0})),                  # value before key
        ("configs", ConfigsRecord({"b": big, "a": sur})),                  # record order, not sorted
        ("configs", ConfigsRecord({"a": _PretendsBytes(), "b": big})),
        ("configs", ConfigsRecord({"b": big, "a": _PretendsBytes()})),
        ("parameters", ParametersRecord({sur: Array(1, [1], "s", b"")}, keep_input=True)),
        ("recordset", RecordSet(metrics_records={sur: MetricsRecord({"a": 1.0})},
                                configs_records={"c": ConfigsRecord({"k": big})})),
        ("recordset", RecordSet(parameters_records={"p": ParametersRecord(
            {"w": Array("f", [2**40], "s", b"")}, keep_input=True)},
                                configs_records={"c": ConfigsRecord({"k": _PretendsBytes()})})),
        ("recordset", RecordSet(metrics_records={"z": MetricsRecord({"k": big})},
                                configs_records={"a": ConfigsRecord({"k": _PretendsBytes()})})),
    ]
    for kind, obj in cases:
        ok, theirs = outcome(flwr_to_bytes, kind, obj)
        assert not ok
        with pytest.raises(Exception) as ours:
            OURS[kind][0](obj)
        assert type(ours.value) is type(theirs), (obj, theirs, ours.value)
        if kind == "recordset":
            with pytest.raises(type(theirs)) as ours:
                wire.message_to_bytes({"run_id": 1}, obj)
            assert type(ours.value) is type(theirs)


def test_list_values_mutated_while_encoding_never_crash():
    """A list value's elements may run Python code while they are converted (``__float__``,
    a ``__class__`` property): the encoder reads a snapshot of the list, so a hook that
    empties it neither reads past its end nor frees what is being written."""
    lst, armed = [], [False]

    class Hook:
        __class__ = float   # valid in a MetricsRecord list (Flower's isinstance rule)

        def __float__(self):
            if armed[0]:
                del lst[:]
            return 1.5

    lst.extend(Hook() for _ in range(3))
    rec = MetricsRecord({"a": lst})
    armed[0] = True
    assert wire.metrics_record_to_bytes(rec) == wire.metrics_record_to_bytes(
        MetricsRecord({"a": [1.5, 1.5, 1.5]}))

    chunks = [bytes([65 + i]) * 100_000 for i in range(4)]
    blobs, armed[0] = list(chunks), False

    class Key(str):
        @property
        def __class__(self):  # runs while the record after "a" is converted
            if armed[0]:
                blobs.clear()
                globals()["_junk"] = [b"\xee" * 100_000 for _ in range(8)]
            return str

    rec = ConfigsRecord({"a": blobs, "b": Key("x")})
    armed[0] = True
    out = wire.configs_record_to_bytes(rec)
    globals().pop("_junk", None)
    assert out == wire.configs_record_to_bytes(ConfigsRecord({"a": chunks, "b": "x"}))
    for to_bytes in (wire.recordset_to_bytes,
                     lambda rs: wire.message_to_bytes({"run_id": 1}, rs)):
        blobs[:], armed[0] = chunks, False
        rs = RecordSet(configs_records={"c": ConfigsRecord({"a": blobs}),
                                        "d": ConfigsRecord({"b": Key("x")})})
        armed[0] = True
        back = wire.recordset_from_bytes(to_bytes(rs)) if to_bytes is wire.recordset_to_bytes \
            else wire.message_from_bytes(to_bytes(rs))[1]
        assert back.configs_records["c"]["a"] == chunks


class _PretendsFloat:
    """Passes isinstance(x, float) (via __class__); its __float__ clears the list it is in."""

    def __init__(self, lst):
        self.lst = lst

    @property
    def __class__(self):
        return float

    def __float__(self):
        self.lst.clear()
        return 2.0


class _PretendsInt(_PretendsFloat):
    @property
    def __class__(self):
        return int

    def __index__(self):
        self.lst.clear()
        return 2


class _ClearingBytes(bytes):
    def __bytes__(self):
        self.lst.clear()
        return b"z"


def test_list_value_mutated_while_encoding():
    """Converting a list element runs Python code that may shrink the list (or free the
    elements another one's bytes were taken from): the encoder works on a snapshot, where
    it once read past the list's end (a crash)."""
    lst = [1.0]
    lst += [_PretendsFloat(lst)] + [1.0] * 300
    data = wire.metrics_record_to_bytes(MetricsRecord({"x": lst}))
    assert wire.metrics_record_from_bytes(data)["x"] == [1.0, 2.0] + [1.0] * 300
    lst = [1]
    lst += [_PretendsInt(lst)] + [1] * 300
    data = wire.metrics_record_to_bytes(MetricsRecord({"x": lst}))
    assert wire.metrics_record_from_bytes(data)["x"] == [1, 2] + [1] * 300
    lst = []
    for i in range(300):
        b = _ClearingBytes(b"b%d" % i)
        b.lst = lst
        lst.append(b)
    strs = [("s%d" % i) * 3 for i in range(300)]   # freed if the bytes list clears it
    clear_strs = _ClearingBytes(b"y")
    clear_strs.lst = strs
    rs = RecordSet(configs_records={"c": ConfigsRecord({"a": strs, "b": [clear_strs], "c": lst})})
    back = wire.recordset_from_bytes(wire.recordset_to_bytes(rs)).configs_records["c"]
    assert back["a"] == [("s%d" % i) * 3 for i in range(300)]
    # protobuf writes a bytes subclass's own buffer, so __bytes__ (and its clearing) never runs
    assert back["b"] == [b"y"] and back["c"] == [b"b%d" % i for i in range(300)]
    assert len(strs) == 300 and len(lst) == 300


def test_value_kinds_and_edge_cases():
    rec = MetricsRecord({"big": 2**64 - 1, "neg": -5, "nan": math.nan, "inf": -math.inf,
                         "e": [], "u": [1, 2**63], "s": [-1, 2], "mix": [1, True], "": 0.0,
                         "ключ": 1.5})
    data = check_encode("metrics", rec)
    back = wire.metrics_record_from_bytes(data)
    assert type(back) is MetricsRecord
    assert back["big"] == 2**64 - 1 and back["u"] == [1, 2**63] and back["mix"] == [1, 1]
    assert back["e"] == [] and math.isnan(back["nan"])
    cfg = ConfigsRecord({"t": True, "f": False, "e": [], "s": "ü", "b": b"", "bl": [True],
                         "sl": ["a", ""], "by": [b"\x00"], "i": 3, "x": 0.0})
    data = check_encode("configs", cfg)
    back = wire.configs_record_from_bytes(data)
    assert back == cfg and back["e"] == [] and type(back["t"]) is bool
    for bad in (2**64, -2**63 - 1, [2**64], [-1, 2**63]):
        with pytest.raises(ValueError):
            wire.metrics_record_to_bytes(MetricsRecord({"k": bad}))
    with pytest.raises(ValueError):
        wire.metrics_record_to_bytes(MetricsRecord({"\udc80": 1}))
    with pytest.raises(ValueError):
        wire.array_to_bytes(Array("f", [2**31], "s", b""))
    with pytest.raises(TypeError):
        wire.array_to_bytes(Array("f", [1], "s", bytearray(b"x")))


# ---------------------------------------------------------------- reading


def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _long_varint(n, width):
    """n as an overlong varint of exactly `width` bytes (zero groups padded on)."""
    return bytes(((n >> (7 * i)) & 0x7F) | (0x80 if i < width - 1 else 0) for i in range(width))


def _field(num, wt, payload=b""):
    tag = _varint(num << 3 | wt)
    if wt == 2:
        return tag + _varint(len(payload)) + payload
    return tag + payload


def _entry(key: bytes, value: bytes):
    return _field(1, 2, _field(1, 2, key) + _field(2, 2, value))


READING_CASES = [
    # packed and unpacked doubles in one list, plus an unknown field
    ("metrics", _entry(b"a", _field(21, 2, _field(1, 1, struct.pack("<d", 1.0))
                                    + _field(1, 2, struct.pack("<dd", 2.0, 3.0))
                                    + _field(9, 0, b"\x05")))),
    # last oneof member wins; a list after a scalar starts fresh
    ("metrics", _entry(b"a", _field(1, 1, struct.pack("<d", 1.0)) + _field(2, 0, b"\x04"))),
    ("metrics", _entry(b"a", _field(22, 2, _field(1, 0, b"\x02")) + _field(1, 1, b"\0" * 8)
                       + _field(22, 2, _field(1, 0, b"\x04")))),
    # a value occurring twice in one entry is merged (lists concatenate)
    ("metrics", _field(1, 2, _field(2, 2, _field(21, 2, _field(1, 1, b"\0" * 8)))
                       + _field(1, 2, b"k")
                       + _field(2, 2, _field(21, 2, _field(1, 1, b"\0" * 8))))),
    # the same key twice: the last entry wins
    ("metrics", _entry(b"k", _field(2, 0, b"\x02")) + _entry(b"k", _field(2, 0, b"\x06"))),
    # a known field with another wire type is skipped as unknown
    ("metrics", _entry(b"k", _field(1, 0, b"\x01") + _field(2, 0, b"\x02"))),
    ("metrics", _entry(b"k", _field(1, 0, b"\x01"))),          # entry with unknown: dropped
    ("metrics", _entry(b"k", _field(2, 0, b"\x02")) + _field(1, 2, _field(1, 2, b"k")
                                                          + _field(3, 0, b"\x00"))),
    ("recordset", _field(3, 2, _field(1, 2, b"c") + _field(7, 5, b"\0" * 4))),
    ("metrics", _field(1, 2, _field(2, 2, b""))),              # -> empty oneof
    ("metrics", _field(1, 2, _field(2, 2, b"")) + _entry(b"", _field(2, 0, b"\x02"))),  # replaced
    ("metrics", _entry(b"", _field(2, 0, b"\x02")) + _field(1, 2, _field(2, 2, b""))),
    ("recordset", _field(2, 2, _field(2, 2, _field(1, 2, _field(2, 2, b""))))
     + _field(2, 2, _field(2, 2, b""))),                      # the record is replaced too
    ("metrics", _field(1, 2, _field(1, 2, b"k"))),             # entry without a value
    ("metrics", _entry(b"k", _field(4, 0, b"\x01"))),          # configs member in metrics
    ("configs", _entry(b"k", _field(4, 0, b"\x80\x01"))),      # bool from a 2-byte varint
    ("configs", _entry(b"k", _field(5, 2, b"\xff"))),          # invalid UTF-8
    ("configs", _entry(b"\xed\xa0\x80", _field(5, 2, b"x"))),  # surrogate in a key
    ("configs", _entry(b"k", _field(25, 2, _field(1, 2, b"\xc0\x80")))),  # overlong
    ("metrics", _entry(b"k", _field(21, 2, _field(1, 2, b"\0" * 7)))),  # packed, bad length
    ("metrics", b"\x0a\x05\x0a\x01"),                          # length past the end
    ("metrics", b"\x0a"),                                      # truncated
    ("metrics", b"\x0e"),                                      # wire type 6
    ("metrics", b"\x0f"),                                      # wire type 7
    ("metrics", b"\x00"),                                      # field number 0
    ("metrics", b"\x1b\x1c"),                                  # empty unknown group
    ("metrics", b"\x1b\x24"),                                  # mismatched end group
    ("metrics", b"\x1c"),                                      # stray end group
    ("metrics", b"\x18" + b"\xff" * 9 + b"\x7f"),              # 10-byte varint, high bits
    ("metrics", b"\x18" + b"\xff" * 10 + b"\x01"),             # 11-byte varint
    # lengths are any varint with a value below 2^31 (upb; tags stop at 5 bytes)
    ("metrics", b"\x0a" + _long_varint(11, 6) + _field(1, 2, b"a") + _field(2, 2, _field(1, 1, b"\0" * 8))),
    ("metrics", _entry(b"a", b"\x0a" + _long_varint(8, 10) + b"\0" * 8)),  # a value's string
    ("metrics", b"\x3a" + _long_varint(0, 10)),                # unknown field, 10-byte length
    ("metrics", b"\x3a" + _long_varint(0, 11)),                # 11 bytes: malformed
    ("metrics", b"\x3a" + _long_varint(2**31 - 1, 10)),        # not below 2^31
    ("metrics", _long_varint(1 << 3 | 2, 6) + b"\x00"),        # 6-byte tag: malformed
    ("metrics", b"\xfa\xff\xff\xff\x0f\x00"),                   # large field number
    ("metrics", b"\xfa\xff\xff\xff\x1f\x00"),                   # tag beyond 32 bits
    ("array", _field(2, 0, _varint(2**64 - 1)) + _field(2, 2, _varint(3) + _varint(2**64 - 5))),
    ("array", _field(2, 0, _varint(2**31))),                   # outside int32
    ("array", _field(1, 2, b"f4") + _field(1, 2, b"<f8") + _field(4, 2, b"xy")),
    ("parameters", _field(1, 2, b"a") + _field(1, 2, b"b") + _field(2, 2, b"")),  # zip
    ("parameters", _field(1, 2, b"a") + _field(1, 2, b"a") + _field(2, 2, _field(1, 2, b"x"))
     + _field(2, 2, _field(1, 2, b"y"))),
    ("recordset", _field(2, 2, _field(1, 2, b"m"))),           # record entry without a value
    ("recordset", _field(2, 2, _field(2, 2, _entry(b"a", _field(1, 1, b"\0" * 8))))
     + _field(2, 2, _field(2, 2, _entry(b"b", _field(1, 1, b"\0" * 8))))),
    ("recordset", _field(2, 2, _field(2, 2, _entry(b"a", _field(1, 1, b"\0" * 8)))
                         + _field(2, 2, _entry(b"b", _field(1, 1, b"\0" * 8))))),
]


@pytest.mark.parametrize("kind,data", READING_CASES)
def test_reading_agrees_with_protobuf(kind, data):
    check_decode(kind, data)


def test_errors_name_the_offset():
    with pytest.raises(ValueError, match=r"at byte 3: length past the end"):
        wire.metrics_record_from_bytes(b"\x0a\x03\x0a\x05ab")
    with pytest.raises(ValueError, match="outside int32"):
        wire.array_from_bytes(_field(2, 0, _varint(2**31)))
    with pytest.raises(TypeError):
        wire.recordset_from_bytes("not bytes")


def _nested_groups(k):
    return b"\x1b" * k + b"\x1c" * k


@pytest.mark.parametrize("k", [94, 95, 96, 100])
def test_depth_limit_matches_protobuf(k):
    value = _field(21, 2, _nested_groups(k))
    data = _field(2, 2, _field(1, 2, b"m") + _field(2, 2, _entry(b"a", value)))
    check_decode("recordset", data)
    check_decode("metrics", _nested_groups(k + 4))
    check_decode("array", _nested_groups(k + 6))


def _mutations(data: bytes, rng: random.Random):
    for _ in range(40):
        b = bytearray(data)
        op = rng.randrange(6)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 2:
            b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
        elif op == 3 and b:
            del b[rng.randrange(len(b))]
        elif op == 4:
            b = b[:rng.randrange(len(b) + 1)]
        else:
            i, j = sorted(rng.randrange(len(b) + 1) for _ in range(2))
            b[j:j] = b[i:j]
        yield bytes(b)


@settings(max_examples=60)
@given(recordsets, st.randoms(use_true_random=False))
def test_mutation_fuzz_recordset(rs, rng):
    data = check_encode("recordset", rs)
    if data is None:
        return
    for m in _mutations(data, rng):
        check_decode("recordset", m)


@settings(max_examples=60)
@given(st.sampled_from(["metrics", "configs", "array", "parameters"]),
       st.data(), st.randoms(use_true_random=False))
def test_mutation_fuzz_records(kind, data, rng):
    strat = {"metrics": metrics_records, "configs": configs_records, "array": arrays(),
             "parameters": parameters_records}[kind]
    enc = check_encode(kind, data.draw(strat))
    if enc is None:
        return
    for m in _mutations(enc, rng):
        check_decode(kind, m)


# ---------------------------------------------------- decoded RecordSets and the cyclic GC

_SEALED = RecordSet(
    parameters_records={"p": ParametersRecord({"w": fastrec.array_from_numpy(np.ones(2))})},
    metrics_records={"m": MetricsRecord({"acc": 0.5, "hist": [1, 2]})},
    configs_records={"c": ConfigsRecord({"name": "x", "flags": [True]})})


_RECORD_TYPES = (ParametersRecord, MetricsRecord, ConfigsRecord)


def _internals(rs):
    """The group dicts and records of rs, read without unsealing it."""
    groups = [d for d in gc.get_referents(rs) if type(d) is dict and d
              and all(type(rec) in _RECORD_TYPES for rec in d.values())]
    return groups + [rec for d in groups for rec in d.values()]


def _reach_in(how, rs):
    """Python code reaching inside rs, in each way it can; returns a mutable inner list."""
    if how == "view":
        return rs.metrics_records["m"]["hist"]
    if how == "getattr":
        return getattr(rs, "configs_records")["c"]["flags"]
    if how == "vars":
        vars(rs)["me"] = [rs]
        return vars(rs)["me"]
    if how == "setattr":
        rs.me = [rs]
        return rs.me
    if how == "eq":
        class Spy(MetricsRecord):
            def __eq__(self, other):
                seen.append(other)
                return NotImplemented
        seen = []
        other = RecordSet(parameters_records=dict(_SEALED.parameters_records),
                          metrics_records={"m": Spy({"acc": 0.5, "hist": [1, 2]})})
        rs == other  # noqa: B015
        return seen[0]["hist"]
    if how == "copy":
        return copy.copy(rs).metrics_records["m"]["hist"]
    raise AssertionError(how)


def test_decoded_recordset_starts_outside_the_collector():
    data = wire.recordset_to_bytes(_SEALED)
    rs = wire.recordset_from_bytes(data)
    assert not gc.is_tracked(rs)
    # parameters records stay tracked; the metrics/configs groups and records do not
    sealed = [o for o in _internals(rs)
              if type(o) is not ParametersRecord and not (type(o) is dict and "p" in o)]
    assert len(sealed) == 4 and not any(gc.is_tracked(o) for o in sealed)
    # reading it whole leaves it sealed, and reads it right
    assert wire.recordset_to_bytes(rs) == data
    unsealed = wire.recordset_from_bytes(data)
    unsealed.metrics_records  # noqa: B018
    assert repr(rs) == repr(unsealed)
    assert not gc.is_tracked(rs)
    assert rs == _SEALED and gc.is_tracked(rs)


@pytest.mark.parametrize("how", ["view", "getattr", "vars", "setattr", "eq", "copy"])
def test_reaching_into_a_decoded_recordset_puts_it_back_in_the_collector(how):
    """Whatever way Python code gets hold of a decoded RecordSet's insides, it is
    tracked again first, so a cycle made through them is collected."""
    rs = wire.recordset_from_bytes(wire.recordset_to_bytes(_SEALED))
    inner = _reach_in(how, rs)
    assert gc.is_tracked(rs)
    assert all(gc.is_tracked(o) for o in _internals(rs))
    inner.append(rs)   # a cycle through the decoded records
    ref = weakref.ref(rs)
    del rs, inner
    gc.collect()
    assert ref() is None


def test_sealed_recordsets_are_freed_and_pickled():
    data = wire.recordset_to_bytes(_SEALED)
    rs = wire.recordset_from_bytes(data)
    ref = weakref.ref(rs)
    del rs
    assert ref() is None   # refcounting alone frees it
    assert pickle.loads(pickle.dumps(wire.recordset_from_bytes(data))) == _SEALED
    _meta, content, _err = wire.message_from_bytes(wire.message_to_bytes(
        {"message_type": "evaluate"}, content=_SEALED))
    assert not gc.is_tracked(content)
    assert content.parameters_records["p"]["w"].numpy().tolist() == [1.0, 1.0]
    assert gc.is_tracked(content)


# ---------------------------------------------------------------- Message

METADATA = dict(run_id=7, message_id="m1", src_node_id=2**64 - 1, dst_node_id=0,
                reply_to_message="", group_id="g", ttl=-0.0, message_type="train",
                created_at=1234.5)


def flwr_message(metadata, content, error):
    md = fc.Metadata(**{k: v for k, v in metadata.items() if k != "created_at"})
    msg = fc.Message(md, content=None if content is None else to_flwr(content),
                     error=None if error is None else fc.Error(**error))
    msg.metadata.created_at = metadata["created_at"]
    return msg


def flwr_message_from_bytes(data):
    proto = message_pb2.Message()
    proto.ParseFromString(bytes(data))
    msg = serde.message_from_proto(proto)
    md = {k: getattr(msg.metadata, k) for k in METADATA}
    err = None if not msg.has_error() else {"code": msg.error.code, "reason": msg.error.reason}
    return md, (from_flwr(msg.content) if msg.has_content() else None), err


def check_message(data):
    ok_f, theirs = outcome(flwr_message_from_bytes, data)
    ok_o, ours = outcome(wire.message_from_bytes, data)
    assert ok_f == ok_o or (ok_f and "outside int32" in str(ours)), (data, theirs, ours)
    if ok_o:
        assert norm(ours[0]) == norm(theirs[0])
        assert (ours[1] is None) == (theirs[1] is None)
        if ours[1] is not None:
            assert norm(ours[1]) == norm(theirs[1])
        assert ours[2] == theirs[2]


@settings(max_examples=60)
@given(recordsets, st.booleans(), st.randoms(use_true_random=False))
def test_message_matches_flower(rs, as_error, rng):
    error = {"code": -3, "reason": "boom"} if as_error else None
    content = None if as_error else rs
    ok, theirs = outcome(lambda: serde.message_to_proto(
        flwr_message(METADATA, content, error)).SerializeToString(deterministic=True))
    ok_o, ours = outcome(wire.message_to_bytes, METADATA, content, error)
    assert ok == ok_o, (theirs, ours)
    if not ok:
        return
    assert ours == theirs
    md, back, err = wire.message_from_bytes(ours)
    assert norm(md) == norm(METADATA)
    assert err == error
    if not as_error:  # equal to the record read back (e.g. [1, True] reads as [1, 1])
        assert norm(back) == norm(wire.recordset_from_bytes(wire.recordset_to_bytes(rs)))
    check_message(ours)
    for m in _mutations(ours, rng):
        check_message(m)


class _Index:
    def __index__(self):
        return 5


class _Real:
    def __float__(self):
        return 2.5


_MD_ODD = [None, True, np.int64(3), np.uint64(2**64 - 1), np.float32(1.5), np.float64(2.5),
           np.bool_(True), _Index(), _Real(), 1.5, -1, 2**64, 2**1100, "s", b"b", b"\xff", "",
           "\ud800", bytearray(b"x"), 1j, [1]]


@pytest.mark.parametrize("field", ["run_id", "message_id", "src_node_id", "ttl", "created_at",
                                   "code", "reason"])
def test_message_field_values_like_flower(field):
    """Metadata and Error values are converted as protobuf's constructor converts them
    (None leaves a field unset, doubles take any real number, strings UTF-8 bytes too)."""
    import decimal
    for value in _MD_ODD + [decimal.Decimal("0.1")]:
        md, err = dict(METADATA), None
        if field in ("code", "reason"):
            err = {"code": -3, "reason": "boom", field: value}
        else:
            md[field] = value
        content = None if err else RecordSet()
        ok, theirs = outcome(lambda: serde.message_to_proto(
            flwr_message(md, content, err)).SerializeToString(deterministic=True))
        ok_o, ours = outcome(wire.message_to_bytes, md, content, err)
        if ok:
            assert ok_o and ours == theirs, (field, value, ours)
        else:
            assert not ok_o and type(ours) is type(theirs), (field, value, theirs, ours)


def test_message_content_xor_error():
    with pytest.raises(ValueError, match="Either"):
        wire.message_to_bytes(METADATA)
    with pytest.raises(ValueError, match="Either"):
        wire.message_to_bytes(METADATA, RecordSet(), {"code": 1, "reason": None})
    check_message(b"")                          # neither
    check_message(b"\x12\x00\x1a\x00")          # both
    md, rs, err = wire.message_from_bytes(b"\x12\x00")
    assert rs == RecordSet() and err is None and md["ttl"] == 0.0
    md, rs, err = wire.message_from_bytes(b"\x1a\x00")
    assert rs is None and err == {"code": 0, "reason": None}


def test_flower_message_carrying_fastrec_records():
    arr = fastrec.array_from_numpy(np.arange(4, dtype=np.float32))
    rs = fc.RecordSet(parameters_records={"p": fc.ParametersRecord({"w": to_flwr(arr)})},
                      metrics_records={"m": fc.MetricsRecord({"a": 1.0})})
    msg = fc.Message(fc.Metadata(1, "id", 2, 3, "", "g", 10.0, "train"), content=rs)
    data = serde.message_to_proto(msg).SerializeToString(deterministic=True)
    md, content, err = wire.message_from_bytes(data)
    assert md["message_type"] == "train" and err is None
    np.testing.assert_array_equal(content.parameters_records["p"]["w"].numpy(), np.arange(4.0))
    assert wire.message_to_bytes(md, content) == data


# ---------------------------------------------------------------- metrics_columns

from fastrec import TensorSpec  # noqa: E402

COL_SPEC = {"a": TensorSpec("float32"), "n": TensorSpec("int32"),
            "h": TensorSpec("float64", (2,)), "p": [TensorSpec("int64"), TensorSpec("float64")]}


def _reply(i, **extra):
    rec = {"a": float(i) / 3, "n": i - 2, "h": [float(i), 2.0], "p": [i, 2 * i]}
    rec.update(extra)
    params = ({"w": ParametersRecord({"x": Array("float32", [2], "numpy.ndarray", b"\x00" * 8)})}
              if i % 2 else None)
    return RecordSet(parameters_records=params,
                     metrics_records={"m": MetricsRecord(rec),
                                      "other": MetricsRecord({"a": "x" and 1.0})},
                     configs_records={"c": ConfigsRecord({"s": "y"})})


def _expected(recordsets, spec):
    out = {}
    for name, s in spec.items():
        vals = [rs.metrics_records["m"][name] for rs in recordsets]
        if isinstance(s, list):
            out[name] = [np.array([v[j] for v in vals], dtype=c.dtype) for j, c in enumerate(s)]
        else:
            out[name] = np.array(vals, dtype=s.dtype)
    return out


def _assert_batch_equal(got, want):
    assert got.keys() == want.keys()
    for k in want:
        g, w = got[k], want[k]
        if isinstance(w, (list, tuple)):
            assert type(g) is type(w) and len(g) == len(w)
            for a, b in zip(g, w):
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(a, b)
        else:
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("as_message", [False, True])
def test_metrics_columns_matches_per_record_route(as_message):
    rss = [_reply(i) for i in range(20)]
    if as_message:
        bufs = [wire.message_to_bytes({"run_id": 1}, rs) for rs in rss]
    else:
        bufs = [wire.recordset_to_bytes(rs) for rs in rss]
    bufs[3] = bytearray(bufs[3])
    got = wire.metrics_columns(bufs, "m", COL_SPEC, wire="message" if as_message else "recordset")
    _assert_batch_equal(got, _expected(rss, COL_SPEC))
    # tuple spec gives a tuple of columns; an empty batch gives empty columns
    got = wire.metrics_columns(bufs[:0], "m", {"p": (TensorSpec("int64"), TensorSpec("int64"))},
                               wire="message" if as_message else "recordset")
    assert isinstance(got["p"], tuple) and got["p"][0].shape == (0,)


def test_metrics_columns_feeds_next_columnar():
    from fastrec import FinalizeThenSampleFactory, vectorized
    spec = {"a": TensorSpec("float32"), "h": TensorSpec("float64", (2,))}
    fins = {"a": vectorized(lambda c: c), "h": vectorized(lambda c: c.sum(axis=1))}
    rss = [_reply(i) for i in range(12)]
    bufs = [wire.recordset_to_bytes(rs) for rs in rss]
    p = FinalizeThenSampleFactory(4, seed=3).create(fins, spec)
    col = p.next_columnar(p.initialize(), wire.metrics_columns(bufs, "m", spec))
    rows = p.next(p.initialize(), [{"a": np.float32(rs.metrics_records["m"]["a"]),
                                    "h": np.array(rs.metrics_records["m"]["h"])} for rs in rss])
    assert repr(col.result) == repr(rows.result) and col.measurements == rows.measurements


@pytest.mark.parametrize("bad,match", [
    (_reply(0, h=[1.0]), r"buffer 2, record 'm', metric 'h': list of the wrong length"),
    (_reply(0, n=2**40), r"buffer 2, record 'm', metric 'n': value outside"),
    (_reply(0, n=1.5), r"buffer 2, record 'm', metric 'n': value of the wrong kind"),
    (_reply(0, a=[1.0]), r"buffer 2, record 'm', metric 'a': value of the wrong kind"),
    (RecordSet(metrics_records={"m": MetricsRecord({"a": 1.0})}), r"buffer 2, record 'm': no metric"),
    (RecordSet(), r"buffer 2: no MetricsRecord 'm'"),
])
def test_metrics_columns_errors_name_buffer_record_metric(bad, match):
    bufs = [wire.recordset_to_bytes(_reply(i)) for i in range(2)] + [wire.recordset_to_bytes(bad)]
    with pytest.raises(ValueError, match=match):
        wire.metrics_columns(bufs, "m", COL_SPEC)


def test_metrics_columns_overlong_lengths_agree_with_the_decoder():
    """A length may be an overlong varint (6 to 10 bytes): the decoder reads it as protobuf
    does, and metrics_columns' layout-specific fast path must not disagree with it."""
    good = wire.recordset_to_bytes(_reply(1))
    assert good[1] < 0x80   # the first field's length: one byte, made overlong below
    for width in (2, 5, 6, 10):
        data = good[:1] + _long_varint(good[1], width) + good[2:]
        assert wire.recordset_from_bytes(data) == wire.recordset_from_bytes(good)
        got = wire.metrics_columns([data], "m", COL_SPEC)
        _assert_batch_equal(got, wire.metrics_columns([good], "m", COL_SPEC))
    data = good[:1] + _long_varint(good[1], 11) + good[2:]
    with pytest.raises(ValueError, match="varint longer than 10 bytes"):
        wire.recordset_from_bytes(data)
    with pytest.raises(ValueError, match="buffer 0: malformed RecordSet"):
        wire.metrics_columns([data], "m", COL_SPEC)


def test_metrics_columns_refuses_malformed_and_odd_specs():
    good = wire.recordset_to_bytes(_reply(1))
    with pytest.raises(ValueError, match=r"buffer 1: malformed RecordSet at byte"):
        wire.metrics_columns([good, good[:-1]], "m", COL_SPEC)
    with pytest.raises(ValueError, match="buffer 0: the message carries an error"):
        wire.metrics_columns([wire.message_to_bytes({}, error={"code": 1})], "m", COL_SPEC,
                             wire="message")
    for spec in ({"a": TensorSpec("float64", (None,))}, {"a": {"x": TensorSpec("float64")}},
                 {"a": TensorSpec("float64", (2, 2))}, [TensorSpec("float64")],
                 {"a": TensorSpec("float64", (0,))}):
        with pytest.raises(TypeError):
            wire.metrics_columns([good], "m", spec)
    # a nested mapping (which AggregationProcess accepts) cannot come from one metric value
    with pytest.raises(TypeError, match=r"metric 'a': a nested mapping spec .* a metric value "
                                        r"is a number or a list of numbers"):
        wire.metrics_columns([good], "m", {"a": {"x": TensorSpec("float64")}})
    with pytest.raises(ValueError):
        wire.metrics_columns([good], "m", COL_SPEC, wire="json")
    # a record name that is not UTF-8: refused before any scratch is taken (it leaked the
    # per-buffer arrays once, which .ci/sanitize's LeakSanitizer reports)
    with pytest.raises(UnicodeEncodeError):
        wire.metrics_columns([good] * 1000, "\ud800", COL_SPEC)


def test_metrics_columns_reads_the_spec_once():
    """The spec gives both the columns and the result's structure: a mapping whose items
    change from call to call must not make the second reading index past the columns."""
    from collections.abc import Mapping

    class Growing(Mapping):
        calls = 0

        def __getitem__(self, k):
            return TensorSpec("float64")

        def __len__(self):
            return 1

        def __iter__(self):
            return iter(["a"])

        def items(self):
            Growing.calls += 1
            extra = [(f"x{i}", [TensorSpec("float64")] * 3) for i in range(50 * Growing.calls)]
            return [("a", TensorSpec("float64"))] + (extra if Growing.calls > 1 else [])

    bufs = [wire.recordset_to_bytes(_reply(i)) for i in range(3)]
    got = wire.metrics_columns(bufs, "m", Growing())
    assert list(got) == ["a"] and Growing.calls == 1
    _assert_batch_equal(got, _expected([_reply(i) for i in range(3)], {"a": TensorSpec("float64")}))


@settings(max_examples=60)
@given(st.randoms(use_true_random=False), st.booleans())
def test_metrics_columns_fast_path_agrees_with_general_path(rng, as_message):
    # Mutated replies: the C fast path and the full decoder must agree row by row,
    # including the replacement rules (duplicate keys, dropped entries, empty oneofs).
    spec = {"a": TensorSpec("float64"), "h": TensorSpec("float64", (2,))}
    rs = _reply(rng.randrange(5))
    data = (wire.message_to_bytes({"run_id": 1}, rs) if as_message
            else wire.recordset_to_bytes(rs))
    kind = "message" if as_message else "recordset"
    for m in list(_mutations(data, rng)) + [data + data, data + data[:len(data) // 2]]:
        ok, got = outcome(lambda: wire.metrics_columns([m], "m", spec, wire=kind))
        try:
            full = (wire.message_from_bytes(m)[1] if as_message else wire.recordset_from_bytes(m))
            rec = full.metrics_records["m"]
            want = {"a": np.array([float(rec["a"])]), "h": np.array([rec["h"]], dtype=float)}
            assert np.array(rec["h"]).shape == (2,) and not isinstance(rec["a"], list)
        except Exception:  # noqa: BLE001 - any failure of the general route
            assert not ok and isinstance(got, ValueError), got
            continue
        assert ok, got
        _assert_batch_equal(got, want)


# ------------------------------------------- metrics_columns on Flower 1.42 MetricRecord objects

from fastrec import app as fapp  # noqa: E402

OBJ = "metric-record-object"
OBJ_SPEC = {"f32": TensorSpec("float32"), "f64": TensorSpec("float64"),
            "f16": TensorSpec("float16"), "i8": TensorSpec("int8"), "i32": TensorSpec("int32"),
            "i64": TensorSpec("int64"), "u8": TensorSpec("uint8"), "u64": TensorSpec("uint64"),
            "b": TensorSpec("bool"), "h": TensorSpec("float64", (2,)),
            "hi": TensorSpec("int64", (3,)), "p": [TensorSpec("int64"), TensorSpec("float32")],
            "t": (TensorSpec("uint8"), TensorSpec("int32")),
            "q": [TensorSpec("float64"), TensorSpec("float16")]}


class _Refused(Exception):
    """What the reference route refuses: the buffer, the metric (if a value is to blame) and
    the inflate error (if the object itself is)."""

    def __init__(self, index, metric=None, inflate_error=None):
        super().__init__(index, metric, inflate_error)
        self.index, self.metric, self.inflate_error = index, metric, inflate_error


def _element(x, dt):
    """``x`` as an element of a column of dtype ``dt``, or None if it does not fit."""
    if isinstance(x, list):
        return None
    if dt.kind in "iub":
        lo, hi = (0, 1) if dt.kind == "b" else (int(np.iinfo(dt).min), int(np.iinfo(dt).max))
        return x if isinstance(x, int) and lo <= x <= hi else None
    return float(x)


def _column(rows, dt, width=None):
    work = np.float64 if dt.kind == "f" else dt  # a float column is double, then the dtype
    if not rows:
        return np.empty((0,) if width is None else (0, width), dtype=work).astype(dt)
    return np.array(rows, dtype=work).astype(dt)


def _inflate_and_read(bufs, spec):
    """The reference: fastrec.app's MetricRecord.inflate of each buffer (which must list no
    children: a MetricRecord has none), then each metric read into numpy columns."""
    rows = {name: [] for name in spec}
    for i, buf in enumerate(bufs):
        content = bytes(buf)
        try:
            rec = fapp.MetricRecord.inflate(content)
        except ValueError as e:
            raise _Refused(i, inflate_error=str(e)) from None
        if content.split(b"\0", 1)[0].split(b" ")[1]:
            raise _Refused(i)
        for name, s in spec.items():
            if name not in rec:
                raise _Refused(i, name)
            v = rec[name]
            if isinstance(s, TensorSpec) and s.shape == ():
                row = _element(v, s.dtype)
            else:
                parts = [s] * s.shape[0] if isinstance(s, TensorSpec) else list(s)
                row = [_element(x, c.dtype) for x, c in zip(v, parts)] if (
                    isinstance(v, list) and len(v) == len(parts)) else [None]
                row = None if None in row else row
            if row is None:
                raise _Refused(i, name)
            rows[name].append(row)
    out = {}
    for name, s in spec.items():
        if isinstance(s, TensorSpec):
            out[name] = _column(rows[name], s.dtype, s.shape[0] if s.shape else None)
        else:
            cols = [_column([r[j] for r in rows[name]], c.dtype) for j, c in enumerate(s)]
            out[name] = type(s)(cols)
    return out


def _check_object_route(bufs, spec, offset=0):
    """metrics_columns(wire=OBJ) agrees with the reference: the same columns, or a
    ValueError naming the same buffer (shifted by ``offset``) and the same metric."""
    try:
        want = _inflate_and_read(bufs, spec)
    except _Refused as r:
        with pytest.raises(ValueError) as info:
            wire.metrics_columns(bufs, None, spec, wire=OBJ, buffer_offset=offset)
        msg = str(info.value)
        assert type(info.value) is ValueError
        assert msg.startswith(f"buffer {r.index + offset}: ") or msg.startswith(
            f"buffer {r.index + offset}, metric "), msg
        if r.inflate_error is not None:
            assert msg == f"buffer {r.index + offset}: {r.inflate_error}"
        if r.metric is not None:
            assert f"metric {r.metric!r}" in msg
        if r.metric is None and r.inflate_error is None:
            assert "do not have children" in msg
        return None
    got = wire.metrics_columns(bufs, None, spec, wire=OBJ, buffer_offset=offset)
    _assert_batch_equal(got, want)
    return got


_i64 = st.integers(-2**63, 2**63 - 1)
_u64 = st.integers(0, 2**64 - 1)
obj_value = st.one_of(
    _i64, _u64, floats, st.sampled_from([0, 1, -1, 255, 256, -129, 2**31, 2**63, 2**64 - 1]),
    st.lists(_i64, max_size=4), st.lists(_u64, max_size=4), st.lists(st.integers(0, 3), max_size=4),
    st.lists(floats, max_size=4))


def _fitting(s):
    """Values a spec's column takes (metrics_columns must accept them)."""
    def elem(c):
        if c.dtype.kind == "f":
            return st.one_of(floats, _i64, _u64)
        if c.dtype.kind == "b":
            return st.integers(0, 1)
        info = np.iinfo(c.dtype)
        return st.integers(int(info.min), int(info.max))
    if isinstance(s, TensorSpec) and s.shape == ():
        return elem(s)
    parts = [s] * s.shape[0] if isinstance(s, TensorSpec) else list(s)
    if all(c.dtype.kind == "f" for c in parts):
        return st.lists(floats, min_size=len(parts), max_size=len(parts))
    # one list holds ints of one sign class only (Flower refuses [-1, 2**63])
    lo = max(int(np.iinfo(c.dtype).min) if c.dtype.kind in "iu" else -2**63 for c in parts)
    hi = min(int(np.iinfo(c.dtype).max) if c.dtype.kind in "iu" else 2**63 - 1 for c in parts)
    return st.lists(st.integers(max(lo, -2**63), min(hi, 2**63 - 1)), min_size=len(parts),
                    max_size=len(parts))


_MISSING = object()


@st.composite
def object_batches(draw):
    names = draw(st.lists(st.sampled_from(sorted(OBJ_SPEC)), min_size=1, max_size=4,
                          unique=True))
    spec = {n: OBJ_SPEC[n] for n in names}
    bufs = []
    for _ in range(draw(st.integers(0, 4))):
        d = draw(st.dictionaries(keys, obj_value, max_size=3))
        for n in names:
            pick = draw(st.integers(0, 12))
            v = (_MISSING if pick == 0 else draw(obj_value) if pick == 1
                 else draw(_fitting(OBJ_SPEC[n])))
            if v is _MISSING:
                d.pop(n, None)
            else:
                d[n] = v
        try:
            rec = fapp.MetricRecord(d)
        except (TypeError, ValueError):
            continue  # not a MetricRecord (a list of mixed sign classes)
        content = rec.deflate()
        bufs.append(draw(st.sampled_from([bytes, bytearray, memoryview]))(content))
    return spec, bufs


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # float16
@settings(max_examples=300, derandomize=True)
@given(object_batches(), st.integers(0, 2))
def test_object_columns_match_the_inflate_route(batch, offset):
    spec, bufs = batch
    _check_object_route(bufs, spec, offset)


def _obj(body, name=b"MetricRecord", kids=b"", length=None):
    return b"%s %s %s\x00" % (name, kids, b"%d" % len(body) if length is None else length) + body


def _dbl(x):
    return _field(1, 1, struct.pack("<d", x))


def _sint(x):
    return _field(2, 0, _varint(x << 1 if x >= 0 else (-x << 1) - 1))


_A1 = _entry(b"a", _dbl(1.5))
_KID = b"ab" * 32
OBJECT_CASES = [
    ("plain", _obj(_A1 + _entry(b"n", _sint(-3)))),
    ("last key wins", _obj(_entry(b"a", _dbl(9.0)) + _A1 + _entry(b"n", _sint(1)))),
    ("last key wins over a bad value", _obj(_entry(b"a", _field(21, 2)) + _A1
                                            + _entry(b"n", _sint(1)))),
    ("good value replaced by a list", _obj(_A1 + _entry(b"a", _field(21, 2))
                                           + _entry(b"n", _sint(1)))),
    ("key given twice in an item", _obj(_field(1, 2, _field(1, 2, b"x") + _field(1, 2, b"a")
                                                + _field(2, 2, _dbl(2.0))) + _entry(b"n", _sint(1)))),
    ("value occurrences merge", _obj(_field(1, 2, _field(1, 2, b"a") + _field(2, 2, _sint(4))
                                              + _field(2, 2, _dbl(2.5))) + _entry(b"n", _sint(1)))),
    ("item with an unknown field", _obj(_field(1, 2, _field(1, 2, b"a") + _field(2, 2, _dbl(2.0))
                                                 + _field(7, 0, b"\x01")) + _entry(b"n", _sint(1)))),
    ("key with another wire type", _obj(_field(1, 2, _field(1, 0, b"\x01") + _field(1, 2, b"a")
                                                 + _field(2, 2, _dbl(2.0))) + _entry(b"n", _sint(1)))),
    ("unknown record field", _obj(_field(5, 0, b"\x01") + _A1 + _entry(b"n", _sint(1)))),
    ("item without a value", _obj(_field(1, 2, _field(1, 2, b"z")) + _A1 + _entry(b"n", _sint(1)))),
    ("item without a value, replaced", _obj(_field(1, 2, _field(1, 2, b"a")) + _A1
                                            + _entry(b"n", _sint(1)))),
    ("empty oneof for a metric", _obj(_entry(b"a", b"") + _entry(b"n", _sint(1)))),
    ("configs member in a metric", _obj(_entry(b"a", _field(4, 0, b"\x01")) + _entry(b"n", _sint(1)))),
    ("empty key", _obj(_field(1, 2, _field(2, 2, _dbl(1.0))) + _A1 + _entry(b"n", _sint(1)))),
    ("leading zero in the length", _obj(_A1 + _entry(b"n", _sint(1)), length=b"025")),
    ("truncated header", b"MetricRecord  2"),
    ("no header", _A1),
    ("wrong length digits", _obj(_A1 + _entry(b"n", _sint(1)), length=b"3")),
    ("length not a number", _obj(_A1 + _entry(b"n", _sint(1)), length=b"x5")),
    ("child id present", _obj(_A1 + _entry(b"n", _sint(1)), kids=_KID)),
    ("empty child ids", _obj(_A1 + _entry(b"n", _sint(1)), kids=b",")),
    ("invalid child id", _obj(_A1 + _entry(b"n", _sint(1)), kids=b"xy")),
    ("wrong class name", _obj(_A1 + _entry(b"n", _sint(1)), name=b"ConfigRecord")),
    ("unknown class name", _obj(_A1 + _entry(b"n", _sint(1)), name=b"Metric")),
    ("three spaces", b"MetricRecord   25\x00" + _A1 + _entry(b"n", _sint(1))),
    ("malformed body", _obj(_A1 + b"\x0a\x05\x0a\x01")),
    ("invalid UTF-8 key", _obj(_entry(b"\xff", _dbl(1.0)) + _A1 + _entry(b"n", _sint(1)))),
    ("missing metric", _obj(_A1)),
    ("empty object", _obj(b"")),
    ("wrong kind: list for a number", _obj(_entry(b"a", _field(21, 2, _dbl(1.0)))
                                           + _entry(b"n", _sint(1)))),
    ("wrong kind: float for an int", _obj(_A1 + _entry(b"n", _dbl(1.0)))),
    ("out of range", _obj(_A1 + _entry(b"n", _sint(2**40)))),
    ("uint64 out of range", _obj(_A1 + _entry(b"n", _field(3, 0, _varint(2**64 - 1))))),
    # overlong length varints: protobuf (upb) reads them, so inflate does and the fast path must
    ("overlong item length", _obj(b"\x0a" + _long_varint(14, 6) + _field(1, 2, b"a")
                                  + _field(2, 2, _dbl(1.5)) + _entry(b"n", _sint(1)))),
    ("overlong value length", _obj(_field(1, 2, _field(1, 2, b"a") + b"\x12" + _long_varint(9, 10)
                                          + _dbl(1.5)) + _entry(b"n", _sint(1)))),
    ("overlong list length", _obj(_A1 + _entry(b"n", b"\xb2\x01" + _long_varint(3, 7)
                                                 + _field(1, 2, b"\x02")))),
]
OBJ_CASE_SPEC = {"a": TensorSpec("float64"), "n": TensorSpec("int32")}


@pytest.mark.parametrize("name,content", OBJECT_CASES, ids=[c[0] for c in OBJECT_CASES])
@pytest.mark.parametrize("offset", [0, 40])
def test_object_cases_agree_with_inflate(name, content, offset):
    good = fapp.MetricRecord({"a": 0.25, "n": 7}).deflate()
    got = _check_object_route([good, good, content], OBJ_CASE_SPEC, offset)
    if name.startswith("last key wins"):
        assert got["a"][2] == 1.5
    if name in ("child id present", "wrong class name", "truncated header",
                "wrong length digits", "malformed body", "missing metric", "out of range"):
        assert got is None, name  # every rejection the brief lists is one
    # shape-(m,) and list specs read the same object the same way
    _check_object_route([content], {"a": TensorSpec("float64", (1,))}, offset)
    _check_object_route([content], {"a": [TensorSpec("float32")]}, offset)


def test_object_errors_name_buffer_and_metric():
    good = fapp.MetricRecord({"acc": 0.5, "h": [1.0, 2.0]}).deflate()
    spec = {"acc": TensorSpec("float32"), "h": TensorSpec("float64", (2,))}
    cases = [
        (fapp.MetricRecord({"acc": [0.5], "h": [1.0, 2.0]}).deflate(),
         r"^buffer 3, metric 'acc': value of the wrong kind for float32 column \(want a number"),
        (fapp.MetricRecord({"acc": 0.5, "h": [1.0]}).deflate(),
         r"^buffer 3, metric 'h': list of the wrong length"),
        (fapp.MetricRecord({"h": [1.0, 2.0]}).deflate(), r"^buffer 3: no metric 'acc'$"),
        (good[:-1], r"^buffer 3: Object content length expected"),
        (good.replace(b"MetricRecord", b"ConfigRecord", 1),
         r"^buffer 3: Class name \(MetricRecord\) and object type \(ConfigRecord\) do not match"),
        (good.replace(b"  ", b" " + _KID + b" ", 1),
         r"^buffer 3: `MetricRecord` objects do not have children"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            wire.metrics_columns([good, good, good, bad], None, spec, wire=OBJ)
        with pytest.raises(ValueError, match=match.replace("buffer 3", "buffer 1003")):
            wire.metrics_columns([good, good, good, bad], None, spec, wire=OBJ,
                                 buffer_offset=1000)
    with pytest.raises(ValueError, match=r"^buffer 2: input must be a contiguous"):
        wire.metrics_columns([good, good, memoryview(good * 2)[::2]], None, spec, wire=OBJ)
    with pytest.raises(TypeError, match=r"^buffer 1: expected a bytes-like object"):
        wire.metrics_columns([good, "x"], None, spec, wire=OBJ)


def test_object_arguments():
    good = fapp.MetricRecord({"a": 1.0}).deflate()
    spec = {"a": TensorSpec("float64")}
    with pytest.raises(ValueError, match="record must be None for wire='metric-record-object'"):
        wire.metrics_columns([good], "eval", spec, wire=OBJ)
    with pytest.raises(TypeError, match="record must be a str"):
        wire.metrics_columns([], None, spec)
    with pytest.raises(ValueError, match="'metric-record-object'"):
        wire.metrics_columns([good], None, spec, wire="object")
    for off, exc in ((-1, ValueError), (1.0, TypeError), ("1", TypeError), (True, TypeError),
                     (None, TypeError)):
        with pytest.raises(exc, match="buffer_offset"):
            wire.metrics_columns([good], None, spec, wire=OBJ, buffer_offset=off)
    # numpy ints are ints; an offset is only ever added to indices in messages
    got = wire.metrics_columns([good], None, spec, wire=OBJ, buffer_offset=np.int64(5))
    np.testing.assert_array_equal(got["a"], [1.0])
    with pytest.raises(ValueError, match=r"^buffer 5, record 'm': no metric"):
        wire.metrics_columns([wire.recordset_to_bytes(RecordSet(
            metrics_records={"m": MetricsRecord({})}))], "m", spec, buffer_offset=np.int64(5))
    with pytest.raises(TypeError, match="nested mapping"):
        wire.metrics_columns([good], None, {"a": {"b": TensorSpec("float64")}}, wire=OBJ)


def test_object_empty_input_gives_empty_columns():
    got = wire.metrics_columns([], None, OBJ_SPEC, wire=OBJ)
    _assert_batch_equal(got, _inflate_and_read([], OBJ_SPEC))
    assert got["h"].shape == (0, 2) and got["hi"].dtype == np.int64 and got["b"].dtype == bool
    assert isinstance(got["t"], tuple) and got["t"][0].dtype == np.uint8
    assert wire.metrics_columns(iter([]), None, {}, wire=OBJ) == {}


@settings(max_examples=60, derandomize=True)
@given(st.randoms(use_true_random=False))
def test_object_mutation_fuzz(rng):
    # Mutated objects: success iff inflate + read succeeds, with equal columns (the C fast path
    # and the general path agree, and the general path is inflate's).
    spec = {"a": TensorSpec("float64"), "h": TensorSpec("int64", (2,)), "n": TensorSpec("uint8")}
    i = rng.randrange(5)
    extra = {"x" * rng.randrange(3): [0.5] * rng.randrange(3)}
    data = fapp.MetricRecord(dict(extra, a=i / 3, h=[i, -i], n=i)).deflate()
    for m in list(_mutations(data, rng)) + [data + data[-5:]]:
        _check_object_route([m], spec)


def test_canonical_objects_take_the_fast_path(monkeypatch):
    real, calls = fapp.MetricRecord, []

    class Spy:
        @staticmethod
        def inflate(content, children=None):
            calls.append(content)
            return real.inflate(content)

    spec = {"a": TensorSpec("float64"), "h": TensorSpec("int64", (2,))}
    body = _entry(b"a", _dbl(2.0)) + _entry(b"h", _field(22, 2, _field(1, 2, b"\x02\x04")))
    bufs = [real({"a": i / 2, "h": [i, 1], "x": [0.5] * i}).deflate() for i in range(50)]
    monkeypatch.setattr(fapp, "MetricRecord", Spy)
    got = wire.metrics_columns(bufs + [_obj(body)], None, spec, wire=OBJ)
    assert calls == []  # none took the general path
    assert got["a"].tolist() == [i / 2 for i in range(50)] + [2.0]
    assert got["h"][-1].tolist() == [1, 2]
    # a length with a leading zero, a metric's key twice: the general path (inflate's rules)
    odd = _obj(body, length=b"0%d" % len(body))
    repeated = _obj(_entry(b"a", _dbl(1.0)) + body.replace(_dbl(2.0), _dbl(3.0)))
    got = wire.metrics_columns([odd, repeated], None, spec, wire=OBJ)
    assert calls == [odd, repeated] and got["a"].tolist() == [2.0, 3.0]
    # non-ASCII keys, of the spec's metrics or not, stay in C too
    named = real({"é": 1.5, "a": 2.0, "h": [1, 2]}).deflate()
    got = wire.metrics_columns([named], None, {"é": TensorSpec("float64")}, wire=OBJ)
    assert got["é"].tolist() == [1.5] and len(calls) == 2
    got = wire.metrics_columns([named], None, spec, wire=OBJ)
    assert got["a"].tolist() == [2.0] and len(calls) == 2
