// Host-side checks shared by the CPU loss ops (multi_exit_ce.cpp, multi_exit_linear_ce.cpp):
// one rule for weight values on every op.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>

namespace ann_kernels {

// True for a plain eager CPU tensor; false under tracing (fake / functional tensors carry
// the Python key), where reading the value would be a data-dependent branch.
inline bool is_plain_cpu(const at::Tensor& t) {
  return t.defined() && t.device().is_cpu() && !t.key_set().has(c10::DispatchKey::Python) &&
         !t.key_set().has(c10::DispatchKey::Functionalize);
}

// Values of a [K] weight vector (or [K, N] / [N] sample weights) checked on the host: only
// where that read is free (plain CPU tensors). NaN is rejected (it would silently poison
// the loss and every gradient); so is a negative exit weight. Negative sample weights are
// allowed (`allow_negative`): L2W-DEN's W = 1 + eps (g - mean g) goes below 0 for
// eps > 0.5, as in the original. On CUDA nothing is read (a check would synchronise): NaN
// weights give a NaN loss and NaN gradients there. `op` prefixes the message.
inline void check_weight_values(const at::Tensor& t, const char* op, const char* name, bool allow_negative = false) {
  if (!is_plain_cpu(t)) return;
  at::NoGradGuard no_grad;  // a read, not part of any graph (weights may require grad)
  const at::Tensor v = t.to(at::kFloat).contiguous().view(-1);
  const float* p = v.data_ptr<float>();
  const int64_t cols = t.dim() == 2 ? t.size(1) : 0;
  for (int64_t j = 0; j < v.numel(); ++j) {
    if (p[j] >= 0.f || (allow_negative && !std::isnan(p[j]))) continue;
    const std::string where = cols > 0 ? std::to_string(j / cols) + ", " + std::to_string(j % cols)
                                       : std::to_string(j);
    TORCH_CHECK_VALUE(!std::isnan(p[j]), op, name, ": must not be NaN, got ", name, "[", where, "] = nan");
    TORCH_CHECK_VALUE(false, op, name, ": must be non-negative, got ", name, "[", where, "] = ", p[j]);
  }
}

}  // namespace ann_kernels
