"""Unfinalized metric specs: :class:`TensorSpec`, :func:`spec_of`, and their compilation.

A metrics type (TFF's ``local_unfinalized_metrics_type``) maps each metric name to a
:class:`TensorSpec`, or to a list, tuple or mapping (nested as deep as needed, like TFF's
named structs) of them. Compiling it checks it once and pre-digests every leaf for the
per-client conversion in ``fastrec._sampling``.

>>> compile_metrics_type({"loss": [TensorSpec("float32"), TensorSpec("float32")]})["loss"].children[0].dtype
dtype('float32')
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._sampling import MAX_DEPTH, CompiledSpec

__all__ = ["TensorSpec", "compile_metrics_type", "spec_of"]

_MAX_DIM = (1 << 63) - 1


class TensorSpec:
    """Dtype and shape of one unfinalized metric value (TFF's ``tff.TensorType``).

    ``shape`` entries may be ``None`` (any size). The dtype must be bool, integer, float or
    complex.

    >>> TensorSpec("float32")
    TensorSpec(dtype=float32, shape=())
    >>> TensorSpec(np.int64, shape=(None, 3)).shape
    (None, 3)
    """

    __slots__ = ("dtype", "shape")
    dtype: np.dtype
    shape: tuple

    def __init__(self, dtype: Any, shape: Any = ()):
        try:
            dt = np.dtype(dtype)
        except TypeError as e:
            raise TypeError(f"TensorSpec: {dtype!r} is not a dtype ({e})") from None
        if dt.kind not in "biufc":
            raise TypeError(f"TensorSpec: dtype {dt} is not numeric (bool, int, float, complex)")
        if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
            shape = (shape,)
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"TensorSpec: shape must be a tuple of ints or None, got {shape!r}")
        dims: list[int | None] = []
        for d in shape:
            if d is None:
                dims.append(None)
            elif isinstance(d, (int, np.integer)) and not isinstance(d, bool) and int(d) >= 0:
                if int(d) > _MAX_DIM:   # an array dimension is a C ssize_t
                    raise ValueError(f"TensorSpec: shape entry {int(d)} exceeds 2**63 - 1")
                dims.append(int(d))
            else:
                raise TypeError(f"TensorSpec: shape entries must be non-negative ints or None, "
                                f"got {d!r}")
        object.__setattr__(self, "dtype", dt)
        object.__setattr__(self, "shape", tuple(dims))

    def __setattr__(self, name, value):
        raise AttributeError("TensorSpec is immutable")

    def __eq__(self, other):
        if not isinstance(other, TensorSpec):
            return NotImplemented
        return self.dtype == other.dtype and self.shape == other.shape

    def __hash__(self):
        return hash((self.dtype, self.shape))

    def __repr__(self):
        return f"TensorSpec(dtype={self.dtype}, shape={self.shape})"

    def __reduce__(self):
        return (TensorSpec, (self.dtype.str, self.shape))


def spec_of(example: Mapping) -> dict:
    """Infer the unfinalized-metrics spec from one client's value.

    Numbers and numpy scalars give shape-() specs, arrays and lists of numbers give array
    specs (NumPy's dtype inference: Python ``float`` is float64, ``int`` is int64). For a
    list-of-tensors structure, write the spec by hand.

    >>> spec_of({"n": 3, "loss": 0.5, "hist": [1, 2, 3]})
    {'n': TensorSpec(dtype=int64, shape=()), 'loss': TensorSpec(dtype=float64, shape=()), \
'hist': TensorSpec(dtype=int64, shape=(3,))}
    """
    if not isinstance(example, Mapping):
        raise TypeError(f"spec_of expects a mapping of metric name to value, got "
                        f"{type(example).__name__}")
    out = {}
    for name, value in example.items():
        if isinstance(value, (str, bytes)):
            raise TypeError(f"spec_of: metric {name!r} is not numeric: {value!r}")
        try:
            a = np.asarray(value)
        except (ValueError, TypeError) as e:
            raise ValueError(f"spec_of: cannot infer a spec for metric {name!r} ({e})") from None
        if a.dtype.kind not in "biufc":
            raise TypeError(f"spec_of: metric {name!r} is not numeric (dtype {a.dtype})")
        out[name] = TensorSpec(a.dtype, a.shape)
    return out


def _compile_spec(spec, path: str, depth: int) -> CompiledSpec:
    if depth > MAX_DEPTH:
        raise ValueError(f"`local_unfinalized_metrics_type`{path}: nested deeper than "
                         f"{MAX_DEPTH} levels (a cyclic structure?)")
    if isinstance(spec, TensorSpec):
        return CompiledSpec.leaf(spec.dtype, spec.shape)
    if isinstance(spec, (list, tuple)):
        container: type = tuple if isinstance(spec, tuple) else list
        return CompiledSpec.struct(container, [_compile_spec(s, f"{path}[{i}]", depth + 1)
                                               for i, s in enumerate(spec)])
    if isinstance(spec, Mapping):
        keys = list(spec)
        mapping: type = OrderedDict if type(spec) is OrderedDict else dict
        return CompiledSpec.mapping(mapping, keys, [
            _compile_spec(spec[k], f"{path}[{k!r}]", depth + 1) for k in keys])
    raise TypeError(f"`local_unfinalized_metrics_type`{path}: expected a TensorSpec or a list, "
                    f"tuple or mapping of them, got {type(spec).__name__} {spec!r:.60}")


def compile_metrics_type(metrics_type) -> dict:
    """Check a metrics type and compile each metric's spec (a ``CompiledSpec`` per name).

    >>> sorted(compile_metrics_type({"a": TensorSpec("int64"), "b": {"x": TensorSpec("bool")}}))
    ['a', 'b']
    """
    if not isinstance(metrics_type, Mapping):
        raise TypeError("`local_unfinalized_metrics_type` must be a mapping of metric name to "
                        f"TensorSpec (or list, tuple or mapping of TensorSpec), got "
                        f"{type(metrics_type).__name__}")
    out = {}
    for name, spec in metrics_type.items():
        if not isinstance(name, str):
            raise TypeError(f"`local_unfinalized_metrics_type` keys must be str, got {name!r}")
        out[name] = _compile_spec(spec, f"[{name!r}]", 1)
    return out
