// Fused multi-exit cross-entropy on CPU, and its C++ autograd (device-agnostic: the
// CUDA kernel behind `multi_exit_ce_fwd` is Triton, registered from Python).
//
// One pass over each logit row (k, i) gives: lse, the per-sample loss, max-probability
// confidence, argmax, and the gradient of the *weighted, averaged* loss
//     g_ikc = w_k / N_valid * (softmax(z_ik)_c - (1-e)[c = y_i] - e/C),
// so that backward with grad_out = 1 only hands these buffers over.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <ann_kernels/row_math.h>

#include "buffer_pool.h"
#include "ce_row_kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace ann_kernels {
namespace {

using at::Tensor;

struct CeRowsArgs {
  int64_t K, N, C;
  const int64_t* y;
  int64_t ignore_index;
  float eps, inv_n_valid;
  const float* w;
  float* loss_row;
  float* conf_row;
  int64_t* pred_row;
  bool compute_grad;
};

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
                      valid ? a.w[k] * a.inv_n_valid : 0.f};
        }
        block8_small_classes(lanes, num_lanes, C, a.eps, a.ignore_index, a.compute_grad, results);
        for (int l = 0; l < num_lanes; ++l) {
          const BlockResult& res = results[l];
          const bool valid = lanes[l].target != a.ignore_index;
          if (!res.finite) {
            nonfinite_row(lanes[l].x, C, lanes[l].target, valid, a.eps, lanes[l].scale, lanes[l].g,
                          &a.loss_row[r0 + l], &a.conf_row[r0 + l], &a.pred_row[r0 + l]);
            continue;
          }
          a.loss_row[r0 + l] = valid ? smoothed_row_loss(res.lse, res.x_target, res.sum_x, C, a.eps) : 0.f;
          a.conf_row[r0 + l] = res.conf;
          a.pred_row[r0 + l] = res.argmax;
        }
      }
      return;
    }
#endif
    std::vector<float> scratch;
    if (!kFloatIn || !a.compute_grad) scratch.resize(kFloatIn ? C : 2 * C);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t k = r / N;
      const int64_t i = r - k * N;
      const scalar_t* x = x_ptr[k] + i * x_row_stride[k];
      const float* xf;
      float* e;
      if constexpr (kFloatIn) {
        xf = x;
        e = a.compute_grad ? g_ptr[k] + i * C : scratch.data();
      } else {
        float* xs = scratch.data() + C;
        for (int64_t c = 0; c < C; ++c) xs[c] = static_cast<float>(x[c]);
        xf = xs;
        e = scratch.data();
      }
      const int64_t yi = a.y[i];
      const bool valid = yi != a.ignore_index;
      RowStats s;
      if (!row_softmax_numerator(xf, C, e, &s)) {  // a NaN or infinite maximum: the IEEE path
        nonfinite_row(x, C, yi, valid, a.eps, valid ? a.w[k] * a.inv_n_valid : 0.f,
                      a.compute_grad ? g_ptr[k] + i * C : nullptr, &a.loss_row[r], &a.conf_row[r], &a.pred_row[r]);
        continue;
      }
      const float lse = s.max + std::log(s.sum_exp);
      // 3. l = (1-e)(lse - z_y) + e(lse - mean_c z_c); ignored rows contribute 0.
      a.loss_row[r] = valid ? smoothed_row_loss(lse, xf[yi], s.sum_x, C, a.eps) : 0.f;
      // 4. max softmax probability = exp(max - lse) = 1 / sum_exp.
      a.conf_row[r] = 1.f / s.sum_exp;
      a.pred_row[r] = s.argmax;
      if (!a.compute_grad) continue;
      // 5. g = scale * (e_c / sum_exp - eps / C - (1 - eps)[c = y]), scale = w_k / N_valid.
      const float scale = valid ? a.w[k] * a.inv_n_valid : 0.f;
      if (scale == 0.f) {
        std::fill(e, e + C, 0.f);
      } else {
        row_affine(e, C, scale / s.sum_exp, scale * a.eps / static_cast<float>(C));
        e[yi] -= scale * (1.f - a.eps);
      }
      if constexpr (!kFloatIn) {
        scalar_t* g = g_ptr[k] + i * C;
        for (int64_t c = 0; c < C; ++c) g[c] = static_cast<scalar_t>(e[c]);
      }
    }
  });
}

// True for a plain eager CPU tensor; false under tracing (fake / functional tensors carry
// the Python key), where reading the value would be a data-dependent branch.
bool is_plain_cpu(const Tensor& t) {
  return t.defined() && t.device().is_cpu() && !t.key_set().has(c10::DispatchKey::Python) &&
         !t.key_set().has(c10::DispatchKey::Functionalize);
}

