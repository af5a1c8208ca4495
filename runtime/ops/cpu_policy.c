/* One incremental step of the SOL policy network (runtime/policy.py) in one C call, for deployed decisions
 * on the CPU (fp32, no autograd, T = 1, any batch).
 *
 * Why: a decision ran ~200 small aten ops from Python (layer norms, GELUs, the cache attention, views,
 * casts) around its ten linears: ~0.7 ms of a 1.1-1.6 ms decision, against ~0.45 ms for the linears'
 * 15 MB of weights, once per generated token. Here the linears are cpu_linear.c's `solc_linear_f32` (the
 * same calls, so the same bits as the op-by-op path's linears, packed copies included) and everything
 * between them is plain loops over the step's rows.
 *
 * Semantics are the module's: input x = hidden_in(h) + token_in(e) + scalar_in(s) + action_in[prev]
 * (summed in that order), then per layer a pre-LN block (LayerNorm -> qkv -> this step's key and value
 * written at `pos` of the layer's cache -> softmax attention of each head over cache positions 0..pos ->
 * proj -> residual; LayerNorm -> Linear -> exact GELU -> Linear -> residual), a final LayerNorm, and the
 * raw action head and budget head. The anchored prior, temperature and budget guard stay in torch.
 * The non-linear parts sum in other orders than torch's kernels (layer-norm statistics in double, the
 * attention's dot products in a plain loop), so logits differ from the op-by-op path by float rounding
 * (tests/runtime/ops/test_cpu_policy.py bounds it); every row is computed on its own (batch invariance).
 */
#include <math.h>
#include <string.h>

void solc_linear_f32(const float *x, long ldx, const float *w, const float *bias, float *y, long M, long N, long K,
                     int threads);

typedef struct {  /* one block's weights and its cache ([B, heads, max_len, head_dim] each) */
    const float *ln1_w, *ln1_b, *qkv_w, *qkv_b, *proj_w, *proj_b, *ln2_w, *ln2_b, *fc1_w, *fc1_b, *fc2_w, *fc2_b;
    float *k_cache, *v_cache;
} solc_policy_layer;

typedef struct {  /* the network: sizes, weights, layers and a scratch of solc_policy_scratch floats */
    long B, d_base, d, heads, ff, scalar_hidden, n_scalars, n_actions, n_layers, max_len;
    double eps_in, eps_block, eps_out;
    const float *hin_ln_w, *hin_ln_b, *hin_w, *hin_b, *tin_ln_w, *tin_ln_b, *tin_w, *tin_b;
    const float *sc1_w, *sc1_b, *sc2_w, *sc2_b, *action_emb, *norm_w, *norm_b, *act_w, *act_b, *bud_w, *bud_b;
    const solc_policy_layer *layers;
    float *scratch;
} solc_policy_net;

static long max_l(long a, long b) { return a > b ? a : b; }

/* the widest row of the scratch's `t` part: a layer-norm input, qkv, the MLP or the scalars' hidden */
static long row_width(long d_base, long d, long ff, long scalar_hidden) {
    return max_l(max_l(d_base, 3 * d), max_l(ff, scalar_hidden));
}

long solc_policy_scratch(long B, long d_base, long d, long ff, long scalar_hidden, long max_len) {
    return B * (3 * d + row_width(d_base, d, ff, scalar_hidden)) + max_len;
}

static void layer_norm(const float *x, long M, long K, const float *w, const float *b, double eps, float *y) {
    for (long r = 0; r < M; r++) {
        const float *xr = x + r * K;
        float *yr = y + r * K;
        double mean = 0, var = 0;
        for (long k = 0; k < K; k++) mean += xr[k];
        mean /= K;
        for (long k = 0; k < K; k++) var += (xr[k] - mean) * (xr[k] - mean);
        float m = (float)mean, rstd = (float)(1.0 / sqrt(var / K + eps));
        for (long k = 0; k < K; k++) yr[k] = (xr[k] - m) * rstd * w[k] + b[k];
    }
}

