# C declarations of the sampling kernels in csrc/ (see the headers for contracts).
from libc.stdint cimport int64_t, uint64_t

from fastrec._status cimport fr_status


cdef extern from "nonfinite.h" nogil:
    ctypedef enum fr_ftype:
        FR_FT_FLOAT16
        FR_FT_FLOAT32
        FR_FT_FLOAT64
        FR_FT_COMPLEX64
        FR_FT_COMPLEX128
    size_t fr_ftype_size(fr_ftype t)
    fr_status fr_count_nonfinite(const char *data, fr_ftype t, int ndim, const int64_t *shape,
                                 const int64_t *strides, int per_row, int64_t *out)


cdef extern from "keys.h" nogil:
    fr_status fr_client_keys(uint64_t seed0, uint64_t seed1, int64_t round, int64_t offset,
                             int64_t n, uint64_t *out)
    uint64_t fr_round_stream(uint64_t seed0, uint64_t seed1, uint64_t round)


cdef extern from "reservoir.h" nogil:
    ctypedef struct fr_entry:
        uint64_t key
        int64_t round
        int64_t index
        int64_t src
    fr_status fr_round_sample(uint64_t seed0, uint64_t seed1, int64_t round, int64_t offset,
                              int64_t n, int64_t k, fr_entry *out, int64_t *out_count)
    ctypedef struct fr_reservoir:
        fr_entry *heap
        int64_t cap
        int64_t count
    fr_status fr_reservoir_draw(fr_reservoir *r, uint64_t stream, int64_t round, int64_t offset,
                                int64_t start, int64_t n)
    fr_status fr_select_top(fr_entry *items, int64_t n, int64_t k, int64_t *out_count)
    void fr_sort_arrival(fr_entry *items, int64_t n)
    fr_status fr_gather_rows(const char *src, int64_t nrows, int64_t row_stride, int64_t row_bytes,
                             const int64_t *pos, int64_t npos, char *dst)
