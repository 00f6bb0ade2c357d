// Shared pieces of the CPU kernels: the primitive base, threading, contiguous inputs, AVX2 math.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iterator>
#include <numeric>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define OE_AVX2 1
#endif
// Float vectors of 16 (attention's tiles, the fp32 products).
#if defined(OE_AVX2) && defined(__AVX512F__)
#define OE_AVX512 1
#endif
// Integer dot products of unsigned by signed bytes (the one-row 4- and 8-bit products,
// linear.cpp) in one instruction; without VNNI the 4-bit product emulates them (OE_INT8_DOT).
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

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/fast.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace oe {

// The same computation in MLX ops: what the kernel must equal, and where its gradient comes from.
using Reference = std::function<std::vector<mx::array>(const std::vector<mx::array>&)>;

// The vjp of `f` in the inputs `wrt` of `primals`, the others held fixed: their gradients, in the
// order of `wrt`. Only those are differentiated: some inputs have no gradient (quantized weights).
inline std::vector<mx::array> vjp_in(const Reference& f, const std::vector<mx::array>& primals,
                                     const std::vector<int>& wrt,
                                     const std::vector<mx::array>& cotangents) {
  auto g = [&](const std::vector<mx::array>& x) {
    auto all = primals;
    for (size_t j = 0; j < wrt.size(); j++) all[wrt[j]] = x[j];
    return f(all);
  };
  std::vector<mx::array> x;
  for (int i : wrt) x.push_back(primals[i]);
  return mx::vjp(g, x, cotangents).second;
}

// Each kernel is a Primitive with a CPU implementation only (the Python side sends other devices
// to MLX's own ops). Its vjp is its reference's, so training through a kernel is exact; the
// backward pass is MLX's, unless the kernel has a backward kernel of its own (`grad_kernel`).
class CpuPrimitive : public mx::Primitive {
 public:
  CpuPrimitive(mx::Stream s, Reference reference) : mx::Primitive(s), reference_(std::move(reference)) {}
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(std::string(name()) + " has no GPU kernel");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>& outputs) override {
    bool fp32 = std::all_of(cotangents.begin(), cotangents.end(),
                            [](const mx::array& c) { return c.dtype() == mx::float32; });
    auto grads = fp32 ? grad_kernel(primals, cotangents, outputs) : std::vector<mx::array>{};
    if (grads.empty()) return vjp_in(reference_, primals, argnums, cotangents);
    std::vector<mx::array> out;
    for (int i : argnums) out.push_back(grads[i]);
    return out;
  }

 protected:
  // The gradients of all the inputs from a backward kernel (float32 cotangents only), or none to
  // take the reference's.
  virtual std::vector<mx::array> grad_kernel(const std::vector<mx::array>& /*primals*/,
                                             const std::vector<mx::array>& /*cotangents*/,
                                             const std::vector<mx::array>& /*outputs*/) {
    return {};
  }

 private:
  Reference reference_;
};

// The reference of a backward kernel whose inputs are the forward's `n_inputs` inputs, anything
// else it needs, and last the cotangent: the vjp of `forward` in its first `n_wrt` inputs.
inline Reference backward_reference(Reference forward, int n_inputs, int n_wrt) {
  std::vector<int> wrt(n_wrt);
  std::iota(wrt.begin(), wrt.end(), 0);
  return [=](const std::vector<mx::array>& in) {
    return vjp_in(forward, {in.begin(), in.begin() + n_inputs}, wrt, {in.back()});
  };
}

inline void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

inline mx::Stream cpu_stream(mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  require(stream.device == mx::Device::cpu, "mlx_openelm kernels run on the CPU only");
  return stream;
}

inline void alloc(mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
}

// Row-major data of `a`: `a` itself when it is, else a copy (a task queued on the stream ahead of
// the caller's, kept alive by the encoder).
inline mx::array row_contiguous(const mx::array& a, mx::cpu::CommandEncoder& enc) {
  if (a.flags().row_contiguous) return a;
  mx::array c(a.shape(), a.dtype(), nullptr, {});
  alloc(c);
  enc.dispatch([src = a.data<char>(), dst = c.data<char>(), shape = a.shape(),
                strides = a.strides(), item = a.itemsize(), n = a.size()]() {
    std::vector<int64_t> idx(shape.size(), 0);
    for (size_t i = 0; i < n; i++) {
      int64_t off = 0;
      for (size_t d = 0; d < shape.size(); d++) off += idx[d] * strides[d];
      std::memcpy(dst + i * item, src + off * item, item);
      for (int d = int(shape.size()) - 1; d >= 0; d--) {
        if (++idx[d] < shape[d]) break;
        idx[d] = 0;
      }
    }
  });
  enc.add_temporary(c);
  return c;
}

// Run f(begin, end) over [0, n) on the OpenMP team, in a few chunks per thread taken as threads
// come free: on a shared machine one descheduled thread then delays a chunk, not half the job.
// Small jobs stay on the calling thread.
template <class F>
inline void parallel_for(int64_t n, int64_t min_per_thread, F&& f) {
  int threads = omp_get_max_threads();
  if (min_per_thread > 0) threads = int(std::min<int64_t>(threads, std::max<int64_t>(1, n / min_per_thread)));
  if (threads <= 1) {
    f(int64_t(0), n);
    return;
  }
  const int64_t chunks = std::min<int64_t>(n, 4 * threads);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks; c++) {
    int64_t begin = n * c / chunks, end = n * (c + 1) / chunks;
    if (begin < end) f(begin, end);
  }
}

