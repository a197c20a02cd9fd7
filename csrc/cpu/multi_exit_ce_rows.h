// The row loops of the fused multi-exit cross-entropy on CPU (included by
// multi_exit_ce.cpp only): the forward over every (exit, row) pair, and the deferred
// backward from the saved lse. The per-row math is in ce_row_kernels.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "ce_row_kernels.h"
#include "row16.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace ann_kernels {
namespace multi_exit_ce_detail {

using at::Tensor;

struct CeRowsArgs {
  int64_t K, N, C;
  const int64_t* y;
  int64_t ignore_index;
  float eps, inv_n_valid;
  const float* w;         // [K] exit weights (with grad_out folded in, in backward)
  const float* s;         // per-sample weights, s[k * s_stride_k + i]; nullptr = all ones
  int64_t s_stride_k;     // N for [K, N] sample weights, 0 for [N]
  float* loss_row;        // [K, N] out (forward only)
  float* conf_row;        // [K, N] out (forward only)
  int64_t* pred_row;      // [K, N] out (forward only)
  float* lse_row;         // [K, N] out, or nullptr (forward); in (backward)
  bool compute_grad;
  float grad_pow2 = 1.f;  // 2^m_safe: the fp16 gradient buffer's exact power-of-two pre-scale (1 otherwise)
  float requant = 1.f;    // 2^(m - m_safe) <= 1: fp16's hinted buffer (see requantize_row); 1 otherwise
};

// fp16's hinted buffer (multi_exit_ce.cpp, kGradBufferPow2Hinted): a gradient row written at
// 2^m_safe is multiplied in fp32 by 2^(m - m_safe) and rounded to fp16 again: the very
// operations the backward's in-place scale by grad_out 2^-m_safe performs when grad_out =
// 2^m. So a buffer handed over untouched has the bits of the reference path (stored at
// m_safe, then scaled), whatever m the hint chose. The row is still in cache: no memory pass.
template <typename scalar_t>
inline void requantize_row(scalar_t* g, int64_t C, float factor) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
#if defined(ANN_KERNELS_F16C)
    scale_f16_in_place(reinterpret_cast<uint16_t*>(g), C, factor);  // as multi_exit_ce_scale_cpu
#else
    for (int64_t c = 0; c < C; ++c) g[c] = static_cast<c10::Half>(static_cast<float>(g[c]) * factor);
#endif
  }
}

// The gradient scale of row (k, i): 2^m w_k s_ik / N_valid, 0 on ignored rows (2^m = 1 but
// for the fp16 gradient buffer; a power of two, so it changes no rounding).
inline float row_scale(const CeRowsArgs& a, int64_t k, int64_t i, bool valid) {
  if (!valid) return 0.f;
  const float base = a.w[k] * a.inv_n_valid * a.grad_pow2;
  return a.s == nullptr ? base : base * a.s[k * a.s_stride_k + i];
}

