// A test fixture for 16-bit float kernels (tests/test_half_kernels.py): one template instantiated for
// float, __half and __nv_bfloat16, reading and writing T and computing in float, as minidl's
// mixed-precision kernels will. Scalar parameters of a half kernel are float (the accumulation type):
// kernels.launch packs a Python float as float32 for a float16 or bfloat16 launch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// y = x * a + y, elementwise, in float, rounded once to T
template <typename T>
__global__ void scale_add(const T* x, T* y, float a, long long n) {
    for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<long long>(blockDim.x) * gridDim.x) {
        y[i] = T(static_cast<float>(x[i]) * a + static_cast<float>(y[i]));
    }
}

// The 16-bit type's own conversions, for the rounding test: to[i] = T(from[i]), back[i] = float(to[i])
template <typename T>
__global__ void round_trip(const float* from, T* to, float* back, long long n) {
    for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<long long>(blockDim.x) * gridDim.x) {
        to[i] = T(from[i]);
        back[i] = static_cast<float>(to[i]);
    }
}

// The same through CUDA's intrinsics, and the operators on T (computed in float, rounded once):
// sum[i] = x[i] + y[i], product[i] = x[i] * y[i], quotient[i] = x[i] / y[i], less[i] = x[i] < y[i]
__device__ __forceinline__ __half from_float(float v, __half) { return __float2half(v); }
__device__ __forceinline__ __nv_bfloat16 from_float(float v, __nv_bfloat16) { return __float2bfloat16(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__global__ void intrinsics(const float* from, T* to, float* back, const T* x, const T* y, T* sum, T* product,
                           T* quotient, int* less, long long n) {
    for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<long long>(blockDim.x) * gridDim.x) {
        to[i] = from_float(from[i], T());
        back[i] = to_float(to[i]);
        sum[i] = x[i] + y[i];
        product[i] = x[i] * y[i];
        quotient[i] = x[i] / y[i];
        less[i] = x[i] < y[i];
    }
}

template __global__ void scale_add<float>(const float*, float*, float, long long);
template __global__ void scale_add<__half>(const __half*, __half*, float, long long);
template __global__ void scale_add<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, float, long long);
template __global__ void round_trip<__half>(const float*, __half*, float*, long long);
template __global__ void round_trip<__nv_bfloat16>(const float*, __nv_bfloat16*, float*, long long);
