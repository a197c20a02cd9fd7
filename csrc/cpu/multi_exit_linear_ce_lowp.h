// The bf16 / fp16 chunk of the fused linear + multi-exit cross-entropy on CPU (included by
// multi_exit_linear_ce.cpp only). Every GEMM runs in the input dtype (ATen -> oneDNN / MKL
// bf16 and fp16 GEMMs, fp32 accumulation inside); no fp32 copy of W or of the chunk exists.
// ATen has no CPU GEMM with bf16 inputs and an fp32 output (aten::mm.dtype is CUDA-only), so
// a logits tile is rounded to the input dtype, exactly as eager F.linear rounds it, and the
// row statistics and the gradient are formed in fp32 from it, one row at a time.
//
// Accumulation (what keeps the gradients within 2x torch's own error against an fp64
// truth, tests/test_multi_exit_linear_ce.py): the tile handed to the gradient GEMMs holds
// only the softmax part g_soft = scale ((1 + 2 z lse) softmax - e/V), which is small on every
// entry; the one-hot part -scale (1-e) onehot(y), which carries the large entries, never
// goes through a rounded GEMM output: it is added in fp32,
//   grad_h_r  = sum_tiles (g_soft @ W_tile)_r  - scale_r (1-e) W_{y_r}     (fp32 row, then rounded once)
//   grad_W_v  = sum_chunks (g_soft^T @ h)_v    - sum_{r: y_r = v} scale_r (1-e) h_r
// The second sum is formed per target row v in fp32 after the last chunk (rows grouped by
// target) and added with one rounding; the first accumulates in the bf16 grad_W through
// addmm's beta = 1 (one rounding per chunk, at the magnitude of the small softmax part).
// Accumulating the full gradient in bf16 instead gives 2.3x torch's error at 16 chunks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "multi_exit_linear_ce_rows.h"
#include "row16.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

namespace ann_kernels {
namespace linear_ce_detail {

// One-tile plans with gradients: row x [V]'s statistics and the softmax part of its
// gradient, rounded once back into the row (what stats_and_softmax_grad_row does to an fp32
// row, see multi_exit_linear_ce_rows.h). `scratch` holds V floats.
//   bf16, and fp16 with F16C (kRow16InPlace): the row is read as 16-bit values (exact
//   widening, so the statistics are those of its fp32 copy), e = exp(x - max) goes to the
//   scratch, and g = round(a e - b) is written over the row (affine_row_to16): three passes
//   over the row and no fp32 copy of it;
//   otherwise: the row converted into the scratch, processed there, rounded back.
template <typename scalar_t>
inline RowState softmax_grad_row_lowp(scalar_t* x, int64_t V, int64_t y, float scale, const Args& a,
                                      float* scratch) {
#if defined(ANN_KERNELS_AVX2)
  if constexpr (kRow16InPlace<scalar_t>) {
    constexpr Half16 D = kHalf16Of<scalar_t>;
    uint16_t* bits = reinterpret_cast<uint16_t*>(x);
    RowStats rs;
    if (!row_softmax_numerator_in(Row16<D>{bits}, V, scratch, &rs)) {  // NaN or +-inf max
      std::fill(x, x + V, static_cast<scalar_t>(scale == 0.f ? 0.f : std::numeric_limits<float>::quiet_NaN()));
      return RowState{-std::numeric_limits<float>::infinity(), 0.f, 0.f, 0.f, 0, false};
    }
    const float x_target = y >= 0 && y < V ? static_cast<float>(x[y]) : 0.f;
    if (scale == 0.f) {
      std::fill(x, x + V, static_cast<scalar_t>(0.f));
    } else {
      const float lse = rs.max + std::log(rs.sum_exp);
      affine_row_to16<D>(scratch, V, scale * (1.f + 2.f * a.z * lse) / rs.sum_exp,
                         scale * a.eps / static_cast<float>(V), bits);
    }
    return RowState{rs.max, rs.sum_exp, rs.sum_x, x_target, rs.argmax, true};
  }
#endif
  row_to_float(x, V, scratch);
  const RowState s = stats_and_softmax_grad_row(scratch, V, y, scale, a);
  float_to_row(scratch, V, x);
  return s;
}

// Buffers of one low-precision call (reused by every chunk).
struct LowpBuffers {
  at::Tensor h;        // [rows * H] input dtype: the chunk's hidden rows
  at::Tensor logits;   // [rows * vtile] input dtype: a logits tile, then its softmax-part gradient
  at::Tensor gh_part;  // [rows * H] input dtype: one tile's g_soft @ W_tile
  at::Tensor gh_acc;   // [rows * H] fp32: the chunk's grad_h rows
};

// One chunk of rows [r0, r0 + R) in the input dtype scalar_t (see the file comment).
template <typename scalar_t>
void run_chunk_lowp(int64_t r0, int64_t R, const Plan& plan, const std::vector<at::Tensor>& hidden,
                    const at::Tensor& weight, const at::Tensor& bias, const Args& a, const int64_t* y,
                    const float* row_scale, LowpBuffers& buf, Outputs& out) {
  const int64_t H = a.H, V = a.V, N = a.N;
  const int64_t k0 = a.active[r0 / N];
  // 1. Gather the chunk's hidden rows [R, H] in the input dtype.
  at::Tensor h = buf.h.narrow(0, 0, R * H).view({R, H});
  scalar_t* hp = h.data_ptr<scalar_t>();
  for (int64_t r = 0; r < R; ++r) {
    const int64_t g = r0 + r, k = a.active[g / N], i = g % N;
    const at::Tensor& src = hidden[k];
    const scalar_t* s = src.data_ptr<scalar_t>() + i * src.stride(0);
    const int64_t st = src.stride(1);
    if (st == 1) {
      std::memcpy(hp + r * H, s, H * sizeof(scalar_t));
    } else {
      for (int64_t c = 0; c < H; ++c) hp[r * H + c] = s[c * st];
    }
  }
  const at::Tensor Wk = a.per_exit_head ? weight.select(0, k0) : weight;
  const at::Tensor bk = !bias.defined() ? at::Tensor() : (bias.dim() == 2 ? bias.select(0, k0) : bias);
  auto logits_tile = [&](int64_t v0, int64_t vt) -> at::Tensor {
    at::Tensor z = buf.logits.narrow(0, 0, R * vt).view({R, vt});
    const at::Tensor Wt = Wk.narrow(0, v0, vt);
    if (bk.defined()) {
      at::addmm_out(z, bk.narrow(0, v0, vt), h, Wt.t());
    } else {
      at::mm_out(z, h, Wt.t());
    }
    return z;
  };
  std::vector<RowState> st(R, RowState{-std::numeric_limits<float>::infinity(), 0.f, 0.f, 0.f, 0, true});
  std::vector<int64_t> ty(R);
  for (int64_t r = 0; r < R; ++r) ty[r] = y[(r0 + r) % N];
  const bool one_tile = plan.vtile >= V;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::min(plan.vtile, V));

