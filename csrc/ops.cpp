// Every op schema of ann_kernels, in one place (torchao style). Implementations:
//   CPU       csrc/cpu/<op>.cpp            (TORCH_LIBRARY_IMPL(ann_kernels, CPU, ...))
//   CUDA      csrc/cuda/<op>_kernel.cu + binding, or Triton registered from Python
//   Autograd  C++ (per-call overhead matters, see DESIGN.md), beside the CPU kernel
//   Fake      ann_kernels/ops/<op>.py (torch.library.register_fake)
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/buffer_pool.h"

TORCH_LIBRARY(ann_kernels, m) {
  // Fused multi-exit cross-entropy, the op users call (differentiable in `logits`,
  // `weights` [K] (None = all ones) and `sample_weights` [N] or [K, N] float32 (None = ones)).
  // loss = sum_k w_k sum_i s_ik l_ik / N_valid. Returns (loss [] f32, per_exit [K] f32
  // (unweighted L_k), per_sample [K,N] f32, confidence [K,N] f32, prediction [K,N] i64);
  // updates the AdaLoss running average `ema` [K] in place.
  m.def(
      "multi_exit_ce(Tensor[] logits, Tensor target, Tensor? weights, int ignore_index, "
      "float label_smoothing, Tensor(a!)? ema, float momentum, Tensor? sample_weights=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Older backend entry: the same outputs plus, when compute_grad, the gradient of the
  // loss w.r.t. the logits for grad_out = 1 as one [K, N, C] tensor (already scaled by
  // w_k / N_valid; an empty [0] tensor otherwise), in the logits dtype, but fp32 for fp16
  // logits (fp16 would flush the entries a caller's grad_out needs). One tensor, not Tensor[]:
  // functionalization (torch.compile) rejects list outputs beside a mutated input.
  m.def(
      "multi_exit_ce_fwd(Tensor[] logits, Tensor target, Tensor weights, int ignore_index, "
      "float label_smoothing, Tensor(a!)? ema, float momentum, bool compute_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Backend kernels behind multi_exit_ce (CPU: C++, CUDA: Triton). Arguments are checked
  // once by the caller (the op's Autograd / CompositeExplicitAutograd kernels), not here.
  // grad_mode 0: no gradient work; 1: also the gradient w_k s_ik / N_valid (p - t) as
  // [K, N, C] in the logits dtype (last output); 2: also lse [K, N] f32 (sixth output) for
  // _multi_exit_ce_backward; 3 (fp16): the gradient of 1 times an exact power of two 2^m
  // that keeps it inside fp16's range, sixth output [2] f32 {2^-m, 2^-m_safe} (backward
  // multiplies by grad_out 2^-m); 4: as 3, with m lowered to the last CPU backward's
  // power-of-two grad_out where that is safe (CPU; CUDA treats 4 as 3). Unused outputs are
  // empty [0] tensors.
  m.def(
      "_multi_exit_ce_forward(Tensor[] logits, Tensor target, Tensor? weights, Tensor? sample_weights, "
      "int ignore_index, float label_smoothing, Tensor(a!)? ema, float momentum, int grad_mode) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The gradient [K, N, C] (logits dtype) for grad_out = grad_loss [] from the saved lse, in
  // one pass: grad_out w_k s_ik / N_valid (softmax - (1-e) onehot - e/C), fp32 math.
  m.def(
      "_multi_exit_ce_backward(Tensor grad_loss, Tensor[] logits, Tensor target, Tensor? weights, "
      "Tensor? sample_weights, Tensor lse, int ignore_index, float label_smoothing) -> Tensor");
  // grads *= grad_loss in place (nothing at all when grad_loss == 1; no host sync on CUDA).
  m.def("_multi_exit_ce_scale_(Tensor(a!) grads, Tensor grad_loss) -> ()");
  // One early-exit decision (inference; not differentiable). From the M active samples'
  // logits [M, C] (original positions active_index [M] int64): confidence by `criterion`
  // (0 max_prob, 1 entropy, 2 margin); rows with confidence >= threshold exit (every row
  // when threshold = -inf), or, when exit_count >= 0, the exit_count most confident rows.
  // Writes argmax / exit_id / confidence of the exiting rows into prediction [N] i64,
  // exit_index [N] i64, confidence [N] f32 at their original positions. Returns
  // (survivor_index [R] i64 original positions, keep_local [R] i64 row numbers in this
  // call, hidden rows of the survivors [R, ...] (a new tensor; [0] when hidden is None)).
  m.def(
      "early_exit_step(Tensor logits, Tensor active_index, Tensor? hidden, Tensor(a!) prediction, "
      "Tensor(b!) exit_index, Tensor(c!) confidence, float threshold, int criterion, int exit_id, "
      "int exit_count) -> (Tensor, Tensor, Tensor)");
  // Fused linear + multi-exit cross-entropy (csrc/cpu/multi_exit_linear_ce.cpp): K exits'
  // hidden states [N, H] through one head weight [V, H] (or one per exit, [K, V, H]) with
  // optional bias [V] / [K, V], never materialising the K x N x V logits. Differentiable in
  // hidden, weight, bias, weights (dLoss/dw_k = L_k) and sample_weights ([N] or [K, N]).
  // Only the exits in `active` are computed (the others: per_exit NaN, no work).
  // budget_bytes: the logits tile's memory (0 = default). Returns (loss, per_exit [K],
  // per_sample [K,N], confidence [K,N], prediction [K,N]); updates `ema` [K] in place.
  m.def(
      "multi_exit_linear_ce(Tensor[] hidden, Tensor weight, Tensor target, Tensor weights, Tensor? bias, "
      "Tensor? sample_weights, int ignore_index, float label_smoothing, float z_loss, Tensor(a!)? ema, "
      "float momentum, int[] active, int budget_bytes) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Its backend kernel: the same outputs plus, when compute_grad, fp32 gradients for
  // grad_out = 1: hidden [K, N, H], weight (weight's shape), bias (bias's shape; [0] without).
  m.def(
      "multi_exit_linear_ce_fwd(Tensor[] hidden, Tensor weight, Tensor target, Tensor weights, Tensor? bias, "
      "Tensor? sample_weights, int ignore_index, float label_smoothing, float z_loss, Tensor(a!)? ema, "
      "float momentum, int[] active, int budget_bytes, bool compute_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace ann_kernels {
void bind_early_exit(pybind11::module_& m);  // csrc/early_exit_binding.cpp
void check_multi_exit_ce_inputs(at::TensorList logits, const at::Tensor& target,
                                const std::optional<at::Tensor>& weights,
                                const std::optional<at::Tensor>& sample_weights, double label_smoothing,
                                const std::optional<at::Tensor>& ema, double momentum);  // csrc/cpu/multi_exit_ce.cpp
}

// The module only needs to exist so `import ann_kernels._C` loads the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ann_kernels C++ ops; use them through torch.ops.ann_kernels.*";
  ann_kernels::bind_early_exit(m);
  m.def("empty_grad_cache", [] { ann_kernels::BufferPool::instance().clear(); },
        "Free the idle gradient buffers the CPU loss kernel keeps for reuse.");
  m.def("grad_cache_bytes", [] { return ann_kernels::BufferPool::instance().idle_bytes(); },
        "Bytes held by idle cached gradient buffers.");
  m.def("grad_cache_stats", [] {
        auto [handed_out, hits] = ann_kernels::BufferPool::instance().counts();
        auto [idle, idle_limit, in_use] = ann_kernels::BufferPool::instance().memory();
        return std::make_tuple(handed_out, hits, idle, idle_limit, in_use);
      },
      "(buffers handed out, of which served from the cache, idle bytes, their bound, pooled bytes in use).");
  m.def("check_multi_exit_ce_inputs",
        [](const std::vector<at::Tensor>& logits, const at::Tensor& target, const std::optional<at::Tensor>& weights,
           const std::optional<at::Tensor>& sample_weights, double label_smoothing,
           const std::optional<at::Tensor>& ema, double momentum) {
          ann_kernels::check_multi_exit_ce_inputs(logits, target, weights, sample_weights, label_smoothing, ema,
                                                  momentum);
        },
        "The argument check every path of multi_exit_cross_entropy runs (raises naming the argument).");
}
