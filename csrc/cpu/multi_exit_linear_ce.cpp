// Fused linear + multi-exit cross-entropy on CPU, and its C++ autograd.
//
// K exits send hidden states h_k [N, H] through one LM head W [V, H] (or one head per
// exit, [K, V, H]) with optional bias. The K x N x V logits are never materialised:
//
//   for each chunk of R rows (a row = one (exit, token) pair; with a shared head a chunk
//   stacks rows of several exits, so each tile of W is read once for all of them):
//     gather h_chunk [R, H] (fp32)
//     one tile covering V (the usual plan) with gradients:
//         logits = h_chunk @ W^T (+ b)                  (ATen GEMM, fp32)
//         per row, in one visit while the row is in cache: max / sum / argmax / target
//         logit and exp(x - max) (one exp per logit), then in place
//         g = scale * ((1 + 2 z lse) softmax - e/V - (1-e) onehot(y))
//         grad_h_chunk = g @ W ; grad_W (+)= g^T @ h_chunk ; grad_b += sum_r g
//     else pass A, per vocabulary tile [v0, v0 + Vt):
//         logits = h_chunk @ W_tile^T (+ b_tile); merge the tile's row statistics (online lse)
//     and pass B (only with gradients), per tile: recompute the tile, g as above in place,
//         grad_h_chunk += g @ W_tile ; grad_W_tile (+)= g^T @ h_chunk ; grad_b_tile += sum_r g
//   grad_W is allocated empty for a shared head: its first chunk writes it (beta = 0).
//
// scale = w_k * s_ik / N_valid (0 on ignored rows). Per-row loss (PaLM / Liger z-loss):
//   l_ik = (1-e)(lse - z_y) + e(lse - mean_c z_c) + z * lse^2.
// Gradients are produced in forward (one tile covering V: 3 GEMMs per chunk; computing
// them in backward would recompute the logits, 4 GEMMs) in fp32, with grad_out = 1, and
// backward multiplies them by grad_out in fp32 before any rounding to the input dtype.
//
// Chunk sizes come from a memory budget for the logits tile (bytes; 0 = the default,
// ANN_KERNELS_LINEAR_CE_BUDGET_MB or 16 Mi logits, 32 MiB in bf16 / fp16 and 64 MiB in fp32,
// or 1/8 of the call's logits when that is more; chunks of equal size):
// the whole vocabulary in one tile when at least kMinRows rows fit, else tiles of the
// vocabulary for kMinRows rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <ann_kernels/row_math.h>

#include "ce_row_kernels.h"
#include "multi_exit_linear_ce_lowp.h"
#include "multi_exit_linear_ce_rows.h"
#include "weight_checks.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

