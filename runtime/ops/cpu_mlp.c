/* solc::mlp's CPU kernels for decode rows (runtime/ops/cpu_mlp.py), each row on its own: the int8 and int4
weight-only linears, the fp32 and int8 row skips and the channel selection.

The int8 linear: like cpu_linear.c, every output element is summed in one fixed order whatever the row count, the row's
place in the batch or the thread split, so a row's result is a function of that row alone: 16 fmaf lane
sums over k, a scalar tail, a fixed tree (cpu_linear.c's order), then times the output channel's scale,
rounded to bfloat16 (what torch's int8 kernel returns). The weights are exact in fp32; the activations
come in already rounded to bfloat16. Streaming int8 rows, this runs at ~0.6-0.7 of torch's
_weight_int8pack_mm time at batch 1 on the dev machine (the conversions are hidden behind the loads).
Every software prefetch here goes to L2, not L1: on an AMD EPYC (Zen 4, 2026-12-03) the int8 GEMV of a
3072 x 576 copy streamed from memory took 180-200 us with prefetcht0 and 90-97 us with prefetcht1, and
the fp32 row skip at keep 0.4 315 -> 205 us (prefetcht1); the prefetched lines evicted the lines being
summed from L1. (Ad-hoc C microbenchmark, weights streamed over 60 copies.)
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
                /* the row one group ahead, into L2 (3 groups ahead before 2026-12-07: SmolLM2's down copy
                576 x 1536 streamed 21-24 -> 20-21 us at 1 thread, 17-18 -> 14 at 2; gate/up 54-75 -> 56-67) */
                _mm_prefetch((const char *)(w + 16 * K), _MM_HINT_T1);
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

const void *solc_packed_of(const void *w, long N, long K);  /* cpu_linear.c: the packed copies */

#ifdef __AVX512F__
/* int8_block over a packed copy p (cpu_linear.c's solc_pack_i8: per group of 16 rows, per k step of 16,
the 16 rows' 16 bytes): a pass reads 1 KB in order instead of a line from each of 16 rows, prefetched 4 KB
ahead. Each lane's fmaf sequence is int8_block's, so the same bits. Full groups only; returns where the
rest starts. SmolLM2's down copy (576 x 1536) in a step (1 thread, 2026-12-07): docs/runtime.md. */
static long int8_block_packed(const float *x, const int8_t *p, const int8_t *q, const float *scale, long K, long K16,
                              long n0, long n1, float *y) {
    long n = n0;
    for (; n + 16 <= n1; n += 16) {
        __m512 a[16];
        for (int c = 0; c < 16; ++c) a[c] = _mm512_setzero_ps();
        const int8_t *blk = p + n * K16;
        for (long k = 0; k < K16; k += LANES) {
            __m512 xv = _mm512_loadu_ps(x + k);
            const int8_t *step = blk + k * 16;
            if (k % (4 * LANES) == 0)
                for (int c = 0; c < 16; ++c) _mm_prefetch((const char *)(step + c * 64 + 4096), _MM_HINT_T1);
            for (int c = 0; c < 16; ++c)
                a[c] = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(step + c * LANES)))), a[c]);
        }
        for (int c = 0; c < 16; ++c) {
            float acc[LANES], tail = 0;
            _mm512_storeu_ps(acc, a[c]);
            for (long k = K16; k < K; ++k) tail = __builtin_fmaf(x[k], (float)q[(n + c) * K + k], tail);
            y[n + c] = bf16_round(finish(acc, tail) * scale[n + c]);
        }
    }
    return n;
}
#endif

/* y [M, N] = bf16((x [M, K] @ q[N, K]^T) * scale[N]). Blocks of 32 output channels are split over the
threads; within a block every row reuses the block's weights from cache. */
void solc_int8_linear(const float *x, long ldx, const int8_t *q, const float *scale, float *y, long M, long N,
                      long K, int threads) {
    long K16 = K - K % LANES;
    long blocks = (N + COL_BLOCK - 1) / COL_BLOCK;
    const int8_t *packed = K16 ? solc_packed_of(q, N, K) : 0;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (long blk = 0; blk < blocks; ++blk) {
        long n0 = blk * COL_BLOCK, n1 = n0 + COL_BLOCK < N ? n0 + COL_BLOCK : N;
        for (long r = 0; r < M; ++r) {
            long n = n0;
#ifdef __AVX512F__
            if (packed) n = int8_block_packed(x + r * ldx, packed, q, scale, K, K16, n0, n1, y + r * N);
#endif
            int8_block(x + r * ldx, q, scale, K, K16, n, n1, y + r * N);
        }
    }
}

