// The momentum update of optim.py, fused: one launch updates every parameter of a
// device, where the elementwise path takes six operations per parameter (each a
// launch and a full read or write of w, g or v). The parameters come as tables of
// pointers (w, g, v: one entry per parameter) and `ends`, the running total of
// their sizes: element i of the concatenation is element i - ends[k-1] of
// parameter k, the first k with i < ends[k]. The order of the arithmetic is the
// NumPy path's, (m*v - decay*w) - lr*g, so results agree (up to NVRTC's
// contraction into FMAs on a real GPU).
//
// `multiplier` (one element on the device) scales every gradient first: 1, or 1/S under
// dynamic loss scaling (loss_scale.py), a power of two, so exact.
//
// The step's verdict stays on the device: `halt` (one element, computed by the
// caller on the device) leaves every parameter alone where it is not finite, and
// find_nonfinite makes the gradients' share of it. A finite gradient can still
// overflow the update (a huge lr): nonfinite[slots[k]] gets the step's number
// where parameter k gets a weight or velocity that is NaN or infinite, unless an
// earlier step already left its number there (many threads may store the same
// number; the caller zeroes the row after reading it).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// The parameter that element i of the concatenation belongs to: a binary search of the
// running sizes (a device has tens of parameters).
__device__ inline long long part_of(const unsigned long long* ends, long long count, long long i) {
    long long lo = 0, hi = count - 1;
    while (lo < hi) {
        long long mid = (lo + hi) / 2;
        if ((unsigned long long)i < ends[mid]) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

// The update of every element; where `copy` is not null, each new weight is also stored there in the
// 16-bit dtype its layers compute in (mixed precision: the copy the next forward reads, made in this
// pass instead of by a cast per parameter; on a skipped step neither changes).
template <typename T, typename Copy>
__device__ inline void momentum_pass(T* const* w, const T* const* g, T* const* v, Copy* const* copy,
                                     const unsigned long long* ends, const unsigned long long* slots,
                                     unsigned long long* nonfinite, const T* halt, const T* multiplier,
                                     long long step, long long count, long long total, T momentum, T decay, T lr) {
    if (!isfinite(halt[0])) return;  // a skipped step
    T unscale = multiplier[0];
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long k = part_of(ends, count, i);
        long long j = i - (k ? (long long)ends[k - 1] : 0);
        T velocity = momentum * v[k][j] - decay * w[k][j] - lr * (g[k][j] * unscale);
        T weight = w[k][j] + velocity;
        v[k][j] = velocity;
        w[k][j] = weight;
        if (copy != nullptr) copy[k][j] = Copy(static_cast<float>(weight));
        if ((!isfinite(velocity) || !isfinite(weight)) && nonfinite[slots[k]] == 0)
            nonfinite[slots[k]] = (unsigned long long)step;
    }
}

template <typename T>
__global__ void momentum_update(T* const* w, const T* const* g, T* const* v, const unsigned long long* ends,
                                const unsigned long long* slots, unsigned long long* nonfinite, const T* halt,
                                const T* multiplier, long long step, long long count, long long total, T momentum,
                                T decay, T lr) {
    momentum_pass<T, T>(w, g, v, nullptr, ends, slots, nonfinite, halt, multiplier, step, count, total, momentum,
                        decay, lr);
}

// The same, also writing each weight's float16 (or bfloat16) copy: `copy` is a table like w's.
template <typename T>
__global__ void momentum_update_to_half(T* const* w, const T* const* g, T* const* v, __half* const* copy,
                                        const unsigned long long* ends, const unsigned long long* slots,
                                        unsigned long long* nonfinite, const T* halt, const T* multiplier,
                                        long long step, long long count, long long total, T momentum, T decay,
                                        T lr) {
    momentum_pass<T, __half>(w, g, v, copy, ends, slots, nonfinite, halt, multiplier, step, count, total,
                             momentum, decay, lr);
}

template <typename T>
__global__ void momentum_update_to_bfloat16(T* const* w, const T* const* g, T* const* v,
                                            __nv_bfloat16* const* copy, const unsigned long long* ends,
                                            const unsigned long long* slots, unsigned long long* nonfinite,
                                            const T* halt, const T* multiplier, long long step, long long count,
                                            long long total, T momentum, T decay, T lr) {
    momentum_pass<T, __nv_bfloat16>(w, g, v, copy, ends, slots, nonfinite, halt, multiplier, step, count, total,
                                    momentum, decay, lr);
}

// found[0] and noted[0] (zeroed by the caller, or kept NaN) become NaN where any element of the gradients
// is NaN or infinite (x - x: NaN for both; many threads may store it). Two cells, so that a verdict kept
// over several steps and the step's own one are both made in this pass, not by a copy after it.
template <typename T>
__global__ void find_nonfinite(const T* const* g, const unsigned long long* ends, T* found, T* noted,
                               long long count, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long k = part_of(ends, count, i);
        T x = g[k][i - (k ? (long long)ends[k - 1] : 0)];
        if (!isfinite(x)) found[0] = noted[0] = x - x;
    }
}

template __global__ void momentum_update<float>(float* const*, const float* const*, float* const*,
                                                const unsigned long long*, const unsigned long long*,
                                                unsigned long long*, const float*, const float*, long long,
                                                long long, long long, float, float, float);
template __global__ void momentum_update<double>(double* const*, const double* const*, double* const*,
                                                 const unsigned long long*, const unsigned long long*,
                                                 unsigned long long*, const double*, const double*, long long,
                                                 long long, long long, double, double, double);
// the updates that write 16-bit copies, for master weights T
#define MINIDL_MOMENTUM_COPY(NAME, T, COPY)                                                                     \
    template __global__ void NAME<T>(T* const*, const T* const*, T* const*, COPY* const*,                      \
                                     const unsigned long long*, const unsigned long long*, unsigned long long*, \
                                     const T*, const T*, long long, long long, long long, T, T, T);
MINIDL_MOMENTUM_COPY(momentum_update_to_half, float, __half)
MINIDL_MOMENTUM_COPY(momentum_update_to_bfloat16, float, __nv_bfloat16)
MINIDL_MOMENTUM_COPY(momentum_update_to_half, double, __half)
MINIDL_MOMENTUM_COPY(momentum_update_to_bfloat16, double, __nv_bfloat16)
#undef MINIDL_MOMENTUM_COPY
template __global__ void find_nonfinite<float>(const float* const*, const unsigned long long*, float*, float*,
                                               long long, long long);
template __global__ void find_nonfinite<double>(const double* const*, const unsigned long long*, double*, double*,
                                                long long, long long);
