# Protobuf bodies of MetricRecord / ConfigRecord objects (included by _app.pyx).
#
# Schema (flwr/proto/recorddict.proto, Flower 1.42):
#   MetricRecord / ConfigRecord { repeated Item items = 1; }
#   Item { string key = 1; <Value> value = 2; }
#   Value oneof: double 1, sint64 2, uint64 3, bool 4, string 5, bytes 6,
#                DoubleList 21, SintList 22, UintList 23, BoolList 24,
#                StringList 25, BytesList 26  (4-6, 24-26: ConfigRecordValue only)
#   *List { repeated <T> vals = 1; }  (numeric lists packed)
#
# Encoding reproduces protobuf's serializer byte for byte: fields in number
# order, proto3 defaults omitted (an empty key, an empty packed list) but a set
# oneof member always written, and Flower's choice of member
# (serde_utils._record_value_to_proto: the first of [bool,] int, float, str,
# bytes the value or every list element is an instance of; uint64 for ints
# above INT64_MAX). Length prefixes are back-patched: 5 bytes are reserved and
# the content moved down once its length is known.
#
# Decoding follows protobuf's parser, defensively: every length is checked
# against what remains; a field of unexpected wire type is skipped as unknown,
# as are unknown fields (groups included, to a bounded depth); a repeated
# message field merges (a oneof list member seen twice concatenates); the last
# key/value of an item wins; strings must be UTF-8. An item without a value is
# rejected (Flower fails on it too). Errors are ValueError with the byte offset.

from cpython.ref cimport Py_INCREF, Py_XDECREF

cdef extern from "string.h":
    void* memmove(void*, const void*, size_t)

cdef extern from "Python.h":
    long long PyLong_AsLongLongAndOverflow(object, int*) except? -1
    unsigned long long PyLong_AsUnsignedLongLong(object) except? -1
    double PyFloat_AsDouble(object) except? -1.0

cdef enum:
    _MAX_DEPTH = 100

cdef struct _Buf:
    uint8_t* p
    Py_ssize_t n
    Py_ssize_t cap
    uint8_t* stack


