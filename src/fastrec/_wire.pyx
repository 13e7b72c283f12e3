# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Flower 1.15's protobuf wire format for records (see :mod:`fastrec.wire` for the API).

The field-level parsing and writing is C (csrc/pb.c, csrc/wire.c); this module
walks the messages, builds fastrec records without re-validating them (every
decoded value is valid by construction) and maps C errors to ``ValueError``
with the byte offset.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_Check, PyBytes_CheckExact,
                            PyBytes_FromStringAndSize, PyBytes_GET_SIZE)
from cpython.dict cimport PyDict_Next
from cpython.float cimport PyFloat_AsDouble, PyFloat_FromDouble
from cpython.long cimport (PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong,
                           PyLong_FromLongLong, PyLong_FromUnsignedLongLong)
from cpython.object cimport PyObject, PyObject_IsInstance
from cpython.ref cimport Py_INCREF, Py_XDECREF
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport INT32_MAX, INT32_MIN, INT64_MAX, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove

from fastrec._array cimport Array
from fastrec._records cimport (ConfigsRecord, MetricsRecord, ParametersRecord, RecordSet,
                               TypedDict, recordset_from_dicts, seal_record)
from fastrec._status cimport *

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL
    object PyNumber_Index(object o)
    Py_ssize_t PY_SSIZE_T_MAX
    Py_ssize_t PyUnicode_Tailmatch(object s, object sub, Py_ssize_t start, Py_ssize_t end,
                                   int direction) except -1

cdef enum:
    NOGIL_BYTES = 1 << 16   # copies at least this big run without the GIL


# ---------------------------------------------------------------------------
# Errors and input buffers
# ---------------------------------------------------------------------------

cdef object _raise(fr_status st, fr_pb_ctx *c, str what):
    if st == FR_ERR_NOMEM:
        raise MemoryError()
    if c.err != NULL:
        raise ValueError(f"malformed {what} at byte {c.err_off}: {(<bytes>c.err).decode()}")
    raise ValueError(f"malformed {what}: {fr_status_name(st).decode()}")


cdef class _In:
    """A contiguous read-only view of a bytes-like input."""
    cdef Py_buffer view
    cdef bint held
    cdef const uint8_t *ptr
    cdef size_t len

    def __dealloc__(self):
        if self.held:
            PyBuffer_Release(&self.view)


cdef _In _input(object buf):
    cdef _In r = _In.__new__(_In)
    if PyBytes_CheckExact(buf):
        r.ptr = <const uint8_t *>PyBytes_AS_STRING(buf)
        r.len = <size_t>PyBytes_GET_SIZE(buf)
        return r
    if isinstance(buf, str):
        raise TypeError("expected a bytes-like object, not 'str'")
    try:
        PyObject_GetBuffer(buf, &r.view, PyBUF_SIMPLE)
    except BufferError as e:
        raise ValueError(f"input must be a contiguous bytes-like object: {e}") from e
    r.held = True
    r.ptr = <const uint8_t *>r.view.buf
    r.len = <size_t>r.view.len
    return r


cdef inline str _str(fr_span s):
    return PyUnicode_DecodeUTF8(<const char *>s.ptr, <Py_ssize_t>s.len, NULL)


# Record keys repeat from reply to reply ("accuracy", "loss", ...): a small
# direct-mapped cache hands back the same str object for the same UTF-8 bytes,
# which saves decoding it and, since a str caches its hash, rehashing it on
# every dict insert. Keys longer than _KEY_MAX bytes are decoded each time.
cdef enum:
    _KEY_SLOTS = 512
    _KEY_MAX = 48

cdef struct _KeySlot:
    PyObject *s         # owned reference, or NULL
    size_t n
    uint8_t b[_KEY_MAX]

cdef _KeySlot _keys[_KEY_SLOTS]


cdef object key_str(const uint8_t *p, size_t n):
    """The str of the (valid) UTF-8 bytes p[0:n], shared between equal keys."""
    cdef uint32_t h = 2166136261u
    cdef size_t k
    cdef _KeySlot *slot
    cdef object out
    if n == 0:
        return ""
    if n > _KEY_MAX:
        return PyUnicode_DecodeUTF8(<const char *>p, <Py_ssize_t>n, NULL)
    for k in range(n):
        h = (h ^ p[k]) * 16777619u
    slot = &_keys[(h ^ (h >> 16)) & (_KEY_SLOTS - 1)]
    if slot.s != NULL and slot.n == n and same_bytes(slot.b, p, n):
        return <object>slot.s
    out = PyUnicode_DecodeUTF8(<const char *>p, <Py_ssize_t>n, NULL)
    Py_XDECREF(slot.s)
    Py_INCREF(out)
    slot.s = <PyObject *>out
    slot.n = n
    memcpy(slot.b, p, n)
    return out


