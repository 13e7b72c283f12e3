/* Protocol Buffers wire-format primitives: varints, zigzag, tags, lengths,
 * skipping unknown fields, UTF-8 validation, and a growable writer.
 *
 * The encoding (https://protobuf.dev/programming-guides/encoding/):
 *   a message is a sequence of fields; each field is a tag varint
 *   (field_number << 3 | wire_type) followed by its payload:
 *     0 VARINT  base-128 varint, little-endian groups of 7 bits, high bit = "more"
 *     1 I64     8 bytes little-endian (double, fixed64)
 *     2 LEN     a length varint, then that many bytes (strings, bytes,
 *               submessages, packed repeated scalars)
 *     3 SGROUP / 4 EGROUP  a deprecated group: fields up to the matching end tag
 *     5 I32     4 bytes little-endian
 *   sint64 is zigzag-mapped ((n << 1) ^ (n >> 63)) so small negatives stay short.
 *
 * The reader follows protobuf's own C runtime (upb, what Python's protobuf
 * uses) exactly, because fastrec must accept precisely the bytes protobuf
 * accepts:
 *   - a varint has at most 10 bytes; bits past 64 in the 10th byte are dropped;
 *   - a tag has at most 5 bytes and must fit in 32 bits; field number 0 and
 *     wire types 6 and 7 are malformed;
 *   - a length is any varint (overlong ones too, up to the 10 bytes) whose value
 *     is < 2^31 and fits in what is left;
 *   - an unknown group is skipped field by field, up to its matching EGROUP,
 *     counting one nesting level per group; a stray EGROUP is malformed.
 * Nothing here allocates memory sized by an input length, and every read
 * checks the bytes remaining first. Errors record the byte offset (from the
 * start of the whole input) and a static message in an fr_pb_ctx.
 *
 * Plain C11, no Python API. */
#ifndef FASTREC_PB_H
#define FASTREC_PB_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "fastrec_status.h"

enum {
    FR_PB_VARINT = 0,
    FR_PB_I64 = 1,
    FR_PB_LEN = 2,
    FR_PB_SGROUP = 3,
    FR_PB_EGROUP = 4,
    FR_PB_I32 = 5
};

/* Python protobuf's default recursion limit: messages and groups nested
 * deeper than this below the top-level message are refused. */
#define FR_PB_MAX_DEPTH 100

/* Decoder context: where the input starts (for offsets) and the first error. */
typedef struct {
    const uint8_t *base;
    size_t err_off;      /* byte offset of the error from base */
    const char *err;     /* static description, NULL while no error */
} fr_pb_ctx;

/* One field as read by fr_pb_next_field. */
typedef struct {
    uint32_t number;
    int wire_type;
    const uint8_t *start;  /* the tag's first byte */
    uint64_t u;            /* VARINT value, or the I64 / I32 bits */
    const uint8_t *ptr;    /* LEN payload */
    size_t len;
} fr_pb_field;

/* Record an error at `at` (only the first error is kept); returns FR_ERR_VALUE. */
fr_status fr_pb_fail(fr_pb_ctx *c, const uint8_t *at, const char *why);

/* Read a varint at *p (< end). Advances *p. Error: FR_ERR_VALUE (truncated,
 * or more than 10 bytes). */
fr_status fr_pb_read_varint(fr_pb_ctx *c, const uint8_t **p, const uint8_t *end, uint64_t *v);

/* Read one field (tag and payload) at *p, advancing past it. Groups are
 * returned with wire type SGROUP after being skipped whole (they are never
 * known fields in fastrec's schemas); `depth` is the nesting level of the
 * message being read (0 for the top level). An EGROUP tag is malformed here
 * (fastrec's messages never sit inside a group). Error: FR_ERR_VALUE. */
fr_status fr_pb_next_field_slow(fr_pb_ctx *c, const uint8_t **p, const uint8_t *end, int depth,
                                fr_pb_field *f);
static inline fr_status fr_pb_next_field(fr_pb_ctx *c, const uint8_t **p, const uint8_t *end,
                                         int depth, fr_pb_field *f);

/* 1 if s[0..n) is well-formed UTF-8 (no overlongs, no surrogates, <= U+10FFFF). */
int fr_pb_utf8_valid(const uint8_t *s, size_t n);

/* Check a string field's payload; FR_ERR_VALUE ("invalid UTF-8") at f->ptr. */
fr_status fr_pb_check_utf8(fr_pb_ctx *c, const fr_pb_field *f);

static inline uint64_t fr_pb_zigzag64(int64_t n)
{
    return ((uint64_t)n << 1) ^ (n < 0 ? UINT64_MAX : 0);
}

