// Index arithmetic shared by the kernels (conv.cu, pooling.cu, lrn.cu, loss.cu): a division that stays 32-bit
// where it can, and the window arithmetic of the gathers (col2im, max_pool_backward),
// where one thread per input element sums over the outputs whose windows cover it.
#pragma once

// a / b and a % b, for a >= 0 and b > 0. A GPU has no 64-bit integer division: its
// software routine costs several times the 32-bit one, so sizes that fit in 32 bits
// (every tensor under 2^32 elements) take the 32-bit one; larger ones stay exact.
struct QuotientRemainder {
    long long quotient, remainder;
};

__device__ inline QuotientRemainder divide(long long a, long long b) {
    long long q = ((unsigned long long)a | (unsigned long long)b) >> 32 == 0
                      ? (long long)((unsigned int)a / (unsigned int)b)
                      : a / b;
    return {q, a - q * b};
}

// The outputs o = first..last (none when first > last) whose window covers position
// p of the padded input along one axis: o*stride <= p < o*stride + K, and o < O.
struct CoveringOutputs {
    long long first, last;
};

__device__ inline CoveringOutputs covering_outputs(long long p, long long K, long long stride, long long O) {
    return {p < K ? 0 : divide(p - K, stride).quotient + 1, min(divide(p, stride).quotient, O - 1)};
}
