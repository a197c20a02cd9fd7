// Torch-side helper shared by the CPU and CUDA bindings of ann_kernels::early_exit_step
// (csrc/cpu/early_exit.cpp, csrc/cuda/early_exit.cpp): the gather of the survivors' rows of
// the hidden state [M, ...] as whole row blocks, keeping the input's memory format.
//
// A hidden state whose batch rows are each one dense block of numel / M elements (plain
// contiguous, channels_last, channels_last_3d, any dense layout with the batch dim
// outermost) is gathered block by block into an [R, ...] tensor with the input's strides:
// channels_last in, channels_last out, with no full copy first. Any other layout (a slice,
// a transposed batch dim) is first made dense in its suggested memory format.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace ann_kernels {

// The rows of `hidden` as blocks: the tensor to copy row blocks from, the strides of an
// [R, ...] tensor of the same layout, and the bytes of one row.
struct HiddenRowBlocks {
  at::Tensor source;
  std::vector<int64_t> strides;
  int64_t row_bytes;
};

// True when every batch row of `t` [M, ...] is one dense block of numel / M elements.
inline bool has_batch_row_blocks(const at::Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return false;
  const int64_t M = t.size(0);
  return M <= 1 || t.stride(0) == t.numel() / M;
}

inline HiddenRowBlocks hidden_row_blocks(const at::Tensor& hidden) {
  at::Tensor source = has_batch_row_blocks(hidden) ? hidden : hidden.contiguous(hidden.suggest_memory_format());
  const int64_t M = source.size(0);
  const int64_t row_elems = M > 0 ? source.numel() / M : 0;
  std::vector<int64_t> strides = source.strides().vec();
  if (row_elems > 0) strides[0] = row_elems;  // M = 1 may carry any stride(0)
  return {std::move(source), std::move(strides), row_elems * static_cast<int64_t>(hidden.element_size())};
}

}  // namespace ann_kernels
