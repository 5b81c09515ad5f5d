// im2col and col2im for conv.py. Layouts: x (N, C, H, W); cols (C, KH, KW, N, OH, OW),
// the batch inside the columns so each group of the convolution is one GEMM.
// Indices are 64-bit and every kernel is a grid-stride loop, so any size works.

#include "window.cuh"

template <typename T>
__global__ void im2col(const T* x, T* cols, long long total, long long N, long long C, long long H,
                       long long W, long long KH, long long KW, long long stride, long long pad, long long OH,
                       long long OW) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long ow = i % OW;
        long long oh = (i / OW) % OH;
        long long n = (i / (OW * OH)) % N;
        long long kw = (i / (OW * OH * N)) % KW;
        long long kh = (i / (OW * OH * N * KW)) % KH;
        long long c = i / (OW * OH * N * KW * KH);
        long long h = oh * stride - pad + kh;
        long long w = ow * stride - pad + kw;
        cols[i] = (h >= 0 && h < H && w >= 0 && w < W) ? x[((n * C + c) * H + h) * W + w] : T(0);
    }
}

// One thread per input element: it gathers every patch entry that copied it, so
// no two threads write one address (no atomics, the same sum order every run).
template <typename T>
__global__ void col2im(const T* cols, T* x, long long total, long long N, long long C, long long H,
                       long long W, long long KH, long long KW, long long stride, long long pad, long long OH,
                       long long OW) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long w = i % W + pad;  // coordinates in the padded input
        long long h = (i / W) % H + pad;
        long long c = (i / (W * H)) % C;
        long long n = i / (W * H * C);
        CoveringOutputs rows = covering_outputs(h, KH, stride, OH);
        CoveringOutputs columns = covering_outputs(w, KW, stride, OW);
        T sum = T(0);
        for (long long oh = rows.first; oh <= rows.last; ++oh) {
            long long kh = h - oh * stride;
            for (long long ow = columns.first; ow <= columns.last; ++ow) {
                long long kw = w - ow * stride;
                sum += cols[((((c * KH + kh) * KW + kw) * N + n) * OH + oh) * OW + ow];
            }
        }
        x[i] = sum;
    }
}

#define MINIDL_CONV_KERNELS(T)                                                                              \
    template __global__ void im2col<T>(const T*, T*, long long, long long, long long, long long, long long,  \
                                       long long, long long, long long, long long, long long, long long);    \
    template __global__ void col2im<T>(const T*, T*, long long, long long, long long, long long, long long,  \
                                       long long, long long, long long, long long, long long, long long);
MINIDL_CONV_KERNELS(float)
MINIDL_CONV_KERNELS(double)
