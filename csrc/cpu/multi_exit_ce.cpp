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

#include <algorithm>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace ann_kernels {
namespace {

using at::Tensor;

struct RowStats {
  float max;       // max_c z_c
  float sum_x;     // sum_c z_c        (label smoothing's mean term)
  float sum_exp;   // sum_c exp(z_c - max)
  int64_t argmax;  // first index of the maximum (torch.argmax's tie rule)
};

#if defined(__AVX2__) && defined(__FMA__)
// 8-wide exp of the Cephes scheme in row_math.h's fast_exp (same constants, same steps),
// so the vector and scalar paths agree to the last bit except for FMA contraction.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3365447505f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lanes c..c+7 that exist in a row of C (the tail of a row is read with a mask).
inline __m256i tail_mask(int64_t remaining) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(remaining)), lane);
}

// Steps 1-3 of a row, 8 lanes at a time (tails masked, so C = 10 vectorises too):
//   1. max, its first index and the sum of the row in one pass (per-lane max/argmax with a
//      strict >, so each lane keeps its first maximum; lanes merge by value, then index);
//   2. e_c = exp(z_c - max) into `e` (the fp32 gradient row itself, or scratch) and its sum.
void row_softmax_numerator(const float* __restrict x, int64_t C, float* __restrict e, RowStats* stats) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  __m256 vmax = _mm256_set1_ps(neg_inf), vsum = _mm256_setzero_ps();
  __m256i vidx = _mm256_setzero_si256(), cur = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step = _mm256_set1_epi32(8);
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const __m256 v = _mm256_loadu_ps(x + c);
    const __m256 gt = _mm256_cmp_ps(v, vmax, _CMP_GT_OQ);
    vmax = _mm256_blendv_ps(vmax, v, gt);
    vidx = _mm256_blendv_epi8(vidx, cur, _mm256_castps_si256(gt));
    vsum = _mm256_add_ps(vsum, v);
    cur = _mm256_add_epi32(cur, step);
  }
  if (c < C) {
    const __m256i m = tail_mask(C - c);
    const __m256 v = _mm256_blendv_ps(_mm256_set1_ps(neg_inf), _mm256_maskload_ps(x + c, m), _mm256_castsi256_ps(m));
    const __m256 gt = _mm256_cmp_ps(v, vmax, _CMP_GT_OQ);
    vmax = _mm256_blendv_ps(vmax, v, gt);
    vidx = _mm256_blendv_epi8(vidx, cur, _mm256_castps_si256(gt));
    vsum = _mm256_add_ps(vsum, _mm256_and_ps(v, _mm256_castsi256_ps(m)));
  }
  alignas(32) float lane_max[8];
  alignas(32) int32_t lane_idx[8];
  _mm256_store_ps(lane_max, vmax);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lane_idx), vidx);
  float row_max = lane_max[0];
  int64_t argmax = lane_idx[0];
  for (int l = 1; l < 8; ++l) {
    if (lane_max[l] > row_max || (lane_max[l] == row_max && lane_idx[l] < argmax)) {
      row_max = lane_max[l];
      argmax = lane_idx[l];
    }
  }
  const __m256 vrow_max = _mm256_set1_ps(row_max);
  __m256 vexp0 = _mm256_setzero_ps(), vexp1 = _mm256_setzero_ps();  // two chains hide add latency
  c = 0;
  for (; c + 16 <= C; c += 16) {
    const __m256 e0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + c), vrow_max));
    const __m256 e1 = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + c + 8), vrow_max));
    _mm256_storeu_ps(e + c, e0);
    _mm256_storeu_ps(e + c + 8, e1);
    vexp0 = _mm256_add_ps(vexp0, e0);
    vexp1 = _mm256_add_ps(vexp1, e1);
  }
  for (; c < C; c += 8) {
    const __m256i m = tail_mask(C - c);
    const __m256 ev = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_maskload_ps(x + c, m), vrow_max)), _mm256_castsi256_ps(m));
    _mm256_maskstore_ps(e + c, m, ev);
    vexp0 = _mm256_add_ps(vexp0, ev);
  }
  stats->max = row_max;
  stats->sum_x = hsum8(vsum);
  stats->sum_exp = hsum8(_mm256_add_ps(vexp0, vexp1));
  stats->argmax = argmax;
}
#else
// Portable path: the same steps, scalar (the compiler may still vectorise the exp loop).
void row_softmax_numerator(const float* __restrict x, int64_t C, float* __restrict e, RowStats* stats) {
  float row_max = -std::numeric_limits<float>::infinity();
  float sum_x = 0.f;
  int64_t argmax = 0;
  for (int64_t c = 0; c < C; ++c) {
    if (x[c] > row_max) {
      row_max = x[c];
      argmax = c;
    }
    sum_x += x[c];
  }
  float sum_exp = 0.f;
  for (int64_t c = 0; c < C; ++c) {
    e[c] = fast_exp(x[c] - row_max);
    sum_exp += e[c];
  }
  *stats = RowStats{row_max, sum_x, sum_exp, argmax};
}
#endif

