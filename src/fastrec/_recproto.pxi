# Protobuf bodies of MetricRecord / ConfigRecord objects (included by _app.pyx).
#
# Schema (flwr/proto/recorddict.proto, Flower 1.42):
#   MetricRecord / ConfigRecord { repeated Item items = 1; }
#   Item { string key = 1; <Value> value = 2; }
# where <Value> (MetricRecordValue / ConfigRecordValue) has the oneofs and
# field numbers of Flower 1.15's record values, so the value codec is the
# wire module's (csrc/wire.h, fastrec._wire's value_from_py/value_to_py). What
# is 1.42's own is the Item: an ordinary message, not a map entry, so an
# empty key is omitted (proto3 default), items keep the record's order, and
# on decoding an item's fields may repeat (last key wins, value occurrences
# merge), items with an equal key replace the earlier value in place (a dict
# built from the items, as Flower does), and an item left without a value is
# rejected (Flower's from_proto fails on it) unless a later item replaces it.

from fastrec._status cimport FR_OK, FR_ERR_NOMEM, fr_status
from fastrec._wire cimport (FR_PB_LEN, FR_V_NONE, fr_pb_check_utf8, fr_pb_ctx, fr_pb_field,
                            fr_pb_len_field_size, fr_pb_next_field, fr_pb_put_len_field,
                            fr_pb_put_tag, fr_pb_put_varint, fr_pb_reserve, fr_pb_writer,
                            fr_pb_writer_free, fr_value, fr_value_free, fr_value_init, fr_value_reset,
                            fr_wire_value_merge, fr_wire_value_put, fr_wire_value_size,
                            fast_entries, fast_items_body, fast_items_put,
                            key_str, replay_items, value_from_py, value_to_py)


cdef int _pb_check(fr_status st, fr_pb_ctx* c, bint config) except -1:
    if st == FR_OK:
        return 0
    if st == FR_ERR_NOMEM:
        raise MemoryError()
    name = "ConfigRecord" if config else "MetricRecord"
    why = (<bytes>c.err).decode("ascii", "replace") if c.err != NULL else "invalid input"
    raise ValueError(f"malformed {name} body at byte {c.err_off}: {why}")


cdef bytes _deflate_fast(dict data, bint config, bytes name):
    """The content of a record of exact scalars (the wire module's compiled arena),
    written straight into the result; None if that fast path does not apply."""
    cdef Py_ssize_t n = fast_entries(data, config, False, 0)
    cdef fr_pb_writer w
    if n < 0:
        return None
    cdef size_t body = fast_items_body(n)
    cdef Py_ssize_t name_n = PyBytes_GET_SIZE(name)
    cdef Py_ssize_t hn = _head_len(name_n, 0, <Py_ssize_t>body)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, hn + <Py_ssize_t>body)
    cdef char* dst = _write_head(PyBytes_AS_STRING(out), PyBytes_AS_STRING(name), name_n,
                                 NULL, 0, <Py_ssize_t>body)
    w.buf = <uint8_t*>dst
    w.len = 0
    w.cap = body
    fast_items_put(&w, n)
    return out


cdef bytes _deflate_values(TypedDict rec, bint config):
    cdef fr_value v
    cdef fr_pb_writer w
    cdef size_t vsize, item, total, kn
    cdef Py_ssize_t kn_
    cdef const char* ks
    cdef int ok = 1
    cdef fr_status st
    cdef list keep
    fr_value_init(&v)
    w.buf = NULL
    w.len = 0
    w.cap = 0
    cdef bytes name = _class_name(rec, b"ConfigRecord" if config else b"MetricRecord",
                                  rec._exact)
    # Iterate the dict in C (no view/iterator objects) and share one `keep`
    # list: records are deflated by the ten thousand, and every container
    # allocated counts towards the next garbage collection.
    cdef dict data = rec._data if rec._exact else dict(rec.items())
    cdef bytes fast = _deflate_fast(data, config, name)
    if fast is not None:
        return fast
    cdef Py_ssize_t pos = 0
    cdef PyObject* kp
    cdef PyObject* vp
    keep = []
    try:
        while PyDict_Next(data, &pos, &kp, &vp):
            k = <object>kp
            val = <object>vp
            value_from_py(val, config, &v, keep)
            vsize = fr_wire_value_size(&v, &ok)
            if not ok:
                raise ValueError(f"cannot encode the value of {k!r}")
            ks = PyUnicode_AsUTF8AndSize(k, &kn_)
            kn = <size_t>kn_
            item = fr_pb_len_field_size(2, vsize) + (fr_pb_len_field_size(1, kn) if kn else 0)
            total = fr_pb_len_field_size(1, item)
            if total > w.cap - w.len:
                # grow geometrically: fr_pb_reserve grows to exactly what is asked
                st = fr_pb_reserve(&w, total if total > w.cap else w.cap)
                if st == FR_ERR_NOMEM:
                    raise MemoryError()
                if st != FR_OK:   # FR_ERR_OVERFLOW: an encoding error, with no input offset
                    raise ValueError(f"{name.decode()} too large to serialize")
            fr_pb_put_tag(&w, 1, FR_PB_LEN)
            fr_pb_put_varint(&w, item)
            if kn:
                fr_pb_put_len_field(&w, 1, ks, kn)
            fr_pb_put_tag(&w, 2, FR_PB_LEN)
            fr_pb_put_varint(&w, vsize)
            fr_wire_value_put(&w, &v)
        return _with_header_raw(name, b"", <const char*>w.buf, <Py_ssize_t>w.len)
    except (TypeError, ValueError):
        replay_items(rec, config)   # Flower converts every value first, then the keys
        raise
    finally:
        fr_value_free(&v)
        fr_pb_writer_free(&w)


