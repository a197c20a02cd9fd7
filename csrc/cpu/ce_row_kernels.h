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
// 8-wide exp of the Cephes scheme in row_math.h's fast_exp (same constants, same steps):
//   1. clamp x (below: where 2^n stays normal; above, only when kClampHigh: callers that
//      pass x - row_max <= 0 skip that instruction);
//   2. n = round(x / ln 2) by adding 1.5 * 2^23 (one FMA; the sum's low mantissa bits are
//      n itself, so 2^n needs no float -> int conversion), r = x - n ln 2 in two parts;
//   3. the degree-6 Cephes polynomial on |r| <= ln2/2 (~1 ulp);
//   4. scale by 2^n, built in the exponent bits from the rounded sum's bit pattern.
// NaN inputs come out as exp(-87.3): callers detect non-finite rows beforehand.
template <bool kClampHigh = true>
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3365447505f));
  if constexpr (kClampHigh) x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));
  const __m256 magic = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  // t's bit pattern is 0x4B400000 + n; after adding the bias 127 and shifting left by 23
  // the 0x4B4 part falls off the top, leaving the exponent field n + 127.
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

// 8-wide natural log of positive normal floats (Cephes logf, ~1 ulp), for the block
// path's eight log-sum-exps at once:
//   1. x = m * 2^e with m in [sqrt(1/2), sqrt(2)) (exponent bits, then one halving step);
//   2. f = m - 1 and log(1 + f) = f - f^2/2 + f^3 P(f) with Cephes' degree-8 P;
//   3. + e ln 2, with ln 2 split in two parts as in exp8.
inline __m256 log8(__m256 x) {
  const __m256i xi = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(xi, 23), _mm256_set1_epi32(127)));
  __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(xi, _mm256_set1_epi32(0x007FFFFF)), _mm256_set1_epi32(0x3F800000)));
  const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356237f), _CMP_GT_OQ);  // 1.
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
  e = _mm256_add_ps(e, _mm256_and_ps(big, _mm256_set1_ps(1.0f)));
  const __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));  // 2.
  const __m256 z = _mm256_mul_ps(f, f);
  __m256 p = _mm256_set1_ps(7.0376836292e-2f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.1514610310e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.1676998740e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.2420140846e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.4249322787e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.6668057665e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.0000714765e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-2.4999993993e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(3.3333331174e-1f));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, f), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);  // 3.
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y));
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

// An fp32 row, read in place.
struct F32Row {
  const float* __restrict x;
  __m256 load8(int64_t c) const { return _mm256_loadu_ps(x + c); }
  __m256 tail8(int64_t c, int64_t n) const { return _mm256_maskload_ps(x + c, tail_mask(n)); }
  float at(int64_t c) const { return x[c]; }
};