static void gelu(float *x, long n) {  /* exact: x * (1 + erf(x / sqrt 2)) / 2, as nn.GELU() */
    for (long i = 0; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * (float)M_SQRT1_2));
}

static void add(float *x, const float *y, long n) {
    for (long i = 0; i < n; i++) x[i] += y[i];
}

/* x [B, d] += the block's attention (this step at `pos`, its key and value written to the cache); y [B, d],
 * qkv [B, 3d] and att [B, d] are scratch */
static void attention(const solc_policy_net *net, const solc_policy_layer *L, float *x, float *y, float *qkv,
                      float *att, float *scores, long pos, int threads) {
    const long B = net->B, d = net->d, H = net->heads, hd = d / H, S = net->max_len;
    const float root = sqrtf((float)hd);
    layer_norm(x, B, d, L->ln1_w, L->ln1_b, net->eps_block, y);
    solc_linear_f32(y, d, L->qkv_w, L->qkv_b, qkv, B, 3 * d, d, threads);
    for (long b = 0; b < B; b++) {
        const float *q = qkv + b * 3 * d;
        for (long h = 0; h < H; h++) {
            float *kc = L->k_cache + ((b * H + h) * S) * hd, *vc = L->v_cache + ((b * H + h) * S) * hd;
            memcpy(kc + pos * hd, q + d + h * hd, hd * sizeof(float));
            memcpy(vc + pos * hd, q + 2 * d + h * hd, hd * sizeof(float));
            float top = -INFINITY;
            for (long j = 0; j <= pos; j++) {
                float s = 0;
                for (long c = 0; c < hd; c++) s += q[h * hd + c] * kc[j * hd + c];
                scores[j] = s / root;
                top = scores[j] > top ? scores[j] : top;
            }
            float total = 0;
            for (long j = 0; j <= pos; j++) total += scores[j] = expf(scores[j] - top);
            float *o = att + b * d + h * hd;
            for (long c = 0; c < hd; c++) o[c] = 0;
            for (long j = 0; j <= pos; j++) {
                float p = scores[j] / total;
                for (long c = 0; c < hd; c++) o[c] += p * vc[j * hd + c];
            }
        }
    }
    solc_linear_f32(att, d, L->proj_w, L->proj_b, y, B, d, d, threads);
    add(x, y, B * d);
}

static void forward(const solc_policy_net *net, const float *h, const float *e, const float *s, const long *prev,
                    long pos, float *logits, float *budget, int threads) {
    const long B = net->B, d = net->d, Db = net->d_base;
    const long width = row_width(Db, d, net->ff, net->scalar_hidden);
    float *x = net->scratch, *y = x + B * d, *att = y + B * d, *t = att + B * d, *scores = t + B * width;

    layer_norm(h, B, Db, net->hin_ln_w, net->hin_ln_b, net->eps_in, t);
    solc_linear_f32(t, Db, net->hin_w, net->hin_b, x, B, d, Db, threads);
    layer_norm(e, B, Db, net->tin_ln_w, net->tin_ln_b, net->eps_in, t);
    solc_linear_f32(t, Db, net->tin_w, net->tin_b, y, B, d, Db, threads);
    add(x, y, B * d);
    solc_linear_f32(s, net->n_scalars, net->sc1_w, net->sc1_b, t, B, net->scalar_hidden, net->n_scalars, threads);
    gelu(t, B * net->scalar_hidden);
    solc_linear_f32(t, net->scalar_hidden, net->sc2_w, net->sc2_b, y, B, d, net->scalar_hidden, threads);
    add(x, y, B * d);
    for (long b = 0; b < B; b++) add(x + b * d, net->action_emb + prev[b] * d, d);

    for (long l = 0; l < net->n_layers; l++) {
        const solc_policy_layer *L = net->layers + l;
        attention(net, L, x, y, t, att, scores, pos, threads);
        layer_norm(x, B, d, L->ln2_w, L->ln2_b, net->eps_block, y);
        solc_linear_f32(y, d, L->fc1_w, L->fc1_b, t, B, net->ff, d, threads);
        gelu(t, B * net->ff);
        solc_linear_f32(t, net->ff, L->fc2_w, L->fc2_b, y, B, d, net->ff, threads);
        add(x, y, B * d);
    }
    layer_norm(x, B, d, net->norm_w, net->norm_b, net->eps_out, y);
    solc_linear_f32(y, d, net->bud_w, net->bud_b, budget, B, 3, d, threads);
    solc_linear_f32(y, d, net->act_w, net->act_b, logits, B, net->n_actions, d, threads);
}