namespace ann_kernels {
namespace {

using at::Tensor;
using namespace linear_ce_detail;

// One fp32 chunk of rows [r0, r0 + R) of the flattened active rows (slot a = r / N, token
// r % N); bf16 / fp16 chunks: run_chunk_lowp (multi_exit_linear_ce_lowp.h).
void run_chunk(int64_t r0, int64_t R, const Plan& plan, const std::vector<Tensor>& hidden, const Tensor& weight,
               const Tensor& bias, const Args& a, const int64_t* y, const float* row_scale, Tensor& h_buf,
               Tensor& logit_buf, Tensor& gh_buf, Outputs& out) {
  const int64_t H = a.H, V = a.V, N = a.N;
  const int64_t k0 = a.active[r0 / N];
  // 1. Gather the chunk's hidden rows [R, H].
  Tensor h = h_buf.narrow(0, 0, R * H).view({R, H});
  float* hp = h.data_ptr<float>();
  {  // serial: R x H is tiny next to the GEMMs, and a parallel region costs a fork-join
    for (int64_t r = 0; r < R; ++r) {
      const int64_t g = r0 + r, k = a.active[g / N], i = g % N;
      const Tensor& src = hidden[k];
      const float* s = src.data_ptr<float>() + i * src.stride(0);
      const int64_t st = src.stride(1);
      for (int64_t c = 0; c < H; ++c) hp[r * H + c] = s[c * st];
    }
  }
  std::vector<RowState> st(R, RowState{-std::numeric_limits<float>::infinity(), 0.f, 0.f, 0.f, 0, true});
  std::vector<int64_t> ty(R);
  for (int64_t r = 0; r < R; ++r) ty[r] = y[(r0 + r) % N];
  const bool one_tile = plan.vtile >= V;

  auto w_tile = [&](int64_t v0, int64_t vt) -> Tensor {
    return (a.per_exit_head ? weight.select(0, k0) : weight).narrow(0, v0, vt);
  };
  auto logits_tile = [&](int64_t v0, int64_t vt, const Tensor& Wt) -> Tensor {
    Tensor z = logit_buf.narrow(0, 0, R * vt).view({R, vt});
    if (bias.defined()) {
      Tensor bk = bias.dim() == 2 ? bias.select(0, k0) : bias;
      at::addmm_out(z, bk.narrow(0, v0, vt), h, Wt.t());
    } else {
      at::mm_out(z, h, Wt.t());
    }
    return z;
  };
  // Bias rows differ between exits of one chunk only for a [K, V] bias with a shared
  // head; make_chunks keeps such chunks inside one exit.

  Tensor gh = a.compute_grad ? gh_buf.narrow(0, 0, R * H).view({R, H}) : Tensor();
  // Gradient GEMMs of one tile z [R, vt] holding g: grad_h (+)= g @ W_tile, grad_W_tile (+)= g^T h
  // (= on the tile's first chunk when grad_weight was allocated empty), grad_b_tile += sum_r g.
  auto gradient_gemms = [&](int64_t v0, int64_t vt, const Tensor& Wt, const Tensor& z) {
    if (v0 == 0) {
      at::mm_out(gh, z, Wt);
    } else {
      gh.addmm_(z, Wt);
    }
    Tensor gW = a.per_exit_head ? out.grad_weight.select(0, k0) : out.grad_weight;
    accumulate_grad_weight(gW.narrow(0, v0, vt), z, h, out.grad_weight_empty && r0 == 0);
    if (out.grad_bias.defined()) {
      Tensor gb = out.grad_bias.dim() == 2 ? out.grad_bias.select(0, k0) : out.grad_bias;
      gb.narrow(0, v0, vt).add_(z.sum(0));
    }
  };
  std::vector<float> lse(R);
  if (one_tile && a.compute_grad) {
    // 2-4. One tile covering V: one logits GEMM, then each row's statistics and gradient in
    //      one visit (stats_and_softmax_grad_row: one exp per logit), the one-hot part at the
    //      target, the per-row results, and the gradient GEMMs.
    Tensor Wt = w_tile(0, V);
    Tensor z = logits_tile(0, V, Wt);
    float* zp = z.data_ptr<float>();
    at::parallel_for(0, R, std::max<int64_t>(1, 16384 / V), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const float scale = row_scale[r0 + r];
        st[r] = stats_and_softmax_grad_row(zp + r * V, V, ty[r], scale, a);
        if (scale != 0.f && st[r].finite) zp[r * V + ty[r]] -= scale * (1.f - a.eps);
      }
    });
    finish_rows(r0, R, a, st, ty, lse, out);
    gradient_gemms(0, V, Wt, z);
  } else {
    // 2. Pass A: statistics (online over tiles).
    for (int64_t v0 = 0; v0 < V; v0 += plan.vtile) {
      const int64_t vt = std::min(plan.vtile, V - v0);
      Tensor z = logits_tile(v0, vt, w_tile(v0, vt));
      float* zp = z.data_ptr<float>();
      at::parallel_for(0, R, std::max<int64_t>(1, 16384 / vt), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          if (st[r].finite) merge_tile_row(zp + r * vt, vt, v0, ty[r], st[r], false);
        }
      });
    }
    // 3. Per-row results.
    finish_rows(r0, R, a, st, ty, lse, out);
    if (!a.compute_grad) return;

    // 4. Pass B: gradients, each tile's logits recomputed.
    for (int64_t v0 = 0; v0 < V; v0 += plan.vtile) {
      const int64_t vt = std::min(plan.vtile, V - v0);
      Tensor Wt = w_tile(v0, vt);
      Tensor z = logits_tile(v0, vt, Wt);
      float* zp = z.data_ptr<float>();
      at::parallel_for(0, R, std::max<int64_t>(1, 16384 / vt), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          float* x = zp + r * vt;
          const float scale = row_scale[r0 + r];
          if (scale == 0.f || !st[r].finite) {
            std::fill(x, x + vt, scale == 0.f ? 0.f : std::numeric_limits<float>::quiet_NaN());
            continue;
          }
          grad_row(x, vt, scale * (1.f + 2.f * a.z * lse[r]), scale * a.eps / static_cast<float>(V), true, lse[r]);
          const int64_t yy = ty[r];
          if (yy >= v0 && yy < v0 + vt) x[yy - v0] -= scale * (1.f - a.eps);
        }
      });
      gradient_gemms(v0, vt, Wt, z);
    }
  }
  // 5. Scatter grad_h rows back to [K, N, H].
  float* ghp = gh.data_ptr<float>();
  float* dst = out.grad_hidden.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    const int64_t g = r0 + r, k = a.active[g / N], i = g % N;
    std::copy(ghp + r * H, ghp + (r + 1) * H, dst + (k * N + i) * H);
  }
}

