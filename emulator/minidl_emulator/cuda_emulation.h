// CUDA C++ as plain C++ for g++: kernel_runner.py force-includes this header
// (-include) before a .cu source, so the project's unchanged kernels compile
// for the CPU. A launch runs every block and thread one after another on one
// host thread, so only kernels whose threads do not talk to each other can run:
// shared memory and barriers are compile errors here, never silently wrong.
#pragma once

#include <cmath>

// Kernel and function qualifiers: everything is host code here. (__restrict__
// is a g++ keyword already and needs nothing.)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)

// The emulator marshals `long` as int64, as it is on the LP64 hosts CUDA supports.
static_assert(sizeof(long) == 8, "the CUDA emulator needs an LP64 host (64-bit long)");

// What threads could share is refused at compile time: the emulator runs a
// block's threads one after another, so a barrier would deadlock or, worse,
// pass with the wrong values. The message appears in g++'s diagnostics.
#define __shared__ \
    _Pragma("GCC error \"__shared__ memory is not supported: the CUDA emulator runs threads one after another\"")
#define __syncthreads() \
    _Pragma("GCC error \"__syncthreads() is not supported: the CUDA emulator runs threads one after another\"") \
    ((void)0)

// Atomics and fences, as CUDA defines them (each returns the old value). Threads run one after another, so
// a plain read-modify-write would do for one launch; GCC's atomic builtins keep them atomic should two host
// threads ever share memory. What a kernel builds on them (the last thread of a group to arrive, found with
// a counter after __threadfence(), as in CUDA's threadFenceReduction sample) runs as it would on a GPU.
// No floating-point atomicAdd: on a GPU the order of the additions, so the result, varies from run to run,
// which threads run in order here would hide.
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline int atomicAdd(int* address, int val) { return __atomic_fetch_add(address, val, __ATOMIC_SEQ_CST); }
inline unsigned int atomicAdd(unsigned int* address, unsigned int val) {
    return __atomic_fetch_add(address, val, __ATOMIC_SEQ_CST);
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long val) {
    return __atomic_fetch_add(address, val, __ATOMIC_SEQ_CST);
}
// ((old >= val) ? 0 : (old + 1)), stored; the old value returned
inline unsigned int atomicInc(unsigned int* address, unsigned int val) {
    unsigned int old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
    while (!__atomic_compare_exchange_n(address, &old, old >= val ? 0u : old + 1u, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {
    }
    return old;
}

// CUDA's index types: uint3 for indices, dim3 for sizes (1 where not given).
struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The launcher sets these before each thread's call. thread_local, because two
// Python threads may run kernels at once (ctypes releases the GIL); static, so
// each compiled module has its own. Kernels see them read-only, as in CUDA.
namespace minidl_emu {
static thread_local uint3 block_idx, thread_idx;
static thread_local dim3 block_dim, grid_dim;
inline const uint3& read_only(const uint3& v) { return v; }
inline const dim3& read_only(const dim3& v) { return v; }
}  // namespace minidl_emu
#define blockIdx (::minidl_emu::read_only(::minidl_emu::block_idx))
#define threadIdx (::minidl_emu::read_only(::minidl_emu::thread_idx))
#define blockDim (::minidl_emu::read_only(::minidl_emu::block_dim))
#define gridDim (::minidl_emu::read_only(::minidl_emu::grid_dim))

// Math as device code sees it: the C functions (expf, powf, logf, sqrtf, fmaxf,
// ... are global already through <cmath>'s <math.h>) and the C++ overloads for
// float and double in the global namespace, so pow(float, float) is a float.
using std::abs;
using std::acos;
using std::acosh;
using std::asin;
using std::asinh;
using std::atan;
using std::atan2;
using std::atanh;
using std::cbrt;
using std::ceil;
using std::copysign;
using std::cos;
using std::cosh;
using std::erf;
using std::erfc;
using std::exp;
using std::exp2;
using std::expm1;
using std::fabs;
using std::fdim;
using std::floor;
using std::fma;
using std::fmax;
using std::fmin;
using std::fmod;
using std::hypot;
using std::isfinite;
using std::isinf;
using std::isnan;
using std::ldexp;
using std::lgamma;
using std::log;
using std::log10;
using std::log1p;
using std::log2;
using std::pow;
using std::round;
using std::rint;
using std::signbit;
using std::sin;
using std::sinh;
using std::sqrt;
using std::tan;
using std::tanh;
using std::tgamma;
using std::trunc;

// CUDA has these where C++ does not, or with another result type:
// pow(float, int) is a float in CUDA (std::pow would promote it to double).
inline float pow(float a, int b) { return std::pow(a, static_cast<float>(b)); }
inline double pow(double a, int b) { return std::pow(a, static_cast<double>(b)); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline float rsqrt(float a) { return rsqrtf(a); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }

// CUDA's min and max: exactly the overloads of its math_functions.hpp, so a
// call nvcc finds ambiguous (min(int, long long)) is ambiguous here too. The
// mixed signed/unsigned ones compare as unsigned, and the floating-point ones
// are fmin/fmax (a NaN loses), as in CUDA.
#define MINIDL_EMU_MIN_MAX(R, A, B)                                                   \
    inline R min(const A a, const B b) {                                              \
        return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); \
    }                                                                                 \
    inline R max(const A a, const B b) {                                              \
        return static_cast<R>(a) > static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); \
    }
MINIDL_EMU_MIN_MAX(int, int, int)
MINIDL_EMU_MIN_MAX(unsigned int, unsigned int, unsigned int)
MINIDL_EMU_MIN_MAX(unsigned int, int, unsigned int)
MINIDL_EMU_MIN_MAX(unsigned int, unsigned int, int)
MINIDL_EMU_MIN_MAX(long, long, long)
MINIDL_EMU_MIN_MAX(unsigned long, unsigned long, unsigned long)
MINIDL_EMU_MIN_MAX(unsigned long, long, unsigned long)
MINIDL_EMU_MIN_MAX(unsigned long, unsigned long, long)
MINIDL_EMU_MIN_MAX(long long, long long, long long)
MINIDL_EMU_MIN_MAX(unsigned long long, unsigned long long, unsigned long long)
MINIDL_EMU_MIN_MAX(unsigned long long, long long, unsigned long long)
MINIDL_EMU_MIN_MAX(unsigned long long, unsigned long long, long long)
#undef MINIDL_EMU_MIN_MAX
inline float min(const float a, const float b) { return fminf(a, b); }
inline float max(const float a, const float b) { return fmaxf(a, b); }
inline double min(const double a, const double b) { return fmin(a, b); }
inline double max(const double a, const double b) { return fmax(a, b); }
inline double min(const float a, const double b) { return fmin(static_cast<double>(a), b); }
inline double max(const float a, const double b) { return fmax(static_cast<double>(a), b); }
inline double min(const double a, const float b) { return fmin(a, static_cast<double>(b)); }
inline double max(const double a, const float b) { return fmax(a, static_cast<double>(b)); }
