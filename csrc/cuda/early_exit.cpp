// CUDA implementation of ann_kernels::early_exit_step (schema in csrc/ops.cpp): a thin torch
// binding around the raw-pointer kernels of early_exit_kernel.cu. Compiled only with a CUDA
// torch (setup.py). Semantics are those of the CPU kernel (csrc/cpu/early_exit.cpp).
//
// Host synchronisation: one 16-byte device-to-host copy per call (the survivor count R,
// needed to size the outputs, and the count of out-of-range indices), none when nobody can
// exit (threshold +inf or exit_count 0). Quota mode ranks rows with a stable at::sort.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <ann_kernels/early_exit.h>

#include "../hidden_rows.h"
#include "early_exit_kernel.h"

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace ann_kernels {
namespace {

using at::Tensor;

void check_cuda(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "early_exit_step: ", what, " failed: ", cudaGetErrorString(status));
}

void check_buffer(const Tensor& t, const char* name, at::ScalarType dtype, int64_t n, const at::Device& device) {
  TORCH_CHECK(t.device() == device, "early_exit_step: ", name, ": expected a tensor on ", device, ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "early_exit_step: ", name, ": expected dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.is_contiguous(), "early_exit_step: ", name,
              ": expected a contiguous [N] = [", n, "] tensor, got shape ", t.sizes());
}

// Survivors' rows of `hidden` as a new [R, ...] tensor in hidden's layout (channels_last
// stays channels_last; dense row blocks are gathered directly, no full copy first:
// csrc/hidden_rows.h).
Tensor gather_hidden(const Tensor& hidden, const Tensor& keep_local, int64_t R, cudaStream_t stream) {
  const HiddenRowBlocks blocks = hidden_row_blocks(hidden);
  std::vector<int64_t> shape = hidden.sizes().vec();
  shape[0] = R;
  Tensor out = at::empty_strided(shape, blocks.strides, hidden.options());
  if (R == 0 || blocks.row_bytes == 0) return out;
  check_cuda(cuda::launch_gather_rows(blocks.source.const_data_ptr(), out.mutable_data_ptr(),
                                      keep_local.const_data_ptr<int64_t>(), R, blocks.row_bytes, stream),
             "gather of the hidden rows");
  return out;
}

std::tuple<Tensor, Tensor, Tensor> early_exit_step_cuda(const Tensor& logits, const Tensor& active_index,
                                                        const std::optional<Tensor>& hidden,
                                                        const Tensor& prediction, const Tensor& exit_index,
                                                        const Tensor& confidence, double threshold,
                                                        int64_t criterion, int64_t exit_id, int64_t exit_count) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2, "early_exit_step: logits: expected a CUDA [M, C] tensor, got ",
              logits.sizes(), " on ", logits.device());
  const at::Device device = logits.device();
  const c10::cuda::CUDAGuard guard(device);
  const auto dtype = logits.scalar_type();
  cuda::LogitsType type;
  switch (dtype) {
    case at::kFloat: type = cuda::LogitsType::kFloat32; break;
    case at::kHalf: type = cuda::LogitsType::kFloat16; break;
    case at::kBFloat16: type = cuda::LogitsType::kBFloat16; break;
    default: TORCH_CHECK(false, "early_exit_step: logits: expected float32, float16 or bfloat16, got ", dtype);
  }
  const int64_t M = logits.size(0), C = logits.size(1);
  TORCH_CHECK(C >= 1, "early_exit_step: logits: no classes (C = 0)");
  TORCH_CHECK(active_index.device() == device && active_index.scalar_type() == at::kLong &&
                  active_index.dim() == 1 && active_index.size(0) == M,
              "early_exit_step: active_index: expected an int64 [M] = [", M, "] tensor on ", device, ", got ",
              active_index.scalar_type(), " of shape ", active_index.sizes(), " on ", active_index.device());
  const int64_t N = prediction.numel();
  check_buffer(prediction, "prediction", at::kLong, N, device);
  check_buffer(exit_index, "exit_index", at::kLong, N, device);
  check_buffer(confidence, "confidence", at::kFloat, N, device);
  TORCH_CHECK(!std::isnan(threshold), "early_exit_step: threshold: must not be NaN");
  TORCH_CHECK(criterion == kMaxProb || criterion == kEntropy || criterion == kMargin,
              "early_exit_step: criterion: expected 0 (max_prob), 1 (entropy) or 2 (margin), got ", criterion);
  TORCH_CHECK(exit_count >= -1, "early_exit_step: exit_count: expected -1 (threshold mode) or >= 0, got ",
              exit_count);
  if (hidden.has_value()) {
    TORCH_CHECK(hidden->device() == device, "early_exit_step: hidden: expected a tensor on ", device, ", got ",
                hidden->device());
    TORCH_CHECK(hidden->dim() >= 1 && hidden->size(0) == M, "early_exit_step: hidden: expected batch dim 0 of size M = ",
                M, ", got shape ", hidden->sizes());
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const Tensor active = active_index.contiguous();
  const float thr = static_cast<float>(threshold);

  // Nobody can exit: no kernel, no synchronisation.
  if (M == 0 || exit_count == 0 || (exit_count < 0 && thr == std::numeric_limits<float>::infinity())) {
    Tensor keep_local = at::arange(M, active.options());
    Tensor survivors = active.clone();
    Tensor gathered = hidden.has_value() ? gather_hidden(*hidden, keep_local, M, stream)
                                         : at::empty({0}, logits.options());
    return {std::move(survivors), std::move(keep_local), std::move(gathered)};
  }

  Tensor row_confidence = at::empty({M}, logits.options().dtype(at::kFloat));
  Tensor row_argmax = at::empty({M}, active.options());
  Tensor keep_flag = at::empty({M}, logits.options().dtype(at::kByte));
  Tensor status = at::zeros({2}, active.options());  // {R, number of out-of-range indices}
  cuda::ExitRowsArgs args{logits.const_data_ptr(), type, M, C, logits.stride(0), logits.stride(1), criterion, thr,
                          /*decide=*/exit_count < 0, exit_id, active.const_data_ptr<int64_t>(), N,
                          prediction.mutable_data_ptr<int64_t>(), exit_index.mutable_data_ptr<int64_t>(),
                          confidence.mutable_data_ptr<float>(), row_confidence.mutable_data_ptr<float>(),
                          row_argmax.mutable_data_ptr<int64_t>(), keep_flag.mutable_data_ptr<uint8_t>(),
                          status.mutable_data_ptr<int64_t>()};
  check_cuda(cuda::launch_exit_rows(args, stream), "exit_rows kernel");
  if (exit_count >= 0) {
    // Quota: the exit_count most confident eligible rows (stable sort: ties by row order).
    // NaN confidences (rows with a non-finite maximum) are never eligible: they sort last
    // (key -inf, below every confidence in [0, 1]) and are masked out of the chosen ones.
    const Tensor eligible = row_confidence.eq(row_confidence);
    Tensor exit_mask;
    if (exit_count >= M) {
      exit_mask = eligible.to(at::kByte);
    } else {
      const Tensor key = at::where(eligible, row_confidence, -std::numeric_limits<float>::infinity());
      const Tensor order = std::get<1>(at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/true));
      exit_mask = at::zeros({M}, keep_flag.options());
      exit_mask.index_fill_(0, order.narrow(0, 0, exit_count), 1);
      exit_mask.mul_(eligible);
    }
    check_cuda(cuda::launch_apply_exit_mask(args, exit_mask.const_data_ptr<uint8_t>(), stream), "exit mask kernel");
  }
  Tensor keep_buffer = at::empty({M}, active.options());
  Tensor survivor_buffer = at::empty({M}, active.options());
  check_cuda(cuda::launch_compact(keep_flag.const_data_ptr<uint8_t>(), active.const_data_ptr<int64_t>(), M,
                                  keep_buffer.mutable_data_ptr<int64_t>(), survivor_buffer.mutable_data_ptr<int64_t>(),
                                  status.mutable_data_ptr<int64_t>(), stream),
             "compaction kernel");
  const Tensor host_status = status.cpu();  // the one synchronisation: R sizes the outputs
  const int64_t R = host_status[0].item<int64_t>();
  const int64_t bad = host_status[1].item<int64_t>();
  TORCH_CHECK(bad == 0, "early_exit_step: ", bad, " entries of active_index are out of range for output buffers ",
              "of size N = ", N);
  Tensor keep_local = keep_buffer.narrow(0, 0, R);
  Tensor survivors = survivor_buffer.narrow(0, 0, R);
  Tensor gathered = hidden.has_value() ? gather_hidden(*hidden, keep_local, R, stream)
                                       : at::empty({0}, logits.options());
  return {std::move(survivors), std::move(keep_local), std::move(gathered)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ann_kernels, CUDA, m) { m.impl("early_exit_step", &early_exit_step_cuda); }

}  // namespace ann_kernels
