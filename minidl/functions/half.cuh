// The 16-bit float types for the kernels of this folder (activation.cu, dropout.cu, conv.cu, lrn.cu,
// pooling.cu, loss.cu), each a template on T instantiated for float, double, __half and __nv_bfloat16:
// a kernel loads T, converts it to Acc<T>::type (float for the 16-bit types, T itself otherwise),
// computes there and converts back once when it stores. Floating-point scalar parameters are
// Acc<T>::type (kernels.launch packs a Python float as float32 for a 16-bit kernel), so the float and
// double instantiations are the same code, bit for bit, as before the 16-bit ones existed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

template <typename T>
struct Acc {
    typedef T type;
};
template <>
struct Acc<__half> {
    typedef float type;
};
template <>
struct Acc<__nv_bfloat16> {
    typedef float type;
};

// A loaded T in the accumulation type (exact: every 16-bit value is a float)
template <typename T>
__device__ __forceinline__ typename Acc<T>::type to_acc(T v) {
    return static_cast<typename Acc<T>::type>(v);
}

// An accumulated value rounded to T (to nearest, ties to even; the identity for float and double)
template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type v) {
    return static_cast<T>(v);
}
