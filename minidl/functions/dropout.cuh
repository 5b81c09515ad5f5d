// A dropout mask's uniforms (dropout.cu, and the fully connected layer's fused bias + ReLU +
// dropout in activation.cu): one definition, so every kernel draws the same masks as
// dropout.py's `uniforms` in NumPy.
#pragma once

// splitmix64's output function at key + (i + 1) * its increment (the golden
// ratio): a well-mixed 64-bit value per element and key, of which the top 24
// bits make a float uniform in [0, 1), as exact as a float32 draw.
__device__ inline float dropout_uniform(unsigned long long key, long long i) {
    unsigned long long z = key + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f);
}