/* One step of every row: h, e [B, d_base], s [B, n_scalars], prev [B] (action index; n_actions = none
 * yet), pos (the cache position this step writes); out: logits [B, n_actions] (the raw action head) and
 * budget [B, 3]. */
void solc_policy_step(const solc_policy_net *net, const float *h, const float *e, const float *s, const long *prev,
                      long pos, float *logits, float *budget, int threads) {
    forward(net, h, e, s, prev, pos, logits, budget, threads);
}

/* -- a whole decision: PolicyNet.forward's budget prior and guard, then PolicySource's pick ---------------
 * Each line below is the torch expression it stands for (runtime/policy.py), computed in the same dtype and
 * order, element by element: the guard's fp64 mask has the bits of `budget_guard` (the PPO update recomputes
 * it in torch over the stored scalars, and the two must agree on every action). */
typedef struct {
    long anchored, guarded, n_actions;
    const float *costs;     /* [A, 3] the budget table (cost_table) */
    const float *lo, *hi;   /* [3] cost_lo, cost_hi */
    const float *kappa;     /* [3] softplus(sharpness) * enabled_axes (anchored) */
    const double *guard_costs;  /* [A] the relative cost of each action (the guard's) */
    const double *costs64;  /* [A, 3] cost_table64 (the running deviations) */
    double band;
    float *logits, *budget, *s32;  /* scratch: [B, A], [B, 3], [B, 8] */
} solc_policy_prior;

static float max_nan(float a, float b) { return a != a || b != b ? NAN : (a > b ? a : b); }
static float min_nan(float a, float b) { return a != a || b != b ? NAN : (a < b ? a : b); }
static double clamp0(double a) { return a != a ? a : (a < 0 ? 0 : a); }

static void prior_logits(const solc_policy_prior *pr, const float *s, const float *budget, float *logits,
                         float temperature) {
    const long A = pr->n_actions;
    if (pr->anchored) {  /* budget_anchor(scalars, lo, hi) + budget; logits = raw - sum(kappa (cost - anchor)^2) */
        float left = 1.0f - s[0];
        left = left != left ? left : (left < 1e-3f ? 1e-3f : left);
        float anchor[3];
        for (int k = 0; k < 3; k++) {
            float need = s[2 + k] - s[5 + k] / left;
            anchor[k] = min_nan(max_nan(need, pr->lo[k]), pr->hi[k]) + budget[k];
        }
        for (long a = 0; a < A; a++) {
            float sum = 0;
            for (int k = 0; k < 3; k++) {
                float diff = pr->costs[a * 3 + k] - anchor[k];
                sum += diff * diff * pr->kappa[k];
            }
            logits[a] = (logits[a] - sum) / temperature;
        }
    } else {  /* logits = raw + budget @ costs.T */
        for (long a = 0; a < A; a++) {
            float dot = 0;
            for (int k = 0; k < 3; k++) dot += budget[k] * pr->costs[a * 3 + k];
            logits[a] = (logits[a] + dot) / temperature;
        }
    }
}

