#include "fastrec_status.h"

/* Human-readable names for status codes, used in exception messages. */
const char *fr_status_name(fr_status s)
{
    switch (s) {
    case FR_OK: return "ok";
    case FR_ERR_VALUE: return "invalid value";
    case FR_ERR_TYPE: return "invalid type";
    case FR_ERR_OVERFLOW: return "size overflow";
    case FR_ERR_NOMEM: return "out of memory";
    }
    return "unknown status";
}
