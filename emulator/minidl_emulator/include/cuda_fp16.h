// The CUDA emulator's <cuda_fp16.h>: __half for kernels compiled by g++ (kernel_runner.py puts this folder
// on the include path). What it holds, and how it rounds: minidl_emu_half.h.
#pragma once

#include "minidl_emu_half.h"

#define MINIDL_EMU_HAVE_HALF 1

struct __nv_bfloat16;

struct __half_raw {
    unsigned short x;
};

struct __half;
inline __half __double2half(const double a);
inline float __half2float(const __half a);

struct __half {
protected:
    unsigned short __x;

public:
    __half() = default;
    constexpr __half(const __half_raw& hr) : __x(hr.x) {}
    __half& operator=(const __half_raw& hr) { __x = hr.x; return *this; }
    operator __half_raw() const { __half_raw r; r.x = __x; return r; }
    explicit __half(const __nv_bfloat16 f);  // in cuda_bf16.h, as in CUDA
    __half(const float f) : __x(::minidl_emu::round_to_16(f, 10, 15)) {}
    __half(const double f) : __x(::minidl_emu::round_to_16(f, 10, 15)) {}
    // integers, as CUDA has them (so __half(0) is not ambiguous between float and double); beyond 2^53
    // they round twice (through double), far beyond binary16's range anyway
    __half(const short v) : __half(static_cast<double>(v)) {}
    __half(const unsigned short v) : __half(static_cast<double>(v)) {}
    __half(const int v) : __half(static_cast<double>(v)) {}
    __half(const unsigned int v) : __half(static_cast<double>(v)) {}
    __half(const long v) : __half(static_cast<double>(v)) {}
    __half(const unsigned long v) : __half(static_cast<double>(v)) {}
    __half(const long long v) : __half(static_cast<double>(v)) {}
    __half(const unsigned long long v) : __half(static_cast<double>(v)) {}
    operator float() const { return __half2float(*this); }
    __half& operator=(const float f) { return *this = __half(f); }
    __half& operator=(const double f) { return *this = __half(f); }
};
static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "__half is NumPy's float16 in memory");

typedef __half half;
typedef __half __nv_half;
typedef __half nv_half;

inline __half __double2half(const double a) { return __half(a); }
inline __half __float2half(const float a) { return __half(a); }
inline __half __float2half_rn(const float a) { return __half(a); }
inline float __half2float(const __half a) {
    const unsigned short bits = static_cast<__half_raw>(a).x;
    const unsigned int sign = static_cast<unsigned int>(bits & 0x8000u) << 16;
    const unsigned int field = (bits >> 10) & 0x1fu, mantissa = bits & 0x3ffu;
    unsigned int f;
    if (field == 0x1fu) {  // infinity, or a NaN with its payload
        f = sign | 0x7f800000u | (mantissa << 13);
    } else if (field != 0) {
        f = sign | ((field + 112u) << 23) | (mantissa << 13);
    } else {  // zero or a subnormal: mantissa * 2^-24, exact in float
        const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
        std::memcpy(&f, &magnitude, sizeof f);
        f |= sign;
    }
    float result;
    std::memcpy(&result, &f, sizeof result);
    return result;
}
inline unsigned short __half_as_ushort(const __half h) { return static_cast<__half_raw>(h).x; }
inline __half __ushort_as_half(const unsigned short i) { __half_raw r; r.x = i; return __half(r); }

// Arithmetic in float, rounded once; comparisons as float's (a NaN compares unequal, and false otherwise)
inline __half __hadd(const __half a, const __half b) { return __half(__half2float(a) + __half2float(b)); }
inline __half __hsub(const __half a, const __half b) { return __half(__half2float(a) - __half2float(b)); }
inline __half __hmul(const __half a, const __half b) { return __half(__half2float(a) * __half2float(b)); }
inline __half __hdiv(const __half a, const __half b) { return __half(__half2float(a) / __half2float(b)); }
inline __half __hneg(const __half a) {
    return __ushort_as_half(static_cast<unsigned short>(__half_as_ushort(a) ^ 0x8000u));
}
inline bool __hisnan(const __half a) { return (__half_as_ushort(a) & 0x7fffu) > 0x7c00u; }
inline int __hisinf(const __half a) {
    const unsigned short bits = __half_as_ushort(a);
    return (bits & 0x7fffu) == 0x7c00u ? ((bits & 0x8000u) ? -1 : 1) : 0;
}

MINIDL_EMU_16BIT_OPERATORS(__half, __half2float)
