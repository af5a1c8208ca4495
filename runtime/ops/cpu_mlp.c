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

/* A thread's scratch (the row kernels' running sums, the fp32 one's channels by lane, a block of the int4
linear's stream built from q), kept between
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

/* The int4 weight-only linear (AVX-512 with BF16 only; elsewhere torch's _weight_int4pack_mm_for_cpu):
y [M, N] = bf16(x_bf16 [M, K] @ dequant(q)^T) for q in `quant_primitives`' nibble format (uint8 [N, K / 2],
low nibble = even k) with scales and zeros bf16 [K / g, N, 2], w = (q - 8) * scale + zero per group of g
input channels. Per group the sum is taken as scale * sum(x * (q - 8)) + zero * sum(x): x is on the bf16
grid and q - 8 is a small integer, so each product x * (q - 8) is exact and VDPBF16PS sums 32 of them
per instruction (the weights' bf16 values come from a 16-entry table by nibble), with no per-weight
dequantization. This is the reference's sum with other fp32 roundings (within 1 bf16 ulp of the row
maximum after the final rounding, tests/runtime/ops/test_cpu_mlp_kernels.py).

Layout of the work: 16 output rows lie in the 16 lanes, so a group's scales and zeros are one vector load
and no lane tree is left at the end. A slice is 16 rows x 8 channels: lane l holds row l's 4 bytes of
channels 8s .. 8s + 7 as they lie in q (nibble t = channel 8s + t). Shifted right by 4j, the low 5 bits
of each 16-bit word index a 32-entry table of bf16(q - 8): lane l's low word gives channel 8s + j, its
high word channel 8s + 4 + j. So four shifts and four VPERMW give four vectors of 32 bf16 weights, each
multiplied by one broadcast pair of x, (x[8s + j], x[8s + 4 + j]), laid out so once per call: VDPBF16PS
with a broadcast operand, nothing else per weight. Lane l's order is fixed: per group, four partial sums
(one per j) over the group's slices in order, added (T0 + T1) + (T2 + T3); then scale * T and
zero * sum(x) summed group by group; so a row's result depends on neither its batch, its place in it,
the thread split, nor where the slices come from.

A block (16 rows) is read as one stream: for each group its slices, then its 16 (scale, zero) pairs
(64 bytes). The stream comes from a packed copy (solc_pack_i4, registered like cpu_linear.c's packed
copies under q's address) or, without one, is built per block in a per-thread scratch from q and the
scales (16 x 16 words transposed at a time in registers; rows past N are zero). Batch rows share each
slice's look-ups, up to 4 rows at a time.
SmolLM2's 60 int4 linears of a step, each layer's after 7 MiB of other reads (the step's fp32 weights),
AMD EPYC Zen 4, 2026-12-07 (benchmarks/int4_ab.py, results int4_ab_stream_1207 and int4_ab_prep_1207):
1 thread 2.79 -> 1.62 ms, 2 threads 1.90 -> 1.35 ms, 4 rows at 1 thread 7.12 -> 2.53 ms against the
previous kernel (a row's 128 channels per load in its 16 lanes, then a lane tree per row: ~20 vector ops
per 128 weights and row against ~12 here); the vectorised row preparation then took another 7% (14% at 4
rows). Of the first step, reading the scales in the block's stream instead of from their 9-24 per-group
rows gave 16%, and prefetching them before that 15% (ad-hoc A/Bs). The scratch path (no packed copy)
took ~2.5x the packed one (ad-hoc, through cpu_mlp.py). VDPBF16PS treats denormal inputs as zero and
flushes denormal results. Requires g a multiple of 8 dividing K. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define SOLC_INT4 1
#define INT4_AHEAD 8192  /* bytes of the packed copy prefetched ahead (into L2): 4096 read 10% slower, 16384 the same */

