// Scaled dot-product attention with an online softmax, for prefill, decode and training.
//
// MLX's CPU fallback builds the full score matrix and runs exp one element at a time. Here a
// decoding row keeps a block of scores per query head, exponentiates a vector at a time, and serves
// all the query heads of a GQA group from one pass over their key/value head; a prefill, and the
// backward pass, work in tiles of query vectors (below).
#include "attention.h"

namespace oe {

namespace {

constexpr int64_t SPAN = 256;  // keys per work unit when decoding (a multiple of BLOCK)

// ---- decoding: one query row per head ----------------------------------------------------------

inline float dot(const float* a, const float* b, int64_t n) {
  using X = VecW;
  int64_t k = 0;
  auto acc0 = X::zero(), acc1 = X::zero();  // two chains, to hide the FMA latency
  for (; k + 2 * X::N <= n; k += 2 * X::N) {
    acc0 = X::fma(X::load(a + k), X::load(b + k), acc0);
    acc1 = X::fma(X::load(a + k + X::N), X::load(b + k + X::N), acc1);
  }
  float s = X::sum(X::add(acc0, acc1));
  for (; k < n; k++) s += a[k] * b[k];
  return s;
}

// out[j] = scale * q . k[j] for n keys of stride ks; returns the largest.
inline float scores(const float* q, const float* k, int64_t ks, int64_t n, int64_t hd, float scale,
                    float* out) {
  using X = VecW;
  int64_t j = 0;
  float m = -std::numeric_limits<float>::infinity();
  if (hd % X::N == 0) {
    // Four keys at once, their four sums reduced together.
    for (; j + 4 <= n; j += 4) {
      auto a0 = X::zero(), a1 = a0, a2 = a0, a3 = a0;
      const float* kj = k + j * ks;
      for (int64_t d = 0; d < hd; d += X::N) {
        const auto qd = X::load(q + d);
        a0 = X::fma(qd, X::load(kj + d), a0);
        a1 = X::fma(qd, X::load(kj + ks + d), a1);
        a2 = X::fma(qd, X::load(kj + 2 * ks + d), a2);
        a3 = X::fma(qd, X::load(kj + 3 * ks + d), a3);
      }
      X::sum4(a0, a1, a2, a3, out + j);
      for (int i = 0; i < 4; i++) m = std::max(m, out[j + i] *= scale);
    }
  }
  for (; j < n; j++) {
    out[j] = dot(q, k + j * ks, hd) * scale;
    m = std::max(m, out[j]);
  }
  return m;
}

// p[j] = exp(p[j] - m), returns the sum.
inline float exp_shift(float* p, int64_t n, float m) {
  return sum_vec(n, [&]<class X>(X, int64_t j, typename X::V acc) {
    const auto e = X::exp(X::sub(X::load(p + j), X::set(m)));
    X::store(p + j, e);
    return X::add(acc, e);
  });
}

// acc[0:R N] = acc * c + sum_j p[j] v[j][0:R N], held in R registers over the n keys.
template <class X, int R>
inline void accumulate_block(float* acc, float c, const float* p, const float* v, int64_t vs,
                             int64_t n) {
  typename X::V a[R];
  for (int i = 0; i < R; i++) a[i] = X::mul(X::load(acc + X::N * i), X::set(c));
  for (int64_t j = 0; j < n; j++) {
    const auto pj = X::bcast(p + j);
    for (int i = 0; i < R; i++) a[i] = X::fma(pj, X::load(v + j * vs + X::N * i), a[i]);
  }
  for (int i = 0; i < R; i++) X::store(acc + X::N * i, a[i]);
}

// acc = acc * c + sum_j p[j] v[j] over hd dimensions: 8 vectors at a time in registers, then 4,
// then 1.
inline void accumulate(float* acc, float c, const float* p, const float* v, int64_t vs, int64_t n,
                       int64_t hd) {
  using X = VecW;
  int64_t d = 0;
  for (; d + 8 * X::N <= hd; d += 8 * X::N) accumulate_block<X, 8>(acc + d, c, p, v + d, vs, n);
  for (; d + 4 * X::N <= hd; d += 4 * X::N) accumulate_block<X, 4>(acc + d, c, p, v + d, vs, n);
  for (; d + X::N <= hd; d += X::N) accumulate_block<X, 1>(acc + d, c, p, v + d, vs, n);
#ifdef OE_AVX512
  for (; d + 8 <= hd; d += 8) accumulate_block<Vec8, 1>(acc + d, c, p, v + d, vs, n);
#endif
  for (; d < hd; d++) accumulate_block<Vec1, 1>(acc + d, c, p, v + d, vs, n);
}

// y += a * x over n floats.
inline void axpy(float* y, float a, const float* x, int64_t n) {
  each_vec(n, [&]<class X>(X, int64_t d) {
    X::store(y + d, X::fma(X::set(a), X::load(x + d), X::load(y + d)));
  });
}

// attend() for L > 1.
void attend_tiles(const float* qp, const float* kp, std::array<int64_t, 3> ks, const float* vp,
                  std::array<int64_t, 3> vs, float* op, int64_t B, int64_t nq, int64_t L,
                  int64_t hd, int64_t nkv, int64_t S, float scale, bool causal) {
  const Tiles tl(nq, nkv, L);
  const int64_t rep = tl.rep, Mp = tl.Mp, groups = B * nkv;
  const int threads = groups * L * S * rep * hd < 65536 ? 1 : ThreadPool::threads();
  ThreadPool::get().run(threads, groups * tl.count, [&](int64_t unit) {
    std::vector<float> qt(hd * Mp), s(BLOCK * Mp), acc(Mp * hd), m(Mp), l(Mp), c(Mp);
    // The last rows first: under a causal mask they see the most keys.
    const int64_t tile = tl.count - 1 - unit / groups, b = unit % groups / nkv, g = unit % nkv;
    const int64_t i0 = tile * tl.T, rows = std::min(tl.T, L - i0), M = rows * rep;
    const int64_t first = S - L + i0;
    const float* kh = kp + b * ks[0] + g * ks[1];
    const float* vh = vp + b * vs[0] + g * vs[1];
    std::fill(qt.begin(), qt.end(), 0.0f);
    transpose_tile(qt.data(), Mp, rows, rep, hd, scale, [&](int64_t t, int64_t r) {
      return qp + ((b * nq + g * rep + r) * L + i0 + t) * hd;
    });
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
    std::fill(l.begin(), l.end(), 0.0f);
    const int64_t end = causal ? first + rows : S;
    for (int64_t j0 = 0; j0 < end; j0 += BLOCK) {
      const int64_t n = std::min(BLOCK, end - j0);
      block_scores(qt.data(), Mp, kh + j0 * ks[2], ks[2], hd, n, s.data());
      if (causal) mask_block(s.data(), Mp, n, j0, first, M, rep);
      online_softmax(s.data(), Mp, n, m.data(), l.data(), c.data());
      for (int64_t r0 = 0; r0 < M; r0 += 4)
        block_values(acc.data() + r0 * hd, hd, c.data() + r0, s.data() + r0, Mp, 1,
                     vh + j0 * vs[2], vs[2], n, hd);
    }
    for (int64_t t = 0; t < rows; t++)
      for (int64_t r = 0; r < rep; r++) {
        const int64_t q = t * rep + r;
        float* o = op + ((b * L + i0 + t) * nq + g * rep + r) * hd;
        const float inv = 1.0f / l[q];
        for (int64_t d = 0; d < hd; d++) o[d] = acc[q * hd + d] * inv;
      }
  });
}

}  // namespace

// softmax(scale q k^T [causal]) v: q (B, nq, L, hd) contiguous, keys and values rows of hd floats
// at strides (batch, head, row) = ks, vs, S of them; out (B, L, nq, hd).
void attend(const float* qp, const float* kp, std::array<int64_t, 3> ks, const float* vp,
            std::array<int64_t, 3> vs, float* op, int64_t B, int64_t nq, int64_t L, int64_t hd,
            int64_t nkv, int64_t S, float scale, bool causal) {
  if (L > 1) return attend_tiles(qp, kp, ks, vp, vs, op, B, nq, L, hd, nkv, S, scale, causal);
  std::vector<DecodeRow> rows;
  for (int64_t b = 0; b < B; b++)
    rows.push_back({qp + b * nq * hd, kp + b * ks[0], vp + b * vs[0], {ks[1], ks[2]},
                    {vs[1], vs[2]}, S, op + b * nq * hd});
  attend_rows(rows, nq, nkv, hd, scale);
}

void attend_rows(const std::vector<DecodeRow>& rows, int64_t nq, int64_t nkv, int64_t hd,
                 float scale) {
  // A decoding row sees every key, masked or not. It has only a few (kv head) items, fewer than
  // the threads or unevenly many, so its keys go in spans of SPAN, each with its own softmax
  // state, merged at the end. The spans depend on the row's length alone, so its result depends
  // neither on the thread count nor on the rows beside it.
  const int64_t rep = nq / nkv;
  auto parts = [](int64_t S) { return (S + SPAN - 1) / SPAN; };
  std::vector<int64_t> first = {0};  // row i's units are first[i] .. first[i + 1] - 1
  int64_t keys = 0;
  for (const auto& row : rows) {
    first.push_back(first.back() + nkv * parts(row.S));
    keys += row.S;
  }
  const int64_t units = first.back();
  std::vector<float> partial(units * rep * (hd + 2));  // per span and head: m, l, the output
  const int threads = keys * nkv * rep * hd < 65536 ? 1 : ThreadPool::threads();
  ThreadPool::get().run(threads, units, [&](int64_t unit) {
    std::vector<float> block(rep * BLOCK), acc(rep * hd), m(rep), l(rep);
    const auto i = std::upper_bound(first.begin(), first.end(), unit) - first.begin() - 1;
    const DecodeRow& row = rows[i];
    const int64_t n_parts = parts(row.S), g = (unit - first[i]) / n_parts;
    const float* kh = row.k + g * row.ks[0];
    const float* vh = row.v + g * row.vs[0];
    const int64_t begin = (unit - first[i]) % n_parts * SPAN, end = std::min(row.S, begin + SPAN);
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
    std::fill(l.begin(), l.end(), 0.0f);
    for (int64_t j0 = begin; j0 < end; j0 += BLOCK) {
      const int64_t n = std::min(BLOCK, end - j0);
      for (int64_t r = 0; r < rep; r++) {
        float* sr = block.data() + r * BLOCK;
        const float bm = scores(row.q + (g * rep + r) * hd, kh + j0 * row.ks[1], row.ks[1], n, hd,
                                scale, sr);
        const float m_new = std::max(m[r], bm);
        const float c = std::exp(m[r] - m_new);  // 0 on the first block
        l[r] = l[r] * c + exp_shift(sr, n, m_new);
        m[r] = m_new;
        accumulate(acc.data() + r * hd, c, sr, vh + j0 * row.vs[1], row.vs[1], n, hd);
      }
    }
    for (int64_t r = 0; r < rep; r++) {
      float* st = partial.data() + (unit * rep + r) * (hd + 2);
      st[0] = m[r];
      st[1] = l[r];
      std::copy_n(acc.data() + r * hd, hd, st + 2);
    }
  });
  for (size_t i = 0; i < rows.size(); i++) {
    const int64_t n_parts = parts(rows[i].S);
    for (int64_t g = 0; g < nkv; g++)
      for (int64_t r = 0; r < rep; r++) {
        auto state = [&](int64_t p) {
          return partial.data() + ((first[i] + g * n_parts + p) * rep + r) * (hd + 2);
        };
        float mx_all = -std::numeric_limits<float>::infinity(), total = 0;
        for (int64_t p = 0; p < n_parts; p++) mx_all = std::max(mx_all, state(p)[0]);
        float* o = rows[i].out + (g * rep + r) * hd;
        std::fill(o, o + hd, 0.0f);
        for (int64_t p = 0; p < n_parts; p++) {
          const float c = std::exp(state(p)[0] - mx_all);
          total += state(p)[1] * c;
          axpy(o, c, state(p) + 2, hd);
        }
        const float inv = 1.0f / total;
        for (int64_t d = 0; d < hd; d++) o[d] *= inv;
      }
  }
}

Reference attention_reference(float scale, bool causal, mx::Stream s) {
  return [=](const std::vector<mx::array>& in) {
    auto out = mx::fast::scaled_dot_product_attention(in[0], in[1], in[2], scale,
                                                      causal ? "causal" : "", {}, {}, false, s);
    return std::vector<mx::array>{mx::transpose(out, {0, 2, 1, 3}, s)};
  };
}

class Attention : public Kernel<Attention> {
 public:
  Attention(mx::Stream s, float scale, bool causal)
      : Kernel(s, attention_reference(scale, causal, s)),
        scale_(scale), causal_(causal) {}
  const char* name() const override { return "OpenELMAttention"; }
  auto state() const { return std::tuple(scale_, causal_); }

  // The backward pass is a kernel too (attention_backward.cpp).
  std::vector<mx::array> grad_kernel(const std::vector<mx::array>& primals,
                                     const std::vector<mx::array>& cotangents,
                                     const std::vector<mx::array>& outputs) override {
    return attention_grad(primals, cotangents, outputs, scale_, causal_, stream());
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
      attend(qp, kp, {ks[0], ks[1], ks[2]}, vp, {vs[0], vs[1], vs[2]}, op, B, nq, L, hd, nkv, S,
             scale, causal);
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
