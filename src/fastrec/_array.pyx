# cython: language_level=3, boundscheck=False, wraparound=False
"""Array: Flower-compatible serialized array (provisional implementation).

TODO(issue 2): replace the numpy.save/numpy.load paths with the C .npy kernels.
"""

import io

import numpy as np


cdef class Array:
    """A serialized array: ``dtype``, ``shape``, ``stype`` and ``data`` bytes.

    Mirrors ``flwr.common.Array`` (a dataclass): positional or keyword
    construction, mutable fields, ``==`` compares fields.

    >>> a = Array("float64", [1], "numpy.ndarray", b"...")
    """

    def __init__(self, dtype, shape, stype, data):
        self.dtype = dtype
        self.shape = shape
        self.stype = stype
        self.data = data

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        cdef Array o = <Array>other
        return (self.dtype, self.shape, self.stype, self.data) == (o.dtype, o.shape, o.stype, o.data)

    __hash__ = None

    def __repr__(self):
        return (f"Array(dtype={self.dtype!r}, shape={self.shape!r}, "
                f"stype={self.stype!r}, data={self.data!r})")

    def __reduce__(self):
        return (type(self), (self.dtype, self.shape, self.stype, self.data))

    def numpy(self):
        """Return the array as a NumPy array."""
        if self.stype != "numpy.ndarray":
            raise TypeError(
                f"Unsupported serialization type for numpy conversion: '{self.stype}'")
        return np.load(io.BytesIO(self.data), allow_pickle=False)


def array_from_numpy(ndarray):
    """Serialize ``ndarray`` into an :class:`Array` holding ``.npy`` bytes."""
    buf = io.BytesIO()
    np.save(buf, ndarray, allow_pickle=False)
    return Array(str(ndarray.dtype), list(ndarray.shape), "numpy.ndarray", buf.getvalue())
