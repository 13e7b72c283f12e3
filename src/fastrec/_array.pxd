# Shared declaration of the Array extension type, so other Cython modules
# (records) can type-check values with a pointer comparison.

cdef class Array:
    # Like Flower's dataclass, the fields are plain mutable attributes.
    cdef public object dtype
    cdef public object shape
    cdef public object stype
    cdef public object data
    # Private: the parsed .npy header of `data`, valid while `data is _hdr_data`
    # (only ever cached for immutable `bytes`). Filled by array_from_numpy or
    # by the first numpy() call; saves re-parsing on repeated conversions.
    cdef object _hdr_data
    cdef object _hdr_dtype
    cdef Py_ssize_t _hdr_offset
    cdef Py_ssize_t _hdr_nbytes
    cdef int _hdr_ndim
    cdef int _hdr_fortran
    cdef Py_ssize_t _hdr_shape[8]