cdef bytes _bytes(const uint8_t *p, size_t n):
    """One copy of n input bytes into a new bytes object, without the GIL when large."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>n)
    cdef char *dst = PyBytes_AS_STRING(out)
    if n >= NOGIL_BYTES:
        with nogil:
            memcpy(dst, p, n)
    elif n:
        memcpy(dst, p, n)
    return out


# ---------------------------------------------------------------------------
# Values: C <-> Python
# ---------------------------------------------------------------------------

cdef object value_to_py(const fr_value *v):
    cdef size_t k, n = v.n
    cdef list out
    cdef int kind = v.kind
    if kind == FR_V_DOUBLE:
        return PyFloat_FromDouble(v.d)
    if kind == FR_V_SINT64:
        return PyLong_FromLongLong(v.i)
    if kind == FR_V_UINT64:
        return PyLong_FromUnsignedLongLong(v.u)
    if kind == FR_V_BOOL:
        return v.b != 0
    if kind == FR_V_STRING:
        return _str(v.s)
    if kind == FR_V_BYTES:
        return PyBytes_FromStringAndSize(<const char *>v.s.ptr, <Py_ssize_t>v.s.len)
    out = [None] * n
    if kind == FR_V_DOUBLE_LIST:
        for k in range(n):
            out[k] = PyFloat_FromDouble((<const double *>v.items)[k])
    elif kind == FR_V_SINT_LIST:
        for k in range(n):
            out[k] = PyLong_FromLongLong((<const int64_t *>v.items)[k])
    elif kind == FR_V_UINT_LIST:
        for k in range(n):
            out[k] = PyLong_FromUnsignedLongLong((<const uint64_t *>v.items)[k])
    elif kind == FR_V_BOOL_LIST:
        for k in range(n):
            out[k] = (<const uint8_t *>v.items)[k] != 0
    elif kind == FR_V_STRING_LIST:
        for k in range(n):
            out[k] = _str((<const fr_span *>v.items)[k])
    elif kind == FR_V_BYTES_LIST:
        for k in range(n):
            out[k] = PyBytes_FromStringAndSize(<const char *>(<const fr_span *>v.items)[k].ptr,
                                               <Py_ssize_t>(<const fr_span *>v.items)[k].len)
    else:
        raise ValueError(f"unknown record value kind {kind}")
    return out


cdef int _scratch(fr_value *v, size_t nbytes) except -1:
    cdef void *p
    if nbytes > v.scratch_cap:
        p = realloc(v.scratch, nbytes if nbytes else 1)
        if p == NULL:
            raise MemoryError()
        v.scratch = p
        v.scratch_cap = nbytes
    v.items = v.scratch
    return 0


cdef int _int_value(object x, int64_t *i, uint64_t *u) except -1:
    """Protobuf's conversion of an int for a sint64/uint64 field: 0 = fits int64
    (in *i), 1 = only uint64 (in *u). Out of both ranges: ValueError."""
    cdef int overflow = 0
    cdef long long ll
    if type(x) is not int:
        x = PyNumber_Index(x)
    ll = PyLong_AsLongLongAndOverflow(x, &overflow)
    if overflow == 0:
        i[0] = ll
        return 0
    if overflow > 0:
        try:
            u[0] = PyLong_AsUnsignedLongLong(x)
            return 1
        except OverflowError:
            pass
    raise ValueError(f"Value out of range: {x}")


cdef inline const uint8_t *_utf8(object s, size_t *n) except NULL:
    # A str with no UTF-8 (a lone surrogate) raises UnicodeEncodeError, a ValueError,
    # as protobuf's string setter does.
    cdef Py_ssize_t m
    cdef const char *p = PyUnicode_AsUTF8AndSize(s, &m)
    n[0] = <size_t>m
    return <const uint8_t *>p


cdef inline object _bytes_value(object x):
    """x itself for a bytes field: protobuf reads a bytes subclass's buffer (never its
    ``__bytes__``) and refuses anything else (e.g. an object whose ``__class__`` is bytes)."""
    if not PyBytes_Check(x):
        raise TypeError(f"expected bytes, {type(x).__name__} found")
    return x


cdef bint _all_instances(tuple items, object t):
    cdef object x
    for x in items:
        if type(x) is not t and not PyObject_IsInstance(x, t):
            return False
    return True


cdef int _int_list(tuple items, fr_value *v) except -1:
    cdef size_t k, n = len(items)
    cdef int64_t i = 0
    cdef uint64_t u = 0
    cdef bint wide = False
    _scratch(v, n * 8)
    for k in range(n):
        if _int_value(items[k], &i, &u):
            wide = True
            (<uint64_t *>v.items)[k] = u
        else:
            (<int64_t *>v.items)[k] = i
    v.n = n
    v.kind = FR_V_SINT_LIST
    if wide:
        # Flower's rule: a UintList as soon as one element needs it; then no negatives.
        for k in range(n):
            if _int_value(items[k], &i, &u) == 0:
                if i < 0:
                    raise ValueError(f"Value out of range: {items[k]}")
                (<uint64_t *>v.items)[k] = <uint64_t>i
        v.kind = FR_V_UINT_LIST
    return 0


cdef int _list_value(tuple items, int kind, fr_value *v, list keep) except -1:
    cdef size_t k, n = len(items)
    cdef object x
    cdef fr_span *sp
    if kind == FR_V_SINT_LIST:
        return _int_list(items, v)
    v.kind = kind
    v.n = n
    if kind == FR_V_DOUBLE_LIST:
        _scratch(v, n * sizeof(double))
        for k in range(n):
            (<double *>v.items)[k] = PyFloat_AsDouble(items[k])
    elif kind == FR_V_BOOL_LIST:
        _scratch(v, n)
        for k in range(n):
            (<uint8_t *>v.items)[k] = 1 if items[k] else 0
    else:
        _scratch(v, n * sizeof(fr_span))
        keep.append(items)
        sp = <fr_span *>v.items
        for k in range(n):
            x = items[k]
            if kind == FR_V_STRING_LIST:
                sp[k].ptr = _utf8(x, &sp[k].len)
            else:
                x = _bytes_value(x)
                sp[k].ptr = <const uint8_t *>PyBytes_AS_STRING(x)
                sp[k].len = <size_t>PyBytes_GET_SIZE(x)
    return 0


# Flower's serde tries these types in order (bool first for configs): for each,
# a scalar of that type, then a list whose items all are of that type.
_METRICS_ORDER = ((float, FR_V_DOUBLE, FR_V_DOUBLE_LIST), (int, FR_V_SINT64, FR_V_SINT_LIST))
_CONFIGS_ORDER = ((bool, FR_V_BOOL, FR_V_BOOL_LIST), (int, FR_V_SINT64, FR_V_SINT_LIST),
                  (float, FR_V_DOUBLE, FR_V_DOUBLE_LIST), (str, FR_V_STRING, FR_V_STRING_LIST),
                  (bytes, FR_V_BYTES, FR_V_BYTES_LIST))


cdef int _scalar_value(object value, int kind, fr_value *v, list keep) except -1:
    cdef int64_t i = 0
    cdef uint64_t u = 0
    v.kind = kind
    if kind == FR_V_DOUBLE:
        v.d = PyFloat_AsDouble(value)
    elif kind == FR_V_SINT64:
        if _int_value(value, &i, &u):
            v.kind = FR_V_UINT64
            v.u = u
        else:
            v.i = i
    elif kind == FR_V_BOOL:
        v.b = 1 if value else 0
    elif kind == FR_V_STRING:
        keep.append(value)
        v.s.ptr = _utf8(value, &v.s.len)
    else:
        value = _bytes_value(value)
        keep.append(value)
        v.s.ptr = <const uint8_t *>PyBytes_AS_STRING(value)
        v.s.len = <size_t>PyBytes_GET_SIZE(value)
    return 0


cdef int value_from_py(object value, bint configs, fr_value *v, list keep) except -1:
    cdef type tp = type(value)
    cdef tuple items
    v.n = 0
    # Fast paths for exact builtin types, which the general loop below would
    # classify the same way.
    if tp is float:
        v.kind = FR_V_DOUBLE
        v.d = PyFloat_AS_DOUBLE(value)
        return 0
    if tp is int:
        return _scalar_value(value, FR_V_SINT64, v, keep)
    order = _CONFIGS_ORDER if configs else _METRICS_ORDER
    is_list = tp is list or PyObject_IsInstance(value, list)
    items = None
    if is_list:
        # A snapshot: converting an element (__float__, __index__, __bytes__ of an object
        # that passes isinstance) runs Python code, which could shrink the list under the
        # unchecked indexing below or free elements whose bytes the value points into.
        items = tuple(value)
    for t, scalar_kind, list_kind in order:
        if PyObject_IsInstance(value, t):
            return _scalar_value(value, scalar_kind, v, keep)
        if is_list and _all_instances(items, t):
            return _list_value(items, list_kind, v, keep)
    name = "ConfigsRecordValue" if configs else "MetricsRecordValue"
    raise TypeError(f"The type of the following value is not allowed in '{name}':\n{value}")


cdef extern from "Python.h":
    double PyFloat_AS_DOUBLE(object)


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------

cdef class _Empty:
    """Placeholder for a record value whose oneof is empty, at byte `offset`."""
    cdef Py_ssize_t offset

    def __cinit__(self, Py_ssize_t offset):
        self.offset = offset


cdef int _refuse_empty(object records, str what) except -1:
    """ValueError if a placeholder survived in these record dicts (Flower's
    from_proto cannot convert an empty oneof)."""
    for rec in records:
        data = rec if type(rec) is dict else (<TypedDict>rec)._data
        for v in data.values():
            if type(v) is _Empty:
                raise ValueError(f"malformed {what} at byte {(<_Empty>v).offset}: record value "
                                 "with no member of its oneof set")
    return 0


cdef class _Dec:
    """Decoder state: the error context and reusable scratch for values/arrays."""
    cdef fr_pb_ctx c
    cdef fr_value v
    cdef fr_wire_array a
    cdef bint empty_seen

    def __cinit__(self):
        fr_value_init(&self.v)
        fr_wire_array_init(&self.a)

    def __dealloc__(self):
        fr_value_free(&self.v)
        fr_wire_array_free(&self.a)

    cdef inline void start(self, _In inp):
        self.c.base = inp.ptr
        self.c.err = NULL
        self.c.err_off = 0


# One decoder reused across calls (its scratch stays warm). Decoding holds the GIL
# except inside large copies, so a call that finds it busy (another thread got in
# during such a copy) takes a fresh one.
cdef _Dec _shared_dec = _Dec.__new__(_Dec)
cdef bint _shared_busy = False


cdef inline _Dec _acquire():
    global _shared_busy
    if _shared_busy:
        return _Dec.__new__(_Dec)
    _shared_busy = True
    return _shared_dec


cdef inline void _release(_Dec d):
    global _shared_busy
    if d is _shared_dec:
        _shared_busy = False


cdef int _check(fr_status st, _Dec d, str what) except -1:
    if st != FR_OK:
        _raise(st, &d.c, what)
    return 0


cdef int _items_merge(_Dec d, const uint8_t *ptr, size_t len, bint configs, int depth,
                      dict out, str what, bint map_entries=True) except -1:
    """Merge one occurrence of a MetricsRecord/ConfigsRecord body into out."""
    cdef const uint8_t *p = ptr
    cdef const uint8_t *end = ptr + len
    cdef fr_pb_field f
    cdef fr_span key
    cdef int unknown = 0
    if depth > FR_PB_MAX_DEPTH:
        _check(fr_pb_fail(&d.c, ptr, "nesting deeper than 100"), d, what)
    while p < end:
        _check(fr_pb_next_field(&d.c, &p, end, depth, &f), d, what)
        if f.number != 1 or f.wire_type != FR_PB_LEN:
            continue
        _check(fr_wire_entry_decode(&d.c, f.ptr, f.len, configs, depth + 1, &key, &d.v,
                                    &unknown), d, what)
        if map_entries and unknown:
            continue   # protobuf keeps such an entry as an unknown field
        if d.v.kind == FR_V_NONE:
            # An error only if no later entry replaces this key: checked at the end.
            out[key_str(key.ptr, key.len)] = _Empty(<Py_ssize_t>(f.ptr - d.c.base))
            d.empty_seen = True
        else:
            out[key_str(key.ptr, key.len)] = value_to_py(&d.v)
    return 0


cdef object _array_from(_Dec d, const uint8_t *ptr, size_t len, int depth, str what):
    _check(fr_wire_array_decode(&d.c, ptr, len, depth, &d.a), d, what)
    cdef Array arr = Array.__new__(Array)
    cdef size_t k
    arr.dtype = _str(d.a.dtype)
    arr.shape = [d.a.shape[k] for k in range(d.a.ndim)]
    arr.stype = _str(d.a.stype)
    arr.data = _bytes(d.a.data.ptr, d.a.data.len)
    return arr


cdef int _params_merge(_Dec d, const uint8_t *ptr, size_t len, int depth, list keys,
                       list values, str what) except -1:
    """Collect one occurrence of a ParametersRecord body's keys and arrays."""
    cdef const uint8_t *p = ptr
    cdef const uint8_t *end = ptr + len
    cdef fr_pb_field f
    if depth > FR_PB_MAX_DEPTH:
        _check(fr_pb_fail(&d.c, ptr, "nesting deeper than 100"), d, what)
    while p < end:
        _check(fr_pb_next_field(&d.c, &p, end, depth, &f), d, what)
        if f.wire_type != FR_PB_LEN:
            continue
        if f.number == 1:
            _check(fr_pb_check_utf8(&d.c, &f), d, what)
            keys.append(_str(fr_span(f.ptr, f.len)))
        elif f.number == 2:
            values.append(_array_from(d, f.ptr, f.len, depth + 1, what))
    return 0


