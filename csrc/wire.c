#include "wire.h"

#include <stdlib.h>
#include <string.h>

void fr_value_init(fr_value *v)
{
    memset(v, 0, sizeof *v);
}

void fr_value_free(fr_value *v)
{
    free(v->scratch);
    fr_value_init(v);
}

void fr_value_reset(fr_value *v)
{
    v->kind = FR_V_NONE;
    v->n = 0;
}

static size_t elem_size(int kind)
{
    switch (kind) {
    case FR_V_DOUBLE_LIST: return sizeof(double);
    case FR_V_SINT_LIST: return sizeof(int64_t);
    case FR_V_UINT_LIST: return sizeof(uint64_t);
    case FR_V_BOOL_LIST: return 1;
    default: return sizeof(fr_span);
    }
}

/* Room for `more` further list elements; existing elements are kept. `more`
 * never exceeds the number of input bytes being parsed, so the scratch is
 * bounded by the input's size. */
static fr_status reserve_items(fr_value *v, size_t more)
{
    size_t es = elem_size(v->kind);
    if (more > SIZE_MAX / es - v->n)
        return FR_ERR_OVERFLOW;
    size_t need = (v->n + more) * es;
    if (need <= v->scratch_cap)
        return FR_OK;
    size_t cap = v->scratch_cap ? v->scratch_cap : 64;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    void *nb = realloc(v->scratch, cap);
    if (nb == NULL)
        return FR_ERR_NOMEM;
    v->scratch = nb;
    v->scratch_cap = cap;
    return FR_OK;
}

static void append_u64(fr_value *v, uint64_t u)
{
    switch (v->kind) {
    case FR_V_SINT_LIST:
        ((int64_t *)v->scratch)[v->n++] = fr_pb_unzigzag64(u);
        break;
    case FR_V_UINT_LIST:
        ((uint64_t *)v->scratch)[v->n++] = u;
        break;
    case FR_V_BOOL_LIST:
        ((uint8_t *)v->scratch)[v->n++] = u != 0;
        break;
    default: /* DOUBLE_LIST */
        ((double *)v->scratch)[v->n++] = fr_pb_bits_to_double(u);
        break;
    }
}

/* Elements of a packed varint payload p[0..n): one per byte without the continuation bit
 * (what to reserve before the payload is parsed, and checked, element by element). */
static size_t packed_varint_count(const uint8_t *p, size_t n)
{
    size_t k, count = 0;
    for (k = 0; k < n; k++)
        count += !(p[k] & 0x80);
    return count;
}

/* Parse one occurrence of an XList message into v (v->kind is the list kind). */
static fr_status list_merge(fr_pb_ctx *c, fr_value *v, const uint8_t *ptr, size_t len, int depth)
{
    const uint8_t *p = ptr, *end = ptr + len;
    fr_pb_field f;
    fr_status st;
    int kind = v->kind;
    int numeric_varint = kind == FR_V_SINT_LIST || kind == FR_V_UINT_LIST || kind == FR_V_BOOL_LIST;
    if (depth > FR_PB_MAX_DEPTH)
        return fr_pb_fail(c, ptr, "nesting deeper than 100");
    while (p < end) {
        if (fr_pb_next_field(c, &p, end, depth, &f) != FR_OK)
            return FR_ERR_VALUE;
        if (f.number != 1)
            continue;
        if (kind == FR_V_DOUBLE_LIST) {
            if (f.wire_type == FR_PB_I64) {
                if ((st = reserve_items(v, 1)) != FR_OK)
                    return st;
                append_u64(v, f.u);
            } else if (f.wire_type == FR_PB_LEN) {
                if (f.len % 8 != 0)
                    return fr_pb_fail(c, f.ptr, "packed doubles: length not a multiple of 8");
                if ((st = reserve_items(v, f.len / 8)) != FR_OK)
                    return st;
                for (size_t k = 0; k < f.len; k += 8)
                    append_u64(v, fr_pb_load64(f.ptr + k));
            }
        } else if (numeric_varint) {
            if (f.wire_type == FR_PB_VARINT) {
                if ((st = reserve_items(v, 1)) != FR_OK)
                    return st;
                append_u64(v, f.u);
            } else if (f.wire_type == FR_PB_LEN) {
                if ((st = reserve_items(v, packed_varint_count(f.ptr, f.len))) != FR_OK)
                    return st;
                const uint8_t *q = f.ptr, *qend = f.ptr + f.len;
                while (q < qend) {
                    uint64_t u;
                    if (fr_pb_read_varint(c, &q, qend, &u) != FR_OK)
                        return FR_ERR_VALUE;
                    append_u64(v, u);
                }
            }
        } else if (f.wire_type == FR_PB_LEN) {
            if (kind == FR_V_STRING_LIST && fr_pb_check_utf8(c, &f) != FR_OK)
                return FR_ERR_VALUE;
            if ((st = reserve_items(v, 1)) != FR_OK)
                return st;
            fr_span *s = &((fr_span *)v->scratch)[v->n++];
            s->ptr = f.ptr;
            s->len = f.len;
        }
    }
    v->items = v->scratch;
    return FR_OK;
}