// Steps 2-5 for every (exit, row) pair, in parallel. Each row's results depend on that
// row only and the per-exit sums happen serially afterwards, so nothing depends on the
// thread count.
template <typename scalar_t>
void ce_rows(const std::vector<Tensor>& rows, const Tensor& grads, const CeRowsArgs& a) {
  const int64_t K = a.K, N = a.N, C = a.C;
  std::vector<const scalar_t*> x_ptr(K);
  std::vector<int64_t> x_row_stride(K);
  std::vector<scalar_t*> g_ptr(K, nullptr);
  for (int64_t k = 0; k < K; ++k) {
    x_ptr[k] = rows[k].data_ptr<scalar_t>();
    x_row_stride[k] = rows[k].stride(0);
    if (a.compute_grad) g_ptr[k] = grads.data_ptr<scalar_t>() + k * N * C;
  }
  constexpr bool kFloatIn = std::is_same_v<scalar_t, float>;
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  // Grain: ~16K logits per task keeps OpenMP's fork cost (~5 us) below the work.
  const int64_t grain = std::max<int64_t>(1, 16384 / C);
  at::parallel_for(0, K * N, grain, [&](int64_t begin, int64_t end) {
#if defined(ANN_KERNELS_AVX2)
    if (C <= kSmallClasses) {
      // Few classes: eight rows per vector, one row per lane (ce_row_kernels.h).
      for (int64_t r0 = begin; r0 < end; r0 += 8) {
        const int num_lanes = static_cast<int>(std::min<int64_t>(8, end - r0));
        BlockLane<scalar_t> lanes[8];
        BlockResult results[8];
        for (int l = 0; l < num_lanes; ++l) {
          const int64_t r = r0 + l, k = r / N, i = r - k * N, y = a.y[i];
          const bool valid = y != a.ignore_index;
          lanes[l] = {x_ptr[k] + i * x_row_stride[k], a.compute_grad ? g_ptr[k] + i * C : nullptr, y,
                      row_scale(a, k, i, valid)};
        }
        block8_small_classes(lanes, num_lanes, C, a.eps, a.ignore_index, a.compute_grad, results);
        for (int l = 0; l < num_lanes; ++l) {
          const BlockResult& res = results[l];
          const bool valid = lanes[l].target != a.ignore_index;
          if (!res.finite) {
            nonfinite_row(lanes[l].x, C, lanes[l].target, valid, a.eps, lanes[l].scale, lanes[l].g,
                          &a.loss_row[r0 + l], &a.conf_row[r0 + l], &a.pred_row[r0 + l]);
            if (a.lse_row) a.lse_row[r0 + l] = kNaN;  // backward redoes such rows in IEEE arithmetic
            continue;
          }
          a.loss_row[r0 + l] = valid ? smoothed_row_loss(res.lse, res.x_target, res.sum_x, C, a.eps) : 0.f;
          a.conf_row[r0 + l] = res.conf;
          a.pred_row[r0 + l] = res.argmax;
          if (a.lse_row) a.lse_row[r0 + l] = res.lse;
        }
        if (a.compute_grad && a.requant != 1.f) {
          for (int l = 0; l < num_lanes; ++l) requantize_row(lanes[l].g, C, a.requant);
        }
      }
      return;
    }
#endif
    // 16-bit rows the vector path reads in place (Row16) need no fp32 copy: scratch holds
    // only the numerator e; other 16-bit rows are copied to fp32 first.
    constexpr bool kInPlace16 = kRow16InPlace<scalar_t>;
    std::vector<float> scratch;
    if (!kFloatIn || !a.compute_grad) scratch.resize(kFloatIn || kInPlace16 ? C : 2 * C);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t k = r / N;
      const int64_t i = r - k * N;
      const scalar_t* x = x_ptr[k] + i * x_row_stride[k];
      const float* xf = nullptr;
      float* e;
      if constexpr (kFloatIn) {
        xf = x;
        e = a.compute_grad ? g_ptr[k] + i * C : scratch.data();
      } else if constexpr (kInPlace16) {
        e = scratch.data();
      } else {
        float* xs = scratch.data() + C;
        row_to_float(x, C, xs);
        xf = xs;
        e = scratch.data();
      }
      const int64_t yi = a.y[i];
      const bool valid = yi != a.ignore_index;
      const float scale = row_scale(a, k, i, valid);
      RowStats st;
      bool finite;
#if defined(ANN_KERNELS_AVX2)
      if constexpr (kInPlace16) {
        finite = row_softmax_numerator_in(Row16<kHalf16Of<scalar_t>>{reinterpret_cast<const uint16_t*>(x)}, C, e, &st);
      } else  // NOLINT(readability/braces)
#endif
      {
        finite = row_softmax_numerator(xf, C, e, &st);
      }
      if (!finite) {  // a NaN or infinite maximum: the IEEE path
        nonfinite_row(x, C, yi, valid, a.eps, scale, a.compute_grad ? g_ptr[k] + i * C : nullptr, &a.loss_row[r],
                      &a.conf_row[r], &a.pred_row[r]);
        if (a.lse_row) a.lse_row[r] = kNaN;
        if (a.compute_grad && a.requant != 1.f) requantize_row(g_ptr[k] + i * C, C, a.requant);
        continue;
      }
      const float lse = st.max + std::log(st.sum_exp);
      // 3. l = (1-e)(lse - z_y) + e(lse - mean_c z_c); ignored rows contribute 0.
      const float x_target = !valid ? 0.f : kInPlace16 ? static_cast<float>(x[yi]) : static_cast<float>(xf[yi]);
      a.loss_row[r] = valid ? smoothed_row_loss(lse, x_target, st.sum_x, C, a.eps) : 0.f;
      // 4. max softmax probability = exp(max - lse) = 1 / sum_exp.
      a.conf_row[r] = 1.f / st.sum_exp;
      a.pred_row[r] = st.argmax;
      if (a.lse_row) a.lse_row[r] = lse;
      if (!a.compute_grad) continue;
      // 5. g = scale * (e_c / sum_exp - eps / C - (1 - eps)[c = y]), scale = w_k s_ik / N_valid.
#if defined(ANN_KERNELS_AVX2)
      if constexpr (kInPlace16) {  // affine and rounding in one pass (affine_row_to16)
        uint16_t* g = reinterpret_cast<uint16_t*>(g_ptr[k] + i * C);
        if (scale == 0.f) {
          std::fill(g, g + C, uint16_t{0});  // +0.0 in bf16 and fp16
        } else {
          constexpr Half16 kD = kHalf16Of<scalar_t>;
          const float ga = scale / st.sum_exp, gb = scale * a.eps / static_cast<float>(C);
          affine_row_to16<kD>(e, C, ga, gb, g);
          g[yi] = affine_value_to16<kD>(e[yi], ga, gb, scale * (1.f - a.eps));
        }
        if (a.requant != 1.f) requantize_row(g_ptr[k] + i * C, C, a.requant);
        continue;
      }
#endif
      if (scale == 0.f) {
        std::fill(e, e + C, 0.f);
      } else {
        row_affine(e, C, scale / st.sum_exp, scale * a.eps / static_cast<float>(C));
        e[yi] -= scale * (1.f - a.eps);
      }
      if constexpr (!kFloatIn) float_to_row(e, C, g_ptr[k] + i * C);
      if (a.requant != 1.f) requantize_row(g_ptr[k] + i * C, C, a.requant);
    }
  });
}

