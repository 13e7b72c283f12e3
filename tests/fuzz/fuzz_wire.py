"""Fuzz harness: hostile bytes to every fastrec.wire decoder and to metrics_columns.

Contract: ``ValueError`` with a message, or a decoded value whose canonical encoding is a fixed
point (encode(decode(encode(x))) == encode(x)); ``metrics_columns`` on a reply either raises
``ValueError`` or agrees with reading the same metric from the fully decoded RecordSet, and on
the same bytes as a Flower 1.42 MetricRecord object (``wire="metric-record-object"``) raises
``ValueError`` or agrees with ``fastrec.app.MetricRecord.inflate`` (of an object without children).
Replay files: python tests/fuzz/fuzz_wire.py FILE...
"""

import sys

import numpy as np

from fastrec import TensorSpec, app, wire

_CODECS = (
    (wire.array_from_bytes, wire.array_to_bytes),
    (wire.parameters_record_from_bytes, wire.parameters_record_to_bytes),
    (wire.metrics_record_from_bytes, wire.metrics_record_to_bytes),
    (wire.configs_record_from_bytes, wire.configs_record_to_bytes),
    (wire.recordset_from_bytes, wire.recordset_to_bytes),
)
_SPEC = {"a": TensorSpec("float64")}


def _fixed_point(decode, encode, data):
    try:
        value = decode(data)
    except ValueError as e:
        assert str(e), "empty error message"
        return None
    canonical = encode(value)
    assert encode(decode(canonical)) == canonical, "canonical encoding is not a fixed point"
    return value


def TestOneInput(data: bytes) -> None:
    for decode, encode in _CODECS:
        _fixed_point(decode, encode, data)
    try:
        md, content, err = wire.message_from_bytes(data)
    except ValueError as e:
        assert str(e)
    else:
        canonical = wire.message_to_bytes(md, content, err)
        assert wire.message_to_bytes(*wire.message_from_bytes(canonical)) == canonical
    try:
        rs = wire.recordset_from_bytes(data)
        want = rs.metrics_records["m"]["a"]
        want = np.array([float(want)]) if not isinstance(want, list) else None
    except (ValueError, KeyError, TypeError, OverflowError):
        want = None
    try:
        got = wire.metrics_columns([data], "m", _SPEC)["a"]
    except ValueError as e:
        assert str(e)
        assert want is None, "metrics_columns refused a reply the decoder reads"
    else:
        assert want is not None and np.array_equal(got, want, equal_nan=True), \
            "metrics_columns disagrees with the decoder"

    _object_columns(data)


def _object_columns(data):
    try:
        want = app.MetricRecord.inflate(data)["a"]
        children = data[:data.index(0)].decode("utf-8").split(" ")[1]
        want = np.array([float(want)]) if not (isinstance(want, list) or children) else None
    except (ValueError, KeyError, TypeError, OverflowError):
        want = None
    try:
        got = wire.metrics_columns([data], None, _SPEC, wire="metric-record-object")["a"]
    except ValueError as e:
        assert str(e).startswith("buffer 0")
        assert want is None, "metrics_columns refused an object inflate reads"
    else:
        assert want is not None and np.array_equal(got, want, equal_nan=True), \
            "metrics_columns disagrees with inflate"


if __name__ == "__main__":
    for name in sys.argv[1:]:
        with open(name, "rb") as f:
            TestOneInput(f.read())
