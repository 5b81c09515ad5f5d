// ReLU's backward for activation.py: gx = gy * (y > 0 ? scale : 0) in one pass, where CuPy
// would launch two elementwise kernels (the comparison, then the product) and write a mask
// in between. scale is 1, or dropout's 1/(1-p) after the fused bias + ReLU + dropout: there
// y > 0 exactly where the element was kept and positive, so the mask needs no hash. The
// product, not a select, so a NaN or infinite gradient where y <= 0 gives NaN as on the NumPy path.
// Every kernel here is instantiated for float, double, __half and __nv_bfloat16 (half.cuh): 16-bit
// values are computed in float and rounded once when stored.

#include "dropout.cuh"
#include "half.cuh"

template <typename T>
__global__ void relu_backward(const T* y, const T* gy, T* gx, long long total, typename Acc<T>::type scale) {
    typedef typename Acc<T>::type A;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        gx[i] = from_acc<T>(to_acc(gy[i]) * (to_acc(y[i]) > A(0) ? scale : A(0)));
    }
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

// ReLU's backward fused with the transposition a convolution's backward needs: the NCHW
// gradient gy masked by y > 0, written as (C, N, L), the layout of the weight-gradient GEMM.
template <typename T>
__global__ void relu_backward_nchw_to_cnl(const T* y, const T* gy, T* g_cnl, long long n, long long c,
                                          long long l, long long total) {
    typedef typename Acc<T>::type A;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long ni, ci, li;
        split_nchw(i, c, l, total, ni, ci, li);
        g_cnl[(ci * n + ni) * l + li] = from_acc<T>(to_acc(gy[i]) * (to_acc(y[i]) > A(0) ? A(1) : A(0)));
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
    template __global__ void relu_backward_nchw_to_cnl<T>(const T*, const T*, T*, long long, long long,          \
                                                          long long, long long);
MINIDL_ACTIVATION_KERNELS(float, float)
MINIDL_ACTIVATION_KERNELS(double, double)
MINIDL_ACTIVATION_KERNELS(__half, float)
MINIDL_ACTIVATION_KERNELS(__nv_bfloat16, float)
