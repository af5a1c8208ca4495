/* generate's top-p (nucleus) mask on the CPU (runtime/generate.py `_sample`), in place over the batch's
 * tempered and top-k-masked fp32 logits.
 *
 * Why: the torch form sorts the whole vocabulary for it (49152 fp32 logits with their indices: 3.4 ms a
 * row on the dev machine, a quarter of a SmolLM2 decode step; ~50 ms for 16 rows). Here a row is two
 * passes over its logits (max, then normalizer and candidates), then only the head of the distribution
 * that can hold the nucleus is selected and sorted: 256 tokens, grown 8x until their mass reaches top_p.
 *
 * Semantics are the torch form's: in descending order of l, p = softmax(l) in fp32, and a token is
 * dropped (l = -inf) once the mass before it, cumsum(p) - p in fp32, reaches top_p, so the smallest
 * prefix reaching top_p stays. The normalizer is summed in double and rounded once (torch sums in fp32 in
 * its own order), so a token whose prefix mass is within rounding of top_p may fall on the other side;
 * ties in the order are broken by index (torch's sort leaves them unspecified). Rows are independent
 * (batch invariance). */
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

static void top_p(float *l, long V, float p_max, entry *e) {
    float top = -INFINITY;
    for (long i = 0; i < V; i++) top = l[i] > top ? l[i] : top;
    if (top == -INFINITY || top != top) return;
    double total = 0;
    long n = 0;  /* the tokens still in the running, with their exp(l - max) */
    for (long i = 0; i < V; i++)
        if (l[i] > -INFINITY) {
            float w = expf(l[i] - top);
            total += w;
            e[n].l = l[i], e[n].w = w, e[n].i = i, n++;
        }
    const float sum = (float)total;
    for (long m = n < 256 ? n : 256;; m = 8 * m < n ? 8 * m : n) {
        select_head(e, n, m);
        qsort(e, m, sizeof *e, cmp_entry);
        float c = 0;
        long keep = -1;
        for (long j = 0; j < m; j++) {
            float p = e[j].w / sum;
            c += p;
            if (c - p >= p_max) { keep = j; break; }
        }
        if (keep >= 0 || m == n) {
            if (keep < 0) return;  /* the whole distribution is the nucleus */
            for (long j = keep; j < n; j++) l[e[j].i] = -INFINITY;
            return;
        }
    }
}

/* l [B, V] in place; entries: scratch of B * V `entry` (solc_sample_entry_size() bytes each). p_max >= 1 or NaN: nothing. */
void solc_top_p_rows(float *l, long B, long V, float p_max, void *entries, int threads) {
    if (!(p_max < 1.0f)) return;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && B > 1)
    for (long b = 0; b < B; b++) top_p(l + b * V, V, p_max, (entry *)entries + b * V);
}

long solc_sample_entry_size(void) { return sizeof(entry); }
