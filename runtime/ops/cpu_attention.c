/* solc::attention's CPU decode kernel (runtime/ops/cpu_attention.py): each row's one new query over its
cache row, dense or Quest-sparse, reading only what the row's action keeps, in one call for the batch.

Per (row, KV head), for its G query heads:
  dense (kept == 0)  scores over the visible keys 0..p (each key row read once for the G heads), softmax,
                     the probability-weighted sum of the value rows;
  sparse (kept = k)  page scores sum_d max(q_d * max_d, q_d * min_d) from the page statistics, the k-th
                     best score (ties at it keep every tied page: the reference's rule), then the same
                     attention over the kept pages' keys <= p only, straight from the cache (no copies);
                     where the G heads' kept pages cover most of the row (DENSE_MASKED_COST), the dense
                     pass with each head's dropped pages masked (the same keys, one read of K and V, and
                     no read of the statistics: a page's min and max come from its keys as they pass).
The work is shared among threads in items fixed by the row alone (a dense row's chunks of KEY_CHUNK keys,
merged in chunk order; a sparse row's query heads), computed by the same code whatever the batch, the
other rows' actions or the thread split, so a row's output has the same bits alone or in any batch and at
any thread count (DESIGN invariant 6).
The reference (reference.quest_decode) is the definition; this equals it up to float rounding
(tests/runtime/ops/test_cpu_attention.py). fp32 only. */
#pragma GCC optimize("fp-contract=fast")  /* fused multiply-adds: this kernel is checked against the
                                            reference within a tolerance, not bit for bit */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "cpu_select.h"

#define PAGE 8

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

/* exp(x) for x <= 0 (scores minus their maximum), 8 at a time: Cephes' expf (range reduction by ln 2
in two parts, a degree-6 polynomial, the exponent built in the bits), within 2 ulp of expf; below
-87 it flushes to 0, as expf underflows. GCC's vector extensions compile it for the machine's width. */
static inline v8f exp8(v8f x) {
    const v8f lo = (v8f){0} - 87.0f;
    v8i under = x < lo;
    x = (v8f)(((v8i)x & ~under) | ((v8i)lo & under));
    v8f n = x * 1.44269504088896341f + 12582912.0f;  /* round to nearest: 1.5 * 2^23 */
    n = n - 12582912.0f;
    v8f r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    v8f p = (v8f){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    v8f y = p * (r * r) + r + 1.0f;
    v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
    y = y * (v8f)bits;
    return (v8f)((v8i)y & ~under);
}

static inline float dot(const float *a, const float *b, long D) {
    float acc[8] = {0};
    long d = 0;
    for (; d + 8 <= D; d += 8)
        for (int l = 0; l < 8; ++l) acc[l] += a[d + l] * b[d + l];
    float s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for (; d < D; ++d) s += a[d] * b[d];
    return s;
}

/* q . k for a key row: with AVX-512 and D a multiple of 16, one 16-lane sum (D / 16 fused multiply-adds)
and one tree over the lanes; dot()'s 8-lane chain of D / 8 multiply-adds was latency-bound. */
static inline float key_dot(const float *q, const float *k, long D) {
#ifdef __AVX512F__
    if (D % 16 == 0) {
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k));
        for (long d = 16; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + d), acc);
        return _mm512_reduce_add_ps(acc);
    }
#endif
    return dot(q, k, D);
}

/* The maximum of s[0:n] (-inf for none), 8 lanes at a time: a max is exact in any order. */
static float max_of(const float *s, long n) {
    v8f m8 = (v8f){0} - INFINITY;
    long t = 0;
    for (; t + 8 <= n; t += 8) {
        v8f x;
        memcpy(&x, s + t, sizeof x);
        v8i gt = x > m8;
        m8 = (v8f)(((v8i)x & gt) | ((v8i)m8 & ~gt));
    }
    float m = -INFINITY;
    for (int l = 0; l < 8; ++l) m = m8[l] > m ? m8[l] : m;
    for (; t < n; ++t) m = s[t] > m ? s[t] : m;
    return m;
}

