// The CUDA emulator's 16-bit float types (the shims cuda_fp16.h and cuda_bf16.h include this): __half
// (IEEE binary16, NumPy's float16) and __nv_bfloat16 (ml_dtypes' bfloat16), each 16 bits of storage, so
// an array of them is a float16 or bfloat16 array's memory as it is. Conversion from float or double
// rounds to nearest, ties to even, directly from the exact value (so __float2half(x) and
// __double2half(x) agree for a float x), overflowing to infinity; a NaN becomes 0x7fff, the NaN that
// CUDA's conversions (cvt.rn.f16.f32, cvt.rn.bf16.f32) give. Conversion to float is exact. Arithmetic
// is done in float and rounded once: for +, -, *, / that equals the correctly rounded 16-bit result
// (float's 24 bits are at least 2p + 2 for p = 11 or 8), what CUDA's __hadd ... __hdiv give.
//
// Only what kernels need is here (the types, their conversions and operators, the conversion and
// arithmetic intrinsics); NVRTC, with the real headers, is the authority on what compiles
// (nvrtc_check.py): code that compiles here may still be ambiguous there, never the other way round
// for what is declared here.
#pragma once

#include <cstdint>
#include <cstring>

namespace minidl_emu {
// The 16-bit pattern nearest `value` in a format of `mantissa` stored bits and exponent bias `bias`
// (binary16: 10, 15; bfloat16: 7, 127), ties to even.
inline unsigned short round_to_16(double value, int mantissa, int bias) {
    std::uint64_t b;
    std::memcpy(&b, &value, sizeof b);
    const unsigned short sign = static_cast<unsigned short>((b >> 63) << 15);
    const std::uint64_t a = b & 0x7fffffffffffffffULL;
    const unsigned int max_field = (1u << (15 - mantissa)) - 1;  // the all-ones exponent field
    const unsigned short inf = static_cast<unsigned short>(sign | (max_field << mantissa));
    if (a > 0x7ff0000000000000ULL) return 0x7fff;
    if (a == 0x7ff0000000000000ULL) return inf;
    const int field = static_cast<int>(a >> 52);
    if (field == 0) return sign;  // zero, or a double subnormal: below half of either format's least value
    const int e = field - 1023, e_min = 1 - bias;
    if (e > bias) return inf;
    const std::uint64_t significand = (a & 0xfffffffffffffULL) | (1ULL << 52);  // value = significand * 2^(e - 52)
    // how many of the result's quanta (2^(max(e, e_min) - mantissa)) value is, rounded
    const int shift = 52 + (e > e_min ? e : e_min) - mantissa - e;
    if (shift > 60) return sign;  // below a quarter of the least subnormal
    std::uint64_t n = significand >> shift;
    const std::uint64_t rest = significand & ((1ULL << shift) - 1), tie = 1ULL << (shift - 1);
    if (rest > tie || (rest == tie && (n & 1))) ++n;
    // a normal's exponent field is (e + bias), its quanta count n holds the implicit bit; a carry out of
    // the mantissa steps the exponent, a subnormal's n of 2^mantissa is the least normal
    const std::uint64_t bits = (static_cast<std::uint64_t>((e > e_min ? e : e_min) + bias - 1) << mantissa) + n;
    if (bits >= (static_cast<std::uint64_t>(max_field) << mantissa)) return inf;
    return static_cast<unsigned short>(sign | bits);
}
}  // namespace minidl_emu

// The operators CUDA's headers define on a 16-bit type T (cuda_fp16.h and cuda_bf16.h each instantiate
// them): arithmetic through the type's intrinsics (__hadd ... __hneg, overloaded on T), comparisons in float
// through TO_FLOAT (a NaN compares unequal, and false otherwise).
#define MINIDL_EMU_16BIT_OPERATORS(T, TO_FLOAT)                                           \
    inline T operator+(const T& a, const T& b) { return __hadd(a, b); }                  \
    inline T operator-(const T& a, const T& b) { return __hsub(a, b); }                  \
    inline T operator*(const T& a, const T& b) { return __hmul(a, b); }                  \
    inline T operator/(const T& a, const T& b) { return __hdiv(a, b); }                  \
    inline T& operator+=(T& a, const T& b) { return a = __hadd(a, b); }                  \
    inline T& operator-=(T& a, const T& b) { return a = __hsub(a, b); }                  \
    inline T& operator*=(T& a, const T& b) { return a = __hmul(a, b); }                  \
    inline T& operator/=(T& a, const T& b) { return a = __hdiv(a, b); }                  \
    inline T operator+(const T& a) { return a; }                                         \
    inline T operator-(const T& a) { return __hneg(a); }                                 \
    inline bool operator==(const T& a, const T& b) { return TO_FLOAT(a) == TO_FLOAT(b); } \
    inline bool operator!=(const T& a, const T& b) { return TO_FLOAT(a) != TO_FLOAT(b); } \
    inline bool operator<(const T& a, const T& b) { return TO_FLOAT(a) < TO_FLOAT(b); }   \
    inline bool operator>(const T& a, const T& b) { return TO_FLOAT(a) > TO_FLOAT(b); }   \
    inline bool operator<=(const T& a, const T& b) { return TO_FLOAT(a) <= TO_FLOAT(b); } \
    inline bool operator>=(const T& a, const T& b) { return TO_FLOAT(a) >= TO_FLOAT(b); }
