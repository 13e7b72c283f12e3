/* The .npy container format: header encoder, defensive header parser, and
 * the data copies (contiguous and strided gather) behind fastrec.Array.
 *
 * Format facts follow numpy/lib/format.py (numpy 2.x):
 *   magic "\x93NUMPY", major, minor, header length (uint16 LE for 1.0,
 *   uint32 LE for 2.0 / 3.0), then a Python dict literal padded with spaces
 *   and one final '\n' so that the data starts on a 64-byte boundary.
 *
 * Plain C11, no Python API. Every function returns an fr_status; on error
 * the parser fills a human-readable message. */
#ifndef FASTREC_NPY_H
#define FASTREC_NPY_H

#include <stddef.h>
#include <stdint.h>

#include "fastrec_status.h"

/* NPY_MAXDIMS of numpy >= 2.0. */
#define FR_NPY_MAXDIMS 64
/* numpy.load refuses longer headers without allow_pickle (ast safety). */
#define FR_NPY_MAX_HEADER_CHARS 10000
#define FR_NPY_MSG_LEN 256

/* What the 'descr' value of a header is. */
enum {
    FR_NPY_DESCR_STR = 1,  /* a plain string literal: descr_off/len span its contents */
    FR_NPY_DESCR_OTHER = 2 /* a list/tuple/other literal: the span is the raw source text */
};

typedef struct {
    int major, minor;
    size_t data_offset;          /* bytes before the array data */
    size_t descr_off, descr_len; /* into the input buffer */
    int descr_kind;
    int fortran_order;
    int ndim;
    int64_t shape[FR_NPY_MAXDIMS];
    int py2_retry;              /* numpy would need its Python 2 header filter (it warns) */
    char msg[FR_NPY_MSG_LEN];    /* set when a call returns an error */
} fr_npy_header;

/* Parse magic, version, header length and the header dict of buf[0..len).
 * Accepts what numpy.load's literal_eval accepts for the three keys, except
 * a few exotic Python-literal forms (string escapes, implicit string
 * concatenation, parenthesised integers, bools as dimensions), which are
 * rejected with FR_ERR_VALUE. Never reads outside buf. */
fr_status fr_npy_parse_header(const uint8_t *buf, size_t len, fr_npy_header *h);

/* Bytes of array data the header declares for an item size, with every
 * multiplication checked (the product of the non-zero dimensions times the
 * item size must fit in int64, as numpy requires even for empty arrays). */
fr_status fr_npy_data_nbytes(fr_npy_header *h, size_t itemsize, size_t *nbytes);

/* Upper bound on the encoded header size for a descr literal of descr_len
 * bytes and ndim dimensions (for sizing a buffer). */
size_t fr_npy_header_bound(size_t descr_len, int ndim);

/* Write magic + length + header dict exactly as numpy.save does. descr_lit is
 * the repr() of the descr (e.g. "'<f8'"), already encoded (latin-1, or UTF-8
 * when utf8 != 0, which forces format 3.0). Picks 1.0, or 2.0 when the header
 * does not fit a uint16 length. Writes at most cap bytes. */
fr_status fr_npy_write_header(uint8_t *dst, size_t cap, const char *descr_lit, size_t descr_len,
                              int fortran_order, int ndim, const int64_t *shape, int utf8,
                              size_t *out_len, int *out_major);

/* Copy an n-dimensional strided array (strides in bytes, may be negative)
 * into dst in C order. dst must hold prod(shape) * itemsize bytes. */
void fr_npy_gather(uint8_t *dst, const uint8_t *src, int ndim, const int64_t *shape,
                   const int64_t *strides, size_t itemsize);

/* Hint the OS to back a large, about-to-be-filled buffer with huge pages
 * (no-op for small buffers and off Linux). */
void fr_npy_advise_huge(void *p, size_t n);

#endif