/* Softmax of s[0:n] in place (unnormalised: exp(s - max)); returns the sum, and the maximum in *max (a
row whose every score is -inf, i.e. masked: all zeros and a sum of 0, where exp(-inf - -inf) is NaN). */
static float softmax_unnormalised_max(float *s, long n, float *max) {
    float m = max_of(s, n);
    *max = m;
    if (m == -INFINITY) {
        memset(s, 0, n * sizeof(float));
        return 0;
    }
    float sum8[8] = {0}, sum = 0;
    long t = 0;
    for (; t + 8 <= n; t += 8) {
        v8f x;
        memcpy(&x, s + t, sizeof x);
        x = exp8(x - m);
        memcpy(s + t, &x, sizeof x);
        for (int l = 0; l < 8; ++l) sum8[l] += x[l];
    }
    if (t < n) {
        v8f x = (v8f){0} - 88.0f;
        memcpy(&x, s + t, (n - t) * sizeof(float));
        for (long i = n - t; i < 8; ++i) x[i] = m - 88.0f;
        x = exp8(x - m);
        memcpy(s + t, &x, (n - t) * sizeof(float));
        for (long i = 0; i < n - t; ++i) sum += x[i];
    }
    for (int l = 0; l < 8; ++l) sum += sum8[l];
    return sum;
}

static float softmax_unnormalised(float *s, long n) {
    float m;
    return softmax_unnormalised_max(s, n, &m);
}

/* Dense rows stream K and V row by row; fetching the row ROWS_AHEAD ahead into L2 took a 16k-token layer
from 3.3 to 2.7 ms (1 thread, AVX-512 Xeon, 2026-12-02): the rows of 256 bytes are too short a stream
per step for the hardware prefetcher to keep ahead. */
#define ROWS_AHEAD 16
static inline void prefetch_row(const float *row, long D) {
    for (long i = 0; i < D; i += 16) __builtin_prefetch(row + i, 0, 2);
}

/* Kept pages are fetched this many ahead, K and V alike (V is then in L2 when the weighted sum runs):
one page ahead left the gather latency-bound at ~2 GB/s. Into L2 (T2 hint): one fewer L1 fill buffer
held per line. SmolLM2 16k layer, keep 0.1, 1 thread: 1.55 -> 1.36 ms with this and the page scores
below in 16 lanes (dense 2.5 ms; the gather of 3 heads x 205 pages still runs at ~2.5 GB/s). */
#define PAGES_AHEAD 4

/* A page's rows of one KV head (PAGE * D floats, contiguous) into the cache ahead of use. */
static inline void prefetch_page(const float *rows, long D) {
    for (long i = 0; i < PAGE * D; i += 16) __builtin_prefetch(rows + i, 0, 1);
}

/* out[D] = sum_t p[t] * v[keys[t]] * inv. The value pages are fetched PAGES_AHEAD ahead again: the key
pass prefetched them, but 3 heads x ~205 pages of K and V (16k tokens, keep 0.1) outgrow L2 before this
pass comes back to them; one page ahead here left it latency-bound (16k, 30 layers, keep 0.1: 18.4-19.4
-> 17.2-17.6 ms at 1 thread, 12.8-13.3 -> 12.2-12.5 at 2; ad-hoc A/B, 3 rounds; 8 ahead: no better). */
static void weighted_values(const float *p, const int32_t *keys, long n, const float *v, long D, float inv,
                            float *out) {
    for (long d = 0; d < D; ++d) out[d] = 0;
    for (long t = 0; t < n; ++t) {
        if (t % PAGE == 0 && t + PAGES_AHEAD * PAGE < n) prefetch_page(v + (long)keys[t + PAGES_AHEAD * PAGE] * D, D);
        const float *row = v + keys[t] * D;
        float w = p[t];
        for (long d = 0; d < D; ++d) out[d] += w * row[d];
    }
    for (long d = 0; d < D; ++d) out[d] *= inv;
}

/* The dense form for up to 4 heads at once, in chunks of 32 channels: each value row is read once, and a
chunk's sums (NH x 4 vectors) stay in registers over all the tokens. out[g, D] = sum_t p[g, t] v[t] * inv[g]. */
#define VALUE_HEADS(NH)                                                                                      \
    static void values_##NH(const float *p, long ldp, long n, const float *v, long D, long d0, float *out) { \
        v8f acc[NH][4] = {{{0}}};                                                                            \
        for (long t = 0; t < n; ++t) {                                                                       \
            v8f row[4];                                                                                      \
            memcpy(row, v + t * D + d0, sizeof row);                                                         \
            for (int g = 0; g < NH; ++g) {                                                                   \
                float w = p[g * ldp + t];                                                                    \
                for (int c = 0; c < 4; ++c) acc[g][c] += w * row[c];                                         \
            }                                                                                                \
        }                                                                                                    \
        for (int g = 0; g < NH; ++g) memcpy(out + g * D + d0, acc[g], sizeof acc[g]);                        \
    }