cdef ParametersRecord _params_record(list keys, list values):
    # Flower: ParametersRecord(OrderedDict(zip(keys, values))): the shorter list
    # wins, a repeated key keeps its first position and its last array.
    cdef ParametersRecord rec = ParametersRecord.__new__(ParametersRecord)
    rec._data = dict(zip(keys, values))
    return rec


cdef MetricsRecord _new_metrics(dict data):
    cdef MetricsRecord rec = MetricsRecord.__new__(MetricsRecord)
    rec._data = data
    return rec


cdef ConfigsRecord _new_configs(dict data):
    cdef ConfigsRecord rec = ConfigsRecord.__new__(ConfigsRecord)
    rec._data = data
    return rec


cdef int _recordset_merge(_Dec d, const uint8_t *ptr, size_t len, int depth, dict params,
                          dict metrics, dict configs, str what) except -1:
    """Merge one occurrence of a RecordSet body into the three dicts."""
    cdef const uint8_t *p = ptr
    cdef const uint8_t *end = ptr + len
    cdef const uint8_t *q
    cdef const uint8_t *qend
    cdef fr_pb_field f, g
    cdef fr_span key
    cdef dict items
    cdef TypedDict rec
    cdef list keys, values
    cdef bint unknown
    if depth > FR_PB_MAX_DEPTH:
        _check(fr_pb_fail(&d.c, ptr, "nesting deeper than 100"), d, what)
    while p < end:
        _check(fr_pb_next_field(&d.c, &p, end, depth, &f), d, what)
        if f.wire_type != FR_PB_LEN or f.number < 1 or f.number > 3:
            continue
        # One map entry: the last key, the value occurrences merged in order.
        if depth + 1 > FR_PB_MAX_DEPTH:
            _check(fr_pb_fail(&d.c, f.ptr, "nesting deeper than 100"), d, what)
        key.ptr = f.ptr
        key.len = 0
        # a record's items are merged straight into the fresh record's own dict
        rec = None if f.number == 1 else MetricsRecord.__new__(MetricsRecord) \
            if f.number == 2 else ConfigsRecord.__new__(ConfigsRecord)
        items = None if rec is None else rec._data
        keys = [] if f.number == 1 else None
        values = [] if f.number == 1 else None
        q = f.ptr
        qend = f.ptr + f.len
        unknown = False
        while q < qend:
            _check(fr_pb_next_field(&d.c, &q, qend, depth + 1, &g), d, what)
            if g.wire_type != FR_PB_LEN or g.number > 2:
                unknown = True
                continue
            if g.number == 1:
                _check(fr_pb_check_utf8(&d.c, &g), d, what)
                key.ptr = g.ptr
                key.len = g.len
            elif g.number == 2:
                if f.number == 1:
                    _params_merge(d, g.ptr, g.len, depth + 2, keys, values, what)
                else:
                    _items_merge(d, g.ptr, g.len, f.number == 3, depth + 2, items, what)
        if unknown:
            continue   # protobuf keeps a map entry with unknown fields as an unknown field
        if f.number == 1:
            params[key_str(key.ptr, key.len)] = _params_record(keys, values)
        elif f.number == 2:
            metrics[key_str(key.ptr, key.len)] = rec
        else:
            configs[key_str(key.ptr, key.len)] = rec
    return 0


def array_from_bytes(buf):
    cdef _In inp = _input(buf)
    cdef _Dec d = _Dec.__new__(_Dec)
    d.start(inp)
    return _array_from(d, inp.ptr, inp.len, 0, "Array")


def parameters_record_from_bytes(buf):
    cdef _In inp = _input(buf)
    cdef _Dec d = _Dec.__new__(_Dec)
    d.start(inp)
    cdef list keys = [], values = []
    _params_merge(d, inp.ptr, inp.len, 0, keys, values, "ParametersRecord")
    return _params_record(keys, values)


def record_items_from_bytes(buf, bint configs, bint map_entries=True):
    """The items of a MetricsRecord (configs false) or ConfigsRecord body as a dict.

    The entries are field 1 of the body. ``map_entries`` (Flower 1.15's
    ``map<string, Value>``): an entry holding an unknown field is dropped, as
    protobuf does; false for a repeated entry message (Flower 1.42), whose
    entries are all kept. A repeated key keeps its last value."""
    cdef _In inp = _input(buf)
    cdef _Dec d = _Dec.__new__(_Dec)
    d.start(inp)
    cdef dict out = {}
    what = "ConfigsRecord" if configs else "MetricsRecord"
    _items_merge(d, inp.ptr, inp.len, configs, 0, out, what, map_entries)
    if d.empty_seen:
        _refuse_empty((out,), what)
    return out


def metrics_record_from_bytes(buf):
    cdef MetricsRecord rec = _new_metrics(record_items_from_bytes(buf, False))
    seal_record(rec)
    return rec


def configs_record_from_bytes(buf):
    cdef ConfigsRecord rec = _new_configs(record_items_from_bytes(buf, True))
    seal_record(rec)
    return rec


def recordset_from_bytes(buf):
    cdef _In inp = None
    cdef const uint8_t *ptr
    cdef size_t n
    if PyBytes_CheckExact(buf):
        ptr = <const uint8_t *>PyBytes_AS_STRING(buf)
        n = <size_t>PyBytes_GET_SIZE(buf)
    else:
        inp = _input(buf)
        ptr = inp.ptr
        n = inp.len
    cdef _Dec d = _acquire()
    cdef dict p = {}, m = {}, c = {}
    try:
        d.c.base = ptr
        d.c.err = NULL
        d.c.err_off = 0
        d.empty_seen = False
        _recordset_merge(d, ptr, n, 0, p, m, c, "RecordSet")
        if d.empty_seen:
            _refuse_empty(list(m.values()) + list(c.values()), "RecordSet")
    finally:
        _release(d)
    return recordset_from_dicts(p, m, c)


_METADATA_FIELDS = ("run_id", "message_id", "src_node_id", "dst_node_id", "reply_to_message",
                    "group_id", "ttl", "message_type", "created_at")
# wire type of each Metadata field (1-based field numbers)
cdef int _MD_WT[10]
_MD_WT[:] = [-1, FR_PB_VARINT, FR_PB_LEN, FR_PB_VARINT, FR_PB_VARINT, FR_PB_LEN, FR_PB_LEN,
             FR_PB_I64, FR_PB_LEN, FR_PB_I64]


cdef int _metadata_merge(_Dec d, const uint8_t *ptr, size_t len, list md) except -1:
    cdef const uint8_t *p = ptr
    cdef const uint8_t *end = ptr + len
    cdef fr_pb_field f
    while p < end:
        _check(fr_pb_next_field(&d.c, &p, end, 1, &f), d, "Message")
        if f.number < 1 or f.number > 9 or f.wire_type != _MD_WT[f.number]:
            continue
        if f.wire_type == FR_PB_VARINT:
            md[f.number - 1] = PyLong_FromUnsignedLongLong(f.u)
        elif f.wire_type == FR_PB_I64:
            md[f.number - 1] = PyFloat_FromDouble(fr_pb_bits_to_double(f.u))
        else:
            _check(fr_pb_check_utf8(&d.c, &f), d, "Message")
            md[f.number - 1] = _str(fr_span(f.ptr, f.len))
    return 0


cdef int _error_merge(_Dec d, const uint8_t *ptr, size_t len, list err) except -1:
    cdef const uint8_t *p = ptr
    cdef const uint8_t *end = ptr + len
    cdef fr_pb_field f
    while p < end:
        _check(fr_pb_next_field(&d.c, &p, end, 1, &f), d, "Message")
        if f.number == 1 and f.wire_type == FR_PB_VARINT:
            err[0] = PyLong_FromLongLong(fr_pb_unzigzag64(f.u))
        elif f.number == 2 and f.wire_type == FR_PB_LEN:
            _check(fr_pb_check_utf8(&d.c, &f), d, "Message")
            err[1] = _str(fr_span(f.ptr, f.len))
    return 0


cdef tuple _message_parse(_Dec d, const uint8_t *ptr, size_t len, bint want_content):
    """(metadata list, content dicts or None, error list or None) of a Message."""
    cdef const uint8_t *p = ptr
    cdef const uint8_t *end = ptr + len
    cdef fr_pb_field f
    cdef list md = [0, "", 0, 0, "", "", 0.0, "", 0.0]
    cdef list err = None
    cdef tuple content = None
    while p < end:
        _check(fr_pb_next_field(&d.c, &p, end, 0, &f), d, "Message")
        if f.wire_type != FR_PB_LEN:
            continue
        if f.number == 1:
            _metadata_merge(d, f.ptr, f.len, md)
        elif f.number == 2:
            if content is None:
                content = ({}, {}, {})
            _recordset_merge(d, f.ptr, f.len, 1, content[0], content[1], content[2], "Message")
        elif f.number == 3:
            if err is None:
                err = [0, ""]
            _error_merge(d, f.ptr, f.len, err)
    if (content is None) == (err is None):
        raise ValueError("Either `content` or `error` must be set, but not both.")
    return md, content, err