// Steps 1-3 of a row, 8 lanes at a time (tails masked, so C = 10 vectorises too).
// Returns false, leaving `e` and `stats` unspecified, when the row is not finite (a NaN
// logit, or a maximum of +-inf): the caller then takes nonfinite_row.
//   1. max and sum of the row in one pass, two vectors per iteration (two accumulator
//      chains hide the add latency); the sum also flags NaN (any NaN makes it NaN);
//   2. argmax = the first index equal to the maximum (torch.argmax's tie rule), found by a
//      scan that stops at it, so the first pass needs no per-vector index bookkeeping;
//   3. e_c = exp(z_c - max) into `e` (the fp32 gradient row itself, or scratch) and its sum.
// `x` is a row loader (F32Row above, or Row16 for bf16 / fp16 rows read in place): load8(c)
// gives 8 logits as fp32, tail8(c, n) the n < 8 left with zeros in the other lanes, at(c)
// one logit. The loads are exact, so a 16-bit row gives the bits its fp32 copy would.
template <typename Row>
inline bool row_softmax_numerator_in(const Row& x, int64_t C, float* __restrict e, RowStats* stats) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  __m256 vmax0 = _mm256_set1_ps(neg_inf), vmax1 = vmax0;
  __m256 vsum0 = _mm256_setzero_ps(), vsum1 = vsum0;
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) {  // 1.
    const __m256 v0 = x.load8(c), v1 = x.load8(c + 8);
    vmax0 = _mm256_max_ps(vmax0, v0);
    vmax1 = _mm256_max_ps(vmax1, v1);
    vsum0 = _mm256_add_ps(vsum0, v0);
    vsum1 = _mm256_add_ps(vsum1, v1);
  }
  for (; c < C; c += 8) {
    const __m256i m = tail_mask(C - c);
    const __m256 v = x.tail8(c, C - c);
    vmax0 = _mm256_max_ps(vmax0, _mm256_blendv_ps(_mm256_set1_ps(neg_inf), v, _mm256_castsi256_ps(m)));
    vsum0 = _mm256_add_ps(vsum0, v);  // masked-off lanes load as 0
  }
  alignas(32) float lane_max[8];
  _mm256_store_ps(lane_max, _mm256_max_ps(vmax0, vmax1));
  float row_max = lane_max[0];
  for (int l = 1; l < 8; ++l) row_max = lane_max[l] > row_max ? lane_max[l] : row_max;
  const float sum_x = hsum8(_mm256_add_ps(vsum0, vsum1));
  if (std::isnan(sum_x) || !std::isfinite(row_max)) return false;
  const __m256 vrow_max = _mm256_set1_ps(row_max);
  int64_t argmax = -1;  // 2.
  for (c = 0; c + 8 <= C; c += 8) {
    const int hits = _mm256_movemask_ps(_mm256_cmp_ps(x.load8(c), vrow_max, _CMP_EQ_OQ));
    if (hits != 0) {
      argmax = c + __builtin_ctz(hits);
      break;
    }
  }
  for (; argmax < 0 && c < C; ++c) {
    if (x.at(c) == row_max) argmax = c;
  }
  __m256 vexp0 = _mm256_setzero_ps(), vexp1 = _mm256_setzero_ps();  // 3.
  for (c = 0; c + 16 <= C; c += 16) {
    const __m256 e0 = exp8<false>(_mm256_sub_ps(x.load8(c), vrow_max));
    const __m256 e1 = exp8<false>(_mm256_sub_ps(x.load8(c + 8), vrow_max));
    _mm256_storeu_ps(e + c, e0);
    _mm256_storeu_ps(e + c + 8, e1);
    vexp0 = _mm256_add_ps(vexp0, e0);
    vexp1 = _mm256_add_ps(vexp1, e1);
  }
  for (; c < C; c += 8) {
    const __m256i m = tail_mask(C - c);
    const __m256 ev =
        _mm256_and_ps(exp8<false>(_mm256_sub_ps(x.tail8(c, C - c), vrow_max)), _mm256_castsi256_ps(m));
    _mm256_maskstore_ps(e + c, m, ev);
    vexp0 = _mm256_add_ps(vexp0, ev);
  }
  stats->max = row_max;
  stats->sum_x = sum_x;
  stats->sum_exp = hsum8(_mm256_add_ps(vexp0, vexp1));
  stats->argmax = argmax;
  return true;
}
inline bool row_softmax_numerator(const float* __restrict x, int64_t C, float* __restrict e, RowStats* stats) {
  return row_softmax_numerator_in(F32Row{x}, C, e, stats);
}
#else
// Portable path: the same steps, scalar (the compiler may still vectorise the exp loop).
inline bool row_softmax_numerator(const float* __restrict x, int64_t C, float* __restrict e, RowStats* stats) {
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
  if (std::isnan(sum_x) || !std::isfinite(row_max)) return false;
  float sum_exp = 0.f;
  for (int64_t c = 0; c < C; ++c) {
    e[c] = fast_exp(x[c] - row_max);
    sum_exp += e[c];
  }
  *stats = RowStats{row_max, sum_x, sum_exp, argmax};
  return true;
}
#endif

// Step 3's loss: (1-e)(lse - z_y) + e(lse - mean_c z_c). The smoothing term is added only
// when e > 0: with a -inf logit, mean_c z_c = -inf and 0 * inf would turn the loss into NaN
// although torch (and the math) give a finite value.
inline float smoothed_row_loss(float lse, float x_target, float sum_x, int64_t C, float eps) {
  const float nll = lse - x_target;
  if (eps == 0.f) return nll;
  return (1.f - eps) * nll + eps * (lse - sum_x / static_cast<float>(C));
}