VALUE_HEADS(1)
VALUE_HEADS(2)
VALUE_HEADS(3)
VALUE_HEADS(4)

#ifdef __AVX512F__
/* The same sums over 64 channels at once (NH x 4 vectors of 16): a 64-wide head reads each value row in
one pass instead of two half-row passes (the second pass re-streamed V from memory at long context). Each
channel's chain over t is the one above, so the same bits. */
typedef float v16f __attribute__((vector_size(64)));
#define VALUE_HEADS_WIDE(NH)                                                                                 \
    static void values_wide_##NH(const float *p, long ldp, long n, const float *v, long D, long d0, float *out) { \
        v16f acc[NH][4] = {{{0}}};                                                                           \
        for (long t = 0; t < n; ++t) {                                                                       \
            v16f row[4];                                                                                     \
            prefetch_row(v + (t + ROWS_AHEAD) * D + d0, 64);                                                 \
            memcpy(row, v + t * D + d0, sizeof row);                                                         \
            for (int g = 0; g < NH; ++g) {                                                                   \
                float w = p[g * ldp + t];                                                                    \
                for (int c = 0; c < 4; ++c) acc[g][c] += w * row[c];                                         \
            }                                                                                                \
        }                                                                                                    \
        for (int g = 0; g < NH; ++g) memcpy(out + g * D + d0, acc[g], sizeof acc[g]);                        \
    }
VALUE_HEADS_WIDE(1)
VALUE_HEADS_WIDE(2)
VALUE_HEADS_WIDE(3)
VALUE_HEADS_WIDE(4)
#endif

static void weighted_values_heads(const float *p, long ldp, long G, long n, const float *v, long D, const float *inv,
                                  float *out) {
    long g0 = 0;
    if (D % 32 == 0)
        for (; g0 < G; g0 += 4) {
            long nh = G - g0 < 4 ? G - g0 : 4;
            const float *pg = p + g0 * ldp;
            float *og = out + g0 * D;
#ifdef __AVX512F__
            if (D % 64 == 0) {
                for (long d0 = 0; d0 < D; d0 += 64) {
                    if (nh == 1) values_wide_1(pg, ldp, n, v, D, d0, og);
                    else if (nh == 2) values_wide_2(pg, ldp, n, v, D, d0, og);
                    else if (nh == 3) values_wide_3(pg, ldp, n, v, D, d0, og);
                    else values_wide_4(pg, ldp, n, v, D, d0, og);
                }
                continue;
            }
#endif
            for (long d0 = 0; d0 < D; d0 += 32) {
                if (nh == 1) values_1(pg, ldp, n, v, D, d0, og);
                else if (nh == 2) values_2(pg, ldp, n, v, D, d0, og);
                else if (nh == 3) values_3(pg, ldp, n, v, D, d0, og);
                else values_4(pg, ldp, n, v, D, d0, og);
            }
        }
    for (long g = g0; g < G; ++g) {  /* head dims that are not a multiple of 32 */
        float *og = out + g * D;
        for (long d = 0; d < D; ++d) og[d] = 0;
        for (long t = 0; t < n; ++t)
            for (long d = 0; d < D; ++d) og[d] += p[g * ldp + t] * v[t * D + d];
    }
    for (long g = 0; g < G; ++g)
        for (long d = 0; d < D; ++d) out[g * D + d] *= inv[g];
}

/* s[g, t] = scale * q_g . K[t] for the G heads and keys t < L, each key row read once. */
static void dense_scores(const float *qh, long G, const float *K, long L, long D, float scale, float *s, long S) {
    for (long t = 0; t < L; ++t) {
        prefetch_row(K + (t + ROWS_AHEAD) * D, D);
        for (long g = 0; g < G; ++g) s[g * S + t] = key_dot(qh + g * D, K + t * D, D) * scale;
    }
}

/* A sparse row runs the dense-masked form when its G heads would gather more than 1 / DENSE_MASKED_COST
of the visible pages between them (k kept pages each of n): gathering scattered pages per head costs
more per page than streaming. 1.6, as the torch forms' GATHER_COST. */
#define DENSE_MASKED_COST 1.6f

