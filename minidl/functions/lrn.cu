// Local response normalization for lrn.py; x is (N, C, H, W), HW = H*W.
// One thread per pixel (n, h, w) walks the C channels with a running window sum,
// so each value is read a constant number of times whatever the window n.
// Neighbouring threads hold neighbouring pixels: every load is coalesced.

// A 16-bit x is computed in float (half.cuh): its sum of squares above all, which for 0..255
// pixels reaches 5 * 255^2, beyond float16's 65504; y, the saved scale and gx are rounded once.
// k, alpha and beta are then floats.

#include "half.cuh"
#include "window.cuh"

template <typename T>
__global__ void lrn_forward(const T* x, T* y, T* scale, long long pixels, long long C, long long HW,
                            long long half, typename Acc<T>::type k, typename Acc<T>::type alpha,
                            typename Acc<T>::type beta) {
    typedef typename Acc<T>::type A;
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < pixels;
         p += (long long)blockDim.x * gridDim.x) {
        QuotientRemainder image_pixel = divide(p, HW);
        long long base = image_pixel.quotient * C * HW + image_pixel.remainder;  // channel 0 of this pixel
        A sum = A(0);
        for (long long c = 0; c < half && c < C; ++c) {  // the window of channel 0, minus its last
            A v = to_acc(x[base + c * HW]);
            sum += v * v;
        }
        for (long long c = 0; c < C; ++c) {
            long long enter = c + half, leave = c - half - 1;
            if (enter < C) { A v = to_acc(x[base + enter * HW]); sum += v * v; }
            if (leave >= 0) { A v = to_acc(x[base + leave * HW]); sum -= v * v; }
            A s = k + alpha * sum;
            scale[base + c * HW] = from_acc<T>(s);
            y[base + c * HW] = from_acc<T>(to_acc(x[base + c * HW]) * pow(s, -beta));
        }
    }
}

// gx[c] = gy[c] * s[c]^-beta - 2*alpha*beta * x[c] * sum_{|i-c| <= half} gy[i] * x[i] * s[i]^(-beta-1),
// with one power per channel, as the NumPy path has it: g[i] = gy[i] * s[i]^-beta, and the window's
// terms g[i] * x[i] / s[i]. A channel's g is used when it enters the window, at its own step and when
// it leaves, so the last kLrnRing of them stay in a ring (thread-local); a window too wide for the ring
// (n over kLrnRing - 1 = 15 channels) computes g again at each use instead, three powers a channel.
// For a 16-bit T, s is the forward's scale as saved (rounded to T); g, the ring and the sum are floats.
constexpr int kLrnRing = 16;  // a power of 2: `% kLrnRing` is a mask

template <typename T>
__device__ inline typename Acc<T>::type lrn_scaled_gradient(const T* scale, const T* gy, long long i,
                                                           typename Acc<T>::type beta) {
    return to_acc(gy[i]) * pow(to_acc(scale[i]), -beta);
}

template <typename T>
__global__ void lrn_backward(const T* x, const T* scale, const T* gy, T* gx, long long pixels, long long C,
                             long long HW, long long half, typename Acc<T>::type k, typename Acc<T>::type alpha,
                             typename Acc<T>::type beta) {
    typedef typename Acc<T>::type A;
    bool ring_holds_window = 2 * half + 2 <= kLrnRing;  // channels c-half-1 .. c+half at step c
    A two_alpha_beta = A(2) * alpha * beta;
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < pixels;
         p += (long long)blockDim.x * gridDim.x) {
        QuotientRemainder image_pixel = divide(p, HW);
        long long base = image_pixel.quotient * C * HW + image_pixel.remainder;
        A ring[kLrnRing];
        A sum = A(0);
        // step `enter` brings channel `enter` into the window, then finishes channel c = enter - half
        for (long long enter = 0; enter < C + half; ++enter) {
            if (enter < C) {
                long long i = base + enter * HW;
                A g = lrn_scaled_gradient(scale, gy, i, beta);
                if (ring_holds_window) ring[enter % kLrnRing] = g;
                sum += g * to_acc(x[i]) / to_acc(scale[i]);
            }
            long long c = enter - half, leave = c - half - 1;
            if (c < 0) continue;
            if (leave >= 0) {
                long long i = base + leave * HW;
                A g = ring_holds_window ? ring[leave % kLrnRing] : lrn_scaled_gradient(scale, gy, i, beta);
                sum -= g * to_acc(x[i]) / to_acc(scale[i]);
            }
            long long i = base + c * HW;
            A g = ring_holds_window ? ring[c % kLrnRing] : lrn_scaled_gradient(scale, gy, i, beta);
            gx[i] = from_acc<T>(g - sum * to_acc(x[i]) * two_alpha_beta);
        }
    }
}

// T, and A = Acc<T>::type: the type of k, alpha and beta
#define MINIDL_LRN_KERNELS(T, A)                                                                             \
    template __global__ void lrn_forward<T>(const T*, T*, T*, long long, long long, long long, long long, A, \
                                            A, A);                                                           \
    template __global__ void lrn_backward<T>(const T*, const T*, const T*, T*, long long, long long,         \
                                             long long, long long, A, A, A);
MINIDL_LRN_KERNELS(float, float)
MINIDL_LRN_KERNELS(double, double)
MINIDL_LRN_KERNELS(__half, float)
MINIDL_LRN_KERNELS(__nv_bfloat16, float)
