// One early-exit decision on CPU: ann_kernels::early_exit_step (schema in csrc/ops.cpp).
//
// For the M still-active samples of a batch of N (original positions `active_index` [M]):
//   1. confidence and argmax of every logit row [M, C] (row math in
//      csrc/include/ann_kernels/early_exit.h, the code the CUDA kernel runs too);
//   2. the exit decision: confidence >= threshold (threshold mode, exit_count = -1), or
//      the `exit_count` most confident rows (quota mode; ties by row order; NaN
//      confidences, from rows with a non-finite maximum, never exit there);
//   3. prediction / exit_index / confidence of the exiting rows written into the [N]
//      output buffers at their original positions;
//   4. returns the survivors' original positions [R], their row numbers in this call
//      (`keep_local` [R], to gather further hidden tensors with index_select), and the
//      rows of `hidden` [M, ...] that survive, gathered into a new [R, ...] tensor of the
//      same memory format (channels_last in, channels_last out).
//
// Cost model (batch 256 x C = 10): the Python -> dispatcher call (~5 us) dominates; the
// row math is ~2 us, the gather is a memcpy per row. Hence: one serial pass for the
// decision and compaction, OpenMP only for large blocks (rows or bytes), no host-side
// allocation beyond the returned tensors and three small scratch vectors.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <ann_kernels/early_exit.h>

#include "../hidden_rows.h"
#include "ce_row_kernels.h"  // exp8, hsum8, tail_mask (AVX2), shared with the loss kernel

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

namespace ann_kernels {
namespace {

using at::Tensor;

// Work sizes below which a serial loop beats an OpenMP fork/join (~2-5 us on 2 cores).
constexpr int64_t kParallelLogitElements = int64_t{1} << 16;
constexpr int64_t kParallelGatherBytes = int64_t{1} << 20;

// Confidence rows on CPU: the AVX2 layouts and the portable fallback.
#if defined(ANN_KERNELS_AVX2)
// Largest class count handled by the eight-rows-per-vector layout (tile on the stack).
constexpr int64_t kBlockClasses = 16;

// Rows [r0, r0 + num_rows) (num_rows <= 8, C <= kBlockClasses), one row per vector lane:
// transpose into a [C][8] fp32 tile, then per lane top / first argmax (strict >, so each
// lane keeps its first maximum), the runner-up (margin only), the exp sums, and the
// confidence by the shared exit_confidence. Rows holding a NaN (seen as a NaN raw sum;
// inf - inf false alarms are harmless) take the scalar path, for torch's NaN rules.
template <typename scalar_t, int64_t kCriterion>
void block8_confidence(const scalar_t* logits, int64_t row_stride, int64_t col_stride, int64_t C, int64_t r0,
                       int num_rows, float* confidence, int64_t* argmax) {
  alignas(32) float tile[kBlockClasses][8];
  for (int l = 0; l < 8; ++l) {
    const scalar_t* row = logits + (r0 + (l < num_rows ? l : 0)) * row_stride;  // padding repeats row r0
    for (int64_t c = 0; c < C; ++c) tile[c][l] = static_cast<float>(row[c * col_stride]);
  }
  const __m256 neg_inf = _mm256_set1_ps(-INFINITY);
  __m256 top = neg_inf, second = neg_inf, raw_sum = _mm256_setzero_ps();
  __m256i top_idx = _mm256_setzero_si256();
  for (int64_t c = 0; c < C; ++c) {
    const __m256 v = _mm256_load_ps(tile[c]);
    const __m256 gt = _mm256_cmp_ps(v, top, _CMP_GT_OQ);
    raw_sum = _mm256_add_ps(raw_sum, v);
    if constexpr (kCriterion == kMargin) second = _mm256_blendv_ps(_mm256_max_ps(second, v), top, gt);
    top = _mm256_blendv_ps(top, v, gt);
    top_idx = _mm256_blendv_epi8(top_idx, _mm256_set1_epi32(static_cast<int32_t>(c)), _mm256_castps_si256(gt));
  }
  // With every logit = -inf the strict > never fires: the first index, as torch.argmax.
  __m256 sum_exp = _mm256_setzero_ps(), sum_exp_shift = _mm256_setzero_ps();
  for (int64_t c = 0; c < C; ++c) {
    const __m256 shifted = _mm256_sub_ps(_mm256_load_ps(tile[c]), top);
    const __m256 e = exp8(shifted);
    sum_exp = _mm256_add_ps(sum_exp, e);
    if constexpr (kCriterion == kEntropy) {
      const __m256 keep = _mm256_cmp_ps(shifted, _mm256_set1_ps(-87.0f), _CMP_GT_OQ);
      sum_exp_shift = _mm256_add_ps(sum_exp_shift, _mm256_and_ps(_mm256_mul_ps(e, shifted), keep));
    }
  }
  alignas(32) float lane_top[8], lane_second[8], lane_sum[8], lane_shift[8];
  alignas(32) int32_t lane_idx[8];
  _mm256_store_ps(lane_top, top);
  _mm256_store_ps(lane_second, second);
  _mm256_store_ps(lane_sum, sum_exp);
  _mm256_store_ps(lane_shift, sum_exp_shift);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lane_idx), top_idx);
  const int nan_lanes = _mm256_movemask_ps(_mm256_cmp_ps(raw_sum, raw_sum, _CMP_UNORD_Q));
  for (int l = 0; l < num_rows; ++l) {
    const int64_t i = r0 + l;
    if (nan_lanes & (1 << l)) {
      const scalar_t* row = logits + i * row_stride;
      auto load = [row, col_stride](int64_t c) { return static_cast<float>(row[c * col_stride]); };
      confidence[i] = row_exit_confidence(load, C, kCriterion, &argmax[i]);
      continue;
    }
    const RowTop2 summary{lane_top[l], lane_second[l], lane_idx[l]};
    argmax[i] = summary.argmax;
    confidence[i] = exit_confidence(kCriterion, summary, lane_sum[l], lane_shift[l], C);
  }
}

