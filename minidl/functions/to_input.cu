// The network's input from uint8 crops, for to_input.py: one thread per output value.
// windows (N, crop, crop, 3) uint8: each crop's window as the image holds it, cut on the CPU but not
// mirrored (a mirrored copy is a strided one there, half the CPU's work); mean (size, size, 3), the
// training mean image; where (N, 3) int: each crop's top, left and mirror flag; shift (N, 3), each
// image's PCA lighting (zeros without). A mirrored crop reads its pixel and its mean from the column
// crop - 1 - x of the window. out (N, 3, crop, crop) = ((pixel - mean) + shift) * scale, each step
// rounded to float as the NumPy path rounds it in float32 (no product is followed by a sum: nothing to
// contract into an FMA). T, the output's type, is float, __half or __nv_bfloat16 (the compute dtype
// under fp16 and bf16, so that the first layer needs no cast): mean, shift and scale are float (Acc<T>)
// whatever T is, and a 16-bit value is the float result rounded once (half.cuh), as NumPy's float32
// result cast to the 16-bit dtype. Neighbouring threads write neighbouring values: the stores are
// coalesced.

#include "half.cuh"

template <typename T>
__global__ void crops_to_input(const unsigned char* windows, const typename Acc<T>::type* mean, const int* where,
                               const typename Acc<T>::type* shift, T* out, long long total, long long crop,
                               long long size, typename Acc<T>::type scale) {
    typedef typename Acc<T>::type A;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long x = i % crop, y = (i / crop) % crop, c = (i / (crop * crop)) % 3, n = i / (3 * crop * crop);
        long long top = where[3 * n], left = where[3 * n + 1];
        long long source = where[3 * n + 2] ? crop - 1 - x : x;  // the window's column this value comes from
        A pixel = A(windows[((n * crop + y) * crop + source) * 3 + c]);
        A value = pixel - mean[((top + y) * size + left + source) * 3 + c];
        value = value + shift[3 * n + c];
        out[i] = from_acc<T>(value * scale);
    }
}
