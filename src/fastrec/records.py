"""Flower-compatible records: :class:`RecordSet` and the three record types.

Drop-in replacements for ``flwr.common``'s ``RecordSet``, ``ParametersRecord``,
``MetricsRecord`` and ``ConfigsRecord`` (Flower 1.15): same constructor
signatures, same validation rules and exception types, same ``MutableMapping``
behaviour, same ``count_bytes()``; the checks run in compiled code.

>>> from fastrec.records import MetricsRecord, RecordSet
>>> rs = RecordSet(metrics_records={"eval": MetricsRecord({"acc": 0.9})})
>>> rs.metrics_records["eval"]["acc"]
0.9
"""

from ._records import ConfigsRecord, MetricsRecord, ParametersRecord, RecordSet, TypedDict

__all__ = ["ConfigsRecord", "MetricsRecord", "ParametersRecord", "RecordSet", "TypedDict"]
