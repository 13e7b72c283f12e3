# Shared declaration of the record base type, so other Cython modules can
# type-check records with a pointer comparison and read their dict directly.

cdef class TypedDict:
    cdef dict _data            # the items, in insertion order
    cdef int _kind             # which key/value rules apply (see _records.pyx)
    cdef bint _exact           # type(self) is one of ours: no Python overrides to honour
    cdef object _check_key_fn  # only for TypedDict(check_key_fn, check_value_fn)
    cdef object _check_value_fn
    cdef dict __dict__
    cdef object __weakref__

    cdef int _set(self, object key, object value) except -1
    cdef int _store(self, object key, object value) except -1
    cdef int _fill(self, object src, object keep_input) except -1

cdef class MetricsRecord(TypedDict):
    pass

cdef class ConfigsRecord(TypedDict):
    pass

cdef class ParametersRecord(TypedDict):
    pass

cdef class RecordSet:
    cdef TypedDict _params
    cdef TypedDict _metrics
    cdef TypedDict _configs
    cdef dict __dict__
    cdef object __weakref__

# For the wire decoder: a RecordSet that takes over three dicts of records.
cdef RecordSet recordset_from_dicts(dict params, dict metrics, dict configs)