def message_from_bytes(buf):
    cdef _In inp = _input(buf)
    cdef _Dec d = _Dec.__new__(_Dec)
    d.start(inp)
    md, content, err = _message_parse(d, inp.ptr, inp.len, True)
    if d.empty_seen and content is not None:
        _refuse_empty(list(content[1].values()) + list(content[2].values()), "Message")
    metadata = dict(zip(_METADATA_FIELDS, md))
    rs = None if content is None else recordset_from_dicts(content[0], content[1], content[2])
    error = None if err is None else {"code": err[0], "reason": err[1] if err[1] else None}
    return metadata, rs, error


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------

cdef class _Items:
    """One metrics/configs record prepared for writing: sorted keys, C values, sizes."""
    cdef Py_ssize_t n
    cdef fr_value *vals
    cdef const uint8_t **keys
    cdef size_t *key_lens
    cdef size_t *sizes
    cdef size_t body          # bytes of the record message body
    cdef list keep

    def __dealloc__(self):
        cdef Py_ssize_t k
        if self.vals != NULL:
            for k in range(self.n):
                fr_value_free(&self.vals[k])
        free(self.vals)   # the whole block


cdef inline dict _data_of(object record):
    if isinstance(record, TypedDict):
        return (<TypedDict>record)._data
    return dict(record.items())


cdef list _sorted_keys(dict data):
    """Keys in upb's deterministic map order: by UTF-8 bytes, except that when
    one key is a prefix of another the longer one comes first."""
    cdef list keys = list(data)
    cdef object k
    cdef Py_ssize_t i
    for k in keys:
        if type(k) is not str:
            keys.sort(key=_map_sort_key)
            return keys
    keys.sort()   # code-point order is UTF-8 byte order
    for i in range(len(keys) - 1):
        # A prefix pair is always adjacent after sorting; only then differ.
        if PyUnicode_Tailmatch(keys[i + 1], keys[i], 0, PY_SSIZE_T_MAX, -1) == 1:
            keys.sort(key=_map_sort_key)
            break
    return keys


cdef bytes _key_bytes(object k):
    cdef const uint8_t *p
    cdef size_t n
    if type(k) is not str and not isinstance(k, str):
        raise TypeError(f"record keys must be str, got {type(k).__name__}")
    p = _utf8(k, &n)
    return PyBytes_FromStringAndSize(<const char *>p, <Py_ssize_t>n)


def _utf8_key(k):
    return _key_bytes(k)


def _map_sort_key(k):
    # 0xff never occurs in UTF-8, so a key sorts after every key it is a prefix of.
    return _utf8_key(k) + b"\xff"


cdef _Items _items_of(object record, bint configs, bint sort):
    cdef dict data = _data_of(record)
    cdef list keys = _sorted_keys(data) if sort else list(data)
    cdef _Items it = _Items.__new__(_Items)
    cdef Py_ssize_t k, n = len(keys)
    cdef int ok
    it.keep = [keys]
    cdef size_t m = <size_t>(n if n else 1)
    # one block: values, then key pointers, key lengths and value sizes
    cdef char *block = <char *>malloc(m * (sizeof(fr_value) + sizeof(uint8_t *) + 2 * sizeof(size_t)))
    if block == NULL:
        raise MemoryError()
    it.vals = <fr_value *>block
    it.keys = <const uint8_t **>(block + m * sizeof(fr_value))
    it.key_lens = <size_t *>(block + m * (sizeof(fr_value) + sizeof(uint8_t *)))
    it.sizes = it.key_lens + m
    for k in range(n):
        fr_value_init(&it.vals[k])
    it.n = n
    it.body = 0
    for k in range(n):
        key = keys[k]
        if type(key) is not str and not isinstance(key, str):
            raise TypeError(f"record keys must be str, got {type(key).__name__}")
        it.keys[k] = _utf8(key, &it.key_lens[k])
        value_from_py(data[key], configs, &it.vals[k], it.keep)
        it.sizes[k] = fr_wire_value_size(&it.vals[k], &ok)
        it.body += fr_wire_entry_size(1, it.key_lens[k], it.sizes[k])
    return it


# --- errors in Flower's order -----------------------------------------------------
#
# With more than one value protobuf refuses, which error is raised depends on the order
# of conversion. fastrec prepares a record in key order, key by key; Flower's serde
# converts every value (in the record's order), then protobuf's constructor the keys,
# record by record, and a RecordSet's record names last. So, only once something failed,
# the replays below redo the conversions in Flower's order, raising the error it raises.

cdef int replay_items(object record, bint configs) except -1:
    cdef fr_value v
    fr_value_init(&v)
    try:
        entries = list(_data_of(record).items())
        for _, value in entries:
            value_from_py(value, configs, &v, [])
        for key, _ in entries:
            _key_bytes(key)
    finally:
        fr_value_free(&v)
    return 0


cdef int _replay_params(object record) except -1:
    entries = list(_data_of(record).items())
    for key, _ in entries:      # ProtoParametersRecord(data_keys=..., data_values=...)
        _key_bytes(key)
    for _, a in entries:
        _prepare_array(a)
    return 0


cdef int _replay_recordset(object rs) except -1:
    groups = _recordset_groups(rs)
    for number in range(1, 4):
        for rec in list((<dict>groups[number - 1]).values()):
            if number == 1:
                _replay_params(rec)
            else:
                replay_items(rec, number == 3)
    for number in range(1, 4):
        for name in list(<dict>groups[number - 1]):
            _key_bytes(name)
    return 0


cdef _Items _prepare_items(object record, bint configs, bint sort):
    try:
        return _items_of(record, configs, sort)
    except (TypeError, ValueError):
        replay_items(record, configs)
        raise


# --- fast path: records of exact scalars, prepared in a reused C arena --------
#
# Most records on the wire hold a handful of exact floats/ints (configs: also
# bools, strs, bytes). For those, the entries are read straight off the dict
# into a module-level arena (the GIL is held and no Python code runs between
# preparing and writing, so one arena suffices), sorted in place, sized and
# written: no per-record Python objects. Anything else (lists, subclasses,
# ints beyond int64, non-str keys, big records) takes the general path, which
# decides it exactly as before.

cdef extern from "Python.h":
    const char *_utf8_noexc "PyUnicode_AsUTF8AndSize"(PyObject *s, Py_ssize_t *size)
    void PyErr_Clear()
    Py_ssize_t PyDict_GET_SIZE(object d)
    bint PyUnicode_CheckExact(PyObject *o)

cdef struct _Ent:
    fr_span key         # first, as in _Rec: _sort_last reads it
    size_t vsize
    Py_ssize_t ioff     # a list's elements: at _items[ioff:] (re-pointed when written)
    fr_value v

cdef struct _Rec:
    fr_span key         # the record's name
    uint32_t number
    Py_ssize_t first
    Py_ssize_t count
    size_t body

cdef enum:
    _FAST_MAX = 64      # entries per record / records per group on the fast path

cdef _Ent *_ents = NULL
cdef Py_ssize_t _ents_cap = 0
cdef _Rec *_recs = NULL
cdef Py_ssize_t _recs_cap = 0
cdef uint64_t *_items = NULL     # list elements (double or int64) of the entries
cdef Py_ssize_t _items_cap = 0, _items_len = 0


cdef int _grow_items(Py_ssize_t n) except -1:
    global _items, _items_cap
    cdef void *p
    if _items_len + n > _items_cap:
        p = realloc(_items, <size_t>((_items_len + n) * 2) * sizeof(uint64_t))
        if p == NULL:
            raise MemoryError()
        _items, _items_cap = <uint64_t *>p, (_items_len + n) * 2
    return 0


cdef int _fast_list(list items, _Ent *e) except -2:
    """A non-empty list of exact floats or of exact int64 ints into _items: 0, or -1
    if it is another kind of list (the general path decides those)."""
    global _items_len
    cdef Py_ssize_t k, n = len(items)
    cdef object tp
    cdef PyObject *x
    cdef int overflow = 0
    cdef long long ll
    if n == 0 or n > (1 << 20):
        return -1
    tp = type(items[0])
    if tp is not float and tp is not int:
        return -1
    _grow_items(n)
    e.ioff = _items_len
    for k in range(n):
        x = <PyObject *>items[k]
        if type(<object>x) is not tp:
            return -1
        if tp is float:
            (<double *>&_items[_items_len + k])[0] = PyFloat_AS_DOUBLE(<object>x)
        else:
            ll = PyLong_AsLongLongAndOverflow(<object>x, &overflow)
            if overflow:
                return -1
            (<int64_t *>&_items[_items_len + k])[0] = ll
    e.v.kind = FR_V_DOUBLE_LIST if tp is float else FR_V_SINT_LIST
    e.v.n = <size_t>n
    e.v.items = &_items[_items_len]
    _items_len += n
    return 0


cdef int _grow(Py_ssize_t ents, Py_ssize_t recs) except -1:
    global _ents, _ents_cap, _recs, _recs_cap
    cdef void *p
    if ents > _ents_cap:
        p = realloc(_ents, <size_t>(ents * 2) * sizeof(_Ent))
        if p == NULL:
            raise MemoryError()
        _ents, _ents_cap = <_Ent *>p, ents * 2
    if recs > _recs_cap:
        p = realloc(_recs, <size_t>(recs * 2) * sizeof(_Rec))
        if p == NULL:
            raise MemoryError()
        _recs, _recs_cap = <_Rec *>p, recs * 2
    return 0


