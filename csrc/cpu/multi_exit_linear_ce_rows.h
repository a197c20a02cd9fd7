// Row math and chunk planning of the fused linear + multi-exit cross-entropy on CPU
// (included by multi_exit_linear_ce.cpp only; a header so the extension keeps few
// translation units). See that file's comment for the algorithm.
#pragma once

#include <ATen/ATen.h>
#include <ann_kernels/row_math.h>

#include "ce_row_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

namespace ann_kernels {
namespace linear_ce_detail {

constexpr int64_t kMinRows = 64;
// Default logits tile: 16 Mi elements (32 MiB in bf16 / fp16, 64 MiB in fp32; both about
// 0.13x the logits at (4, 1024, 256, 32000)), or 1/8 of the call's logits when that is
// more (large vocabularies: fewer chunks, so W is packed and grad_W read and written fewer
// times; the extra peak stays <= 0.15x the logits). Two-thread fp32 GEMMs ran faster at 524
// rows per chunk than at 262 on this CPU (noisy; single-threaded the chunk size hardly
// matters). At (2, 2048, 512, 128256) bf16, 8 chunks of 512 rows ran their GEMMs in 2% less
// CPU time than 1/10's 10 x 409 + 6 rows (1 thread).
constexpr int64_t kDefaultTileElements = 16ll << 20;
constexpr int64_t kDefaultTileFraction = 8;

// Bytes of the logits tile: the call's budget, else ANN_KERNELS_LINEAR_CE_BUDGET_MB, else
// the default tile for logits_elements logits of elem_size bytes.
inline int64_t resolve_budget(int64_t budget, int64_t elem_size, int64_t logits_elements) {
  if (budget > 0) return budget;
  if (const char* env = std::getenv("ANN_KERNELS_LINEAR_CE_BUDGET_MB")) {
    const double mb = std::atof(env);
    if (mb > 0) return static_cast<int64_t>(mb * (1 << 20));
  }
  return std::max(kDefaultTileElements, logits_elements / kDefaultTileFraction) * elem_size;
}

// Tile plan: rows per chunk and vocabulary columns per tile (fp32 elements in budget).
struct Plan {
  int64_t rows, vtile;
};

inline Plan make_plan(int64_t total_rows, int64_t V, int64_t budget_bytes) {
  const int64_t elems = std::max<int64_t>(budget_bytes / 4, 8 * 8);
  int64_t vtile = V, rows = elems / V;
  if (rows < kMinRows && rows < total_rows) {  // vocabulary tiles for kMinRows rows
    rows = std::min<int64_t>(kMinRows, total_rows);
    vtile = std::max<int64_t>(8, elems / rows);
    if (vtile > 256) vtile -= vtile % 256;
    vtile = std::min(vtile, V);
  }
  rows = std::max<int64_t>(1, std::min(rows, total_rows));
  if (vtile == V) {  // equal chunks: the same chunk count without a short last chunk (a full
                     // pass over W and grad_W for a few rows)
    const int64_t chunks = (total_rows + rows - 1) / rows;
    rows = (total_rows + chunks - 1) / chunks;
  }
  return {rows, vtile};
}

struct RowState {
  float max, sum_exp, sum_x, x_target;
  int64_t argmax;
  bool finite;
};

// Merge one tile row x[0..vt) (columns v0..) into the running row state (online lse).
// When keep_exp, x is overwritten with exp(x - tile max) (reused by a one-tile pass B).
// AVX2 (ce_row_kernels.h's exp8 / hsum8 / tail_mask, 8 lanes): max and sum in one pass,
// the first index of the maximum by a scan that stops at it, then exp with its sum. The
// summation order depends only on vt. Portable scalar loops otherwise.
inline void merge_tile_row(float* __restrict x, int64_t vt, int64_t v0, int64_t y, RowState& s, bool keep_exp) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float m = neg_inf, sx = 0.f, se = 0.f;
  int64_t am = 0;
#if defined(ANN_KERNELS_AVX2)
  __m256 vmax = _mm256_set1_ps(neg_inf), vsum = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= vt; c += 8) {
    const __m256 v = _mm256_loadu_ps(x + c);
    vmax = _mm256_max_ps(vmax, v);
    vsum = _mm256_add_ps(vsum, v);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  for (int l = 0; l < 8; ++l) m = lanes[l] > m ? lanes[l] : m;
  sx = hsum8(vsum);
  for (; c < vt; ++c) {
    m = x[c] > m ? x[c] : m;
    sx += x[c];
  }
  if (std::isnan(sx) || !std::isfinite(m)) {
    s.finite = false;
    return;
  }
  const __m256 vm = _mm256_set1_ps(m);
  am = -1;
  for (c = 0; c + 8 <= vt; c += 8) {
    const int hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + c), vm, _CMP_EQ_OQ));
    if (hits != 0) {
      am = c + __builtin_ctz(hits);
      break;
    }
  }
  for (; am < 0 && c < vt; ++c) {
    if (x[c] == m) am = c;
  }
  if (y >= v0 && y < v0 + vt) s.x_target = x[y - v0];
  __m256 vse = _mm256_setzero_ps();
  for (c = 0; c + 8 <= vt; c += 8) {
    const __m256 e = exp8<false>(_mm256_sub_ps(_mm256_loadu_ps(x + c), vm));
    if (keep_exp) _mm256_storeu_ps(x + c, e);
    vse = _mm256_add_ps(vse, e);
  }
  se = hsum8(vse);
  for (; c < vt; ++c) {
    const float e = fast_exp(x[c] - m);
    if (keep_exp) x[c] = e;
    se += e;
  }
