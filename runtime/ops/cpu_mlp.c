/* solc::mlp's int8 weight-only linear for decode rows (runtime/ops/cpu_mlp.py), each row on its own.

Like cpu_linear.c, every output element is summed in one fixed order whatever the row count, the row's
place in the batch or the thread split, so a row's result is a function of that row alone: 16 fmaf lane
sums over k, a scalar tail, a fixed tree (cpu_linear.c's order), then times the output channel's scale,
rounded to bfloat16 (what torch's int8 kernel returns). The weights are exact in fp32; the activations
come in already rounded to bfloat16. Streaming int8 rows, this runs at ~0.6-0.7 of torch's
_weight_int8pack_mm time at batch 1 on the dev machine (the conversions are hidden behind the loads).
Built with -ffp-contract=off (cpu_linear.py builds both sources into one library). */
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "cpu_fixed_order.h"
#include "cpu_select.h"

/* fp32 -> the nearest bfloat16 (ties to even), returned as fp32; NaN stays NaN. */
static inline float bf16_round(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return v;
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    memcpy(&v, &u, 4);
    return v;
}

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
                _mm_prefetch((const char *)(w + 48 * K), _MM_HINT_T0);  /* the next group's rows */
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

/* Row-skipping GEMVs for pruned MLP inputs: y[r, :N] = sum over row r's kept channels k (idx[off[r] ..
off[r + 1]), ascending) of x[r, k] * W^T[k, :N]. Each output element is one multiply-then-add chain in
the bag's order, for every row alike (a row's result is a function of that row alone, on any machine).
Each kept weight row is one contiguous stream; the next one is prefetched (the jumps between kept rows
defeat the hardware prefetcher). The row's N sums stay in L1 (12 KB for SmolLM2's gate/up). */
static inline void prefetch_row(const void *row, long bytes) {
    for (long b = 0; b < bytes && b < 1024; b += 64) __builtin_prefetch((const char *)row + b);
}

/* The work of one call is (row, column chunk) pairs: at batch 1 the threads split the columns (the
chunk is a multiple of 16 floats, so no two threads write one cache line), each output still summed over
all of the row's kept channels in the bag's order, so the split does not change a bit. */
static long column_chunk(long M, long N, int threads) {
    long per = M >= threads ? N : (N + threads - 1) / threads;
    per = (per + 15) / 16 * 16;
    return per < N ? per : N;
}

void solc_rowskip_f32(const float *x, long ldx, const int64_t *idx, const int64_t *off, const float *wt, float *y,
                      long M, long N, int threads) {
    long chunk = column_chunk(M, N, threads), chunks = (N + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && M * chunks > 1)
    for (long job = 0; job < M * chunks; ++job) {
        long r = job / chunks, n0 = job % chunks * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        float *yr = y + r * N;
        for (long n = n0; n < n1; ++n) yr[n] = 0;
        for (long i = off[r]; i < off[r + 1]; ++i) {
            if (i + 1 < off[r + 1]) prefetch_row(wt + idx[i + 1] * N + n0, (n1 - n0) * 4);
            const float *w = wt + idx[i] * N;
            float a = x[r * ldx + idx[i]];
            for (long n = n0; n < n1; ++n) yr[n] += a * w[n];
        }
    }
}

/* The int8 form over `quant_primitives.int8_rows` (uint8 [K, N + 8]: the int8 value + 128, then a row
scale of 1 and bias of -128 that this kernel does not need): x (already on the bf16 grid) times the
int8 values, summed as above, then times the output channel's scale and rounded to bf16. */
void solc_rowskip_int8(const float *x, long ldx, const int64_t *idx, const int64_t *off, const uint8_t *rows,
                       const float *scale, float *y, long M, long N, int threads) {
    long chunk = column_chunk(M, N, threads), chunks = (N + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && M * chunks > 1)
    for (long job = 0; job < M * chunks; ++job) {
        long r = job / chunks, n0 = job % chunks * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        float *yr = y + r * N;
        for (long n = n0; n < n1; ++n) yr[n] = 0;
        for (long i = off[r]; i < off[r + 1]; ++i) {
            if (i + 1 < off[r + 1]) prefetch_row(rows + idx[i + 1] * (N + 8) + n0, n1 - n0);
            const uint8_t *w = rows + idx[i] * (N + 8);
            float a = x[r * ldx + idx[i]];
            for (long n = n0; n < n1; ++n) yr[n] += a * (float)((int)w[n] - 128);
        }
        for (long n = n0; n < n1; ++n) yr[n] = bf16_round(yr[n] * scale[n]);
    }
}

/* |x| as an ordered key: the bits of a non-negative float are monotonic in its value. */
static uint32_t abs_key(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return u & 0x7fffffffu;
}

SOLC_KTH_LARGEST(kth_largest_key, uint32_t)

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
        uint32_t thr = kth_largest_key(scratch, d, kr);
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