cdef inline int _key_before(const uint8_t *a, size_t na, const uint8_t *b, size_t nb) noexcept:
    """upb's deterministic map order (see _sorted_keys): a sorts before b."""
    cdef int c = memcmp(a, b, na if na < nb else nb)
    if c:
        return c < 0
    return na > nb


cdef union _Slot:       # room for either kind of arena element
    _Ent e
    _Rec r


cdef void _sort_last(char *base, size_t size, Py_ssize_t first, Py_ssize_t j) noexcept:
    """Insertion sort's step over an arena array of _Ent or _Rec (``size`` bytes each,
    each starting with its key): move element j to its place among elements first..j-1,
    which are in upb's map order. Records are small, so this is the whole sort."""
    cdef fr_span key = (<fr_span *>(base + <size_t>j * size))[0]
    cdef const fr_span *prev
    cdef Py_ssize_t a = j
    cdef _Slot tmp
    while a > first:
        prev = <const fr_span *>(base + <size_t>(a - 1) * size)
        if not _key_before(key.ptr, key.len, prev.ptr, prev.len):
            break
        a -= 1
    if a < j:
        memcpy(&tmp, base + <size_t>j * size, size)
        memmove(base + <size_t>(a + 1) * size, base + <size_t>a * size, <size_t>(j - a) * size)
        memcpy(base + <size_t>a * size, &tmp, size)


cdef inline const uint8_t *_fast_utf8(PyObject *s, size_t *n) noexcept:
    """UTF-8 of an exact str, or NULL (exception cleared) if it has none."""
    cdef Py_ssize_t m
    cdef const char *p = _utf8_noexc(s, &m)
    if p == NULL:
        PyErr_Clear()
        return NULL
    n[0] = <size_t>m
    return <const uint8_t *>p


cdef Py_ssize_t fast_entries(dict data, bint configs, bint sort, Py_ssize_t first) except -2:
    """Put data's entries at _ents[first:] (sorted by key if ``sort``, else in the
    dict's order); their count, or -1 if the fast path does not apply. ``first``
    0 starts a new batch (the list-element arena is reset)."""
    global _items_len
    cdef Py_ssize_t n = PyDict_GET_SIZE(data), pos = 0, j = first
    cdef PyObject *kp
    cdef PyObject *vp
    cdef _Ent *e
    cdef object tp
    cdef int overflow, ok
    cdef long long ll
    if n > _FAST_MAX:
        return -1
    if first == 0:
        _items_len = 0
    _grow(first + n, 0)
    while PyDict_Next(data, &pos, &kp, &vp):
        if not PyUnicode_CheckExact(kp):
            return -1
        e = &_ents[j]
        e.key.ptr = _fast_utf8(kp, &e.key.len)
        if e.key.ptr == NULL:
            return -1
        e.v.n = 0
        e.v.items = NULL
        tp = type(<object>vp)
        if tp is float:
            e.v.kind = FR_V_DOUBLE
            e.v.d = PyFloat_AS_DOUBLE(<object>vp)
        elif tp is int:
            overflow = 0
            ll = PyLong_AsLongLongAndOverflow(<object>vp, &overflow)
            if overflow:
                return -1
            e.v.kind = FR_V_SINT64
            e.v.i = ll
        elif tp is list:
            if _fast_list(<list>vp, e) < 0:
                return -1
        elif not configs:
            return -1
        elif tp is bool:
            e.v.kind = FR_V_BOOL
            e.v.b = 1 if (<object>vp) is True else 0
        elif tp is str:
            e.v.kind = FR_V_STRING
            e.v.s.ptr = _fast_utf8(vp, &e.v.s.len)
            if e.v.s.ptr == NULL:
                return -1
        elif tp is bytes:
            e.v.kind = FR_V_BYTES
            e.v.s.ptr = <const uint8_t *>PyBytes_AS_STRING(<object>vp)
            e.v.s.len = <size_t>PyBytes_GET_SIZE(<object>vp)
        else:
            return -1
        e.vsize = fr_wire_value_size(&e.v, &ok)
        if sort:
            _sort_last(<char *>_ents, sizeof(_Ent), first, j)
        j += 1
    return j - first


cdef size_t _ents_body(Py_ssize_t first, Py_ssize_t count) noexcept:
    cdef size_t body = 0
    cdef Py_ssize_t k
    for k in range(first, first + count):
        body += fr_wire_entry_size(1, _ents[k].key.len, _ents[k].vsize)
    return body


cdef inline fr_value *_ent_value(_Ent *e) noexcept:
    if e.v.n:
        e.v.items = &_items[e.ioff]   # the arena may have moved since
    return &e.v


cdef void _put_ents(fr_pb_writer *w, Py_ssize_t first, Py_ssize_t count) noexcept:
    cdef Py_ssize_t k
    for k in range(first, first + count):
        fr_wire_entry_put(w, 1, _ents[k].key.ptr, _ents[k].key.len, _ent_value(&_ents[k]),
                          _ents[k].vsize)


cdef inline size_t _item_payload(_Ent *e) noexcept:
    # Flower 1.42's Item message: an empty key is proto3's default, so omitted
    return fr_pb_len_field_size(2, e.vsize) + (fr_pb_len_field_size(1, e.key.len)
                                               if e.key.len else 0)


cdef size_t fast_items_body(Py_ssize_t count) noexcept:
    """Bytes of _ents[:count] written as a 1.42 record body (repeated Item items = 1)."""
    cdef size_t body = 0
    cdef Py_ssize_t k
    for k in range(count):
        body += fr_pb_len_field_size(1, _item_payload(&_ents[k]))
    return body


cdef void fast_items_put(fr_pb_writer *w, Py_ssize_t count) noexcept:
    cdef Py_ssize_t k
    cdef _Ent *e
    for k in range(count):
        e = &_ents[k]
        fr_pb_put_tag(w, 1, FR_PB_LEN)
        fr_pb_put_varint(w, _item_payload(e))
        if e.key.len:
            fr_pb_put_len_field(w, 1, e.key.ptr, e.key.len)
        fr_pb_put_tag(w, 2, FR_PB_LEN)
        fr_pb_put_varint(w, e.vsize)
        fr_wire_value_put(w, _ent_value(e))


cdef object _fast_record_bytes(dict data, bint configs):
    """The sorted record body of data, or None if the fast path does not apply."""
    cdef Py_ssize_t n = fast_entries(data, configs, True, 0)
    cdef fr_pb_writer w
    if n < 0:
        return None
    out = _new_out(_ents_body(0, n), &w)
    _put_ents(&w, 0, n)
    return out


cdef Py_ssize_t _fast_recordset(RecordSet rs, size_t *body) except -2:
    """Prepare rs's records in the arena (groups in field order, names sorted);
    the number of records, or -1 if the fast path does not apply."""
    cdef Py_ssize_t nrec = 0, nent = 0, cnt, pos, g0
    cdef PyObject *kp
    cdef PyObject *vp
    cdef uint32_t number
    cdef dict data
    cdef _Rec *r
    if PyDict_GET_SIZE(rs.group(0)):
        return -1
    body[0] = 0
    for number in range(2, 4):
        data = rs.group(number - 1)
        if PyDict_GET_SIZE(data) > _FAST_MAX:
            return -1
        g0 = nrec
        pos = 0
        while PyDict_Next(data, &pos, &kp, &vp):
            if not PyUnicode_CheckExact(kp) or not isinstance(<object>vp, TypedDict):
                return -1
            cnt = fast_entries((<TypedDict>vp)._data, number == 3, True, nent)
            if cnt < 0:
                return -1
            _grow(0, nrec + 1)
            r = &_recs[nrec]
            r.key.ptr = _fast_utf8(kp, &r.key.len)
            if r.key.ptr == NULL:
                return -1
            r.number = number
            r.first = nent
            r.count = cnt
            r.body = _ents_body(nent, cnt)
            body[0] += fr_pb_len_field_size(number, fr_pb_len_field_size(1, r.key.len)
                                            + fr_pb_len_field_size(2, r.body))
            nent += cnt
            _sort_last(<char *>_recs, sizeof(_Rec), g0, nrec)
            nrec += 1
    return nrec


cdef void _put_fast_recordset(fr_pb_writer *w, Py_ssize_t nrec) noexcept:
    cdef Py_ssize_t k
    cdef _Rec *r
    for k in range(nrec):
        r = &_recs[k]
        fr_pb_put_tag(w, r.number, FR_PB_LEN)
        fr_pb_put_varint(w, fr_pb_len_field_size(1, r.key.len) + fr_pb_len_field_size(2, r.body))
        fr_pb_put_len_field(w, 1, r.key.ptr, r.key.len)
        fr_pb_put_tag(w, 2, FR_PB_LEN)
        fr_pb_put_varint(w, r.body)
        _put_ents(w, r.first, r.count)


cdef void _put_items(fr_pb_writer *w, _Items it) noexcept:
    cdef Py_ssize_t k
    for k in range(it.n):
        fr_wire_entry_put(w, 1, it.keys[k], it.key_lens[k], &it.vals[k], it.sizes[k])


cdef bytes _new_out(size_t n, fr_pb_writer *w):
    if n > <size_t>PY_SSIZE_T_MAX:
        raise ValueError("message too large to serialize")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>n)
    w.buf = <uint8_t *>PyBytes_AS_STRING(out)
    w.len = 0
    w.cap = n
    return out


