// Inverted dropout for dropout.py, from the uniforms u the mask is drawn from:
// an element is kept where u >= p (compared in float, as NumPy compares the
// float32 uniforms) and then scaled by `scale` = 1/(1-p). Forward and backward
// each apply the mask in one pass, so the mask is never stored: backward keeps
// the uniforms instead. The product x * (scale or 0), not a select, is the
// NumPy path's x * mask exactly (a NaN stays NaN where dropped).

template <typename T>
__device__ inline T dropout_mask(T u, T p, T scale) {
    return static_cast<float>(u) >= static_cast<float>(p) ? scale : T(0);
}

template <typename T>
__global__ void dropout_apply(const T* x, const T* u, T* y, long long total, T p, T scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        y[i] = x[i] * dropout_mask(u[i], p, scale);
    }
}

template __global__ void dropout_apply<float>(const float*, const float*, float*, long long, float, float);
template __global__ void dropout_apply<double>(const double*, const double*, double*, long long, double, double);
