/* bfloat16 on the fp32 grid, shared by the kernels that round to it (cpu_mlp.c, cpu_block.c): torch's
x.to(bfloat16) rounds to nearest, ties to even, and the low-bit paths' definitions round there. */
#ifndef SOLC_CPU_BF16_H
#define SOLC_CPU_BF16_H

#include <stdint.h>
#include <string.h>

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

/* The bfloat16 bits of a value already on the bf16 grid. */
static inline uint16_t bf16_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return (uint16_t)(u >> 16);
}

/* bfloat16 bits -> fp32 (exact). */
static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#endif