// Every argument check, with the messages of the Python validation (ValueError / TypeError
// naming the argument), so the Python fast path can leave them all to this function.
// Device-independent: it also guards the CUDA (Triton) kernel through the autograd op.
void check_inputs(at::TensorList logits, const Tensor& target, const Tensor& weights, double label_smoothing,
                  const std::optional<Tensor>& ema, double momentum) {
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
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op, "target: expected int64 class indices, got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == first.size(0), op, "target: expected shape [",
                    first.size(0), "] (one class per row), got ", target.sizes());
  TORCH_CHECK_VALUE(target.device() == first.device(), op, "target is on ", target.device(),
                    " but logits are on ", first.device());
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == K, op, "weights: expected ", K,
                    " values (one per exit), got shape ", weights.sizes());
  TORCH_CHECK_VALUE(weights.device() == first.device(), op, "weights is on ", weights.device(),
                    " but logits are on ", first.device());
  if (is_plain_cpu(weights)) {  // a host read: only where it costs no synchronisation
    const Tensor w = weights.to(at::kFloat).contiguous();
    for (int64_t k = 0; k < K; ++k) {
      TORCH_CHECK_VALUE(w.data_ptr<float>()[k] >= 0.f, op, "weights: must be non-negative, got weights[", k,
                        "] = ", w.data_ptr<float>()[k]);
    }
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

using FwdResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

FwdResult multi_exit_ce_fwd_cpu(at::TensorList logits, const Tensor& target, const Tensor& weights,
                                int64_t ignore_index, double label_smoothing,
                                const std::optional<Tensor>& ema, double momentum, bool compute_grad) {
  check_inputs(logits, target, weights, label_smoothing, ema, momentum);
  const int64_t K = static_cast<int64_t>(logits.size());
  const int64_t N = logits[0].size(0);
  const int64_t C = logits[0].size(1);

  // 1. Targets: range check and N_valid, serially (N << N*C).
  const Tensor target_c = target.contiguous();
  const int64_t* y = target_c.data_ptr<int64_t>();
  int64_t n_valid = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (y[i] == ignore_index) continue;
    TORCH_CHECK_VALUE(y[i] >= 0 && y[i] < C, "multi_exit_cross_entropy: target[", i, "] = ", y[i],
                " is out of range for ", C, " classes (expected 0 <= target < ", C,
                " or ignore_index = ", ignore_index, ")");
    ++n_valid;
  }
  const float inv_n_valid = n_valid > 0 ? 1.f / static_cast<float>(n_valid) : 0.f;
  const Tensor w = weights.to(at::kFloat).contiguous();
  const float* w_ptr = w.data_ptr<float>();
  const float eps = static_cast<float>(label_smoothing);

  // Rows must be unit-stride; any row stride is fine (no copy for row slices).
  std::vector<Tensor> rows(K);
  for (int64_t k = 0; k < K; ++k) rows[k] = logits[k].stride(1) == 1 ? logits[k] : logits[k].contiguous();

  const auto f32 = logits[0].options().dtype(at::kFloat);
  Tensor per_sample = at::empty({K, N}, f32);
  Tensor confidence = at::empty({K, N}, f32);
  Tensor prediction = at::empty({K, N}, logits[0].options().dtype(at::kLong));
  Tensor grads = compute_grad ? BufferPool::instance().empty({K, N, C}, logits[0].options())
                              : at::empty({0}, logits[0].options());
  float* loss_row = per_sample.data_ptr<float>();
  float* conf_row = confidence.data_ptr<float>();
  int64_t* pred_row = prediction.data_ptr<int64_t>();

  CeRowsArgs args{K, N, C, y, ignore_index, eps, inv_n_valid, w_ptr, loss_row, conf_row, pred_row, compute_grad};
  AT_DISPATCH_SWITCH(logits[0].scalar_type(), "multi_exit_ce_cpu",
                     AT_DISPATCH_CASE(at::kFloat, [&] { ce_rows<scalar_t>(rows, grads, args); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { ce_rows<scalar_t>(rows, grads, args); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { ce_rows<scalar_t>(rows, grads, args); }));

  // 6. Per-exit means and the weighted loss, in a fixed order (double accumulation).
  Tensor per_exit = at::empty({K}, f32);
  float* per_exit_ptr = per_exit.data_ptr<float>();
  double loss_acc = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    double acc = 0.0;
    for (int64_t i = 0; i < N; ++i) acc += loss_row[k * N + i];
    per_exit_ptr[k] = static_cast<float>(acc * static_cast<double>(inv_n_valid));
    loss_acc += static_cast<double>(w_ptr[k]) * static_cast<double>(per_exit_ptr[k]);
  }
  Tensor loss = at::scalar_tensor(loss_acc, f32);

  // 7. AdaLoss running average, in place: NaN = unset takes the first finite L_k; a
  //    non-finite L_k never enters the state.
  if (ema.has_value()) {
    Tensor state = *ema;
    auto acc = state.accessor<float, 1>();
    const float m = static_cast<float>(momentum);
    for (int64_t k = 0; k < K; ++k) {
      const float l = per_exit_ptr[k];
      if (!std::isfinite(l)) continue;
      acc[k] = std::isnan(acc[k]) ? l : m * acc[k] + (1.f - m) * l;
    }
  }
  return {loss, per_exit, per_sample, confidence, prediction, std::move(grads)};
}

// ---------------------------------------------------------------------------------------
// Autograd (C++, to keep the per-call overhead of a training step low).

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const c10::TypedOperatorHandle<FwdResult(at::TensorList, const Tensor&, const Tensor&, int64_t, double,
                                         const std::optional<Tensor>&, double, bool)>&
fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ann_kernels::multi_exit_ce_fwd", "")
                             .typed<FwdResult(at::TensorList, const Tensor&, const Tensor&, int64_t, double,
                                              const std::optional<Tensor>&, double, bool)>();
  return op;
}

