// CUDA kernels of ann_kernels::early_exit_step on raw pointers (no torch headers; the torch
// binding is csrc/cuda/early_exit.cpp). The confidence row math is the shared
// csrc/include/ann_kernels/early_exit.h, the code the CPU kernel and its tests run.
// Launch plan and argument meanings: early_exit_kernel.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ann_kernels/early_exit.h>

#include "early_exit_kernel.h"

#include <cstdint>

namespace ann_kernels {
namespace cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;  // exit_rows_kernel: one warp per row
constexpr int kCompactThreads = 1024;
constexpr int kGatherThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Scatter of one exiting row to its original position (bounds-checked: a bad index is
// counted in status[1] and skipped, and the host raises).
__device__ __forceinline__ void scatter_exit(const ExitRowsArgs& a, int64_t row, float conf, int64_t argmax) {
  const int64_t position = a.active_index[row];
  if (position < 0 || position >= a.num_outputs) {
    atomicAdd(reinterpret_cast<unsigned long long*>(a.status + 1), 1ull);
    return;
  }
  a.prediction[position] = argmax;
  a.exit_index[position] = a.exit_id;
  a.confidence[position] = conf;
}

// One warp per row. Each lane summarises classes lane, lane + 32, ... (top, runner-up,
// first argmax), the warp merges the summaries (larger top wins, ties to the smaller
// index; the loser's top competes for the runner-up), then sums exp terms against the
// row's top. Rows holding a NaN are recomputed serially by lane 0 with the shared
// row_exit_confidence, for torch's NaN rules.
template <typename T>
__global__ void exit_rows_kernel(ExitRowsArgs a) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= a.num_rows) return;  // uniform per warp
  const T* x = static_cast<const T*>(a.logits) + row * a.row_stride;
  const int64_t C = a.num_classes, stride = a.col_stride;

  float top = -INFINITY, second = -INFINITY;
  long long argmax = C;  // sentinel: loses every tie against a real class
  bool has_nan = false;
  if (lane < C) {
    top = to_float(x[lane * stride]);
    argmax = lane;
    has_nan = top != top;
    for (int64_t c = lane + kWarpSize; c < C; c += kWarpSize) {
      const float v = to_float(x[c * stride]);
      has_nan |= v != v;
      if (v > top) {
        second = top;
        top = v;
        argmax = c;
      } else if (v > second) {
        second = v;
      }
    }
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float other_top = __shfl_xor_sync(kFullMask, top, offset);
    const float other_second = __shfl_xor_sync(kFullMask, second, offset);
    const long long other_arg = __shfl_xor_sync(kFullMask, argmax, offset);
    const bool other_wins = other_top > top || (other_top == top && other_arg < argmax);
    second = fmaxf(fmaxf(second, other_second), other_wins ? top : other_top);
    if (other_wins) {
      top = other_top;
      argmax = other_arg;
    }
  }
  float conf;
  int64_t row_argmax;
  if (__any_sync(kFullMask, has_nan)) {
    if (lane != 0) return;
    auto load = [x, stride](int64_t c) { return to_float(x[c * stride]); };
    conf = row_exit_confidence(load, C, a.criterion, &row_argmax);
  } else {
    const bool with_entropy = a.criterion == kEntropy;
    float sum_exp = 0.0f, sum_exp_shift = 0.0f;
    for (int64_t c = lane; c < C; c += kWarpSize)
      accumulate_exp_term(to_float(x[c * stride]), top, with_entropy, sum_exp, sum_exp_shift);
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      sum_exp += __shfl_xor_sync(kFullMask, sum_exp, offset);
      sum_exp_shift += __shfl_xor_sync(kFullMask, sum_exp_shift, offset);
    }
    if (lane != 0) return;
    row_argmax = static_cast<int64_t>(argmax);
    conf = exit_confidence(a.criterion, RowTop2{top, second, row_argmax}, sum_exp, sum_exp_shift, C);
  }
  a.row_confidence[row] = conf;
  a.row_argmax[row] = row_argmax;
  if (!a.decide) return;
  const bool exits = row_exits(conf, a.threshold);
  a.keep_flag[row] = exits ? 0 : 1;
  if (exits) scatter_exit(a, row, conf, row_argmax);
}

__global__ void apply_exit_mask_kernel(ExitRowsArgs a, const uint8_t* exit_mask) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= a.num_rows) return;
  const bool exits = exit_mask[row] != 0;
  a.keep_flag[row] = exits ? 0 : 1;
  if (exits) scatter_exit(a, row, a.row_confidence[row], a.row_argmax[row]);
}

