// Header-only row math shared by the CPU kernels (csrc/cpu) and the CUDA kernels
// (csrc/cuda). Everything here is a plain inline function on raw values or pointers,
// marked __host__ __device__ under nvcc, so the CPU tests exercise the very code the
// GPU kernels run. No torch headers: nvcc must compile this without them.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ANN_HD __host__ __device__ __forceinline__
#else
#define ANN_HD inline
#endif

namespace ann_kernels {

// exp(x) in fp32, branch-free so that loops calling it vectorise (Cephes expf scheme):
//   1. clamp x to the range where 2^n is a normal float (|n| <= 126);
//   2. n = round(x / ln 2), r = x - n ln 2 with ln 2 split in two parts (exact product
//      for the high part, 0.693359375 has 9 significant bits);
//   3. exp(r) by the degree-6 Cephes minimax polynomial on |r| <= ln2/2 (~1 ulp);
//   4. scale by 2^n, built directly in the exponent bits.
// Inputs below -87.34 return ~1.2e-38 instead of 0: the only caller subtracts the row
// maximum first, so such terms are < 1e-38 of the row sum either way.
ANN_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  // Ternaries, not fminf/fmaxf: those keep NaN semantics and are calls, not min/max ops.
  x = x < -87.3365447505f ? -87.3365447505f : x;
  x = x > 88.0f ? 88.0f : x;
  // Round to nearest by adding and subtracting 1.5 * 2^23 (no call to floorf/rintf, so
  // SSE2-only builds vectorise too; valid for |x / ln 2| < 2^22).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return y * __builtin_bit_cast(float, bits);  // memcpy here blocks vectorisation
#endif
}

}  // namespace ann_kernels
