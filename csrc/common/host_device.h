// Qualifiers and scalar helpers usable from both host C++ and CUDA device code.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define FR_HD __host__ __device__ __forceinline__
#else
#define FR_HD inline
#endif

// Vectorise the loop that follows along its own (contiguous) index. GCC
// otherwise fully unrolls short fixed-count row loops and vectorises the
// strided outer index instead, which leaves scalar FMAs. Device code runs
// one matrix per thread, so there it is a no-op.
#if defined(__CUDA_ARCH__) || !defined(_OPENMP)
#define FR_SIMD
#else
#define FR_SIMD _Pragma("omp simd")
#endif

namespace fedrot {

FR_HD float fr_sqrt(float x) { return sqrtf(x); }
FR_HD double fr_sqrt(double x) { return sqrt(x); }
FR_HD float fr_abs(float x) { return fabsf(x); }
FR_HD double fr_abs(double x) { return fabs(x); }
template <typename T> FR_HD T fr_max(T a, T b) { return a > b ? a : b; }
// x - x is 0 for finite x and NaN for ±Inf or NaN (no -ffast-math anywhere).
template <typename T> FR_HD bool fr_isfinite(T x) { return x - x == T(0); }

}  // namespace fedrot
