/* Counter-based client keys: key = F(seed, round, client index).
 *
 * Being a pure function of the counter (no sequential state) is what lets
 * workers that each hold a slice [a, b) of a round's clients draw exactly
 * the keys one machine would.  The (seed, round) pair picks a stream's start
 * through SplitMix64's finalizer (Stafford's "mix13", a bijection), and the
 * client index picks the position in a wyrand stream.  Keys are uniform on
 * [0, 2^64), which is all reservoir sampling asks of them. */
#ifndef FASTREC_KEYS_H
#define FASTREC_KEYS_H

#include <stdint.h>

#include "fastrec_status.h"

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

/* 64x64 -> 128-bit product, folded: high word XOR low word. */
static inline uint64_t fr_mum(uint64_t a, uint64_t b)
{
#if defined(__SIZEOF_INT128__)
    __uint128_t p = (__uint128_t)a * b;
    return (uint64_t)(p >> 64) ^ (uint64_t)p;
#else
    /* Portable schoolbook product from 32-bit halves (e.g. MSVC). */
    uint64_t al = (uint32_t)a, ah = a >> 32, bl = (uint32_t)b, bh = b >> 32;
    uint64_t ll = al * bl, lh = al * bh, hl = ah * bl, hh = ah * bh;
    uint64_t mid = (ll >> 32) + (uint32_t)lh + (uint32_t)hl;
    uint64_t lo = (mid << 32) | (uint32_t)ll;
    uint64_t hi = hh + (lh >> 32) + (hl >> 32) + (mid >> 32);
    return hi ^ lo;
#endif
}

#define FR_WY_P0 0xa0761d6478bd642full
#define FR_WY_P1 0xe7037ed1a0b428dbull

/* Key of the client at `index` of a round's stream: wyrand (Wang Yi), a
 * Weyl sequence scrambled by one folded 128-bit multiply. It passes
 * BigCrush and PractRand, and costs one multiply where SplitMix64's
 * finalizer costs two: this is the hot loop of every round. */
static inline uint64_t fr_client_key(uint64_t stream, uint64_t index)
{
    uint64_t s = stream + (index + 1) * FR_WY_P0;
    return fr_mum(s, s ^ FR_WY_P1);
}

/* out[i] = key of client (offset + i) in `round`, for i < n.
 * FR_ERR_VALUE if n or offset is negative, FR_ERR_OVERFLOW if offset + n
 * does not fit in int64. */
fr_status fr_client_keys(uint64_t seed0, uint64_t seed1, int64_t round, int64_t offset,
                         int64_t n, uint64_t *out);

#endif
