// Fused multi-exit cross-entropy on CPU, its argument check and its C++ autograd
// (device-agnostic: the CUDA kernels behind the `_multi_exit_ce_*` backend ops are Triton,
// registered from Python).
//
// One pass over each logit row (k, i) gives: lse, the per-sample loss, max-probability
// confidence, argmax and the gradient of the weighted, averaged loss
//     g_ikc = w_k s_ik / N_valid * (softmax(z_ik)_c - (1-e)[c = y_i] - e/C)
// in the logits dtype (fp16: times an exact power of two 2^m that keeps it inside fp16's
// range), which backward hands over for grad_out = 1 (2^m = 1) and scales in place by
// grad_out (* 2^-m) otherwise.
// Precision design and bound: docs/low_precision.md.
// Row loops: multi_exit_ce_rows.h; row math: ce_row_kernels.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <ann_kernels/row_math.h>

#include "buffer_pool.h"
#include "ce_row_kernels.h"
#include "multi_exit_ce_rows.h"
#include "weight_checks.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace ann_kernels {
namespace {

using at::Tensor;

using namespace multi_exit_ce_detail;

using OptTensor = std::optional<Tensor>;

}  // namespace

// Every argument check, with the messages of the Python validation (ValueError / TypeError
// naming the argument). The one check of every device path: the op's Autograd and
// CompositeExplicitAutograd kernels run it once per call before dispatching to the CPU
// kernel here or the CUDA (Triton) kernel, and the pure-torch reference calls it through
// `ann_kernels._C.check_multi_exit_ce_inputs`. The backend ops (`_multi_exit_ce_*`) do not
// repeat it (the CPU kernel still range-checks targets, which it reads anyway).
void check_multi_exit_ce_inputs(at::TensorList logits, const Tensor& target, const OptTensor& weights,
                                const OptTensor& sample_weights, double label_smoothing, const OptTensor& ema,
                                double momentum) {
  const char* op = "multi_exit_cross_entropy: ";
  TORCH_CHECK_VALUE(!logits.empty(), op, "logits: expected at least one exit, got 0");
  const auto& first = logits[0];
  const int64_t K = static_cast<int64_t>(logits.size());
  for (int64_t k = 0; k < K; ++k) {
    const auto& z = logits[k];
    TORCH_CHECK_TYPE(z.scalar_type() == at::kFloat || z.scalar_type() == at::kBFloat16 ||
                         z.scalar_type() == at::kHalf,
                     op, "logits[", k, "]: expected float32, bfloat16 or float16, got ", z.scalar_type());
    TORCH_CHECK_VALUE(z.dim() == 2, op, "logits[", k, "]: expected shape [N, C], got ", z.sizes());
    TORCH_CHECK_VALUE(z.sizes() == first.sizes(), op, "logits[", k, "] has shape ", z.sizes(),
                      " but logits[0] has ", first.sizes(),
                      ": every exit needs the same batch size N and class count C");
    TORCH_CHECK_TYPE(z.scalar_type() == first.scalar_type(), op, "logits[", k, "] has dtype ",
                     z.scalar_type(), " but logits[0] has ", first.scalar_type());
    TORCH_CHECK_VALUE(z.device() == first.device(), op, "logits[", k, "] is on ", z.device(),
                      " but logits[0] is on ", first.device());
  }
  TORCH_CHECK_VALUE(first.size(0) > 0, op, "logits: empty batch (N = 0)");
  TORCH_CHECK_VALUE(first.size(1) > 0, op, "logits: no classes (C = 0)");
  const int64_t N = first.size(0);
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op, "target: expected int64 class indices, got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == N, op, "target: expected shape [", N,
                    "] (one class per row), got ", target.sizes());
  TORCH_CHECK_VALUE(target.device() == first.device(), op, "target is on ", target.device(),
                    " but logits are on ", first.device());
  if (weights.has_value() && weights->defined()) {
    TORCH_CHECK_VALUE(weights->dim() == 1 && weights->size(0) == K, op, "weights: expected ", K,
                      " values (one per exit), got shape ", weights->sizes());
    TORCH_CHECK_VALUE(weights->device() == first.device(), op, "weights is on ", weights->device(),
                      " but logits are on ", first.device());
    TORCH_CHECK_TYPE(at::isFloatingType(weights->scalar_type()) || !weights->requires_grad(), op,
                     "weights: expected a floating-point tensor, got ", weights->scalar_type());
    check_weight_values(*weights, op, "weights");
  }
  if (sample_weights.has_value() && sample_weights->defined()) {
    const Tensor& s = *sample_weights;
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, op, "sample_weights: expected float32, got ", s.scalar_type());
    TORCH_CHECK_VALUE((s.dim() == 1 && s.size(0) == N) || (s.dim() == 2 && s.size(0) == K && s.size(1) == N), op,
                      "sample_weights: expected shape [", N, "] or [", K, ", ", N, "], got ", s.sizes());
    TORCH_CHECK_VALUE(s.device() == first.device(), op, "sample_weights is on ", s.device(), " but logits are on ",
                      first.device());
    check_weight_values(s, op, "sample_weights", /*allow_negative=*/true);
  }
  if (ema.has_value()) {
    TORCH_CHECK_VALUE(ema->dim() == 1 && ema->size(0) == K && ema->scalar_type() == at::kFloat, op,
                      "ema: expected a float32 tensor of shape [", K, "], got ", ema->scalar_type(),
                      " of shape ", ema->sizes());
    TORCH_CHECK_VALUE(ema->device() == first.device(), op, "ema is on ", ema->device(), " but logits are on ",
                      first.device());
  }
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
                    "label_smoothing: expected a value in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(momentum >= 0.0 && momentum < 1.0, op, "momentum: expected a value in [0, 1), got ", momentum);
}