void check_inputs(at::TensorList hidden, const Tensor& weight, const Tensor& target, const Tensor& weights,
                  const std::optional<Tensor>& bias, const std::optional<Tensor>& sample_weights,
                  double label_smoothing, double z_loss, const std::optional<Tensor>& ema, double momentum,
                  at::IntArrayRef active) {
  const char* op = "multi_exit_linear_cross_entropy: ";
  TORCH_CHECK_VALUE(!hidden.empty(), op, "hidden: expected at least one exit, got 0");
  const Tensor& first = hidden[0];
  const int64_t K = static_cast<int64_t>(hidden.size());
  for (int64_t k = 0; k < K; ++k) {
    const Tensor& h = hidden[k];
    TORCH_CHECK_TYPE(h.scalar_type() == at::kFloat || h.scalar_type() == at::kBFloat16 || h.scalar_type() == at::kHalf,
                     op, "hidden[", k, "]: expected float32, bfloat16 or float16, got ", h.scalar_type());
    TORCH_CHECK_VALUE(h.dim() == 2, op, "hidden[", k, "]: expected shape [N, H], got ", h.sizes());
    TORCH_CHECK_VALUE(h.sizes() == first.sizes(), op, "hidden[", k, "] has shape ", h.sizes(), " but hidden[0] has ",
                      first.sizes(), ": every exit needs the same token count N and width H");
    TORCH_CHECK_TYPE(h.scalar_type() == first.scalar_type(), op, "hidden[", k, "] has dtype ", h.scalar_type(),
                     " but hidden[0] has ", first.scalar_type());
    TORCH_CHECK_VALUE(h.device() == first.device(), op, "hidden[", k, "] is on ", h.device(), " but hidden[0] is on ",
                      first.device());
  }
  const int64_t N = first.size(0), H = first.size(1);
  TORCH_CHECK_VALUE(N > 0, op, "hidden: no tokens (N = 0)");
  TORCH_CHECK_VALUE(weight.dim() == 2 || weight.dim() == 3, op,
                    "weight: expected one shared head [V, H] or one head per exit [K, V, H], got shape ",
                    weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == first.scalar_type(), op, "weight has dtype ", weight.scalar_type(),
                   " but hidden has ", first.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == first.device(), op, "weight is on ", weight.device(), " but hidden is on ",
                    first.device());
  if (weight.dim() == 3) {
    TORCH_CHECK_VALUE(weight.size(0) == K, op, "weight: a per-exit head [K, V, H] needs K = ", K,
                      " (the number of exits in hidden), got K = ", weight.size(0), " (shape ", weight.sizes(), ")");
  }
  const int64_t V = weight.size(-2);
  TORCH_CHECK_VALUE(weight.size(-1) == H, op, "weight: hidden width H = ", H, " but weight has width ",
                    weight.size(-1), " (shape ", weight.sizes(), ")");
  TORCH_CHECK_VALUE(V > 0, op, "weight: empty vocabulary (V = 0)");
  if (bias.has_value()) {
    const Tensor& b = *bias;
    const bool ok = (b.dim() == 1 && b.size(0) == V) || (b.dim() == 2 && b.size(0) == K && b.size(1) == V);
    TORCH_CHECK_VALUE(ok, op, "bias: expected shape [", V, "] or [", K, ", ", V, "] (vocabulary size V = ", V,
                      "), got ", b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == first.scalar_type(), op, "bias has dtype ", b.scalar_type(),
                     " but hidden has ", first.scalar_type());
    TORCH_CHECK_VALUE(b.device() == first.device(), op, "bias is on ", b.device(), " but hidden is on ",
                      first.device());
  }
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op, "target: expected int64 class indices, got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == N, op, "target: expected shape [", N,
                    "] (one class per token), got ", target.sizes());
  TORCH_CHECK_VALUE(target.device() == first.device(), op, "target is on ", target.device(), " but hidden is on ",
                    first.device());
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == K, op, "weights: expected ", K,
                    " values (one per exit), got shape ", weights.sizes());
  TORCH_CHECK_VALUE(weights.device() == first.device(), op, "weights is on ", weights.device(),
                    " but hidden is on ", first.device());
  check_weight_values(weights, op, "weights");  // the logits op's rule (weight_checks.h)
  if (sample_weights.has_value()) {
    const Tensor& s = *sample_weights;
    const bool ok = (s.dim() == 1 && s.size(0) == N) || (s.dim() == 2 && s.size(0) == K && s.size(1) == N);
    TORCH_CHECK_VALUE(ok, op, "sample_weights: expected shape [", N, "] or [", K, ", ", N, "], got ", s.sizes());
    TORCH_CHECK_TYPE(s.is_floating_point(), op, "sample_weights: expected a float tensor, got ", s.scalar_type());
    TORCH_CHECK_VALUE(s.device() == first.device(), op, "sample_weights is on ", s.device(), " but hidden is on ",
                      first.device());
    check_weight_values(s, op, "sample_weights", /*allow_negative=*/true);
  }
  if (ema.has_value()) {
    TORCH_CHECK_VALUE(ema->dim() == 1 && ema->size(0) == K && ema->scalar_type() == at::kFloat, op,
                      "ema: expected a float32 tensor of shape [", K, "], got ", ema->scalar_type(), " of shape ",
                      ema->sizes());
  }
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
                    "label_smoothing: expected a value in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(z_loss >= 0.0 && std::isfinite(z_loss), op, "z_loss: expected a finite value >= 0, got ", z_loss);
  TORCH_CHECK_VALUE(momentum >= 0.0 && momentum < 1.0, op, "momentum: expected a value in [0, 1), got ", momentum);
  int64_t prev = -1;
  for (int64_t k : active) {
    TORCH_CHECK_VALUE(k > prev && k < K, op, "active: expected increasing exit indices in [0, ", K, "), got ",
                      active);
    prev = k;
  }
}

using FwdResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

FwdResult linear_ce_fwd_cpu(at::TensorList hidden, const Tensor& weight, const Tensor& target, const Tensor& weights,
                            const std::optional<Tensor>& bias, const std::optional<Tensor>& sample_weights,
                            int64_t ignore_index, double label_smoothing, double z_loss,
                            const std::optional<Tensor>& ema, double momentum, at::IntArrayRef active,
                            int64_t budget_bytes, bool compute_grad) {
  check_inputs(hidden, weight, target, weights, bias, sample_weights, label_smoothing, z_loss, ema, momentum, active);
  Args a;
  a.K = static_cast<int64_t>(hidden.size());
  a.N = hidden[0].size(0);
  a.H = hidden[0].size(1);
  a.V = weight.size(-2);
  a.ignore_index = ignore_index;
  a.eps = static_cast<float>(label_smoothing);
  a.z = static_cast<float>(z_loss);
  a.compute_grad = compute_grad;
  a.per_exit_head = weight.dim() == 3;
  a.active.assign(active.begin(), active.end());
  const int64_t K = a.K, N = a.N, H = a.H, V = a.V;

  const Tensor target_c = target.contiguous();
  const int64_t* y = target_c.data_ptr<int64_t>();
  int64_t n_valid = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (y[i] == ignore_index) continue;
    TORCH_CHECK_VALUE(y[i] >= 0 && y[i] < V, "multi_exit_linear_cross_entropy: target[", i, "] = ", y[i],
                      " is out of range for a vocabulary of ", V, " (expected 0 <= target < ", V,
                      " or ignore_index = ", ignore_index, ")");
    ++n_valid;
  }
  const double inv_n_valid = n_valid > 0 ? 1.0 / static_cast<double>(n_valid) : 0.0;
  const Tensor w = weights.detach().to(at::kFloat).contiguous();
  const float* wp = w.data_ptr<float>();
  Tensor s32;
  if (sample_weights.has_value()) s32 = sample_weights->detach().to(at::kFloat).contiguous();
  const int64_t A = static_cast<int64_t>(a.active.size());
  const int64_t total = A * N;
  // Row scales w_k s_ik / N_valid of the flattened active rows.
  std::vector<float> row_scale(total);
  for (int64_t r = 0; r < total; ++r) {
    const int64_t k = a.active[r / N], i = r % N;
    float s = 1.f;
    if (s32.defined()) s = s32.dim() == 1 ? s32.data_ptr<float>()[i] : s32.data_ptr<float>()[k * N + i];
    row_scale[r] = y[i] == ignore_index ? 0.f : static_cast<float>(wp[k] * s * inv_n_valid);
  }

  const auto f32 = hidden[0].options().dtype(at::kFloat);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Outputs out;
  out.per_sample = at::zeros({K, N}, f32);  // exits not computed: 0 (per_exit NaN)
  out.confidence = at::full({K, N}, nan, f32);
  out.prediction = at::full({K, N}, -1, hidden[0].options().dtype(at::kLong));
  const bool low_precision = weight.scalar_type() != at::kFloat;
  const auto in_dtype = hidden[0].options();  // bf16 / fp16 gradients stay in the input dtype
  if (compute_grad) {
    // Rows of exits that are not computed stay 0; otherwise every row is written. A shared
    // head's grad_W is written (beta = 0) by the first chunk.
    const auto g_opts = low_precision ? in_dtype : f32;
    const int64_t n_active = static_cast<int64_t>(a.active.size());
    out.grad_hidden = n_active == K ? at::empty({K, N, H}, g_opts) : at::zeros({K, N, H}, g_opts);
    out.grad_weight_empty = !a.per_exit_head && n_active > 0;
    out.grad_weight = out.grad_weight_empty ? at::empty(weight.sizes(), g_opts) : at::zeros(weight.sizes(), g_opts);
    if (bias.has_value()) out.grad_bias = at::zeros(bias->sizes(), f32);
  }
  std::vector<Tensor> hid(hidden.begin(), hidden.end());
  const Tensor bc = bias.has_value() ? bias->contiguous() : Tensor();
  const Tensor Wc = weight.contiguous();
  // Chunks: a shared head (and a shared bias) stacks exits; otherwise stay in one exit.
  const bool split_by_exit = a.per_exit_head || (bc.defined() && bc.dim() == 2);
  // The budget is in bytes of the logits tile, whose elements have the input dtype's size.
  const int64_t budget = resolve_budget(budget_bytes, low_precision ? 2 : 4, total * V) * (low_precision ? 2 : 1);
  const Plan plan = make_plan(split_by_exit ? N : total, V, budget);
  auto chunks = [&](auto&& run) {
    for (int64_t r0 = 0; r0 < total;) {
      int64_t R = std::min(plan.rows, total - r0);
      if (split_by_exit) R = std::min(R, (r0 / N + 1) * N - r0);
      run(r0, R);
      r0 += R;
    }
  };
  if (A > 0 && !low_precision) {
    Tensor h_buf = at::empty({plan.rows * H}, f32);
    Tensor logit_buf = at::empty({plan.rows * plan.vtile}, f32);
    Tensor gh_buf = compute_grad ? at::empty({plan.rows * H}, f32) : Tensor();
    chunks([&](int64_t r0, int64_t R) {
      run_chunk(r0, R, plan, hid, Wc, bc, a, y, row_scale.data(), h_buf, logit_buf, gh_buf, out);
    });
  } else if (A > 0) {
    LowpBuffers buf;
    buf.h = at::empty({plan.rows * H}, in_dtype);
    buf.logits = at::empty({plan.rows * plan.vtile}, in_dtype);
    if (compute_grad) {
      buf.gh_part = at::empty({plan.rows * H}, in_dtype);
      buf.gh_acc = at::empty({plan.rows * H}, f32);
    }
    AT_DISPATCH_REDUCED_FLOATING_TYPES(weight.scalar_type(), "multi_exit_linear_ce_lowp", [&] {
      chunks([&](int64_t r0, int64_t R) {
        run_chunk_lowp<scalar_t>(r0, R, plan, hid, Wc, bc, a, y, row_scale.data(), buf, out);
      });
      if (compute_grad) add_target_rows_lowp<scalar_t>(hid, a, y, row_scale.data(), out);
    });
    buf = LowpBuffers();
    if (out.grad_bias.defined()) out.grad_bias = out.grad_bias.to(weight.scalar_type());
  }
  // Per-exit means L_k = sum_i s_ik l_ik / N_valid and the loss, serially in double.
  Tensor per_exit = at::full({K}, nan, f32);
  float* pe = per_exit.data_ptr<float>();
  const float* lp = out.per_sample.data_ptr<float>();
  double loss_acc = 0.0;
  for (int64_t k : a.active) {
    double acc = 0.0;
    for (int64_t i = 0; i < N; ++i) {
      double s = 1.0;
      if (s32.defined()) s = s32.dim() == 1 ? s32.data_ptr<float>()[i] : s32.data_ptr<float>()[k * N + i];
      if (y[i] != ignore_index) acc += s * lp[k * N + i];
    }
    pe[k] = static_cast<float>(acc * inv_n_valid);
    loss_acc += static_cast<double>(wp[k]) * pe[k];
  }
  if (ema.has_value()) {
    Tensor state = *ema;
    auto acc = state.accessor<float, 1>();
    const float m = static_cast<float>(momentum);
    for (int64_t k = 0; k < K; ++k) {
      const float l = pe[k];
      if (!std::isfinite(l)) continue;
      acc[k] = std::isnan(acc[k]) ? l : m * acc[k] + (1.f - m) * l;
    }
  }
  const auto empty = [&] { return at::empty({0}, f32); };
  return {at::scalar_tensor(loss_acc, f32), per_exit, out.per_sample, out.confidence, out.prediction,
          compute_grad ? out.grad_hidden : empty(), compute_grad ? out.grad_weight : empty(),
          out.grad_bias.defined() ? out.grad_bias : empty()};
}

