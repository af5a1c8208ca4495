/* The fixed summation order every solc CPU kernel uses (cpu_linear.c, cpu_mlp.c): 16 lane sums over k
(lane l takes k = l, l + 16, ...), then this one tree over the lanes plus the scalar tail. Kept in one
place so that the kernels cannot drift apart: a row's result must not depend on which kernel ran it. */
#ifndef SOLC_CPU_FIXED_ORDER_H
#define SOLC_CPU_FIXED_ORDER_H

/* The AVX2 (no AVX-512) builds get hand-written loops: there, GCC spills the 16-lane sums of the
generic loops (16 registers). Every path runs the same per-lane fmaf sequence, so the same bits. */
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define SOLC_AVX2 1
#include <immintrin.h>
#endif

#define LANES 16
#define COL_BLOCK 32

static inline float finish(const float *acc, float tail) {
    float s8[8], s4[4];
    for (int i = 0; i < 8; ++i) s8[i] = acc[i] + acc[i + 8];
    for (int i = 0; i < 4; ++i) s4[i] = s8[i] + s8[i + 4];
    return ((s4[0] + s4[2]) + (s4[1] + s4[3])) + tail;
}

#endif