namespace {

// grad_mode of the backend forward.
constexpr int64_t kNoGrad = 0;    // no gradient work at all
constexpr int64_t kGradBuffer = 1;  // the gradient w_k s_ik / N_valid (p - t), in the logits dtype
constexpr int64_t kSaveLse = 2;   // only lse [K, N] fp32, for the deferred backward
// fp16's gradient buffer: 2^m w_k s_ik / N_valid (p - t) in the logits dtype, m chosen per
// call; the sixth output is then [2] fp32 {2^-m, 2^-m_safe} (see pow2_exponents).
constexpr int64_t kGradBufferPow2 = 3;        // m = m_safe
constexpr int64_t kGradBufferPow2Hinted = 4;  // m = min(m_safe, the last backward's log2 grad_out); same bits

// The fp16 buffer's exponent: with S = max_ik |w_k s_ik / N_valid| (the largest row scale)
// and |p - t| <= 1, m_safe = 15 - e for S = f 2^e (f in [0.5, 1)) puts every stored value
// below 2^15 (fp16's max is 65504 ~ 2^16): no overflow whatever the weights, while the
// stored values use fp16's range from the top, so that any later |grad_out 2^-m| <= 1
// only shrinks them (nothing lost that the final fp16 gradient could hold). S = 0 or not
// finite: m = 0. Clamped to [-120, 120] (2^m and 2^-m normal fp32).
int pow2_exponent_safe(float max_scale) {
  if (!(max_scale > 0.f) || !std::isfinite(max_scale)) return 0;
  int e = 0;
  std::frexp(max_scale, &e);
  return std::clamp(15 - e, -120, 120);
}

// The last positive power-of-two grad_out a CPU fp16 backward saw, as log2 (GradScaler's
// scale, 1, 1 / accumulation_steps), or kNoHint. The next fp16 forward stores its gradient
// at m = min(m_safe, hint), each row computed at m_safe, rounded, then multiplied by
// 2^(m - m_safe) and rounded again (requantize_row): when the guess is right, grad_out 2^-m
// = 1 and backward hands the buffer over untouched (no pass over it), with exactly the bits
// the reference path (stored at m_safe, scaled by grad_out 2^-m_safe in backward) gives.
// When the guess is wrong (grad_out != 2^m, m < m_safe), backward recomputes the buffer at
// m_safe and scales it: the reference path. So the hint changes speed, never a bit of the
// gradient (tests/test_multi_exit_ce_training.py checks it against the reference path after
// every order of grad_outs); a race on it between threads is harmless for the same reason.
constexpr int kNoHint = std::numeric_limits<int>::min();
std::atomic<int> fp16_grad_out_log2_hint{kNoHint};

void remember_grad_out(double grad_out) {
  int e = 0;
  const double f = std::frexp(grad_out, &e);
  fp16_grad_out_log2_hint.store(f == 0.5 && e - 1 >= -120 && e - 1 <= 120 ? e - 1 : kNoHint,
                                std::memory_order_relaxed);
}

using FwdResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Fwd7 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// Step 1 shared by forward and backward: targets' range check and N_valid (serial, N << N*C).
int64_t count_valid(const int64_t* y, int64_t N, int64_t C, int64_t ignore_index) {
  int64_t n_valid = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (y[i] == ignore_index) continue;
    TORCH_CHECK_VALUE(y[i] >= 0 && y[i] < C, "multi_exit_cross_entropy: target[", i, "] = ", y[i],
                      " is out of range for ", C, " classes (expected 0 <= target < ", C,
                      " or ignore_index = ", ignore_index, ")");
    ++n_valid;
  }
  return n_valid;
}

