// 16-bit logit rows, shared by the logits op (multi_exit_ce_rows.h) and the linear op
// (multi_exit_linear_ce_lowp.h): conversions of a row between bf16 / fp16 and fp32, and which
// 16-bit dtypes the vector paths read in place (Row16 in ce_row_kernels.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "ce_row_kernels.h"

#include <cstdint>
#include <type_traits>

namespace ann_kernels {

// A logits row -> fp32 and an fp32 gradient row -> the logits dtype (vectorised for bf16
// and, with F16C, fp16; otherwise c10's scalar conversions).
template <typename scalar_t>
inline void row_to_float(const scalar_t* x, int64_t C, float* out) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    bf16_row_to_float(reinterpret_cast<const uint16_t*>(x), C, out);
#if defined(ANN_KERNELS_F16C)
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    f16_row_to_float(reinterpret_cast<const uint16_t*>(x), C, out);
#endif
  } else {
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<float>(x[c]);
  }
}

template <typename scalar_t>
inline void float_to_row(const float* x, int64_t C, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    float_row_to_bf16(x, C, reinterpret_cast<uint16_t*>(out));
#if defined(ANN_KERNELS_F16C)
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    float_row_to_f16(x, C, reinterpret_cast<uint16_t*>(out));
#endif
  } else {
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(x[c]);
  }
}

// Which 16-bit rows the row loops read in place (Row16 in ce_row_kernels.h): bf16 with AVX2, fp16
// with AVX2 + F16C; kHalf16Of names the format.
template <typename scalar_t>
constexpr bool kRow16InPlace =
#if defined(ANN_KERNELS_AVX2)
    std::is_same_v<scalar_t, c10::BFloat16>
#if defined(ANN_KERNELS_F16C)
    || std::is_same_v<scalar_t, c10::Half>
#endif
#else
    false
#endif
    ;  // NOLINT(whitespace/semicolon)

#if defined(ANN_KERNELS_AVX2)
template <typename scalar_t>
constexpr Half16 kHalf16Of = std::is_same_v<scalar_t, c10::BFloat16> ? Half16::kBF16 : Half16::kF16;
#endif

}  // namespace ann_kernels
