# Cython declaration of the status codes every C kernel in csrc/ returns.

cdef extern from "fastrec_status.h" nogil:
    ctypedef enum fr_status:
        FR_OK
        FR_ERR_VALUE
        FR_ERR_TYPE
        FR_ERR_OVERFLOW
        FR_ERR_NOMEM
    const char *fr_status_name(fr_status s)
