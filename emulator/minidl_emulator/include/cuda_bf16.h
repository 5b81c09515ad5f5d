// The CUDA emulator's <cuda_bf16.h>: __nv_bfloat16 for kernels compiled by g++ (kernel_runner.py puts
// this folder on the include path). It includes cuda_fp16.h, as CUDA's does. What it holds, and how it
// rounds: minidl_emu_half.h.
#pragma once

#include "cuda_fp16.h"

#define MINIDL_EMU_HAVE_BF16 1

struct __nv_bfloat16_raw {
    unsigned short x;
};

struct __nv_bfloat16;
inline float __bfloat162float(const __nv_bfloat16 a);

struct __nv_bfloat16 {
protected:
    unsigned short __x;

public:
    __nv_bfloat16() = default;
    constexpr __nv_bfloat16(const __nv_bfloat16_raw& hr) : __x(hr.x) {}
    __nv_bfloat16& operator=(const __nv_bfloat16_raw& hr) { __x = hr.x; return *this; }
    operator __nv_bfloat16_raw() const { __nv_bfloat16_raw r; r.x = __x; return r; }
    explicit __nv_bfloat16(const __half f) : __nv_bfloat16(__half2float(f)) {}
    __nv_bfloat16(const float f) : __x(::minidl_emu::round_to_16(f, 7, 127)) {}
    __nv_bfloat16(const double f) : __x(::minidl_emu::round_to_16(f, 7, 127)) {}
    // integers, as CUDA has them; beyond 2^53 they round twice (through double)
    __nv_bfloat16(const short v) : __nv_bfloat16(static_cast<double>(v)) {}
    __nv_bfloat16(const unsigned short v) : __nv_bfloat16(static_cast<double>(v)) {}
    __nv_bfloat16(const int v) : __nv_bfloat16(static_cast<double>(v)) {}
    __nv_bfloat16(const unsigned int v) : __nv_bfloat16(static_cast<double>(v)) {}
    __nv_bfloat16(const long v) : __nv_bfloat16(static_cast<double>(v)) {}
    __nv_bfloat16(const unsigned long v) : __nv_bfloat16(static_cast<double>(v)) {}
    __nv_bfloat16(const long long v) : __nv_bfloat16(static_cast<double>(v)) {}
    __nv_bfloat16(const unsigned long long v) : __nv_bfloat16(static_cast<double>(v)) {}
    operator float() const { return __bfloat162float(*this); }
    __nv_bfloat16& operator=(const float f) { return *this = __nv_bfloat16(f); }
    __nv_bfloat16& operator=(const double f) { return *this = __nv_bfloat16(f); }
};
static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2,
              "__nv_bfloat16 is ml_dtypes' bfloat16 in memory");

inline __half::__half(const __nv_bfloat16 f) : __half(__bfloat162float(f)) {}

typedef __nv_bfloat16 nv_bfloat16;

inline __nv_bfloat16 __double2bfloat16(const double a) { return __nv_bfloat16(a); }
inline __nv_bfloat16 __float2bfloat16(const float a) { return __nv_bfloat16(a); }
inline __nv_bfloat16 __float2bfloat16_rn(const float a) { return __nv_bfloat16(a); }
inline float __bfloat162float(const __nv_bfloat16 a) {  // the upper half of a float: exact
    const unsigned int bits = static_cast<unsigned int>(static_cast<__nv_bfloat16_raw>(a).x) << 16;
    float result;
    std::memcpy(&result, &bits, sizeof result);
    return result;
}
inline unsigned short __bfloat16_as_ushort(const __nv_bfloat16 h) { return static_cast<__nv_bfloat16_raw>(h).x; }
inline __nv_bfloat16 __ushort_as_bfloat16(const unsigned short i) {
    __nv_bfloat16_raw r;
    r.x = i;
    return __nv_bfloat16(r);
}

// Arithmetic in float, rounded once; comparisons as float's
inline __nv_bfloat16 __hadd(const __nv_bfloat16 a, const __nv_bfloat16 b) {
    return __nv_bfloat16(__bfloat162float(a) + __bfloat162float(b));
}
inline __nv_bfloat16 __hsub(const __nv_bfloat16 a, const __nv_bfloat16 b) {
    return __nv_bfloat16(__bfloat162float(a) - __bfloat162float(b));
}
inline __nv_bfloat16 __hmul(const __nv_bfloat16 a, const __nv_bfloat16 b) {
    return __nv_bfloat16(__bfloat162float(a) * __bfloat162float(b));
}
inline __nv_bfloat16 __hdiv(const __nv_bfloat16 a, const __nv_bfloat16 b) {
    return __nv_bfloat16(__bfloat162float(a) / __bfloat162float(b));
}
inline __nv_bfloat16 __hneg(const __nv_bfloat16 a) {
    return __ushort_as_bfloat16(static_cast<unsigned short>(__bfloat16_as_ushort(a) ^ 0x8000u));
}
inline bool __hisnan(const __nv_bfloat16 a) { return (__bfloat16_as_ushort(a) & 0x7fffu) > 0x7f80u; }
inline int __hisinf(const __nv_bfloat16 a) {
    const unsigned short bits = __bfloat16_as_ushort(a);
    return (bits & 0x7fffu) == 0x7f80u ? ((bits & 0x8000u) ? -1 : 1) : 0;
}

MINIDL_EMU_16BIT_OPERATORS(__nv_bfloat16, __bfloat162float)
