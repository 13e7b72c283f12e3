"""Flower-compatible arrays: :class:`Array` and :func:`array_from_numpy`."""

from ._array import Array, array_from_numpy

__all__ = ["Array", "array_from_numpy"]
