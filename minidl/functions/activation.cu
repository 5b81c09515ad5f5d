// ReLU's backward for activation.py: gx = gy * (y > 0) in one pass, where CuPy
// would launch two elementwise kernels (the comparison, then the product) and
// write a mask in between. The product, not a select, so a NaN or infinite
// gradient where y <= 0 gives NaN as on the NumPy path.

template <typename T>
__global__ void relu_backward(const T* y, const T* gy, T* gx, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        gx[i] = gy[i] * (y[i] > T(0) ? T(1) : T(0));
    }
}

template __global__ void relu_backward<float>(const float*, const float*, float*, long long);
template __global__ void relu_backward<double>(const double*, const double*, double*, long long);