std::vector<float> weight_values(const OptTensor& weights, int64_t K, double factor) {
  std::vector<float> w(K, static_cast<float>(factor));
  if (weights.has_value() && weights->defined()) {
    const Tensor wd = weights->to(at::kDouble).contiguous();
    for (int64_t k = 0; k < K; ++k) w[k] = static_cast<float>(wd.data_ptr<double>()[k] * factor);
  }
  return w;
}

std::vector<Tensor> unit_stride_rows(at::TensorList logits) {
  std::vector<Tensor> rows(logits.size());
  for (size_t k = 0; k < logits.size(); ++k) rows[k] = logits[k].stride(1) == 1 ? logits[k] : logits[k].contiguous();
  return rows;
}

#define ANN_DISPATCH_LOGITS(dtype, ...)                                             \
  AT_DISPATCH_SWITCH(dtype, "multi_exit_ce_cpu",                                    \
                     AT_DISPATCH_CASE(at::kFloat, [&] { __VA_ARGS__; })             \
                     AT_DISPATCH_CASE(at::kHalf, [&] { __VA_ARGS__; })              \
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { __VA_ARGS__; }))

// `_multi_exit_ce_forward` on CPU (arguments already checked by the caller).
Fwd7 multi_exit_ce_forward_cpu(at::TensorList logits, const Tensor& target, const OptTensor& weights,
                               const OptTensor& sample_weights, int64_t ignore_index, double label_smoothing,
                               const OptTensor& ema, double momentum, int64_t grad_mode) {
  const int64_t K = static_cast<int64_t>(logits.size());
  const int64_t N = logits[0].size(0);
  const int64_t C = logits[0].size(1);
  const Tensor target_c = target.contiguous();
  const int64_t* y = target_c.data_ptr<int64_t>();
  const int64_t n_valid = count_valid(y, N, C, ignore_index);
  const float inv_n_valid = n_valid > 0 ? 1.f / static_cast<float>(n_valid) : 0.f;
  const std::vector<float> w = weight_values(weights, K, 1.0);
  const bool has_s = sample_weights.has_value() && sample_weights->defined();
  const Tensor s = has_s ? sample_weights->contiguous() : Tensor();
  const std::vector<Tensor> rows = unit_stride_rows(logits);

  const auto f32 = logits[0].options().dtype(at::kFloat);
  Tensor per_sample = at::empty({K, N}, f32);
  Tensor confidence = at::empty({K, N}, f32);
  Tensor prediction = at::empty({K, N}, logits[0].options().dtype(at::kLong));
  const bool pow2 = grad_mode == kGradBufferPow2 || grad_mode == kGradBufferPow2Hinted;
  const bool buffer = grad_mode == kGradBuffer || pow2;
  Tensor lse = grad_mode == kSaveLse ? at::empty({K, N}, f32) : at::empty({pow2 ? 2 : 0}, f32);
  Tensor grads = buffer ? BufferPool::instance().empty({K, N, C}, logits[0].options())
                        : at::empty({0}, logits[0].options());
  float* loss_row = per_sample.data_ptr<float>();
  CeRowsArgs args{K, N, C, y, ignore_index, static_cast<float>(label_smoothing), inv_n_valid, w.data(),
                  has_s ? s.data_ptr<float>() : nullptr, has_s && s.dim() == 2 ? N : 0, loss_row,
                  confidence.data_ptr<float>(), prediction.data_ptr<int64_t>(),
                  grad_mode == kSaveLse ? lse.data_ptr<float>() : nullptr, buffer};
  if (pow2) {
    // The largest row scale |w_k inv_n_valid s_ik| over valid rows, in the fp32 products
    // row_scale forms (rounding is monotone, so the product of the maxima is the maximum).
    float max_scale = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      float s_max = 1.f;
      if (has_s) {
        s_max = 0.f;
        for (int64_t i = 0; i < N; ++i) {
          if (y[i] != ignore_index) s_max = std::max(s_max, std::abs(args.s[k * args.s_stride_k + i]));
        }
      }
      max_scale = std::max(max_scale, std::abs(w[k] * inv_n_valid) * s_max);
    }
    const int m_safe = pow2_exponent_safe(max_scale);
    const int hint = fp16_grad_out_log2_hint.load(std::memory_order_relaxed);
    const int m = grad_mode == kGradBufferPow2Hinted && hint != kNoHint ? std::min(m_safe, hint) : m_safe;
    args.grad_pow2 = std::ldexp(1.f, m_safe);
    args.requant = std::ldexp(1.f, m - m_safe);  // exact (m - m_safe in [-240, 0]: see requantize_row)
    lse.data_ptr<float>()[0] = std::ldexp(1.f, -m);
    lse.data_ptr<float>()[1] = std::ldexp(1.f, -m_safe);
  }
  ANN_DISPATCH_LOGITS(logits[0].scalar_type(), ce_rows<scalar_t>(rows, grads, args));

  // 6. Per-exit means (unweighted) and the weighted loss sum_k w_k sum_i s_ik l_ik / N_valid,
  //    in a fixed order (double accumulation).
  Tensor per_exit = at::empty({K}, f32);
  float* per_exit_ptr = per_exit.data_ptr<float>();
  double loss_acc = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    double acc = 0.0, weighted = 0.0;
    for (int64_t i = 0; i < N; ++i) {
      acc += loss_row[k * N + i];
      if (has_s) weighted += static_cast<double>(args.s[k * args.s_stride_k + i]) * loss_row[k * N + i];
    }
    per_exit_ptr[k] = static_cast<float>(acc * static_cast<double>(inv_n_valid));
    const double exit_term = has_s ? weighted * static_cast<double>(inv_n_valid) : per_exit_ptr[k];
    loss_acc += static_cast<double>(w[k]) * exit_term;
  }
  Tensor loss = at::scalar_tensor(loss_acc, f32);

  // 7. AdaLoss running average, in place: NaN = unset takes the first finite L_k; a
  //    non-finite L_k never enters the state.
  if (ema.has_value()) {
    auto acc = ema->accessor<float, 1>();
    const float m = static_cast<float>(momentum);
    for (int64_t k = 0; k < K; ++k) {
      const float l = per_exit_ptr[k];
      if (!std::isfinite(l)) continue;
      acc[k] = std::isnan(acc[k]) ? l : m * acc[k] + (1.f - m) * l;
    }
  }
  return {loss, per_exit, per_sample, confidence, prediction, lse, std::move(grads)};
}

