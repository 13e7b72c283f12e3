"""Flower 1.15's protobuf wire format for records and messages, in C.

Encoders and decoders for the messages of ``flwr/proto/recordset.proto`` and
``flwr/proto/message.proto`` (Flower 1.15.2), with no protobuf dependency:

* ``X_to_bytes(x)`` returns exactly the bytes of
  ``serde.X_to_proto(to_flwr(x)).SerializeToString(deterministic=True)``
  (map entries sorted by key, Flower's sint64/uint64 and list-type choices),
  so equal records give equal bytes;
* ``X_from_bytes(buf)`` (any bytes-like ``buf``) accepts what protobuf's parser
  followed by Flower's ``X_from_proto`` accepts, and returns the fastrec record
  equal to ``from_flwr`` of Flower's result. Malformed input raises
  ``ValueError`` naming the byte offset.

One deliberate difference: a shape dimension that is not a valid ``int32``
varint is rejected (protobuf keeps its low 32 bits).

>>> from fastrec import MetricsRecord, RecordSet
>>> from fastrec.wire import recordset_from_bytes, recordset_to_bytes
>>> rs = RecordSet(metrics_records={"eval": MetricsRecord({"acc": 0.5})})
>>> data = recordset_to_bytes(rs)
>>> data.hex()
'121a0a046576616c12120a100a03616363120909000000000000e03f'
>>> recordset_from_bytes(data).metrics_records["eval"]["acc"]
0.5
"""

from ._wire import (array_from_bytes, array_to_bytes, configs_record_from_bytes,
                    configs_record_to_bytes, message_from_bytes, message_to_bytes,
                    metrics_columns, metrics_record_from_bytes, metrics_record_to_bytes,
                    parameters_record_from_bytes, parameters_record_to_bytes,
                    recordset_from_bytes, recordset_to_bytes)

__all__ = [
    "array_from_bytes", "array_to_bytes",
    "parameters_record_from_bytes", "parameters_record_to_bytes",
    "metrics_record_from_bytes", "metrics_record_to_bytes",
    "configs_record_from_bytes", "configs_record_to_bytes",
    "recordset_from_bytes", "recordset_to_bytes",
    "message_from_bytes", "message_to_bytes", "metrics_columns",
]
