"""Conversions between fastrec objects and their Flower twins.

``flwr`` is imported only when one of these functions is called. With Flower
1.15 installed they convert the 1.15 API (``fastrec.RecordSet`` ... and
``flwr.common``'s classes); with Flower >= 1.19 they convert :mod:`fastrec.app`'s
classes and ``flwr.app``'s (``RecordDict``, ``ArrayRecord``, ``MetricRecord``,
``ConfigRecord``, ``Array``): the installed version decides.

>>> import fastrec
>>> rec = fastrec.MetricsRecord({"acc": 0.9})
>>> flwr_rec = fastrec.to_flwr(rec)            # a flwr.common.MetricsRecord
>>> fastrec.from_flwr(flwr_rec) == rec
True
"""

from __future__ import annotations

from ._array import Array
from ._records import ConfigsRecord, MetricsRecord, ParametersRecord, RecordSet
from . import _app

__all__ = ["from_flwr", "to_flwr"]

_SUPPORTED = "RecordSet, ParametersRecord, MetricsRecord, ConfigsRecord or Array"


def _flwr():
    try:
        from flwr.common import record
    except ImportError as exc:  # pragma: no cover - flwr is a test dependency
        raise ImportError("fastrec.to_flwr/from_flwr need the `flwr` package") from exc
    return record


def _flwr_app():
    """flwr.app when the installed Flower has the 1.19+ record API, else None."""
    try:
        from importlib.metadata import version
        major, minor = (int(x) for x in version("flwr").split(".")[:2])
    except Exception:  # noqa: BLE001 - flwr missing or an unparsable version
        return None
    if (major, minor) < (1, 19):
        return None
    import importlib
    return importlib.import_module("flwr.app")  # not imported by name: 1.15 has no flwr.app


_APP_SUPPORTED = "RecordDict, ArrayRecord, MetricRecord, ConfigRecord or Array"


def _app_from_flwr(fa, obj):
    if isinstance(obj, fa.Array):
        return _app.Array(obj.dtype, tuple(obj.shape), obj.stype, obj.data)
    if isinstance(obj, fa.ArrayRecord):
        rec = _app.ArrayRecord()
        for k, v in obj.items():
            rec[k] = _app_from_flwr(fa, v)
        return rec
    if isinstance(obj, fa.MetricRecord):
        return _app.MetricRecord({k: _copy_value(v) for k, v in obj.items()})
    if isinstance(obj, fa.ConfigRecord):
        return _app.ConfigRecord({k: _copy_value(v) for k, v in obj.items()})
    if isinstance(obj, fa.RecordDict):
        return _app.RecordDict({k: _app_from_flwr(fa, v) for k, v in obj.items()})
    raise TypeError(f"from_flwr expects a flwr.app {_APP_SUPPORTED}, "
                    f"got {type(obj).__module__}.{type(obj).__qualname__}")


def _app_to_flwr(fa, obj):
    if isinstance(obj, _app.Array):
        return fa.Array(obj.dtype, tuple(obj.shape), obj.stype, obj.data)
    if isinstance(obj, _app.ArrayRecord):
        rec = fa.ArrayRecord()
        for k, v in obj.items():
            rec[k] = _app_to_flwr(fa, v)
        return rec
    if isinstance(obj, _app.MetricRecord):
        return fa.MetricRecord({k: _copy_value(v) for k, v in obj.items()})
    if isinstance(obj, _app.ConfigRecord):
        return fa.ConfigRecord({k: _copy_value(v) for k, v in obj.items()})
    if isinstance(obj, _app.RecordDict):
        return fa.RecordDict({k: _app_to_flwr(fa, v) for k, v in obj.items()})
    raise TypeError(f"to_flwr expects a fastrec.app {_APP_SUPPORTED} (Flower "
                    f"{_installed()} is installed), "
                    f"got {type(obj).__module__}.{type(obj).__qualname__}")


def _installed():
    from importlib.metadata import version
    return version("flwr")


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
    fa = _flwr_app()
    if fa is not None:
        return _app_from_flwr(fa, obj)
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
    fa = _flwr_app()
    if fa is not None:
        return _app_to_flwr(fa, obj)
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
