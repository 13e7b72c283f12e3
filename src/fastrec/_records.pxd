# Shared declaration of the record base type, so other Cython modules can
# type-check records with a pointer comparison and read their dict directly.

# Which rules a TypedDict applies. Records set their kind in __cinit__;
# fastrec.app reuses them.
cdef enum:
    K_CUSTOM = 0      # TypedDict(check_key_fn, check_value_fn): call the functions
    K_METRICS = 1
    K_CONFIGS = 2
    K_PARAMS = 3
    K_RS_PARAMS = 4   # RecordSet.parameters_records
    K_RS_METRICS = 5
    K_RS_CONFIGS = 6

cdef class TypedDict:
    cdef dict _data            # the items, in insertion order
    cdef int _kind             # which key/value rules apply (see _records.pyx)
    cdef bint _exact           # type(self) is one of ours: no Python overrides to honour
    cdef bint _app             # error messages in Flower 1.42's wording (fastrec.app records)
    cdef object _check_key_fn  # only for TypedDict(check_key_fn, check_value_fn)
    cdef object _check_value_fn
    cdef dict __dict__
    cdef object __weakref__

    cdef int _set(self, object key, object value) except -1
    cdef int _store(self, object key, object value) except -1
    cdef int _fill(self, object src, object keep_input) except -1

# Flower's count_bytes for a metrics/configs/parameters record (by its _kind).
cdef object _count_bytes(TypedDict rec)

# Sealed records (see "Sealing" in _records.pyx): a decoder's fresh metrics/configs
# record kept out of the cyclic GC until Python code can reach inside. Code that
# hands a record's values to Python code (not just reads them) unseals it first.
cdef extern from "Python.h":
    int PyObject_GC_IsTracked(object)

cdef void seal_record(TypedDict rec, bint lists_sealed=*)
cdef void _track_record(TypedDict rec)

cdef inline void unseal_record(TypedDict rec):
    if not PyObject_GC_IsTracked(rec):
        _track_record(rec)

cdef class MetricsRecord(TypedDict):
    pass

cdef class ConfigsRecord(TypedDict):
    pass

cdef class ParametersRecord(TypedDict):
    pass

cdef class RecordSet:
    # The three groups' records (None: empty). A group's TypedDict view (what
    # parameters_records and friends return) is made on first access, over the same
    # dict. Decoded RecordSets are often never viewed, and three fewer objects each is
    # three fewer for every garbage collection to walk.
    cdef dict _pd, _md, _cd
    cdef TypedDict _pv, _mv, _cv             # views, None until first accessed
    cdef dict __dict__
    cdef object __weakref__

    cdef dict group(self, int which)     # 0 params, 1 metrics, 2 configs: the live dict
    cdef TypedDict view(self, int which)

# For the wire decoder: a RecordSet that takes over three dicts of records.
cdef RecordSet recordset_from_dicts(dict params, dict metrics, dict configs)
