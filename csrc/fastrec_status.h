/* Status codes shared by every C kernel in csrc/.
 *
 * Kernels never touch Python objects; they return one of these and the
 * Cython layer turns it into an exception carrying context. */
#ifndef FASTREC_STATUS_H
#define FASTREC_STATUS_H

typedef enum {
    FR_OK = 0,
    FR_ERR_VALUE = -1,    /* malformed input: maps to ValueError */
    FR_ERR_TYPE = -2,     /* wrong kind of input: maps to TypeError */
    FR_ERR_OVERFLOW = -3, /* a size computation would overflow: ValueError */
    FR_ERR_NOMEM = -4     /* allocation failed: MemoryError */
} fr_status;

const char *fr_status_name(fr_status s);

#endif
