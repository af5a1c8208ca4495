/* Batch-invariant fp32 linear: y[r, n] = sum_k x[r, k] * w[n, k] (+ bias[n]).

Every output element is summed in one fixed order whatever the row count, the row's place in the batch,
the thread count's split of the outputs or the tile it lands in: 16 lane sums over k in steps of 16
(lane l takes k = l, l + 16, ...; each step one fused multiply-add, written out as fmaf), a scalar fmaf
tail over the last K mod 16 terms, then a fixed pairwise tree over the lanes. Built with
-ffp-contract=off so the compiler fuses nothing else: a row's result is a function of that row alone.
The paths below (one row: 16 weight rows at a time, which streams the weights as fast as MKL's GEMV;
several rows: 4 x 4 register tiles) differ only in which elements they compute together. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "cpu_fixed_order.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define ROW_TILE 4
#define COL_TILE 4

#ifdef SOLC_AVX2
/* With AVX-512, GCC keeps the lane sums of gemv_block (16 x 16) and tile (4 x 4 x 16) in its 32
registers; with AVX2's 16 registers it spills them every step (1.7x MKL's time on SmolLM2's 576 x 576).
These kernels hold fewer outputs at once, each output's 16 lanes in two registers: the same per-lane
fmaf sequence, so the same bits (tests/runtime/ops/test_cpu_linear.py builds each path and compares). */
#define AVX2_ROWS 4
static long gemv_rows_avx2(const float *x, const float *w, long K, long K16, long n, long n1, float *y) {
    for (; n + AVX2_ROWS <= n1; n += AVX2_ROWS) {
        __m256 lo[AVX2_ROWS], hi[AVX2_ROWS];
        for (int c = 0; c < AVX2_ROWS; ++c) lo[c] = hi[c] = _mm256_setzero_ps();
        for (long k = 0; k < K16; k += LANES) {
            __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
            for (int c = 0; c < AVX2_ROWS; ++c) {
                const float *wr = w + (n + c) * K + k;
                lo[c] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(wr), lo[c]);
                hi[c] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(wr + 8), hi[c]);
            }
        }
        for (int c = 0; c < AVX2_ROWS; ++c) {
            float acc[LANES], tail = 0;
            _mm256_storeu_ps(acc, lo[c]);
            _mm256_storeu_ps(acc + 8, hi[c]);
            for (long k = K16; k < K; ++k) tail = __builtin_fmaf(x[k], w[(n + c) * K + k], tail);
            y[n + c] = finish(acc, tail);
        }
    }
    return n;
}

/* out[r, c] for rows r0, r0 + 1 of x and weight rows c0, c0 + 1 of w (a full tile's 2 x 2 quarter): 8
registers of lane sums, the x and w vectors each loaded once per step for two outputs. */
static void quarter_avx2(const float *x, long ldx, const float *w, long K, long K16, float *out, long ldo) {
    __m256 lo[2][2], hi[2][2];
    for (int r = 0; r < 2; ++r)
        for (int c = 0; c < 2; ++c) lo[r][c] = hi[r][c] = _mm256_setzero_ps();
    for (long k = 0; k < K16; k += LANES) {
        __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
        __m256 v0 = _mm256_loadu_ps(w + K + k), v1 = _mm256_loadu_ps(w + K + k + 8);
        for (int r = 0; r < 2; ++r) {
            __m256 x0 = _mm256_loadu_ps(x + r * ldx + k), x1 = _mm256_loadu_ps(x + r * ldx + k + 8);
            lo[r][0] = _mm256_fmadd_ps(x0, w0, lo[r][0]);
            hi[r][0] = _mm256_fmadd_ps(x1, w1, hi[r][0]);
            lo[r][1] = _mm256_fmadd_ps(x0, v0, lo[r][1]);
            hi[r][1] = _mm256_fmadd_ps(x1, v1, hi[r][1]);
        }
    }
    for (int r = 0; r < 2; ++r)
        for (int c = 0; c < 2; ++c) {
            float acc[LANES], tail = 0;
            _mm256_storeu_ps(acc, lo[r][c]);
            _mm256_storeu_ps(acc + 8, hi[r][c]);
            for (long k = K16; k < K; ++k) tail = __builtin_fmaf(x[r * ldx + k], w[c * K + k], tail);
            out[r * ldo + c] = finish(acc, tail);
        }
}
#endif