#else
  for (int64_t c = 0; c < vt; ++c) {
    sx += x[c];
    if (x[c] > m) {
      m = x[c];
      am = c;
    }
  }
  if (std::isnan(sx) || !std::isfinite(m)) {
    s.finite = false;
    return;
  }
  if (y >= v0 && y < v0 + vt) s.x_target = x[y - v0];
  for (int64_t c = 0; c < vt; ++c) {
    const float e = fast_exp(x[c] - m);
    if (keep_exp) x[c] = e;
    se += e;
  }
#endif
  s.sum_x += sx;
  if (m > s.max) {
    s.sum_exp = s.sum_exp * fast_exp(s.max - m) + se;
    s.max = m;
    s.argmax = v0 + am;
  } else {
    s.sum_exp += se * fast_exp(m - s.max);
  }
}

// g = x * a - b over a row, or g = exp(x - l) * a - b when from_logits (vectorised).
inline void grad_row(float* __restrict x, int64_t vt, float a, float b, bool from_logits, float l) {
  int64_t c = 0;
#if defined(ANN_KERNELS_AVX2)
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b), vl = _mm256_set1_ps(l);
  for (; c + 8 <= vt; c += 8) {
    __m256 v = _mm256_loadu_ps(x + c);
    if (from_logits) v = exp8<true>(_mm256_sub_ps(v, vl));
    _mm256_storeu_ps(x + c, _mm256_fmsub_ps(v, va, vb));
  }
#endif
  for (; c < vt; ++c) x[c] = (from_logits ? fast_exp(x[c] - l) : x[c]) * a - b;
}

struct Args {
  int64_t K, N, H, V;
  int64_t ignore_index;
  float eps, z;
  bool compute_grad, per_exit_head;
  std::vector<int64_t> active;  // exits computed, in order
};

struct Outputs {
  at::Tensor per_sample, confidence, prediction;   // [K, N]
  at::Tensor grad_hidden, grad_weight, grad_bias;  // undefined without gradients (fp32 grad_bias
                                                   // accumulator in every dtype)
  bool grad_weight_empty = false;  // a shared head's grad_W allocated empty: chunk r0 = 0 writes it
};

// grad_W tile (+)= g^T h: written (beta = 0) when first (the tile's first chunk into an
// empty grad_W), else accumulated (addmm_, beta = 1).
inline void accumulate_grad_weight(at::Tensor gw_tile, const at::Tensor& g, const at::Tensor& h, bool first) {
  if (first) {
    at::mm_out(gw_tile, g.t(), h);
  } else {
    gw_tile.addmm_(g.t(), h);
  }
}

// One-tile plans with gradients: the statistics and the softmax part of the gradient of one
// fp32 row [V] in a single visit (the row stays in L1/L2 between the two steps; one exp per
// logit, kept in x by merge_tile_row):
//   1. merge the row into a fresh state (max, sum, argmax, target logit, exp(x - max) in x);
//   2. scale == 0 (ignored row): x = 0; not finite: x = NaN (finish_rows reports the row);
//   3. else x = scale ((1 + 2 z lse) exp(x - max) / sum_exp - e / V), lse = max + log(sum_exp)
//      (finish_rows' formula). The one-hot part -scale (1 - e) at the target is the caller's.
inline RowState stats_and_softmax_grad_row(float* __restrict x, int64_t V, int64_t y, float scale, const Args& a) {
  RowState s{-std::numeric_limits<float>::infinity(), 0.f, 0.f, 0.f, 0, true};
  merge_tile_row(x, V, 0, y, s, true);  // 1.
  if (scale == 0.f || !s.finite) {      // 2.
    std::fill(x, x + V, scale == 0.f ? 0.f : std::numeric_limits<float>::quiet_NaN());
    return s;
  }
  const float lse = s.max + std::log(s.sum_exp);  // 3.
  grad_row(x, V, scale * (1.f + 2.f * a.z * lse) / s.sum_exp, scale * a.eps / static_cast<float>(V), false, 0.f);
  return s;
}

// Per-row results of a chunk from its row states: per_sample (NaN on a valid row whose
// logits are not all finite), confidence, prediction, and lse (NaN there) for pass B.
inline void finish_rows(int64_t r0, int64_t R, const Args& a, const std::vector<RowState>& st,
                        const std::vector<int64_t>& ty, std::vector<float>& lse, Outputs& out) {
  float* loss_p = out.per_sample.data_ptr<float>();
  float* conf_p = out.confidence.data_ptr<float>();
  int64_t* pred_p = out.prediction.data_ptr<int64_t>();
  const int64_t N = a.N;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t g = r0 + r, k = a.active[g / N], i = g % N, o = k * N + i;
    const bool valid = ty[r] != a.ignore_index;
    const RowState& s = st[r];
    if (!s.finite) {
      const float nan = std::numeric_limits<float>::quiet_NaN();
      loss_p[o] = valid ? nan : 0.f;
      conf_p[o] = nan;
      pred_p[o] = s.argmax;
      lse[r] = nan;
      continue;
    }
    const float l = s.max + std::log(s.sum_exp);
    lse[r] = l;
    float loss = 0.f;
    if (valid) {
      loss = l - s.x_target;
      if (a.eps != 0.f) loss = (1.f - a.eps) * loss + a.eps * (l - s.sum_x / static_cast<float>(a.V));
      if (a.z != 0.f) loss += a.z * l * l;
    }
    loss_p[o] = loss;
    conf_p[o] = 1.f / s.sum_exp;
    pred_p[o] = s.argmax;
  }
}

}  // namespace linear_ce_detail
}  // namespace ann_kernels
