/* Reservoir sampling by random keys (the "top-k keys" form of reservoir
 * sampling: every item gets an independent uniform key and the sample is
 * the k items with the largest keys).  Because selection depends only on
 * the keys, a sample of a union is the top k of the samples of the parts:
 * rounds, workers and reservoirs merge exactly. */
#ifndef FASTREC_RESERVOIR_H
#define FASTREC_RESERVOIR_H

#include <stddef.h>
#include <stdint.h>

#include "fastrec_status.h"

/* One sampled client.  (round, index) identifies the client; `src` is its
 * position in the caller's input (the batch, or the concatenation of the
 * reservoirs being merged): it breaks ties between equal keys. */
typedef struct {
    uint64_t key;
    int64_t round;
    int64_t index;
    int64_t src;
} fr_entry;

/* Priority order: larger key first; equal keys fall back to the earlier
 * position `src`, as TFF's top-k keeps the first of tied values: within a
 * round that is the lower client index, in a merge the first reservoir's
 * entries.  With distinct positions the order is total. */
int fr_entry_better(const fr_entry *a, const fr_entry *b);

/* Sample one round: clients offset .. offset+n-1 of `round` get keys from
 * keys.h and the best min(n, k) are written to out[] best-first, with
 * src = position in the batch (index - offset).  One pass over n keys,
 * no key array: a size-k heap keeps the best seen so far.
 * `out` must hold k entries.  FR_ERR_VALUE for negative n, k, offset or
 * round; FR_ERR_OVERFLOW if offset + n overflows int64. */
fr_status fr_round_sample(uint64_t seed0, uint64_t seed1, int64_t round, int64_t offset,
                          int64_t n, int64_t k, fr_entry *out, int64_t *out_count);

/* A reservoir being filled: the best `count` (at most `cap`) entries offered so far.  Until
 * it is full the entries sit in offer order; from then on `heap` is a binary heap whose
 * root is the worst entry (the next to evict). */
typedef struct {
    fr_entry *heap;   /* cap entries, owned by the caller */
    int64_t cap;
    int64_t count;
} fr_reservoir;

/* Offer the clients at batch positions start .. start+n-1 of one round to `r`: the client at
 * position p has index offset + p and the key fr_client_key(stream, offset + p).  A
 * reservoir must be offered positions in increasing order (ranges may skip positions, as when
 * threads share a round's chunks): that is what lets an equal key lose to the entry already
 * held without comparing positions.  FR_ERR_VALUE for negative start or n, or a negative
 * round or offset; FR_ERR_OVERFLOW if offset + start + n overflows int64. */
fr_status fr_reservoir_draw(fr_reservoir *r, uint64_t stream, int64_t round, int64_t offset,
                            int64_t start, int64_t n);

/* Merge reservoirs: sorts items[0..n) best-first in place and sets
 * *out_count = min(n, k), the number of leading items that form the top k.
 * FR_ERR_VALUE for negative n or k. */
fr_status fr_select_top(fr_entry *items, int64_t n, int64_t k, int64_t *out_count);

/* Sorts items[0..n) in arrival order: by round, then index, then src. */
void fr_sort_arrival(fr_entry *items, int64_t n);

/* dst[j] = row pos[j] of src, for j < npos: rows are row_bytes contiguous
 * bytes, row_stride bytes apart (any sign).  FR_ERR_VALUE if a position is
 * outside [0, nrows) or a size is negative. */
fr_status fr_gather_rows(const char *src, int64_t nrows, int64_t row_stride, int64_t row_bytes,
                         const int64_t *pos, int64_t npos, char *dst);

#endif
