# Cython declarations of the protobuf primitives (csrc/pb.h) and Flower's
# record-value codec (csrc/wire.h). Other modules (fastrec.app for Flower
# 1.42, whose record values use the same oneofs) cimport these.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

from fastrec._status cimport fr_status


cdef extern from "pb.h" nogil:
    enum:
        FR_PB_VARINT
        FR_PB_I64
        FR_PB_LEN
        FR_PB_SGROUP
        FR_PB_EGROUP
        FR_PB_I32
        FR_PB_MAX_DEPTH

    ctypedef struct fr_pb_ctx:
        const uint8_t *base
        size_t err_off
        const char *err

    ctypedef struct fr_pb_field:
        uint32_t number
        int wire_type
        const uint8_t *start
        uint64_t u
        const uint8_t *ptr
        size_t len

    ctypedef struct fr_pb_writer:
        uint8_t *buf
        size_t len, cap

    fr_status fr_pb_fail(fr_pb_ctx *c, const uint8_t *at, const char *why)
    fr_status fr_pb_read_varint(fr_pb_ctx *c, const uint8_t **p, const uint8_t *end, uint64_t *v)
    fr_status fr_pb_next_field(fr_pb_ctx *c, const uint8_t **p, const uint8_t *end, int depth,
                               fr_pb_field *f)
    int fr_pb_utf8_valid(const uint8_t *s, size_t n)
    fr_status fr_pb_check_utf8(fr_pb_ctx *c, const fr_pb_field *f)
    uint64_t fr_pb_zigzag64(int64_t n)
    int64_t fr_pb_unzigzag64(uint64_t u)
    double fr_pb_bits_to_double(uint64_t u)
    uint64_t fr_pb_double_to_bits(double d)
    size_t fr_pb_varint_size(uint64_t v)
    size_t fr_pb_tag_size(uint32_t number)
    size_t fr_pb_len_field_size(uint32_t number, size_t n)
    fr_status fr_pb_reserve(fr_pb_writer *w, size_t extra)
    void fr_pb_writer_free(fr_pb_writer *w)
    void fr_pb_put_varint(fr_pb_writer *w, uint64_t v)
    void fr_pb_put_tag(fr_pb_writer *w, uint32_t number, int wire_type)
    void fr_pb_put_fixed64(fr_pb_writer *w, uint64_t v)
    void fr_pb_put_raw(fr_pb_writer *w, const void *src, size_t n)
    void fr_pb_put_len_field(fr_pb_writer *w, uint32_t number, const void *src, size_t n)


cdef extern from "wire.h" nogil:
    enum:
        FR_V_NONE
        FR_V_DOUBLE
        FR_V_SINT64
        FR_V_UINT64
        FR_V_BOOL
        FR_V_STRING
        FR_V_BYTES
        FR_V_DOUBLE_LIST
        FR_V_SINT_LIST
        FR_V_UINT_LIST
        FR_V_BOOL_LIST
        FR_V_STRING_LIST
        FR_V_BYTES_LIST

    ctypedef struct fr_span:
        const uint8_t *ptr
        size_t len

    ctypedef struct fr_value:
        int kind
        double d
        int64_t i
        uint64_t u
        int b
        fr_span s
        size_t n
        void *items
        void *scratch
        size_t scratch_cap

    void fr_value_init(fr_value *v)
    void fr_value_free(fr_value *v)
    void fr_value_reset(fr_value *v)
    fr_status fr_wire_value_merge(fr_pb_ctx *c, fr_value *v, const uint8_t *ptr, size_t len,
                                  int configs, int depth)
    fr_status fr_wire_entry_decode(fr_pb_ctx *c, const uint8_t *ptr, size_t len, int configs,
                                   int depth, fr_span *key, fr_value *v, int *unknown)
    size_t fr_wire_value_size(const fr_value *v, int *ok)
    void fr_wire_value_put(fr_pb_writer *w, const fr_value *v)
    size_t fr_wire_entry_size(uint32_t number, size_t key_len, size_t value_size)
    void fr_wire_entry_put(fr_pb_writer *w, uint32_t number, const uint8_t *key, size_t key_len,
                           const fr_value *v, size_t value_size)

    ctypedef struct fr_wire_array:
        fr_span dtype, stype, data
        size_t ndim
        int32_t *shape
        size_t shape_cap

    void fr_wire_array_init(fr_wire_array *a)
    void fr_wire_array_free(fr_wire_array *a)
    fr_status fr_wire_array_decode(fr_pb_ctx *c, const uint8_t *ptr, size_t len, int depth,
                                   fr_wire_array *a)
    size_t fr_wire_array_size(size_t dtype_len, const int64_t *shape, size_t ndim,
                              size_t stype_len, size_t data_len)
    void fr_wire_array_put_head(fr_pb_writer *w, const uint8_t *dtype, size_t dtype_len,
                                const int64_t *shape, size_t ndim, const uint8_t *stype,
                                size_t stype_len, size_t data_len)


# Python <-> fr_value, shared with fastrec._app (Flower 1.42's records).
cdef object value_to_py(const fr_value *v)
# The str of valid UTF-8 key bytes, shared between equal keys (a small cache).
cdef object key_str(const uint8_t *p, size_t n)


cdef inline bint same_bytes(const uint8_t *a, const uint8_t *b, size_t n) noexcept nogil:
    """a[0:n] == b[0:n], for keys and class names of a few bytes, where a plain loop
    beats a call to the library's memcmp."""
    cdef size_t k
    for k in range(n):
        if a[k] != b[k]:
            return False
    return True
# Fill v from a Python value with Flower's serde rules (bool first for configs);
# list elements go to v's scratch; strings are views into objects that `keep`
# (a list the caller holds until the value is written) keeps alive.
cdef int value_from_py(object value, bint configs, fr_value *v, list keep) except -1
# Raise the error Flower's serde + protobuf raise first for a record that failed to encode.
cdef int replay_items(object record, bint configs) except -1
# The compiled fast path for records of exact scalars (and lists of exact floats or
# int64 ints): entries prepared in a reused arena, valid until the next call.
cdef Py_ssize_t fast_entries(dict data, bint configs, bint sort, Py_ssize_t first) except -2
cdef size_t fast_items_body(Py_ssize_t count) noexcept
cdef void fast_items_put(fr_pb_writer *w, Py_ssize_t count) noexcept


cdef extern from "wire.h" nogil:
    enum:
        FR_COL_F64
        FR_COL_I64
        FR_COL_U64
        FR_FILL_OK
        FR_FILL_KIND
        FR_FILL_LENGTH
        FR_FILL_RANGE

    ctypedef struct fr_wire_leaf:
        const uint8_t *name
        size_t name_len
        size_t width
        int64_t elem
        int out_type
        int64_t imin, imax
        uint64_t umax
        uint8_t *out
        size_t stride
        int seen

    int fr_wire_leaf_fill(const fr_wire_leaf *leaf, size_t row, const fr_value *v)
    int fr_wire_columns_row(const uint8_t *buf, size_t len, int message, const uint8_t *rec,
                            size_t rec_len, fr_wire_leaf *leaves, size_t nleaves, size_t row,
                            fr_value *v, fr_wire_array *a)