// Steps 1-5 for a row that is not finite (a NaN logit, or a maximum of +-inf), in plain
// IEEE arithmetic with std::exp, so that such a row gives what torch gives (NaN / inf
// loss, NaN probabilities and gradient, argmax at the first NaN) instead of the fast
// path's clamped exp quietly skipping the NaN. Rare, so scalar. `g` may be null.
template <typename scalar_t>
void nonfinite_row(const scalar_t* x, int64_t C, int64_t y, bool valid, float eps, float scale, scalar_t* g,
                   float* loss, float* conf, int64_t* pred) {
  float row_max = -std::numeric_limits<float>::infinity(), sum_x = 0.f;
  int64_t argmax = 0;
  bool seen_nan = false;
  for (int64_t c = 0; c < C; ++c) {
    const float v = static_cast<float>(x[c]);
    sum_x += v;
    if (seen_nan) continue;
    if (std::isnan(v)) {
      seen_nan = true;
      row_max = v;
      argmax = c;
    } else if (v > row_max) {
      row_max = v;
      argmax = c;
    }
  }
  float sum_exp = 0.f;
  for (int64_t c = 0; c < C; ++c) sum_exp += std::exp(static_cast<float>(x[c]) - row_max);
  const float lse = row_max + std::log(sum_exp);
  *loss = valid ? smoothed_row_loss(lse, static_cast<float>(x[y]), sum_x, C, eps) : 0.f;
  *conf = 1.f / sum_exp;
  *pred = argmax;
  if (g == nullptr) return;
  for (int64_t c = 0; c < C; ++c) {
    const float p = std::exp(static_cast<float>(x[c]) - row_max) / sum_exp;
    const float t = (c == y ? 1.f - eps : 0.f) + eps / static_cast<float>(C);
    g[c] = static_cast<scalar_t>(scale == 0.f ? 0.f : scale * (p - t));
  }
}

// Step 5 of a row: g_c = a * e_c - b (a = scale / sum_exp, b = scale * e / C).
inline void row_affine(float* __restrict g, int64_t C, float a, float b) {
  for (int64_t c = 0; c < C; ++c) g[c] = g[c] * a - b;
}

// Row conversions between 16-bit logits and fp32, 8 values per instruction where the CPU
// has AVX2 (+ F16C for fp16). The patterns are those of c10::BFloat16 / c10::Half: bf16
// rounds to nearest even and keeps NaN a (quiet) NaN, as c10 does; fp16 uses the hardware
// IEEE conversion (round to nearest even), as c10 does. Callers reinterpret their rows as
// uint16_t (this header includes no torch headers).
inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  return __builtin_bit_cast(float, u);
}

inline uint16_t float_to_bf16_bits(float f) {
  if (std::isnan(f)) return 0x7FC0;
  const uint32_t u = __builtin_bit_cast(uint32_t, f);
  return static_cast<uint16_t>((u + ((u >> 16) & 1) + 0x7FFF) >> 16);
}

inline void bf16_row_to_float(const uint16_t* __restrict x, int64_t C, float* __restrict out) {
  int64_t c = 0;
#if defined(ANN_KERNELS_AVX2)
  for (; c + 8 <= C; c += 8) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + c)));
    _mm256_storeu_ps(out + c, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
  }
#endif
  for (; c < C; ++c) out[c] = bf16_bits_to_float(x[c]);
}

#if defined(ANN_KERNELS_AVX2)
// 8 floats -> 8 bf16 (round to nearest even, NaN -> 0x7FC0), as float_to_bf16_bits.
inline __m128i float8_to_bf16(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
#endif

inline void float_row_to_bf16(const float* __restrict x, int64_t C, uint16_t* __restrict out) {
  int64_t c = 0;
#if defined(ANN_KERNELS_AVX2)
  for (; c + 8 <= C; c += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c), float8_to_bf16(_mm256_loadu_ps(x + c)));
  }
#endif
  for (; c < C; ++c) out[c] = float_to_bf16_bits(x[c]);
}

#if defined(ANN_KERNELS_AVX2) && defined(__F16C__)
#define ANN_KERNELS_F16C 1
inline void f16_row_to_float(const uint16_t* __restrict x, int64_t C, float* __restrict out) {
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    _mm256_storeu_ps(out + c, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + c))));
  }
  if (c < C) {  // the tail through a zero-padded copy
    alignas(16) uint16_t tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    alignas(32) float tail_out[8];
    for (int64_t j = c; j < C; ++j) tail[j - c] = x[j];
    _mm256_store_ps(tail_out, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(tail))));
    for (int64_t j = c; j < C; ++j) out[j] = tail_out[j - c];
  }
}