static inline int64_t fr_pb_unzigzag64(uint64_t u)
{
    /* (u >> 1) ^ -(u & 1), written without signed overflow */
    uint64_t r = (u >> 1) ^ (0 - (u & 1));
    int64_t out;
    memcpy(&out, &r, sizeof out);
    return out;
}

static inline double fr_pb_bits_to_double(uint64_t u)
{
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

static inline uint64_t fr_pb_double_to_bits(double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    return u;
}

static inline size_t fr_pb_varint_size(uint64_t v)
{
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

/* Size of a tag for `number` (any wire type). */
static inline size_t fr_pb_tag_size(uint32_t number)
{
    return fr_pb_varint_size((uint64_t)number << 3);
}

/* Size of a LEN field of `number` whose payload is n bytes. */
static inline size_t fr_pb_len_field_size(uint32_t number, size_t n)
{
    return fr_pb_tag_size(number) + fr_pb_varint_size(n) + n;
}

/* ------------------------------------------------------------------------
 * Writer. Callers compute the exact size first (the fr_pb_*_size helpers),
 * reserve it once, then write without further checks: the put functions
 * assume the room was reserved. fr_pb_reserve grows to exactly what is asked
 * (no doubling), so a buffer sized up front is never over-allocated.
 * ------------------------------------------------------------------------ */
typedef struct {
    uint8_t *buf;
    size_t len, cap;
} fr_pb_writer;

/* Ensure room for `extra` more bytes. Error: FR_ERR_OVERFLOW, FR_ERR_NOMEM. */
fr_status fr_pb_reserve(fr_pb_writer *w, size_t extra);
void fr_pb_writer_free(fr_pb_writer *w);

static inline void fr_pb_put_varint(fr_pb_writer *w, uint64_t v)
{
    uint8_t *p = w->buf + w->len;
    while (v >= 0x80) {
        *p++ = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    *p++ = (uint8_t)v;
    w->len = (size_t)(p - w->buf);
}

static inline void fr_pb_put_tag(fr_pb_writer *w, uint32_t number, int wire_type)
{
    fr_pb_put_varint(w, ((uint64_t)number << 3) | (uint64_t)wire_type);
}

static inline void fr_pb_put_fixed64(fr_pb_writer *w, uint64_t v)
{
    int i;
    for (i = 0; i < 8; i++)
        w->buf[w->len++] = (uint8_t)(v >> (8 * i));
}

static inline void fr_pb_put_raw(fr_pb_writer *w, const void *src, size_t n)
{
    if (n) {
        memcpy(w->buf + w->len, src, n);
        w->len += n;
    }
}

/* Tag, length, payload. */
static inline void fr_pb_put_len_field(fr_pb_writer *w, uint32_t number, const void *src, size_t n)
{
    fr_pb_put_tag(w, number, FR_PB_LEN);
    fr_pb_put_varint(w, n);
    fr_pb_put_raw(w, src, n);
}

/* Little-endian 8 bytes at p (caller checked the room). */
static inline uint64_t fr_pb_load64(const uint8_t *p)
{
    uint64_t v = 0;
    int i;
    for (i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* fr_pb_next_field, inline for the fields nearly every record is made of: a one-byte
 * tag (field numbers 1-15) and a one-byte length or varint, or 8 fixed bytes. Anything
 * else, and every error, is the general reader's (which reads those alike). */
static inline fr_status fr_pb_next_field(fr_pb_ctx *c, const uint8_t **p, const uint8_t *end,
                                         int depth, fr_pb_field *f)
{
    const uint8_t *q = *p;
    size_t room = (size_t)(end - q);
    if (room >= 2 && q[0] >= 8 && q[0] < 0x80) {   /* >= 8: field number not 0 */
        int wt = q[0] & 7;
        if (wt == FR_PB_LEN && q[1] < 0x80 && q[1] <= room - 2) {
            f->ptr = q + 2;
            f->len = q[1];
            *p = q + 2 + q[1];
        } else if (wt == FR_PB_VARINT && q[1] < 0x80) {
            f->u = q[1];
            *p = q + 2;
        } else if (wt == FR_PB_I64 && room >= 9) {
            f->u = fr_pb_load64(q + 1);
            *p = q + 9;
        } else {
            return fr_pb_next_field_slow(c, p, end, depth, f);
        }
        f->start = q;
        f->number = (uint32_t)(q[0] >> 3);
        f->wire_type = wt;
        return FR_OK;
    }
    return fr_pb_next_field_slow(c, p, end, depth, f);
}

#endif