/* A dense (or dense-masked) row's keys are split into chunks of KEY_CHUNK, each a work item of its own
(scores, softmax against the chunk's maximum, value sums), merged afterwards in chunk order by their
maxima and sums: with tasks of one (row, KV head) each, batch 1 had only Hkv tasks (3 for SmolLM2), so
at 2 threads one thread took two heads and dense attention at 16k ran in 0.73 of its 1-thread time, and
no more than Hkv threads ever worked. The split depends on the row's length only, never on the thread
count or the batch, so a row's bits do not either; a row of at most KEY_CHUNK keys is one item and runs
exactly as before the split. A sparse row's items are its G query heads (each its own kept pages), after
one shared pass over the page statistics. A multiple of PAGE, so a page never straddles two chunks. */
#define KEY_CHUNK 2048

static inline long chunks_of(long L) { return (L + KEY_CHUNK - 1) / KEY_CHUNK; }

/* A gathering row's page scores are work items of SCORE_BLOCK pages each (scores are per page, so the split
changes no bit): per (row, KV head), the statistics pass ran on at most Hkv threads at batch 1. A
dense-masked row's are its key chunks, scored from the keys (scores_and_page_scores). */
#define SCORE_BLOCK 256

/* The task whose items first[task] .. first[task + 1] - 1 hold item (first ascending, T + 1 entries; by
bisection: a batch of 16 rows x 8 KV heads at 16k tokens has ~1000 items over 128 tasks). */
static inline long task_of(const long *first, long T, long item) {
    long lo = 0, hi = T - 1;  /* first[lo] <= item < first[hi + 1] */
    while (lo < hi) {
        long mid = (lo + hi + 1) / 2;
        if (first[mid] <= item) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* A sparse row (k > 0 kept pages of n) gathers each head's pages unless the dense-masked form is cheaper. */
static inline int gathers(long G, long k, long n_pages) { return k > 0 && !(G * k * DENSE_MASKED_COST > n_pages); }

/* One (row, KV head) task's scratch, laid out by task_scratch: every step of a call finds its parts there. */
typedef struct {
    float *scores;      /* [G, S]: a head's scores (dense: key t at t; gathering: its kept keys in order) */
    int32_t *keys;      /* [G, S]: a gathering head's kept keys */
    float *page_score;  /* [G, P] */
    float *selection;   /* [G, P]: a head's copy of its page scores for the k-th selection */
    int32_t *pages;     /* [G, P]: a gathering head's kept pages */
    float *kth;         /* [G]: a dense-masked row's k-th page score per head */
    float *chunks;      /* [chunks, G, D + 2]: a multi-chunk row's partial sums, maxima and sums */
} task_scratch;

static task_scratch scratch_of(float *scratch, long per_task, long task, long G, long S, long P) {
    float *s = scratch + task * per_task;
    task_scratch t = {s, (int32_t *)(s + G * S), s + 2 * G * S, s + 2 * G * S + G * P,
                      (int32_t *)(s + 2 * G * S + 2 * G * P), s + 2 * G * S + 3 * G * P, s + 2 * G * S + 3 * G * P + G};
    return t;
}

/* Floats of scratch per (row, KV head) task (the caller allocates B * Hkv of them): task_scratch's parts. */
long solc_decode_attention_scratch(long G, long S, long P, long D) {
    return 2 * G * S + 3 * G * P + G + chunks_of(S) * G * (D + 2);
}

/* max(q * M, q * m) == max(q, 0) * M + min(q, 0) * m (M >= m): the G heads' page scores in one pass. */
static void split_signs(const float *qh, long n, float *qpos, float *qneg) {
    for (long i = 0; i < n; ++i) {
        qpos[i] = qh[i] > 0 ? qh[i] : 0;
        qneg[i] = qh[i] < 0 ? qh[i] : 0;
    }
}

/* lo, hi = the per-channel min and max of lo, hi and row, NaN kept as solc_write_kv keeps it (x < lo or x
is NaN: x), so they are the page statistics' values bit for bit. */
static inline void fold_min_max(const float *row, long D, float *lo, float *hi) {
    long d = 0;
#ifdef __AVX512F__
    for (; d + 16 <= D; d += 16) {
        __m512 x = _mm512_loadu_ps(row + d), mn = _mm512_loadu_ps(lo + d), mx = _mm512_loadu_ps(hi + d);
        __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        _mm512_storeu_ps(lo + d, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, mn, _CMP_LT_OQ) | nan, mn, x));
        _mm512_storeu_ps(hi + d, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, mx, _CMP_GT_OQ) | nan, mx, x));
    }