// One contiguous fp32 row with many classes, 8 classes per vector (tails masked).
void row_confidence_wide(const float* row, int64_t C, int64_t criterion, float* confidence, int64_t* argmax) {
  const __m256 neg_inf = _mm256_set1_ps(-INFINITY);
  __m256 vmax = neg_inf, has_nan = _mm256_setzero_ps();
  for (int64_t c = 0; c < C; c += 8) {
    const __m256i m = tail_mask(C - c);
    const __m256 v = _mm256_blendv_ps(neg_inf, _mm256_maskload_ps(row + c, m), _mm256_castsi256_ps(m));
    has_nan = _mm256_or_ps(has_nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(vmax, v);
  }
  if (_mm256_movemask_ps(has_nan)) {
    *confidence = row_exit_confidence([row](int64_t c) { return row[c]; }, C, criterion, argmax);
    return;
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  RowTop2 summary{lanes[0], -INFINITY, 0};
  for (int l = 1; l < 8; ++l) summary.top = lanes[l] > summary.top ? lanes[l] : summary.top;
  const __m256 vtop = _mm256_set1_ps(summary.top);
  for (int64_t c = 0; c < C; c += 8) {  // first index of the maximum
    const __m256i m = tail_mask(C - c);
    // Masked load: the tail lanes read nothing (an unmasked load here read up to 28 bytes
    // past the row, past the tensor for its last row).
    const int hits = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(_mm256_maskload_ps(row + c, m), vtop, _CMP_EQ_OQ),
                                                      _mm256_castsi256_ps(m)));
    if (hits) {
      summary.argmax = c + __builtin_ctz(static_cast<unsigned>(hits));
      break;
    }
  }
  const __m256 cutoff = _mm256_set1_ps(-87.0f);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 sum_exp = _mm256_setzero_ps(), sum_exp_shift = _mm256_setzero_ps(), vsecond = neg_inf;
  for (int64_t c = 0; c < C; c += 8) {
    const __m256i m = tail_mask(C - c);
    const __m256 valid = _mm256_castsi256_ps(m);
    const __m256 v = _mm256_blendv_ps(neg_inf, _mm256_maskload_ps(row + c, m), valid);
    const __m256 shifted = _mm256_sub_ps(v, vtop);
    const __m256 e = _mm256_and_ps(exp8(shifted), valid);
    sum_exp = _mm256_add_ps(sum_exp, e);
    if (criterion == kEntropy) {
      const __m256 keep = _mm256_cmp_ps(shifted, cutoff, _CMP_GT_OQ);
      sum_exp_shift = _mm256_add_ps(sum_exp_shift, _mm256_and_ps(_mm256_mul_ps(e, shifted), keep));
    } else if (criterion == kMargin) {  // runner-up: the maximum over every class but argmax
      const __m256i is_arg = _mm256_cmpeq_epi32(_mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int32_t>(c))),
                                                _mm256_set1_epi32(static_cast<int32_t>(summary.argmax)));
      vsecond = _mm256_max_ps(vsecond, _mm256_blendv_ps(v, neg_inf, _mm256_castsi256_ps(is_arg)));
    }
  }
  if (criterion == kMargin) {
    _mm256_store_ps(lanes, vsecond);
    for (int l = 0; l < 8; ++l) summary.second = lanes[l] > summary.second ? lanes[l] : summary.second;
  }
  *argmax = summary.argmax;
  *confidence = exit_confidence(criterion, summary, hsum8(sum_exp), hsum8(sum_exp_shift), C);
}
#endif  // ANN_KERNELS_AVX2