/* The int4 weight-only linear (AVX-512 with BF16 only; elsewhere torch's _weight_int4pack_mm_for_cpu):
y [M, N] = bf16(x_bf16 [M, K] @ dequant(q)^T) for q in `quant_primitives`' nibble format (uint8 [N, K / 2],
low nibble = even k) with scales and zeros bf16 [K / g, N, 2], w = (q - 8) * scale + zero per group of g
input channels. Per group the sum is taken as scale * sum(x * (q - 8)) + zero * sum(x): x is on the bf16
grid and q - 8 is a small integer, so each product x * (q - 8) is exact and VDPBF16PS sums 32 of them
per instruction (the weights' bf16 values come from a 16-entry table by nibble), with no per-weight
dequantization. This is the reference's sum with other fp32 roundings (within 1 bf16 ulp of the row
maximum after the final rounding, tests/runtime/ops/test_cpu_mlp_kernels.py).

Layout of the work: a weight row is read 64 bytes (128 channels) at a time. Word i of those 64 bytes holds
the nibbles of channels 4i .. 4i + 3 (nibble j = channel 4i + j), so four shifts and table look-ups give
four vectors of 32 bf16 weights straight from one load, with no widening shuffle; x is laid out once per
call to match (plane j, word i = x at channel 4i + j of the chunk). Lane l of a chunk then sums channels
8l .. 8l + 7: lanes 0-7 the chunk's first 64 channels, lanes 8-15 the next 64, each half inside one group
(g is a multiple of 64), so the scale and zero vectors are two broadcast (scale, zero) pairs, blended.
A chunk past K is zero-masked (weights) and zero-padded (x). The order is fixed whatever the row count or
thread split (per lane: the four look-ups in order, then scale and zero terms chunk by chunk; the fixed
tree over the lanes), so a row's result does not depend on its batch. VDPBF16PS treats denormal inputs as
zero and flushes denormal results.
SmolLM2 gate/up copy (3072 x 576, g = 64), 1 thread, AMD EPYC Zen 4 (2026-12-04, /tmp/int4b.py, raw ctypes
calls, weights streamed over 60 copies): 86-88 us with the previous layout (32-byte loads widened to
16-bit indices, scale and zero broadcast per group from scalars; 79 us with the weights in cache: bound
by its arithmetic); see the figures of this layout in docs/runtime.md.
Requires g a multiple of 64. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define SOLC_INT4 1
#define INT4_ROWS 4
#define INT4_AHEAD 16  /* prefetch distance in output rows (into L2) */
#define INT4_CHUNK 128  /* channels per 64-byte load */