fr_status fr_wire_value_merge(fr_pb_ctx *c, fr_value *v, const uint8_t *ptr, size_t len,
                              int configs, int depth)
{
    const uint8_t *p = ptr, *end = ptr + len;
    fr_pb_field f;
    fr_status st;
    if (depth > FR_PB_MAX_DEPTH)
        return fr_pb_fail(c, ptr, "nesting deeper than 100");
    while (p < end) {
        if (fr_pb_next_field(c, &p, end, depth, &f) != FR_OK)
            return FR_ERR_VALUE;
        uint32_t num = f.number;
        if (!configs && ((num >= 4 && num <= 6) || num >= 24))
            continue; /* configs-only members are unknown fields of a metrics value */
        switch (num) {
        case FR_V_DOUBLE:
            if (f.wire_type == FR_PB_I64) {
                v->kind = FR_V_DOUBLE;
                v->d = fr_pb_bits_to_double(f.u);
            }
            break;
        case FR_V_SINT64:
            if (f.wire_type == FR_PB_VARINT) {
                v->kind = FR_V_SINT64;
                v->i = fr_pb_unzigzag64(f.u);
            }
            break;
        case FR_V_UINT64:
            if (f.wire_type == FR_PB_VARINT) {
                v->kind = FR_V_UINT64;
                v->u = f.u;
            }
            break;
        case FR_V_BOOL:
            if (f.wire_type == FR_PB_VARINT) {
                v->kind = FR_V_BOOL;
                v->b = f.u != 0;
            }
            break;
        case FR_V_STRING:
        case FR_V_BYTES:
            if (f.wire_type == FR_PB_LEN) {
                if (num == FR_V_STRING && fr_pb_check_utf8(c, &f) != FR_OK)
                    return FR_ERR_VALUE;
                v->kind = (int)num;
                v->s.ptr = f.ptr;
                v->s.len = f.len;
            }
            break;
        case FR_V_DOUBLE_LIST:
        case FR_V_SINT_LIST:
        case FR_V_UINT_LIST:
        case FR_V_BOOL_LIST:
        case FR_V_STRING_LIST:
        case FR_V_BYTES_LIST:
            if (f.wire_type == FR_PB_LEN) {
                if (v->kind != (int)num) {
                    /* switching the oneof starts a fresh list */
                    v->kind = (int)num;
                    v->n = 0;
                }
                v->items = v->scratch;
                if ((st = list_merge(c, v, f.ptr, f.len, depth + 1)) != FR_OK)
                    return st;
            }
            break;
        default:
            break;
        }
    }
    return FR_OK;
}

fr_status fr_wire_entry_decode(fr_pb_ctx *c, const uint8_t *ptr, size_t len, int configs,
                               int depth, fr_span *key, fr_value *v, int *unknown)
{
    const uint8_t *p = ptr, *end = ptr + len;
    fr_pb_field f;
    fr_status st;
    fr_value_reset(v);
    *unknown = 0;
    key->ptr = ptr;
    key->len = 0;
    if (depth > FR_PB_MAX_DEPTH)
        return fr_pb_fail(c, ptr, "nesting deeper than 100");
    while (p < end) {
        if (fr_pb_next_field(c, &p, end, depth, &f) != FR_OK)
            return FR_ERR_VALUE;
        if (f.wire_type != FR_PB_LEN || (f.number != 1 && f.number != 2)) {
            *unknown = 1;
            continue;
        }
        if (f.number == 1) {
            if (fr_pb_check_utf8(c, &f) != FR_OK)
                return FR_ERR_VALUE;
            key->ptr = f.ptr;
            key->len = f.len;
        } else if (f.number == 2) {
            if ((st = fr_wire_value_merge(c, v, f.ptr, f.len, configs, depth + 1)) != FR_OK)
                return st;
        }
    }
    return FR_OK;
}

/* ---------------------------------------------------------------- encoding */

static size_t list_payload_size(const fr_value *v)
{
    size_t n = v->n, p = 0, k;
    switch (v->kind) {
    case FR_V_DOUBLE_LIST:
        return n * 8;
    case FR_V_SINT_LIST:
        for (k = 0; k < n; k++)
            p += fr_pb_varint_size(fr_pb_zigzag64(((const int64_t *)v->items)[k]));
        return p;
    case FR_V_UINT_LIST:
        for (k = 0; k < n; k++)
            p += fr_pb_varint_size(((const uint64_t *)v->items)[k]);
        return p;
    case FR_V_BOOL_LIST:
        return n;
    default: /* strings, bytes: each one a vals field */
        for (k = 0; k < n; k++)
            p += fr_pb_len_field_size(1, ((const fr_span *)v->items)[k].len);
        return p;
    }
}

/* Bytes of the XList message itself. */
static size_t list_msg_size(const fr_value *v, size_t *payload)
{
    *payload = list_payload_size(v);
    if (v->kind == FR_V_STRING_LIST || v->kind == FR_V_BYTES_LIST)
        return *payload;
    return v->n ? fr_pb_len_field_size(1, *payload) : 0;  /* packed */
}

