// The tile copies of winograd.py on the GPU. Layouts: maps x (N, C, H, W); tiles
// (t, t, N, TH, TW, C), the position in the tile first, so that each position's
// products are one GEMM, as on the CPU. Tile (i, j) covers the rows i*m - pad ..
// i*m - pad + t - 1 of x and the columns likewise; t = m + r - 1 for input tiles of
// r x r filters (neighbours overlap by r - 1), t = m for output blocks. Indices are
// 64-bit and every kernel is a grid-stride loop. T, the maps' type, is float, double, __half or
// __nv_bfloat16; the tiles are Acc<T> (half.cuh: float for the 16-bit types, T otherwise), as winograd.py
// transforms and multiplies them in float32: gather_tiles widens (exactly), scatter_tiles sums in Acc<T> and
// rounds once when it stores. The float and double instantiations are the code of before.

#include "half.cuh"
#include "window.cuh"

// One thread per tile element: a copy of its pixel, zero outside the maps.
template <typename T>
__global__ void gather_tiles(const T* x, typename Acc<T>::type* tiles, long long total, long long N,
                             long long C, long long H, long long W, long long t, long long m, long long pad,
                             long long TH, long long TW) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long c = i % C;
        long long tw = (i / C) % TW;
        long long th = (i / (C * TW)) % TH;
        long long n = (i / (C * TW * TH)) % N;
        long long b = (i / (C * TW * TH * N)) % t;
        long long a = i / (C * TW * TH * N * t);
        long long h = th * m - pad + a;
        long long w = tw * m - pad + b;
        tiles[i] = (h >= 0 && h < H && w >= 0 && w < W) ? to_acc(x[((n * C + c) * H + h) * W + w])
                                                        : typename Acc<T>::type(0);
    }
}

// The adjoint: one thread per pixel sums the elements of every tile that holds it
// (as col2im does for patches), so no two threads write one address.
template <typename T>
__global__ void scatter_tiles(const typename Acc<T>::type* tiles, T* x, long long total, long long N,
                              long long C, long long H, long long W, long long t, long long m, long long pad,
                              long long TH, long long TW) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long w = i % W + pad;  // coordinates on the tile grid
        long long h = (i / W) % H + pad;
        long long c = (i / (W * H)) % C;
        long long n = i / (W * H * C);
        CoveringOutputs rows = covering_outputs(h, t, m, TH);
        CoveringOutputs columns = covering_outputs(w, t, m, TW);
        typename Acc<T>::type sum = 0;
        for (long long th = rows.first; th <= rows.last; ++th) {
            long long a = h - th * m;
            for (long long tw = columns.first; tw <= columns.last; ++tw) {
                long long b = w - tw * m;
                sum += tiles[((((a * t + b) * N + n) * TH + th) * TW + tw) * C + c];
            }
        }
        x[i] = from_acc<T>(sum);
    }
}

#define MINIDL_WINOGRAD_KERNELS(T)                                                                    \
    template __global__ void gather_tiles<T>(const T*, typename Acc<T>::type*, long long, long long,       \
                                             long long, long long, long long, long long, long long,       \
                                             long long, long long, long long);                            \
    template __global__ void scatter_tiles<T>(const typename Acc<T>::type*, T*, long long, long long,      \
                                              long long, long long, long long, long long, long long,      \
                                              long long, long long, long long);
MINIDL_WINOGRAD_KERNELS(float)
MINIDL_WINOGRAD_KERNELS(double)
MINIDL_WINOGRAD_KERNELS(__half)
MINIDL_WINOGRAD_KERNELS(__nv_bfloat16)
