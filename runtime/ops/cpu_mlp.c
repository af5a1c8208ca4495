/* solc::mlp's int8 weight-only linear for decode rows (runtime/ops/cpu_mlp.py), each row on its own.

Like cpu_linear.c, every output element is summed in one fixed order whatever the row count, the row's
place in the batch or the thread split, so a row's result is a function of that row alone: 16 fmaf lane
sums over k, a scalar tail, a fixed tree (cpu_linear.c's order), then times the output channel's scale,
rounded to bfloat16 (what torch's int8 kernel returns). The weights are exact in fp32; the activations
come in already rounded to bfloat16. Streaming int8 rows, this runs at ~0.6-0.7 of torch's
_weight_int8pack_mm time at batch 1 on the dev machine (the conversions are hidden behind the loads).
Every software prefetch here goes to L2, not L1: on an AMD EPYC (Zen 4, 2026-12-03) the int8 GEMV of a
3072 x 576 copy streamed from memory took 180-200 us with prefetcht0 and 90-97 us with prefetcht1, and
the fp32 row skip at keep 0.4 315 -> 205 us (prefetcht1, two kept rows ahead; now four, PREFETCH_ROWS); the prefetched lines
evicted the lines being summed from L1. (Ad-hoc C microbenchmark, weights streamed over 60 copies.)
Built with -ffp-contract=off (cpu_linear.py builds both sources into one library). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "cpu_bf16.h"
#include "cpu_fixed_order.h"
#include "cpu_select.h"


#ifdef SOLC_AVX2
/* int8_block's loop for AVX2 (16 registers): 4 weight rows at a time, each row's 16 lanes in two
registers, 16 int8 weights widened per row and step. */
static long int8_rows_avx2(const float *x, const int8_t *q, const float *scale, long K, long K16, long n, long n1,
                           float *y) {
    for (; n + 4 <= n1; n += 4) {
        __m256 lo[4], hi[4];
        for (int c = 0; c < 4; ++c) lo[c] = hi[c] = _mm256_setzero_ps();
        for (long k = 0; k < K16; k += LANES) {
            __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
            for (int c = 0; c < 4; ++c) {
                __m128i b = _mm_loadu_si128((const __m128i *)(q + (n + c) * K + k));
                lo[c] = _mm256_fmadd_ps(x0, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), lo[c]);
                hi[c] = _mm256_fmadd_ps(x1, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))), hi[c]);
            }
        }
        for (int c = 0; c < 4; ++c) {
            float acc[LANES], tail = 0;
            _mm256_storeu_ps(acc, lo[c]);
            _mm256_storeu_ps(acc + 8, hi[c]);
            for (long k = K16; k < K; ++k) tail = __builtin_fmaf(x[k], (float)q[(n + c) * K + k], tail);
            y[n + c] = bf16_round(finish(acc, tail) * scale[n + c]);
        }
    }
    return n;
}
#endif

/* y[n0:n1] = bf16(scale[n] * sum_k x[k] * q[n, k]) for one row x. */
static void int8_block(const float *x, const int8_t *q, const float *scale, long K, long K16, long n0, long n1,
                       float *y) {
    long n = n0;
#ifdef SOLC_AVX2
    n = int8_rows_avx2(x, q, scale, K, K16, n, n1, y);
#endif
    for (; n + 16 <= n1; n += 16) {
        float acc[16][LANES] = {{0}};
#ifdef __AVX512F__
        /* The loop below, written out: GCC spills its 16 accumulators around the int8 conversions. Each
        lane is the same fmaf sequence, so both forms give the same bits. */
        __m512 a[16];
        for (int c = 0; c < 16; ++c) a[c] = _mm512_setzero_ps();
        long k = 0;
        for (; k + 4 * LANES <= K16; k += 4 * LANES) {  /* a cache line of each weight row per pass */
            __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
            __m512 x2 = _mm512_loadu_ps(x + k + 32), x3 = _mm512_loadu_ps(x + k + 48);
            for (int c = 0; c < 16; ++c) {
                const int8_t *w = q + (n + c) * K + k;
                _mm_prefetch((const char *)(w + 48 * K), _MM_HINT_T1);  /* rows 3 groups ahead, into L2 */
                a[c] = _mm512_fmadd_ps(x0, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w))), a[c]);
                a[c] = _mm512_fmadd_ps(x1, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 16)))), a[c]);
                a[c] = _mm512_fmadd_ps(x2, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 32)))), a[c]);
                a[c] = _mm512_fmadd_ps(x3, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 48)))), a[c]);
            }
        }
        for (; k < K16; k += LANES) {
            __m512 xv = _mm512_loadu_ps(x + k);
            for (int c = 0; c < 16; ++c) {
                __m128i b = _mm_loadu_si128((const __m128i *)(q + (n + c) * K + k));
                a[c] = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), a[c]);
            }
        }
        for (int c = 0; c < 16; ++c) _mm512_storeu_ps(acc[c], a[c]);
