// Direct Python entry point of ann_kernels::early_exit_step for the inference engine's hot
// loop: `ann_kernels._C.early_exit_step(...)` (same arguments and results as
// torch.ops.ann_kernels.early_exit_step).
//
// Why: calling a custom op through torch.ops from Python boxes every argument and costs
// ~7 us here; this pybind11 function unpacks the tensors directly and calls the same op
// through the C++ dispatcher (so the CPU and CUDA kernels are the registered ones), ~2 us.
// It releases the GIL while the kernel runs, so concurrent predict() calls overlap.
// Not traceable by torch.compile: compiled code should call torch.ops.ann_kernels.*.
#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace ann_kernels {

using StepResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using StepSignature = StepResult(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t, int64_t,
                                 int64_t);

void bind_early_exit(pybind11::module_& m) {
  m.def(
      "early_exit_step",
      [](const at::Tensor& logits, const at::Tensor& active_index, const std::optional<at::Tensor>& hidden,
         const at::Tensor& prediction, const at::Tensor& exit_index, const at::Tensor& confidence, double threshold,
         int64_t criterion, int64_t exit_id, int64_t exit_count) -> StepResult {
        static const auto op = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("ann_kernels::early_exit_step", "")
                                   .typed<StepSignature>();
        return op.call(logits, active_index, hidden, prediction, exit_index, confidence, threshold, criterion,
                       exit_id, exit_count);
      },
      pybind11::arg("logits"), pybind11::arg("active_index"), pybind11::arg("hidden"), pybind11::arg("prediction"),
      pybind11::arg("exit_index"), pybind11::arg("confidence"), pybind11::arg("threshold"),
      pybind11::arg("criterion"), pybind11::arg("exit_id"), pybind11::arg("exit_count"),
      pybind11::call_guard<pybind11::gil_scoped_release>(),
      "ann_kernels::early_exit_step without torch.ops' Python boxing (see torch.ops.ann_kernels.early_exit_step).");
  // The per-call state of EarlyExitEngine.predict in one call (four torch factory calls
  // from Python cost ~30 us here): prediction [n] i64, exit_index [n] i64, confidence [n]
  // f32 (uninitialised: every position is written by exactly one exit) and the initial
  // active_index = arange(n), all on `like`'s device.
  m.def(
      "early_exit_buffers",
      [](const at::Tensor& like, int64_t n) {
        const auto options = like.options().dtype(at::kLong);
        return std::make_tuple(at::empty({n}, options), at::empty({n}, options),
                               at::empty({n}, like.options().dtype(at::kFloat)), at::arange(n, options));
      },
      pybind11::arg("like"), pybind11::arg("n"),
      "(prediction [n] int64, exit_index [n] int64, confidence [n] float32, arange(n) int64) on like's device.");
}

}  // namespace ann_kernels
