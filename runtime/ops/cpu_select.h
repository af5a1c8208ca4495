/* The k-th largest of a[0:n] (1 <= k <= n), by quickselect in place (a is reordered): the one selection
both kernels use, for page scores (cpu_attention.c, float) and for |x| keys (cpu_mlp.c, uint32). Ties need
no rule here: callers compare against the value it returns. */
#ifndef SOLC_CPU_SELECT_H
#define SOLC_CPU_SELECT_H

#define SOLC_KTH_LARGEST(name, type)                  \
    static type name(type *a, long n, long k) {       \
        long lo = 0, hi = n - 1, want = k - 1;        \
        while (lo < hi) {                             \
            type pivot = a[lo + (hi - lo) / 2];       \
            long i = lo, j = hi;                      \
            while (i <= j) {                          \
                while (a[i] > pivot) ++i;             \
                while (a[j] < pivot) --j;             \
                if (i <= j) {                         \
                    type t = a[i];                    \
                    a[i] = a[j];                      \
                    a[j] = t;                         \
                    ++i;                              \
                    --j;                              \
                }                                     \
            }                                         \
            if (want <= j) hi = j;                    \
            else if (want >= i) lo = i;               \
            else break;                               \
        }                                             \
        return a[want];                               \
    }

#endif
