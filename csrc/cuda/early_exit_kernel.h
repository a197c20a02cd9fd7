// Host launchers of the early-exit CUDA kernels (csrc/cuda/early_exit_kernel.cu), called by
// the torch binding csrc/cuda/early_exit.cpp. Plain C types and raw device pointers: no
// torch headers, so the kernel file compiles with `nvcc -c` alone.
//
// One call of ann_kernels::early_exit_step on CUDA runs:
//   launch_exit_rows        one warp per logit row: confidence, argmax and (threshold mode)
//                           the decision; exiting rows scatter prediction / exit index /
//                           confidence to their original positions; keep flags [M];
//   launch_apply_exit_mask  (quota mode only) the same scatter from a precomputed exit mask;
//   launch_compact          one block: prefix sum of the keep flags -> keep_local [R] and
//                           survivor_index [R], plus status = {R, number of bad indices};
//   launch_gather_rows      the survivors' rows of the hidden state, as wide words.
// The host reads `status` once (one device-to-host copy per call: R sizes the outputs).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ann_kernels {
namespace cuda {

enum class LogitsType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct ExitRowsArgs {
  const void* logits;           // [M, C] of `type`
  LogitsType type;
  int64_t num_rows;             // M
  int64_t num_classes;          // C >= 1
  int64_t row_stride;           // in elements
  int64_t col_stride;           // in elements
  int64_t criterion;            // ExitCriterion (early_exit.h)
  float threshold;              // threshold mode: exit when confidence >= threshold (-inf: all)
  bool decide;                  // false: only fill row_confidence / row_argmax (quota mode)
  int64_t exit_id;              // value written into exit_index
  const int64_t* active_index;  // [M] original positions
  int64_t num_outputs;          // N, the size of the output buffers
  int64_t* prediction;          // [N]
  int64_t* exit_index;          // [N]
  float* confidence;            // [N]
  float* row_confidence;        // [M] scratch
  int64_t* row_argmax;          // [M] scratch
  uint8_t* keep_flag;           // [M] 1 = survives (written when decide)
  int64_t* status;              // [2]: status[1] counts out-of-range active_index entries
};

cudaError_t launch_exit_rows(const ExitRowsArgs& args, cudaStream_t stream);

// Quota mode: rows with exit_mask[i] = 1 exit (scatter as above), keep_flag = !exit_mask.
cudaError_t launch_apply_exit_mask(const ExitRowsArgs& args, const uint8_t* exit_mask, cudaStream_t stream);

// keep_flag [M] -> keep_local [R], survivor_index [R] (row order kept), status[0] = R.
cudaError_t launch_compact(const uint8_t* keep_flag, const int64_t* active_index, int64_t num_rows,
                           int64_t* keep_local, int64_t* survivor_index, int64_t* status, cudaStream_t stream);

// dst[r] = src[keep_local[r]] for rows of row_bytes bytes, r < num_kept.
cudaError_t launch_gather_rows(const void* src, void* dst, const int64_t* keep_local, int64_t num_kept,
                               int64_t row_bytes, cudaStream_t stream);

}  // namespace cuda
}  // namespace ann_kernels