#else
        for (long k = 0; k < K16; k += LANES)
            for (int c = 0; c < 16; ++c)
                for (int l = 0; l < LANES; ++l)
                    acc[c][l] = __builtin_fmaf(x[k + l], (float)q[(n + c) * K + k + l], acc[c][l]);
#endif
        for (int c = 0; c < 16; ++c) {
            float tail = 0;
            for (long k = K16; k < K; ++k) tail = __builtin_fmaf(x[k], (float)q[(n + c) * K + k], tail);
            y[n + c] = bf16_round(finish(acc[c], tail) * scale[n + c]);
        }
    }
    for (; n < n1; ++n) {
        float acc[LANES] = {0}, tail = 0;
        for (long k = 0; k < K16; k += LANES)
            for (int l = 0; l < LANES; ++l) acc[l] = __builtin_fmaf(x[k + l], (float)q[n * K + k + l], acc[l]);
        for (long k = K16; k < K; ++k) tail = __builtin_fmaf(x[k], (float)q[n * K + k], tail);
        y[n] = bf16_round(finish(acc, tail) * scale[n]);
    }
}

/* y [M, N] = bf16((x [M, K] @ q[N, K]^T) * scale[N]). Blocks of 32 output channels are split over the
threads; within a block every row reuses the block's weights from cache. */
void solc_int8_linear(const float *x, long ldx, const int8_t *q, const float *scale, float *y, long M, long N,
                      long K, int threads) {
    long K16 = K - K % LANES;
    long blocks = (N + COL_BLOCK - 1) / COL_BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (long blk = 0; blk < blocks; ++blk) {
        long n0 = blk * COL_BLOCK, n1 = n0 + COL_BLOCK < N ? n0 + COL_BLOCK : N;
        for (long r = 0; r < M; ++r) int8_block(x + r * ldx, q, scale, K, K16, n0, n1, y + r * N);
    }
}

/* The int4 weight-only linear (AVX-512 with BF16 only; elsewhere torch's _weight_int4pack_mm_for_cpu):
y [M, N] = bf16(x_bf16 [M, K] @ dequant(q)^T) for q in `quant_primitives`' nibble format (uint8 [N, K / 2],
low nibble = even k) with scales and zeros bf16 [K / g, N, 2], w = (q - 8) * scale + zero per group of g
input channels. Per group the sum is taken as scale * sum(x * (q - 8)) + zero * sum(x): x is on the bf16
grid and q - 8 is a small integer, so each product x * (q - 8) is exact and VDPBF16PS sums 32 of them
per instruction (the weights' bf16 values come from a 16-entry table by nibble), with no per-weight
dequantization. This is the reference's sum with other fp32 roundings (within 1 bf16 ulp of the row
maximum after the final rounding, tests/runtime/ops/test_cpu_mlp_kernels.py); the order is fixed
whatever the row count or thread split (lane l of a 64-channel chunk sums k = 4l .. 4l + 3; groups in
order; the fixed tree), so a row's result does not depend on its batch. VDPBF16PS treats denormal inputs
as zero and flushes denormal results. SmolLM2 gate/up copy (3072 x 576, g = 64), weights streamed, 1
thread, AMD EPYC Zen 4: 100-117 us vs 122-130 us for torch's kernel (raw ctypes calls, 2026-12-03; 95-119 us
in later runs, about what the int8 GEMV of the same copy takes: this kernel is bound by its arithmetic, not
by its bytes).
Requires g a multiple of 64. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define SOLC_INT4 1
#define INT4_ROWS 4
#define INT4_AHEAD 16  /* prefetch distance in output rows (into L2) */

