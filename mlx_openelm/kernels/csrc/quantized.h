// What the quantized kernels share (quantized_linear.cpp, quantized_matmul.cpp, quant_dot_x86.h):
// the check of w, scales and biases, the scales' C++ type, scales and biases of any float type as
// floats, a row's bias term, the weights as floats, and how far ahead the products prefetch.
#pragma once

#include "kernels.h"

namespace oe {

// op's check of MLX's affine quantized w (N, K*bits/32 uint32), scales and biases (N, K/group).
inline void check_quantized(const char* op, const mx::array& w, const mx::array& scales,
                            const mx::array& biases, int group_size, int bits) {
  const std::string at = std::string(op) + ": ";
  require(bits == 4 || bits == 8, at + "bits must be 4 or 8");
  require(group_size % 16 == 0 && group_size > 0, at + "group size must be a multiple of 16");
  require(w.dtype() == mx::uint32 && w.ndim() == 2, at + "w must be uint32 (N, K*bits/32)");
  int64_t K = w.shape(1) * 32 / bits;
  require(K % group_size == 0, at + "K must be a multiple of the group size");
  require(scales.dtype() == biases.dtype() &&
              (scales.dtype() == mx::float32 || scales.dtype() == mx::float16 ||
               scales.dtype() == mx::bfloat16),
          at + "scales and biases must share a float dtype");
  require(scales.shape() == mx::Shape{w.shape(0), int(K / group_size)} &&
              biases.shape() == scales.shape(),
          at + "scales/biases must be (N, K / group_size)");
}

// run(T{}) with T the C++ type of the scales (check_quantized allows these three).
template <class F>
void with_scale_type(mx::Dtype dtype, F&& run) {
  switch (dtype) {
    case mx::float32: return run(float{});
    case mx::float16: return run(mx::float16_t{});
    default: return run(mx::bfloat16_t{});
  }
}

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

// ---- the weights as floats ----------------------------------------------------------------------
//
// The float loops over 4/8-bit weights run in 8 lanes on every CPU (Vec8, or VecP without AVX2):
// a 4-bit product takes 16 weights at a time, which every group size holds, and AVX-512 sums in
// the order AVX2 does.
#ifdef OE_AVX2
using VecQ = Vec8;
#else
using VecQ = VecP;
using IntsP = int32_t __attribute__((vector_size(32)));

// Eight bytes as int32 lanes, through 16-bit ones: GCC converts bytes to floats (or int32s)
// directly one lane at a time, which made the portable 8-bit dequantize 2x slower.
inline IntsP widen8(const uint8_t* p) {
  using Bytes = uint8_t __attribute__((vector_size(8)));
  using Shorts = uint16_t __attribute__((vector_size(16)));
  Bytes b;
  std::memcpy(&b, p, sizeof b);
  return __builtin_convertvector(__builtin_convertvector(b, Shorts), IntsP);
}
#endif

// X::N weights of a row from element k on (k a multiple of X::N) as floats: bytes, or nibbles of
// a uint32, the lowest first.
template <int BITS, class X>
inline typename X::V weights(const uint8_t* row, int64_t k) {
  static_assert(X::N == 1 || std::is_same_v<X, VecQ>);
  if constexpr (X::N == 1) {
    if constexpr (BITS == 8) return row[k];
    else return float((row[k / 2] >> (4 * (k % 2))) & 15);
#ifdef OE_AVX2
  } else if constexpr (BITS == 8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(row + k))));
  } else {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i word = _mm256_castps_si256(_mm256_broadcast_ss((const float*)(row + k / 2)));
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(word, shifts), _mm256_set1_epi32(15)));
  }
#else
  } else if constexpr (BITS == 8) {
    return __builtin_convertvector(widen8(row + k), VecP::V);
  } else {
    int32_t word;
    std::memcpy(&word, row + k / 2, sizeof word);
    const IntsP shifts = {0, 4, 8, 12, 16, 20, 24, 28};
    return __builtin_convertvector(((IntsP{} + word) >> shifts) & 15, VecP::V);
  }
#endif
}

// The 2 X::N 4-bit weights in X::N bytes as floats: lo the low nibbles (the even elements), hi the
// high ones (the odd).
template <class X>
inline void nibbles(const uint8_t* p, typename X::V& lo, typename X::V& hi) {
  static_assert(std::is_same_v<X, VecQ>);
#ifdef OE_AVX2
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
#else
  const IntsP b = widen8(p);
  lo = __builtin_convertvector(b & 15, VecP::V);
  hi = __builtin_convertvector(b >> 4, VecP::V);
#endif
}

// out[n - n0, :] = dequantize(w)[n, :] for the rows [n0, n1) of w (K * BITS / 8 bytes a row).
template <int BITS, typename S>
void dequantize_rows(const uint8_t* w, const S* scales, const S* biases, float* out, int64_t K,
                     int64_t gs, int64_t n0, int64_t n1) {
  const int64_t groups = K / gs;
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* wr = w + n * K * BITS / 8;
    float* o = out + (n - n0) * K;
    for (int64_t g = 0; g < groups; g++) {
      const float s = to_f32(scales[n * groups + g]), b = to_f32(biases[n * groups + g]);
      each_vec<VecQ>(gs, [&]<class X>(X, int64_t i) {
        const int64_t k = g * gs + i;
        X::store(o + k, X::fma(weights<BITS, X>(wr, k), X::set(s), X::set(b)));
      });
    }
  }
}

}  // namespace oe