// Step 5 of a row: g_c = a * e_c - b (a = scale / sum_exp, b = scale * e / C).
void row_affine(float* __restrict g, int64_t C, float a, float b) {
  for (int64_t c = 0; c < C; ++c) g[c] = g[c] * a - b;
}

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
      RowStats s;
      row_softmax_numerator(xf, C, e, &s);
      const float lse = s.max + std::log(s.sum_exp);
      const int64_t yi = a.y[i];
      const bool valid = yi != a.ignore_index;
      // 3. l = (1-e)(lse - z_y) + e(lse - mean_c z_c); ignored rows contribute 0.
      a.loss_row[r] =
          valid ? (1.f - a.eps) * (lse - xf[yi]) + a.eps * (lse - s.sum_x / static_cast<float>(C)) : 0.f;
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

void check_inputs(at::TensorList logits, const Tensor& target, const Tensor& weights,
                  const std::optional<Tensor>& ema) {
  TORCH_CHECK(!logits.empty(), "multi_exit_cross_entropy: logits: expected at least one exit, got 0");
  const auto& first = logits[0];
  TORCH_CHECK(first.dim() == 2, "multi_exit_cross_entropy: logits[0]: expected [N, C], got shape ",
              first.sizes());
  for (size_t k = 0; k < logits.size(); ++k) {
    const auto& z = logits[k];
    TORCH_CHECK(z.sizes() == first.sizes(), "multi_exit_cross_entropy: logits[", k, "] has shape ",
                z.sizes(), " but logits[0] has ", first.sizes());
    TORCH_CHECK(z.scalar_type() == first.scalar_type(), "multi_exit_cross_entropy: logits[", k,
                "] has dtype ", z.scalar_type(), " but logits[0] has ", first.scalar_type());
    TORCH_CHECK(z.device() == first.device(), "multi_exit_cross_entropy: logits[", k, "] is on ",
                z.device(), " but logits[0] is on ", first.device());
  }
  TORCH_CHECK(at::isFloatingType(first.scalar_type()),
              "multi_exit_cross_entropy: logits: expected float32, bfloat16 or float16, got ",
              first.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == first.size(0),
              "multi_exit_cross_entropy: target: expected shape [", first.size(0), "], got ",
              target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong,
              "multi_exit_cross_entropy: target: expected int64 class indices, got ", target.scalar_type());
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == static_cast<int64_t>(logits.size()),
              "multi_exit_cross_entropy: weights: expected shape [", logits.size(), "], got ",
              weights.sizes());
  if (ema.has_value()) {
    TORCH_CHECK(ema->dim() == 1 && ema->size(0) == static_cast<int64_t>(logits.size()) &&
                    ema->scalar_type() == at::kFloat,
                "multi_exit_cross_entropy: ema: expected float32 of shape [", logits.size(), "], got ",
                ema->scalar_type(), " of shape ", ema->sizes());
  }
}

using FwdResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

FwdResult multi_exit_ce_fwd_cpu(at::TensorList logits, const Tensor& target, const Tensor& weights,
                                int64_t ignore_index, double label_smoothing,
                                const std::optional<Tensor>& ema, double momentum, bool compute_grad) {
  check_inputs(logits, target, weights, ema);
  const int64_t K = static_cast<int64_t>(logits.size());
  const int64_t N = logits[0].size(0);
  const int64_t C = logits[0].size(1);
  TORCH_CHECK_VALUE(N > 0, "multi_exit_cross_entropy: logits: empty batch (N = 0)");
  TORCH_CHECK_VALUE(C > 0, "multi_exit_cross_entropy: logits: no classes (C = 0)");
  for (const auto& t : {target, weights}) TORCH_CHECK(t.device().is_cpu(), "multi_exit_cross_entropy: target and weights must be on the CPU with CPU logits, got ", t.device());

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
  Tensor grads = compute_grad ? at::empty({K, N, C}, logits[0].options()) : at::empty({0}, logits[0].options());
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
    TORCH_CHECK(state.device().is_cpu(), "multi_exit_cross_entropy: ema: expected a CPU tensor, got ", state.device());
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

// True for a plain eager CPU tensor; false under tracing (fake / functional tensors carry
// the Python key), where reading the value would be a data-dependent branch.
bool is_plain_cpu(const Tensor& t) {
  return t.defined() && t.device().is_cpu() && !t.key_set().has(c10::DispatchKey::Python) &&
         !t.key_set().has(c10::DispatchKey::Functionalize);
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
  auto out = MultiExitCE::apply(logits, target, weights, ignore_index, label_smoothing, ema, momentum);
  return {out[0], out[1], out[2], out[3], out[4]};
}

// Below autograd (inference mode, or tensors that need no grad): no gradient buffers.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> multi_exit_ce_no_grad(
    at::TensorList logits, const Tensor& target, const Tensor& weights, int64_t ignore_index,
    double label_smoothing, const std::optional<Tensor>& ema, double momentum) {
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