#endif
    for (; d < D; ++d) {
        float x = row[d];
        lo[d] = x < lo[d] || x != x ? x : lo[d];
        hi[d] = x > hi[d] || x != x ? x : hi[d];
    }
}

/* A dense-masked row's chunk, first step: the G heads' scores of keys t0 <= t < t1 into s[g * S + t]
(dense_scores' values) and the page scores of the chunk's pages into page_score, from each page's keys
<= p (t1 - 1): per channel their min and max, which are the page statistics the cache holds, bit for bit,
scored as the statistics pass scores them. The statistics are not read: the keys are read anyway, and the
statistics were an eighth more bytes (a quarter of K's) on top of K and V. */
static void scores_and_page_scores(const float *qh, const float *qpos, const float *qneg, long G, const float *K,
                                   long t0, long t1, long D, float scale, float *s, long S, float *page_score, long P) {
    float lo[D], hi[D];
#ifdef __AVX512F__
    if (D == 64) {  /* SmolLM2's and most models' head size: a page's min and max in 8 registers */
        for (long j = t0 / PAGE; j * PAGE < t1; ++j) {
            long a = j * PAGE, e = a + PAGE < t1 ? a + PAGE : t1;
            __m512 mn[4], mx[4];
            __mmask16 nan = 0;
            for (long t = a; t < e; ++t) {
                const float *row = K + t * D;
                prefetch_row(row + ROWS_AHEAD * D, D);
                for (long g = 0; g < G; ++g) s[g * S + t] = key_dot(qh + g * D, row, D) * scale;
                for (int c = 0; c < 4; ++c) {
                    __m512 x = _mm512_loadu_ps(row + 16 * c);
                    nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
                    /* vminps(x, m) is x < m ? x : m, as fold_min_max, but for a NaN x (redone below) */
                    mn[c] = t == a ? x : _mm512_min_ps(x, mn[c]);
                    mx[c] = t == a ? x : _mm512_max_ps(x, mx[c]);
                }
            }
            for (int c = 0; c < 4; ++c) {
                _mm512_storeu_ps(lo + 16 * c, mn[c]);
                _mm512_storeu_ps(hi + 16 * c, mx[c]);
            }
            if (nan) {  /* a NaN key: the statistics keep it (the last NaN of a channel), as fold_min_max */
                memcpy(lo, K + a * D, D * sizeof(float));
                memcpy(hi, K + a * D, D * sizeof(float));
                for (long t = a + 1; t < e; ++t) fold_min_max(K + t * D, D, lo, hi);
            }
            for (long g = 0; g < G; ++g)
                page_score[g * P + j] = key_dot(qpos + g * D, hi, D) + key_dot(qneg + g * D, lo, D);
        }
        return;
    }
#endif
    for (long j = t0 / PAGE; j * PAGE < t1; ++j) {
        long a = j * PAGE, e = a + PAGE < t1 ? a + PAGE : t1;
        for (long t = a; t < e; ++t) {
            const float *row = K + t * D;
            prefetch_row(row + ROWS_AHEAD * D, D);
            for (long g = 0; g < G; ++g) s[g * S + t] = key_dot(qh + g * D, row, D) * scale;
            if (t == a) {
                memcpy(lo, row, D * sizeof(float));
                memcpy(hi, row, D * sizeof(float));
            } else {
                fold_min_max(row, D, lo, hi);
            }
        }
        for (long g = 0; g < G; ++g)
            page_score[g * P + j] = key_dot(qpos + g * D, hi, D) + key_dot(qneg + g * D, lo, D);
    }
}

