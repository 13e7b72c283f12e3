#include "pb.h"

#include <stdlib.h>

fr_status fr_pb_fail(fr_pb_ctx *c, const uint8_t *at, const char *why)
{
    if (c->err == NULL) {
        c->err = why;
        c->err_off = (size_t)(at - c->base);
    }
    return FR_ERR_VALUE;
}

fr_status fr_pb_read_varint(fr_pb_ctx *c, const uint8_t **p, const uint8_t *end, uint64_t *v)
{
    const uint8_t *q = *p;
    uint64_t r = 0;
    int i;
    for (i = 0; i < 10; i++) {
        if (q >= end)
            return fr_pb_fail(c, *p, "truncated varint");
        uint8_t b = *q++;
        /* shift 63 keeps only the low bit of the 10th byte, as upb does */
        r |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            *p = q;
            *v = r;
            return FR_OK;
        }
    }
    return fr_pb_fail(c, *p, "varint longer than 10 bytes");
}

static fr_status read_tag(fr_pb_ctx *c, const uint8_t **p, const uint8_t *end, uint32_t *number,
                          int *wire_type)
{
    const uint8_t *start = *p;
    uint64_t t;
    if (fr_pb_read_varint(c, p, end, &t) != FR_OK)
        return FR_ERR_VALUE;
    if (*p - start > 5 || t > UINT32_MAX)
        return fr_pb_fail(c, start, "tag does not fit in 32 bits");
    *number = (uint32_t)(t >> 3);
    *wire_type = (int)(t & 7);
    if (*wire_type == 6 || *wire_type == 7)
        return fr_pb_fail(c, start, "invalid wire type");
    if (*number == 0)
        return fr_pb_fail(c, start, "field number 0");
    return FR_OK;
}

/* Payload of a field whose tag has been read; groups are skipped to their end. */
static fr_status read_payload(fr_pb_ctx *c, const uint8_t **p, const uint8_t *end, int depth,
                              fr_pb_field *f);

static fr_status skip_group(fr_pb_ctx *c, const uint8_t **p, const uint8_t *end, int depth,
                            uint32_t number, const uint8_t *start)
{
    fr_pb_field inner;
    if (depth + 1 > FR_PB_MAX_DEPTH)
        return fr_pb_fail(c, start, "nesting deeper than 100");
    for (;;) {
        if (*p >= end)
            return fr_pb_fail(c, start, "group without its end tag");
        inner.start = *p;
        if (read_tag(c, p, end, &inner.number, &inner.wire_type) != FR_OK)
            return FR_ERR_VALUE;
        if (inner.wire_type == FR_PB_EGROUP) {
            if (inner.number != number)
                return fr_pb_fail(c, inner.start, "end-group tag does not match its group");
            return FR_OK;
        }
        if (read_payload(c, p, end, depth + 1, &inner) != FR_OK)
            return FR_ERR_VALUE;
    }
}

static fr_status read_payload(fr_pb_ctx *c, const uint8_t **p, const uint8_t *end, int depth,
                              fr_pb_field *f)
{
    uint64_t n;
    const uint8_t *q;
    switch (f->wire_type) {
    case FR_PB_VARINT:
        return fr_pb_read_varint(c, p, end, &f->u);
    case FR_PB_I64:
        if (end - *p < 8)
            return fr_pb_fail(c, *p, "truncated 64-bit field");
        f->u = fr_pb_load64(*p);
        *p += 8;
        return FR_OK;
    case FR_PB_I32:
        if (end - *p < 4)
            return fr_pb_fail(c, *p, "truncated 32-bit field");
        f->u = (uint64_t)(*p)[0] | (uint64_t)(*p)[1] << 8 | (uint64_t)(*p)[2] << 16 |
               (uint64_t)(*p)[3] << 24;
        *p += 4;
        return FR_OK;
    case FR_PB_LEN:
        q = *p;
        if (fr_pb_read_varint(c, p, end, &n) != FR_OK)
            return FR_ERR_VALUE;
        /* upb bounds the value only: unlike a tag, a length may be an overlong
         * varint of up to 10 bytes (protobuf's C++ parser would refuse one
         * past 5, but Python's protobuf is upb). */
        if (n >= INT32_MAX)
            return fr_pb_fail(c, q, "length does not fit in 31 bits");
        if (n > (uint64_t)(end - *p))
            return fr_pb_fail(c, q, "length past the end of the data");
        f->ptr = *p;
        f->len = (size_t)n;
        *p += n;
        return FR_OK;
    case FR_PB_SGROUP:
        return skip_group(c, p, end, depth, f->number, f->start);
    default: /* EGROUP */
        return fr_pb_fail(c, f->start, "end-group tag outside a group");
    }
}

fr_status fr_pb_next_field_slow(fr_pb_ctx *c, const uint8_t **p, const uint8_t *end, int depth,
                                fr_pb_field *f)
{
    f->start = *p;
    if (read_tag(c, p, end, &f->number, &f->wire_type) != FR_OK)
        return FR_ERR_VALUE;
    return read_payload(c, p, end, depth, f);
}

int fr_pb_utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t b = s[i];
        size_t k;
        uint32_t cp, min;
        if (b < 0x80) {
            i++;
            continue;
        }
        if ((b & 0xe0) == 0xc0) {
            k = 1;
            cp = b & 0x1f;
            min = 0x80;
        } else if ((b & 0xf0) == 0xe0) {
            k = 2;
            cp = b & 0x0f;
            min = 0x800;
        } else if ((b & 0xf8) == 0xf0) {
            k = 3;
            cp = b & 0x07;
            min = 0x10000;
        } else {
            return 0;
        }
        if (n - i - 1 < k)
            return 0;
        for (size_t j = 1; j <= k; j++) {
            uint8_t cb = s[i + j];
            if ((cb & 0xc0) != 0x80)
                return 0;
            cp = (cp << 6) | (cb & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return 0;
        i += k + 1;
    }
    return 1;
}

fr_status fr_pb_check_utf8(fr_pb_ctx *c, const fr_pb_field *f)
{
    size_t i;
    /* ASCII fast path: most keys and dtype strings */
    for (i = 0; i < f->len; i++)
        if (f->ptr[i] & 0x80)
            break;
    if (i == f->len || fr_pb_utf8_valid(f->ptr + i, f->len - i))
        return FR_OK;
    return fr_pb_fail(c, f->ptr, "invalid UTF-8 in a string field");
}

fr_status fr_pb_reserve(fr_pb_writer *w, size_t extra)
{
    if (extra <= w->cap - w->len)
        return FR_OK;
    if (extra > SIZE_MAX - w->len)
        return FR_ERR_OVERFLOW;
    size_t want = w->len + extra;
    uint8_t *nb = (uint8_t *)realloc(w->buf, want ? want : 1);
    if (nb == NULL)
        return FR_ERR_NOMEM;
    w->buf = nb;
    w->cap = want;
    return FR_OK;
}

void fr_pb_writer_free(fr_pb_writer *w)
{
    free(w->buf);
    w->buf = NULL;
    w->len = w->cap = 0;
}