/* The block of rows [n0, n0 + rows) in the packed copy's order (rows past `rows` zero), from q [N, KB] and
the scales sz: word s of row l at (s + s / spg) * 16 + l, group grp's pairs at ((grp + 1) * spg + grp) * 16. */
static void int4_transpose_block(const uint8_t *q, const uint16_t *sz, long spg, long N, long KB, long n0, long rows,
                                 uint32_t *out) {
    long S = KB / 4;
    __mmask16 live = rows >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << rows) - 1);
    for (long grp = 0; grp < S / spg; ++grp)
        _mm512_storeu_si512(out + ((grp + 1) * spg + grp) * 16, _mm512_maskz_loadu_epi32(live, sz + (grp * N + n0) * 2));
    for (long s0 = 0; s0 < S; s0 += 16) {
        long cols = S - s0 < 16 ? S - s0 : 16, at[16], grp = s0 / spg, in_grp = s0 % spg;
        for (int i = 0; i < 16; ++i) {  /* where word s0 + i goes: after the scale lines of the groups before it */
            at[i] = (s0 + i + grp) * 16;
            if (++in_grp == spg) in_grp = 0, ++grp;
        }
        __mmask16 m = (__mmask16)((1u << cols) - 1);
        __m512i r[16], t[16];
        for (int l = 0; l < 16; ++l)
            r[l] = l < rows ? _mm512_maskz_loadu_epi32(m, q + (n0 + l) * KB + 4 * s0) : _mm512_setzero_si512();
        for (int i = 0; i < 8; ++i) {  /* pairs of rows interleaved */
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        for (int i = 0; i < 4; ++i) {  /* r[4i + c]'s 128-bit lane k: rows 4i .. 4i + 3 of word 4k + c */
            r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
            r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
            r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
            r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
        }
        for (int c = 0; c < 4; ++c) {  /* gather 128-bit lane k of r[c], r[4 + c], r[8 + c], r[12 + c] */
            __m512i a0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), a1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);
            __m512i b0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88), b1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
            __m512i word[4] = {_mm512_shuffle_i32x4(a0, b0, 0x88), _mm512_shuffle_i32x4(a1, b1, 0x88),
                               _mm512_shuffle_i32x4(a0, b0, 0xdd), _mm512_shuffle_i32x4(a1, b1, 0xdd)};
            for (int k = 0; k < 4; ++k)
                if (4 * k + c < cols) _mm512_storeu_si512(out + at[4 * k + c], word[k]);
        }
    }
}

static inline __m512bh int4_pair(const uint16_t *x) {  /* x's bf16 pair at x, in every lane */
    int32_t v;
    memcpy(&v, x, 4);
    return (__m512bh)_mm512_set1_epi32(v);
}

/* y[r][n0 .. n0 + rows) for R batch rows (a compile-time constant: the sums stay in registers). xp: the
rows' bf16 pairs [R][K] (stride K; slice s: pairs (8s + j, 8s + 4 + j), j = 0..3), Xg their group sums
[R][groups]; p: the block's stream (64-byte slices and scale lines), prefetched ahead where `ahead`. */
static inline __attribute__((always_inline)) void int4_rows(const uint16_t *xp, long K, const float *Xg, long groups,
                                                            long spg, const uint8_t *p, int ahead, long N, long n0,
                                                            long rows, const int R, __m512i table, float *y) {
    const __m512i hi_half = _mm512_set1_epi32((int32_t)0xffff0000u);
    __m512 acc[4], accz[4];
    for (int r = 0; r < R; ++r) acc[r] = accz[r] = _mm512_setzero_ps();
    for (long grp = 0; grp < groups; ++grp) {
        __m512 T[4][4];
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < 4; ++j) T[r][j] = _mm512_setzero_ps();
        for (long s = grp * spg; s < (grp + 1) * spg; ++s) {
            const uint8_t *at = p + (s + grp) * 64;  /* a group's slices, then its 16 (scale, zero) pairs */
            if (ahead) _mm_prefetch((const char *)at + INT4_AHEAD, _MM_HINT_T1);
            __m512i w = _mm512_loadu_si512(at);
            __m512bh w0 = (__m512bh)_mm512_permutexvar_epi16(w, table);
            __m512bh w1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table);
            __m512bh w2 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 8), table);
            __m512bh w3 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 12), table);
            for (int r = 0; r < R; ++r) {
                const uint16_t *xs = xp + r * K + 8 * s;
                T[r][0] = _mm512_dpbf16_ps(T[r][0], int4_pair(xs), w0);
                T[r][1] = _mm512_dpbf16_ps(T[r][1], int4_pair(xs + 2), w1);
                T[r][2] = _mm512_dpbf16_ps(T[r][2], int4_pair(xs + 4), w2);
                T[r][3] = _mm512_dpbf16_ps(T[r][3], int4_pair(xs + 6), w3);
            }
        }
        __m512i pz = _mm512_loadu_si512(p + ((grp + 1) * spg + grp) * 64);  /* (scale, zero): scale low */
        __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pz, 16)), zero = _mm512_castsi512_ps(_mm512_and_si512(pz, hi_half));
        for (int r = 0; r < R; ++r) {
            __m512 t = _mm512_add_ps(_mm512_add_ps(T[r][0], T[r][1]), _mm512_add_ps(T[r][2], T[r][3]));
            acc[r] = _mm512_fmadd_ps(scale, t, acc[r]);
            accz[r] = _mm512_fmadd_ps(zero, _mm512_set1_ps(Xg[r * groups + grp]), accz[r]);
        }
    }
    for (int r = 0; r < R; ++r) {
        float lanes[LANES];
        _mm512_storeu_ps(lanes, _mm512_add_ps(acc[r], accz[r]));
        for (long l = 0; l < rows; ++l) y[r * N + n0 + l] = bf16_round(lanes[l]);
    }
}