  const bool with_grad = a.compute_grad;
  at::Tensor gh_acc = with_grad ? buf.gh_acc.narrow(0, 0, R * H).view({R, H}) : at::Tensor();
  at::Tensor gh_part = with_grad ? buf.gh_part.narrow(0, 0, R * H).view({R, H}) : at::Tensor();
  at::Tensor gW = !with_grad ? at::Tensor() : (a.per_exit_head ? out.grad_weight.select(0, k0) : out.grad_weight);
  // Gradient GEMMs in the input dtype of one tile z [R, vt] holding g_soft: gh_part = g_soft
  // @ W_tile summed in fp32 into gh_acc; grad_W_tile (+)= g_soft^T h (= on the tile's first
  // chunk when grad_weight was allocated empty); grad_b_tile += sum_r g_soft in fp32.
  auto gradient_gemms = [&](int64_t v0, int64_t vt, const at::Tensor& z) {
    const at::Tensor Wt = Wk.narrow(0, v0, vt);
    at::mm_out(gh_part, z, Wt);
    const scalar_t* part = gh_part.data_ptr<scalar_t>();
    float* acc = gh_acc.data_ptr<float>();
    if (v0 == 0) {
      row_to_float(part, R * H, acc);
    } else {
      gh_acc.add_(gh_part);
    }
    accumulate_grad_weight(gW.narrow(0, v0, vt), z, h, out.grad_weight_empty && r0 == 0);
    if (out.grad_bias.defined()) {
      at::Tensor gb = out.grad_bias.dim() == 2 ? out.grad_bias.select(0, k0) : out.grad_bias;
      gb.narrow(0, v0, vt).add_(z.sum(0, false, at::kFloat));
    }
  };
  std::vector<float> lse(R);
  if (one_tile && a.compute_grad) {
    // 2-4. One tile covering V: each row's statistics and g_soft formed in one visit
    //      (softmax_grad_row_lowp: the 16-bit row read in place, one exp per logit), rounded
    //      once back into the tile; the per-row results; the gradient GEMMs.
    at::Tensor z = logits_tile(0, V);
    scalar_t* zp = z.data_ptr<scalar_t>();
    at::parallel_for(0, R, grain, [&](int64_t b, int64_t e) {
      std::vector<float> scratch(V);
      for (int64_t r = b; r < e; ++r) {
        st[r] = softmax_grad_row_lowp(zp + r * V, V, ty[r], row_scale[r0 + r], a, scratch.data());
      }
    });
    finish_rows(r0, R, a, st, ty, lse, out);
    gradient_gemms(0, V, z);
  } else {
    // 2. Pass A: statistics (online over tiles), each row read into fp32.
    for (int64_t v0 = 0; v0 < V; v0 += plan.vtile) {
      const int64_t vt = std::min(plan.vtile, V - v0);
      at::Tensor z = logits_tile(v0, vt);
      scalar_t* zp = z.data_ptr<scalar_t>();
      at::parallel_for(0, R, grain, [&](int64_t b, int64_t e) {
        std::vector<float> row(vt);
        for (int64_t r = b; r < e; ++r) {
          if (!st[r].finite) continue;
          row_to_float(zp + r * vt, vt, row.data());
          merge_tile_row(row.data(), vt, v0, ty[r], st[r], false);
        }
      });
    }
    // 3. Per-row results.
    finish_rows(r0, R, a, st, ty, lse, out);
    if (!a.compute_grad) return;

    // 4. Pass B: each tile recomputed, the softmax part of the gradient in place (rounded
    //    once to the input dtype), then the gradient GEMMs in the input dtype.
    for (int64_t v0 = 0; v0 < V; v0 += plan.vtile) {
      const int64_t vt = std::min(plan.vtile, V - v0);
      at::Tensor z = logits_tile(v0, vt);
      scalar_t* zp = z.data_ptr<scalar_t>();
      at::parallel_for(0, R, grain, [&](int64_t b, int64_t e) {
        std::vector<float> row(vt);
        for (int64_t r = b; r < e; ++r) {
          scalar_t* x = zp + r * vt;
          const float scale = row_scale[r0 + r];
          if (scale == 0.f || !st[r].finite) {
            std::fill(x, x + vt,
                      static_cast<scalar_t>(scale == 0.f ? 0.f : std::numeric_limits<float>::quiet_NaN()));
            continue;
          }
          row_to_float(x, vt, row.data());
          grad_row(row.data(), vt, scale * (1.f + 2.f * a.z * lse[r]), scale * a.eps / static_cast<float>(V), true,
                   lse[r]);
          float_to_row(row.data(), vt, x);
        }
      });
      gradient_gemms(v0, vt, z);
    }
  }
  // 5. The one-hot part of grad_h in fp32, then the rows rounded once into grad_hidden.
  float* ga = gh_acc.data_ptr<float>();
  const scalar_t* wp = Wk.data_ptr<scalar_t>();
  const int64_t ws0 = Wk.stride(0), ws1 = Wk.stride(1);
  scalar_t* dst = out.grad_hidden.data_ptr<scalar_t>();
  for (int64_t r = 0; r < R; ++r) {
    const float c = row_scale[r0 + r] * (1.f - a.eps);
    float* gr = ga + r * H;
    if (c != 0.f && st[r].finite) {
      const scalar_t* wy = wp + ty[r] * ws0;
      for (int64_t j = 0; j < H; ++j) gr[j] -= c * static_cast<float>(wy[j * ws1]);
    }
    const int64_t g = r0 + r, k = a.active[g / N], i = g % N;
    float_to_row(gr, H, dst + (k * N + i) * H);
  }
}

// After the last chunk: the one-hot part of grad_W (and of the fp32 grad_b accumulator),
// -sum_{r: y_r = v} scale_r (1-e) h_r, formed per target row in fp32 and added with one
// rounding. Rows are grouped by (head, target) in a fixed order (no dependence on threads).
template <typename scalar_t>
void add_target_rows_lowp(const std::vector<at::Tensor>& hidden, const Args& a, const int64_t* y,
                          const float* row_scale, Outputs& out) {
  if (a.eps >= 1.f) return;
  const int64_t H = a.H, V = a.V, N = a.N;
  const bool bias_per_exit = out.grad_bias.defined() && out.grad_bias.dim() == 2;
  const bool by_exit = a.per_exit_head || bias_per_exit;
  std::vector<std::pair<int64_t, int64_t>> hits;  // (key = head * V + target, flattened row)
  const int64_t total = static_cast<int64_t>(a.active.size()) * N;
  for (int64_t g = 0; g < total; ++g) {
    const int64_t i = g % N;
    if (y[i] == a.ignore_index || row_scale[g] == 0.f) continue;
    const int64_t head = by_exit ? a.active[g / N] : 0;
    hits.emplace_back(head * V + y[i], g);
  }
  std::sort(hits.begin(), hits.end());
  std::vector<float> acc(H);
  for (size_t b = 0; b < hits.size();) {
    size_t e = b;
    std::fill(acc.begin(), acc.end(), 0.f);
    float acc_b = 0.f;
    for (; e < hits.size() && hits[e].first == hits[b].first; ++e) {
      const int64_t g = hits[e].second, k = a.active[g / N], i = g % N;
      const float c = row_scale[g] * (1.f - a.eps);
      const at::Tensor& src = hidden[k];
      const scalar_t* s = src.data_ptr<scalar_t>() + i * src.stride(0);
      const int64_t st = src.stride(1);
      for (int64_t j = 0; j < H; ++j) acc[j] += c * static_cast<float>(s[j * st]);
      acc_b += c;
    }
    const int64_t head = hits[b].first / V, v = hits[b].first % V;
    at::Tensor gW = a.per_exit_head ? out.grad_weight.select(0, head) : out.grad_weight;
    scalar_t* row = gW.data_ptr<scalar_t>() + v * H;  // grad_weight is contiguous
    for (int64_t j = 0; j < H; ++j) row[j] = static_cast<scalar_t>(static_cast<float>(row[j]) - acc[j]);
    if (out.grad_bias.defined()) {
      float* gb = out.grad_bias.data_ptr<float>() + (bias_per_exit ? head * V : 0);
      gb[v] -= acc_b;
    }
    b = e;
  }
}

}  // namespace linear_ce_detail
}  // namespace ann_kernels
