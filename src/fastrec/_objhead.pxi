# Object header: b"<Class> <child ids> <body length>\x00" + body (included by _app.pyx).
#
# Building: one allocation, header and body copied in (the body copy without
# the GIL when it is large). Parsing follows Flower's validate_object_content
# and get_object_body: split at the first NUL; the head must be UTF-8 with
# exactly three space-separated parts; every non-empty child id must be a
# 64-character base-16 number; the body length must equal the digits; the
# class name must be the expected one. The common case (ASCII head, lowercase
# hex ids, plain decimal length) is checked in C; anything else is decided by
# the same Python operations Flower uses (str.split, int(x, 16), int(x)).

from fastrec._wire cimport same_bytes

cdef enum:
    _NOGIL_COPY = 1 << 20


cdef bytes _class_name(object obj, bytes name, bint exact, bint is_class=False):
    """The class name an object's header carries: Flower writes (and inflate expects)
    ``type(obj).__qualname__``, so a subclass's objects carry the subclass's name.
    ``name`` is the fastrec class's own, for ``exact`` instances (or classes)."""
    if exact:
        return name
    return (obj if is_class else type(obj)).__qualname__.encode("utf-8")


cdef Py_ssize_t _head_len(Py_ssize_t name_n, Py_ssize_t kids_n, Py_ssize_t body_n) noexcept nogil:
    cdef Py_ssize_t digits = 1
    cdef Py_ssize_t v = body_n
    while v >= 10:
        v //= 10
        digits += 1
    return name_n + 1 + kids_n + 1 + digits + 1


cdef char* _write_head(char* dst, const char* name, Py_ssize_t name_n, const char* kids,
                       Py_ssize_t kids_n, Py_ssize_t body_n) noexcept nogil:
    """Write "<name> <kids> <body_n>\\0" at dst; returns the end. Room: _head_len()."""
    cdef char digits[24]
    cdef int nd = 0
    memcpy(dst, name, name_n)
    dst += name_n
    dst[0] = 32
    dst += 1
    if kids_n:
        memcpy(dst, kids, kids_n)
        dst += kids_n
    dst[0] = 32
    dst += 1
    while True:
        digits[nd] = <char>(48 + body_n % 10)
        nd += 1
        body_n //= 10
        if body_n == 0:
            break
    while nd > 0:
        nd -= 1
        dst[0] = digits[nd]
        dst += 1
    dst[0] = 0
    return dst + 1


cdef bytes _with_header_raw(bytes name, bytes child_ids, const char* body, Py_ssize_t body_n):
    cdef Py_ssize_t name_n = PyBytes_GET_SIZE(name), kids_n = PyBytes_GET_SIZE(child_ids)
    cdef Py_ssize_t hn = _head_len(name_n, kids_n, body_n)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, hn + body_n)
    cdef char* dst = _write_head(PyBytes_AS_STRING(out), PyBytes_AS_STRING(name), name_n,
                                 PyBytes_AS_STRING(child_ids), kids_n, body_n)
    if body_n >= _NOGIL_COPY:
        with nogil:
            memcpy(dst, body, body_n)
    elif body_n:
        memcpy(dst, body, body_n)
    return out