// The deferred backward: g_ikc = grad_out w_k s_ik / N_valid (softmax_c - (1-e)[c = y] - e/C)
// from the saved lse, computed in fp32 and rounded once to the logits dtype (grad_out is
// folded into a.w by the caller). Rows whose lse is not finite take the IEEE path.
template <typename scalar_t>
void ce_grad_rows(const std::vector<Tensor>& rows, const Tensor& grads, const CeRowsArgs& a) {
  const int64_t K = a.K, N = a.N, C = a.C;
  std::vector<const scalar_t*> x_ptr(K);
  std::vector<int64_t> x_row_stride(K);
  for (int64_t k = 0; k < K; ++k) {
    x_ptr[k] = rows[k].data_ptr<scalar_t>();
    x_row_stride[k] = rows[k].stride(0);
  }
  scalar_t* g_base = grads.data_ptr<scalar_t>();
  constexpr bool kFloatIn = std::is_same_v<scalar_t, float>;
  const int64_t grain = std::max<int64_t>(1, 16384 / C);
  at::parallel_for(0, K * N, grain, [&](int64_t begin, int64_t end) {
    float dummy_loss, dummy_conf;
    int64_t dummy_pred;
#if defined(ANN_KERNELS_AVX2)
    if (C <= kSmallClasses) {
      // Few classes: the forward's eight-rows-per-vector block again, with the backward's
      // scale (grad_out folded in); at this size cheaper than the per-row lse path.
      for (int64_t r0 = begin; r0 < end; r0 += 8) {
        const int num_lanes = static_cast<int>(std::min<int64_t>(8, end - r0));
        BlockLane<scalar_t> lanes[8];
        BlockResult results[8];
        for (int l = 0; l < num_lanes; ++l) {
          const int64_t r = r0 + l, k = r / N, i = r - k * N, y = a.y[i];
          lanes[l] = {x_ptr[k] + i * x_row_stride[k], g_base + r * C, y, row_scale(a, k, i, y != a.ignore_index)};
        }
        block8_small_classes(lanes, num_lanes, C, a.eps, a.ignore_index, true, results);
        for (int l = 0; l < num_lanes; ++l) {
          if (results[l].finite) continue;
          nonfinite_row(lanes[l].x, C, lanes[l].target, lanes[l].target != a.ignore_index, a.eps, lanes[l].scale,
                        lanes[l].g, &dummy_loss, &dummy_conf, &dummy_pred);
        }
      }
      return;
    }
#endif
    std::vector<float> scratch(kFloatIn ? 0 : 2 * C);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t k = r / N, i = r - k * N, yi = a.y[i];
      const bool valid = yi != a.ignore_index;
      const float scale = row_scale(a, k, i, valid);
      const scalar_t* x = x_ptr[k] + i * x_row_stride[k];
      scalar_t* g = g_base + r * C;
      if (scale == 0.f) {
        std::fill(g, g + C, static_cast<scalar_t>(0.f));
        continue;
      }
      const float lse = a.lse_row[r];
      if (!std::isfinite(lse)) {
        nonfinite_row(x, C, yi, valid, a.eps, scale, g, &dummy_loss, &dummy_conf, &dummy_pred);
        continue;
      }
      const float* xf;
      float* gf;
      if constexpr (kFloatIn) {
        xf = x;
        gf = g;
      } else {
        float* xs = scratch.data();
        row_to_float(x, C, xs);
        xf = xs;
        gf = scratch.data() + C;
      }
      row_grad_from_lse(xf, C, lse, scale, scale * a.eps / static_cast<float>(C), gf);
      gf[yi] -= scale * (1.f - a.eps);
      if constexpr (!kFloatIn) float_to_row(gf, C, g);
    }
  });
}

}  // namespace multi_exit_ce_detail
}  // namespace ann_kernels