// `_multi_exit_ce_backward` on CPU: the [K, N, C] gradient for grad_out = grad_loss, from
// the saved lse, in one pass, grad_out folded into the fp32 scale before rounding.
Tensor multi_exit_ce_backward_cpu(const Tensor& grad_loss, at::TensorList logits, const Tensor& target,
                                  const OptTensor& weights, const OptTensor& sample_weights, const Tensor& lse,
                                  int64_t ignore_index, double label_smoothing) {
  const int64_t K = static_cast<int64_t>(logits.size());
  const int64_t N = logits[0].size(0);
  const int64_t C = logits[0].size(1);
  const Tensor target_c = target.contiguous();
  const int64_t* y = target_c.data_ptr<int64_t>();
  const int64_t n_valid = count_valid(y, N, C, ignore_index);
  const double grad_out = grad_loss.item<double>();
  // w_k * grad_out / N_valid in double, rounded once to fp32 (0 when no row is valid).
  const std::vector<float> w = weight_values(weights, K, n_valid > 0 ? grad_out / static_cast<double>(n_valid) : 0.0);
  const bool has_s = sample_weights.has_value() && sample_weights->defined();
  const Tensor s = has_s ? sample_weights->contiguous() : Tensor();
  const Tensor lse_c = lse.contiguous();
  const std::vector<Tensor> rows = unit_stride_rows(logits);
  Tensor grads = BufferPool::instance().empty({K, N, C}, logits[0].options());
  CeRowsArgs args{K, N, C, y, ignore_index, static_cast<float>(label_smoothing), 1.f, w.data(),
                  has_s ? s.data_ptr<float>() : nullptr, has_s && s.dim() == 2 ? N : 0, nullptr, nullptr, nullptr,
                  const_cast<float*>(lse_c.data_ptr<float>()), true};
  ANN_DISPATCH_LOGITS(logits[0].scalar_type(), ce_grad_rows<scalar_t>(rows, grads, args));
  return grads;
}