size_t fr_wire_value_size(const fr_value *v, int *ok)
{
    size_t payload;
    *ok = 1;
    switch (v->kind) {
    case FR_V_DOUBLE: return 1 + 8;
    case FR_V_SINT64: return 1 + fr_pb_varint_size(fr_pb_zigzag64(v->i));
    case FR_V_UINT64: return 1 + fr_pb_varint_size(v->u);
    case FR_V_BOOL: return 1 + 1;
    case FR_V_STRING:
    case FR_V_BYTES: return fr_pb_len_field_size((uint32_t)v->kind, v->s.len);
    case FR_V_DOUBLE_LIST:
    case FR_V_SINT_LIST:
    case FR_V_UINT_LIST:
    case FR_V_BOOL_LIST:
    case FR_V_STRING_LIST:
    case FR_V_BYTES_LIST:
        return fr_pb_len_field_size((uint32_t)v->kind, list_msg_size(v, &payload));
    default:
        *ok = 0;
        return 0;
    }
}

void fr_wire_value_put(fr_pb_writer *w, const fr_value *v)
{
    size_t payload, k, n = v->n;
    switch (v->kind) {
    case FR_V_DOUBLE:
        fr_pb_put_tag(w, FR_V_DOUBLE, FR_PB_I64);
        fr_pb_put_fixed64(w, fr_pb_double_to_bits(v->d));
        return;
    case FR_V_SINT64:
        fr_pb_put_tag(w, FR_V_SINT64, FR_PB_VARINT);
        fr_pb_put_varint(w, fr_pb_zigzag64(v->i));
        return;
    case FR_V_UINT64:
        fr_pb_put_tag(w, FR_V_UINT64, FR_PB_VARINT);
        fr_pb_put_varint(w, v->u);
        return;
    case FR_V_BOOL:
        fr_pb_put_tag(w, FR_V_BOOL, FR_PB_VARINT);
        fr_pb_put_varint(w, v->b ? 1 : 0);
        return;
    case FR_V_STRING:
    case FR_V_BYTES:
        fr_pb_put_len_field(w, (uint32_t)v->kind, v->s.ptr, v->s.len);
        return;
    default:
        break;
    }
    fr_pb_put_tag(w, (uint32_t)v->kind, FR_PB_LEN);
    fr_pb_put_varint(w, list_msg_size(v, &payload));
    if (v->kind == FR_V_STRING_LIST || v->kind == FR_V_BYTES_LIST) {
        for (k = 0; k < n; k++) {
            const fr_span *s = &((const fr_span *)v->items)[k];
            fr_pb_put_len_field(w, 1, s->ptr, s->len);
        }
        return;
    }
    if (n == 0)
        return;
    fr_pb_put_tag(w, 1, FR_PB_LEN);
    fr_pb_put_varint(w, payload);
    for (k = 0; k < n; k++) {
        switch (v->kind) {
        case FR_V_DOUBLE_LIST:
            fr_pb_put_fixed64(w, fr_pb_double_to_bits(((const double *)v->items)[k]));
            break;
        case FR_V_SINT_LIST:
            fr_pb_put_varint(w, fr_pb_zigzag64(((const int64_t *)v->items)[k]));
            break;
        case FR_V_UINT_LIST:
            fr_pb_put_varint(w, ((const uint64_t *)v->items)[k]);
            break;
        default: /* BOOL_LIST */
            fr_pb_put_varint(w, ((const uint8_t *)v->items)[k] ? 1 : 0);
            break;
        }
    }
}

size_t fr_wire_entry_size(uint32_t number, size_t key_len, size_t value_size)
{
    size_t payload = fr_pb_len_field_size(1, key_len) + fr_pb_len_field_size(2, value_size);
    return fr_pb_len_field_size(number, payload);
}

void fr_wire_entry_put(fr_pb_writer *w, uint32_t number, const uint8_t *key, size_t key_len,
                       const fr_value *v, size_t value_size)
{
    size_t payload = fr_pb_len_field_size(1, key_len) + fr_pb_len_field_size(2, value_size);
    fr_pb_put_tag(w, number, FR_PB_LEN);
    fr_pb_put_varint(w, payload);
    fr_pb_put_len_field(w, 1, key, key_len);
    fr_pb_put_tag(w, 2, FR_PB_LEN);
    fr_pb_put_varint(w, value_size);
    fr_wire_value_put(w, v);
}

/* ------------------------------------------------------------------ arrays */

void fr_wire_array_init(fr_wire_array *a)
{
    memset(a, 0, sizeof *a);
}

void fr_wire_array_free(fr_wire_array *a)
{
    free(a->shape);
    fr_wire_array_init(a);
}

static fr_status shape_reserve(fr_wire_array *a, size_t more)
{
    if (more > SIZE_MAX / sizeof(int32_t) - a->ndim)
        return FR_ERR_OVERFLOW;
    size_t need = a->ndim + more;
    if (need <= a->shape_cap)
        return FR_OK;
    size_t cap = a->shape_cap ? a->shape_cap : 8;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 / sizeof(int32_t) ? need : cap * 2;
    int32_t *nb = (int32_t *)realloc(a->shape, cap * sizeof(int32_t));
    if (nb == NULL)
        return FR_ERR_NOMEM;
    a->shape = nb;
    a->shape_cap = cap;
    return FR_OK;
}