/* Scores of keys t0 <= t < t1 for the G heads into s[g * S + t] (a dense-masked row's are there already,
from scores_and_page_scores), each head's dropped pages masked to -inf where kth is given (the
dense-masked form), softmax against the chunk's own maximum: returns each head's maximum and sum of
exponentials in m[g], l[g] (a head with every key of the chunk masked: -inf and 0). */
static void chunk_softmax(const float *qh, long G, const float *K, long t0, long t1, long D, float scale, float *s,
                          long S, const float *page_score, long P, const float *kth, float *m, float *l) {
    if (!kth) dense_scores(qh, G, K + t0 * D, t1 - t0, D, scale, s + t0, S);
    for (long g = 0; g < G; ++g) {
        float *sg = s + g * S;
        if (kth) {  /* branch-free, a page (PAGE = 8 scores) at a time: about half the pages go, at random */
            long j = t0 / PAGE;
            for (; (j + 1) * PAGE <= t1; ++j) {
                v8i keep = (v8i){0} - (int32_t)(page_score[g * P + j] >= kth[g]);
                v8f x;
                memcpy(&x, sg + j * PAGE, sizeof x);
                x = (v8f)(((v8i)x & keep) | ((v8i)((v8f){0} - INFINITY) & ~keep));
                memcpy(sg + j * PAGE, &x, sizeof x);
            }
            if (j * PAGE < t1 && !(page_score[g * P + j] >= kth[g]))  /* the row's partial last page */
                for (long t = j * PAGE; t < t1; ++t) sg[t] = -INFINITY;
        }
        l[g] = softmax_unnormalised_max(sg + t0, t1 - t0, m + g);
    }
}

/* The dense (or dense-masked) form of chunk c of a row of L keys. One chunk: the output itself, the
softmax normalised by its sum. Several: the chunk's unnormalised value sums, maxima and sums into part. */
static void dense_chunk(const float *qh, long G, const float *K, const float *V, long L, long c, long D, float scale,
                        float *s, long S, const float *page_score, long P, const float *kth, float *part, float *o) {
    long t0 = c * KEY_CHUNK, t1 = t0 + KEY_CHUNK < L ? t0 + KEY_CHUNK : L;
    float m[G], l[G], inv[G];
    chunk_softmax(qh, G, K, t0, t1, D, scale, s, S, page_score, P, kth, m, l);
    if (chunks_of(L) == 1) {
        for (long g = 0; g < G; ++g) inv[g] = 1.0f / l[g];
        weighted_values_heads(s, S, G, L, V, D, inv, o);
        return;
    }
    float *pc = part + c * G * (D + 2);  /* [G, D] sums, then [G] maxima, then [G] sums */
    for (long g = 0; g < G; ++g) inv[g] = 1.0f;
    weighted_values_heads(s + t0, S, G, t1 - t0, V + t0 * D, D, inv, pc);
    memcpy(pc + G * D, m, sizeof m);
    memcpy(pc + G * D + G, l, sizeof l);
}

/* out[g] = sum_c w_c sums_c[g] / sum_c w_c l_c[g], w_c = exp(m_c[g] - max_c m_c[g]), in chunk order. */
static void merge_chunks(const float *part, long n, long G, long D, float *o) {
    for (long g = 0; g < G; ++g) {
        float mx = -INFINITY;
        for (long c = 0; c < n; ++c) {
            float mc = part[c * G * (D + 2) + G * D + g];
            mx = mc > mx ? mc : mx;
        }
        float den = 0;
        float *og = o + g * D;
        for (long d = 0; d < D; ++d) og[d] = 0;
        for (long c = 0; c < n; ++c) {
            const float *pc = part + c * G * (D + 2);
            float w = expf(pc[G * D + g] - mx);  /* a chunk with every key masked: exp(-inf) = 0 */
            den += w * pc[G * D + G + g];
            for (long d = 0; d < D; ++d) og[d] += w * pc[g * D + d];
        }
        float inv = 1.0f / den;
        for (long d = 0; d < D; ++d) og[d] *= inv;
    }
}