cdef bytes _with_header(bytes name, bytes child_ids, object body):
    cdef Py_buffer view
    if type(body) is bytes:
        return _with_header_raw(name, child_ids, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))
    PyObject_GetBuffer(body, &view, PyBUF_SIMPLE)
    try:
        return _with_header_raw(name, child_ids, <const char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


@cython.final
cdef class _Head:
    cdef str type_name
    cdef str children_str
    cdef Py_ssize_t body_off

    cdef list child_ids(self):
        # Flower: children_str.split(",") if children_str else []
        return self.children_str.split(",") if self.children_str else []


cdef inline bint _is_lower_hex(unsigned char c) noexcept nogil:
    return (48 <= c <= 57) or (97 <= c <= 102) or (65 <= c <= 70)


cdef bint _valid_id_slow(str cid) except -1:
    # Flower's is_valid_sha256_hash: len 64 and int(cid, 16) succeeds.
    if len(cid) != 64:
        return False
    try:
        int(cid, 16)
    except ValueError:
        return False
    return True


cdef struct _HeadSpans:
    Py_ssize_t sp1   # the first space: the class name is content[:sp1]
    Py_ssize_t sp2   # the second space: child ids are content[sp1 + 1:sp2]
    Py_ssize_t hn    # the NUL: the body starts at hn + 1


cdef int _head_fast(const unsigned char* p, Py_ssize_t n, _HeadSpans* out) except -1:
    """1 if the header is the common, plainly valid kind (ASCII, three parts, lowercase
    or uppercase hex ids, a decimal length equal to the body's), 0 if only Flower's
    general rules can decide. ValueError: no NUL, or a plain length that is wrong."""
    cdef const unsigned char* nul = <const unsigned char*>memchr(p, 0, n)
    if nul == NULL:
        raise ValueError("Unexpected format for object content. Head and body could not "
                         "be split.")
    cdef Py_ssize_t hn = nul - p
    cdef Py_ssize_t i, sp1 = -1, sp2 = -1, nsp = 0, run = 0, nd
    cdef unsigned char c
    cdef int64_t blen = 0
    out.hn = hn
    for i in range(hn):
        c = p[i]
        if c >= 0x80:
            return 0
        if c == 0x20:
            nsp += 1
            if nsp == 1:
                sp1 = i
            elif nsp == 2:
                sp2 = i
            else:
                return 0
    if nsp != 2:
        return 0
    # children: runs of 64 hex digits separated by commas (empty runs allowed)
    for i in range(sp1 + 1, sp2):
        c = p[i]
        if c == 0x2C:
            if run != 0 and run != 64:
                return 0
            run = 0
        elif _is_lower_hex(c):
            run += 1
        else:
            return 0
    if run != 0 and run != 64:
        return 0
    nd = hn - sp2 - 1
    if nd < 1 or nd > 18:
        return 0
    for i in range(sp2 + 1, hn):
        c = p[i]
        if not (48 <= c <= 57):
            return 0
        blen = blen * 10 + (c - 48)
    if blen != n - hn - 1:
        raise ValueError(f"Object content length expected {blen} bytes but got "
                         f"{n - hn - 1} bytes.")
    out.sp1 = sp1
    out.sp2 = sp2
    return 1


cdef Py_ssize_t _body_offset(bytes content, bytes expect) except -1:
    """Where the body of `content` (an object of class `expect`) starts; ValueError
    unless the header checks out. Allocation-free in the common case."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(content)
    cdef _HeadSpans s
    cdef Py_ssize_t en = PyBytes_GET_SIZE(expect)
    if _head_fast(p, PyBytes_GET_SIZE(content), &s):
        if s.sp1 == en and same_bytes(<const uint8_t*>p, <const uint8_t*>PyBytes_AS_STRING(expect),
                                      <size_t>en):
            return s.hn + 1
    return _parse_head(content, expect.decode("utf-8")).body_off


cdef _Head _parse_head(object content, str expect):
    """Split and check an object's header; ValueError unless it checks out."""
    if type(content) is not bytes:
        if isinstance(content, (bytearray, memoryview)):
            content = bytes(content)
        else:
            raise TypeError(f"object content must be bytes, got {type(content).__name__}")
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(content)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(content)
    cdef _HeadSpans s
    cdef _Head h = _Head.__new__(_Head)
    cdef bint fast = _head_fast(p, n, &s)
    cdef Py_ssize_t hn = s.hn
    h.body_off = hn + 1
    if fast:
        h.type_name = PyUnicode_DecodeUTF8(<const char*>p, s.sp1, NULL)
        h.children_str = PyUnicode_DecodeUTF8(<const char*>p + s.sp1 + 1, s.sp2 - s.sp1 - 1,
                                              NULL)
        _check_type(h.type_name, expect)
        return h
    # General path: exactly Flower's operations.
    try:
        head = content[:hn].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"Unexpected format for object head: {exc}") from None
    parts = head.split(" ")
    if len(parts) != 3:
        raise ValueError("Unexpected format for object head.")
    obj_type, children_str, body_len = parts
    for cid in children_str.split(","):
        if cid and not _valid_id_slow(cid):
            raise ValueError(f"Detected invalid object ID ({cid}) in children.")
    try:
        expected_len = int(body_len)
    except ValueError:
        raise ValueError(f"Unexpected body length in object head: {body_len!r}") from None
    if expected_len != n - hn - 1:
        raise ValueError(f"Object content length expected {body_len} bytes but got "
                         f"{n - hn - 1} bytes.")
    h.type_name = obj_type
    h.children_str = children_str
    _check_type(obj_type, expect)
    return h


cdef int _check_type(str obj_type, str expect) except -1:
    if expect is None:
        return 0
    if obj_type != expect:
        raise ValueError(f"Class name ({expect}) and object type ({obj_type}) do not match.")
    return 0