def record_items_to_bytes(record, bint configs, bint sort=True):
    """A MetricsRecord (configs false) / ConfigsRecord body holding record's items,
    entries sorted by key bytes (``sort``, protobuf's deterministic map order) or
    in the record's order (a repeated-entry field)."""
    if sort and isinstance(record, TypedDict):
        out = _fast_record_bytes((<TypedDict>record)._data, configs)
        if out is not None:
            return out
    cdef _Items it = _prepare_items(record, configs, sort)
    cdef fr_pb_writer w
    out = _new_out(it.body, &w)
    _put_items(&w, it)
    return out


def metrics_record_to_bytes(record):
    return record_items_to_bytes(record, False)


def configs_record_to_bytes(record):
    return record_items_to_bytes(record, True)


cdef class _Arr:
    """One Array prepared for writing."""
    cdef object keep_dtype, keep_stype, data
    cdef const uint8_t *dtype
    cdef const uint8_t *stype
    cdef size_t dtype_len, stype_len, ndim, size
    cdef int64_t *shape
    cdef Py_buffer view
    cdef bint held

    def __dealloc__(self):
        free(self.shape)
        if self.held:
            PyBuffer_Release(&self.view)


cdef _Arr _prepare_array(object a):
    cdef _Arr r = _Arr.__new__(_Arr)
    cdef Py_ssize_t k
    cdef object dim
    if isinstance(a, Array):
        dtype, shape, stype, data = (<Array>a).dtype, (<Array>a).shape, (<Array>a).stype, (<Array>a).data
    else:
        dtype, shape, stype, data = a.dtype, a.shape, a.stype, a.data
    # Flower's serde is ProtoArray(**vars(array)): the fields are converted in order (the
    # first bad one raises), a field given None is left unset, a string field takes UTF-8
    # bytes too, and a bytes field a bytes subclass.
    r.keep_dtype = dtype = "" if dtype is None else _proto_str(dtype, "Array.dtype")
    r.dtype = _utf8(dtype, &r.dtype_len)
    dims = [] if shape is None else list(shape)
    r.ndim = len(dims)
    r.shape = <int64_t *>malloc((r.ndim if r.ndim else 1) * sizeof(int64_t))
    if r.shape == NULL:
        raise MemoryError()
    for k in range(<Py_ssize_t>r.ndim):
        dim = dims[k]
        if type(dim) is not int:
            dim = PyNumber_Index(dim)
        if not INT32_MIN <= dim <= INT32_MAX:
            raise ValueError(f"Value out of range: {dim}")
        r.shape[k] = <int64_t>dim
    r.keep_stype = stype = "" if stype is None else _proto_str(stype, "Array.stype")
    r.stype = _utf8(stype, &r.stype_len)
    r.data = data = b"" if data is None else _bytes_value(data)
    PyObject_GetBuffer(data, &r.view, PyBUF_SIMPLE)
    r.held = True
    r.size = fr_wire_array_size(r.dtype_len, r.shape, r.ndim, r.stype_len, <size_t>r.view.len)
    return r


cdef void _put_array(fr_pb_writer *w, _Arr r):
    fr_wire_array_put_head(w, r.dtype, r.dtype_len, r.shape, r.ndim, r.stype, r.stype_len,
                           <size_t>r.view.len)
    cdef uint8_t *dst = w.buf + w.len
    cdef const uint8_t *src = <const uint8_t *>r.view.buf
    cdef size_t n = <size_t>r.view.len
    if n >= NOGIL_BYTES:
        with nogil:
            memcpy(dst, src, n)
    elif n:
        memcpy(dst, src, n)
    w.len += n


def array_to_bytes(a):
    cdef _Arr r = _prepare_array(a)
    cdef fr_pb_writer w
    out = _new_out(r.size, &w)
    _put_array(&w, r)
    return out


cdef class _Params:
    """A ParametersRecord prepared for writing: keys (record order) then arrays."""
    cdef list keys      # UTF-8 bytes
    cdef list arrays    # _Arr
    cdef size_t body


cdef _Params _prepare_params(object record):
    try:
        return _params_of(record)
    except (TypeError, ValueError):
        _replay_params(record)
        raise


cdef _Params _params_of(object record):
    cdef _Params r = _Params.__new__(_Params)
    cdef dict data = _data_of(record)
    cdef _Arr a
    r.keys = []
    r.arrays = []
    r.body = 0
    for k, v in data.items():
        kb = _key_bytes(k)
        r.keys.append(kb)
        r.body += fr_pb_len_field_size(1, <size_t>len(kb))
        a = _prepare_array(v)
        r.arrays.append(a)
        r.body += fr_pb_len_field_size(2, a.size)
    return r


cdef void _put_params(fr_pb_writer *w, _Params r):
    cdef bytes kb
    cdef _Arr a
    for kb in r.keys:
        fr_pb_put_len_field(w, 1, PyBytes_AS_STRING(kb), <size_t>PyBytes_GET_SIZE(kb))
    for a in r.arrays:
        fr_pb_put_tag(w, 2, FR_PB_LEN)
        fr_pb_put_varint(w, a.size)
        _put_array(w, a)


def parameters_record_to_bytes(record):
    cdef _Params r = _prepare_params(record)
    cdef fr_pb_writer w
    out = _new_out(r.body, &w)
    _put_params(&w, r)
    return out


cdef class _RS:
    """A RecordSet prepared for writing: three sorted lists of (key, prepared record)."""
    cdef list entries   # (field number, key UTF-8 bytes, prepared record, record body size)
    cdef size_t body


cdef tuple _recordset_groups(object rs):
    if isinstance(rs, RecordSet):
        return ((<RecordSet>rs).group(0), (<RecordSet>rs).group(1), (<RecordSet>rs).group(2))
    return (_data_of(rs.parameters_records), _data_of(rs.metrics_records),
            _data_of(rs.configs_records))


cdef _RS _prepare_recordset(object rs):
    try:
        return _recordset_of(rs)
    except (TypeError, ValueError):
        _replay_recordset(rs)
        raise


cdef _RS _recordset_of(object rs):
    cdef _RS r = _RS.__new__(_RS)
    r.entries = []
    r.body = 0
    cdef size_t body
    cdef int number
    groups = _recordset_groups(rs)
    for number in range(1, 4):
        data = <dict>groups[number - 1]
        if not data:
            continue
        for k in _sorted_keys(data):
            kb = _key_bytes(k)
            rec = data[k]
            if number == 1:
                prep = _params_of(rec)
                body = (<_Params>prep).body
            else:
                prep = _items_of(rec, number == 3, True)
                body = (<_Items>prep).body
            r.entries.append((number, kb, prep, body))
            r.body += fr_pb_len_field_size(
                number, fr_pb_len_field_size(1, <size_t>len(kb)) + fr_pb_len_field_size(2, body))
    return r


cdef void _put_recordset(fr_pb_writer *w, _RS r):
    cdef bytes kb
    cdef size_t body, klen
    for number, kb, prep, body in r.entries:
        klen = <size_t>PyBytes_GET_SIZE(kb)
        fr_pb_put_tag(w, number, FR_PB_LEN)
        fr_pb_put_varint(w, fr_pb_len_field_size(1, klen) + fr_pb_len_field_size(2, body))
        fr_pb_put_len_field(w, 1, PyBytes_AS_STRING(kb), klen)
        fr_pb_put_tag(w, 2, FR_PB_LEN)
        fr_pb_put_varint(w, body)
        if number == 1:
            _put_params(w, <_Params>prep)
        else:
            _put_items(w, <_Items>prep)


def recordset_to_bytes(rs):
    cdef fr_pb_writer w
    cdef size_t body
    cdef Py_ssize_t nrec
    if isinstance(rs, RecordSet):
        nrec = _fast_recordset(<RecordSet>rs, &body)
        if nrec >= 0:
            out = _new_out(body, &w)
            _put_fast_recordset(&w, nrec)
            return out
    cdef _RS r = _prepare_recordset(rs)
    out = _new_out(r.body, &w)
    _put_recordset(&w, r)
    return out


cdef object _proto_str(object x, str what):
    """x for a protobuf string field: a str, or UTF-8 bytes (decoded, as protobuf does)."""
    if isinstance(x, bytes):
        return (<bytes>x).decode("utf-8")
    if not isinstance(x, str):
        raise TypeError(f"{what} must be a str, not {type(x).__name__}")
    return x


