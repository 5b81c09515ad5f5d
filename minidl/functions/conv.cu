// im2col and col2im for conv.py. Layouts: x (N, C, H, W); cols (C, KH, KW, N, OH, OW),
// the batch inside the columns so each group of the convolution is one GEMM.
// Indices are 64-bit and every kernel is a grid-stride loop, so any size works; the
// divisions that split an index into coordinates are 32-bit wherever the sizes allow
// (window.cuh's divide), and im2col splits one index per patch, not per element.

#include "half.cuh"
#include "window.cuh"

// One thread per patch (c, n, oh, ow) copies its KH*KW elements, which lie N*OH*OW apart in
// cols: each step of the patch is a run of consecutive addresses across the threads of a warp.
// `total` is cols' size, as every launcher passes it; the threads' work is C*N*OH*OW patches.
template <typename T>
__global__ void im2col(const T* x, T* cols, long long total, long long N, long long C, long long H,
                       long long W, long long KH, long long KW, long long stride, long long pad, long long OH,
                       long long OW) {
    long long patch_stride = N * OH * OW;  // between a patch's elements in cols
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < C * patch_stride;
         i += (long long)blockDim.x * gridDim.x) {
        QuotientRemainder c = divide(i, patch_stride);  // c.remainder: (n*OH + oh)*OW + ow
        QuotientRemainder row = divide(c.remainder, OW);
        QuotientRemainder n = divide(row.quotient, OH);
        long long top = n.remainder * stride - pad, left = row.remainder * stride - pad;
        const T* plane = x + (n.quotient * C + c.quotient) * H * W;
        T* out = cols + c.quotient * KH * KW * patch_stride + c.remainder;
        for (long long kh = 0; kh < KH; ++kh) {
            long long h = top + kh;
            bool row_inside = h >= 0 && h < H;
            for (long long kw = 0; kw < KW; ++kw, out += patch_stride) {
                long long w = left + kw;
                *out = row_inside && w >= 0 && w < W ? plane[h * W + w] : from_acc<T>(0);
            }
        }
    }
}

// One thread per input element: it gathers every patch entry that copied it, so
// no two threads write one address (no atomics, the same sum order every run). A 16-bit sum is
// in float, rounded once.
template <typename T>
__global__ void col2im(const T* cols, T* x, long long total, long long N, long long C, long long H,
                       long long W, long long KH, long long KW, long long stride, long long pad, long long OH,
                       long long OW) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        QuotientRemainder row = divide(i, W);
        QuotientRemainder plane = divide(row.quotient, H);
        QuotientRemainder n = divide(plane.quotient, C);  // n.remainder: the channel
        long long h = plane.remainder + pad, w = row.remainder + pad;  // coordinates in the padded input
        CoveringOutputs rows = covering_outputs(h, KH, stride, OH);
        CoveringOutputs columns = covering_outputs(w, KW, stride, OW);
        const T* patches = cols + (n.remainder * KH * KW * N + n.quotient) * OH * OW;  // cols[c, 0, 0, n]
        long long tap_stride = N * OH * OW;  // between (kh, kw) and the next kw in cols
        typename Acc<T>::type sum = 0;
        for (long long oh = rows.first; oh <= rows.last; ++oh) {
            long long kh = h - oh * stride;
            for (long long ow = columns.first; ow <= columns.last; ++ow) {
                long long kw = w - ow * stride;
                sum += to_acc(patches[(kh * KW + kw) * tap_stride + oh * OW + ow]);
            }
        }
        x[i] = from_acc<T>(sum);
    }
}

#define MINIDL_CONV_KERNELS(T)                                                                              \
    template __global__ void im2col<T>(const T*, T*, long long, long long, long long, long long, long long,  \
                                       long long, long long, long long, long long, long long, long long);    \
    template __global__ void col2im<T>(const T*, T*, long long, long long, long long, long long, long long,  \
                                       long long, long long, long long, long long, long long, long long);
MINIDL_CONV_KERNELS(float)
MINIDL_CONV_KERNELS(double)
MINIDL_CONV_KERNELS(__half)
MINIDL_CONV_KERNELS(__nv_bfloat16)