// `_multi_exit_ce_scale_` on CPU: grads *= grad_loss in place, skipped when grad_loss == 1.
// bf16 (and any non-contiguous buffer): ATen's mul_ computes g * grad_out in fp32 and rounds
// once to the buffer's dtype.
void multi_exit_ce_scale_cpu(const Tensor& grads, const Tensor& grad_loss) {
  const float factor = grad_loss.item<float>();
  if (factor == 1.f) return;
#if defined(ANN_KERNELS_F16C)
  if (grads.scalar_type() == at::kHalf && grads.is_contiguous()) {  // fp16: g * factor in fp32, rounded once
    uint16_t* g = reinterpret_cast<uint16_t*>(grads.data_ptr<at::Half>());
    at::parallel_for(0, grads.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
      scale_f16_in_place(g + begin, end - begin, factor);
    });
    return;
  }
#endif
  if (grads.scalar_type() != at::kFloat || !grads.is_contiguous()) {
    grads.mul_(static_cast<double>(factor));
    return;
  }
  float* g = grads.data_ptr<float>();
  at::parallel_for(0, grads.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    scale_in_place(g + begin, end - begin, factor);
  });
}

// ---------------------------------------------------------------------------------------
// Autograd (C++, to keep the per-call overhead of a training step low).

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const c10::TypedOperatorHandle<Fwd7(at::TensorList, const Tensor&, const OptTensor&, const OptTensor&, int64_t,
                                    double, const OptTensor&, double, int64_t)>&
forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ann_kernels::_multi_exit_ce_forward", "")
                             .typed<Fwd7(at::TensorList, const Tensor&, const OptTensor&, const OptTensor&, int64_t,
                                         double, const OptTensor&, double, int64_t)>();
  return op;
}

const c10::TypedOperatorHandle<void(const Tensor&, const Tensor&)>& scale_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ann_kernels::_multi_exit_ce_scale_", "")
                             .typed<void(const Tensor&, const Tensor&)>();
  return op;
}

// The in-place write to `ema` made visible to autograd (its version counter), as the
// ADInplaceOrView kernel of a mutating ATen op does.
void bump_ema_version(const OptTensor& ema) {
  if (ema.has_value() && ema->defined() && !ema->is_inference()) torch::autograd::impl::bump_version(*ema);
}

OptTensor as_opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The backward as differentiable ATen ops, for create_graph=True (double backward):
// gradients w.r.t. logits, weights and sample weights, each a function of grad_out, the
// logits and both weights that autograd can differentiate again.
std::tuple<std::vector<Tensor>, Tensor, Tensor> composite_backward(const Tensor& grad_out,
                                                                   const std::vector<Tensor>& logits,
                                                                   const Tensor& target, const Tensor& weights,
                                                                   const Tensor& sample_weights, int64_t ignore_index,
                                                                   double eps) {
  const int64_t K = static_cast<int64_t>(logits.size());
  const int64_t C = logits[0].size(1);
  const Tensor z = at::stack(logits).to(at::kFloat);  // [K, N, C]
  const Tensor logp = at::log_softmax(z, -1);
  const Tensor valid = target.ne(ignore_index);
  const Tensor validf = valid.to(at::kFloat);
  const Tensor n_valid = validf.sum().clamp_min(1.0);
  const Tensor y = at::where(valid, target, at::zeros_like(target));
  const Tensor nll = -logp.gather(2, y.view({1, -1, 1}).expand({K, -1, 1})).squeeze(2);  // [K, N]
  Tensor l = eps > 0 ? nll * (1.0 - eps) + (-logp.mean(-1)) * eps : nll;
  l = at::where(valid.unsqueeze(0), l, at::zeros_like(l));
  const Tensor w = weights.defined() ? weights.to(at::kFloat) : at::ones({K}, z.options());
  const Tensor s = sample_weights.defined() ? (sample_weights.dim() == 1 ? sample_weights.unsqueeze(0) : sample_weights)
                                            : at::ones({1, target.size(0)}, z.options());
  const Tensor go = grad_out.to(at::kFloat);
  const Tensor coef = go * w.unsqueeze(1) * s * validf.unsqueeze(0) / n_valid;  // [K, N]
  const Tensor t = at::one_hot(y, C).to(at::kFloat) * (1.0 - eps) + eps / static_cast<double>(C);
  const Tensor dz = coef.unsqueeze(2) * (logp.exp() - t.unsqueeze(0));
  std::vector<Tensor> grads(K);
  for (int64_t k = 0; k < K; ++k) grads[k] = dz.select(0, k).to(logits[k].scalar_type());
  Tensor dw, ds;
  if (weights.defined()) dw = (go * (s * l).sum(1) / n_valid).to(weights.scalar_type());
  if (sample_weights.defined()) {
    ds = go * w.unsqueeze(1) * l / n_valid;
    if (sample_weights.dim() == 1) ds = ds.sum(0);
  }
  return {grads, dw, ds};
}