inline void float_row_to_f16(const float* __restrict x, int64_t C, uint16_t* __restrict out) {
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + c), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c), h);
  }
  if (c < C) {
    alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    alignas(16) uint16_t tail_out[8];
    for (int64_t j = c; j < C; ++j) tail[j - c] = x[j];
    _mm_store_si128(reinterpret_cast<__m128i*>(tail_out),
                    _mm256_cvtps_ph(_mm256_load_ps(tail), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (int64_t j = c; j < C; ++j) out[j] = tail_out[j - c];
  }
}

// g *= factor in place on an fp16 buffer: each value widened to fp32, multiplied, rounded
// once back to fp16 (what ATen's mul_ does for fp16, 8 values per instruction).
inline void scale_f16_in_place(uint16_t* __restrict g, int64_t n, float factor) {
  const __m256 vf = _mm256_set1_ps(factor);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + i))), vf);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(g + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  if (i < n) {
    alignas(32) float tail[8];
    f16_row_to_float(g + i, n - i, tail);
    for (int64_t j = 0; j < n - i; ++j) tail[j] *= factor;
    float_row_to_f16(tail, n - i, g + i);
  }
}
#endif

#if defined(ANN_KERNELS_AVX2)
// A bf16 or (with F16C) fp16 row read in place, for row_softmax_numerator_in: the forward
// of a 16-bit row then makes no fp32 copy of it (one pass over the row less, and 4 bytes
// per logit less of scratch traffic). Widening is exact, so the statistics and the
// numerator e are bit for bit those of the copied row.
enum class Half16 { kBF16, kF16 };

template <Half16 D>
struct Row16 {
  const uint16_t* __restrict x;
  static __m256 widen(__m128i h) {
    if constexpr (D == Half16::kBF16) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
#if defined(ANN_KERNELS_F16C)
      return _mm256_cvtph_ps(h);
#else
      static_assert(D == Half16::kBF16, "fp16 rows are read in place only with F16C");
      return _mm256_setzero_ps();
#endif
    }
  }
  __m256 load8(int64_t c) const { return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + c))); }
  __m256 tail8(int64_t c, int64_t n) const {  // n < 8 values, zeros (0.0f) after them
    alignas(16) uint16_t tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = 0; j < n; ++j) tail[j] = x[c + j];
    return widen(_mm_load_si128(reinterpret_cast<const __m128i*>(tail)));
  }
  float at(int64_t c) const {
    alignas(16) uint16_t one[8] = {x[c], 0, 0, 0, 0, 0, 0, 0};
    return _mm256_cvtss_f32(widen(_mm_load_si128(reinterpret_cast<const __m128i*>(one))));
  }
  static __m128i narrow(__m256 v) {  // round to nearest even, as c10's conversions
    if constexpr (D == Half16::kBF16) {
      return float8_to_bf16(v);
    } else {
#if defined(ANN_KERNELS_F16C)
      return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
      return _mm_setzero_si128();
#endif
    }
  }
};

// Step 5 of a 16-bit row fused with its rounding: out_c = round(e_c a - b) in one pass over
// the fp32 numerator e (instead of row_affine over e, then a conversion pass).
template <Half16 D>
inline void affine_row_to16(const float* __restrict e, int64_t C, float a, float b, uint16_t* __restrict out) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const __m256 g = _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(e + c), va), vb);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c), Row16<D>::narrow(g));
  }
  if (c < C) {
    alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    alignas(16) uint16_t tail_out[8];
    for (int64_t j = c; j < C; ++j) tail[j - c] = e[j];
    const __m256 g = _mm256_sub_ps(_mm256_mul_ps(_mm256_load_ps(tail), va), vb);
    _mm_store_si128(reinterpret_cast<__m128i*>(tail_out), Row16<D>::narrow(g));
    for (int64_t j = c; j < C; ++j) out[j] = tail_out[j - c];
  }
}