/* A full-width tile's loop for R rows (a compile-time constant): k outermost, so each weight line is read
once for the R rows (the generic loop below reads a weight row once per x row). */
static inline __attribute__((always_inline)) void tile_rows(const float *x, long ldx, const int R, const float *w, long K,
                                                            long K16, float acc[ROW_TILE][COL_TILE][LANES]) {
    for (long k = 0; k < K16; k += LANES)
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < COL_TILE; ++c)
                for (int l = 0; l < LANES; ++l) acc[r][c][l] = __builtin_fmaf(x[r * ldx + k + l], w[c * K + k + l], acc[r][c][l]);
}

/* out[r * ldo + c] for rows r < rows of x and weight rows c < cols of w. The full 4 x 4 tile and the
edge tiles run the same per-element sequence (acc[l] = fmaf(x, w, acc[l]) over k, then finish), so where an
element lands does not change its value. */
static inline void tile(const float *x, long ldx, int rows, const float *w, long K, int cols, long K16,
                        float *out, long ldo) {
#ifdef SOLC_AVX2
    if (rows == ROW_TILE && cols == COL_TILE) {
        for (int r = 0; r < ROW_TILE; r += 2)
            for (int c = 0; c < COL_TILE; c += 2) quarter_avx2(x + r * ldx, ldx, w + c * K, K, K16, out + r * ldo + c, ldo);
        return;
    }
#endif
    float acc[ROW_TILE][COL_TILE][LANES] = {{{0}}};
    if (rows == 1 && cols == COL_TILE) {
        for (long k = 0; k < K16; k += LANES)
            for (int c = 0; c < COL_TILE; ++c)
                for (int l = 0; l < LANES; ++l) acc[0][c][l] = __builtin_fmaf(x[k + l], w[c * K + k + l], acc[0][c][l]);
    } else if (rows == ROW_TILE && cols == COL_TILE) {
        tile_rows(x, ldx, ROW_TILE, w, K, K16, acc);
#ifdef __AVX512F__
    /* a batch's last 2 or 3 rows (M mod 4): with AVX2's 16 registers these sums would spill */
    } else if (rows == 2 && cols == COL_TILE) {
        tile_rows(x, ldx, 2, w, K, K16, acc);
    } else if (rows == 3 && cols == COL_TILE) {
        tile_rows(x, ldx, 3, w, K, K16, acc);
#endif
    } else {
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < cols; ++c)
                for (long k = 0; k < K16; k += LANES)
                    for (int l = 0; l < LANES; ++l) acc[r][c][l] = __builtin_fmaf(x[r * ldx + k + l], w[c * K + k + l], acc[r][c][l]);
    }
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) {
            float tail = 0;
            for (long k = K16; k < K; ++k) tail = __builtin_fmaf(x[r * ldx + k], w[c * K + k], tail);
            out[r * ldo + c] = finish(acc[r][c], tail);
        }
}


/* y[n0:n1] for a single row x (a batch-1 decode step). */
static void gemv_block(const float *x, const float *w, long K, long K16, long n0, long n1, float *y) {
    long n = n0;
#ifdef SOLC_AVX2
    n = gemv_rows_avx2(x, w, K, K16, n, n1, y);
#endif
#ifdef __AVX512F__
    /* The loop below, written out: each of the 16 rows' lanes in one register, x loaded once per step,
    and the rows two groups ahead prefetched a line per row and step (the rows' own lines, not the next
    group's block in order). Same fmaf sequence per lane, so the same bits. SmolLM2 shapes, weights
    streamed, 1 thread, Zen 4 (2026-12-07, ad-hoc ctypes script, not committed; docs/runtime.md): 3072 x
    576 246-275 -> 209-214 us, 576 x 1536 121-128 -> 112-114, the LM head 49152 x 576 4.19-4.32 ->
    3.57-3.60 ms. */
    for (; n + 16 <= n1; n += 16) {
        __m512 a[16];
        for (int c = 0; c < 16; ++c) a[c] = _mm512_setzero_ps();
        const float *ahead = w + (n + 32) * K;
        for (long k = 0; k < K16; k += LANES) {
            __m512 xv = _mm512_loadu_ps(x + k);
            for (int c = 0; c < 16; ++c) {
                __builtin_prefetch(ahead + c * K + k, 0, 2);
                a[c] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + (n + c) * K + k), a[c]);
            }
        }
        for (int c = 0; c < 16; ++c) {
            float acc[LANES], tail = 0;
            _mm512_storeu_ps(acc, a[c]);
            for (long k = K16; k < K; ++k) tail = __builtin_fmaf(x[k], w[(n + c) * K + k], tail);
            y[n + c] = finish(acc, tail);
        }
    }