/* One row of x for int4_rows: its bf16 bits in slice pair order (pair j of slice s: channels 8s + j and
8s + 4 + j) and its groups' sums of the bf16 values (8 partial sums, channel k into sum k mod 8, then a
fixed tree). Vectorised: at K = 1536 the scalar loop was a large part of a 2-thread call, run by one
thread. Rounding as bf16_round (ties to even, NaN kept). */
static void int4_prepare_row(const float *x, long K, long g, uint16_t *xp, float *Xg) {
    static const uint16_t order[32] = {0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15,
                                       16, 20, 17, 21, 18, 22, 19, 23, 24, 28, 25, 29, 26, 30, 27, 31};
    const __m512i idx = _mm512_loadu_si512(order), one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
    const __m512i expo = _mm512_set1_epi32(0x7f800000), mant = _mm512_set1_epi32(0x007fffff);
    float part[8] = {0};
    for (long k = 0; k < K; k += 32) {  /* K is a multiple of 8: the last step may hold 8, 16 or 24 */
        long left = K - k < 32 ? K - k : 32;
        __mmask16 m0 = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        __mmask16 m1 = left >= 32 ? (__mmask16)0xffff : left > 16 ? (__mmask16)((1u << (left - 16)) - 1) : 0;
        __m512i half[2], u[2] = {_mm512_castps_si512(_mm512_maskz_loadu_ps(m0, x + k)),
                                 _mm512_castps_si512(_mm512_maskz_loadu_ps(m1, x + k + 16))};
        float rounded[32];
        for (int h = 0; h < 2; ++h) {
            __m512i up = _mm512_add_epi32(u[h], _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u[h], 16), one)));
            __mmask16 nan = _mm512_cmpeq_epi32_mask(_mm512_and_si512(u[h], expo), expo) & _mm512_test_epi32_mask(u[h], mant);
            half[h] = _mm512_srli_epi32(_mm512_mask_mov_epi32(up, nan, u[h]), 16);  /* the bf16 bits */
            _mm512_storeu_ps(rounded + 16 * h, _mm512_castsi512_ps(_mm512_slli_epi32(half[h], 16)));
        }
        __m512i bits = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(half[0])),
                                          _mm512_cvtepi32_epi16(half[1]), 1);
        _mm512_mask_storeu_epi16(xp + k, (__mmask32)(left >= 32 ? 0xffffffffu : (1u << left) - 1),
                                 _mm512_permutexvar_epi16(idx, bits));
        for (long i = 0; i < left; i += 8) {  /* 8 channels never straddle a group (g: a multiple of 8) */
            for (int l = 0; l < 8; ++l) part[l] += rounded[i + l];
            if ((k + i + 8) % g == 0) {
                Xg[(k + i) / g] = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
                for (int l = 0; l < 8; ++l) part[l] = 0;
            }
        }
    }
}