/* One query head's attention over its own kept pages of a sparse row, gathered straight from the cache. */
static void sparse_head(const float *qg, const float *K, const float *V, long L, long n_pages, long k, long D,
                        float scale, const float *ps, float *tmp, int32_t *pages, float *sg, int32_t *keys, float *o) {
    memcpy(tmp, ps, n_pages * sizeof(float));
    float kth = kth_largest_f32(tmp, n_pages, k);
    long m = 0;  /* the kept pages, ascending (the softmax sums in the reference's key order) */
    for (long j = 0; j < n_pages; ++j)
        if (ps[j] >= kth) pages[m++] = (int32_t)j;
    for (long i = 0; i < m && i < PAGES_AHEAD; ++i) {
        prefetch_page(K + (long)pages[i] * PAGE * D, D);
        prefetch_page(V + (long)pages[i] * PAGE * D, D);
    }
    long n = 0;
    for (long i = 0; i < m; ++i) {
        if (i + PAGES_AHEAD < m) {  /* scattered pages: the prefetcher can't */
            prefetch_page(K + (long)pages[i + PAGES_AHEAD] * PAGE * D, D);
            prefetch_page(V + (long)pages[i + PAGES_AHEAD] * PAGE * D, D);
        }
        long j = pages[i], end = (j + 1) * PAGE < L ? (j + 1) * PAGE : L;
        for (long t = j * PAGE; t < end; ++t) {
            keys[n] = (int32_t)t;
            sg[n++] = key_dot(qg, K + t * D, D) * scale;
        }
    }
    float sum = softmax_unnormalised(sg, n);
    weighted_values(sg, keys, n, V, D, 1.0f / sum, o);
}

/* q [B, Hq, D]; caches [B, Hkv, S, D]; page stats [B, Hkv, P, D]; positions, kept_pages [B] (0: dense);
out [B, Hq, D]. scratch: B * Hkv * scratch_per_task floats, scratch_per_task >=
solc_decode_attention_scratch(G, S, P, D). Four steps over one team of threads, each shared out in
items: sparse rows' page scores (a gathering row's blocks of pages, from the statistics; a dense-masked
row's key chunks, with their key scores, from the keys), dense-masked rows' k-th scores (per head), the
attention (key chunks of dense and dense-masked rows, query heads of gathering ones), the merge of
multi-chunk rows (per (row, KV head)). */
void solc_decode_attention(const float *q, const float *k_cache, const float *v_cache, const float *page_min,
                           const float *page_max, const int64_t *positions, const int64_t *kept_pages, long B,
                           long Hq, long Hkv, long S, long P, long D, float scale, float *out, float *scratch,
                           long scratch_per_task, int threads) {
    long G = Hq / Hkv, T = B * Hkv;
    /* task i's items of each step: page-score blocks scored[i] .. scored[i + 1] - 1, k-th scores (a
    dense-masked row's heads) selected[i] .., attention first[i] .. */
    long scored[T + 1], selected[T + 1], first[T + 1];
    scored[0] = selected[0] = first[0] = 0;
    int masked = 0, merge = 0;  /* whether any row needs the k-th scores' step, the merge */
    for (long task = 0; task < T; ++task) {
        long p = positions[task / Hkv], k = kept_pages[task / Hkv], n_pages = p / PAGE + 1;
        int gather = gathers(G, k, n_pages);
        scored[task + 1] = scored[task] + (k > 0 ? gather ? (n_pages + SCORE_BLOCK - 1) / SCORE_BLOCK : chunks_of(p + 1) : 0);
        selected[task + 1] = selected[task] + (k > 0 && !gather ? G : 0);
        first[task + 1] = first[task] + (gather ? G : chunks_of(p + 1));
        masked |= k > 0 && !gather;
        merge |= !gather && chunks_of(p + 1) > 1;
    }
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        /* each step's end is a barrier (a few us at 2 threads, 30 layers a token): a step no row needs is
        skipped by every thread (the conditions are shared) */
        if (scored[T])
#pragma omp for schedule(dynamic, 1)
        for (long item = 0; item < scored[T]; ++item) {
            long task = task_of(scored, T, item), b = task / Hkv, p = positions[b], n_pages = p / PAGE + 1;
            task_scratch ts = scratch_of(scratch, scratch_per_task, task, G, S, P);
            float *page_score = ts.page_score;
            const float *qh = q + (b * Hq + (task % Hkv) * G) * D;
            float qpos[G * D], qneg[G * D];
            split_signs(qh, G * D, qpos, qneg);
            if (!gathers(G, kept_pages[b], n_pages)) {  /* dense-masked: key chunk c, scored from the keys */
                long t0 = (item - scored[task]) * KEY_CHUNK, t1 = t0 + KEY_CHUNK < p + 1 ? t0 + KEY_CHUNK : p + 1;
                scores_and_page_scores(qh, qpos, qneg, G, k_cache + task * S * D, t0, t1, D, scale, ts.scores, S,
                                       page_score, P);
                continue;
            }
            long j0 = (item - scored[task]) * SCORE_BLOCK, j1 = j0 + SCORE_BLOCK < n_pages ? j0 + SCORE_BLOCK : n_pages;
            const float *hi_stats = page_max + task * P * D, *lo_stats = page_min + task * P * D;
            for (long j = j0; j < j1; ++j) {
                prefetch_row(hi_stats + (j + ROWS_AHEAD) * D, D);
                prefetch_row(lo_stats + (j + ROWS_AHEAD) * D, D);
                for (long g = 0; g < G; ++g)
                    page_score[g * P + j] = key_dot(qpos + g * D, hi_stats + j * D, D) + key_dot(qneg + g * D, lo_stats + j * D, D);
            }
        }
        /* Most pages kept: the dense-masked form (every key scored once for the G heads, each head's
        dropped pages masked to -inf, one pass over V) needs each head's k-th page score first. */
        if (masked)
#pragma omp for schedule(dynamic, 1)
        for (long item = 0; item < selected[T]; ++item) {
            long task = task_of(selected, T, item), g = item - selected[task], b = task / Hkv;
            long n_pages = positions[b] / PAGE + 1;
            task_scratch t = scratch_of(scratch, scratch_per_task, task, G, S, P);
            memcpy(t.selection + g * P, t.page_score + g * P, n_pages * sizeof(float));
            t.kth[g] = kth_largest_f32(t.selection + g * P, n_pages, kept_pages[b]);
        }
#pragma omp for schedule(dynamic, 1)
        for (long item = 0; item < first[T]; ++item) {
            long task = task_of(first, T, item);
            long part = item - first[task];
            long b = task / Hkv, h = task % Hkv;
            long p = positions[b], L = p + 1, n_pages = p / PAGE + 1, k = kept_pages[b];
            const float *K = k_cache + task * S * D, *V = v_cache + task * S * D;
            const float *qh = q + (b * Hq + h * G) * D;
            float *o = out + (b * Hq + h * G) * D;
            task_scratch t = scratch_of(scratch, scratch_per_task, task, G, S, P);
            if (gathers(G, k, n_pages)) {
                long g = part;
                sparse_head(qh + g * D, K, V, L, n_pages, k, D, scale, t.page_score + g * P, t.selection + g * P,
                            t.pages + g * P, t.scores + g * S, t.keys + g * S, o + g * D);
            } else {
                dense_chunk(qh, G, K, V, L, part, D, scale, t.scores, S, t.page_score, P, k > 0 ? t.kth : NULL,
                            t.chunks, o);
            }
        }
        if (merge)
#pragma omp for schedule(dynamic, 1)
        for (long task = 0; task < T; ++task) {
            long b = task / Hkv, p = positions[b], n = chunks_of(p + 1);
            if (gathers(G, kept_pages[b], p / PAGE + 1) || n == 1) continue;  /* merged: rows of several chunks */
            merge_chunks(scratch_of(scratch, scratch_per_task, task, G, S, P).chunks, n, G, D,
                         out + (b * Hq + (task % Hkv) * G) * D);
        }
    }
}