/* An int32 on the wire is a varint of the value sign-extended to 64 bits. */
static fr_status shape_push(fr_pb_ctx *c, fr_wire_array *a, uint64_t u, const uint8_t *at)
{
    if (u > (uint64_t)INT32_MAX && u < (uint64_t)0xFFFFFFFF80000000ULL)
        return fr_pb_fail(c, at, "shape dimension outside int32");
    a->shape[a->ndim++] = (int32_t)(u <= (uint64_t)INT32_MAX ? (int64_t)u
                                                             : -(int64_t)(~u) - 1);
    return FR_OK;
}

fr_status fr_wire_array_decode(fr_pb_ctx *c, const uint8_t *ptr, size_t len, int depth,
                               fr_wire_array *a)
{
    const uint8_t *p = ptr, *end = ptr + len;
    fr_pb_field f;
    fr_status st;
    a->dtype.ptr = a->stype.ptr = a->data.ptr = ptr;
    a->dtype.len = a->stype.len = a->data.len = 0;
    a->ndim = 0;
    if (depth > FR_PB_MAX_DEPTH)
        return fr_pb_fail(c, ptr, "nesting deeper than 100");
    while (p < end) {
        if (fr_pb_next_field(c, &p, end, depth, &f) != FR_OK)
            return FR_ERR_VALUE;
        if (f.number == 2 && f.wire_type == FR_PB_VARINT) {
            if ((st = shape_reserve(a, 1)) != FR_OK)
                return st;
            if (shape_push(c, a, f.u, f.start) != FR_OK)
                return FR_ERR_VALUE;
        } else if (f.number == 2 && f.wire_type == FR_PB_LEN) {
            if ((st = shape_reserve(a, packed_varint_count(f.ptr, f.len))) != FR_OK)
                return st;
            const uint8_t *q = f.ptr, *qend = f.ptr + f.len;
            while (q < qend) {
                const uint8_t *at = q;
                uint64_t u;
                if (fr_pb_read_varint(c, &q, qend, &u) != FR_OK)
                    return FR_ERR_VALUE;
                if (shape_push(c, a, u, at) != FR_OK)
                    return FR_ERR_VALUE;
            }
        } else if (f.wire_type == FR_PB_LEN && f.number >= 1 && f.number <= 4) {
            fr_span *dst = f.number == 1 ? &a->dtype : f.number == 3 ? &a->stype : &a->data;
            if (f.number != 4 && fr_pb_check_utf8(c, &f) != FR_OK)
                return FR_ERR_VALUE;
            dst->ptr = f.ptr;
            dst->len = f.len;
        }
    }
    return FR_OK;
}

static size_t shape_payload(const int64_t *shape, size_t ndim)
{
    size_t p = 0;
    for (size_t k = 0; k < ndim; k++)
        p += fr_pb_varint_size((uint64_t)shape[k]);
    return p;
}

size_t fr_wire_array_size(size_t dtype_len, const int64_t *shape, size_t ndim, size_t stype_len,
                          size_t data_len)
{
    size_t n = 0;
    if (dtype_len)
        n += fr_pb_len_field_size(1, dtype_len);
    if (ndim)
        n += fr_pb_len_field_size(2, shape_payload(shape, ndim));
    if (stype_len)
        n += fr_pb_len_field_size(3, stype_len);
    if (data_len)
        n += fr_pb_len_field_size(4, data_len);
    return n;
}

void fr_wire_array_put_head(fr_pb_writer *w, const uint8_t *dtype, size_t dtype_len,
                            const int64_t *shape, size_t ndim, const uint8_t *stype,
                            size_t stype_len, size_t data_len)
{
    if (dtype_len)
        fr_pb_put_len_field(w, 1, dtype, dtype_len);
    if (ndim) {
        fr_pb_put_tag(w, 2, FR_PB_LEN);
        fr_pb_put_varint(w, shape_payload(shape, ndim));
        for (size_t k = 0; k < ndim; k++)
            fr_pb_put_varint(w, (uint64_t)shape[k]);
    }
    if (stype_len)
        fr_pb_put_len_field(w, 3, stype, stype_len);
    if (data_len) {
        fr_pb_put_tag(w, 4, FR_PB_LEN);
        fr_pb_put_varint(w, data_len);
    }
}

/* ----------------------------------------------------------------- columns */