class MultiExitCE : public torch::autograd::Function<MultiExitCE> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList logits, const Tensor& target,
                               const OptTensor& weights, const OptTensor& sample_weights, int64_t ignore_index,
                               double label_smoothing, const OptTensor& ema, double momentum, bool logits_need_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // Keep the pre-scaled gradient w_k s_ik / N_valid (p - t) in the logits dtype (one read
    // + one write of the logits in all); backward hands it over for grad_out = 1 and scales
    // it in place otherwise (exact for powers of two; else one more rounding, inside the
    // bound of docs/low_precision.md). bf16 has fp32's exponent range, so neither the stored
    // nor the scaled value leaves it. fp16 does not (65504 .. 2^-24): its buffer is stored
    // times 2^m, m chosen from the largest row scale so that nothing overflows and the
    // values sit at the top of fp16's range; backward multiplies by grad_out 2^-m. Plain
    // CPU tensors also guess m from the last grad_out (kGradBufferPow2Hinted), so that a
    // steady GradScaler scale or grad_out = 1 needs no pass over the buffer at all.
    const bool fp16 = logits[0].scalar_type() == at::kHalf;
    const int64_t mode = !logits_need_grad ? kNoGrad
                         : !fp16           ? kGradBuffer
                         : is_plain_cpu(logits[0]) ? kGradBufferPow2Hinted
                                                   : kGradBufferPow2;
    auto [loss, per_exit, per_sample, confidence, prediction, lse, grads] =
        forward_op().call(logits, target, weights, sample_weights, ignore_index, label_smoothing, ema, momentum, mode);
    ctx->set_materialize_grads(false);
    // The logits are kept (references, no copy) for the deferred backward, a recompute if
    // a retained graph runs backward again after the buffer was handed over, and create_graph.
    std::vector<Tensor> saved(logits.begin(), logits.end());
    saved.push_back(target);
    saved.push_back(weights.has_value() ? *weights : Tensor());
    saved.push_back(sample_weights.has_value() ? *sample_weights : Tensor());
    ctx->save_for_backward(saved);
    if (mode != kNoGrad) ctx->saved_data["grads"] = grads;
    if (mode != kNoGrad && mode != kGradBuffer) ctx->saved_data["lse"] = lse;  // fp16: {2^-m, 2^-m_safe}
    ctx->saved_data["per_sample"] = per_sample;
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->mark_non_differentiable({per_exit, per_sample, confidence, prediction});
    return {loss, per_exit, per_sample, confidence, prediction};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const Tensor& grad_loss = grad_outputs[0];
    variable_list saved = ctx->get_saved_variables();
    const int64_t K = static_cast<int64_t>(saved.size()) - 3;
    // logits..., target, weights, sample_weights, ignore_index, smoothing, ema, momentum, flag
    variable_list result(K + 8);
    if (!grad_loss.defined()) return result;
    const std::vector<Tensor> logits(saved.begin(), saved.begin() + K);
    const Tensor& target = saved[K];
    const Tensor& weights = saved[K + 1];
    const Tensor& sample_weights = saved[K + 2];
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const double eps = ctx->saved_data["label_smoothing"].toDouble();
    const int64_t mode = ctx->saved_data["mode"].toInt();
    const bool need_w = weights.defined() && weights.requires_grad();
    const bool need_s = sample_weights.defined() && sample_weights.requires_grad();

    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiable backward
      auto [grads, dw, ds] = composite_backward(grad_loss, logits, target, weights, sample_weights, ignore_index, eps);
      if (mode != kNoGrad) {
        for (int64_t k = 0; k < K; ++k) result[k] = grads[k];
      }
      if (need_w) result[K + 1] = dw;
      if (need_s) result[K + 2] = ds;
      ctx->saved_data.erase("grads");
      return result;
    }

    if (mode == kGradBuffer || mode == kGradBufferPow2 || mode == kGradBufferPow2Hinted) {
      auto recompute = [&](int64_t recompute_mode) {
        at::AutoDispatchBelowADInplaceOrView guard;
        auto out = forward_op().call(logits, target, as_opt(weights), as_opt(sample_weights), ignore_index, eps,
                                     std::nullopt, 0.0, recompute_mode);
        return std::make_pair(std::get<6>(out), std::get<5>(out));
      };
      auto it = ctx->saved_data.find("grads");
      Tensor grads, pow2;
      if (it != ctx->saved_data.end()) {
        grads = it->second.toTensor();
        ctx->saved_data.erase(it);  // released with the gradient it becomes, whatever grad_out is
        if (mode != kGradBuffer) pow2 = ctx->saved_data["lse"].toTensor();
      } else {
        // Buffer already handed to an earlier backward of this retained graph: recompute it.
        std::tie(grads, pow2) = recompute(mode == kGradBuffer ? kGradBuffer : kGradBufferPow2);
      }
      Tensor factor = grad_loss;
      if (mode != kGradBuffer) {
        if (mode == kGradBufferPow2Hinted && is_plain_cpu(grad_loss)) {  // host reads are free
          const double go = grad_loss.item<double>();
          remember_grad_out(go);
          const float* inv = pow2.data_ptr<float>();  // {2^-m, 2^-m_safe}
          if (inv[0] != inv[1] && go * inv[0] != 1.0) {  // stored at m < m_safe, grad_out != 2^m
            grads = Tensor();  // back to the pool first: the recompute gets the same memory
            std::tie(grads, pow2) = recompute(kGradBufferPow2);
          }
        }
        // grad_out 2^-m in fp32: exact (a power-of-two multiply); the buffer then gets one
        // rounding more, as bf16's fold (docs/low_precision.md).
        factor = grad_loss.to(at::kFloat) * pow2.select(0, 0);
      }
      if (is_plain_cpu(grads) || grads.is_cuda()) {
        at::AutoDispatchBelowADInplaceOrView guard;
        scale_op().call(grads, factor);  // in place; nothing at all when the factor is 1
      } else {
        grads = grads * factor;  // tracing (fake / functional tensors); fp32 factor, one rounding
      }
      for (int64_t k = 0; k < K; ++k) result[k] = grads.select(0, k);
    }
    if (need_w || need_s) {
      const Tensor per_sample = ctx->saved_data["per_sample"].toTensor();
      const Tensor n_valid = target.ne(ignore_index).sum().clamp_min(1).to(at::kFloat);
      const Tensor go = grad_loss.to(at::kFloat);
      if (need_w) {
        const Tensor weighted = sample_weights.defined()
                                    ? per_sample * (sample_weights.dim() == 1 ? sample_weights.unsqueeze(0) : sample_weights)
                                    : per_sample;
        result[K + 1] = (weighted.sum(1) * go / n_valid).to(weights.scalar_type());
      }
      if (need_s) {
        const Tensor w = weights.defined() ? weights.to(at::kFloat) : at::ones({K}, per_sample.options());
        Tensor ds = per_sample * (w.unsqueeze(1) * go / n_valid);
        result[K + 2] = sample_weights.dim() == 1 ? ds.sum(0) : ds;
      }
    }
    return result;
  }
};