/* y[n:n + ROWS] of one row (ROWS a compile-time constant, so the sums stay in registers): xl / xh its
bf16 values at the even / odd channels of every 64-channel chunk (32 each), X its per-lane sums per group
[K / g][16]. */
static inline __attribute__((always_inline)) void int4_rows(const uint16_t *xl, const uint16_t *xh, const float *X,
                                                            const uint8_t *q, const uint16_t *sz, long g, long N,
                                                            long K, long n, const int ROWS, __m512i table, float *y) {
    long KB = K / 2, groups = K / g;
    __m512 acc[INT4_ROWS];
    for (int c = 0; c < ROWS; ++c) acc[c] = _mm512_setzero_ps();
    if (n + INT4_AHEAD + ROWS <= N) {
        const char *ahead = (const char *)(q + (n + INT4_AHEAD) * KB);
        for (long b = 0; b < ROWS * KB; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T1);
    }
    for (long G = 0; G < groups; ++G) {
        __m512 T[INT4_ROWS];
        for (int c = 0; c < ROWS; ++c) T[c] = _mm512_setzero_ps();
        for (long k = G * g; k < (G + 1) * g; k += 64) {
            __m512i vl = _mm512_loadu_si512(xl + k / 2), vh = _mm512_loadu_si512(xh + k / 2);
            for (int c = 0; c < ROWS; ++c) {
                __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(q + (n + c) * KB + k / 2)));
                __m512i wl = _mm512_permutexvar_epi16(w, table), wh = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table);
                T[c] = _mm512_dpbf16_ps(T[c], (__m512bh)vl, (__m512bh)wl);
                T[c] = _mm512_dpbf16_ps(T[c], (__m512bh)vh, (__m512bh)wh);
            }
        }
        __m512 XG = _mm512_loadu_ps(X + G * 16);
        for (int c = 0; c < ROWS; ++c) {
            const uint16_t *p = sz + (G * N + n + c) * 2;
            acc[c] = _mm512_fmadd_ps(_mm512_set1_ps(bf16_to_float(p[0])), T[c], acc[c]);
            acc[c] = _mm512_fmadd_ps(_mm512_set1_ps(bf16_to_float(p[1])), XG, acc[c]);
        }
    }
    for (int c = 0; c < ROWS; ++c) {
        float lanes[LANES];
        _mm512_storeu_ps(lanes, acc[c]);
        y[n + c] = bf16_round(finish(lanes, 0));
    }
}

static void int4_block(const uint16_t *xl, const uint16_t *xh, const float *X, const uint8_t *q, const uint16_t *sz,
                       long g, long N, long K, long n0, long n1, float *y) {
    uint16_t t[32];
    for (int j = 0; j < 32; ++j) t[j] = bf16_bits((float)(j % 16 - 8));  /* permutexvar_epi16 reads 5 index bits */
    const __m512i table = _mm512_loadu_si512(t);
    long n = n0;
    for (; n + INT4_ROWS <= n1; n += INT4_ROWS) int4_rows(xl, xh, X, q, sz, g, N, K, n, INT4_ROWS, table, y);
    for (; n < n1; ++n) int4_rows(xl, xh, X, q, sz, g, N, K, n, 1, table, y);
}
#endif

int solc_int4_supported(void) {
#ifdef SOLC_INT4
    return 1;
#else
    return 0;
#endif
}

/* Returns 0, or -1 where this build has no int4 kernel or the scratch could not be allocated (the caller
then runs torch's kernel). x fp32 [M, K] (rounded to bf16 here). */
int solc_int4_linear(const float *x, long ldx, const uint8_t *q, const uint16_t *sz, long g, float *y, long M,
                     long N, long K, int threads) {
#ifdef SOLC_INT4
    if (g % 64 || K % g) return -1;
    long groups = K / g;
    uint16_t *xs = malloc((size_t)(M * K) * sizeof(uint16_t));
    float *X = malloc((size_t)(M * groups * 16) * sizeof(float));
    if (!xs || !X) {
        free(xs);
        free(X);
        return -1;
    }
    for (long r = 0; r < M; ++r) {
        uint16_t *xl = xs + r * K, *xh = xl + K / 2;
        float *Xr = X + r * groups * 16;
        for (long i = 0; i < groups * 16; ++i) Xr[i] = 0;
        for (long k = 0; k < K; k += 64)
            for (int j = 0; j < 32; ++j) {
                xl[k / 2 + j] = bf16_bits(bf16_round(x[r * ldx + k + 2 * j]));
                xh[k / 2 + j] = bf16_bits(bf16_round(x[r * ldx + k + 2 * j + 1]));
            }
        for (long k = 0; k < K; k += 4) {  /* lane (k mod 64) / 4 of group k / g: its four channels in order */
            float s = 0;
            for (int t = 0; t < 4; ++t) s += bf16_round(x[r * ldx + k + t]);
            Xr[(k / g) * 16 + (k % 64) / 4] += s;
        }
    }
    long blocks = (N + COL_BLOCK - 1) / COL_BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (long blk = 0; blk < blocks; ++blk) {
        long n0 = blk * COL_BLOCK, n1 = n0 + COL_BLOCK < N ? n0 + COL_BLOCK : N;
        for (long r = 0; r < M; ++r)
            int4_block(xs + r * K, xs + r * K + K / 2, X + r * groups * 16, q, sz, g, N, K, n0, n1, y + r * N);
    }
    free(xs);
    free(X);
    return 0;
#else
    (void)x; (void)ldx; (void)q; (void)sz; (void)g; (void)y; (void)M; (void)N; (void)K; (void)threads;
    return -1;
#endif
}