static int put_number(const fr_wire_leaf *L, uint8_t *dst, int kind, double d, int64_t i,
                      uint64_t u, int write)
{
    double x;
    int64_t xi;
    switch (L->out_type) {
    case FR_COL_F64:
        x = kind == FR_V_DOUBLE ? d : kind == FR_V_SINT64 ? (double)i : (double)u;
        if (write)
            memcpy(dst, &x, sizeof x);
        return FR_FILL_OK;
    case FR_COL_I64:
        if (kind == FR_V_DOUBLE)
            return FR_FILL_KIND;
        if (kind == FR_V_UINT64) {
            if (u > (uint64_t)L->imax)
                return FR_FILL_RANGE;
            xi = (int64_t)u;
        } else {
            if (i < L->imin || i > L->imax)
                return FR_FILL_RANGE;
            xi = i;
        }
        if (write)
            memcpy(dst, &xi, sizeof xi);
        return FR_FILL_OK;
    default: /* FR_COL_U64 */
        if (kind == FR_V_DOUBLE)
            return FR_FILL_KIND;
        if (kind == FR_V_SINT64) {
            if (i < 0)
                return FR_FILL_RANGE;
            u = (uint64_t)i;
        }
        if (u > L->umax)
            return FR_FILL_RANGE;
        if (write)
            memcpy(dst, &u, sizeof u);
        return FR_FILL_OK;
    }
}

static int put_element(const fr_wire_leaf *L, uint8_t *dst, const fr_value *v, size_t k,
                       int write)
{
    switch (v->kind) {
    case FR_V_DOUBLE_LIST:
        return put_number(L, dst, FR_V_DOUBLE, ((const double *)v->items)[k], 0, 0, write);
    case FR_V_SINT_LIST:
        return put_number(L, dst, FR_V_SINT64, 0, ((const int64_t *)v->items)[k], 0, write);
    default: /* FR_V_UINT_LIST */
        return put_number(L, dst, FR_V_UINT64, 0, 0, ((const uint64_t *)v->items)[k], write);
    }
}

/* fr_wire_leaf_fill, inlined into the object fast path. */
static inline int leaf_fill(const fr_wire_leaf *L, size_t row, const fr_value *v)
{
    uint8_t *dst = L->out + row * L->stride;
    int is_list = v->kind == FR_V_DOUBLE_LIST || v->kind == FR_V_SINT_LIST ||
                  v->kind == FR_V_UINT_LIST;
    int st, pass;
    size_t k;
    if (L->width == 0) {
        if (v->kind != FR_V_DOUBLE && v->kind != FR_V_SINT64 && v->kind != FR_V_UINT64)
            return FR_FILL_KIND;
        return put_number(L, dst, v->kind, v->d, v->i, v->u, 1);
    }
    if (!is_list)
        return FR_FILL_KIND;
    if (v->n != L->width)
        return FR_FILL_LENGTH;
    if (L->elem >= 0)
        return put_element(L, dst, v, (size_t)L->elem, 1);
    /* check every element before writing any */
    for (pass = 0; pass < 2; pass++)
        for (k = 0; k < v->n; k++)
            if ((st = put_element(L, dst + 8 * k, v, k, pass)) != FR_FILL_OK)
                return st;
    return FR_FILL_OK;
}

int fr_wire_leaf_fill(const fr_wire_leaf *L, size_t row, const fr_value *v)
{
    return leaf_fill(L, row, v);
}

/* Equal byte strings. Keys and record names are short: a loop, not a memcmp call. */
static int span_eq(const uint8_t *a, size_t na, const uint8_t *b, size_t nb)
{
    size_t k;
    if (na != nb)
        return 0;
    for (k = 0; k < na; k++)
        if (a[k] != b[k])
            return 0;
    return 1;
}

/* Whether p[0..n) is ASCII (so valid UTF-8 without the general check). */
static int is_ascii(const uint8_t *p, size_t n)
{
    size_t k;
    for (k = 0; k < n; k++)
        if (p[k] & 0x80)
            return 0;
    return 1;
}

/* Validate a ParametersRecord body; 0 if fine. */
static int params_ok(fr_pb_ctx *c, const uint8_t *ptr, size_t len, int depth, fr_wire_array *a)
{
    const uint8_t *p = ptr, *end = ptr + len;
    fr_pb_field f;
    while (p < end) {
        if (fr_pb_next_field(c, &p, end, depth, &f) != FR_OK)
            return 1;
        if (f.wire_type != FR_PB_LEN)
            continue;
        if (f.number == 1 && fr_pb_check_utf8(c, &f) != FR_OK)
            return 1;
        if (f.number == 2 && fr_wire_array_decode(c, f.ptr, f.len, depth + 1, a) != FR_OK)
            return 1;
    }
    return 0;
}

/* Validate a Metrics/ConfigsRecord body, filling the leaves (if any) from it. */
static int record_scan(fr_pb_ctx *c, const uint8_t *ptr, size_t len, int depth, int configs,
                       fr_wire_leaf *leaves, size_t nleaves, size_t row, fr_value *v)
{
    const uint8_t *p = ptr, *end = ptr + len;
    fr_pb_field f;
    fr_span key;
    int unknown;
    size_t k;
    while (p < end) {
        if (fr_pb_next_field(c, &p, end, depth, &f) != FR_OK)
            return 1;
        if (f.number != 1 || f.wire_type != FR_PB_LEN)
            continue;
        if (fr_wire_entry_decode(c, f.ptr, f.len, configs, depth + 1, &key, v, &unknown) != FR_OK)
            return 1;
        if (unknown || v->kind == FR_V_NONE)
            return 1;
        for (k = 0; k < nleaves; k++) {
            fr_wire_leaf *L = &leaves[k];
            if (!span_eq(key.ptr, key.len, L->name, L->name_len))
                continue;
            if (L->seen || fr_wire_leaf_fill(L, row, v) != FR_FILL_OK)
                return 1;
            L->seen = 1;
        }
    }
    return 0;
}

