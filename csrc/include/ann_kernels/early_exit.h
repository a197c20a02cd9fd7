// Header-only exit-confidence math of the early-exit op, shared by the CPU kernel
// (csrc/cpu/early_exit.cpp) and the CUDA kernel (csrc/cuda/early_exit_kernel.cu).
// Plain inline functions on raw values, __host__ __device__ under nvcc, no torch headers.
//
// A row of logits z [C] is summarised in two passes:
//   1. row_top2:      top = max_c z_c, its first index (torch.argmax's tie rule, NaN counts
//                     as the maximum), and the runner-up value `second`;
//   2. the sums       s = sum_c exp(z_c - top),  t = sum_c exp(z_c - top) * (z_c - top)
//                     (accumulate_exp_terms; t is only needed for the entropy);
// then exit_confidence turns (top, second, s, t, C) into the confidence of a criterion:
//   max_prob  p_max = 1 / s                                        in (0, 1]
//   margin    p_top1 - p_top2 = (1 - exp(second - top)) / s         in [0, 1]
//   entropy   1 - H / log C with H = log s - t / s (nats)           in [0, 1]  (1 for C = 1)
// Higher is always more confident; a sample exits when confidence >= threshold, and a
// threshold of -inf makes every row exit (NaN confidences included).
//
// Non-finite logits, one rule on every backend (CPU, CUDA, the pure-torch reference):
// torch.softmax of a row is NaN exactly when the row maximum is not finite (a NaN; a +inf,
// since inf - inf = NaN; or every logit -inf), so such a row's confidence is NaN on every
// criterion. A NaN confidence never reaches a threshold and is never picked by a quota:
// the row leaves only where every row must (threshold -inf: the last exit, a deadline).
// -inf logits beside a finite maximum are probability 0, as in torch. Finite rows give
// confidences clamped to [0, 1] (rounding could otherwise put an entropy at 1 + 1e-7).
#pragma once

#include <ann_kernels/row_math.h>

#include <cmath>
#include <cstdint>

namespace ann_kernels {

// Criterion codes, shared with ann_kernels/ops/early_exit.py (CRITERIA).
enum ExitCriterion : int64_t { kMaxProb = 0, kEntropy = 1, kMargin = 2 };

struct RowTop2 {
  float top;       // max_c z_c (NaN if the row holds a NaN)
  float second;    // the largest value left after removing one copy of `top` (-inf for C = 1)
  int64_t argmax;  // first index of `top` (first NaN if any)
};

// Pass 1 over a row: `load(c)` returns z_c as float for c in [0, C), C >= 1.
template <typename Load>
ANN_HD RowTop2 row_top2(Load load, int64_t C) {
  RowTop2 r{load(0), -INFINITY, 0};
  for (int64_t c = 1; c < C; ++c) {
    const float v = load(c);
    // Strict >: the first maximum keeps the index. A NaN becomes the maximum once (like
    // torch.argmax); later values never replace a NaN top.
    if (v > r.top || (v != v && r.top == r.top)) {
      r.second = r.top;
      r.top = v;
      r.argmax = c;
    } else if (v > r.second) {
      r.second = v;
    }
  }
  return r;
}

// One term of pass 2: adds e = exp(z - top) to `sum_exp` and, when `with_entropy`,
// e * (z - top) to `sum_exp_shift`. The product is skipped below exp's clamp range
// (-87.3), where fast_exp returns ~1e-38 instead of 0 and z - top may be -inf.
ANN_HD void accumulate_exp_term(float z, float top, bool with_entropy, float& sum_exp, float& sum_exp_shift) {
  const float shifted = z - top;
  const float e = fast_exp(shifted);
  sum_exp += e;
  if (with_entropy && shifted > -87.0f) sum_exp_shift += e * shifted;
}

// False when torch.softmax of the row is NaN: its maximum is NaN, +inf or -inf (all -inf).
ANN_HD bool row_is_finite(const RowTop2& r) { return fabsf(r.top) <= 3.402823466e38f; }

// x clamped to [0, 1] (x finite).
ANN_HD float clamp_unit(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }

// Confidence of one row from its pass-1 summary and pass-2 sums (see the file comment).
// Confidence in [0, 1], NaN for a row whose maximum is not finite (see the file comment).
ANN_HD float exit_confidence(int64_t criterion, const RowTop2& r, float sum_exp, float sum_exp_shift, int64_t C) {
  if (!row_is_finite(r)) return NAN;
  const float inv_sum = 1.0f / sum_exp;  // sum_exp >= 1: the maximum's own term is exp(0) = 1
  if (criterion == kMargin) {
    return clamp_unit((1.0f - fast_exp(r.second - r.top)) * inv_sum);
  }
  if (criterion == kEntropy) {
    if (C < 2) return 1.0f;  // one class: certain
    const float entropy = logf(sum_exp) - sum_exp_shift * inv_sum;
    return clamp_unit(1.0f - entropy / logf(static_cast<float>(C)));
  }
  return clamp_unit(inv_sum);  // kMaxProb
}

// Both passes for a row read through `load` (the CPU scalar path: fp16 / bf16 rows with
// C > 16 and strided rows; the CUDA kernel's NaN rows). The sums run in 8 interleaved
// partial accumulators: one sequential fp32 sum over C = 32000 terms drifts by up to 5e-5
// on a confidence (measured against torch's cascade sum), 8 partial sums stay near the
// 8-lane vector path's few 1e-6.
template <typename Load>
ANN_HD float row_exit_confidence(Load load, int64_t C, int64_t criterion, int64_t* argmax) {
  const RowTop2 r = row_top2(load, C);
  const bool with_entropy = criterion == kEntropy;
  constexpr int kPartial = 8;
  float part_exp[kPartial] = {}, part_shift[kPartial] = {};
  int64_t c = 0;
  for (; c + kPartial <= C; c += kPartial) {
    for (int j = 0; j < kPartial; ++j)
      accumulate_exp_term(load(c + j), r.top, with_entropy, part_exp[j], part_shift[j]);
  }
  for (int j = 0; c < C; ++c, ++j) accumulate_exp_term(load(c), r.top, with_entropy, part_exp[j], part_shift[j]);
  float sum_exp = 0.0f, sum_exp_shift = 0.0f;
  for (int j = 0; j < kPartial; ++j) {
    sum_exp += part_exp[j];
    sum_exp_shift += part_shift[j];
  }
  *argmax = r.argmax;
  return exit_confidence(criterion, r, sum_exp, sum_exp_shift, C);
}

// The exit decision: confidence >= threshold, and every row (NaN included) at -inf.
ANN_HD bool row_exits(float confidence, float threshold) {
  return threshold == -INFINITY || confidence >= threshold;
}

// Quota mode (the `count` most confident rows exit): a NaN confidence is never eligible, so
// at most the number of non-NaN rows exit; among eligible rows, ties go to the lower row.
ANN_HD bool exit_eligible(float confidence) { return confidence == confidence; }

}  // namespace ann_kernels
