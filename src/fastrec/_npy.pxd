# Cython declarations of the C .npy kernels in csrc/npy.h.
from libc.stdint cimport int64_t, uint8_t

from fastrec._status cimport fr_status


cdef extern from "npy.h" nogil:
    enum:
        FR_NPY_MAXDIMS
        FR_NPY_DESCR_STR
        FR_NPY_DESCR_OTHER

    ctypedef struct fr_npy_header:
        int major, minor
        size_t data_offset
        size_t descr_off, descr_len
        int descr_kind
        int fortran_order
        int ndim
        int64_t shape[64]
        int py2_retry
        char msg[256]

    fr_status fr_npy_parse_header(const uint8_t *buf, size_t len, fr_npy_header *h)
    fr_status fr_npy_data_nbytes(fr_npy_header *h, size_t itemsize, size_t *nbytes)
    size_t fr_npy_header_bound(size_t descr_len, int ndim)
    fr_status fr_npy_write_header(uint8_t *dst, size_t cap, const char *descr_lit,
                                  size_t descr_len, int fortran_order, int ndim,
                                  const int64_t *shape, int utf8, size_t *out_len,
                                  int *out_major)
    void fr_npy_gather(uint8_t *dst, const uint8_t *src, int ndim, const int64_t *shape,
                       const int64_t *strides, size_t itemsize)
    void fr_npy_advise_huge(void *p, size_t n)