using Out5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

Out5 forward_without_grad(at::TensorList logits, const Tensor& target, const OptTensor& weights,
                          const OptTensor& sample_weights, int64_t ignore_index, double label_smoothing,
                          const OptTensor& ema, double momentum) {
  at::AutoDispatchBelowADInplaceOrView guard;
  auto out = forward_op().call(logits, target, weights, sample_weights, ignore_index, label_smoothing, ema, momentum,
                               kNoGrad);
  bump_ema_version(ema);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out), std::get<4>(out)};
}

Out5 multi_exit_ce_autograd(at::TensorList logits, const Tensor& target, const OptTensor& weights,
                            int64_t ignore_index, double label_smoothing, const OptTensor& ema, double momentum,
                            const OptTensor& sample_weights) {
  check_multi_exit_ce_inputs(logits, target, weights, sample_weights, label_smoothing, ema, momentum);
  bool logits_need_grad = false;
  for (const auto& z : logits) logits_need_grad = logits_need_grad || z.requires_grad();
  const bool any_need = logits_need_grad || (weights.has_value() && weights->requires_grad()) ||
                        (sample_weights.has_value() && sample_weights->requires_grad());
  // No gradient work under no_grad (or when nothing needs a gradient).
  if (!at::GradMode::is_enabled() || !any_need) {
    return forward_without_grad(logits, target, weights, sample_weights, ignore_index, label_smoothing, ema, momentum);
  }
  auto out = MultiExitCE::apply(logits, target, weights, sample_weights, ignore_index, label_smoothing, ema, momentum,
                                logits_need_grad);
  bump_ema_version(ema);
  return {out[0], out[1], out[2], out[3], out[4]};
}