// One value the way affine_row_to16 computes it (mul, then sub, in fp32; no FMA), minus
// `extra`, rounded: the target's entry, which also loses scale (1 - eps).
template <Half16 D>
inline uint16_t affine_value_to16(float e, float a, float b, float extra) {
  const __m256 g = _mm256_sub_ps(_mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(e), _mm256_set1_ps(a)),
                                               _mm256_set1_ps(b)),
                                 _mm256_set1_ps(extra));
  return static_cast<uint16_t>(_mm_extract_epi16(Row16<D>::narrow(g), 0));
}
#endif

// Backward of a finite row from its saved log-sum-exp (the deferred low-precision path):
//   g_c = a * exp(z_c - lse) - b,  a = scale, b = scale * e / C,
// then the caller subtracts scale * (1 - e) at the target. z_c - lse <= 0 up to rounding,
// so exp needs no high clamp. `x` is the fp32 row (converted by the caller), `g` fp32.
inline void row_grad_from_lse(const float* __restrict x, int64_t C, float lse, float a, float b,
                              float* __restrict g) {
#if defined(ANN_KERNELS_AVX2)
  const __m256 vlse = _mm256_set1_ps(lse), va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const __m256 e = exp8<false>(_mm256_sub_ps(_mm256_loadu_ps(x + c), vlse));
    _mm256_storeu_ps(g + c, _mm256_fmsub_ps(e, va, vb));
  }
  if (c < C) {
    const __m256i m = tail_mask(C - c);
    const __m256 e = exp8<false>(_mm256_sub_ps(_mm256_maskload_ps(x + c, m), vlse));
    _mm256_maskstore_ps(g + c, m, _mm256_fmsub_ps(e, va, vb));
  }
#else
  for (int64_t c = 0; c < C; ++c) g[c] = a * fast_exp(x[c] - lse) - b;
#endif
}

// Step 5 in place on an fp32 gradient that is already w_k s_ik / N_valid * (p - t):
// multiply by grad_out (backward with grad_out != 1; one more rounding in fp32).
inline void scale_in_place(float* __restrict g, int64_t n, float factor) {
  for (int64_t i = 0; i < n; ++i) g[i] *= factor;
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
  bool finite;  // false: a NaN logit or a non-finite maximum; the caller redoes the row
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
    const __m256 e = exp8<false>(_mm256_sub_ps(_mm256_load_ps(x_tile[c]), vmax));
    _mm256_store_ps(e_tile[c], e);
    vexp = _mm256_add_ps(vexp, e);
  }
  // Per-lane scalars, eight at a time: lse = max + log(sum), conf = 1 / sum, and the
  // gradient's affine coefficients a = scale / sum, b = scale * eps / C (0 on padding lanes).
  alignas(32) float lane_scale[8];
  for (int l = 0; l < 8; ++l) lane_scale[l] = l < num_lanes ? lanes[l].scale : 0.f;
  const __m256 vscale = _mm256_load_ps(lane_scale);
  const __m256 vinv = _mm256_div_ps(_mm256_set1_ps(1.0f), vexp);
  alignas(32) float lane_max[8], lane_sum_x[8], lane_lse[8], lane_conf[8], grad_a[8], grad_b[8];
  alignas(32) int32_t lane_idx[8];
  _mm256_store_ps(lane_max, vmax);
  _mm256_store_ps(lane_sum_x, vsum);
  _mm256_store_ps(lane_lse, _mm256_add_ps(vmax, log8(vexp)));
  _mm256_store_ps(lane_conf, vinv);
  _mm256_store_ps(grad_a, _mm256_mul_ps(vscale, vinv));
  _mm256_store_ps(grad_b, _mm256_mul_ps(vscale, _mm256_set1_ps(eps / static_cast<float>(C))));
  _mm256_store_si256(reinterpret_cast<__m256i*>(lane_idx), vidx);
  for (int l = 0; l < num_lanes; ++l) {
    const int64_t y = lanes[l].target;
    out[l].lse = lane_lse[l];
    out[l].conf = lane_conf[l];
    out[l].argmax = lane_idx[l];
    out[l].sum_x = lane_sum_x[l];
    out[l].x_target = y != ignore_index ? x_tile[y][l] : 0.f;
    out[l].finite = !std::isnan(lane_sum_x[l]) && std::isfinite(lane_max[l]);
  }
  if (!compute_grad) return;
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
