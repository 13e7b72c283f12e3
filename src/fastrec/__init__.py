"""fastrec: compiled implementations of Flower's record API and TFF's metric sampling."""

from .array import Array, array_from_numpy

__all__ = ["Array", "array_from_numpy"]
__version__ = "0.1.0"
