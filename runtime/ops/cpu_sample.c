/* generate's top-p (nucleus) mask on the CPU (runtime/generate.py `_Sampler`), in place over the batch's
 * tempered and top-k-masked fp32 logits.
 *
 * Why: the torch form sorts the whole vocabulary for it (49152 fp32 logits with their indices: 3.3 ms a
 * row on the dev machine, a quarter of a SmolLM2 decode step; ~60 ms for 16 rows). Here a row is two
 * passes over its logits (max; normalizer and its mass by 1-nat bins below the top), then only the head
 * of the distribution that holds the nucleus is selected and sorted: of the tokens within the bins that
 * reach top_p, 256, grown 8x until their mass reaches top_p.
 *
 * The nucleus: in descending order of the logits, a token stays while the softmax mass before it is
 * below top_p (the smallest prefix reaching top_p). The mass is summed in double over fp32 exps, so the
 * boundary is the exact one to ~1e-7 of mass; the torch form sums in fp32 (its cumsum over thousands of
 * tail tokens drifts by ~1e-5), so the two can put a token whose prefix mass is that close to top_p on
 * different sides. Ties in the order go by index (torch's sort leaves them unspecified). Rows are
 * independent (batch invariance). */
#include <math.h>
#include <stdlib.h>

typedef struct { float l, w; long i; } entry;  /* a logit, its exp(l - max), its index */

/* descending by value, then ascending by index */
static int before(const entry *a, const entry *b) { return a->l > b->l || (a->l == b->l && a->i < b->i); }

static int cmp_entry(const void *x, const void *y) {
    const entry *a = x, *b = y;
    return before(a, b) ? -1 : (before(b, a) ? 1 : 0);
}

/* reorders e[0..n) so that its first m entries are the m first in `before` order (quickselect) */
static void select_head(entry *e, long n, long m) {
    long lo = 0, hi = n - 1;
    while (lo < hi) {
        entry pivot = e[lo + (hi - lo) / 2];
        long i = lo, j = hi;
        while (i <= j) {
            while (before(&e[i], &pivot)) i++;
            while (before(&pivot, &e[j])) j--;
            if (i <= j) { entry t = e[i]; e[i] = e[j]; e[j] = t; i++; j--; }
        }
        if (m - 1 <= j) hi = j;
        else if (m - 1 >= i) lo = i;
        else return;
    }
}

/* The candidates less than `span` below the top (top - l < span), with their exp(l - top). */
static long candidates(const float *l, long V, float top, float span, entry *e) {
    long n = 0;
    for (long i = 0; i < V; i++)
        if (top - l[i] < span) e[n].l = l[i], e[n].w = expf(l[i] - top), e[n].i = i, n++;
    return n;
}

/* The selection first runs over the tokens less than `span` nats below the top, where span is the
 * smallest whole number whose tokens hold top_p of the mass (summed by 1-nat bins in the normalizer's
 * pass; a language model's nucleus sits a few nats below its top token, among hundreds of tokens), or
 * HEAD_SPAN where none up to it does. The tokens below come after every candidate in the order, so where
 * the candidates' mass reaches top_p they are all dropped. Only where it does not (top_p above 1 minus
 * what lies more than HEAD_SPAN below, under ~1e-4 for a 49152-token vocabulary) does the row run again
 * over every token. */
#define HEAD_SPAN 20

static void top_p(float *l, long V, double p_max, entry *e) {
    float top = -INFINITY;
    for (long i = 0; i < V; i++) top = l[i] > top ? l[i] : top;
    if (top == -INFINITY || top != top) return;
    double total = 0, bins[HEAD_SPAN] = {0};
    for (long i = 0; i < V; i++) {
        float w = expf(l[i] - top), below = top - l[i];
        total += w;
        if (below < HEAD_SPAN) bins[(int)below] += w;
    }
    int span = HEAD_SPAN;
    double head = 0;
    for (int k = 0; k < HEAD_SPAN; k++)
        if ((head += bins[k]) / total >= p_max + 1e-9) { span = k + 1; break; }  /* the margin: summing orders */
    for (int every = 0; every < 2; every++) {
        const float cut = every ? INFINITY : (float)span;
        const long n = candidates(l, V, top, cut, e);
        for (long m = n < 256 ? n : 256;; m = 8 * m < n ? 8 * m : n) {
            select_head(e, n, m);
            qsort(e, m, sizeof *e, cmp_entry);
            double c = 0;  /* the mass before e[j], in double: the nucleus to ~1e-7 (expf's rounding) */
            long keep = m;
            for (long j = 0; j < m; j++) {
                if (c >= p_max) { keep = j; break; }
                c += e[j].w / total;
            }
            if (keep < m || (m == n && c >= p_max)) {  /* reached: drop the rest, the tokens past the cut too */
                for (long j = keep; j < n; j++) l[e[j].i] = -INFINITY;
                for (long i = 0; i < V; i++)
                    if (!(top - l[i] < cut)) l[i] = -INFINITY;
                return;
            }
            if (m == n) break;  /* the candidates do not reach top_p */
        }
    }
}

/* l [B, V] in place; entries: scratch of B * V `entry` (solc_sample_entry_size() bytes each). p_max >= 1 or NaN: nothing. */
void solc_top_p_rows(float *l, long B, long V, double p_max, void *entries, int threads) {
    if (!(p_max < 1.0)) return;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && B > 1)
    for (long b = 0; b < B; b++) top_p(l + b * V, V, p_max, (entry *)entries + b * V);
}

long solc_sample_entry_size(void) { return sizeof(entry); }