static inline int32_t load_pair(const uint16_t *p) {  /* (scale, zero) bf16 bits: scale in the low half */
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* y[n:n + ROWS] of one row (ROWS a compile-time constant, so the sums stay in registers): xp its bf16
values in the chunk layout [chunks][4][32], X its per-lane sums [chunks][16]. */
static inline __attribute__((always_inline)) void int4_rows(const uint16_t *xp, const float *X, const uint8_t *q,
                                                            const uint16_t *sz, const long *goff, long N, long K,
                                                            long n, const int ROWS, __m512i table, float *y) {
    long KB = K / 2, chunks = (K + INT4_CHUNK - 1) / INT4_CHUNK;
    const __m512i hi_half = _mm512_set1_epi32((int32_t)0xffff0000u);
    __m512 acc[INT4_ROWS], accz[INT4_ROWS];  /* the scale terms and the zero terms */
    for (int c = 0; c < ROWS; ++c) acc[c] = accz[c] = _mm512_setzero_ps();
    if (n + INT4_AHEAD + ROWS <= N) {
        const char *ahead = (const char *)(q + (n + INT4_AHEAD) * KB);
        for (long b = 0; b < ROWS * KB; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T1);
    }
    for (long ch = 0; ch < chunks; ++ch) {
        long c0 = ch * INT4_CHUNK, left = K - c0;
        __mmask64 m = left >= INT4_CHUNK ? ~(__mmask64)0 : (((__mmask64)1 << (left / 2)) - 1);
        const uint16_t *xc = xp + ch * INT4_CHUNK;
        __m512i x0 = _mm512_loadu_si512(xc), x1 = _mm512_loadu_si512(xc + 32);
        __m512i x2 = _mm512_loadu_si512(xc + 64), x3 = _mm512_loadu_si512(xc + 96);
        __m512 XC = _mm512_loadu_ps(X + ch * 16);
        const uint16_t *s0 = sz + (goff[2 * ch] + n) * 2, *s1 = sz + (goff[2 * ch + 1] + n) * 2;
        for (int c = 0; c < ROWS; ++c) {
            __m512i w = _mm512_maskz_loadu_epi8(m, q + (n + c) * KB + c0 / 2);
            /* two chains of two (the latency of VDPBF16PS, not its throughput, bounds this loop) */
            __m512 Ta = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)x0, (__m512bh)_mm512_permutexvar_epi16(w, table));
            __m512 Tb = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)x2, (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 8), table));
            Ta = _mm512_dpbf16_ps(Ta, (__m512bh)x1, (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table));
            Tb = _mm512_dpbf16_ps(Tb, (__m512bh)x3, (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 12), table));
            __m512 T = _mm512_add_ps(Ta, Tb);
            __m512i p = _mm512_mask_set1_epi32(_mm512_set1_epi32(load_pair(s0 + 2 * c)), (__mmask16)0xff00,
                                               load_pair(s1 + 2 * c));
            acc[c] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(p, 16)), T, acc[c]);
            accz[c] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(p, hi_half)), XC, accz[c]);
        }
    }
    for (int c = 0; c < ROWS; ++c) {
        float lanes[LANES];
        _mm512_storeu_ps(lanes, _mm512_add_ps(acc[c], accz[c]));
        y[n + c] = bf16_round(finish(lanes, 0));
    }
}

static void int4_block(const uint16_t *xp, const float *X, const uint8_t *q, const uint16_t *sz, const long *goff,
                       long N, long K, long n0, long n1, float *y) {
    uint16_t t[32];
    for (int j = 0; j < 32; ++j) t[j] = bf16_bits((float)(j % 16 - 8));  /* permutexvar_epi16 reads 5 index bits */
    const __m512i table = _mm512_loadu_si512(t);
    long n = n0;
    for (; n + INT4_ROWS <= n1; n += INT4_ROWS) int4_rows(xp, X, q, sz, goff, N, K, n, INT4_ROWS, table, y);
    for (; n < n1; ++n) int4_rows(xp, X, q, sz, goff, N, K, n, 1, table, y);
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
    long chunks = (K + INT4_CHUNK - 1) / INT4_CHUNK, KP = chunks * INT4_CHUNK;
    uint16_t *xs = malloc((size_t)(M * KP) * sizeof(uint16_t));
    float *X = malloc((size_t)(M * chunks * 16) * sizeof(float));
    long *goff = malloc((size_t)(2 * chunks) * sizeof(long));
    if (!xs || !X || !goff) {
        free(xs);
        free(X);
        free(goff);
        return -1;
    }
    for (long ch = 0; ch < chunks; ++ch) {  /* the group of each 64-channel half of a chunk, times N */
        long c0 = ch * INT4_CHUNK;
        goff[2 * ch] = c0 / g * N;
        goff[2 * ch + 1] = (c0 + 64 < K ? (c0 + 64) / g : c0 / g) * N;
    }
    for (long r = 0; r < M; ++r) {
        uint16_t *xr = xs + r * KP;
        float *Xr = X + r * chunks * 16;
        for (long ch = 0; ch < chunks; ++ch) {
            long c0 = ch * INT4_CHUNK;
            for (int j = 0; j < 4; ++j)
                for (int i = 0; i < 32; ++i) {
                    long k = c0 + 4 * i + j;
                    xr[c0 + 32 * j + i] = k < K ? bf16_bits(bf16_round(x[r * ldx + k])) : 0;
                }
            for (int l = 0; l < 16; ++l) {  /* lane l: channels 8l .. 8l + 7 of the chunk, in order */
                float s = 0;
                for (int t = 0; t < 8; ++t) {
                    long k = c0 + 8 * l + t;
                    if (k < K) s += bf16_round(x[r * ldx + k]);
                }
                Xr[ch * 16 + l] = s;
            }
        }
    }
    long blocks = (N + COL_BLOCK - 1) / COL_BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (long blk = 0; blk < blocks; ++blk) {
        long n0 = blk * COL_BLOCK, n1 = n0 + COL_BLOCK < N ? n0 + COL_BLOCK : N;
        for (long r = 0; r < M; ++r)
            int4_block(xs + r * KP, X + r * chunks * 16, q, sz, goff, N, K, n0, n1, y + r * N);
    }
    free(xs);
    free(X);
    free(goff);
    return 0;
#else
    (void)x; (void)ldx; (void)q; (void)sz; (void)g; (void)y; (void)M; (void)N; (void)K; (void)threads;
    return -1;
#endif
}

