# Shared declaration of the Array extension type, so other Cython modules
# (records) can type-check values with a pointer comparison.

cdef class Array:
    # Like Flower's dataclass, the fields are plain mutable attributes.
    cdef public object dtype
    cdef public object shape
    cdef public object stype
    cdef public object data