// out[0:width] = the sum over rows of each row's share, which add(r0, r1, partial) adds into
// `partial` (width floats, zeroed) for the rows [r0, r1). The rows go in a fixed number of
// chunks, each with its own partial sum, so the total does not depend on the threads.
template <class F>
inline void sum_over_rows(int64_t rows, int64_t width, float* out, F&& add) {
  const int64_t chunks = std::min<int64_t>(rows, 16);
  std::vector<float> partial(chunks * width, 0.0f);
  parallel_for(chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; c++)
      add(rows * c / chunks, rows * (c + 1) / chunks, partial.data() + c * width);
  });
  for (int64_t i = 0; i < width; i++) {
    float t = 0;
    for (int64_t c = 0; c < chunks; c++) t += partial[c * width + i];
    out[i] = t;
  }
}

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
#endif

#ifdef OE_AVX2
// Float vectors behind one interface, so a kernel is written once for 8 floats (AVX2) and 16
// (AVX-512); VecW is the widest this CPU has.
struct Vec8 {
  using V = __m256;
  static constexpr int64_t N = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V exp(V a) { return exp8(a); }
  static float sum(V a) { return hsum(a); }
  static void store(float* p, V a) { _mm256_storeu_ps(p, a); }
};
#ifdef OE_AVX512
struct Vec16 {
  using V = __m512;
  static constexpr int64_t N = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V exp(V a) { return exp16(a); }
  static float sum(V a) { return _mm512_reduce_add_ps(a); }
  static void store(float* p, V a) { _mm512_storeu_ps(p, a); }
};
using VecW = Vec16;
#else
using VecW = Vec8;
#endif
#endif

// One float, for tails and for CPUs without AVX2.
struct Vec1 {
  using V = float;
  static constexpr int64_t N = 1;
  static V zero() { return 0.0f; }
  static V load(const float* p) { return *p; }
  static V bcast(const float* p) { return *p; }
  static V fma(V a, V b, V c) { return std::fma(a, b, c); }
  static V mul(V a, V b) { return a * b; }
  static V max(V a, V b) { return std::max(a, b); }
  static V sub(V a, V b) { return a - b; }
  static V add(V a, V b) { return a + b; }
  static V exp(V a) { return std::exp(a); }
  static float sum(V a) { return a; }
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
  static V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static V bcast(const float* p) { return V{} + *p; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V mul(V a, V b) { return a * b; }
  static V max(V a, V b) {
    for (int i = 0; i < 8; i++) a[i] = std::max(a[i], b[i]);
    return a;
  }
  static V sub(V a, V b) { return a - b; }
  static V add(V a, V b) { return a + b; }
  static V exp(V a) {
    for (int i = 0; i < 8; i++) a[i] = std::exp(a[i]);
    return a;
  }
  static float sum(V a) { return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7])); }
  static void store(float* p, V a) { std::memcpy(p, &a, sizeof a); }
};
using VecW = VecP;
#endif

// out = x * rsqrt(mean(x^2) + eps) * w over one row of D.
inline void rms_row(const float* x, const float* w, float* out, int64_t D, float eps) {
  int64_t k = 0;
  float ss = 0;
#ifdef OE_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; k + 8 <= D; k += 8) {
    __m256 v = _mm256_loadu_ps(x + k);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  ss = hsum(acc);
#endif
  for (; k < D; k++) ss += x[k] * x[k];
  const float r = 1.0f / std::sqrt(ss / float(D) + eps);
  k = 0;
#ifdef OE_AVX2
  const __m256 rv = _mm256_set1_ps(r);
  for (; k + 8 <= D; k += 8)
    _mm256_storeu_ps(out + k,
                     _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), rv), _mm256_loadu_ps(w + k)));
#endif
  for (; k < D; k++) out[k] = x[k] * r * w[k];
}

// out = silu(x[0:F]) * x[F:2F] over one row of 2F (OpenELM's SwiGLU, the gate first).
inline void silu_gate_row(const float* x, float* out, int64_t F) {
  const float *a = x, *b = x + F;
  int64_t k = 0;
#ifdef OE_AVX2
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  for (; k + 8 <= F; k += 8) {
    __m256 av = _mm256_loadu_ps(a + k);
    __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, av))));
    _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_mul_ps(av, sig), _mm256_loadu_ps(b + k)));
  }
#endif
  for (; k < F; k++) out[k] = a[k] / (1.0f + std::exp(-a[k])) * b[k];
}

// cos and sin of the angles as MLX's RoPE makes them: float(position) * inv_freq, in float32, for
// positions offset .. offset + L - 1.
inline void rope_tables(const float* inv_freqs, int64_t L, int64_t half, int64_t offset,
                        std::vector<float>& cos_t, std::vector<float>& sin_t) {
  cos_t.resize(L * half);
  sin_t.resize(L * half);
  for (int64_t l = 0; l < L; l++)
    for (int64_t i = 0; i < half; i++) {
      float theta = float(offset + l) * inv_freqs[i];
      cos_t[l * half + i] = std::cos(theta);
      sin_t[l * half + i] = std::sin(theta);
    }
}

// One attention head's row of q or k: RMS-normed with w (when given; tmp holds it), then rotated
// (NeoX RoPE with one position's cos c and sin sn) into dst.
inline void norm_and_rotate(const float* x, const float* w, float eps, const float* c,
                            const float* sn, int64_t hd, float* tmp, float* dst) {
  if (w) {
    rms_row(x, w, tmp, hd, eps);
    x = tmp;
  }
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; i++) {
    float x1 = x[i], x2 = x[i + half];
    dst[i] = x1 * c[i] - x2 * sn[i];
    dst[i + half] = x1 * sn[i] + x2 * c[i];
  }
}

}  // namespace oe