// Confidence and argmax of rows [begin, end) of a [M, C] logits block with strides
// (row_stride, col_stride) in elements.
template <typename scalar_t>
void rows_confidence(const scalar_t* logits, int64_t row_stride, int64_t col_stride, int64_t C, int64_t criterion,
                     int64_t begin, int64_t end, float* confidence, int64_t* argmax) {
#if defined(ANN_KERNELS_AVX2)
  if (C <= kBlockClasses) {
    auto blocks = [&](auto criterion_constant) {
      constexpr int64_t kCriterion = decltype(criterion_constant)::value;
      for (int64_t r0 = begin; r0 < end; r0 += 8) {
        block8_confidence<scalar_t, kCriterion>(logits, row_stride, col_stride, C, r0,
                                                static_cast<int>(std::min<int64_t>(8, end - r0)), confidence,
                                                argmax);
      }
    };
    if (criterion == kEntropy) {
      blocks(std::integral_constant<int64_t, kEntropy>{});
    } else if (criterion == kMargin) {
      blocks(std::integral_constant<int64_t, kMargin>{});
    } else {
      blocks(std::integral_constant<int64_t, kMaxProb>{});
    }
    return;
  }
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (col_stride == 1) {
      for (int64_t i = begin; i < end; ++i)
        row_confidence_wide(logits + i * row_stride, C, criterion, &confidence[i], &argmax[i]);
      return;
    }
  }
#endif
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* row = logits + i * row_stride;
    auto load = [row, col_stride](int64_t c) { return static_cast<float>(row[c * col_stride]); };
    confidence[i] = row_exit_confidence(load, C, criterion, &argmax[i]);
  }
}

void check_buffer(const Tensor& t, const char* name, at::ScalarType dtype, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), "early_exit_step: ", name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "early_exit_step: ", name, ": expected dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.is_contiguous(), "early_exit_step: ", name,
              ": expected a contiguous [N] = [", n, "] tensor, got shape ", t.sizes());
}

