/* The k-th largest of n values (1 <= k <= n): the one selection both kernels use, for page scores
(cpu_attention.c, float) and for |x| keys (cpu_mlp.c, uint32). Ties need no rule here: callers compare
against the value it returns.

It is the largest t with at least k keys >= t, built bit by bit from the top (from the highest bit in
which the keys differ) with branch-free counting passes that the compiler vectorises, stopping at the
first t that exactly k keys reach (the answer is then their least). Why not quickselect (the first version): its
data-dependent branches mispredicted on about every other comparison; the 9 page-score selections of a
SmolLM2 16k-token layer (2048 pages each) took ~300 us of a 2.2 ms attention call (Zen 4, 2026-12-03).
Floats are mapped to keys whose unsigned order is the float order (-0 below +0, which the callers' float
comparisons treat alike). */
#ifndef SOLC_CPU_SELECT_H
#define SOLC_CPU_SELECT_H

#include <stdint.h>
#include <string.h>

static inline uint32_t kth_largest_u32(const uint32_t *key, long n, long k) {
    uint32_t all = ~0u, any = 0;
    for (long i = 0; i < n; ++i) {
        all &= key[i];
        any |= key[i];
    }
    if (all == any) return all;
    int b = 31;
    while (!((all ^ any) >> b & 1u)) --b;  /* the bits above b are every key's */
    uint32_t t = b == 31 ? 0 : all & ~0u << (b + 1);
    for (; b >= 0; --b) {
        uint32_t cand = t | (1u << b);
        long count = 0;
        for (long i = 0; i < n; ++i) count += key[i] >= cand;
        if (count < k) continue;
        t = cand;
        if (count == k) {  /* exactly k keys >= t: the k-th largest is the least of them */
            uint32_t least = ~0u;
            for (long i = 0; i < n; ++i) least = key[i] >= t && key[i] < least ? key[i] : least;
            return least;
        }
    }
    return t;
}

static inline uint32_t float_key(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u & 0x80000000u ? ~u : u | 0x80000000u;
}

static inline float key_float(uint32_t key) {
    uint32_t u = key & 0x80000000u ? key ^ 0x80000000u : ~key;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* a: n floats, overwritten with their keys (callers pass a scratch copy). */
static inline float kth_largest_f32(float *a, long n, long k) {
    uint32_t *key = (uint32_t *)a;
    for (long i = 0; i < n; ++i) key[i] = float_key(a[i]);
    return key_float(kth_largest_u32(key, n, k));
}

#endif