/* Each row's new key/value (k, v [B, Hkv, D]) into the cache at its position, and the statistics of the
page holding it recomputed over that page's keys <= the position (reference.write_kv then
refresh_current_page; min/max are exact, so the same bits). */
void solc_write_kv(const float *k, const float *v, float *k_cache, float *v_cache, float *page_min, float *page_max,
                   const int64_t *positions, long B, long Hkv, long S, long P, long D) {
    for (long task = 0; task < B * Hkv; ++task) {
        long p = positions[task / Hkv], start = p - p % PAGE;
        float *K = k_cache + task * S * D;
        memcpy(K + p * D, k + task * D, D * sizeof(float));
        memcpy(v_cache + (task * S + p) * D, v + task * D, D * sizeof(float));
        float *mn = page_min + (task * P + p / PAGE) * D, *mx = page_max + (task * P + p / PAGE) * D;
        for (long d = 0; d < D; ++d) mn[d] = mx[d] = K[start * D + d];
        for (long t = start + 1; t <= p; ++t)
            for (long d = 0; d < D; ++d) {
                float x = K[t * D + d];
                mn[d] = x < mn[d] || x != x ? x : mn[d];  /* NaN propagates, as in amin/amax */
                mx[d] = x > mx[d] || x != x ? x : mx[d];
            }
    }
}