// ---------------------------------------------------------------------------------------
// Autograd.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSig = FwdResult(at::TensorList, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                         const std::optional<Tensor>&, int64_t, double, double, const std::optional<Tensor>&, double,
                         at::IntArrayRef, int64_t, bool);

const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ann_kernels::multi_exit_linear_ce_fwd", "").typed<FwdSig>();
  return op;
}

class MultiExitLinearCE : public torch::autograd::Function<MultiExitLinearCE> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList hidden, const Tensor& weight,
                               const Tensor& target, const Tensor& weights, const std::optional<Tensor>& bias,
                               const std::optional<Tensor>& sample_weights, int64_t ignore_index,
                               double label_smoothing, double z_loss, const std::optional<Tensor>& ema,
                               double momentum, at::IntArrayRef active, int64_t budget_bytes) {
    at::AutoDispatchBelowADInplaceOrView guard;
    bool need = weight.requires_grad() || (bias.has_value() && bias->requires_grad());
    for (const auto& h : hidden) need = need || h.requires_grad();
    auto [loss, per_exit, per_sample, confidence, prediction, gh, gw, gb] =
        fwd_op().call(hidden, weight, target, weights, bias, sample_weights, ignore_index, label_smoothing, z_loss,
                      ema, momentum, active, budget_bytes, need);
    const int64_t K = static_cast<int64_t>(hidden.size());
    ctx->saved_data["K"] = K;
    ctx->saved_data["gh"] = gh;
    ctx->saved_data["gw"] = gw;
    ctx->saved_data["gb"] = gb;
    ctx->saved_data["per_exit"] = per_exit;
    ctx->saved_data["per_sample"] = per_sample;
    // N_valid as a tensor (no host read: this also runs on fake tensors under torch.compile).
    ctx->saved_data["n_valid"] = (target != ignore_index).sum().clamp_min(1).to(at::kFloat);
    ctx->saved_data["hidden_dtype"] = static_cast<int64_t>(hidden[0].scalar_type());
    ctx->saved_data["weights_grad"] = weights.requires_grad();
    ctx->saved_data["sw_grad"] = sample_weights.has_value() && sample_weights->requires_grad();
    ctx->saved_data["sw_dim"] = sample_weights.has_value() ? sample_weights->dim() : int64_t{0};
    ctx->saved_data["sw_dtype"] =
        static_cast<int64_t>(sample_weights.has_value() ? sample_weights->scalar_type() : at::kFloat);
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["z_loss"] = z_loss;
    ctx->saved_data["active"] = active.vec();
    ctx->saved_data["budget"] = budget_bytes;
    // Inputs are kept (references) to recompute the gradients if a retained graph runs
    // backward again after the buffers were handed over.
    std::vector<Tensor> saved(hidden.begin(), hidden.end());
    saved.push_back(weight);
    saved.push_back(target);
    saved.push_back(weights);
    saved.push_back(bias.has_value() ? *bias : Tensor());
    saved.push_back(sample_weights.has_value() ? *sample_weights : Tensor());
    ctx->save_for_backward(saved);
    ctx->mark_non_differentiable({per_exit, per_sample, confidence, prediction});
    return {loss, per_exit, per_sample, confidence, prediction};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const Tensor& go = grad_outputs[0];
    const int64_t K = ctx->saved_data["K"].toInt();
    variable_list result(K + 12);  // hidden..., weight, target, weights, bias, sample_weights, ...
    if (!go.defined()) return result;
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["hidden_dtype"].toInt());
    variable_list saved = ctx->get_saved_variables();
    const Tensor& weights = saved[K + 2];
    const Tensor go32 = go.to(at::kFloat);
    // grad_out's value is read where that is possible (eager tensors: a sync on CUDA, one
    // scalar); under tracing it is unknown and treated as "not 1".
    const bool plain = go.defined() && !go.key_set().has(c10::DispatchKey::Python) &&
                       !go.key_set().has(c10::DispatchKey::Functionalize) && go.numel() == 1;
    const double go_value = plain ? go.item<double>() : std::numeric_limits<double>::quiet_NaN();
    const bool unit = go_value == 1.0;
    // bf16 / fp16: the forward's gradients are already rounded to the input dtype, so a
    // grad_out other than 1 cannot be applied afterwards in fp32. A power of two scales a
    // bf16 gradient exactly (bf16 has fp32's exponent range; fp16 does not: 2^16 overflows
    // it, and its subnormals would have lost bits); anything else is folded into the exit
    // weights of a recomputation (|grad_out| w_k, sign applied after: exact), so every
    // gradient is formed in fp32 with grad_out applied before its one rounding.
    const bool low_precision = dtype != at::kFloat;
    int exponent = 0;
    const bool pow2 = low_precision && dtype == at::kBFloat16 && std::isfinite(go_value) && go_value != 0.0 &&
                      std::abs(std::frexp(go_value, &exponent)) == 0.5;
    const bool have = ctx->saved_data.count("gh") && ctx->saved_data.count("gw") && ctx->saved_data.count("gb");
    const bool refold = low_precision && !unit && !pow2;
    if (!have || refold) {  // handed over to an earlier backward, or grad_out to fold: recompute
      at::AutoDispatchBelowADInplaceOrView guard;
      std::vector<Tensor> hidden(saved.begin(), saved.begin() + K);
      auto opt = [](const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; };
      const auto active = ctx->saved_data["active"].toIntVector();
      const Tensor w_fold = refold ? weights.detach().to(at::kFloat) * go32.abs() : weights;
      auto r = fwd_op().call(hidden, saved[K], saved[K + 1], w_fold, opt(saved[K + 3]), opt(saved[K + 4]),
                             ctx->saved_data["ignore_index"].toInt(), ctx->saved_data["label_smoothing"].toDouble(),
                             ctx->saved_data["z_loss"].toDouble(), std::nullopt, 0.0, active,
                             ctx->saved_data["budget"].toInt(), true);
      ctx->saved_data["gh"] = std::get<5>(r);
      ctx->saved_data["gw"] = std::get<6>(r);
      ctx->saved_data["gb"] = std::get<7>(r);
    }
    auto scaled = [&](const char* key) -> Tensor {
      Tensor g = ctx->saved_data[key].toTensor();
      if (!g.defined() || g.numel() == 0) return Tensor();
      if (refold) {  // |grad_out| is in the gradient already; the sign is exact
        ctx->saved_data.erase(key);
        return plain ? (go_value < 0 ? g.neg() : g) : g * go.sign().to(dtype);
      }
      if (unit) {
        ctx->saved_data.erase(key);  // the buffer is the answer; let autograd own it
        return g;
      }
      if (pow2) return g * go.to(dtype);   // exact in bf16
      return (g * go32).to(dtype);  // fp32: grad_out folded in fp32 before rounding
    };
    Tensor gh = scaled("gh");
    if (gh.defined()) {
      for (int64_t k = 0; k < K; ++k) result[k] = gh.select(0, k);
    }
    result[K] = scaled("gw");
    result[K + 3] = scaled("gb");
    const Tensor per_exit = ctx->saved_data["per_exit"].toTensor();
    // dLoss/dw_k = L_k (exits that were not computed have weight 0 and get 0).
    if (ctx->saved_data["weights_grad"].toBool()) {
      result[K + 2] = (at::nan_to_num(per_exit, 0.0) * go32).to(weights.scalar_type());
    }
    // dLoss/ds_ik = w_k l_ik / N_valid (per_sample is 0 on ignored rows).
    if (ctx->saved_data["sw_grad"].toBool()) {
      const Tensor ps = at::nan_to_num(ctx->saved_data["per_sample"].toTensor(), 0.0);
      Tensor ds = ps * weights.detach().to(at::kFloat).unsqueeze(1) * go32 / ctx->saved_data["n_valid"].toTensor();
      if (ctx->saved_data["sw_dim"].toInt() == 1) ds = ds.sum(0);
      result[K + 4] = ds.to(static_cast<at::ScalarType>(ctx->saved_data["sw_dtype"].toInt()));
    }
    return result;
  }
};

using OutResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

OutResult linear_ce_autograd(at::TensorList hidden, const Tensor& weight, const Tensor& target, const Tensor& weights,
                             const std::optional<Tensor>& bias, const std::optional<Tensor>& sample_weights,
                             int64_t ignore_index, double label_smoothing, double z_loss,
                             const std::optional<Tensor>& ema, double momentum, at::IntArrayRef active,
                             int64_t budget_bytes) {
  check_inputs(hidden, weight, target, weights, bias, sample_weights, label_smoothing, z_loss, ema, momentum, active);
  auto out = MultiExitLinearCE::apply(hidden, weight, target, weights, bias, sample_weights, ignore_index,
                                      label_smoothing, z_loss, ema, momentum, active, budget_bytes);
  return {out[0], out[1], out[2], out[3], out[4]};
}

OutResult linear_ce_no_grad(at::TensorList hidden, const Tensor& weight, const Tensor& target, const Tensor& weights,
                            const std::optional<Tensor>& bias, const std::optional<Tensor>& sample_weights,
                            int64_t ignore_index, double label_smoothing, double z_loss,
                            const std::optional<Tensor>& ema, double momentum, at::IntArrayRef active,
                            int64_t budget_bytes) {
  auto r = fwd_op().call(hidden, weight, target, weights, bias, sample_weights, ignore_index, label_smoothing, z_loss,
                         ema, momentum, active, budget_bytes, false);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ann_kernels, CPU, m) { m.impl("multi_exit_linear_ce_fwd", &linear_ce_fwd_cpu); }

TORCH_LIBRARY_IMPL(ann_kernels, Autograd, m) { m.impl("multi_exit_linear_ce", &linear_ce_autograd); }

TORCH_LIBRARY_IMPL(ann_kernels, CompositeExplicitAutograd, m) {
  m.impl("multi_exit_linear_ce", &linear_ce_no_grad);
}

}  // namespace ann_kernels
