// Local response normalization for lrn.py; x is (N, C, H, W), HW = H*W.
// One thread per pixel (n, h, w) walks the C channels with a running window sum,
// so each value is read a constant number of times whatever the window n.
// Neighbouring threads hold neighbouring pixels: every load is coalesced.

#include "window.cuh"

template <typename T>
__global__ void lrn_forward(const T* x, T* y, T* scale, long long pixels, long long C, long long HW,
                            long long half, T k, T alpha, T beta) {
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < pixels;
         p += (long long)blockDim.x * gridDim.x) {
        QuotientRemainder image_pixel = divide(p, HW);
        long long base = image_pixel.quotient * C * HW + image_pixel.remainder;  // channel 0 of this pixel
        T sum = T(0);
        for (long long c = 0; c < half && c < C; ++c) {  // the window of channel 0, minus its last
            T v = x[base + c * HW];
            sum += v * v;
        }
        for (long long c = 0; c < C; ++c) {
            long long enter = c + half, leave = c - half - 1;
            if (enter < C) { T v = x[base + enter * HW]; sum += v * v; }
            if (leave >= 0) { T v = x[base + leave * HW]; sum -= v * v; }
            T s = k + alpha * sum;
            scale[base + c * HW] = s;
            y[base + c * HW] = x[base + c * HW] * pow(s, -beta);
        }
    }
}

// gx[c] = gy[c] * s[c]^-beta - 2*alpha*beta * x[c] * sum_{|i-c| <= half} gy[i] * x[i] * s[i]^(-beta-1),
// with one power per channel, as the NumPy path has it: g[i] = gy[i] * s[i]^-beta, and the window's
// terms g[i] * x[i] / s[i]. A channel's g is used when it enters the window, at its own step and when
// it leaves, so the last kLrnRing of them stay in a ring (thread-local); a window too wide for the ring
// (n over kLrnRing - 1 = 15 channels) computes g again at each use instead, three powers a channel.
constexpr int kLrnRing = 16;  // a power of 2: `% kLrnRing` is a mask

template <typename T>
__device__ inline T lrn_scaled_gradient(const T* scale, const T* gy, long long i, T beta) {
    return gy[i] * pow(scale[i], -beta);
}

template <typename T>
__global__ void lrn_backward(const T* x, const T* scale, const T* gy, T* gx, long long pixels, long long C,
                             long long HW, long long half, T k, T alpha, T beta) {
    bool ring_holds_window = 2 * half + 2 <= kLrnRing;  // channels c-half-1 .. c+half at step c
    T two_alpha_beta = T(2) * alpha * beta;
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < pixels;
         p += (long long)blockDim.x * gridDim.x) {
        QuotientRemainder image_pixel = divide(p, HW);
        long long base = image_pixel.quotient * C * HW + image_pixel.remainder;
        T ring[kLrnRing];
        T sum = T(0);
        // step `enter` brings channel `enter` into the window, then finishes channel c = enter - half
        for (long long enter = 0; enter < C + half; ++enter) {
            if (enter < C) {
                long long i = base + enter * HW;
                T g = lrn_scaled_gradient(scale, gy, i, beta);
                if (ring_holds_window) ring[enter % kLrnRing] = g;
                sum += g * x[i] / scale[i];
            }
            long long c = enter - half, leave = c - half - 1;
            if (c < 0) continue;
            if (leave >= 0) {
                long long i = base + leave * HW;
                T g = ring_holds_window ? ring[leave % kLrnRing] : lrn_scaled_gradient(scale, gy, i, beta);
                sum -= g * x[i] / scale[i];
            }
            long long i = base + c * HW;
            T g = ring_holds_window ? ring[c % kLrnRing] : lrn_scaled_gradient(scale, gy, i, beta);
            gx[i] = g - sum * x[i] * two_alpha_beta;
        }
    }
}

template __global__ void lrn_forward<float>(const float*, float*, float*, long long, long long, long long,
                                            long long, float, float, float);
template __global__ void lrn_forward<double>(const double*, double*, double*, long long, long long, long long,
                                             long long, double, double, double);
template __global__ void lrn_backward<float>(const float*, const float*, const float*, float*, long long,
                                             long long, long long, long long, float, float, float);
template __global__ void lrn_backward<double>(const double*, const double*, const double*, double*, long long,
                                              long long, long long, long long, double, double, double);
