// Max pooling for pooling.py; x (N, C, H, W), y and argmax (N, C, OH, OW).
// argmax holds the window offset kh*K + kw of the maximum, the first in scan
// order on ties (strict >), the same rule as the NumPy path. A NaN is the
// maximum of its window (the first NaN), as in PyTorch. A 16-bit x is compared in float (half.cuh),
// its maximum stored as it was read; backward sums a 16-bit gradient in float, rounded once.

#include "half.cuh"
#include "window.cuh"

template <typename T>
__global__ void max_pool_forward(const T* x, T* y, int* argmax, long long total, long long C, long long H,
                                 long long W, long long OH, long long OW, long long K, long long stride,
                                 long long pad) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        QuotientRemainder row_ow = divide(i, OW), nc_oh = divide(row_ow.quotient, OH);
        long long ow = row_ow.remainder, oh = nc_oh.remainder, nc = nc_oh.quotient;
        const T* plane = x + nc * H * W;
        typename Acc<T>::type best = 0;
        int best_offset = -1;
        for (long long kh = 0; kh < K; ++kh) {
            long long h = oh * stride - pad + kh;
            for (long long kw = 0; kw < K; ++kw) {
                long long w = ow * stride - pad + kw;
                if (h < 0 || h >= H || w < 0 || w >= W) continue;  // padding: -infinity
                typename Acc<T>::type v = to_acc(plane[h * W + w]);
                if (best_offset < 0 || v > best || (isnan(v) && !isnan(best))) {
                    best = v;
                    best_offset = (int)(kh * K + kw);
                }
            }
        }
        y[i] = from_acc<T>(best);  // exact: a value of T
        argmax[i] = best_offset;
    }
}

// One thread per input element: it sums the gradients of the windows whose
// maximum it is. Each output has exactly one such element, so this is the
// scatter of the gradient, without atomics.
template <typename T>
__global__ void max_pool_backward(const T* gy, const int* argmax, T* gx, long long total, long long C,
                                  long long H, long long W, long long OH, long long OW, long long K,
                                  long long stride, long long pad) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        QuotientRemainder row_w = divide(i, W), nc_h = divide(row_w.quotient, H);
        long long w = row_w.remainder + pad;  // in padded coordinates
        long long h = nc_h.remainder + pad;
        long long nc = nc_h.quotient;
        CoveringOutputs rows = covering_outputs(h, K, stride, OH);
        CoveringOutputs columns = covering_outputs(w, K, stride, OW);
        typename Acc<T>::type sum = 0;
        for (long long oh = rows.first; oh <= rows.last; ++oh) {
            for (long long ow = columns.first; ow <= columns.last; ++ow) {
                long long o = (nc * OH + oh) * OW + ow;
                if (argmax[o] == (int)((h - oh * stride) * K + (w - ow * stride))) sum += to_acc(gy[o]);
            }
        }
        gx[i] = from_acc<T>(sum);
    }
}

#define MINIDL_POOLING_KERNELS(T)                                                                           \
    template __global__ void max_pool_forward<T>(const T*, T*, int*, long long, long long, long long, long long, \
                                                 long long, long long, long long, long long, long long);         \
    template __global__ void max_pool_backward<T>(const T*, const int*, T*, long long, long long, long long,     \
                                                  long long, long long, long long, long long, long long,         \
                                                  long long);
MINIDL_POOLING_KERNELS(float)
MINIDL_POOLING_KERNELS(double)
MINIDL_POOLING_KERNELS(__half)
MINIDL_POOLING_KERNELS(__nv_bfloat16)