/* Row-skipping GEMVs for pruned MLP inputs: y[r, :N] = sum over row r's kept channels k (idx[off[r] ..
off[r + 1]), ascending) of x[r, k] * W^T[k, :N], read from the rows of W^T (wt [K, N]) that the row keeps.
A dropped channel is a zero term in the dense pass's sum, and fmaf(0, w, acc) == acc, so a row skip equals
its dense pass on the pruned input bit for bit: a caller may pick either per call (row skip for few
rows, one shared dense pass for many) and a row's result does not change.

fp32: each output is summed in cpu_linear.c's fixed order (cpu_fixed_order.h: channel k to lane k mod
16, channels past the last multiple of 16 to the scalar tail, each lane an fmaf chain in ascending k, then
the fixed tree), so its dense pass is cpu_linear on the pruned input. int8: one chain per output (below).
The work is (row, chunk of outputs) pairs (int8: chunks, each walking every row), split over the threads;
the kept rows some way ahead are prefetched a cache line at a time, spread over each pass, since the
jumps between kept rows defeat the hardware prefetcher and a burst of prefetches at the start of a pass
(the kernels before 2026-12-07) left them well below the box's bandwidth. */
#ifndef CHUNK_F32
#define CHUNK_F32 512  /* outputs per chunk at batch > 1 */
#endif

/* A cache line of each of four rows into L2 (the row kernels' look-ahead). */
static inline void prefetch4(const void *p0, const void *p1, const void *p2, const void *p3) {
    __builtin_prefetch(p0, 0, 2);
    __builtin_prefetch(p1, 0, 2);
    __builtin_prefetch(p2, 0, 2);
    __builtin_prefetch(p3, 0, 2);
}

static inline float lanes_total(const float *acc, long ld, const float *tail, long n) {
#define A(l) acc[(l) * ld + n]
    return ((((A(0) + A(8)) + (A(4) + A(12))) + ((A(2) + A(10)) + (A(6) + A(14))))
            + (((A(1) + A(9)) + (A(5) + A(13))) + ((A(3) + A(11)) + (A(7) + A(15)))))
           + tail[n];
#undef A
}

/* A thread's scratch (the row kernels' running sums, the fp32 one's channels by lane), kept between
calls (a fresh allocation is mapped anew by the C library and its first touches cost more than the sums);
NULL if it cannot grow. */
static float *sums_scratch(size_t floats) {
    static __thread float *buf = NULL;
    static __thread size_t cap = 0;
    if (floats > cap) {  /* cache-line aligned: the sums are read and written 64 bytes at a time */
        void *grown = NULL;
        if (posix_memalign(&grown, 64, floats * sizeof(float))) return NULL;
        free(buf);
        buf = grown;
        cap = floats;
    }
    return buf;
}

