// Local response normalization for lrn.py; x is (N, C, H, W), HW = H*W.
// One thread per pixel (n, h, w) walks the C channels with a running window sum,
// so each value is read a constant number of times whatever the window n.
// Neighbouring threads hold neighbouring pixels: every load is coalesced.

template <typename T>
__global__ void lrn_forward(const T* x, T* y, T* scale, long long pixels, long long C, long long HW,
                            long long half, T k, T alpha, T beta) {
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < pixels;
         p += (long long)blockDim.x * gridDim.x) {
        long long base = (p / HW) * C * HW + p % HW;  // channel 0 of this pixel
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

// gx[c] = gy[c] * s[c]^-beta - 2*alpha*beta * x[c] * sum_{|i-c| <= half} gy[i] * x[i] * s[i]^(-beta-1)
template <typename T>
__global__ void lrn_backward(const T* x, const T* scale, const T* gy, T* gx, long long pixels, long long C,
                             long long HW, long long half, T k, T alpha, T beta) {
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < pixels;
         p += (long long)blockDim.x * gridDim.x) {
        long long base = (p / HW) * C * HW + p % HW;
        T sum = T(0);
        for (long long c = 0; c < half && c < C; ++c) {
            long long i = base + c * HW;
            sum += gy[i] * x[i] * pow(scale[i], -beta - T(1));
        }
        for (long long c = 0; c < C; ++c) {
            long long enter = c + half, leave = c - half - 1;
            if (enter < C) { long long i = base + enter * HW; sum += gy[i] * x[i] * pow(scale[i], -beta - T(1)); }
            if (leave >= 0) { long long i = base + leave * HW; sum -= gy[i] * x[i] * pow(scale[i], -beta - T(1)); }
            long long i = base + c * HW;
            gx[i] = gy[i] * pow(scale[i], -beta) - T(2) * alpha * beta * x[i] * sum;
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
