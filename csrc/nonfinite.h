/* Counting NaN/±Inf elements with IEEE-754 bit tests.
 *
 * A float is non-finite exactly when its exponent field is all ones, so the
 * test is a mask-and-compare on the raw bits: no FPU exceptions, no
 * dependence on the rounding mode or -ffast-math, and it vectorizes. */
#ifndef FASTREC_NONFINITE_H
#define FASTREC_NONFINITE_H

#include <stddef.h>
#include <stdint.h>

#include "fastrec_status.h"

typedef enum {
    FR_FT_FLOAT16 = 1,
    FR_FT_FLOAT32 = 2,
    FR_FT_FLOAT64 = 3,
    FR_FT_COMPLEX64 = 4,  /* two float32: an element counts once if either part is non-finite */
    FR_FT_COMPLEX128 = 5  /* two float64 */
} fr_ftype;

/* Bytes per element of `t`, or 0 for an unknown type. */
size_t fr_ftype_size(fr_ftype t);

/* Count the non-finite elements of the strided n-d array at `data`.
 *
 * `shape` and `strides` (in bytes, possibly negative or zero) have `ndim`
 * entries; ndim == 0 is a single element.  With `per_row` set (ndim >= 1),
 * *out is instead the number of indices along axis 0 whose sub-array holds
 * at least one non-finite element: the per-client count of a column batch.
 * Returns FR_ERR_VALUE for a negative extent or ndim outside [0, 64],
 * FR_ERR_TYPE for an unknown `t`. */
fr_status fr_count_nonfinite(const char *data, fr_ftype t, int ndim, const int64_t *shape,
                             const int64_t *strides, int per_row, int64_t *out);

#endif
