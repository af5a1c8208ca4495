/* A decoder layer's attention block of a decode step in one call, for the eager CPU program
 * (runtime/ops/cpu_block.py finds the pattern in HF llama-style graphs):
 *
 *   h   = norm_w * (x * rsqrt(ms + eps))          the RMSNorm after its mean of squares `ms` (computed by
 *                                                 the graph's own aten ops: their summation order is aten's)
 *   q,k,v = h @ W^T (+ b)                         solc_linear_f32, each row in its fixed order
 *   q,k = rotary(q), rotary(k)                    solc_rotary_f32
 *   cache write + page statistics                 solc_write_kv
 *   a   = decode attention                        solc_decode_attention
 *   out = x + a @ Wo^T (+ bo)                     solc_linear_f32, then the residual add
 *
 * Each step is the same C function on the same values as the op-by-op program (the norm's four
 * elementwise ops are the graph's fp32 operations in the graph's order: add, correctly rounded sqrt and
 * division, two products), so the block has the op graph's bits. Why: between its ~25 ops the Python
 * program ran cold (each layer's weights evict the interpreter's working set from the caches), which
 * cost several times the ops themselves. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_bf16.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

void solc_linear_f32(const float *x, long ldx, const float *w, const float *bias, float *y, long M, long N, long K,
                     int threads);
void solc_rotary_f32(const float *x, long sb, long sh, const float *cs, const float *sn, long csb, float *out,
                     long osb, long osh, long B, long H, long D);
void solc_write_kv(const float *k, const float *v, float *k_cache, float *v_cache, float *page_min, float *page_max,
                   const int64_t *positions, long B, long Hkv, long S, long P, long D);
void solc_decode_attention(const float *q, const float *k_cache, const float *v_cache, const float *page_min,
                           const float *page_max, const int64_t *positions, const int64_t *kept_pages, long B,
                           long Hq, long Hkv, long S, long P, long D, float scale, float *out, float *scratch,
                           long scratch_per_task, int threads);

void solc_select_channels(const float *x, long ldx, long M, long d, const int64_t *k, int64_t *idx, int64_t *off,
                          uint32_t *scratch);
int solc_rowskip_f32(const float *x, long ldx, const int64_t *idx, const int64_t *off, const float *wt, float *y,
                     long M, long N, long K, int threads);
int solc_rowskip_int8(const float *x, long ldx, const int64_t *idx, const int64_t *off, const uint8_t *rows,
                      const float *scale, float *y, long M, long N, long K, int threads);
void solc_int8_linear(const float *x, long ldx, const int8_t *q, const float *scale, float *y, long M, long N,
                      long K, int threads);
int solc_int4_linear(const float *x, long ldx, const uint8_t *q, const uint16_t *sz, long g, float *y, long M,
                     long N, long K, int threads);

/* aten's sum of a contiguous fp32 row, in its order (SumKernel.cpp's cascade sum as this torch build
 * runs it: 8-lane vectors, four interleaved vector sums with cascade levels, the scalar tail, then the
 * lanes in order). Only for rows one thread reduces (n < 32768: aten splits longer ones). cpu_block.py
 * compares it with torch.mean(x ** 2) before a block uses it, and keeps torch's ops otherwise. */
#define SUM_LANES 8
static void lanes_add(float *a, const float *b) {
    for (int l = 0; l < SUM_LANES; ++l) a[l] = a[l] + b[l];
}

static long ceil_log2(long x) {
    if (x <= 2) return 1;
    long bits = 0;
    for (x -= 1; x; x >>= 1) ++bits;
    return bits;
}

