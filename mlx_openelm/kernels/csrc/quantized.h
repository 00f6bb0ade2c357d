// What the quantized products share (quantized_linear.cpp, quant_dot_x86.h): scales and biases
// of any float type as floats, a row's bias term, and how far ahead they prefetch.
#pragma once

#include "kernels.h"

namespace oe {

inline float to_f32(float v) { return v; }
inline float to_f32(mx::float16_t v) { return static_cast<float>(v); }
inline float to_f32(mx::bfloat16_t v) { return static_cast<float>(v); }

#ifdef OE_AVX2
// Eight scales or biases as floats.
inline __m256 load8f(const mx::float16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
}
inline __m256 load8f(const mx::bfloat16_t* p) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}
#endif
#ifdef OE_AVX512
inline __m512 load16f(const mx::float16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
}
inline __m512 load16f(const mx::bfloat16_t* p) {
  const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}
#endif

// X::N scales or biases of type S as floats.
template <class X, typename S>
inline typename X::V load_floats(const S* p) {
  if constexpr (std::is_same_v<S, float>) return X::load(p);
#ifdef OE_AVX2
  else if constexpr (std::is_same_v<X, Vec8>) return load8f(p);
#endif
#ifdef OE_AVX512
  else if constexpr (std::is_same_v<X, Vec16>) return load16f(p);
#endif
  else {
    float f[X::N];
    for (int64_t i = 0; i < X::N; i++) f[i] = to_f32(p[i]);
    return X::load(f);
  }
}

// sum_g biases[g] xsum[g]: a row's bias term, vectorised (as a scalar chain of dependent adds it
// was a tenth of a 1280-wide row's time).
template <typename S>
inline float bias_term(const S* biases, const float* xsum, int64_t groups) {
  return sum_vec(groups, [&]<class X>(X, int64_t g, typename X::V acc) {
    return X::fma(load_floats<X>(biases + g), X::load(xsum + g), acc);
  });
}

// n scales or biases as floats: `p` itself when they are, else converted into `buf`, a vector at
// a time. The VNNI rows convert a row's once and read floats within; converting each where it was
// used made a folder with 16-bit scales (what `convert -q` writes on a Mac, and mlx-community's
// quantized models) decode up to 1.5x slower than one with float32 scales.
template <typename S>
inline const float* as_floats(const S* p, int64_t n, float* buf) {
  if constexpr (std::is_same_v<S, float>) {
    return p;
  } else {
    each_vec(n, [&]<class X>(X, int64_t i) { X::store(buf + i, load_floats<X>(p + i)); });
    return buf;
  }
}

// How many weight rows ahead the quantized products prefetch (8-bit rows ran ~20% faster).
constexpr int64_t AHEAD = 4;

}  // namespace oe