cdef object _NOVALUE = object()

# Decoding scratch reused from record to record (its list buffer is malloc'ed
# once, not per record). Python code can run while a record is decoded (a
# garbage collection's finalizer), so a nested decode takes a private one.
cdef fr_value _shared_value
cdef bint _shared_busy = False
fr_value_init(&_shared_value)


cdef dict _decode_values(const uint8_t* p, Py_ssize_t n, bint config, dict into=None):
    """The items of a record body, in a new dict, or ``into``: a fresh exact record's own
    dict, to be sealed with it (its lists are untracked as they are made)."""
    global _shared_busy
    cdef fr_pb_ctx c
    c.base = p
    c.err = NULL
    c.err_off = 0
    cdef const uint8_t* cur = p
    cdef const uint8_t* end = p + n
    cdef const uint8_t* icur
    cdef const uint8_t* iend
    cdef const uint8_t* kptr
    cdef size_t klen
    cdef fr_pb_field f, g
    cdef fr_value local
    cdef fr_value* vp
    cdef bint seal = into is not None
    cdef dict out = into if seal else {}
    cdef bint missing = False
    cdef bint shared = not _shared_busy
    if shared:
        _shared_busy = True
        vp = &_shared_value
    else:
        fr_value_init(&local)
        vp = &local
    try:
        while cur < end:
            _pb_check(fr_pb_next_field(&c, &cur, end, 0, &f), &c, config)
            if f.number != 1 or f.wire_type != FR_PB_LEN:
                continue  # unknown field of the record message
            icur = f.ptr
            iend = f.ptr + f.len
            kptr = NULL
            klen = 0
            fr_value_reset(vp)
            while icur < iend:
                _pb_check(fr_pb_next_field(&c, &icur, iend, 1, &g), &c, config)
                if g.wire_type != FR_PB_LEN:
                    continue
                if g.number == 1:
                    _pb_check(fr_pb_check_utf8(&c, &g), &c, config)
                    kptr = g.ptr
                    klen = g.len
                elif g.number == 2:
                    _pb_check(fr_wire_value_merge(&c, vp, g.ptr, g.len, config, 2), &c, config)
            key = key_str(kptr, klen)
            if vp.kind == FR_V_NONE:
                out[key] = _NOVALUE
                missing = True
            else:
                val = value_to_py(vp)
                if seal and type(val) is list:
                    PyObject_GC_UnTrack(val)
                out[key] = val
    finally:
        if shared:
            _shared_busy = False
            if _shared_value.scratch_cap > (1 << 20):
                fr_value_free(&_shared_value)  # do not keep a huge list's buffer
                fr_value_init(&_shared_value)
        else:
            fr_value_free(&local)
    if missing:
        for k, val in out.items():
            if val is _NOVALUE:
                raise ValueError(f"Item {k!r} of the record has no value")
    return out


cdef object _inflate_values(type cls, object content, bint config):
    if type(content) is not bytes:
        if not isinstance(content, (bytearray, memoryview)):
            raise TypeError(f"object content must be bytes, got {type(content).__name__}")
        content = bytes(content)
    cdef bint exact = cls is MetricRecord or cls is ConfigRecord
    cdef Py_ssize_t off = _body_offset(
        content, _class_name(cls, b"ConfigRecord" if config else b"MetricRecord", exact, True))
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(content)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(content)
    cdef TypedDict rec
    if exact:
        # decoded straight into the fresh record's own (empty) dict
        rec = MetricRecord.__new__(MetricRecord) if cls is MetricRecord else \
            ConfigRecord.__new__(ConfigRecord)
        _decode_values(p + off, n - off, config, rec._data)
        seal_record(rec, True)
        return rec
    values = _decode_values(p + off, n - off, config)
    if config:
        return cls(config_dict=values, keep_input=False)   # Flower's call, keywords and all
    return cls(metric_dict=values, keep_input=False)
