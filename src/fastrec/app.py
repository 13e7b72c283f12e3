"""Flower 1.42's record API (``flwr.app``), compiled: :class:`Array`, :class:`ArrayRecord`,
:class:`MetricRecord`, :class:`ConfigRecord`, :class:`RecordDict`.

Same constructors, validation, errors and defaults as Flower 1.42.0, and the
same content-addressed object wire format: ``deflate()`` returns bytes identical
to Flower's, ``object_id`` is their SHA-256, ``children``/``is_dirty`` agree, and
``inflate(content, children)`` reads Flower's bytes and rejects malformed
content with ``ValueError``. Arrays are cut into :class:`ArrayChunk` children of
at most ``MAX_ARRAY_CHUNK_SIZE`` bytes (Flower's 5,242,880 unless the
``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`` environment variable says otherwise when
fastrec is imported). The 1.15 API stays at the top level (``fastrec.RecordSet``).

torch is optional: only the torch paths import it, and raise ``ImportError``
without it.

>>> from fastrec.app import MetricRecord, RecordDict
>>> rd = RecordDict({"eval": MetricRecord({"acc": 0.9})})
>>> content = rd["eval"].deflate()
>>> content[:17]
b'MetricRecord  18\\x00'
>>> MetricRecord.inflate(content)
{'acc': 0.9}
"""

from ._app import (MAX_ARRAY_CHUNK_SIZE, Array, ArrayChunk, ArrayRecord, ConfigRecord,
                   MetricRecord, RecordDict, inflate)

__all__ = ["Array", "ArrayChunk", "ArrayRecord", "ConfigRecord", "MAX_ARRAY_CHUNK_SIZE",
           "MetricRecord", "RecordDict", "inflate"]
