// ReLU's backward for activation.py: gx = gy * (y > 0 ? scale : 0) in one pass, where CuPy
// would launch two elementwise kernels (the comparison, then the product) and write a mask
// in between. scale is 1, or dropout's 1/(1-p) after the fused bias + ReLU + dropout: there
// y > 0 exactly where the element was kept and positive, so the mask needs no hash. The
// product, not a select, so a NaN or infinite gradient where y <= 0 gives NaN as on the NumPy path.
// Every kernel here is instantiated for float, double, __half and __nv_bfloat16 (half.cuh): 16-bit
// values are computed in float and rounded once when stored.

#include "dropout.cuh"
#include "half.cuh"

// One element of ReLU's backward, rounded to T as it is stored
template <typename T>
__device__ __forceinline__ T relu_grad_of(T y, T gy, typename Acc<T>::type scale) {
    typedef typename Acc<T>::type A;
    return from_acc<T>(to_acc(gy) * (to_acc(y) > A(0) ? scale : A(0)));
}

template <typename T>
__global__ void relu_backward(const T* y, const T* gy, T* gx, long long total, typename Acc<T>::type scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        gx[i] = relu_grad_of(y[i], gy[i], scale);
    }
}

// The bias's gradient in the launch of ReLU's backward (relu_backward_nchw_to_cnl, relu_backward_bias_rows),
// where CuPy would launch a sum after it. Each thread adds its share of the gradient, as stored (rounded to T),
// in A (float for a 16-bit T) and hands its partial sum to its group; the last of the group to arrive adds the
// group's partials in member order (the pattern of CUDA's threadFenceReduction sample). No shared memory or
// barriers, and no atomics on values: the sums and their order do not depend on which thread arrives last, so
// every run gives the same bits.
//
// Stores `partial` as member `member` of `group` (of `size` members) in partials[group * size + member] and
// returns whether this thread was the group's last to arrive; then `sum` is the group's partials added in
// member order. counters[group] is 0 before the launch, and the last arrival leaves it 0 for the next launch on
// the stream: atomicInc(counter, size - 1) stores 0 where it returns size - 1 (kernels.zeroed_counters).
template <typename A>
__device__ __forceinline__ bool last_of_group(A* partials, unsigned* counters, long long group, unsigned size,
                                              unsigned member, A partial, A& sum) {
    partials[group * size + member] = partial;
    __threadfence();  // the partial is visible to every thread before the count that announces it
    if (atomicInc(counters + group, size - 1) != size - 1) {
        return false;
    }
    __threadfence();  // and the others' partials are read after their counts
    const volatile A* mine = partials + group * size;  // volatile: from memory, not a stale cached line
    A s = mine[0];
    for (unsigned i = 1; i < size; ++i) {
        s += mine[i];
    }
    sum = s;
    return true;
}

// Bias + ReLU in one pass after a GEMM (activation.py, bias_relu_*): each reads the GEMM's
// output once and writes the activation once, where CuPy would launch the add and the maximum
// apart. NaN propagates as np.maximum(v, 0) does. Indices in 32 bits where they fit (no 64-bit
// division per element). The bias b is in the accumulation type: a 16-bit layer keeps its bias
// float32 (mixed precision: the bias is not cast, its gradient's sum stays float32).

template <typename A>
__device__ __forceinline__ A relu_of(A v) {
    return (v > A(0) || v != v) ? v : A(0);
}

// Element i of an (N, C, L) array as (n, c, l)
__device__ __forceinline__ void split_nchw(long long i, long long c, long long l, long long total,
                                           long long& ni, long long& ci, long long& li) {
    if (total <= 0xFFFFFFFFLL) {
        unsigned row = (unsigned)i / (unsigned)l;
        li = (unsigned)i - row * (unsigned)l;
        ni = row / (unsigned)c;
        ci = row - (unsigned)ni * (unsigned)c;
    } else {
        long long row = i / l;
        li = i - row * l;
        ni = row / c;
        ci = row - ni * c;
    }
}

// A fully connected layer's (rows, features) output, in place: y = relu(y + b[feature])
template <typename T>
__global__ void bias_relu_rows(T* y, const typename Acc<T>::type* b, long long features, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long f = total <= 0xFFFFFFFFLL ? (long long)((unsigned)i % (unsigned)features) : i % features;
        y[i] = from_acc<T>(relu_of(to_acc(y[i]) + to_acc(b[f])));
    }
}

// The same, then inverted dropout (dropout.cu's mask of the call's key; start: the global
// index of y[0]): y = relu(y + b[feature]) * (u >= p ? scale : 0), the product as in
// dropout_apply, so the result is the unfused layers' bit for bit: for a 16-bit T the ReLU's
// value is rounded to T before the product, as bias_relu_rows then dropout_apply round it.
template <typename T>
__global__ void bias_relu_dropout_rows(T* y, const typename Acc<T>::type* b, long long features, long long total,
                                       long long key, long long start, typename Acc<T>::type p,
                                       typename Acc<T>::type scale) {
    typedef typename Acc<T>::type A;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long f = total <= 0xFFFFFFFFLL ? (long long)((unsigned)i % (unsigned)features) : i % features;
        A mask = dropout_uniform((unsigned long long)key, start + i) >= (float)p ? scale : A(0);
        A activation = to_acc(from_acc<T>(relu_of(to_acc(y[i]) + to_acc(b[f]))));  // the identity for float, double
        y[i] = from_acc<T>(activation * mask);
    }
}