cdef bytes _metadata_body(object metadata):
    cdef fr_pb_writer w
    cdef int64_t i = 0
    cdef uint64_t u = 0
    cdef size_t n
    unknown = set(metadata) - set(_METADATA_FIELDS)
    if unknown:
        raise ValueError(f"unknown metadata fields: {sorted(map(str, unknown))}")
    parts = []
    size = 0
    for num, name in enumerate(_METADATA_FIELDS, 1):
        if name not in metadata:
            continue
        x = metadata[name]
        if x is None:   # protobuf's constructor leaves a field given None unset
            continue
        wt = _MD_WT[num]
        if wt == FR_PB_VARINT:
            if isinstance(x, float) or not isinstance(x, int) and not hasattr(x, "__index__"):
                raise TypeError(f"metadata {name!r} must be an int, not {type(x).__name__}")
            if _int_value(x, &i, &u) == 0:
                if i < 0:
                    raise ValueError(f"Value out of range: {x}")
                u = <uint64_t>i
            if u:
                parts.append((num, wt, u))
                size += fr_pb_tag_size(num) + fr_pb_varint_size(u)
        elif wt == FR_PB_I64:
            # protobuf's double setter: any real number (np.float32, Decimal, ...)
            try:
                u = fr_pb_double_to_bits(PyFloat_AsDouble(x))
            except TypeError:
                raise TypeError(f"metadata {name!r} must be a float, not "
                                f"{type(x).__name__}") from None
            if u:
                parts.append((num, wt, u))
                size += fr_pb_tag_size(num) + 8
        else:
            x = _proto_str(x, f"metadata {name!r}")
            b = _key_bytes(x)
            if b:
                parts.append((num, wt, b))
                size += fr_pb_len_field_size(num, <size_t>len(b))
    out = _new_out(size, &w)
    for num, wt, x in parts:
        if wt == FR_PB_VARINT:
            fr_pb_put_tag(&w, num, wt)
            fr_pb_put_varint(&w, <uint64_t>x)
        elif wt == FR_PB_I64:
            fr_pb_put_tag(&w, num, wt)
            fr_pb_put_fixed64(&w, <uint64_t>x)
        else:
            fr_pb_put_len_field(&w, num, PyBytes_AS_STRING(x), <size_t>PyBytes_GET_SIZE(x))
    return out


cdef bytes _error_body(object error):
    cdef fr_pb_writer w
    cdef int64_t i = 0
    cdef uint64_t u = 0
    code = error.get("code", 0)
    reason = error.get("reason", None)
    if code is None:    # unset, as protobuf's constructor takes it
        code = 0
    if isinstance(code, float) or not hasattr(code, "__index__"):
        raise TypeError(f"error 'code' must be an int, not {type(code).__name__}")
    if _int_value(code, &i, &u):
        raise ValueError(f"Value out of range: {code}")
    if not reason:      # Flower's error_to_proto: ``reason if reason else ""``
        reason = ""
    rb = _key_bytes(_proto_str(reason, "error 'reason'"))
    u = fr_pb_zigzag64(i)
    size = (fr_pb_tag_size(1) + fr_pb_varint_size(u) if u else 0) + \
        (fr_pb_len_field_size(2, <size_t>len(rb)) if rb else 0)
    out = _new_out(size, &w)
    if u:
        fr_pb_put_tag(&w, 1, FR_PB_VARINT)
        fr_pb_put_varint(&w, u)
    if rb:
        fr_pb_put_len_field(&w, 2, PyBytes_AS_STRING(rb), <size_t>len(rb))
    return out


def message_to_bytes(metadata, content=None, error=None):
    if (content is None) == (error is None):
        raise ValueError("Either `content` or `error` must be set, but not both.")
    cdef bytes md = _metadata_body(metadata)
    cdef bytes eb = None
    cdef _RS r = None
    cdef size_t size = fr_pb_len_field_size(1, <size_t>len(md)), body = 0
    cdef Py_ssize_t nrec = -1
    if content is not None:
        if isinstance(content, RecordSet):
            nrec = _fast_recordset(<RecordSet>content, &body)
        if nrec < 0:
            r = _prepare_recordset(content)
            body = r.body
        size += fr_pb_len_field_size(2, body)
    else:
        eb = _error_body(error)
        size += fr_pb_len_field_size(3, <size_t>len(eb))
    cdef fr_pb_writer w
    out = _new_out(size, &w)
    fr_pb_put_len_field(&w, 1, PyBytes_AS_STRING(md), <size_t>len(md))
    if nrec >= 0:
        fr_pb_put_tag(&w, 2, FR_PB_LEN)
        fr_pb_put_varint(&w, body)
        _put_fast_recordset(&w, nrec)
    elif r is not None:
        fr_pb_put_tag(&w, 2, FR_PB_LEN)
        fr_pb_put_varint(&w, body)
        _put_recordset(&w, r)
    else:
        fr_pb_put_len_field(&w, 3, PyBytes_AS_STRING(eb), <size_t>len(eb))
    return out


# ---------------------------------------------------------------------------
# Columns straight from serialized client replies
# ---------------------------------------------------------------------------

import numpy as np


cdef class _Leaves:
    """The C leaves of a spec, the numpy columns they fill, and how to return them."""
    cdef fr_wire_leaf *leaves
    cdef Py_ssize_t n
    cdef list names        # metric name (str) per leaf
    cdef list dtypes       # declared dtype per leaf
    cdef list columns      # the array each leaf writes into
    cdef list keep

    def __dealloc__(self):
        free(self.leaves)


cdef list _spec_snapshot(object spec):
    """[(metric name, spec, its items if it is a list/tuple spec)], read once: the spec is
    used twice (the leaves, then the result's structure) with Python code running in
    between, and the two must agree (the result indexes the leaves' columns)."""
    if not hasattr(spec, "items"):
        raise TypeError(f"spec must be a mapping of metric name to TensorSpec, got "
                        f"{type(spec).__name__}")
    return [(name, s, tuple(s) if isinstance(s, (list, tuple)) else None)
            for name, s in spec.items()]


cdef list _leaf_specs(list snap):
    """[(metric name, TensorSpec, width, elem, container)] for a spec's snapshot."""
    from .spec import TensorSpec
    out = []
    for name, s, parts in snap:
        if not isinstance(name, str):
            raise TypeError(f"metric names must be str, got {type(name).__name__}")
        if isinstance(s, TensorSpec):
            if s.shape == ():
                out.append((name, s, 0, -1, None))
            elif len(s.shape) == 1 and s.shape[0] is not None and s.shape[0] > 0:
                out.append((name, s, s.shape[0], -1, None))
            else:  # (0,) too: width 0 is a scalar leaf
                raise TypeError(f"metric {name!r}: metrics_columns reads a scalar or a fixed-"
                                f"length list (of at least one number) per client, not shape "
                                f"{s.shape}")
        elif parts is not None:
            for j, c in enumerate(parts):
                if not isinstance(c, TensorSpec) or c.shape != ():
                    raise TypeError(f"metric {name!r}: a list spec's items must be scalar "
                                    f"TensorSpecs, got {c!r}")
                out.append((name, c, len(parts), j, type(s)))
        elif hasattr(s, "items"):
            raise TypeError(f"metric {name!r}: a nested mapping spec cannot be read from one "
                            f"metric: a metric value is a number or a list of numbers (give "
                            f"a TensorSpec or a list/tuple of scalar TensorSpecs)")
        else:
            raise TypeError(f"metric {name!r}: metrics_columns supports TensorSpec and lists "
                            f"or tuples of scalar TensorSpecs, got {type(s).__name__}")
    return out


cdef _Leaves _make_leaves(list snap, Py_ssize_t n_rows):
    cdef _Leaves L = _Leaves.__new__(_Leaves)
    specs = _leaf_specs(snap)
    L.n = len(specs)
    L.leaves = <fr_wire_leaf *>malloc((L.n if L.n else 1) * sizeof(fr_wire_leaf))
    if L.leaves == NULL:
        raise MemoryError()
    L.names, L.dtypes, L.columns, L.keep = [], [], [], []
    cdef Py_ssize_t k
    cdef fr_wire_leaf *leaf
    cdef object col
    cdef dict encoded = {}
    for k, (name, s, width, elem, _) in enumerate(specs):
        leaf = &L.leaves[k]
        nb = encoded.get(name)
        if nb is None:  # a metric's leaves share one name (fr_wire_columns_object wants it)
            nb = encoded[name] = name.encode("utf-8")
        L.keep.append(nb)
        leaf.name = <const uint8_t *>PyBytes_AS_STRING(nb)
        leaf.name_len = <size_t>len(nb)
        leaf.width = width
        leaf.elem = elem
        dt = s.dtype
        kind = dt.kind
        if kind == "i" or kind == "b":
            leaf.out_type = FR_COL_I64
            info = np.iinfo(dt) if kind == "i" else None
            leaf.imin = int(info.min) if info is not None else 0
            leaf.imax = int(info.max) if info is not None else 1
            work = np.int64
        elif kind == "u":
            leaf.out_type = FR_COL_U64
            leaf.umax = int(np.iinfo(dt).max)
            work = np.uint64
        else:
            leaf.out_type = FR_COL_F64
            work = np.float64
        col = np.empty((n_rows, width) if (width and elem < 0) else (n_rows,), dtype=work)
        leaf.out = <uint8_t *>(<size_t>col.ctypes.data)
        leaf.stride = 8 * width if (width and elem < 0) else 8
        L.names.append(name)
        L.dtypes.append(dt)
        L.columns.append(col)
    L.keep.append(specs)
    return L


_FILL_REASON = {FR_FILL_KIND: "value of the wrong kind", FR_FILL_LENGTH: "list of the wrong length",
                FR_FILL_RANGE: "value outside the column's integer range"}

cdef extern from "wire.h" nogil:
    int fr_wire_columns_object(const uint8_t *buf, size_t len, fr_wire_leaf *leaves,
                               size_t nleaves, size_t row, fr_value *v)

# metrics_columns's wire formats
cdef enum:
    _W_RECORDSET = 0
    _W_MESSAGE = 1
    _W_METRIC_OBJECT = 2

_WIRES = {"recordset": _W_RECORDSET, "message": _W_MESSAGE,
          "metric-record-object": _W_METRIC_OBJECT}