/* Output rows [n0, n0 + rows) (rows <= 16) of all M batch rows, 4, 2 or 1 at a time. */
static void int4_block(const uint16_t *xp, long K, const float *Xg, long groups, long spg, const uint8_t *p, int ahead,
                       long N, long n0, long rows, long M, __m512i table, float *y) {
    long r = 0;
    for (; r + 4 <= M; r += 4)
        int4_rows(xp + r * K, K, Xg + r * groups, groups, spg, p, ahead, N, n0, rows, 4, table, y + r * N);
    for (; r + 2 <= M; r += 2)
        int4_rows(xp + r * K, K, Xg + r * groups, groups, spg, p, ahead, N, n0, rows, 2, table, y + r * N);
    for (; r < M; ++r)
        int4_rows(xp + r * K, K, Xg + r * groups, groups, spg, p, ahead, N, n0, rows, 1, table, y + r * N);
}
#endif

/* The int4 copy q [N, KB] (KB = K / 2 bytes) with its scales sz [K / g, N, 2] in int4_rows' stream order,
block after block, (KB / 4 + K / g) * 64 bytes each (see int4_transpose_block); full blocks only (the
last N % 16 rows are built from q at each call). g a multiple of 8 dividing K. */
void solc_pack_i4(const uint8_t *q, const uint16_t *sz, long g, long N, long KB, uint8_t *out) {
    long S = KB / 4, spg = g / 8, groups = S / spg, per = (S + groups) * 64;
    for (long b = 0; b < N / 16; ++b) {
        uint8_t *o = out + b * per;
        for (long s = 0; s < S; ++s)
            for (int l = 0; l < 16; ++l) memcpy(o + (s + s / spg) * 64 + l * 4, q + (16 * b + l) * KB + 4 * s, 4);
        for (long grp = 0; grp < groups; ++grp) memcpy(o + ((grp + 1) * spg + grp) * 64, sz + (grp * N + 16 * b) * 2, 64);
    }
}

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
    if (g % 8 || K % g) return -1;
    long groups = K / g, KB = K / 2, S = K / 8, spg = g / 8, blocks = (N + 15) / 16, per = (S + groups) * 64;
    const uint8_t *packed = solc_packed_of(q, N, KB);  /* solc_pack_i4's copy of q with these scales */
    uint16_t *xp = malloc((size_t)(M * K) * sizeof(uint16_t));
    float *Xg = malloc((size_t)(M * groups) * sizeof(float));
    if (!xp || !Xg) {
        free(xp);
        free(Xg);
        return -1;
    }
    for (long r = 0; r < M; ++r) int4_prepare_row(x + r * ldx, K, g, xp + r * K, Xg + r * groups);
    uint16_t t[32];
    for (int j = 0; j < 32; ++j) t[j] = bf16_bits((float)(j % 16 - 8));  /* permutexvar_epi16 reads 5 index bits */
    const __m512i table = _mm512_loadu_si512(t);
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1) reduction(| : failed)
    for (long b = 0; b < blocks; ++b) {
        long rows = N - 16 * b < 16 ? N - 16 * b : 16;
        const uint8_t *p = packed && rows == 16 ? packed + b * per : 0;
        int from_copy = p != 0;  /* the copy streams from memory: prefetch it */
        if (!p) {  /* the block's stream, built from q in this thread's scratch (per: a multiple of 64 bytes) */
            uint32_t *mine = (uint32_t *)sums_scratch((size_t)per / sizeof(float));
            if (!mine) {
                failed = 1;
                continue;
            }
            if (b + 1 < blocks) {  /* the next block's rows and scale lines: streams the hardware prefetcher misses */
                for (long l = 16 * (b + 1); l < N && l < 16 * (b + 2); ++l)
                    for (long c = 0; c < KB; c += 64) _mm_prefetch((const char *)(q + l * KB + c), _MM_HINT_T1);
                for (long grp = 0; grp < groups; ++grp)
                    _mm_prefetch((const char *)(sz + (grp * N + 16 * (b + 1)) * 2), _MM_HINT_T1);
            }
            int4_transpose_block(q, sz, spg, N, KB, 16 * b, rows, mine);
            p = (const uint8_t *)mine;
        }
        int4_block(xp, K, Xg, groups, spg, p, from_copy, N, 16 * b, rows, M, table, y);
    }
    free(xp);
    free(Xg);
    return failed ? -1 : 0;
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