/* The fp32 row skip in the lane order above, lane by lane: a lane's running sums (cn floats) stay in L1
while that lane's kept rows stream past F32_ROWS at a time (its last one to three in one pass of their
own), each read once and whole; the 16 lanes and the tail (lane 16) meet in the tree at the end. (Walking
the kept rows in ascending k instead moves a different lane's sums for every row: 16 x the sums through the
cache, and each row read in pieces.) A lane's first pass writes its sums (fma onto +0, as onto zeroed
sums: the same bits) instead of reading zeros back. At batch 1 a pass reads whole rows (N floats, 12 KB
for SmolLM2's gate/up), streams long enough for the hardware prefetcher, and software prefetches of the
rows ahead only got in its way. AMD EPYC Zen 4, 2026-12-07: 576 x 3072 at keep 0.4, ctypes A/B over 30
streamed weight copies, 1 thread: 93.8-102 us with prefetches 8 rows ahead, 83-92 without (2 threads:
65-70 -> 58-63). In the decode step the gain is at the noise (benchmarks/decode.py, 512 tokens, 1 thread,
runs alternating with the old kernel: mlp 0.4 at 0.828 / 0.833 / 0.836 / 0.853 of dense against 0.843 /
0.860 / 0.841 / 0.857; mlp 0.8 0.957-1.004 against 0.991-1.005; 2 threads mixed). Eight rows a pass was
faster in the ctypes loop but slower in the step (mlp 0.4: 0.858 / 0.876 without prefetches). At batch
> 1 a chunk reads each row in pieces of CHUNK_F32 outputs, too short for the hardware to catch: there the
rows F32_AHEAD on are prefetched, a cache line of each per 16 outputs, spread over the pass.
order: the row's kept channels grouped by lane, ascending in each; bound[l] .. bound[l + 1] is lane l's
part. */
#define F32_ROWS 4
#ifndef F32_AHEAD
#define F32_AHEAD 8
#endif
static inline __attribute__((always_inline)) void f32_pass(float *restrict s, long cn, int R, int first,
                                                           const float *const *w, const float *a,
                                                           const float *const *p) {
    long n = 0;
#ifdef __AVX512F__
    __m512 b[F32_ROWS];
    for (int j = 0; j < R; ++j) b[j] = _mm512_set1_ps(a[j]);
    for (; n + 16 <= cn; n += 16) {
        for (int j = 0; j < R; ++j)
            if (p[j]) __builtin_prefetch(p[j] + n, 0, 2);
        __m512 v = first ? _mm512_setzero_ps() : _mm512_loadu_ps(s + n);
        for (int j = 0; j < R; ++j) v = _mm512_fmadd_ps(b[j], _mm512_loadu_ps(w[j] + n), v);
        _mm512_storeu_ps(s + n, v);
    }
#else
    for (int j = 0; j < R; ++j)
        if (p[j])
            for (long m = 0; m < cn; m += 16) __builtin_prefetch(p[j] + m, 0, 2);
#endif
    for (; n < cn; ++n) {
        float v = first ? 0.0f : s[n];
        for (int j = 0; j < R; ++j) v = __builtin_fmaf(a[j], w[j][n], v);
        s[n] = v;
    }
}

/* ahead: whether to prefetch the rows F32_AHEAD on (pieces of rows, at batch > 1) */
static void f32_lanes(const float *x, const int64_t *order, const long *bound, const float *wt, long ld, long n0,
                      long cn, float *lanes, long lds, int ahead) {
    long total = bound[LANES + 1];
    for (int l = 0; l <= LANES; ++l) {
        float *restrict s = lanes + l * lds;
        long i = bound[l], e = bound[l + 1];
        if (i == e) memset(s, 0, (size_t)cn * sizeof(float));
        for (int first = 1; i < e; first = 0) {
            int R = e - i < F32_ROWS ? (int)(e - i) : F32_ROWS;
            const float *w[F32_ROWS], *p[F32_ROWS];
            float a[F32_ROWS];
            for (int j = 0; j < R; ++j) {
                w[j] = wt + order[i + j] * ld + n0;
                a[j] = x[order[i + j]];
                p[j] = ahead && i + j + F32_AHEAD < total ? wt + order[i + j + F32_AHEAD] * ld + n0 : NULL;
            }
            /* R and first as constants: one specialised loop each */
            switch (R * 2 + first) {
#define PASS(r) case 2 * r: f32_pass(s, cn, r, 0, w, a, p); break; case 2 * r + 1: f32_pass(s, cn, r, 1, w, a, p); break;
                PASS(1) PASS(2) PASS(3) PASS(4)
#undef PASS
            }
            i += R;
        }
    }
}