static int strings_ok(fr_pb_ctx *c, const uint8_t *ptr, size_t len, int depth, uint32_t mask)
{
    const uint8_t *p = ptr, *end = ptr + len;
    fr_pb_field f;
    while (p < end) {
        if (fr_pb_next_field(c, &p, end, depth, &f) != FR_OK)
            return 1;
        if (f.wire_type == FR_PB_LEN && f.number < 32 && (mask >> f.number & 1) &&
            fr_pb_check_utf8(c, &f) != FR_OK)
            return 1;
    }
    return 0;
}

static void leaves_unseen(fr_wire_leaf *leaves, size_t nleaves)
{
    for (size_t k = 0; k < nleaves; k++)
        leaves[k].seen = 0;
}

/* 0 if every leaf was filled, 1 otherwise (the caller takes the general path). */
static int leaves_missing(const fr_wire_leaf *leaves, size_t nleaves)
{
    for (size_t k = 0; k < nleaves; k++)
        if (!leaves[k].seen)
            return 1;
    return 0;
}

static int canonical_recordset(fr_pb_ctx *c, const uint8_t *p, size_t n, int depth,
                               const uint8_t *rec, size_t rec_len, fr_wire_leaf *leaves,
                               size_t nleaves, size_t row, fr_value *v, fr_wire_array *a);

int fr_wire_columns_row(const uint8_t *buf, size_t len, int message, const uint8_t *rec,
                        size_t rec_len, fr_wire_leaf *leaves, size_t nleaves, size_t row,
                        fr_value *v, fr_wire_array *a)
{
    fr_pb_ctx c;
    fr_pb_field f, g;
    const uint8_t *p = buf, *end = buf + len, *q, *qend;
    const uint8_t *rs = buf;
    size_t rs_len = len;
    int depth = 0, found = 0;
    c.base = buf;
    c.err = NULL;
    c.err_off = 0;
    if (message) {
        int ncontent = 0, nerror = 0;
        while (p < end) {
            if (fr_pb_next_field(&c, &p, end, 0, &f) != FR_OK)
                return 1;
            if (f.wire_type != FR_PB_LEN)
                continue;
            if (f.number == 1) {  /* Metadata: strings are fields 2, 5, 6, 8 */
                if (strings_ok(&c, f.ptr, f.len, 1, 1u << 2 | 1u << 5 | 1u << 6 | 1u << 8))
                    return 1;
            } else if (f.number == 2) {
                ncontent++;
                rs = f.ptr;
                rs_len = f.len;
            } else if (f.number == 3) {
                nerror++;
            }
        }
        if (ncontent != 1 || nerror != 0)
            return 1;
        depth = 1;
        p = rs;
        end = rs + rs_len;
    }
    /* The layout Flower's serializer writes first; anything else field by field. */
    leaves_unseen(leaves, nleaves);
    if (canonical_recordset(&c, p, (size_t)(end - p), depth, rec, rec_len, leaves, nleaves, row,
                            v, a) == 0)
        return leaves_missing(leaves, nleaves);
    leaves_unseen(leaves, nleaves);
    while (p < end) {
        fr_span key = {NULL, 0};
        int unknown = 0, target;
        if (fr_pb_next_field(&c, &p, end, depth, &f) != FR_OK)
            return 1;
        if (f.wire_type != FR_PB_LEN || f.number < 1 || f.number > 3)
            continue;
        /* the entry's key first (it may follow the value) */
        for (q = f.ptr, qend = f.ptr + f.len; q < qend;) {
            if (fr_pb_next_field(&c, &q, qend, depth + 1, &g) != FR_OK)
                return 1;
            if (g.wire_type != FR_PB_LEN || g.number > 2)
                unknown = 1;
            else if (g.number == 1) {
                if (fr_pb_check_utf8(&c, &g) != FR_OK)
                    return 1;
                key.ptr = g.ptr;
                key.len = g.len;
            }
        }
        if (unknown)
            return 1;
        target = f.number == 2 && span_eq(key.ptr, key.len, rec, rec_len);
        if (target && found++)
            return 1;
        for (q = f.ptr, qend = f.ptr + f.len; q < qend;) {
            if (fr_pb_next_field(&c, &q, qend, depth + 1, &g) != FR_OK)
                return 1;
            if (g.wire_type != FR_PB_LEN || g.number != 2)
                continue;
            if (f.number == 1) {
                if (params_ok(&c, g.ptr, g.len, depth + 2, a))
                    return 1;
            } else if (record_scan(&c, g.ptr, g.len, depth + 2, f.number == 3,
                                   target ? leaves : NULL, target ? nleaves : 0, row, v)) {
                return 1;
            }
        }
    }
    if (!found)
        return 1;
    return leaves_missing(leaves, nleaves);
}