/* Row-skipping GEMVs for pruned MLP inputs: y[r, :N] = sum over row r's kept channels k (idx[off[r] ..
off[r + 1]), ascending) of x[r, k] * W^T[k, :N], read from the rows of W^T (wt [K, N]) that the row keeps.

Each output is summed in the fixed order of the dense kernels (cpu_fixed_order.h): channel k goes to lane
k mod 16 (channels past the last multiple of 16 to the scalar tail), each lane an fmaf chain in ascending
k, then the fixed tree. A dropped channel is a zero in the dense kernel's sum, and fmaf(0, w, acc) == acc,
so this equals the dense kernel on the pruned input bit for bit (cpu_linear.c for fp32, int8_block for
int8): a caller may pick either per call (row skip for few rows, one shared dense pass for many) and a
row's result does not change. The lanes of a chunk of outputs stay in cache while the chunk walks the
kept rows; the next kept row's chunk is prefetched (the jumps between kept
rows defeat the hardware prefetcher). The work is (row, chunk) pairs, split over the threads. */
/* Outputs per chunk: the fp32 lanes of 512 outputs are 32 KB (L1); int8 rows are a quarter of the bytes
per output, so 768 outputs make each visit of a kept row 768 bytes (256-byte visits ran latency-bound)
and split SmolLM2's 3072 gate/up outputs into 4 chunks for the threads. SmolLM2 layer, keep 0.4, weights
streamed, AVX-512 Xeon, 2026-12-02 (/tmp scripts, not committed): fp32 332-341 us (1 thread) and 186-190
(2) vs 339 / 185 for the previous mul-add chain kernel; int8 180 / 112 vs 202 / 110; chunks of 256: fp32
422, int8 320. */
#ifndef CHUNK_F32
#define CHUNK_F32 512
#endif
#ifndef CHUNK_INT8
#define CHUNK_INT8 768
#endif
/* Kept rows prefetched ahead: 4 (was 2) made the fp32 row skip at keep 0.4 (SmolLM2 gate/up, weights
streamed, 1 thread) 167-175 us instead of 192-197, 0.90-0.93 of the time in four side-by-side runs; the
int8 one ran 92-96 us at 2, 4 and 6 (Zen 4, 2026-12-03, /tmp scripts, not committed). */
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 4
#endif

static inline void prefetch_span(const void *p, long bytes) {
    for (long b = 0; b < bytes; b += 64) __builtin_prefetch((const char *)p + b, 0, 2);  /* into L2 */
}

static inline float lanes_total(const float *acc, long ld, const float *tail, long n) {
#define A(l) acc[(l) * ld + n]
    return ((((A(0) + A(8)) + (A(4) + A(12))) + ((A(2) + A(10)) + (A(6) + A(14))))
            + (((A(1) + A(9)) + (A(5) + A(13))) + ((A(3) + A(11)) + (A(7) + A(15)))))
           + tail[n];
#undef A
}

