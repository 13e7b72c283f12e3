/* Counter-based client keys: key = F(seed, round, client index).
 *
 * Being a pure function of the counter (no sequential state) is what lets
 * workers that each hold a slice [a, b) of a round's clients draw exactly
 * the keys one machine would.  F is a SplitMix64 stream (Steele, Lea &
 * Flood 2014): the (seed, round) pair picks the stream's start, the client
 * index picks the position, and the 64-bit finalizer (Stafford's "mix13")
 * scrambles it.  SplitMix64 passes BigCrush, and each key is uniform on
 * [0, 2^64), which is all reservoir sampling asks of it. */
#ifndef FASTREC_KEYS_H
#define FASTREC_KEYS_H

#include <stdint.h>

#include "fastrec_status.h"

#define FR_SPLITMIX_GAMMA 0x9E3779B97F4A7C15ull

static inline uint64_t fr_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Start of the stream for one round.  fr_mix64 is a bijection, so distinct
 * rounds under one seed get distinct starts. */
static inline uint64_t fr_round_stream(uint64_t seed0, uint64_t seed1, uint64_t round)
{
    return fr_mix64(fr_mix64(seed1 ^ round) + seed0);
}

static inline uint64_t fr_client_key(uint64_t stream, uint64_t index)
{
    return fr_mix64(stream + (index + 1) * FR_SPLITMIX_GAMMA);
}

/* out[i] = key of client (offset + i) in `round`, for i < n.
 * FR_ERR_VALUE if n or offset is negative, FR_ERR_OVERFLOW if offset + n
 * does not fit in int64. */
fr_status fr_client_keys(uint64_t seed0, uint64_t seed1, int64_t round, int64_t offset,
                         int64_t n, uint64_t *out);

#endif
