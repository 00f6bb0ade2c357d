// Float vectors behind one interface, so each kernel loop is written once for every instruction
// set (as MLX's Simd<T, N> and ggml's GGML_F32_VEC_* do): Vec8 (AVX2), Vec16 (AVX-512), VecP
// (8 floats as GCC/Clang vectors: NEON on ARM, SSE on older x86) and Vec1 (one float, for tails).
// VecW is the widest this CPU has. Only the integer dot products keep per-ISA code
// (quant_dot_x86.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define OE_AVX2 1
#endif
// Float vectors of 16 (VecW).
#if defined(OE_AVX2) && defined(__AVX512F__)
#define OE_AVX512 1
#endif
// Integer dot products of unsigned by signed bytes (the one-row 4- and 8-bit products) in one
// instruction; without VNNI the 4-bit product emulates them (OE_INT8_DOT).
#if defined(OE_AVX2) && ((defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__))
#define OE_VNNI 1
#endif
#ifdef OE_AVX2
#define OE_INT8_DOT 1
#endif
// ... in whole 512-bit registers where the CPU has them (twice the products per instruction).
#if defined(OE_VNNI) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define OE_VNNI512 1
#endif

namespace oe {

#ifdef OE_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The sums of a, b, c and d into out[0:4], reduced together.
inline void hsum4(__m256 a, __m256 b, __m256 c, __m256 d, float* out) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

// Cephes' exp for floats, as exp8 and exp16 compute it: ~2 ulp, exp(x < LO) = 0. x is split as
// n ln 2 + r (ln 2 in two parts, Cody-Waite), exp(r) = 1 + r + r^2 P(r), P's coefficients highest
// first, and 2^n is built in the exponent bits.
namespace cephes_exp {
constexpr float LO = -87.3365448f, HI = 88.3762626f, LOG2E = 1.44269504088896341f;
constexpr float LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;
constexpr float P[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                       4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace cephes_exp

// exp(x) for 8 floats.
inline __m256 exp8(__m256 x) {
  using namespace cephes_exp;
  const __m256 lo = _mm256_set1_ps(LO), hi = _mm256_set1_ps(HI);
  __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(LN2_HI), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(LN2_LO), x);
  __m256 y = _mm256_set1_ps(P[0]);
  for (size_t i = 1; i < std::size(P); i++) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(P[i]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(n));
  return _mm256_andnot_ps(underflow, y);
}

struct Vec8 {
  using V = __m256;
  static constexpr int64_t N = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set(float a) { return _mm256_set1_ps(a); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V exp(V a) { return exp8(a); }
  static float sum(V a) { return hsum(a); }
  static float max_of(V a) { return hmax(a); }
  static void sum4(V a, V b, V c, V d, float* out) { hsum4(a, b, c, d, out); }
  static void store(float* p, V a) { _mm256_storeu_ps(p, a); }
};
#endif

#ifdef OE_AVX512
// exp8 for 16 floats.
inline __m512 exp16(__m512 x) {
  using namespace cephes_exp;
  const __m512 lo = _mm512_set1_ps(LO), hi = _mm512_set1_ps(HI);
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
  __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(LN2_HI), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(LN2_LO), x);
  __m512 y = _mm512_set1_ps(P[0]);
  for (size_t i = 1; i < std::size(P); i++) y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(P[i]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  __m512i n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
  y = _mm512_mul_ps(y, _mm512_castsi512_ps(n));
  return _mm512_maskz_mov_ps(~underflow, y);
}

struct Vec16 {
  using V = __m512;
  static constexpr int64_t N = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set(float a) { return _mm512_set1_ps(a); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V exp(V a) { return exp16(a); }
  static float sum(V a) { return _mm512_reduce_add_ps(a); }
  static float max_of(V a) { return _mm512_reduce_max_ps(a); }
  static void sum4(V a, V b, V c, V d, float* out) {  // halves added, then as Vec8
    auto half = [](V v) {
      return _mm256_add_ps(_mm512_castps512_ps256(v),
                           _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    };
    hsum4(half(a), half(b), half(c), half(d), out);
  }
  static void store(float* p, V a) { _mm512_storeu_ps(p, a); }
};
using VecW = Vec16;
#elif defined(OE_AVX2)
using VecW = Vec8;
#endif

// One float, for tails.
struct Vec1 {
  using V = float;
  static constexpr int64_t N = 1;
  static V zero() { return 0.0f; }
  static V set(float a) { return a; }
  static V load(const float* p) { return *p; }
  static V bcast(const float* p) { return *p; }
  static V fma(V a, V b, V c) { return std::fma(a, b, c); }
  static V mul(V a, V b) { return a * b; }
  static V div(V a, V b) { return a / b; }
  static V max(V a, V b) { return std::max(a, b); }
  static V sub(V a, V b) { return a - b; }
  static V add(V a, V b) { return a + b; }
  static V exp(V a) { return std::exp(a); }
  static float sum(V a) { return a; }
  static float max_of(V a) { return a; }
  static void sum4(V a, V b, V c, V d, float* out) { out[0] = a, out[1] = b, out[2] = c, out[3] = d; }
  static void store(float* p, V a) { *p = a; }
};

#ifndef OE_AVX2
// Eight floats as a GCC/Clang vector type where there is no AVX2 (NEON on ARM, SSE on older x86):
// the compiler lowers it to the CPU's own vectors, and the sums run in the same eight lanes, so
// in the same order, as the AVX2 path's.
struct VecP {
  using V = float __attribute__((vector_size(32)));
  static constexpr int64_t N = 8;
  static V zero() { return V{}; }
  static V set(float a) { return V{} + a; }
  static V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static V bcast(const float* p) { return V{} + *p; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V mul(V a, V b) { return a * b; }
  static V div(V a, V b) { return a / b; }
  static V max(V a, V b) { return a > b ? a : b; }
  static V sub(V a, V b) { return a - b; }
  static V add(V a, V b) { return a + b; }
  static V exp(V a) {
    for (int i = 0; i < 8; i++) a[i] = std::exp(a[i]);
    return a;
  }
  static float sum(V a) { return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7])); }
  static float max_of(V a) {
    float m = a[0];
    for (int i = 1; i < 8; i++) m = std::max(m, a[i]);
    return m;
  }
  static void sum4(V a, V b, V c, V d, float* out) {
    out[0] = sum(a), out[1] = sum(b), out[2] = sum(c), out[3] = sum(d);
  }
  static void store(float* p, V a) { std::memcpy(p, &a, sizeof a); }
};
using VecW = VecP;
#endif

// f(X{}, k) for k in [0, n): W::N floats at a time (X = W, VecW unless given), then the tail one
// at a time (X = Vec1). f is a generic lambda, `[&]<class X>(X, int64_t k) { ... X::load(p + k) }`.
template <class W = VecW, class F>
inline void each_vec(int64_t n, F&& f) {
  int64_t k = 0;
  for (; k + W::N <= n; k += W::N) f(W{}, k);
  for (; k < n; k++) f(Vec1{}, k);
}

// The same as a sum: acc = f(X{}, k, acc) in VecW's lanes, which are then added (X::sum), and the
// tail's terms after them in order.
template <class F>
inline float sum_vec(int64_t n, F&& f) {
  int64_t k = 0;
  typename VecW::V acc = VecW::zero();
  for (; k + VecW::N <= n; k += VecW::N) acc = f(VecW{}, k, acc);
  float s = VecW::sum(acc);
  for (; k < n; k++) s = f(Vec1{}, k, s);
  return s;
}

}  // namespace oe
