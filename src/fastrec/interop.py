"""Conversions between fastrec objects and their Flower (``flwr.common``) twins.

``flwr`` is imported only when one of these functions is called.

>>> import fastrec
>>> rec = fastrec.MetricsRecord({"acc": 0.9})
>>> flwr_rec = fastrec.to_flwr(rec)            # a flwr.common.MetricsRecord
>>> fastrec.from_flwr(flwr_rec) == rec
True
"""

from __future__ import annotations

from ._array import Array
from ._records import ConfigsRecord, MetricsRecord, ParametersRecord, RecordSet

__all__ = ["from_flwr", "to_flwr"]

_SUPPORTED = "RecordSet, ParametersRecord, MetricsRecord, ConfigsRecord or Array"


def _flwr():
    try:
        from flwr.common import record
    except ImportError as exc:  # pragma: no cover - flwr is a test dependency
        raise ImportError("fastrec.to_flwr/from_flwr need the `flwr` package") from exc
    return record


def _copy_value(v):
    # Lists are the only mutable record values; copy them so the two objects
    # do not share state. Scalars, str and bytes are immutable.
    return list(v) if isinstance(v, list) else v


def _array_fields(a) -> tuple:
    shape = a.shape
    return (a.dtype, list(shape) if isinstance(shape, list) else shape, a.stype, a.data)


def from_flwr(obj):
    """Convert a Flower record object into the equivalent fastrec object.

    Accepts ``flwr.common`` ``RecordSet``, ``ParametersRecord``, ``MetricsRecord``,
    ``ConfigsRecord`` and ``Array``; the result holds the same keys (same order)
    and values (lists copied, bytes shared). The Flower object is left unchanged.

    >>> import flwr.common as fc, fastrec
    >>> fastrec.from_flwr(fc.ConfigsRecord({"lr": 0.1}))
    {'lr': 0.1}
    """
    try:
        rec = _flwr()
    except ImportError:
        rec = None
    if rec is not None:
        if isinstance(obj, rec.Array):
            return Array(*_array_fields(obj))
        if isinstance(obj, rec.ParametersRecord):
            return ParametersRecord({k: Array(*_array_fields(v)) for k, v in obj.items()},
                                    keep_input=True)
        if isinstance(obj, rec.MetricsRecord):
            return MetricsRecord({k: _copy_value(v) for k, v in obj.items()})
        if isinstance(obj, rec.ConfigsRecord):
            return ConfigsRecord({k: _copy_value(v) for k, v in obj.items()})
        if isinstance(obj, rec.RecordSet):
            return RecordSet(
                parameters_records={k: from_flwr(v) for k, v in obj.parameters_records.items()},
                metrics_records={k: from_flwr(v) for k, v in obj.metrics_records.items()},
                configs_records={k: from_flwr(v) for k, v in obj.configs_records.items()},
            )
    raise TypeError(f"from_flwr expects a flwr.common {_SUPPORTED}, "
                    f"got {type(obj).__module__}.{type(obj).__qualname__}")


def to_flwr(obj):
    """Convert a fastrec record object into the equivalent Flower object.

    Accepts fastrec ``RecordSet``, ``ParametersRecord``, ``MetricsRecord``,
    ``ConfigsRecord`` and ``Array``. The Flower constructors run their own
    validation, so a value mutated into an invalid state raises Flower's error.

    >>> import fastrec
    >>> type(fastrec.to_flwr(fastrec.MetricsRecord({"acc": 0.9}))).__module__
    'flwr.common.record.metricsrecord'
    """
    if not isinstance(obj, (Array, ParametersRecord, MetricsRecord, ConfigsRecord, RecordSet)):
        raise TypeError(f"to_flwr expects a fastrec {_SUPPORTED}, "
                        f"got {type(obj).__module__}.{type(obj).__qualname__}")
    rec = _flwr()
    if isinstance(obj, Array):
        return rec.Array(*_array_fields(obj))
    if isinstance(obj, ParametersRecord):
        return rec.ParametersRecord({k: rec.Array(*_array_fields(v)) for k, v in obj.items()},
                                    keep_input=True)
    if isinstance(obj, MetricsRecord):
        return rec.MetricsRecord({k: _copy_value(v) for k, v in obj.items()})
    if isinstance(obj, ConfigsRecord):
        return rec.ConfigsRecord({k: _copy_value(v) for k, v in obj.items()})
    return rec.RecordSet(
        parameters_records={k: to_flwr(v) for k, v in obj.parameters_records.items()},
        metrics_records={k: to_flwr(v) for k, v in obj.metrics_records.items()},
        configs_records={k: to_flwr(v) for k, v in obj.configs_records.items()},
    )
