#include "keys.h"

fr_status fr_client_keys(uint64_t seed0, uint64_t seed1, int64_t round, int64_t offset,
                         int64_t n, uint64_t *out)
{
    if (n < 0 || offset < 0)
        return FR_ERR_VALUE;
    if (offset > INT64_MAX - n)
        return FR_ERR_OVERFLOW;
    uint64_t stream = fr_round_stream(seed0, seed1, (uint64_t)round);
    for (int64_t i = 0; i < n; i++)
        out[i] = fr_client_key(stream, (uint64_t)(offset + i));
    return FR_OK;
}