cdef object _at_buffer(object e, object shown):
    """``e`` (a ValueError or TypeError) with the buffer's index in front of its message."""
    cls = TypeError if isinstance(e, TypeError) else ValueError
    return cls(f"buffer {shown}: {e}")


cdef int _fill_row(_Leaves L, Py_ssize_t i, object rec, str where, fr_value *v) except -1:
    """Row ``i`` of every leaf from the metrics mapping ``rec`` (the general path's fill);
    error messages start with ``where`` (the buffer, and the record if there is one)."""
    cdef Py_ssize_t k
    cdef int st
    for k in range(L.n):
        name = L.names[k]
        if name not in rec:
            raise ValueError(f"{where}: no metric {name!r}")
        value = rec[name]
        value_from_py(value, False, v, [])
        st = fr_wire_leaf_fill(&L.leaves[k], <size_t>i, v)
        if st != FR_FILL_OK:
            leaf = L.leaves[k]
            want = (f"a list of {leaf.width} numbers" if leaf.width else "a number")
            raise ValueError(f"{where}, metric {name!r}: {_FILL_REASON[st]} for "
                             f"{L.dtypes[k]} column (want {want}, got {value!r:.80})")
    return 0


cdef int _slow_row(_Leaves L, Py_ssize_t i, object shown, object buf, str record, bint message,
                   fr_value *v) except -1:
    """The general path for one reply: full decode, then the same fill, with errors."""
    try:
        if message:
            _, rs, err = message_from_bytes(buf)
            if rs is None:
                raise ValueError(f"the message carries an error ({err}), not content")
        else:
            rs = recordset_from_bytes(buf)
    except (ValueError, TypeError) as e:
        raise _at_buffer(e, shown) from None
    rec = rs.metrics_records.get(record)
    if rec is None:
        raise ValueError(f"buffer {shown}: no MetricsRecord {record!r} (it has "
                         f"{sorted(rs.metrics_records)})")
    return _fill_row(L, i, rec, f"buffer {shown}, record {record!r}", v)


cdef int _slow_object_row(_Leaves L, Py_ssize_t i, object shown, object buf,
                          fr_value *v) except -1:
    """The general path for one MetricRecord object: fastrec.app's inflate, then the fill."""
    from .app import MetricRecord
    content = bytes(buf)
    try:
        rec = MetricRecord.inflate(content)
    except (ValueError, TypeError) as e:
        raise _at_buffer(e, shown) from None
    # The header checked out, so it is UTF-8 up to the NUL, in three parts. Its child ids
    # are what Flower inflates the object with; a MetricRecord has none.
    children = content[:content.index(0)].decode("utf-8").split(" ")[1]
    if children:
        raise ValueError(f"buffer {shown}: `MetricRecord` objects do not have children "
                         f"(the header lists {len(children.split(','))})")
    return _fill_row(L, i, rec, f"buffer {shown}", v)


def metrics_columns(buffers, record, spec, *, wire="recordset", buffer_offset=0):
    """Read the metrics of every serialized reply into columns for ``spec``.

    ``buffers`` are bytes-like serialized Flower 1.15 ``RecordSet``s
    (``wire="recordset"``) or ``Message``s (``wire="message"``), whose MetricsRecord
    ``record`` is read, or the contents of Flower 1.42 ``MetricRecord`` objects
    (``wire="metric-record-object"``: what ``MetricRecord.deflate()`` returns, in
    ``fastrec.app`` or ``flwr.app``; ``record`` must then be ``None``). The result is
    the batch ``AggregationProcess.next_columnar`` takes: per metric, a scalar
    ``TensorSpec`` gives an (n,) column in its dtype, a shape-(m,) spec an (n, m) column
    from a list value of m numbers, and a list/tuple of scalar specs a list/tuple of (n,)
    columns from the list value's elements. The replies are parsed in C without the GIL
    and without Python objects per reply; a malformed reply, a missing record or metric,
    or a value of the wrong kind, length or range is a ``ValueError`` naming the buffer
    index, the record (if any) and the metric. A MetricRecord object is read as
    ``fastrec.app.MetricRecord.inflate`` reads it (an Item's key given twice: the last
    one counts), and must have that class name and no children. ``buffer_offset`` is
    added to every buffer index in those messages (the position of ``buffers[0]`` in a
    larger batch split across workers).

    >>> from fastrec import MetricsRecord, RecordSet, TensorSpec
    >>> from fastrec.wire import metrics_columns, recordset_to_bytes
    >>> bufs = [recordset_to_bytes(RecordSet(metrics_records={"eval": MetricsRecord(
    ...     {"acc": 0.5 * i, "hist": [i, 1]})})) for i in range(3)]
    >>> cols = metrics_columns(bufs, "eval", {"acc": TensorSpec("float32"),
    ...                                       "hist": TensorSpec("int64", (2,))})
    >>> cols["acc"], cols["hist"].tolist()
    (array([0. , 0.5, 1. ], dtype=float32), [[0, 1], [1, 1], [2, 1]])
    >>> from fastrec.app import MetricRecord
    >>> objs = [MetricRecord({"acc": 0.25 * i}).deflate() for i in range(3)]
    >>> metrics_columns(objs, None, {"acc": TensorSpec("float64")},
    ...                 wire="metric-record-object")["acc"]
    array([0.  , 0.25, 0.5 ])
    """
    if not isinstance(wire, str) or wire not in _WIRES:
        raise ValueError(f"wire must be 'recordset', 'message' or 'metric-record-object', "
                         f"got {wire!r}")
    cdef int kind = _WIRES[wire]
    if kind == _W_METRIC_OBJECT:
        if record is not None:
            raise ValueError(f"record must be None for wire='metric-record-object' (each "
                             f"buffer is one MetricRecord), got {record!r}")
    elif not isinstance(record, str):
        raise TypeError(f"record must be a str, got {type(record).__name__}")
    try:
        if isinstance(buffer_offset, bool):
            raise TypeError
        offset = PyNumber_Index(buffer_offset)
    except TypeError:
        raise TypeError(f"buffer_offset must be an int, got {type(buffer_offset).__name__}"
                        ) from None
    if offset < 0:
        raise ValueError(f"buffer_offset must be >= 0, got {offset}")
    cdef bint message = kind == _W_MESSAGE
    cdef list bufs = list(buffers)
    cdef Py_ssize_t n = len(bufs), i
    cdef list snap = _spec_snapshot(spec)
    cdef _Leaves L = _make_leaves(snap, n)
    cdef list inputs = [None] * n
    cdef _Dec d = _Dec.__new__(_Dec)
    cdef _In inp
    # Everything that can raise goes before the mallocs, which only the finally below frees
    # (a record name with a lone surrogate used to leak all three).
    cdef bytes rb = record.encode("utf-8") if record is not None else b""
    cdef const uint8_t *rp = <const uint8_t *>PyBytes_AS_STRING(rb)
    cdef size_t rlen = <size_t>len(rb)
    cdef fr_wire_leaf *leaves = L.leaves
    cdef size_t nleaves = <size_t>L.n
    cdef const uint8_t **ptrs = <const uint8_t **>malloc((n if n else 1) * sizeof(uint8_t *))
    cdef size_t *lens = <size_t *>malloc((n if n else 1) * sizeof(size_t))
    cdef uint8_t *slow = <uint8_t *>malloc(n if n else 1)
    try:
        if ptrs == NULL or lens == NULL or slow == NULL:
            raise MemoryError()
        for i in range(n):
            b = bufs[i]
            if PyBytes_CheckExact(b):   # kept alive by bufs
                ptrs[i] = <const uint8_t *>PyBytes_AS_STRING(b)
                lens[i] = <size_t>PyBytes_GET_SIZE(b)
                continue
            try:
                inp = _input(b)
            except (TypeError, ValueError) as e:
                raise _at_buffer(e, i + offset) from None
            inputs[i] = inp
            ptrs[i] = inp.ptr
            lens[i] = inp.len
        with nogil:
            if kind == _W_METRIC_OBJECT:
                for i in range(n):
                    slow[i] = <uint8_t>fr_wire_columns_object(ptrs[i], lens[i], leaves, nleaves,
                                                              <size_t>i, &d.v)
            else:
                for i in range(n):
                    slow[i] = <uint8_t>fr_wire_columns_row(ptrs[i], lens[i], message, rp, rlen,
                                                           leaves, nleaves, <size_t>i, &d.v,
                                                           &d.a)
        for i in range(n):
            if not slow[i]:
                continue
            if kind == _W_METRIC_OBJECT:
                _slow_object_row(L, i, i + offset, bufs[i], &d.v)
            else:
                _slow_row(L, i, i + offset, bufs[i], record, message, &d.v)
    finally:
        free(ptrs)
        free(lens)
        free(slow)
    # Assemble the batch in the spec's structure, in the declared dtypes.
    out = {}
    cdef Py_ssize_t k = 0
    for name, s, parts in snap:
        if parts is not None:
            cols = []
            for _ in parts:
                cols.append(L.columns[k].astype(L.dtypes[k], copy=False))
                k += 1
            out[name] = type(s)(cols) if isinstance(s, tuple) else cols
        else:
            out[name] = L.columns[k].astype(L.dtypes[k], copy=False)
            k += 1
    return out
