// The crossings between devices of transfer.py (Exchange, ConcatTo) where the GPUs reach each other's memory
// (peer access: NVLink). Both view C-contiguous arrays joined along an axis as rows: an (N, C, ...) array joined
// on axis 1 is N rows, a part's row C_i * inner elements, the joined row C * inner. One thread per element
// written, neighbouring threads on neighbouring elements (coalesced, across the link too).

#include "half.cuh"

// out's rows = a's row then b's row: the joined maps made in one pass, one part read from the other GPU
// (where a CUDA copy would take a pass for each part). total: out's elements.
template <typename T>
__global__ void join_rows(const T* a, long long a_width, const T* b, long long b_width, T* out, long long total) {
    const long long width = a_width + b_width;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const long long row = i / width, j = i - row * width;
        out[i] = j < a_width ? a[row * a_width + j] : b[row * b_width + (j - a_width)];
    }
}

// out (rows of `width`) = a's part + b's part, each part the `width` elements from `offset` of every row of
// `pitch`: a part's gradient summed from two joined gradients, one read from the other GPU, in one pass (where a
// copy across would take one and the sum another). 16-bit values are added in float and rounded once.
template <typename T>
__global__ void add_row_parts(const T* a, long long a_offset, long long a_pitch, const T* b, long long b_offset,
                              long long b_pitch, T* out, long long width, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const long long row = i / width, j = i - row * width;
        out[i] = from_acc<T>(to_acc(a[a_offset + row * a_pitch + j]) + to_acc(b[b_offset + row * b_pitch + j]));
    }
}