/* Returns 0, or -1 if no scratch could be had (nothing written then; the caller runs its torch form). */
int solc_rowskip_f32(const float *x, long ldx, const int64_t *idx, const int64_t *off, const float *wt, float *y,
                     long M, long N, long K, int threads) {
    long K16 = K - K % LANES;
    long width = (N + threads - 1) / threads;
    if (M > 1 && width > CHUNK_F32) width = CHUNK_F32;
    width = (width + 15) / 16 * 16;
    long chunks = (N + width - 1) / width, jobs = M * chunks, lds = width;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && jobs > 1) reduction(| : failed)
    for (long job = 0; job < jobs; ++job) {
        long r = job / chunks, n0 = job % chunks * width, cn = N - n0 < width ? N - n0 : width;
        long nk = off[r + 1] - off[r];
        float *lanes = sums_scratch((size_t)((LANES + 1) * lds + 2 * nk + 2 * (LANES + 2)));
        if (!lanes) {
            failed = 1;
            continue;
        }
        int64_t *order = (int64_t *)(lanes + (LANES + 1) * lds);
        long *bound = (long *)(order + nk), fill[LANES + 1];
        for (int l = 0; l <= LANES + 1; ++l) bound[l] = 0;
        for (long i = off[r]; i < off[r + 1]; ++i) ++bound[(idx[i] < K16 ? idx[i] % LANES : LANES) + 1];
        for (int l = 0; l <= LANES; ++l) bound[l + 1] += bound[l];
        for (int l = 0; l <= LANES; ++l) fill[l] = bound[l];
        for (long i = off[r]; i < off[r + 1]; ++i) order[fill[idx[i] < K16 ? idx[i] % LANES : LANES]++] = idx[i];
        f32_lanes(x + r * ldx, order, bound, wt, N, n0, cn, lanes, lds, M > 1);
        long n = 0;
#ifdef __AVX512F__
        for (; n + 16 <= cn; n += 16) {  /* lanes_total's tree, 16 outputs at a time */
#define V(l) _mm512_loadu_ps(lanes + (l) * lds + n)
#define S(a, b) _mm512_add_ps(a, b)
            __m512 t = S(S(S(S(V(0), V(8)), S(V(4), V(12))), S(S(V(2), V(10)), S(V(6), V(14)))),
                         S(S(S(V(1), V(9)), S(V(5), V(13))), S(S(V(3), V(11)), S(V(7), V(15)))));
            _mm512_storeu_ps(y + r * N + n0 + n, S(t, V(LANES)));
#undef V
#undef S
        }
#endif
        for (; n < cn; ++n) y[r * N + n0 + n] = lanes_total(lanes, lds, lanes + LANES * lds, n);
    }
    return failed ? -1 : 0;
}

/* The int8 form over `quant_primitives.int8_rows` (uint8 [K, N + 8]: the int8 value + 128, then a row
scale of 1 and bias of -128 that this kernel does not need): y[r, n] = bf16(scale[n] * s) where s is ONE
fmaf chain over row r's kept channels in ascending k, s = fmaf(x[k], q[k, n], s), x already on the bf16
grid. Unlike the fp32 kernels this is not the 16-lane order: a single chain needs one running sum per
output (a row's 3072 sums are 12 KB, in L1) where 16 lanes need sixteen (192 KB, in L2: the old kernel
spent its time moving them, ~2.5 MACs a cycle). Each kept row is read once, whole and in order, and four
kept rows update the sums in one pass (the chain's order is kept: four fmaf in k order per output).
Every int8 path of W_in with these copies runs this kernel (idx NULL: every channel, the dense pass on a
pruned input, whose zeros are exact no-ops: fmaf(0, w, s) == s), so a row skip, a dense pass, one row or
sixteen give a row the same bits. */
#ifndef INT8_AHEAD
#define INT8_AHEAD 8  /* kept rows prefetched ahead */
#endif
#ifndef CHUNK_INT8_BATCH
#define CHUNK_INT8_BATCH 512  /* outputs per chunk at batch > 1: the chunk's weights (K x 512 bytes) stay in L2 for the next row */
#endif

/* The i-th kept channel: ks[i], or i where ks is NULL (every channel). */
static inline long kept_at(const int64_t *ks, long i) { return ks ? ks[i] : i; }

