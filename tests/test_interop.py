"""fastrec.to_flwr / fastrec.from_flwr round trips against flwr 1.15.2."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from _optional import OptionalModule

import fastrec
from fastrec import ConfigsRecord, MetricsRecord, ParametersRecord, RecordSet

# Every test here compares with flwr 1.15.2 and is skipped with the reason without it.
fc = OptionalModule("flwr.common")


@pytest.fixture(autouse=True)
def _needs_flwr():
    pytest.importorskip("flwr", reason="fastrec.to_flwr/from_flwr convert to flwr 1.15.2")

HYP = settings(max_examples=60)


def _fields(a):
    return (a.dtype, a.shape, a.stype, a.data)


def _sample_recordset():
    arr = fastrec.array_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    return RecordSet(
        parameters_records={"model": ParametersRecord({"w": arr, "b": fastrec.Array(
            "float32", [0], "numpy.ndarray", b"")}, keep_input=True)},
        metrics_records={"train": MetricsRecord({"acc": 0.9, "n": 2**70, "l": [1, 2]})},
        configs_records={"cfg": ConfigsRecord({"lr": 0.1, "name": "x", "blob": b"\x00",
                                               "flags": [True, False]})},
    )


def test_recordset_round_trip():
    rs = _sample_recordset()
    f = fastrec.to_flwr(rs)
    assert type(f) is fc.RecordSet
    assert type(f.parameters_records["model"]) is fc.ParametersRecord
    assert type(f.parameters_records["model"]["w"]) is fc.Array
    assert type(f.metrics_records["train"]) is fc.MetricsRecord
    assert type(f.configs_records["cfg"]) is fc.ConfigsRecord
    assert repr(f) == repr(rs)
    back = fastrec.from_flwr(f)
    assert type(back) is RecordSet and back == rs and repr(back) == repr(rs)
    np.testing.assert_array_equal(f.parameters_records["model"]["w"].numpy(),
                                  np.arange(6, dtype=np.float32).reshape(2, 3))


def test_each_type_round_trips_and_sources_untouched():
    rs = _sample_recordset()
    for obj in (rs.parameters_records["model"], rs.metrics_records["train"],
                rs.configs_records["cfg"], rs.parameters_records["model"]["w"]):
        before = repr(obj)
        f = fastrec.to_flwr(obj)
        assert type(f).__module__.startswith("flwr.")
        assert repr(f) == before
        back = fastrec.from_flwr(f)
        assert type(back) is type(obj) and repr(back) == before
        assert repr(obj) == before and repr(f) == before  # neither side consumed
    p = rs.parameters_records["model"]
    assert fastrec.to_flwr(p).count_bytes() == p.count_bytes()


def test_conversion_does_not_alias_lists_or_shapes():
    m = MetricsRecord({"l": [1.0, 2.0]})
    f = fastrec.to_flwr(m)
    f["l"].append(3.0)
    assert m["l"] == [1.0, 2.0]
    a = fastrec.Array("float32", [2], "numpy.ndarray", b"12345678")
    fa = fastrec.to_flwr(a)
    fa.shape.append(1)
    assert a.shape == [2]
    back = fastrec.from_flwr(fc.ConfigsRecord({"l": ["a"]}))
    assert back["l"] == ["a"]


def test_unsupported_objects_raise_typeerror():
    for obj in (1, {"a": 1}, None, fc.RecordSet().metrics_records, RecordSet().metrics_records):
        with pytest.raises(TypeError, match="to_flwr expects a fastrec"):
            fastrec.to_flwr(obj)
        with pytest.raises(TypeError, match="from_flwr expects a flwr.common"):
            fastrec.from_flwr(obj)
    # Wrong direction is an error too, not a silent pass-through.
    with pytest.raises(TypeError):
        fastrec.from_flwr(MetricsRecord())
    with pytest.raises(TypeError):
        fastrec.to_flwr(fc.MetricsRecord())


def test_flwr_array_rejected_by_parameters_record_with_hint():
    fa = fc.Array("float32", [1], "numpy.ndarray", b"abcd")
    with pytest.raises(TypeError, match="from_flwr"):
        ParametersRecord({"w": fa})
    assert ParametersRecord({"w": fastrec.from_flwr(fa)}).count_bytes() == 5


def test_mutated_invalid_value_is_reported_by_flower_validation():
    m = MetricsRecord({"l": [1.0]})
    m["l"].append("not a number")  # lists stay mutable after insertion
    with pytest.raises(TypeError):
        fastrec.to_flwr(m)


def test_flwr_imported_lazily():
    code = ("import sys, fastrec; assert 'flwr' not in sys.modules; "
            "fastrec.to_flwr(fastrec.MetricsRecord()); assert 'flwr' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


metric_values = st.one_of(st.integers(), st.floats(allow_nan=False),
                          st.lists(st.integers(), max_size=4), st.lists(st.floats(allow_nan=False),
                                                                        max_size=4))
config_values = st.one_of(metric_values, st.text(max_size=4), st.binary(max_size=4),
                          st.booleans(), st.lists(st.text(max_size=3), max_size=3),
                          st.lists(st.binary(max_size=3), max_size=3),
                          st.lists(st.booleans(), max_size=3))
arrays = st.builds(fastrec.Array, st.sampled_from(["float32", "int8"]),
                   st.lists(st.integers(0, 5), max_size=3), st.just("numpy.ndarray"),
                   st.binary(max_size=16))


@HYP
@given(m=st.dictionaries(st.text(max_size=4), metric_values, max_size=4),
       c=st.dictionaries(st.text(max_size=4), config_values, max_size=4),
       p=st.dictionaries(st.text(max_size=4), arrays, max_size=3))
def test_round_trip_property(m, c, p):
    rs = RecordSet(parameters_records={"p": ParametersRecord(p, keep_input=True)},
                   metrics_records={"m": MetricsRecord(m)},
                   configs_records={"c": ConfigsRecord(c)})
    f = fastrec.to_flwr(rs)
    assert f.metrics_records["m"] == m and f.configs_records["c"] == c
    assert [_fields(a) for a in f.parameters_records["p"].values()] == \
        [_fields(a) for a in p.values()]
    assert f.metrics_records["m"].count_bytes() == rs.metrics_records["m"].count_bytes()
    assert fastrec.from_flwr(f) == rs


def test_flower_serde_accepts_fastrec_records():
    # Flower's Message does not check its content's type; its serde reads the
    # records through the Mapping protocol and each Array through vars().
    from flwr.common import serde
    from flwr.proto.message_pb2 import Message as ProtoMessage

    from fastrec import wire
    rs = _sample_recordset()
    rs.metrics_records["train"]["n"] = 2**64 - 1   # 2**70 has no protobuf encoding
    msg = fc.Message(fc.Metadata(1, "id", 2, 3, "", "g", 10.0, "train"), content=rs)
    msg.metadata.created_at = 5.0
    data = serde.message_to_proto(msg).SerializeToString(deterministic=True)
    flwr_msg = fc.Message(fc.Metadata(1, "id", 2, 3, "", "g", 10.0, "train"),
                          content=fastrec.to_flwr(rs))
    flwr_msg.metadata.created_at = 5.0
    assert data == serde.message_to_proto(flwr_msg).SerializeToString(deterministic=True)
    proto = ProtoMessage()
    proto.ParseFromString(data)
    back = serde.message_from_proto(proto)
    assert fastrec.from_flwr(back.content) == rs
    md, content, err = wire.message_from_bytes(data)
    assert content == rs and err is None and md["created_at"] == 5.0
    assert wire.message_to_bytes(md, content) == data