// A single block walks the rows in chunks of kCompactThreads: ballot + popc give each
// row's rank inside its warp, warp 0 scans the warp totals, `base` carries across chunks.
__global__ void compact_kernel(const uint8_t* keep_flag, const int64_t* active_index, int64_t num_rows,
                               int64_t* keep_local, int64_t* survivor_index, int64_t* status) {
  __shared__ int64_t warp_offset[kCompactThreads / kWarpSize];
  __shared__ int64_t chunk_total;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  int64_t base = 0;
  for (int64_t start = 0; start < num_rows; start += blockDim.x) {
    const int64_t i = start + threadIdx.x;
    const bool keep = i < num_rows && keep_flag[i] != 0;
    const unsigned ballot = __ballot_sync(kFullMask, keep);
    if (lane == 0) warp_offset[warp] = __popc(ballot);
    __syncthreads();
    if (warp == 0) {
      const int64_t count = lane < num_warps ? warp_offset[lane] : 0;
      int64_t inclusive = count;
      for (int offset = 1; offset < kWarpSize; offset *= 2) {
        const int64_t up = __shfl_up_sync(kFullMask, inclusive, offset);
        if (lane >= offset) inclusive += up;
      }
      if (lane < num_warps) warp_offset[lane] = inclusive - count;
      if (lane == kWarpSize - 1) chunk_total = inclusive;
    }
    __syncthreads();
    if (keep) {
      const int64_t position = base + warp_offset[warp] + __popc(ballot & ((1u << lane) - 1u));
      keep_local[position] = i;
      survivor_index[position] = active_index[i];
    }
    base += chunk_total;
    __syncthreads();  // warp_offset / chunk_total are rewritten by the next chunk
  }
  if (threadIdx.x == 0) status[0] = base;
}

template <typename Word>
__global__ void gather_rows_kernel(const Word* src, Word* dst, const int64_t* keep_local, int64_t num_kept,
                                   int64_t words_per_row) {
  const int64_t total = num_kept * words_per_row;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < total;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = j / words_per_row, w = j - r * words_per_row;
    dst[j] = src[keep_local[r] * words_per_row + w];
  }
}

template <typename Word>
cudaError_t launch_gather_words(const void* src, void* dst, const int64_t* keep_local, int64_t num_kept,
                                int64_t row_bytes, cudaStream_t stream) {
  const int64_t words = row_bytes / static_cast<int64_t>(sizeof(Word));
  const int64_t total = num_kept * words;
  const int64_t blocks = (total + kGatherThreads - 1) / kGatherThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
  gather_rows_kernel<Word><<<grid, kGatherThreads, 0, stream>>>(static_cast<const Word*>(src),
                                                                 static_cast<Word*>(dst), keep_local, num_kept,
                                                                 words);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_exit_rows(const ExitRowsArgs& args, cudaStream_t stream) {
  if (args.num_rows == 0) return cudaSuccess;
  const int64_t blocks = (args.num_rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks)), block(kWarpsPerBlock * kWarpSize);
  switch (args.type) {
    case LogitsType::kFloat32: exit_rows_kernel<float><<<grid, block, 0, stream>>>(args); break;
    case LogitsType::kFloat16: exit_rows_kernel<__half><<<grid, block, 0, stream>>>(args); break;
    case LogitsType::kBFloat16: exit_rows_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(args); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_apply_exit_mask(const ExitRowsArgs& args, const uint8_t* exit_mask, cudaStream_t stream) {
  if (args.num_rows == 0) return cudaSuccess;
  const int64_t blocks = (args.num_rows + 255) / 256;
  apply_exit_mask_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(args, exit_mask);
  return cudaGetLastError();
}

cudaError_t launch_compact(const uint8_t* keep_flag, const int64_t* active_index, int64_t num_rows,
                           int64_t* keep_local, int64_t* survivor_index, int64_t* status, cudaStream_t stream) {
  compact_kernel<<<1, kCompactThreads, 0, stream>>>(keep_flag, active_index, num_rows, keep_local, survivor_index,
                                                     status);
  return cudaGetLastError();
}

cudaError_t launch_gather_rows(const void* src, void* dst, const int64_t* keep_local, int64_t num_kept,
                               int64_t row_bytes, cudaStream_t stream) {
  if (num_kept == 0 || row_bytes == 0) return cudaSuccess;
  const auto aligned = [&](int64_t bytes) {
    return row_bytes % bytes == 0 && reinterpret_cast<uintptr_t>(src) % bytes == 0 &&
           reinterpret_cast<uintptr_t>(dst) % bytes == 0;
  };
  if (aligned(16)) return launch_gather_words<uint4>(src, dst, keep_local, num_kept, row_bytes, stream);
  if (aligned(4)) return launch_gather_words<uint32_t>(src, dst, keep_local, num_kept, row_bytes, stream);
  return launch_gather_words<uint8_t>(src, dst, keep_local, num_kept, row_bytes, stream);
}

}  // namespace cuda
}  // namespace ann_kernels
