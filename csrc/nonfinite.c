#include "nonfinite.h"

#include <string.h>

#define FR_MAX_NDIM 64

/* memcpy keeps unaligned and type-punned loads defined; compilers turn it
 * into a single load. */
static inline uint16_t load16(const char *p) { uint16_t v; memcpy(&v, p, sizeof v); return v; }
static inline uint32_t load32(const char *p) { uint32_t v; memcpy(&v, p, sizeof v); return v; }
static inline uint64_t load64(const char *p) { uint64_t v; memcpy(&v, p, sizeof v); return v; }

static inline int bad16(uint16_t b) { return (b & 0x7C00u) == 0x7C00u; }
static inline int bad32(uint32_t b) { return (b & 0x7F800000u) == 0x7F800000u; }
static inline int bad64(uint64_t b) { return (b & 0x7FF0000000000000ull) == 0x7FF0000000000000ull; }

size_t fr_ftype_size(fr_ftype t)
{
    switch (t) {
    case FR_FT_FLOAT16: return 2;
    case FR_FT_FLOAT32: return 4;
    case FR_FT_FLOAT64: return 8;
    case FR_FT_COMPLEX64: return 8;
    case FR_FT_COMPLEX128: return 16;
    }
    return 0;
}

/* Contiguous runs get their own loops over typed arrays so the compiler can
 * vectorize the branch-free count; this is the path that must keep up with
 * memory bandwidth.  Counts accumulate in 32-bit lanes over blocks short
 * enough never to overflow them, because widening every compare result to
 * 64 bits halves the vector throughput. */
#define FR_BLOCK 65536

#define FR_COUNT_BLOCKED(test)                                                 \
    do {                                                                       \
        for (int64_t start = 0; start < n; start += FR_BLOCK) {                \
            int64_t stop = n - start < FR_BLOCK ? n : start + FR_BLOCK;        \
            uint32_t b = 0;                                                    \
            for (int64_t i = start; i < stop; i++)                             \
                b += (uint32_t)(test);                                         \
            c += b;                                                            \
        }                                                                      \
    } while (0)

#if defined(__GNUC__) || defined(__clang__)
#define FR_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FR_ALWAYS_INLINE inline
#endif

static FR_ALWAYS_INLINE int64_t count_contig_body(const char *p, fr_ftype t, int64_t n)
{
    int64_t c = 0;
    switch (t) {
    case FR_FT_FLOAT16:
        FR_COUNT_BLOCKED(bad16(load16(p + 2 * i)));
        break;
    case FR_FT_FLOAT32:
        FR_COUNT_BLOCKED(bad32(load32(p + 4 * i)));
        break;
    case FR_FT_FLOAT64:
        FR_COUNT_BLOCKED(bad64(load64(p + 8 * i)));
        break;
    case FR_FT_COMPLEX64:
        FR_COUNT_BLOCKED(bad32(load32(p + 8 * i)) | bad32(load32(p + 8 * i + 4)));
        break;
    case FR_FT_COMPLEX128:
        FR_COUNT_BLOCKED(bad64(load64(p + 16 * i)) | bad64(load64(p + 16 * i + 8)));
        break;
    }
    return c;
}

/* The portable x86-64 build may only assume SSE2, which lacks 64-bit
 * compares and handles half as many lanes; with the whole array streaming
 * through, that is the difference between keeping up with memory and not.
 * So on x86-64 the same loops are also built for AVX2 and picked at run
 * time. */
static int64_t count_contig_generic(const char *p, fr_ftype t, int64_t n)
{
    return count_contig_body(p, t, n);
}