/* budget_guard: logits of the actions that would take the episode off its band -> GUARDED_LOGIT */
static void guard(const solc_policy_prior *pr, const double *s, long horizon, float *logits) {
    const long A = pr->n_actions;
    const double *c = pr->guard_costs, progress = s[0], target = s[2], dev = s[5], band = pr->band;
    double lo = c[0], hi = c[0];
    for (long a = 1; a < A; a++) {
        lo = c[a] < lo || c[a] != c[a] ? c[a] : lo;
        hi = c[a] > hi || c[a] != c[a] ? c[a] : hi;
    }
    double left = clamp0((1 - progress) - 1.0 / horizon), least = INFINITY;
    double miss[A];
    for (long a = 0; a < A; a++) {
        double after = dev + (c[a] - target) / horizon;
        double lo_end = after + left * (lo - target), hi_end = after + left * (hi - target);
        miss[a] = clamp0(fabs(after) - band) + clamp0(lo_end - band) + clamp0(-band - hi_end);
        least = miss[a] < least || miss[a] != miss[a] ? miss[a] : least;  /* a NaN is the minimum, as in torch */
    }
    for (long a = 0; a < A; a++)
        if (!(miss[a] <= least + 1e-12)) logits[a] = -1e9f;
}

/* One decision of every row. In: step (of horizon), pos (the cache position it writes), h, e [B, d_base], dense [B] (bool bytes), targets and
 * deviations [B, 3], prev [B], u [B] uniforms in [0, 1) (NULL: greedy), the temperature, the dense action.
 * Out: scalars [B, 8] (what the network read, fp64), actions [B], logp [B] (0 on dense steps), the new
 * deviations [B, 3]. */
void solc_policy_decide(const solc_policy_net *net, const solc_policy_prior *pr, long step, long pos, long horizon,
                        const float *h, const float *e, const unsigned char *dense, const double *targets,
                        const double *deviations, const long *prev, const double *u, float temperature,
                        long dense_index, double *scalars, long *actions, double *logp, double *new_deviations,
                        int threads) {
    const long B = net->B, A = pr->n_actions;
    const double progress = (double)step / horizon;
    for (long b = 0; b < B; b++) {  /* policy_scalars, and their fp32 copy for the network */
        double *sb = scalars + b * 8;
        sb[0] = progress;
        sb[1] = dense[b] ? 1.0 : 0.0;
        for (int k = 0; k < 3; k++) sb[2 + k] = targets[b * 3 + k], sb[5 + k] = deviations[b * 3 + k];
        for (int k = 0; k < 8; k++) pr->s32[b * 8 + k] = (float)sb[k];
    }
    forward(net, h, e, pr->s32, prev, pos, pr->logits, pr->budget, threads);
    for (long b = 0; b < B; b++) {
        float *lg = pr->logits + b * A;
        prior_logits(pr, pr->s32 + b * 8, pr->budget + b * 3, lg, temperature);
        if (pr->guarded) guard(pr, scalars + b * 8, horizon, lg);
        /* log_softmax in fp64, then argmax (the first maximum) or the inverse CDF at u */
        double top = -INFINITY, total = 0, lp[A];
        long pick = 0;
        for (long a = 0; a < A; a++) top = (double)lg[a] > top ? (double)lg[a] : top;
        for (long a = 0; a < A; a++) total += exp((double)lg[a] - top);
        double log_total = log(total);
        for (long a = 0; a < A; a++) lp[a] = (double)lg[a] - top - log_total;
        if (!u) {
            for (long a = 1; a < A; a++) pick = lp[a] > lp[pick] ? a : pick;
        } else {
            double cdf[A], acc = 0;
            for (long a = 0; a < A; a++) cdf[a] = acc += exp(lp[a]);
            double v = u[b] * cdf[A - 1];
            while (pick < A - 1 && cdf[pick] < v) pick++;
        }
        long action = dense[b] ? dense_index : pick;
        actions[b] = action;
        logp[b] = dense[b] ? 0.0 : lp[action];
        for (int k = 0; k < 3; k++) {
            double step_dev = (pr->costs64[action * 3 + k] - targets[b * 3 + k]) / horizon;
            new_deviations[b * 3 + k] = deviations[b * 3 + k] + (dense[b] ? 0.0 : step_dev);
        }
    }
}