void solc_rowskip_f32(const float *x, long ldx, const int64_t *idx, const int64_t *off, const float *wt, float *y,
                      long M, long N, long K, int threads) {
    long K16 = K - K % LANES, chunks = (N + CHUNK_F32 - 1) / CHUNK_F32;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && M * chunks > 1)
    for (long job = 0; job < M * chunks; ++job) {
        long r = job / chunks, n0 = job % chunks * CHUNK_F32, cn = N - n0 < CHUNK_F32 ? N - n0 : CHUNK_F32;
        float acc[LANES][CHUNK_F32], tail[CHUNK_F32];
        memset(acc, 0, sizeof acc);
        memset(tail, 0, sizeof tail);
        for (long i = off[r]; i < off[r + 1]; ++i) {
            if (i + PREFETCH_ROWS < off[r + 1]) prefetch_span(wt + idx[i + PREFETCH_ROWS] * N + n0, cn * 4);
            long k = idx[i];
            const float *w = wt + k * N + n0;
            float a = x[r * ldx + k], *lane = k < K16 ? acc[k % LANES] : tail;
            for (long n = 0; n < cn; ++n) lane[n] = __builtin_fmaf(a, w[n], lane[n]);
        }
        for (long n = 0; n < cn; ++n) y[r * N + n0 + n] = lanes_total(&acc[0][0], CHUNK_F32, tail, n);
    }
}

/* The int8 form over `quant_primitives.int8_rows` (uint8 [K, N + 8]: the int8 value + 128, then a row
scale of 1 and bias of -128 that this kernel does not need): x (already on the bf16 grid) times the
int8 values, summed as above, then times the output channel's scale and rounded to bf16: int8_block's
result on the pruned input. */
void solc_rowskip_int8(const float *x, long ldx, const int64_t *idx, const int64_t *off, const uint8_t *rows,
                       const float *scale, float *y, long M, long N, long K, int threads) {
    long K16 = K - K % LANES, chunks = (N + CHUNK_INT8 - 1) / CHUNK_INT8;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && M * chunks > 1)
    for (long job = 0; job < M * chunks; ++job) {
        long r = job / chunks, n0 = job % chunks * CHUNK_INT8, cn = N - n0 < CHUNK_INT8 ? N - n0 : CHUNK_INT8;
        float acc[LANES][CHUNK_INT8], tail[CHUNK_INT8];
        memset(acc, 0, sizeof acc);
        memset(tail, 0, sizeof tail);
        for (long i = off[r]; i < off[r + 1]; ++i) {
            if (i + PREFETCH_ROWS < off[r + 1]) prefetch_span(rows + idx[i + PREFETCH_ROWS] * (N + 8) + n0, cn);
            long k = idx[i];
            const uint8_t *w = rows + k * (N + 8) + n0;
            float a = x[r * ldx + k], *lane = k < K16 ? acc[k % LANES] : tail;
            for (long n = 0; n < cn; ++n) lane[n] = __builtin_fmaf(a, (float)((int)w[n] - 128), lane[n]);
        }
        for (long n = 0; n < cn; ++n) y[r * N + n0 + n] = bf16_round(lanes_total(&acc[0][0], CHUNK_INT8, tail, n) * scale[n0 + n]);
    }
}

/* |x| as an ordered key: the bits of a non-negative float are monotonic in its value. */
static uint32_t abs_key(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return u & 0x7fffffffu;
}

/* The kept channels of each row of x [M, d] (row r keeps k[r]): the k largest |x|, ties to the lower index
(the reference's stable descending sort), written in ascending order to idx[off[r] .. off[r + 1]) with
off[0] = 0. |x| is compared through its bits (monotonic for non-negative floats; NaN above inf, as
torch sorts it). Only comparisons: the same set as the reference on any input. scratch: d uint32. */
void solc_select_channels(const float *x, long ldx, long M, long d, const int64_t *k, int64_t *idx, int64_t *off,
                          uint32_t *scratch) {
    off[0] = 0;
    for (long r = 0; r < M; ++r) {
        const float *xr = x + r * ldx;
        long kr = k[r] < d ? k[r] : d;
        for (long i = 0; i < d; ++i) scratch[i] = abs_key(xr[i]);
        uint32_t thr = kth_largest_u32(scratch, d, kr);
        long above = 0;
        for (long i = 0; i < d; ++i) above += abs_key(xr[i]) > thr;
        long ties = kr - above, n = off[r];
        for (long i = 0; i < d; ++i) {
            uint32_t key = abs_key(xr[i]);
            if (key > thr || (key == thr && ties-- > 0)) idx[n++] = i;
        }
        off[r + 1] = n;
    }
}
