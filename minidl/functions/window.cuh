// The window arithmetic shared by the gathers of conv.cu (col2im) and pooling.cu
// (max_pool_backward): one thread per input element sums over the outputs whose
// windows cover it.
#pragma once

// The outputs o = first..last (none when first > last) whose window covers position
// p of the padded input along one axis: o*stride <= p < o*stride + K, and o < O.
struct CoveringOutputs {
    long long first, last;
};

__device__ inline CoveringOutputs covering_outputs(long long p, long long K, long long stride, long long O) {
    return {p < K ? 0 : (p - K) / stride + 1, min(p / stride, O - 1)};
}
