#include "reservoir.h"

#include <string.h>

#include "keys.h"

int fr_entry_better(const fr_entry *a, const fr_entry *b)
{
    if (a->key != b->key)
        return a->key > b->key;
    return a->src < b->src;
}

/* Arrival order: by round, then client index, then position. */
static int arrives_first(const fr_entry *a, const fr_entry *b)
{
    if (a->round != b->round)
        return a->round < b->round;
    if (a->index != b->index)
        return a->index < b->index;
    return a->src < b->src;
}

typedef int (*fr_order)(const fr_entry *, const fr_entry *);

/* A binary heap under `first`, whose root is the entry that `first` ranks last: for the
   reservoir (first = fr_entry_better) the worst entry, the one to evict. */
static inline void sift_down_by(fr_entry *h, int64_t n, int64_t i, fr_order first)
{
    fr_entry x = h[i];
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && first(&h[c], &h[c + 1]))
            c++;
        if (!first(&x, &h[c]))
            break;
        h[i] = h[c];
        i = c;
    }
    h[i] = x;
}

static void sift_down(fr_entry *h, int64_t n, int64_t i)
{
    sift_down_by(h, n, i, fr_entry_better);
}

static inline void heapify_by(fr_entry *h, int64_t n, fr_order first)
{
    for (int64_t i = n / 2 - 1; i >= 0; i--)
        sift_down_by(h, n, i, first);
}

static void heapify(fr_entry *h, int64_t n)
{
    heapify_by(h, n, fr_entry_better);
}

/* Heapsort: moving the root (ranked last) to the end each time leaves the array in
   `first` order. */
static inline void heap_sort(fr_entry *h, int64_t n, fr_order first)
{
    heapify_by(h, n, first);
    for (int64_t end = n - 1; end > 0; end--) {
        fr_entry t = h[0];
        h[0] = h[end];
        h[end] = t;
        sift_down_by(h, end, 0, first);
    }
}

static void sort_best_first(fr_entry *h, int64_t n)
{
    heap_sort(h, n, fr_entry_better);
}

void fr_sort_arrival(fr_entry *items, int64_t n)
{
    heap_sort(items, n, arrives_first);
}

fr_status fr_reservoir_draw(fr_reservoir *r, uint64_t stream, int64_t round, int64_t offset,
                            int64_t start, int64_t n)
{
    if (n < 0 || start < 0 || offset < 0 || round < 0 || r->cap < 0 || r->count < 0 ||
        r->count > r->cap)
        return FR_ERR_VALUE;
    if (offset > INT64_MAX - start || offset + start > INT64_MAX - n)
        return FR_ERR_OVERFLOW;
    int64_t p = start, end = start + n;
    /* Fill: the first cap entries are kept whatever their keys. */
    for (; p < end && r->count < r->cap; p++) {
        uint64_t key = fr_client_key(stream, (uint64_t)(offset + p));
        r->heap[r->count++] = (fr_entry){key, round, offset + p, p};
        if (r->count == r->cap)
            heapify(r->heap, r->cap);
    }
    if (p == end || r->cap == 0)
        return FR_OK;
    /* A later client wins a tie only by a larger key, so the hot loop is one compare of
     * the fresh key against the heap's minimum; the heap is touched only on the
     * ~k ln(n/k) replacements. */
    fr_entry *h = r->heap;
    uint64_t floor_key = h[0].key;
    for (; p < end; p++) {
        uint64_t key = fr_client_key(stream, (uint64_t)(offset + p));
        if (key > floor_key) {
            h[0] = (fr_entry){key, round, offset + p, p};
            sift_down(h, r->cap, 0);
            floor_key = h[0].key;
        }
    }
    return FR_OK;
}

fr_status fr_round_sample(uint64_t seed0, uint64_t seed1, int64_t round, int64_t offset,
                          int64_t n, int64_t k, fr_entry *out, int64_t *out_count)
{
    *out_count = 0;
    if (n < 0 || k < 0 || offset < 0 || round < 0)
        return FR_ERR_VALUE;
    if (offset > INT64_MAX - n)
        return FR_ERR_OVERFLOW;
    fr_reservoir r = {out, k < n ? k : n, 0};
    /* An empty reservoir keeps nothing: don't spend O(n) drawing keys for it. */
    if (r.cap == 0)
        return FR_OK;
    fr_status st = fr_reservoir_draw(&r, fr_round_stream(seed0, seed1, (uint64_t)round), round,
                                     offset, 0, n);
    if (st != FR_OK)
        return st;
    sort_best_first(out, r.count);
    *out_count = r.count;
    return FR_OK;
}

fr_status fr_select_top(fr_entry *items, int64_t n, int64_t k, int64_t *out_count)
{
    *out_count = 0;
    if (n < 0 || k < 0)
        return FR_ERR_VALUE;
    sort_best_first(items, n);
    *out_count = k < n ? k : n;
    return FR_OK;
}

fr_status fr_gather_rows(const char *src, int64_t nrows, int64_t row_stride, int64_t row_bytes,
                         const int64_t *pos, int64_t npos, char *dst)
{
    if (nrows < 0 || row_bytes < 0 || npos < 0)
        return FR_ERR_VALUE;
    for (int64_t j = 0; j < npos; j++)
        if (pos[j] < 0 || pos[j] >= nrows)
            return FR_ERR_VALUE;
    for (int64_t j = 0; j < npos; j++)
        memcpy(dst + j * row_bytes, src + pos[j] * row_stride, (size_t)row_bytes);
    return FR_OK;
}
