// Row kernels of the fused multi-exit cross-entropy on CPU (included by multi_exit_ce.cpp
// only; a header so the extension stays at few translation units).
//
// Two layouts:
//   row_softmax_numerator  one logit row at a time, 8 classes per AVX2 vector (C > 16);
//   block8_small_classes   eight rows at a time, one row per vector lane (C <= 16), so the
//                          per-row scalar work (horizontal sums, log, divisions) is shared.
// Both follow the same steps and formulas; the summation order depends only on C, never on
// the thread count or on which rows share a block.
#pragma once

#include <ann_kernels/row_math.h>

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ANN_KERNELS_AVX2 1
#endif

namespace ann_kernels {

struct RowStats {
  float max;       // max_c z_c
  float sum_x;     // sum_c z_c        (label smoothing's mean term)
  float sum_exp;   // sum_c exp(z_c - max)
  int64_t argmax;  // first index of the maximum (torch.argmax's tie rule)
};

#if defined(ANN_KERNELS_AVX2)
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
inline void row_softmax_numerator(const float* __restrict x, int64_t C, float* __restrict e, RowStats* stats) {
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
inline void row_softmax_numerator(const float* __restrict x, int64_t C, float* __restrict e, RowStats* stats) {
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
inline void row_affine(float* __restrict g, int64_t C, float a, float b) {
  for (int64_t c = 0; c < C; ++c) g[c] = g[c] * a - b;
}

#if defined(ANN_KERNELS_AVX2)
// Largest class count handled by the eight-rows-per-vector layout (its tiles live on the
// stack: 2 x 16 x 8 floats = 1 KiB).
constexpr int64_t kSmallClasses = 16;

// One lane (row) of a block: where its logits and gradient row are, and its target.
template <typename scalar_t>
struct BlockLane {
  const scalar_t* x;  // logits row [C]
  scalar_t* g;        // gradient row [C] (nullptr without gradient)
  int64_t target;     // class index, or ignore_index
  float scale;        // w_k / N_valid, 0 for ignored rows
};

// Results of one lane, in the layout of the row path's RowStats.
struct BlockResult {
  float lse, conf, x_target, sum_x;
  int64_t argmax;
};

// Steps 1-5 for up to eight rows with C <= kSmallClasses classes:
//   1. transpose the rows into a [C][8] tile (lane l = row l), converting to fp32;
//   2. per lane: max, first argmax, sum over c (strict > keeps the first maximum);
//   3. e = exp(z - max) into a second tile, and its sum; lse = max + log(sum);
//   4. gradient tile g = e * (scale / sum) - scale * eps / C, minus scale * (1 - eps) at
//      the target, transposed back into each lane's gradient row.
template <typename scalar_t>
void block8_small_classes(const BlockLane<scalar_t>* lanes, int num_lanes, int64_t C, float eps,
                          int64_t ignore_index, bool compute_grad, BlockResult* out) {
  alignas(32) float x_tile[kSmallClasses][8];
  alignas(32) float e_tile[kSmallClasses][8];
  for (int l = 0; l < 8; ++l) {
    const BlockLane<scalar_t>& lane = lanes[l < num_lanes ? l : 0];  // padding lanes repeat lane 0
    for (int64_t c = 0; c < C; ++c) x_tile[c][l] = static_cast<float>(lane.x[c]);
  }
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 vsum = _mm256_setzero_ps();
  __m256i vidx = _mm256_setzero_si256();
  for (int64_t c = 0; c < C; ++c) {
    const __m256 v = _mm256_load_ps(x_tile[c]);
    const __m256 gt = _mm256_cmp_ps(v, vmax, _CMP_GT_OQ);
    vmax = _mm256_blendv_ps(vmax, v, gt);
    vidx = _mm256_blendv_epi8(vidx, _mm256_set1_epi32(static_cast<int32_t>(c)), _mm256_castps_si256(gt));
    vsum = _mm256_add_ps(vsum, v);
  }
  __m256 vexp = _mm256_setzero_ps();
  for (int64_t c = 0; c < C; ++c) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(x_tile[c]), vmax));
    _mm256_store_ps(e_tile[c], e);
    vexp = _mm256_add_ps(vexp, e);
  }
  alignas(32) float lane_max[8], lane_sum_x[8], lane_sum_exp[8], grad_a[8], grad_b[8];
  alignas(32) int32_t lane_idx[8];
  _mm256_store_ps(lane_max, vmax);
  _mm256_store_ps(lane_sum_x, vsum);
  _mm256_store_ps(lane_sum_exp, vexp);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lane_idx), vidx);
  for (int l = 0; l < num_lanes; ++l) {
    const int64_t y = lanes[l].target;
    out[l].lse = lane_max[l] + std::log(lane_sum_exp[l]);
    out[l].conf = 1.f / lane_sum_exp[l];
    out[l].argmax = lane_idx[l];
    out[l].sum_x = lane_sum_x[l];
    out[l].x_target = y != ignore_index ? x_tile[y][l] : 0.f;
    grad_a[l] = lanes[l].scale / lane_sum_exp[l];
    grad_b[l] = lanes[l].scale * eps / static_cast<float>(C);
  }
  if (!compute_grad) return;
  for (int l = num_lanes; l < 8; ++l) grad_a[l] = grad_b[l] = 0.f;
  const __m256 va = _mm256_load_ps(grad_a), vb = _mm256_load_ps(grad_b);
  for (int64_t c = 0; c < C; ++c) _mm256_store_ps(e_tile[c], _mm256_fmsub_ps(_mm256_load_ps(e_tile[c]), va, vb));
  for (int l = 0; l < num_lanes; ++l) {
    const BlockLane<scalar_t>& lane = lanes[l];
    if (lane.scale != 0.f) e_tile[lane.target][l] -= lane.scale * (1.f - eps);
    for (int64_t c = 0; c < C; ++c) lane.g[c] = static_cast<scalar_t>(lane.scale != 0.f ? e_tile[c][l] : 0.f);
  }
}
#endif  // ANN_KERNELS_AVX2

}  // namespace ann_kernels