// A convolution's GEMM output, (C, N, L) with L = OH*OW, into a new NCHW array:
// y[n, c, l] = relu(cnl[c, n, l] + b[c]). A thread per element of y, read in y's order.
template <typename T>
__global__ void bias_relu_cnl_to_nchw(const T* cnl, const typename Acc<T>::type* b, T* y, long long n, long long c,
                                      long long l, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long ni, ci, li;
        split_nchw(i, c, l, total, ni, ci, li);
        y[i] = from_acc<T>(relu_of(to_acc(cnl[(ci * n + ni) * l + li]) + to_acc(b[ci])));
    }
}

// ReLU's backward fused with the transposition a convolution's backward needs and with the bias's gradient:
// the NCHW gradient gy masked by y > 0, written as (C, N, L) (the layout of the weight-gradient GEMM), and
// gb[c] = its sum over n and l. A warp per (c, n): thread (c, n, j), j < 32, walks l = j, j + 32, ..., so a warp
// reads and writes 32 consecutive elements at a time (coalesced) and sums its own. The last of the 32 to finish
// adds (c, n)'s 32 partials, and the last (c, n) of channel c adds its N sums: two levels, so no thread adds
// more than max(32, N) partials. total: C * N * 32 threads; partials: C * N * 33 of A; counters: C * N + C
// zeros.
template <typename T>
__global__ void relu_backward_nchw_to_cnl(const T* y, const T* gy, T* g_cnl, typename Acc<T>::type* gb,
                                          typename Acc<T>::type* partials, unsigned* counters, long long n,
                                          long long c, long long l, long long total) {
    typedef typename Acc<T>::type A;
    const long long rows = total >> 5;  // (c, n) pairs; the second level's partials and counters follow theirs
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const long long row = t >> 5, ci = row / n, ni = row - ci * n;  // row = ci * n + ni, as in g_cnl
        const unsigned j = (unsigned)t & 31u;
        const long long from = (ni * c + ci) * l;
        A partial = A(0);
        for (long long li = j; li < l; li += 32) {
            const T g = relu_grad_of(y[from + li], gy[from + li], A(1));
            g_cnl[row * l + li] = g;
            partial += to_acc(g);
        }
        A sum;
        if (last_of_group(partials, counters, row, 32u, j, partial, sum) &&
            last_of_group(partials + total, counters + rows, ci, (unsigned)n, (unsigned)ni, sum, sum)) {
            gb[ci] = sum;
        }
    }
}

// ReLU's backward of a fully connected layer's (rows, features) output, dropout's scale included (as
// relu_backward), and the bias's gradient gb[f] = the sum of gx[:, f]. Thread (k, f) takes rows
// k * rows_per_thread, ... of feature f: consecutive threads read and write consecutive features (coalesced).
// Not a thread per feature looping over every row, which needs no atomics: that is only `features` threads
// (2048 of a tower's fc6: 8 blocks, 8 of an H100's 132 SMs) each with the whole batch's loads in a row; a few
// rows per thread fill the GPU, and the last of a feature's `chunks` threads adds their partials.
// total: chunks * features threads; partials: as many A; counters: features zeros.
template <typename T>
__global__ void relu_backward_bias_rows(const T* y, const T* gy, T* gx, typename Acc<T>::type* gb,
                                        typename Acc<T>::type* partials, unsigned* counters, long long rows,
                                        long long features, long long rows_per_thread, long long total,
                                        typename Acc<T>::type scale) {
    typedef typename Acc<T>::type A;
    const unsigned chunks = (unsigned)(total / features);
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const long long k = t / features, f = t - k * features;
        const long long end = min(rows, (k + 1) * rows_per_thread);
        A partial = A(0);
        for (long long i = k * rows_per_thread * features + f; i < end * features; i += features) {
            const T g = relu_grad_of(y[i], gy[i], scale);
            gx[i] = g;
            partial += to_acc(g);
        }
        A sum;
        if (last_of_group(partials, counters, f, chunks, (unsigned)k, partial, sum)) {
            gb[f] = sum;
        }
    }
}

// T, and A = Acc<T>::type: the type of the floating-point scalars
#define MINIDL_ACTIVATION_KERNELS(T, A)                                                                          \
    template __global__ void relu_backward<T>(const T*, const T*, T*, long long, A);                             \
    template __global__ void bias_relu_rows<T>(T*, const A*, long long, long long);                              \
    template __global__ void bias_relu_dropout_rows<T>(T*, const A*, long long, long long, long long, long long, \
                                                       A, A);                                                    \
    template __global__ void bias_relu_cnl_to_nchw<T>(const T*, const A*, T*, long long, long long, long long,   \
                                                      long long);                                                \
    template __global__ void relu_backward_nchw_to_cnl<T>(const T*, const T*, T*, A*, A*, unsigned*, long long,  \
                                                          long long, long long, long long);                     \
    template __global__ void relu_backward_bias_rows<T>(const T*, const T*, T*, A*, A*, unsigned*, long long,    \
                                                        long long, long long, long long, A);
MINIDL_ACTIVATION_KERNELS(float, float)
MINIDL_ACTIVATION_KERNELS(double, double)
MINIDL_ACTIVATION_KERNELS(__half, float)
MINIDL_ACTIVATION_KERNELS(__nv_bfloat16, float)