#endif
    for (; n + 16 <= n1; n += 16) {
        float acc[16][LANES] = {{0}};
        /* The 16 rows of the next group are one contiguous block: fetch it into L2 while this one is
        summed, a line per row and step. Rows of 576 floats are too short for the hardware prefetcher
        to ramp up on each: without this, the 3072 x 576 and LM-head GEMVs ran at 1.3x MKL's time on
        an AVX-512 Xeon (2026-12-02); with it, 1.00-1.04x. Into L2, not L1: a group of 1536-float rows
        (96 KB) would evict the current group from L1. */
        const float *next = w + (n + 16) * K;
        for (long k = 0; k < K16; k += LANES) {
            for (int c = 0; c < 16; ++c) __builtin_prefetch(next + (k + c) * LANES, 0, 2);
            for (int c = 0; c < 16; ++c)
                for (int l = 0; l < LANES; ++l) acc[c][l] = __builtin_fmaf(x[k + l], w[(n + c) * K + k + l], acc[c][l]);
        }
        for (int c = 0; c < 16; ++c) {
            float tail = 0;
            for (long k = K16; k < K; ++k) tail = __builtin_fmaf(x[k], w[(n + c) * K + k], tail);
            y[n + c] = finish(acc[c], tail);
        }
    }
    for (; n < n1; ++n) {
        float acc[LANES] = {0}, tail = 0;
        for (long k = 0; k < K16; k += LANES)
            for (int l = 0; l < LANES; ++l) acc[l] = __builtin_fmaf(x[k + l], w[n * K + k + l], acc[l]);
        for (long k = K16; k < K; ++k) tail = __builtin_fmaf(x[k], w[n * K + k], tail);
        y[n] = finish(acc, tail);
    }
}

/* Packed copies for the one-row GEMV. Read in place, a group's 16 rows are 16 streams 4 * K bytes apart,
and the GEMVs of a SmolLM2 step ran at 31 GB/s where one sequential stream reads 40 (Zen 4, 1 thread).
In the packed copy each group's 16 x 16 blocks lie in the order the loop reads them (group, k step, row,
lane), so a GEMV reads one stream: a step's weight GEMVs at 37.5 GB/s instead of 30.8 (docs/runtime.md). Only
the full groups and k steps are packed; the tails read w. Same fmaf sequence per lane, so the same bits.
A copy is registered under its weight's address (cpu_linear.py owns the copies and their lifetime) and
found by a lookup in an open-addressed table: registrations are rare and serialised by the caller, a
lookup may run beside one (each slot's address is published last). */
#define PACK_SLOTS 4096 /* a power of two; tombstones stay until a registration reuses them */
#define PACK_TOMB ((const void *)1)
typedef struct { const void *w; long N, K; const void *packed; } pack_slot;
static pack_slot packs[PACK_SLOTS];

static inline unsigned long pack_hash(const void *w) {
    return (unsigned long)(((unsigned long long)(size_t)w >> 6) * 0x9E3779B97F4A7C15ull >> 40) & (PACK_SLOTS - 1);
}

/* The packed copy registered for the weight at w (fp32 here, int8 in cpu_mlp.c), or NULL. */
const void *solc_packed_of(const void *w, long N, long K) {
    for (unsigned long i = pack_hash(w), n = 0; n < PACK_SLOTS; i = (i + 1) & (PACK_SLOTS - 1), ++n) {
        const void *at = __atomic_load_n(&packs[i].w, __ATOMIC_ACQUIRE);
        if (at == 0) return 0;
        if (at == w) return packs[i].N == N && packs[i].K == K ? packs[i].packed : 0;
    }
    return 0;
}

int solc_pack_supported(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0; /* the AVX2 and generic GEMVs hold fewer rows at once than a packed group */
#endif
}

/* out[(n / 16) * 16 * K16 + k * 16 + c * 16 + l] = w[(n + c) * K + k + l] over the full groups and k steps,
for elements of `size` bytes: each row's 16 elements of a k step are contiguous in both. */
static void pack_rows(const char *w, long N, long K, size_t size, char *out) {
    long K16 = K - K % LANES;
    for (long n = 0; n + 16 <= N; n += 16)
        for (long k = 0; k < K16; k += LANES)
            for (int c = 0; c < 16; ++c, out += LANES * size) memcpy(out, w + ((n + c) * K + k) * size, LANES * size);
}