cdef int _reserve(_Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t need = b.n + extra
    cdef Py_ssize_t cap
    cdef uint8_t* q
    if need <= b.cap:
        return 0
    if extra < 0 or need < 0:
        raise MemoryError()
    cap = b.cap * 2
    if cap < need:
        cap = need
    if b.p == b.stack:
        q = <uint8_t*>malloc(cap)
        if q != NULL:
            memcpy(q, b.p, b.n)
    else:
        q = <uint8_t*>realloc(b.p, cap)
    if q == NULL:
        raise MemoryError()
    b.p = q
    b.cap = cap
    return 0


cdef inline void _put_varint_nocheck(_Buf* b, uint64_t v) noexcept:
    while v >= 0x80:
        b.p[b.n] = <uint8_t>(v | 0x80)
        b.n += 1
        v >>= 7
    b.p[b.n] = <uint8_t>v
    b.n += 1


cdef inline int _put_varint(_Buf* b, uint64_t v) except -1:
    _reserve(b, 10)
    _put_varint_nocheck(b, v)
    return 0


cdef inline int _put_raw(_Buf* b, const void* src, Py_ssize_t n) except -1:
    _reserve(b, n)
    memcpy(b.p + b.n, src, n)
    b.n += n
    return 0


cdef inline int _put_fixed64(_Buf* b, double d) except -1:
    cdef uint64_t u
    memcpy(&u, &d, 8)
    _reserve(b, 8)
    cdef int i
    for i in range(8):
        b.p[b.n + i] = <uint8_t>(u >> (8 * i))
    b.n += 8
    return 0


cdef inline Py_ssize_t _begin_len(_Buf* b) except -1:
    """Reserve room for a length prefix; returns where the content starts."""
    _reserve(b, 5)
    b.n += 5
    return b.n


cdef int _end_len(_Buf* b, Py_ssize_t start) except -1:
    cdef Py_ssize_t length = b.n - start
    if length > 0x7FFFFFFF:
        raise ValueError("record too large for a protobuf message (over 2 GiB)")
    cdef uint8_t tmp[5]
    cdef int k = 0
    cdef uint64_t v = <uint64_t>length
    while v >= 0x80:
        tmp[k] = <uint8_t>(v | 0x80)
        k += 1
        v >>= 7
    tmp[k] = <uint8_t>v
    k += 1
    cdef Py_ssize_t at = start - 5
    if k != 5 and length:
        memmove(b.p + at + k, b.p + start, length)
    memcpy(b.p + at, tmp, k)
    b.n = at + k + length
    return 0


cdef inline uint64_t _zigzag(int64_t v) noexcept:
    return (<uint64_t>v << 1) ^ <uint64_t>(-(v < 0))


# Value kinds chosen for encoding (Flower's field choice).
cdef enum:
    V_DOUBLE = 1
    V_SINT = 2
    V_UINT = 3
    V_BOOL = 4
    V_STR = 5
    V_BYTES = 6
    V_LIST = 20   # + the scalar kind: 21 double_list ... 26 bytes_list


cdef int _int_kind(object v) except -1:
    """V_SINT or V_UINT for an int, ValueError if protobuf would reject its range."""
    if v > INT64_MAX:
        if v > UINT64_MAX:
            raise ValueError(f"Value out of range: {v}")
        return V_UINT
    if v < INT64_MIN:
        raise ValueError(f"Value out of range: {v}")
    return V_SINT


cdef int _scalar_kind(object v, bint config) except -1:
    """Flower's field for a scalar: first allowed type v is an instance of; 0 if none."""
    cdef PyTypeObject* tp = _TYPE(<PyObject*>v)
    if tp == &PyFloat_Type:
        return V_DOUBLE
    if tp == &PyLong_Type:
        return _int_kind(v)
    if config:
        if tp == &PyBool_Type:
            return V_BOOL
        if tp == &PyUnicode_Type:
            return V_STR
        if tp == &PyBytes_Type:
            return V_BYTES
        if isinstance(v, bool):
            return V_BOOL
        if isinstance(v, int):
            return _int_kind(v)
        if isinstance(v, float):
            return V_DOUBLE
        if isinstance(v, str):
            return V_STR
        if isinstance(v, bytes):
            return V_BYTES
        return 0
    if isinstance(v, float):
        return V_DOUBLE
    if isinstance(v, int):
        return _int_kind(v)
    return 0


cdef bint _all_exact(list lst, PyTypeObject* t) noexcept:
    cdef Py_ssize_t i, n = _LIST_SIZE(lst)
    cdef PyObject** items = _LIST_ITEMS(lst)
    for i in range(n):
        if _TYPE(items[i]) != t:
            return False
    return True


cdef int _list_kind(list lst, bint config) except -1:
    """Flower's list field: the first allowed type all elements are instances of; 0 if none."""
    cdef Py_ssize_t n = _LIST_SIZE(lst)
    cdef PyTypeObject* t0
    if n == 0:
        return V_LIST + (V_BOOL if config else V_DOUBLE)
    t0 = _TYPE(_LIST_ITEMS(lst)[0])
    if _all_exact(lst, t0):
        if t0 == &PyFloat_Type:
            return V_LIST + V_DOUBLE
        if t0 == &PyLong_Type:
            return V_LIST + _int_list_kind(lst)
        if config:
            if t0 == &PyBool_Type:
                return V_LIST + V_BOOL
            if t0 == &PyUnicode_Type:
                return V_LIST + V_STR
            if t0 == &PyBytes_Type:
                return V_LIST + V_BYTES
    order = (bool, int, float, str, bytes) if config else (float, int)
    for t in order:
        if all(isinstance(x, t) for x in lst):
            if t is int:
                return V_LIST + _int_list_kind(lst)
            return V_LIST + (V_BOOL if t is bool else V_DOUBLE if t is float else
                             V_STR if t is str else V_BYTES)
    return 0


cdef int _int_list_kind(list lst) except -1:
    for x in lst:
        if x > INT64_MAX:
            return V_UINT
    return V_SINT


cdef int _put_int(_Buf* b, object v, int kind) except -1:
    cdef int overflow = 0
    cdef long long s
    if kind == V_SINT:
        s = PyLong_AsLongLongAndOverflow(v, &overflow)
        if overflow:
            raise ValueError(f"Value out of range: {v}")
        return _put_varint(b, _zigzag(s))
    if v < 0 or v > UINT64_MAX:
        raise ValueError(f"Value out of range: {v}")
    return _put_varint(b, PyLong_AsUnsignedLongLong(int(v)))


cdef int _put_str_or_bytes(_Buf* b, object v, int kind) except -1:
    cdef Py_ssize_t n
    cdef const char* s
    if kind == V_STR:
        s = PyUnicode_AsUTF8AndSize(v, &n)
    else:
        s = PyBytes_AS_STRING(v) if _TYPE(<PyObject*>v) == &PyBytes_Type else NULL
        if s == NULL:
            v = bytes(v)
            s = PyBytes_AS_STRING(v)
        n = PyBytes_GET_SIZE(v)
    _put_varint(b, <uint64_t>n)
    return _put_raw(b, s, n)


cdef int _put_value(_Buf* b, object v, bint config) except -1:
    """Write the Value message's content (one oneof member) for v."""
    cdef int kind
    cdef Py_ssize_t start, inner, i, n
    cdef PyObject** items
    if _TYPE(<PyObject*>v) == &PyList_Type or isinstance(v, list):
        lst = v if _TYPE(<PyObject*>v) == &PyList_Type else list(v)
        kind = _list_kind(lst, config)
        if kind == 0:
            raise _not_allowed(v, config)
        # tag: field (kind), wire type 2; kinds 21..26 are two-byte tags
        _put_varint(b, (<uint64_t>kind << 3) | 2)
        start = _begin_len(b)
        n = _LIST_SIZE(lst)
        items = _LIST_ITEMS(lst)
        kind -= V_LIST
        if n:
            if kind == V_STR or kind == V_BYTES:
                for x in lst:
                    _put_varint(b, 0x0A)
                    _put_str_or_bytes(b, x, kind)
            else:
                _put_varint(b, 0x0A)
                inner = _begin_len(b)
                if kind == V_DOUBLE:
                    _reserve(b, 8 * n)
                    for x in lst:
                        _put_fixed64(b, PyFloat_AsDouble(x))
                elif kind == V_BOOL:
                    _reserve(b, n)
                    for x in lst:
                        b.p[b.n] = 1 if x else 0
                        b.n += 1
                else:
                    for x in lst:
                        _put_int(b, x, kind)
                _end_len(b, inner)
        return _end_len(b, start)
    kind = _scalar_kind(v, config)
    if kind == 0:
        raise _not_allowed(v, config)
    _put_varint(b, (<uint64_t>kind << 3) | (1 if kind == V_DOUBLE else
                                            2 if kind >= V_STR else 0))
    if kind == V_DOUBLE:
        return _put_fixed64(b, PyFloat_AsDouble(v))
    if kind == V_BOOL:
        return _put_varint(b, 1 if v else 0)
    if kind == V_STR or kind == V_BYTES:
        return _put_str_or_bytes(b, v, kind)
    return _put_int(b, v, kind)


cdef object _not_allowed(object v, bint config):
    name = "ConfigRecordValue" if config else "MetricRecordValue"
    return TypeError(f"The type of the following value is not allowed in '{name}':\n{v}")


cdef bytes _deflate_values(TypedDict rec, bint config):
    cdef uint8_t stack[512]
    cdef _Buf b
    b.p = stack
    b.stack = stack
    b.n = 0
    b.cap = sizeof(stack)
    cdef Py_ssize_t item, val, kn
    cdef const char* ks
    cdef bytes name = b"ConfigRecord" if config else b"MetricRecord"
    try:
        for k, v in rec.items():
            _put_varint(&b, 0x0A)
            item = _begin_len(&b)
            ks = PyUnicode_AsUTF8AndSize(k, &kn)
            if kn:
                _put_varint(&b, 0x0A)
                _put_varint(&b, <uint64_t>kn)
                _put_raw(&b, ks, kn)
            _put_varint(&b, 0x12)
            val = _begin_len(&b)
            _put_value(&b, v, config)
            _end_len(&b, val)
            _end_len(&b, item)
        return _with_header_raw(name, b"", <const char*>b.p, b.n)
    finally:
        if b.p != stack:
            free(b.p)


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------

cdef struct _Rd:
    const uint8_t* p     # start of the whole body (for offsets in messages)
    Py_ssize_t pos
    Py_ssize_t end


cdef object _perr(_Rd* r, str what):
    return ValueError(f"Error parsing message: {what} at byte {r.pos}")


cdef int _get_varint(_Rd* r, uint64_t* out) except -1:
    cdef uint64_t v = 0
    cdef int shift = 0
    cdef uint8_t c
    while True:
        if r.pos >= r.end:
            raise _perr(r, "truncated varint")
        c = r.p[r.pos]
        r.pos += 1
        if shift == 63 and c > 1:
            if c & 0x80:
                raise _perr(r, "varint longer than 10 bytes")
        if shift < 64:
            v |= (<uint64_t>(c & 0x7F)) << shift
        if not (c & 0x80):
            break
        shift += 7
        if shift >= 70:
            raise _perr(r, "varint longer than 10 bytes")
    out[0] = v
    return 0


cdef int _get_tag(_Rd* r, uint32_t* field, int* wt) except -1:
    cdef uint64_t t
    _get_varint(r, &t)
    if t > 0xFFFFFFFF:
        raise _perr(r, "invalid tag")
    field[0] = <uint32_t>(t >> 3)
    wt[0] = <int>(t & 7)
    if field[0] == 0:
        raise _perr(r, "invalid field number 0")
    return 0


cdef int _get_len(_Rd* r, Py_ssize_t* out) except -1:
    cdef uint64_t n
    _get_varint(r, &n)
    if n > 0x7FFFFFFF or <Py_ssize_t>n > r.end - r.pos:
        raise _perr(r, "length exceeds the message")
    out[0] = <Py_ssize_t>n
    return 0


cdef int _skip(_Rd* r, uint32_t field, int wt, int depth) except -1:
    """Skip one unknown field whose tag was just read."""
    cdef uint64_t dummy
    cdef Py_ssize_t n
    cdef uint32_t f2
    cdef int w2
    if wt == 0:
        return _get_varint(r, &dummy)
    if wt == 1 or wt == 5:
        n = 8 if wt == 1 else 4
        if r.end - r.pos < n:
            raise _perr(r, "truncated fixed-width field")
        r.pos += n
        return 0
    if wt == 2:
        _get_len(r, &n)
        r.pos += n
        return 0
    if wt == 3:
        if depth >= _MAX_DEPTH:
            raise _perr(r, "groups nest too deeply")
        while True:
            if r.pos >= r.end:
                raise _perr(r, "unterminated group")
            _get_tag(r, &f2, &w2)
            if w2 == 4:
                if f2 != field:
                    raise _perr(r, "mismatched end of group")
                return 0
            _skip(r, f2, w2, depth + 1)
    if wt == 4:
        raise _perr(r, "unexpected end of group")
    raise _perr(r, f"invalid wire type {wt}")


cdef inline double _get_double(_Rd* r) except? -1.0:
    cdef uint64_t u = 0
    cdef int i
    cdef double d
    if r.end - r.pos < 8:
        raise _perr(r, "truncated double")
    for i in range(8):
        u |= (<uint64_t>r.p[r.pos + i]) << (8 * i)
    r.pos += 8
    memcpy(&d, &u, 8)
    return d


cdef str _get_str(_Rd* r, Py_ssize_t n):
    cdef Py_ssize_t at = r.pos
    try:
        s = PyUnicode_DecodeUTF8(<const char*>r.p + at, n, NULL)
    except UnicodeDecodeError:
        raise _perr(r, "string field is not valid UTF-8") from None
    r.pos += n
    return s


cdef object _scalar_of(_Rd* r, int kind, uint64_t v):
    if kind == V_SINT:
        return <int64_t>((v >> 1) ^ (-(v & 1)))
    if kind == V_UINT:
        return v
    return v != 0


cdef int _get_list(_Rd* r, Py_ssize_t end, int kind, list out, int depth) except -1:
    """Parse a *List message body up to `end`, appending to out (merge semantics)."""
    cdef Py_ssize_t saved = r.end, n, sub
    cdef uint32_t f
    cdef int wt
    cdef uint64_t v
    r.end = end
    try:
        while r.pos < r.end:
            _get_tag(r, &f, &wt)
            if f != 1:
                _skip(r, f, wt, depth)
                continue
            if kind == V_STR or kind == V_BYTES:
                if wt != 2:
                    _skip(r, f, wt, depth)
                    continue
                _get_len(r, &n)
                if kind == V_STR:
                    out.append(_get_str(r, n))
                else:
                    out.append(PyBytes_FromStringAndSize(<const char*>r.p + r.pos, n))
                    r.pos += n
            elif kind == V_DOUBLE:
                if wt == 1:
                    out.append(_get_double(r))
                elif wt == 2:
                    _get_len(r, &n)
                    if n % 8:
                        raise _perr(r, "packed double length not a multiple of 8")
                    sub = r.pos + n
                    while r.pos < sub:
                        out.append(_get_double(r))
                else:
                    _skip(r, f, wt, depth)
            else:
                if wt == 0:
                    _get_varint(r, &v)
                    out.append(_scalar_of(r, kind, v))
                elif wt == 2:
                    _get_len(r, &n)
                    sub = r.pos + n
                    saved2 = r.end
                    r.end = sub
                    while r.pos < sub:
                        _get_varint(r, &v)
                        out.append(_scalar_of(r, kind, v))
                    r.end = saved2
                else:
                    _skip(r, f, wt, depth)
    finally:
        r.end = saved
    return 0


cdef struct _VState:
    int case           # the oneof member set so far (0: none)
    PyObject* value    # owned reference, or NULL


cdef inline void _vset(_VState* st, int case, object v) noexcept:
    Py_INCREF(v)
    Py_XDECREF(st.value)
    st.value = <PyObject*>v
    st.case = case


cdef int _get_value(_Rd* r, Py_ssize_t end, bint config, _VState* st, int depth) except -1:
    """Parse a Value message up to `end` into st (merging, like protobuf's parser)."""
    cdef Py_ssize_t saved = r.end, n
    cdef uint32_t f
    cdef int wt, kind
    cdef uint64_t v
    r.end = end
    try:
        while r.pos < r.end:
            _get_tag(r, &f, &wt)
            kind = <int>f
            if kind > 6 and not (21 <= kind <= 26):
                _skip(r, f, wt, depth)
                continue
            if not config and (kind == 4 or kind == 5 or kind == 6 or kind >= 24):
                _skip(r, f, wt, depth)
                continue
            if kind == V_DOUBLE:
                if wt != 1:
                    _skip(r, f, wt, depth)
                    continue
                _vset(st, kind, _get_double(r))
            elif kind <= V_BOOL:
                if wt != 0:
                    _skip(r, f, wt, depth)
                    continue
                _get_varint(r, &v)
                _vset(st, kind, _scalar_of(r, kind, v))
            elif kind <= V_BYTES:
                if wt != 2:
                    _skip(r, f, wt, depth)
                    continue
                _get_len(r, &n)
                if kind == V_STR:
                    _vset(st, kind, _get_str(r, n))
                else:
                    _vset(st, kind, PyBytes_FromStringAndSize(<const char*>r.p + r.pos, n))
                    r.pos += n
            else:
                if wt != 2:
                    _skip(r, f, wt, depth)
                    continue
                _get_len(r, &n)
                if depth + 1 >= _MAX_DEPTH:
                    raise _perr(r, "messages nest too deeply")
                if st.case != kind:
                    _vset(st, kind, [])
                _get_list(r, r.pos + n, kind - V_LIST, <list>st.value, depth + 1)
    finally:
        r.end = saved
    return 0


cdef object _NOVALUE = object()


cdef dict _decode_values(const uint8_t* p, Py_ssize_t n, bint config):
    cdef _Rd r
    r.p = p
    r.pos = 0
    r.end = n
    cdef uint32_t f, f2
    cdef int wt, wt2
    cdef Py_ssize_t ln, item_end, vn, saved
    cdef dict out = {}
    cdef _VState st
    cdef object key
    cdef bint missing = False
    while r.pos < r.end:
        _get_tag(&r, &f, &wt)
        if f != 1 or wt != 2:
            _skip(&r, f, wt, 0)
            continue
        _get_len(&r, &ln)
        item_end = r.pos + ln
        key = ""
        st.case = 0
        st.value = NULL
        saved = r.end
        r.end = item_end
        try:
            while r.pos < r.end:
                _get_tag(&r, &f2, &wt2)
                if f2 == 1 and wt2 == 2:
                    _get_len(&r, &vn)
                    key = _get_str(&r, vn)
                elif f2 == 2 and wt2 == 2:
                    _get_len(&r, &vn)
                    _get_value(&r, r.pos + vn, config, &st, 3)
                else:
                    _skip(&r, f2, wt2, 2)
            if st.case == 0:
                out[key] = _NOVALUE
                missing = True
            else:
                out[key] = <object>st.value
        finally:
            Py_XDECREF(st.value)
            st.value = NULL
        r.end = saved
    if missing:
        for k, v in out.items():
            if v is _NOVALUE:
                raise ValueError(f"Item {k!r} of the record has no value")
    return out


cdef object _inflate_values(type cls, object content, bint config):
    cdef _Head h = _parse_head(content, "ConfigRecord" if config else "MetricRecord")
    if type(content) is not bytes:
        content = bytes(content)
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(content)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(content)
    cdef dict values = _decode_values(p + h.body_off, n - h.body_off, config)
    cdef TypedDict rec
    if cls is MetricRecord or cls is ConfigRecord:
        rec = cls.__new__(cls)
        rec._data = values
        return rec
    return cls(values, keep_input=False)