static float aten_row_sum(const float *x, long n) {
    enum { ILP = 4, LEVELS = 4 };
    long vecs = n / SUM_LANES, groups = vecs / ILP;
    float acc[LEVELS][ILP][SUM_LANES];
    memset(acc, 0, sizeof acc);
    long power = ceil_log2(groups) / LEVELS < 4 ? 4 : ceil_log2(groups) / LEVELS, step = 1L << power, mask = step - 1;
    long i = 0;
    while (i + step <= groups) {
        for (long j = 0; j < step; ++j, ++i)
            for (int k = 0; k < ILP; ++k) lanes_add(acc[0][k], x + (i * ILP + k) * SUM_LANES);
        for (int j = 1; j < LEVELS; ++j) {
            for (int k = 0; k < ILP; ++k) {
                lanes_add(acc[j][k], acc[j - 1][k]);
                memset(acc[j - 1][k], 0, sizeof acc[j - 1][k]);
            }
            if (i & (mask << (j * power))) break;
        }
    }
    for (; i < groups; ++i)
        for (int k = 0; k < ILP; ++k) lanes_add(acc[0][k], x + (i * ILP + k) * SUM_LANES);
    for (int j = 1; j < LEVELS; ++j)
        for (int k = 0; k < ILP; ++k) lanes_add(acc[0][k], acc[j][k]);
    for (long t = groups * ILP; t < vecs; ++t) lanes_add(acc[0][0], x + t * SUM_LANES);
    for (int k = 1; k < ILP; ++k) lanes_add(acc[0][0], acc[0][k]);
    float total = 0;
    for (long t = vecs * SUM_LANES; t < n; ++t) total += x[t];
    for (int l = 0; l < SUM_LANES; ++l) total += acc[0][0][l];
    return total;
}

/* out[b] = mean(x[b] ** 2) as torch.mean(torch.pow(x, 2), -1) computes it (n >= 8); sq: n floats. */
static float mean_of_squares(const float *x, long n, float *sq) {
    for (long i = 0; i < n; ++i) sq[i] = x[i] * x[i];
    return aten_row_sum(sq, n) / (float)n;
}

void solc_mean_of_squares(const float *x, long rows, long n, float *out, float *sq) {
    for (long b = 0; b < rows; ++b) out[b] = mean_of_squares(x + b * n, n, sq);
}

/* h [B, d] = norm_w * (x * rsqrt(ms + eps)): the graph's RMSNorm, op for op, after its mean of squares
 * `ms` (NULL: computed here, in aten's order). */
static void norm_rows(const float *x, const float *ms, float eps, const float *norm_w, long B, long d, float *h) {
    for (long b = 0; b < B; ++b) {
        float m = ms ? ms[b] : mean_of_squares(x + b * d, d, h + b * d);
        float r = 1.0f / sqrtf(m + eps);
        for (long i = 0; i < d; ++i) h[b * d + i] = norm_w[i] * (x[b * d + i] * r);
    }
}