void solc_pack_f32(const float *w, long N, long K, float *out) { pack_rows((const char *)w, N, K, sizeof *w, (char *)out); }

/* The same for an int8 weight [N, K] (cpu_mlp.c's int8_block reads 16 rows x 16 bytes per step). */
void solc_pack_i8(const int8_t *w, long N, long K, int8_t *out) { pack_rows((const char *)w, N, K, 1, (char *)out); }

/* Registers packed as w's copy (packed NULL: forgets w's). Returns 0 when the table is full. */
int solc_pack_register(const void *w, long N, long K, const void *packed) {
    long free_at = -1;
    for (unsigned long i = pack_hash(w), n = 0; n < PACK_SLOTS; i = (i + 1) & (PACK_SLOTS - 1), ++n) {
        const void *at = packs[i].w;
        if (at == w) {
            __atomic_store_n(&packs[i].w, PACK_TOMB, __ATOMIC_RELEASE);
            free_at = free_at < 0 ? (long)i : free_at;
            break;
        }
        if (at == PACK_TOMB && free_at < 0) free_at = (long)i;
        if (at == 0) {
            free_at = free_at < 0 ? (long)i : free_at;
            break;
        }
    }
    if (!packed) return 1;
    if (free_at < 0) return 0;
    packs[free_at].N = N, packs[free_at].K = K, packs[free_at].packed = packed;
    __atomic_store_n(&packs[free_at].w, w, __ATOMIC_RELEASE);
    return 1;
}

#ifdef __AVX512F__
/* Bytes ahead of the read that the packed GEMV prefetches into L2. Without it, the hardware prefetcher
alone kept one thread ahead but not two: at 2 threads the packed step's weights took 1.06x the in-place
time; 4 KB ahead, 0.78-0.89x (2 threads) and 0.82x (1 thread) in the ad-hoc C benchmark of 2026-12-07. */
#define PACK_AHEAD 4096
/* gemv_block's AVX-512 loop over a packed copy (p: the copy of w; the K tail still reads w). */
static long gemv_packed(const float *x, const float *p, const float *w, long K, long K16, long n0, long n1, float *y) {
    long n = n0;
    for (; n + 16 <= n1; n += 16) {
        __m512 a[16];
        for (int c = 0; c < 16; ++c) a[c] = _mm512_setzero_ps();
        const float *blk = p + n * K16;
        for (long k = 0; k < K16; k += LANES) {
            __m512 xv = _mm512_loadu_ps(x + k);
            for (int c = 0; c < 16; ++c) {
                __builtin_prefetch((const char *)(blk + k * 16 + c * LANES) + PACK_AHEAD, 0, 2);
                a[c] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(blk + k * 16 + c * LANES), a[c]);
            }
        }
        for (int c = 0; c < 16; ++c) {
            float acc[LANES], tail = 0;
            _mm512_storeu_ps(acc, a[c]);
            for (long k = K16; k < K; ++k) tail = __builtin_fmaf(x[k], w[(n + c) * K + k], tail);
            y[n + c] = finish(acc, tail);
        }
    }
    return n;
}
#endif

void solc_linear_f32(const float *x, long ldx, const float *w, const float *bias, float *y,
                     long M, long N, long K, int threads) {
    long K16 = K - K % LANES;
    long blocks = (N + COL_BLOCK - 1) / COL_BLOCK;
    const float *packed = M == 1 && K16 ? solc_packed_of(w, N, K) : 0;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (long blk = 0; blk < blocks; ++blk) {
        long n0 = blk * COL_BLOCK, n1 = n0 + COL_BLOCK < N ? n0 + COL_BLOCK : N;
#ifdef __AVX512F__
        if (packed) n0 = gemv_packed(x, packed, w, K, K16, n0, n1, y);  /* full groups; the rest below */
#endif
        if (M == 1) { gemv_block(x, w, K, K16, n0, n1, y); continue; }
        for (long r0 = 0; r0 < M; r0 += ROW_TILE) {
            int rows = M - r0 < ROW_TILE ? (int)(M - r0) : ROW_TILE;
            for (long c0 = n0; c0 < n1; c0 += COL_TILE) {
                int cols = n1 - c0 < COL_TILE ? (int)(n1 - c0) : COL_TILE;
                tile(x + r0 * ldx, ldx, rows, w + c0 * K, K, cols, K16, y + r0 * N + c0, N);
            }
        }
    }
    if (bias)
        for (long r = 0; r < M; ++r)
            for (long n = 0; n < N; ++n) y[r * N + n] += bias[n];
}
