// Scaled dot-product attention with an online softmax, for prefill and decode.
//
// MLX's CPU fallback builds the full score matrix and runs exp one element at a time; this keeps
// a block of scores per query row, exponentiates eight at a time, and serves all the query heads
// of a GQA group from one pass over their key/value head.
#include <algorithm>
#include <limits>

#include "kernels.h"

namespace oe {

namespace {

constexpr int64_t BLOCK = 64;  // keys per softmax block

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t k = 0;
  float s = 0;
#ifdef OE_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; k + 16 <= n; k += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), acc1);
  }
  s = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; k < n; k++) s += a[k] * b[k];
  return s;
}

// out[j] = scale * q . k[j] for n keys of stride ks; returns the largest.
inline float scores(const float* q, const float* k, int64_t ks, int64_t n, int64_t hd, float scale,
                    float* out) {
  int64_t j = 0;
  float m = -std::numeric_limits<float>::infinity();
#ifdef OE_AVX2
  if (hd % 8 == 0) {
    // Four keys at once, their four sums reduced together.
    for (; j + 4 <= n; j += 4) {
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      const float* kj = k + j * ks;
      for (int64_t d = 0; d < hd; d += 8) {
        const __m256 qd = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kj + d), a0);
        a1 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kj + ks + d), a1);
        a2 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kj + 2 * ks + d), a2);
        a3 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kj + 3 * ks + d), a3);
      }
      __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
      __m128 r = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)),
                            _mm_set1_ps(scale));
      _mm_storeu_ps(out + j, r);
      m = std::max(m, std::max(std::max(out[j], out[j + 1]), std::max(out[j + 2], out[j + 3])));
    }
  }
#endif
  for (; j < n; j++) {
    out[j] = dot(q, k + j * ks, hd) * scale;
    m = std::max(m, out[j]);
  }
  return m;
}

// p[j] = exp(p[j] - m), returns the sum.
inline float exp_shift(float* p, int64_t n, float m) {
  int64_t j = 0;
  float sum = 0;
#ifdef OE_AVX2
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), mv));
    _mm256_storeu_ps(p + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; j < n; j++) {
    p[j] = std::exp(p[j] - m);
    sum += p[j];
  }
  return sum;
}

// acc = acc * c + sum_j p[j] v[j], 64 dimensions at a time held in registers.
inline void accumulate(float* acc, float c, const float* p, const float* v, int64_t vs, int64_t n,
                       int64_t hd) {
  int64_t d0 = 0;
#ifdef OE_AVX2
  const __m256 cv = _mm256_set1_ps(c);
  for (; d0 + 64 <= hd; d0 += 64) {
    __m256 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm256_mul_ps(_mm256_loadu_ps(acc + d0 + 8 * i), cv);
    for (int64_t j = 0; j < n; j++) {
      const float* vj = v + j * vs + d0;
      const __m256 pj = _mm256_set1_ps(p[j]);
      for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * i), a[i]);
    }
    for (int i = 0; i < 8; i++) _mm256_storeu_ps(acc + d0 + 8 * i, a[i]);
  }
#endif
  for (int64_t d = d0; d < hd; d++) {
    float t = acc[d] * c;
    for (int64_t j = 0; j < n; j++) t += p[j] * v[j * vs + d];
    acc[d] = t;
  }
}

}  // namespace

class Attention : public CpuPrimitive {
 public:
  Attention(mx::Stream s, float scale, bool causal)
      : CpuPrimitive(s, [=](const std::vector<mx::array>& in) {
          auto out = mx::fast::scaled_dot_product_attention(in[0], in[1], in[2], scale,
                                                            causal ? "causal" : "", {}, {}, false, s);
          return std::vector<mx::array>{mx::transpose(out, {0, 2, 1, 3}, s)};
        }),
        scale_(scale), causal_(causal) {}
  const char* name() const override { return "OpenELMAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Attention&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_;
  }

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    auto q = row_contiguous(inputs[0], enc);
    // Keys and values may be views into a larger cache: only their rows must be contiguous.
    auto rows_ok = [](const mx::array& a) { return a.strides().back() == 1; };
    auto k = rows_ok(inputs[1]) ? inputs[1] : row_contiguous(inputs[1], enc);
    auto v = rows_ok(inputs[2]) ? inputs[2] : row_contiguous(inputs[2], enc);
    auto& out = outputs[0];
    alloc(out);
    const int64_t B = q.shape(0), nq = q.shape(1), L = q.shape(2), hd = q.shape(3);
    const int64_t nkv = k.shape(1), S = k.shape(2);
    enc.dispatch([qp = q.data<float>(), kp = k.data<float>(), vp = v.data<float>(),
                  op = out.data<float>(), ks = k.strides(), vs = v.strides(), B, nq, L, hd, nkv, S,
                  scale = scale_, causal = causal_]() {
      const int64_t rep = nq / nkv, items = B * nkv * L;
      const int threads = items * S * rep * hd < 65536 ? 1 : omp_get_max_threads();
#pragma omp parallel num_threads(threads)
      {
        std::vector<float> block(rep * BLOCK), acc(rep * hd), m(rep), l(rep);
#pragma omp for schedule(dynamic, 4)
        for (int64_t item = 0; item < items; item++) {
          const int64_t b = item / (nkv * L), g = (item / L) % nkv, i = item % L;
          const float* kh = kp + b * ks[0] + g * ks[1];
          const float* vh = vp + b * vs[0] + g * vs[1];
          const int64_t limit = causal ? S - L + i + 1 : S;
          std::fill(acc.begin(), acc.end(), 0.0f);
          std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
          std::fill(l.begin(), l.end(), 0.0f);
          for (int64_t j0 = 0; j0 < limit; j0 += BLOCK) {
            const int64_t n = std::min(BLOCK, limit - j0);
            for (int64_t r = 0; r < rep; r++) {
              const float* qr = qp + ((b * nq + g * rep + r) * L + i) * hd;
              float* sr = block.data() + r * BLOCK;
              const float bm = scores(qr, kh + j0 * ks[2], ks[2], n, hd, scale, sr);
              const float m_new = std::max(m[r], bm);
              const float c = std::exp(m[r] - m_new);  // 0 on the first block
              l[r] = l[r] * c + exp_shift(sr, n, m_new);
              m[r] = m_new;
              accumulate(acc.data() + r * hd, c, sr, vh + j0 * vs[2], vs[2], n, hd);
            }
          }
          for (int64_t r = 0; r < rep; r++) {
            float* o = op + ((b * L + i) * nq + g * rep + r) * hd;
            const float inv = 1.0f / l[r];
            for (int64_t d = 0; d < hd; d++) o[d] = acc[r * hd + d] * inv;
          }
        }
      }
    });
  }

 private:
  float scale_;
  bool causal_;
};

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                    bool causal, mx::StreamOrDevice s) {
  require(q.dtype() == mx::float32 && k.dtype() == mx::float32 && v.dtype() == mx::float32,
          "attention: float32 only");
  require(q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4 && k.shape() == v.shape(),
          "attention: q (B, nq, L, hd), k and v (B, nkv, S, hd)");
  require(q.shape(0) == k.shape(0) && q.shape(3) == k.shape(3) && q.shape(1) % k.shape(1) == 0,
          "attention: batch, head_dim or head counts do not match");
  require(!causal || k.shape(2) >= q.shape(2), "attention: causal needs at least L keys");
  return mx::array({q.shape(0), q.shape(2), q.shape(1), q.shape(3)}, mx::float32,
                   std::make_shared<Attention>(cpu_stream(s), scale, causal), {q, k, v});
}

}  // namespace oe