// Rows of `hidden` [M, ...] listed in keep_local [R], as a new [R, ...] tensor in hidden's
// layout (channels_last stays channels_last: csrc/hidden_rows.h), one memcpy per row.
Tensor gather_rows(const Tensor& hidden, const int64_t* keep_local, int64_t R) {
  const HiddenRowBlocks blocks = hidden_row_blocks(hidden);
  std::vector<int64_t> shape = hidden.sizes().vec();
  shape[0] = R;
  Tensor out = at::detail::empty_strided_cpu(shape, blocks.strides, hidden.scalar_type());
  const int64_t row_bytes = blocks.row_bytes;
  if (R == 0 || row_bytes == 0) return out;
  const char* src = static_cast<const char*>(blocks.source.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  auto copy_rows = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) std::memcpy(dst + r * row_bytes, src + keep_local[r] * row_bytes, row_bytes);
  };
  if (R * row_bytes >= kParallelGatherBytes) {
    at::parallel_for(0, R, std::max<int64_t>(1, kParallelGatherBytes / 4 / std::max<int64_t>(row_bytes, 1)),
                     copy_rows);
  } else {
    copy_rows(0, R);
  }
  return out;
}

std::tuple<Tensor, Tensor, Tensor> early_exit_step_cpu(const Tensor& logits, const Tensor& active_index,
                                                       const std::optional<Tensor>& hidden,
                                                       const Tensor& prediction, const Tensor& exit_index,
                                                       const Tensor& confidence, double threshold,
                                                       int64_t criterion, int64_t exit_id, int64_t exit_count) {
  // ---- arguments
  TORCH_CHECK(logits.dim() == 2, "early_exit_step: logits: expected [M, C], got shape ", logits.sizes());
  TORCH_CHECK(logits.device().is_cpu(), "early_exit_step: logits: expected a CPU tensor, got ", logits.device());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "early_exit_step: logits: expected float32, float16 or bfloat16, got ", dtype);
  const int64_t M = logits.size(0), C = logits.size(1);
  TORCH_CHECK(C >= 1, "early_exit_step: logits: no classes (C = 0)");
  TORCH_CHECK(active_index.device().is_cpu() && active_index.scalar_type() == at::kLong && active_index.dim() == 1 &&
                  active_index.size(0) == M,
              "early_exit_step: active_index: expected a CPU int64 [M] = [", M, "] tensor, got ",
              active_index.scalar_type(), " of shape ", active_index.sizes(), " on ", active_index.device());
  const int64_t N = prediction.numel();
  check_buffer(prediction, "prediction", at::kLong, N);
  check_buffer(exit_index, "exit_index", at::kLong, N);
  check_buffer(confidence, "confidence", at::kFloat, N);
  TORCH_CHECK(!std::isnan(threshold), "early_exit_step: threshold: must not be NaN");
  TORCH_CHECK(criterion == kMaxProb || criterion == kEntropy || criterion == kMargin,
              "early_exit_step: criterion: expected 0 (max_prob), 1 (entropy) or 2 (margin), got ", criterion);
  TORCH_CHECK(exit_count >= -1, "early_exit_step: exit_count: expected -1 (threshold mode) or >= 0, got ",
              exit_count);
  if (hidden.has_value()) {
    TORCH_CHECK(hidden->device().is_cpu(), "early_exit_step: hidden: expected a CPU tensor, got ", hidden->device());
    TORCH_CHECK(hidden->dim() >= 1 && hidden->size(0) == M, "early_exit_step: hidden: expected batch dim 0 of size M = ",
                M, ", got shape ", hidden->sizes());
  }

  const Tensor active = active_index.contiguous();
  const int64_t* orig = active.const_data_ptr<int64_t>();
  int64_t* pred_out = prediction.mutable_data_ptr<int64_t>();
  int64_t* exit_out = exit_index.mutable_data_ptr<int64_t>();
  float* conf_out = confidence.mutable_data_ptr<float>();
  const float thr = static_cast<float>(threshold);

  // ---- 1 + 2. confidence, argmax and the decision of every row
  std::vector<uint8_t> exits(M, 0);
  std::vector<float> row_conf;
  std::vector<int64_t> row_argmax;
  int64_t num_exit = 0;
  const bool nobody_exits = exit_count == 0 || (exit_count < 0 && thr == INFINITY);
  if (!nobody_exits && M > 0) {
    row_conf.resize(M);
    row_argmax.resize(M);
    AT_DISPATCH_SWITCH(dtype, "early_exit_step_cpu",
                       AT_DISPATCH_CASE(at::kFloat, [&] {
                         const scalar_t* x = logits.const_data_ptr<scalar_t>();
                         auto body = [&](int64_t b, int64_t e) {
                           rows_confidence(x, logits.stride(0), logits.stride(1), C, criterion, b, e,
                                           row_conf.data(), row_argmax.data());
                         };
                         if (M * C >= kParallelLogitElements) at::parallel_for(0, M, 64, body); else body(0, M);
                       })
                       AT_DISPATCH_CASE(at::kHalf, [&] {
                         rows_confidence(logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1), C,
                                         criterion, 0, M, row_conf.data(), row_argmax.data());
                       })
                       AT_DISPATCH_CASE(at::kBFloat16, [&] {
                         rows_confidence(logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1), C,
                                         criterion, 0, M, row_conf.data(), row_argmax.data());
                       }));
    if (exit_count < 0) {
      for (int64_t i = 0; i < M; ++i) {
        exits[i] = row_exits(row_conf[i], thr);
        num_exit += exits[i];
      }
    } else {
      // Quota: the exit_count most confident eligible (non-NaN) rows (confidence
      // descending, then row ascending); fewer when fewer rows are eligible.
      std::vector<int64_t> order;
      order.reserve(M);
      for (int64_t i = 0; i < M; ++i)
        if (exit_eligible(row_conf[i])) order.push_back(i);
      const int64_t count = std::min<int64_t>(exit_count, static_cast<int64_t>(order.size()));
      const float* conf_ptr = row_conf.data();
      auto more_confident = [conf_ptr](int64_t a, int64_t b) {
        return conf_ptr[a] > conf_ptr[b] || (conf_ptr[a] == conf_ptr[b] && a < b);
      };
      if (count < static_cast<int64_t>(order.size()))
        std::nth_element(order.begin(), order.begin() + count, order.end(), more_confident);
      for (int64_t j = 0; j < count; ++j) exits[order[j]] = 1;
      num_exit = count;
    }
  }

  // ---- 3 + 4. scatter the exiting rows, compact the survivors (one serial pass)
  const int64_t R = M - num_exit;
  // at::detail::empty_cpu: the CPU allocation without a dispatcher round trip (~0.3 us each).
  Tensor survivor_index = at::detail::empty_cpu({R}, at::kLong);
  Tensor keep_local = at::detail::empty_cpu({R}, at::kLong);
  int64_t* surv = survivor_index.mutable_data_ptr<int64_t>();
  int64_t* keep = keep_local.mutable_data_ptr<int64_t>();
  int64_t r = 0;
  for (int64_t i = 0; i < M; ++i) {
    const int64_t o = orig[i];
    TORCH_CHECK(o >= 0 && o < N, "early_exit_step: active_index[", i, "] = ", o,
                " is out of range for output buffers of size N = ", N);
    if (exits[i]) {
      pred_out[o] = row_argmax[i];
      exit_out[o] = exit_id;
      conf_out[o] = row_conf[i];
    } else {
      keep[r] = i;
      surv[r] = o;
      ++r;
    }
  }
  Tensor hidden_survivors = hidden.has_value() ? gather_rows(*hidden, keep, R)
                                               : at::detail::empty_cpu({0}, logits.scalar_type());
  return {std::move(survivor_index), std::move(keep_local), std::move(hidden_survivors)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ann_kernels, CPU, m) { m.impl("early_exit_step", &early_exit_step_cpu); }

}  // namespace ann_kernels