// Below autograd (inference mode): no gradient buffers.
Out5 multi_exit_ce_no_grad(at::TensorList logits, const Tensor& target, const OptTensor& weights,
                           int64_t ignore_index, double label_smoothing, const OptTensor& ema, double momentum,
                           const OptTensor& sample_weights) {
  check_multi_exit_ce_inputs(logits, target, weights, sample_weights, label_smoothing, ema, momentum);
  return forward_without_grad(logits, target, weights, sample_weights, ignore_index, label_smoothing, ema, momentum);
}

// The older backend entry `multi_exit_ce_fwd`: the gradient for grad_out = 1 (w_k / N_valid
// (p - t)), which a caller scales by its grad_out. bf16 / fp32: in the logits dtype. fp16: in
// fp32, the buffer stored at 2^m_safe (kGradBufferPow2) times 2^-m_safe, exact: fp16 itself
// would flush the small entries (w / N_valid p < 2^-24) that GradScaler's 2^16 needs; so the
// caller's grad_out multiply and rounding give the op's own bound (docs/low_precision.md).
FwdResult multi_exit_ce_fwd_composite(at::TensorList logits, const Tensor& target, const Tensor& weights,
                                      int64_t ignore_index, double label_smoothing, const OptTensor& ema,
                                      double momentum, bool compute_grad) {
  check_multi_exit_ce_inputs(logits, target, weights, std::nullopt, label_smoothing, ema, momentum);
  at::AutoDispatchBelowADInplaceOrView guard;
  const bool fp16 = compute_grad && logits[0].scalar_type() == at::kHalf;
  auto [loss, per_exit, per_sample, confidence, prediction, pow2, grads] =
      forward_op().call(logits, target, weights, std::nullopt, ignore_index, label_smoothing, ema, momentum,
                        !compute_grad ? kNoGrad : fp16 ? kGradBufferPow2 : kGradBuffer);
  bump_ema_version(ema);
  if (fp16) grads = grads.to(at::kFloat).mul_(pow2.select(0, 0));  // pow2 = {2^-m, 2^-m_safe}, m = m_safe
  return {loss, per_exit, per_sample, confidence, prediction, grads};
}

}  // namespace

TORCH_LIBRARY_IMPL(ann_kernels, CPU, m) {
  m.impl("_multi_exit_ce_forward", &multi_exit_ce_forward_cpu);
  m.impl("_multi_exit_ce_backward", &multi_exit_ce_backward_cpu);
  m.impl("_multi_exit_ce_scale_", &multi_exit_ce_scale_cpu);
}

TORCH_LIBRARY_IMPL(ann_kernels, Autograd, m) { m.impl("multi_exit_ce", &multi_exit_ce_autograd); }

TORCH_LIBRARY_IMPL(ann_kernels, CompositeExplicitAutograd, m) {
  m.impl("multi_exit_ce", &multi_exit_ce_no_grad);
  m.impl("multi_exit_ce_fwd", &multi_exit_ce_fwd_composite);
}

}  // namespace ann_kernels