/* sums[0:cn] += the chain over kept channels ks[0:nk] (NULL: 0 .. nk - 1) of one row (x its values),
outputs n0 .. n0 + cn. */
static void int8_chain(const float *x, const int64_t *ks, long nk, const uint8_t *rows, long ld, long n0, long cn,
                       float *restrict sums) {
    long i = 0;
    for (; i + 4 <= nk; i += 4) {
        long k0 = kept_at(ks, i), k1 = kept_at(ks, i + 1), k2 = kept_at(ks, i + 2), k3 = kept_at(ks, i + 3);
        const uint8_t *w0 = rows + k0 * ld + n0, *w1 = rows + k1 * ld + n0;
        const uint8_t *w2 = rows + k2 * ld + n0, *w3 = rows + k3 * ld + n0;
        float a0 = x[k0], a1 = x[k1], a2 = x[k2], a3 = x[k3];
        /* the rows INT8_AHEAD kept rows on, a cache line of each per 64 outputs (spread over the pass: a
        burst of prefetches at the start of a pass ran slower) */
        long ahead = i + INT8_AHEAD + 4 <= nk ? i + INT8_AHEAD : -1;
        const uint8_t *p0 = ahead < 0 ? 0 : rows + kept_at(ks, ahead) * ld + n0;
        const uint8_t *p1 = ahead < 0 ? 0 : rows + kept_at(ks, ahead + 1) * ld + n0;
        const uint8_t *p2 = ahead < 0 ? 0 : rows + kept_at(ks, ahead + 2) * ld + n0;
        const uint8_t *p3 = ahead < 0 ? 0 : rows + kept_at(ks, ahead + 3) * ld + n0;
        long n = 0;
#ifdef __AVX512F__
        const __m512i bias = _mm512_set1_epi32(128);
        const __m512 b0 = _mm512_set1_ps(a0), b1 = _mm512_set1_ps(a1), b2 = _mm512_set1_ps(a2), b3 = _mm512_set1_ps(a3);
#define W(p, o) _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((p) + n + (o)))), bias))
#define STEP(o) { __m512 s = _mm512_loadu_ps(sums + n + (o)); \
            s = _mm512_fmadd_ps(b0, W(w0, o), s); s = _mm512_fmadd_ps(b1, W(w1, o), s); \
            s = _mm512_fmadd_ps(b2, W(w2, o), s); s = _mm512_fmadd_ps(b3, W(w3, o), s); \
            _mm512_storeu_ps(sums + n + (o), s); }
        for (; n + 64 <= cn; n += 64) {
            if (p0) prefetch4(p0 + n, p1 + n, p2 + n, p3 + n);
            STEP(0) STEP(16) STEP(32) STEP(48)
        }
        for (; n + 16 <= cn; n += 16) STEP(0)
#undef STEP
#undef W
#endif
        for (; n < cn; ++n) {
            float s = sums[n];
            s = __builtin_fmaf(a0, (float)((int)w0[n] - 128), s);
            s = __builtin_fmaf(a1, (float)((int)w1[n] - 128), s);
            s = __builtin_fmaf(a2, (float)((int)w2[n] - 128), s);
            s = __builtin_fmaf(a3, (float)((int)w3[n] - 128), s);
            sums[n] = s;
        }
    }
    for (; i < nk; ++i) {
        long k = kept_at(ks, i);
        const uint8_t *w = rows + k * ld + n0;
        float a = x[k];
        for (long n = 0; n < cn; ++n) sums[n] = __builtin_fmaf(a, (float)((int)w[n] - 128), sums[n]);
    }
}

/* y [M, N] (row stride N): each row's chain over its kept channels idx[off[r] .. off[r + 1]) (ascending),
or over all K channels where idx is NULL. Work: chunks of outputs split over the threads (a chunk walks
every row, so at batch > 1 its weights are read from DRAM once). Returns 0, or -1 if no scratch could be
had (nothing written). */
int solc_rowskip_int8(const float *x, long ldx, const int64_t *idx, const int64_t *off, const uint8_t *rows,
                      const float *scale, float *y, long M, long N, long K, int threads) {
    long width = (N + threads - 1) / threads;
    if (M > 1 && width > CHUNK_INT8_BATCH) width = CHUNK_INT8_BATCH;
    width = (width + 63) / 64 * 64;  /* whole cache lines of weights per chunk */
    long chunks = (N + width - 1) / width, ld = N + 8;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && chunks > 1) reduction(| : failed)
    for (long c = 0; c < chunks; ++c) {
        long n0 = c * width, cn = N - n0 < width ? N - n0 : width;
        float *sums = sums_scratch((size_t)width);
        if (!sums) {
            failed = 1;
            continue;
        }
        for (long r = 0; r < M; ++r) {
            const int64_t *ks = idx ? idx + off[r] : NULL;
            long nk = idx ? off[r + 1] - off[r] : K;
            memset(sums, 0, (size_t)cn * sizeof(float));
            int8_chain(x + r * ldx, ks, nk, rows, ld, n0, cn, sums);
            for (long n = 0; n < cn; ++n) y[r * N + n0 + n] = bf16_round(sums[n] * scale[n0 + n]);
        }
    }
    return failed ? -1 : 0;
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