/* Where the body of a canonically headed object of class `name` starts:
 * "<name>  <digits>\0", the digits (1 to 19, no leading zero) equal to the
 * number of bytes after the NUL. 0 if the header is not of that form. */
static size_t canonical_body_offset(const uint8_t *buf, size_t len, const char *name)
{
    size_t name_len = strlen(name), k = name_len + 2, first = k;
    uint64_t body_len = 0;
    if (len < k || memcmp(buf, name, name_len) != 0 || buf[name_len] != ' ' ||
        buf[name_len + 1] != ' ')
        return 0;
    for (; k < len && buf[k] >= '0' && buf[k] <= '9'; k++) {
        if (k - first == 19 || (k > first && buf[first] == '0'))
            return 0;
        body_len = body_len * 10 + (uint64_t)(buf[k] - '0');
    }
    if (k == first || k >= len || buf[k] != 0)
        return 0;
    k++;
    return body_len == (uint64_t)(len - k) ? k : 0;
}

/* A varint at p[0..n) into *out; its length, or 0 if it is incomplete or holds more than
 * 64 bits (the general parser then decides). */
static inline size_t small_varint(const uint8_t *p, size_t n, uint64_t *out)
{
    uint64_t x = 0;
    if (n > 0 && p[0] < 0x80) {                         /* most are one byte */
        *out = p[0];
        return 1;
    }
    for (size_t k = 0; k < n && k < 10; k++) {
        if (k == 9 && p[k] > 1)
            return 0;
        x |= (uint64_t)(p[k] & 0x7f) << (7 * k);
        if (!(p[k] & 0x80)) {
            *out = x;
            return k + 1;
        }
    }
    return 0;
}

/* A length-delimited field with the one-byte tag `tag` at p[*at..n): on success *at is its
 * payload's start and the payload's length is returned in *len; 1 if it is not there. */
static inline int small_len_field(const uint8_t *p, size_t n, size_t *at, uint8_t tag,
                                  size_t *len)
{
    uint64_t u;
    size_t k = *at, w = 1;
    if (k >= n || p[k] != tag)
        return 1;
    if (k + 1 < n && p[k + 1] < 0x80)                   /* a length below 128 */
        u = p[k + 1];
    else if ((w = small_varint(p + k + 1, n - k - 1, &u)) == 0)
        return 1;
    if (u > n - k - 1 - w || u >= INT32_MAX)          /* as fr_pb_next_field */
        return 1;
    *at = k + 1 + w;
    *len = (size_t)u;
    return 0;
}

/* fr_pb_load64 as one load where the host is little-endian (the test folds to a constant). */
static uint64_t load_le64(const uint8_t *p)
{
    const uint16_t one = 1;
    uint8_t low;
    uint64_t x;
    memcpy(&low, &one, 1);
    if (!low)
        return fr_pb_load64(p);
    memcpy(&x, p, sizeof x);
    return x;
}

/* The value message q[0..m) in the form deflate writes it: exactly one member, a double, a
 * sint64/uint64 or a packed double/sint/uint list (an empty list as an empty message). 1 on
 * anything else. */
static int canonical_value(const uint8_t *q, size_t m, fr_value *v)
{
    uint64_t u;
    size_t at, len, w, k;
    fr_value_reset(v);
    if (m == 9 && q[0] == 0x09) {                       /* double[1], fixed64 */
        v->kind = FR_V_DOUBLE;
        v->d = fr_pb_bits_to_double(load_le64(q + 1));
        return 0;
    }
    if (m >= 2 && (q[0] == 0x10 || q[0] == 0x18)) {     /* sint64[2], uint64[3], varint */
        if (small_varint(q + 1, m - 1, &u) != m - 1)
            return 1;
        v->kind = q[0] == 0x10 ? FR_V_SINT64 : FR_V_UINT64;
        v->i = fr_pb_unzigzag64(u);
        v->u = u;
        return 0;
    }
    /* DoubleList[21], SintList[22], UintList[23] (tags 0xaa/0xb2/0xba 0x01), filling the value */
    if (m < 3 || q[1] != 0x01 || (q[0] != 0xaa && q[0] != 0xb2 && q[0] != 0xba))
        return 1;
    if ((w = small_varint(q + 2, m - 2, &u)) == 0 || u != m - 2 - w)
        return 1;
    v->kind = q[0] == 0xaa ? FR_V_DOUBLE_LIST : q[0] == 0xb2 ? FR_V_SINT_LIST : FR_V_UINT_LIST;
    v->items = v->scratch;
    at = 2 + w;
    if (at == m)
        return 0;                                       /* the empty list */
    /* vals[1], packed, filling the list */
    if (small_len_field(q, m, &at, 0x0a, &len) || len != m - at)
        return 1;
    if (v->kind == FR_V_DOUBLE_LIST) {
        if (len % 8 != 0 || reserve_items(v, len / 8) != FR_OK)
            return 1;
        for (k = 0; k < len; k += 8)
            append_u64(v, load_le64(q + at + k));
    } else {
        if (reserve_items(v, packed_varint_count(q + at, m - at)) != FR_OK)
            return 1;
        for (; at < m; at += w) {
            if ((w = small_varint(q + at, m - at, &u)) == 0)
                return 1;
            append_u64(v, u);
        }
    }
    v->items = v->scratch;
    return 0;
}