class MultiExitCE : public torch::autograd::Function<MultiExitCE> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList logits, const Tensor& target,
                               const Tensor& weights, int64_t ignore_index, double label_smoothing,
                               const std::optional<Tensor>& ema, double momentum) {
    at::AutoDispatchBelowADInplaceOrView guard;
    bool need_grad = false;
    for (const auto& z : logits) need_grad = need_grad || z.requires_grad();
    auto [loss, per_exit, per_sample, confidence, prediction, grads] =
        fwd_op().call(logits, target, weights, ignore_index, label_smoothing, ema, momentum, need_grad);
    // The logits are kept (references, no copy) only to recompute the gradient if a
    // retained graph is run backward again after the buffers were handed over.
    std::vector<Tensor> saved(logits.begin(), logits.end());
    saved.push_back(target);
    saved.push_back(weights);
    ctx->save_for_backward(saved);
    ctx->saved_data["grads"] = grads;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->mark_non_differentiable({per_exit, per_sample, confidence, prediction});
    return {loss, per_exit, per_sample, confidence, prediction};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const Tensor& grad_loss = grad_outputs[0];
    variable_list saved = ctx->get_saved_variables();
    const int64_t K = static_cast<int64_t>(saved.size()) - 2;
    variable_list result(K + 6);  // logits..., target, weights, ignore_index, smoothing, ema, momentum
    if (!grad_loss.defined()) return result;
    auto saved_grads = ctx->saved_data.find("grads");
    Tensor grads = saved_grads != ctx->saved_data.end() ? saved_grads->second.toTensor() : Tensor();
    if (!grads.defined()) {
      // Buffers already handed to an earlier backward of this graph: recompute them.
      at::AutoDispatchBelowADInplaceOrView guard;
      std::vector<Tensor> logits(saved.begin(), saved.begin() + K);
      grads = std::get<5>(fwd_op().call(logits, saved[K], saved[K + 1], ctx->saved_data["ignore_index"].toInt(),
                                        ctx->saved_data["label_smoothing"].toDouble(), std::nullopt, 0.0, true));
    }
    const bool hand_over = is_plain_cpu(grad_loss) && is_plain_cpu(grads) && grad_loss.item<double>() == 1.0;
    if (hand_over) {
      // grad_out = 1: the buffer is the answer. Drop our reference so that whoever
      // receives it may own it (and modify it) without touching saved state.
      ctx->saved_data.erase("grads");
      for (int64_t k = 0; k < K; ++k) result[k] = grads.select(0, k);
    } else {
      const Tensor scaled = grads * grad_loss.to(grads.scalar_type());
      for (int64_t k = 0; k < K; ++k) result[k] = scaled.select(0, k);
    }
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> multi_exit_ce_autograd(
    at::TensorList logits, const Tensor& target, const Tensor& weights, int64_t ignore_index,
    double label_smoothing, const std::optional<Tensor>& ema, double momentum) {
  check_inputs(logits, target, weights, label_smoothing, ema, momentum);
  auto out = MultiExitCE::apply(logits, target, weights, ignore_index, label_smoothing, ema, momentum);
  return {out[0], out[1], out[2], out[3], out[4]};
}

// Below autograd (inference mode, or tensors that need no grad): no gradient buffers.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> multi_exit_ce_no_grad(
    at::TensorList logits, const Tensor& target, const Tensor& weights, int64_t ignore_index,
    double label_smoothing, const std::optional<Tensor>& ema, double momentum) {
  check_inputs(logits, target, weights, label_smoothing, ema, momentum);
  auto [loss, per_exit, per_sample, confidence, prediction, grads] =
      fwd_op().call(logits, target, weights, ignore_index, label_smoothing, ema, momentum, false);
  return {loss, per_exit, per_sample, confidence, prediction};
}

}  // namespace

TORCH_LIBRARY_IMPL(ann_kernels, CPU, m) { m.impl("multi_exit_ce_fwd", &multi_exit_ce_fwd_cpu); }

TORCH_LIBRARY_IMPL(ann_kernels, Autograd, m) { m.impl("multi_exit_ce", &multi_exit_ce_autograd); }

TORCH_LIBRARY_IMPL(ann_kernels, CompositeExplicitAutograd, m) {
  m.impl("multi_exit_ce", &multi_exit_ce_no_grad);
}

}  // namespace ann_kernels