static void bf16_to_f32(const uint16_t *src, long n, float *dst) {
    for (long i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

/* work: B * (d + 3 * Hq * D + 4 * Hkv * D) floats. */
void solc_attention_block(const float *x, const float *ms, float eps, const float *norm_w, long B, long d,
                          const float *wq, const float *bq, const float *wk, const float *bk, const float *wv,
                          const float *bv, const float *cs, const float *sn, long csb, float *k_cache,
                          float *v_cache, float *page_min, float *page_max, const int64_t *positions,
                          const int64_t *kept, long Hq, long Hkv, long S, long P, long D, float scale,
                          const float *wo, const float *bo, float *out, float *work, float *scratch, long per_task,
                          int threads) {
    long nq = Hq * D, nkv = Hkv * D;
    float *h = work, *q = h + B * d, *k = q + B * nq, *v = k + B * nkv, *qr = v + B * nkv, *kr = qr + B * nq,
          *att = kr + B * nkv;
    norm_rows(x, ms, eps, norm_w, B, d, h);
    solc_linear_f32(h, d, wq, bq, q, B, nq, d, threads);
    solc_linear_f32(h, d, wk, bk, k, B, nkv, d, threads);
    solc_linear_f32(h, d, wv, bv, v, B, nkv, d, threads);
    solc_rotary_f32(q, nq, D, cs, sn, csb, qr, nq, D, B, Hq, D);
    solc_rotary_f32(k, nkv, D, cs, sn, csb, kr, nkv, D, B, Hkv, D);
    solc_write_kv(kr, v, k_cache, v_cache, page_min, page_max, positions, B, Hkv, S, P, D);
    solc_decode_attention(qr, k_cache, v_cache, page_min, page_max, positions, kept, B, Hq, Hkv, S, P, D, scale, att,
                          scratch, per_task, threads);
    solc_linear_f32(att, nq, wo, bo, out, B, d, nq, threads);
    for (long i = 0; i < B * d; ++i) out[i] = x[i] + out[i];
}

/* The MLP block's two calls around the activation (which stays torch's: its exp is aten's own), for
 * gated MLPs without biases at one action for every row (runtime/ops/cpu_block.py; the kernels and their
 * choice are cpu_mlp.py's, so the same bits):
 *   solc_mlp_input:  h = the RMSNorm of x; the rows' kept channels of h (keep < d) and
 *     mode 0  pre = [h_p @ Wg^T | h_p @ Wu^T]     fp32, h_p = h with the unkept channels zeroed
 *     mode 1  pre = the fp32 row skip over wt     (the kept rows of [Wg; Wu]^T)
 *     mode 2  pre = the int8 linear of bf16(h_p)  (the in8_rows kernel over every channel where the copies
 *             have in8_rows, the row skip's order; else in8, per-channel scale)
 *     mode 3  pre = the int8 row skip of bf16(h)  (in8_rows)
 *     mode 4  h only (torch's int4 kernel runs after it)
 *     mode 5  pre = the int4 linear of h_p          (in4 nibbles, in4_sz; solc_int4_linear)
 *   solc_mlp_output: out = x + hid @ Wd^T (mode 0 / 1: fp32), x + int8 linear of bf16(hid) (mode 2 / 3), or
 *     x + int4 linear of hid (mode 5).
 * Both return 0, or -1 where the int4 kernel could not run or a row kernel had no scratch (the caller runs
 * its torch form).
 * sel: B * d + 2 * B + 1 + d int64 (indices, offsets, counts, the selection's scratch); work: B * d + B * N_in
 * floats. */
/* row_counts: each row's kept channels (a mixed batch's rows of one kernel), or NULL: keep_count for all. */
static int mlp_input(const float *x, const float *ms, float eps, const float *norm_w, long B, long d, int mode,
                     long keep_count, const int64_t *row_counts, const float *wg, const float *wu, long F,
                     const float *wt, const int8_t *in8, const uint8_t *in8_rows, const uint16_t *in8_scale,
                     const uint8_t *in4, const uint16_t *in4_sz, long group, float *h, float *pre, int64_t *sel,
                     float *work, int threads) {
    norm_rows(x, ms, eps, norm_w, B, d, h);
    if (mode == 4) return 0;
    long N = 2 * F;
    int64_t *idx = sel, *off = idx + B * d, *counts = off + B + 1;
    uint32_t *scratch = (uint32_t *)(counts + B);
    int pruned = 0;
    for (long b = 0; b < B; ++b) {
        counts[b] = row_counts ? row_counts[b] : keep_count;
        pruned |= counts[b] < d;
    }
    if (pruned || mode == 1 || mode == 3) solc_select_channels(h, d, B, d, counts, idx, off, scratch);
    float *hp = work, *scale = work + B * d;
    if (mode == 0 || mode == 2 || mode == 5) {  /* the dense kernel on the pruned (at 8 bits, bf16-rounded) input */
        if (pruned) {
            memset(hp, 0, B * d * sizeof(float));
            for (long b = 0; b < B; ++b)
                for (long i = off[b]; i < off[b + 1]; ++i) hp[b * d + idx[i]] = h[b * d + idx[i]];
        } else {
            memcpy(hp, h, B * d * sizeof(float));
        }
    }
    if (mode == 0) {
        if (B == 1) {
            solc_linear_f32(hp, d, wg, 0, pre, 1, F, d, threads);
            solc_linear_f32(hp, d, wu, 0, pre + F, 1, F, d, threads);
        } else {  /* [B, F] each, then side by side as torch.cat lays them out */
            float *g = scale;  /* B * N floats of the work area past hp */
            solc_linear_f32(hp, d, wg, 0, g, B, F, d, threads);
            solc_linear_f32(hp, d, wu, 0, g + B * F, B, F, d, threads);
            for (long b = 0; b < B; ++b) {
                memcpy(pre + b * N, g + b * F, F * sizeof(float));
                memcpy(pre + b * N + F, g + B * F + b * F, F * sizeof(float));
            }
        }
    } else if (mode == 1) {
        return solc_rowskip_f32(h, d, idx, off, wt, pre, B, N, d, threads);
    } else if (mode == 5) {
        return solc_int4_linear(hp, d, in4, in4_sz, group, pre, B, N, d, threads);
    } else {
        bf16_to_f32(in8_scale, N, scale);
        if (mode == 2) {  /* with the rows copy, its kernel over every channel: the row skip's bits */
            for (long i = 0; i < B * d; ++i) hp[i] = bf16_round(hp[i]);
            if (in8_rows) return solc_rowskip_int8(hp, d, NULL, NULL, in8_rows, scale, pre, B, N, d, threads);
            solc_int8_linear(hp, d, in8, scale, pre, B, N, d, threads);
        } else {
            for (long i = 0; i < B * d; ++i) hp[i] = bf16_round(h[i]);
            return solc_rowskip_int8(hp, d, idx, off, in8_rows, scale, pre, B, N, d, threads);
        }
    }
    return 0;
}

int solc_mlp_input(const float *x, const float *ms, float eps, const float *norm_w, long B, long d, int mode,
                   long keep_count, const float *wg, const float *wu, long F, const float *wt, const int8_t *in8,
                   const uint8_t *in8_rows, const uint16_t *in8_scale, const uint8_t *in4, const uint16_t *in4_sz,
                   long group, float *h, float *pre, int64_t *sel, float *work, int threads) {
    return mlp_input(x, ms, eps, norm_w, B, d, mode, keep_count, 0, wg, wu, F, wt, in8, in8_rows, in8_scale, in4,
                     in4_sz, group, h, pre, sel, work, threads);
}

/* work: B * F + d floats. */
int solc_mlp_output(const float *hid, long B, long F, int mode, const float *wd, const int8_t *out8,
                    const uint16_t *out8_scale, const uint8_t *out4, const uint16_t *out4_sz, long group,
                    const float *x, long d, float *out, float *work, int threads) {
    if (mode == 5) {
        if (solc_int4_linear(hid, F, out4, out4_sz, group, out, B, d, F, threads)) return -1;
    } else if (mode <= 1) {
        solc_linear_f32(hid, F, wd, 0, out, B, d, F, threads);
    } else {
        float *hb = work, *scale = work + B * F;
        for (long i = 0; i < B * F; ++i) hb[i] = bf16_round(hid[i]);
        bf16_to_f32(out8_scale, d, scale);
        solc_int8_linear(hb, F, out8, scale, out, B, d, F, threads);
    }
    for (long i = 0; i < B * d; ++i) out[i] = x[i] + out[i];
    return 0;
}

/* The whole MLP block in one call, the activation included, for SiLU: aten computes silu(x) as
 * x / (1 + exp(-x)) with Sleef_expf16_u10 on AVX-512 CPUs; the same function (libtorch's own, its address
 * set once by solc_set_expf16) and the same operations here give the same bits. cpu_block.py checks that
 * against torch before it uses this, and calls the two halves around torch's activation otherwise.
 * Returns 0, or -1 where it cannot run (then nothing was written to out). hid: B * F floats. */
#ifdef __AVX512F__
typedef __m512 (*expf16_fn)(__m512);
static expf16_fn expf16;

void solc_set_expf16(void *fn) { expf16 = (expf16_fn)fn; }

/* hid[b, i] = silu(pre[b, i]) * pre[b, F + i], the graph's ops: neg, exp, add 1, divide, multiply. */
void solc_silu_mul(const float *pre, long B, long F, float *hid) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (long b = 0; b < B; ++b)
        for (long i = 0; i < F; i += 16) {
            __m512 g = _mm512_loadu_ps(pre + b * 2 * F + i);
            __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, expf16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            _mm512_storeu_ps(hid + b * F + i, _mm512_mul_ps(s, _mm512_loadu_ps(pre + b * 2 * F + F + i)));
        }
}

static int mlp_block(const float *x, const float *ms, float eps, const float *norm_w, long B, long d, int mode,
                     long keep_count, const int64_t *row_counts, const float *wg, const float *wu, long F,
                     const float *wt, const int8_t *in8, const uint8_t *in8_rows, const uint16_t *in8_scale,
                     const uint8_t *in4, const uint16_t *in4_sz, long group, float *h, const float *wd,
                     const int8_t *out8, const uint16_t *out8_scale, const uint8_t *out4, const uint16_t *out4_sz,
                     float *pre, float *hid, int64_t *sel, float *work, float *out, int threads) {
    if (!expf16 || F % 16 || mode == 4) return -1;
    if (mlp_input(x, ms, eps, norm_w, B, d, mode, keep_count, row_counts, wg, wu, F, wt, in8, in8_rows, in8_scale,
                  in4, in4_sz, group, h, pre, sel, work, threads))
        return -1;
    solc_silu_mul(pre, B, F, hid);
    return solc_mlp_output(hid, B, F, mode, wd, out8, out8_scale, out4, out4_sz, group, x, d, out, work, threads);
}

int solc_mlp_block(const float *x, const float *ms, float eps, const float *norm_w, long B, long d, int mode,
                   long keep_count, const float *wg, const float *wu, long F, const float *wt, const int8_t *in8,
                   const uint8_t *in8_rows, const uint16_t *in8_scale, const uint8_t *in4, const uint16_t *in4_sz,
                   long group, float *h, const float *wd, const int8_t *out8, const uint16_t *out8_scale,
                   const uint8_t *out4, const uint16_t *out4_sz, float *pre, float *hid, int64_t *sel, float *work,
                   float *out, int threads) {
    return mlp_block(x, ms, eps, norm_w, B, d, mode, keep_count, 0, wg, wu, F, wt, in8, in8_rows, in8_scale, in4,
                     in4_sz, group, h, wd, out8, out8_scale, out4, out4_sz, pre, hid, sel, work, out, threads);
}

#else
void solc_set_expf16(void *fn) { (void)fn; }
void solc_silu_mul(const float *pre, long B, long F, float *hid) { (void)pre; (void)B; (void)F; (void)hid; }
int solc_mlp_block(void) { return -1; }
#endif

/* A decode step's run of consecutive blocks (every layer's attention block, then its MLP block) in one
 * call, for runtime/ops/cpu_chain.py: each block's arguments are planned once, so a step crosses from
 * Python to C once instead of twice per layer (each crossing packed ~30 arguments and ran the checks
 * in front of it cold, ~60-80 us a block on SmolLM2). The blocks run exactly as their own calls would;
 * their outputs alternate between the two halves of buf (2 * B * d floats), the last goes to out. All
 * attention blocks share the step's cos / sin, positions and kept pages; the norms compute their mean of
 * squares (ms = NULL). rows: NULL where every row runs the MLP blocks' planned mode and keep count, else a
 * mixed batch's kernel groups (mlp_block_rows). Returns 0, or -1 where an MLP block could not run (an int4
 * scratch allocation): then the caller runs the blocks one by one from the start, which rewrites the same
 * cache entries. */
typedef struct {
    int64_t kind; /* 0: attention block, 1: MLP block */
    double eps, scale;
    const float *norm_w;
    int64_t B, d;
    /* attention */
    const float *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo;
    float *k_cache, *v_cache, *page_min, *page_max;
    int64_t Hq, Hkv, S, P, D, per_task;
    float *scratch;
    /* MLP */
    int64_t mode, keep_count, F, group;
    const float *wg, *wu, *wt, *wd;
    const int8_t *in8, *out8;
    const uint8_t *in8_rows, *in4, *out4;
    const uint16_t *in8_scale, *in4_sz, *out8_scale, *out4_sz;
    float *h, *pre, *hid;
    int64_t *sel;
    /* both */
    float *work;
} solc_chain_block;

long solc_chain_block_size(void) { return (long)sizeof(solc_chain_block); }

/* A chain's MLP block over a mixed batch: rows = [G, then per kernel group: mode, m, its m row indices
 * (ascending), their m kept-channel counts]. A group is the rows cpu_mlp.py runs together (one bit level,
 * one plan); each runs on its rows gathered into row_buf (2 * B * d floats) and is scattered back, unless
 * it is the whole batch. Every kernel computes a row in an order that does not depend on its batch mates,
 * so a row gets the bits it gets alone. */
#ifdef __AVX512F__
static int mlp_block_rows(const solc_chain_block *b, const int64_t *rows, const float *x, float *out,
                          float *row_buf, int threads) {
    long G = rows[0], B = b->B, d = b->d;
    const int64_t *g = rows + 1;
    for (long j = 0; j < G; ++j) {
        long mode = g[0], m = g[1];
        const int64_t *idx = g + 2, *counts = g + 2 + m;
        int whole = m == B;
        float *gx = row_buf, *gout = row_buf + B * d;
        if (!whole)
            for (long r = 0; r < m; ++r) memcpy(gx + r * d, x + idx[r] * d, d * sizeof(float));
        if (mlp_block(whole ? x : gx, 0, (float)b->eps, b->norm_w, m, d, (int)mode, d, counts, b->wg, b->wu, b->F,
                      b->wt, b->in8, b->in8_rows, b->in8_scale, b->in4, b->in4_sz, b->group, b->h, b->wd, b->out8,
                      b->out8_scale, b->out4, b->out4_sz, b->pre, b->hid, b->sel, b->work, whole ? out : gout,
                      threads))
            return -1;
        if (!whole)
            for (long r = 0; r < m; ++r) memcpy(out + idx[r] * d, gout + r * d, d * sizeof(float));
        g += 2 + 2 * m;
    }
    return 0;
}
#endif

int solc_block_chain(const solc_chain_block *blocks, long n, const float *x, float *out, float *buf,
                     const float *cs, const float *sn, long csb, const int64_t *positions, const int64_t *kept,
                     const int64_t *rows, float *row_buf, int threads) {
    for (long i = 0; i < n; ++i) {
        const solc_chain_block *b = blocks + i;
        long size = b->B * b->d;
        const float *src = i ? buf + (i % 2) * size : x;
        float *dst = i == n - 1 ? out : buf + ((i + 1) % 2) * size;
        if (b->kind == 0) {
            solc_attention_block(src, 0, (float)b->eps, b->norm_w, b->B, b->d, b->wq, b->bq, b->wk, b->bk, b->wv,
                                 b->bv, cs, sn, csb, b->k_cache, b->v_cache, b->page_min, b->page_max, positions,
                                 kept, b->Hq, b->Hkv, b->S, b->P, b->D, (float)b->scale, b->wo, b->bo, dst, b->work,
                                 b->scratch, b->per_task, threads);
            continue;
        }
#ifdef __AVX512F__
        if (rows) {
            if (mlp_block_rows(b, rows, src, dst, row_buf, threads)) return -1;
        } else if (solc_mlp_block(src, 0, (float)b->eps, b->norm_w, b->B, b->d, (int)b->mode, b->keep_count, b->wg, b->wu,
                           b->F, b->wt, b->in8, b->in8_rows, b->in8_scale, b->in4, b->in4_sz, b->group, b->h, b->wd,
                           b->out8, b->out8_scale, b->out4, b->out4_sz, b->pre, b->hid, b->sel, b->work, dst,
                           threads))
            return -1;
#else
        return -1;
#endif
    }
    return 0;
}