/* A MetricRecord body p[0..n) in the form deflate writes it (every Item an optional key[1],
 * a leaf's name or ASCII, then a value[2] as canonical_value reads it, nothing else), filling
 * the leaves as record_scan does. 1 on anything else, including a leaf's key in two Items or
 * a value the leaf cannot take: record_scan then decides. */
static int canonical_items(const uint8_t *p, size_t n, fr_wire_leaf *leaves, size_t nleaves,
                           size_t row, fr_value *v)
{
    size_t at = 0, item_len, end, key_len, val_len, k, j = 0, hint = 0;
    const uint8_t *key, *name;
    while (at < n) {
        if (small_len_field(p, n, &at, 0x0a, &item_len))
            return 1;
        end = at + item_len;
        key = p + at;
        key_len = 0;
        if (at < end && p[at] == 0x0a) {
            if (small_len_field(p, end, &at, 0x0a, &key_len))
                return 1;
            key = p + at;
            at += key_len;
        }
        if (small_len_field(p, end, &at, 0x12, &val_len) || val_len != end - at ||
            canonical_value(p + at, val_len, v))
            return 1;
        at = end;
        /* A metric's leaves are consecutive and share one name pointer (see wire.h), so the
         * search, which starts where a metric's leaves start, meets its first leaf first.
         * Replies list their metrics in one order, so it starts after the last metric found:
         * one comparison per Item. */
        for (k = 0; k < nleaves; k++) {
            j = hint + k < nleaves ? hint + k : hint + k - nleaves;
            if (span_eq(leaves[j].name, leaves[j].name_len, key, key_len))
                break;
        }
        if (k == nleaves) {                             /* not a metric of the spec */
            if (!is_ascii(key, key_len))
                return 1;                               /* UTF-8 checks on the general path */
            continue;
        }
        name = leaves[j].name;                          /* valid UTF-8: the key is too */
        do {
            if (leaves[j].seen || leaf_fill(&leaves[j], row, v) != FR_FILL_OK)
                return 1;
            leaves[j].seen = 1;
            j++;
        } while (j < nleaves && leaves[j].name == name);
        hint = j < nleaves ? j : 0;
    }
    return 0;
}

int fr_wire_columns_object(const uint8_t *buf, size_t len, fr_wire_leaf *leaves, size_t nleaves,
                           size_t row, fr_value *v)
{
    fr_pb_ctx c;
    size_t off = canonical_body_offset(buf, len, "MetricRecord");
    if (off == 0)
        return 1;
    c.base = buf + off;
    c.err = NULL;
    c.err_off = 0;
    leaves_unseen(leaves, nleaves);
    if (canonical_items(buf + off, len - off, leaves, nleaves, row, v) == 0)
        return leaves_missing(leaves, nleaves);
    /* Anything else, field by field. The depths are inflate's: the record message 0, an Item
     * 1, its value 2. */
    leaves_unseen(leaves, nleaves);
    if (record_scan(&c, buf + off, len - off, 0, 0, leaves, nleaves, row, v))
        return 1;
    return leaves_missing(leaves, nleaves);
}

/* A RecordSet body p[0..n) in the layout Flower's serializer writes: every field a map
 * entry of parameters[1], metrics[2] or configs[3] records holding an ASCII key[1], then
 * the record[2]. The target metrics record is read by canonical_items; every other record
 * is checked as fr_wire_columns_row checks it (a reply is read only if it decodes). 1 on
 * anything else, or if the target is absent or repeated: the field-by-field loop decides. */
static int canonical_recordset(fr_pb_ctx *c, const uint8_t *p, size_t n, int depth,
                               const uint8_t *rec, size_t rec_len, fr_wire_leaf *leaves,
                               size_t nleaves, size_t row, fr_value *v, fr_wire_array *a)
{
    size_t at = 0, entry_len, end, key_len, rec_body;
    const uint8_t *key;
    int found = 0;
    while (at < n) {
        uint8_t tag = p[at];
        if (tag != 0x0a && tag != 0x12 && tag != 0x1a)
            return 1;
        if (small_len_field(p, n, &at, tag, &entry_len))
            return 1;
        end = at + entry_len;
        if (small_len_field(p, end, &at, 0x0a, &key_len))
            return 1;
        key = p + at;
        at += key_len;
        if (!is_ascii(key, key_len))
            return 1;                                   /* UTF-8 checks on the general path */
        if (small_len_field(p, end, &at, 0x12, &rec_body) || rec_body != end - at)
            return 1;
        if (tag == 0x12 && span_eq(key, key_len, rec, rec_len)) {
            if (found++ || canonical_items(p + at, rec_body, leaves, nleaves, row, v))
                return 1;
        } else if (tag == 0x0a) {
            if (params_ok(c, p + at, rec_body, depth + 2, a))
                return 1;
        } else if (record_scan(c, p + at, rec_body, depth + 2, tag == 0x1a, NULL, 0, row, v)) {
            return 1;
        }
        at = end;
    }
    return found ? 0 : 1;
}
