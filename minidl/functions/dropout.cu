// Inverted dropout for dropout.py: y = x * mask, mask = scale (1/(1-p)) where the
// element's uniform u >= p, else 0. The uniforms are not stored anywhere: each
// is a counter-based hash of the call's key and the element's index in the
// global batch, start + i (dropout.py's `uniforms` is the same hash in NumPy:
// one process, N ranks and the CPU draw the same masks). So forward
// and backward (the same kernel on gy) recompute the same mask, and one launch
// does what otherwise takes a random draw into memory, a comparison, a scaling
// and a product. The product x * (scale or 0), not a select, is the NumPy path's
// x * mask exactly (a NaN stays NaN where dropped).

#include "dropout.cuh"
#include "half.cuh"

// key: a long long (how a Python int is passed), used as its 64 bits; start:
// the global index of x[0]. The comparison is in float, as NumPy compares
// float32 uniforms with p. A 16-bit x is multiplied in float and rounded once
// (half.cuh); p and scale are then floats.
template <typename T>
__global__ void dropout_apply(const T* x, T* y, long long total, long long key, long long start,
                              typename Acc<T>::type p, typename Acc<T>::type scale) {
    typedef typename Acc<T>::type A;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        A mask = dropout_uniform((unsigned long long)key, start + i) >= (float)p ? scale : A(0);
        y[i] = from_acc<T>(to_acc(x[i]) * mask);
    }
}

template __global__ void dropout_apply<float>(const float*, float*, long long, long long, long long, float, float);
template __global__ void dropout_apply<double>(const double*, double*, long long, long long, long long, double,
                                               double);
template __global__ void dropout_apply<__half>(const __half*, __half*, long long, long long, long long, float,
                                               float);
template __global__ void dropout_apply<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, long long, long long,
                                                      long long, float, float);
