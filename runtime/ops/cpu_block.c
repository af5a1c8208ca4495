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
    for (long b = 0; b < B; ++b) {
        float r = 1.0f / sqrtf(ms[b] + eps);
        for (long i = 0; i < d; ++i) h[b * d + i] = norm_w[i] * (x[b * d + i] * r);
    }
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