/* Not with clang-cl (_MSC_VER): __builtin_cpu_supports reads __cpu_model from
 * compiler-rt's builtins, which the MSVC toolchain does not link, so the
 * module would fail to link; MSVC itself has no target attribute. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(_MSC_VER)
#define FR_NONFINITE_AVX2 1
__attribute__((target("avx2")))
static int64_t count_contig_avx2(const char *p, fr_ftype t, int64_t n)
{
    return count_contig_body(p, t, n);
}
#endif

static int64_t count_contig(const char *p, fr_ftype t, int64_t n)
{
#ifdef FR_NONFINITE_AVX2
    if (__builtin_cpu_supports("avx2"))
        return count_contig_avx2(p, t, n);
#endif
    return count_contig_generic(p, t, n);
}

/* Elements are addressed as base + i * stride: stepping a pointer past the last
 * one (or before the first, for a negative stride) is undefined behaviour even
 * if it is never read. */
static int64_t count_strided(const char *base, fr_ftype t, int64_t n, int64_t stride)
{
    int64_t c = 0;
    for (int64_t i = 0; i < n; i++) {
        const char *p = base + i * stride;
        switch (t) {
        case FR_FT_FLOAT16: c += bad16(load16(p)); break;
        case FR_FT_FLOAT32: c += bad32(load32(p)); break;
        case FR_FT_FLOAT64: c += bad64(load64(p)); break;
        case FR_FT_COMPLEX64: c += bad32(load32(p)) | bad32(load32(p + 4)); break;
        case FR_FT_COMPLEX128: c += bad64(load64(p)) | bad64(load64(p + 8)); break;
        }
    }
    return c;
}

static int64_t count_1d(const char *p, fr_ftype t, int64_t n, int64_t stride)
{
    if (stride == (int64_t)fr_ftype_size(t))
        return count_contig(p, t, n);
    return count_strided(p, t, n, stride);
}

/* Odometer walk over the outer ndim-1 axes, the innermost axis as a 1-d
 * run.  Axes are visited in the caller's order; the caller (Cython) passes
 * them already sorted so the innermost is the smallest stride. */
static int64_t count_nd(const char *data, fr_ftype t, int ndim, const int64_t *shape,
                        const int64_t *strides)
{
    if (ndim == 0)
        return count_1d(data, t, 1, 0);
    for (int d = 0; d < ndim; d++)
        if (shape[d] == 0)
            return 0;
    int inner = ndim - 1;
    int64_t idx[FR_MAX_NDIM] = {0};
    int64_t c = 0;
    const char *p = data;
    for (;;) {
        c += count_1d(p, t, shape[inner], strides[inner]);
        int d = inner - 1;
        /* p only ever points at an element: rewind a finished axis from its last
         * index instead of stepping past it first */
        while (d >= 0 && ++idx[d] == shape[d]) {
            p -= strides[d] * (shape[d] - 1);
            idx[d] = 0;
            d--;
        }
        if (d < 0)
            return c;
        p += strides[d];
    }
}

fr_status fr_count_nonfinite(const char *data, fr_ftype t, int ndim, const int64_t *shape,
                             const int64_t *strides, int per_row, int64_t *out)
{
    *out = 0;
    if (fr_ftype_size(t) == 0)
        return FR_ERR_TYPE;
    if (ndim < 0 || ndim > FR_MAX_NDIM || (per_row && ndim == 0))
        return FR_ERR_VALUE;
    for (int d = 0; d < ndim; d++)
        if (shape[d] < 0)
            return FR_ERR_VALUE;
    if (!per_row) {
        *out = count_nd(data, t, ndim, shape, strides);
        return FR_OK;
    }
    /* A row of one element is just an element: count them in one run. */
    int single = 1;
    for (int d = 1; d < ndim; d++) {
        if (shape[d] == 0)
            return FR_OK;
        single &= shape[d] == 1;
    }
    if (single) {
        *out = count_1d(data, t, shape[0], strides[0]);
        return FR_OK;
    }
    int64_t rows = 0;
    for (int64_t r = 0; r < shape[0]; r++)
        rows += count_nd(data + r * strides[0], t, ndim - 1, shape + 1, strides + 1) > 0;
    *out = rows;
    return FR_OK;
}
