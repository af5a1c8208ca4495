/* The rotary embedding of HF's models, fused: out = x * cos + rotate_half(x) * sin per element, where
 * rotate_half(x) = cat(-x[h:], x[:h]) along the last dim (h = D / 2).
 *
 * Exactly the graph's arithmetic: two fp32 products, each rounded, then their sum, rounded (the file is
 * built with -ffp-contract=off, like the rest of the library, so no multiply-add is fused); negation
 * is exact. So the result has the bits of the seven aten ops it replaces (mul, slice, slice, neg, cat,
 * mul, add), and runtime/cpu_program.py can swap them without changing a decode step.
 *
 * x and out: [B, H, D] with row strides (sb, sh) and unit stride along D; cos/sin: [B, D] with row
 * stride csb (0: one row for the whole batch). */
void solc_rotary_f32(const float *x, long sb, long sh, const float *cs, const float *sn, long csb, float *out,
                     long osb, long osh, long B, long H, long D) {
    const long h = D / 2;
    for (long b = 0; b < B; b++) {
        const float *c = cs + b * csb, *s = sn + b * csb;
        for (long j = 0; j < H; j++) {
            const float *xr = x + b * sb + j * sh;
            float *o = out + b * osb + j * osh;
            for (long i = 0; i < h; i++) {
                float p = xr[i] * c[i];
                float q = -xr[i + h] * s[i];
                o[i] = p + q;
            }
            for (long i = h; i < D; i++) {
                float p = xr[i] * c[i];
                float q = xr[i - h] * s[i];
                o[i] = p + q;
            }
        }
    }
}
