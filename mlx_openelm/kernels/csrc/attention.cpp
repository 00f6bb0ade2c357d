// Scaled dot-product attention with an online softmax, for prefill, decode and training.
//
// MLX's CPU fallback builds the full score matrix and runs exp one element at a time. Here a
// decoding row keeps a block of scores per query head, exponentiates a vector at a time, and serves
// all the query heads of a GQA group from one pass over their key/value head; a prefill, and the
// backward pass, work in tiles of query vectors (below).
#include <algorithm>
#include <array>
#include <limits>
#include <tuple>

#include "kernels.h"

namespace oe {

namespace {

constexpr int64_t BLOCK = 64;  // keys per softmax block
constexpr int64_t SPAN = 256;  // keys per work unit when decoding (a multiple of BLOCK)

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

// ---- prefill and training: tiles of query vectors -------------------------------------------
//
// Row by row, a prefill would meet each key once per query row and head, in a dot product that
// ends in a horizontal sum. Instead a tile of query vectors (the heads of a GQA group times a few
// rows) is held transposed, so each key row meets the whole tile in plain FMAs, a small matrix
// product scores[key][query]; the online softmax then runs down the columns, a vector of queries
// at a time, and each value row is added into all the tile's outputs at once. On the Xeon VM, 12
// query heads over 3 key heads and 512 causal rows: 4.2 ms row by row, 1.7 with tiles of 16-float
// vectors, 2.8 with 8-float ones (PyTorch's SDPA: 3.2). The backward pass uses the same pieces.

constexpr int64_t TILE = 32;  // query vectors per tile, at least (rounded up to 2 vectors)

// The tile products are written once for VecW (common.h): 16 floats where the CPU has AVX-512
// (half the instructions for the same FMAs), else 8, or 1 without AVX2.
// Value columns per tile_values call, in vectors: 4 rows x VW accumulators fit the registers.
constexpr int VW = VecW::N == 16 ? 4 : 2;
// Keys per tile_scores call: NR x 2 accumulators.
constexpr int NR = VecW::N == 16 ? 12 : 6;

// s[r][0:Mp] = sum_d k[r][d] qt[d][0:Mp] for R keys (rows of stride ks), Mp a multiple of 2 N.
template <class X, int R>
inline void tile_scores(const float* qt, int64_t Mp, const float* k, int64_t ks, int64_t hd,
                        float* s) {
  using V = typename X::V;
  for (int64_t m0 = 0; m0 < Mp; m0 += 2 * X::N) {
    V a[R][2];
    for (int r = 0; r < R; r++) a[r][0] = a[r][1] = X::zero();
    for (int64_t d = 0; d < hd; d++) {
      const V q0 = X::load(qt + d * Mp + m0), q1 = X::load(qt + d * Mp + m0 + X::N);
      for (int r = 0; r < R; r++) {
        const V kr = X::bcast(k + r * ks + d);
        a[r][0] = X::fma(kr, q0, a[r][0]);
        a[r][1] = X::fma(kr, q1, a[r][1]);
      }
    }
    for (int r = 0; r < R; r++) {
      X::store(s + r * Mp + m0, a[r][0]);
      X::store(s + r * Mp + m0 + X::N, a[r][1]);
    }
  }
}

// tile_scores for n keys: s (n x Mp) = k qt.
inline void block_scores(const float* qt, int64_t Mp, const float* k, int64_t ks, int64_t hd,
                         int64_t n, float* s) {
  int64_t j = 0;
  for (; j + NR <= n; j += NR) tile_scores<VecW, NR>(qt, Mp, k + j * ks, ks, hd, s + j * Mp);
  for (; j + 4 <= n; j += 4) tile_scores<VecW, 4>(qt, Mp, k + j * ks, ks, hd, s + j * Mp);
  for (; j < n; j++) tile_scores<VecW, 1>(qt, Mp, k + j * ks, ks, hd, s + j * Mp);
}

// acc[r][0:W N] = acc[r] * c[r] (c null: 1) + sum_j p(j, r) v[j][0:W N] for 4 rows r of acc
// (stride as) over n rows j of v (stride vs), p(j, r) = p[j * pj + r * pr].
template <class X, int W>
inline void tile_values(float* acc, int64_t as, const float* c, const float* p, int64_t pj,
                        int64_t pr, const float* v, int64_t vs, int64_t n) {
  using V = typename X::V;
  V a[4][W];
  for (int r = 0; r < 4; r++)
    for (int w = 0; w < W; w++) {
      a[r][w] = X::load(acc + r * as + X::N * w);
      if (c) a[r][w] = X::mul(a[r][w], X::bcast(c + r));
    }
  for (int64_t j = 0; j < n; j++) {
    V vj[W];
    for (int w = 0; w < W; w++) vj[w] = X::load(v + j * vs + X::N * w);
    for (int r = 0; r < 4; r++) {
      const V pv = X::bcast(p + j * pj + r * pr);
      for (int w = 0; w < W; w++) a[r][w] = X::fma(pv, vj[w], a[r][w]);
    }
  }
  for (int r = 0; r < 4; r++)
    for (int w = 0; w < W; w++) X::store(acc + r * as + X::N * w, a[r][w]);
}

// tile_values over all hd columns.
inline void block_values(float* acc, int64_t as, const float* c, const float* p, int64_t pj,
                         int64_t pr, const float* v, int64_t vs, int64_t n, int64_t hd) {
  int64_t d = 0;
  for (; d + VW * VecW::N <= hd; d += VW * VecW::N)
    tile_values<VecW, VW>(acc + d, as, c, p, pj, pr, v + d, vs, n);
#ifdef OE_AVX2
  for (; d + 8 <= hd; d += 8) tile_values<Vec8, 1>(acc + d, as, c, p, pj, pr, v + d, vs, n);
#endif
  for (; d < hd; d++) tile_values<Vec1, 1>(acc + d, as, c, p, pj, pr, v + d, vs, n);
}

// A tile's shape: T rows of one GQA group's rep heads, query vector m = t * rep + r, Mp columns
// (whole pairs of vectors for tile_scores, whole fours of rows for tile_values).
struct Tiles {
  int64_t rep, T, Mp, count;
  Tiles(int64_t nq, int64_t nkv, int64_t L) {
    constexpr int64_t unit = std::max<int64_t>(2 * VecW::N, 4);
    rep = nq / nkv;
    T = std::max<int64_t>(1, TILE / rep);
    Mp = (T * rep + unit - 1) / unit * unit;
    count = (L + T - 1) / T;
  }
};

// Under a causal mask, key j0 + j is past the rows t < j0 + j - first of the tile (first: the
// position of its row 0): their scores become -inf.
inline void mask_block(float* s, int64_t Mp, int64_t n, int64_t j0, int64_t first, int64_t M,
                       int64_t rep) {
  for (int64_t j = std::max<int64_t>(0, first + 1 - j0); j < n; j++)
    std::fill_n(s + j * Mp, std::min(M, (j0 + j - first) * rep),
                -std::numeric_limits<float>::infinity());
}

// One block of the online softmax, down each column: s (n x Mp) becomes exp(s - m_new), l the
// running sums, m the running maxima, c what rescales the sums of the blocks before.
inline void online_softmax(float* s, int64_t Mp, int64_t n, float* m, float* l, float* c) {
  using X = VecW;
  for (int64_t m0 = 0; m0 < Mp; m0 += X::N) {
    const typename X::V m_old = X::load(m + m0);
    typename X::V bm = m_old, sum = X::zero();
    for (int64_t j = 0; j < n; j++) bm = X::max(bm, X::load(s + j * Mp + m0));
    for (int64_t j = 0; j < n; j++) {
      const auto e = X::exp(X::sub(X::load(s + j * Mp + m0), bm));
      X::store(s + j * Mp + m0, e);
      sum = X::add(sum, e);
    }
    const auto cv = X::exp(X::sub(m_old, bm));  // 0 on the first block
    X::store(c + m0, cv);
    X::store(l + m0, X::fma(X::load(l + m0), cv, sum));
    X::store(m + m0, bm);
  }
}

// xt[d][t * rep + r] = mult * x(t, r)[d]: a tile's vectors (rows t, heads r of the GQA group),
// held transposed, for the forward's q and the backward's q, g and o alike.
template <class Vector>
inline void transpose_tile(float* xt, int64_t Mp, int64_t rows, int64_t rep, int64_t hd, float mult,
                           Vector x) {
  for (int64_t t = 0; t < rows; t++)
    for (int64_t r = 0; r < rep; r++) {
      const float* v = x(t, r);
      for (int64_t d = 0; d < hd; d++) xt[d * Mp + t * rep + r] = v[d] * mult;
    }
}

// attend() for L > 1.
void attend_tiles(const float* qp, const float* kp, std::array<int64_t, 3> ks, const float* vp,
                  std::array<int64_t, 3> vs, float* op, int64_t B, int64_t nq, int64_t L,
                  int64_t hd, int64_t nkv, int64_t S, float scale, bool causal) {
  const Tiles tl(nq, nkv, L);
  const int64_t rep = tl.rep, Mp = tl.Mp, groups = B * nkv;
  const int threads = groups * L * S * rep * hd < 65536 ? 1 : omp_get_max_threads();
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> qt(hd * Mp), s(BLOCK * Mp), acc(Mp * hd), m(Mp), l(Mp), c(Mp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t unit = 0; unit < groups * tl.count; unit++) {
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
    }
  }
}

// The backward pass, in the same tiles: per tile, a first pass over the keys makes the scores
// again and finds each query's softmax maximum and sum, a second makes p from the scores, dp =
// g . v and ds = scale p (dp - D), D = g . o,
// then dq += ds k, dk += ds^T q and dv += p^T g, each a small matrix product. A (batch, kv head)
// is one task, so dk and dv have one writer. q, k, v, o, g and the outputs are contiguous.
void attend_grad_tiles(const float* qp, const float* kp, const float* vp, const float* op,
                       const float* gp, float* dqp, float* dkp, float* dvp, int64_t B, int64_t nq,
                       int64_t L, int64_t hd, int64_t nkv, int64_t S, float scale, bool causal) {
  using X = VecW;
  const Tiles tl(nq, nkv, L);
  const int64_t rep = tl.rep, Mp = tl.Mp, groups = B * nkv;
  const int threads = std::min<int64_t>(omp_get_max_threads(), groups);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> qt(hd * Mp), gt(hd * Mp), ot(hd * Mp), qrow(Mp * hd), grow(Mp * hd),
        s(BLOCK * Mp), ds(BLOCK * Mp), dq(Mp * hd), tail(4 * hd), m(Mp), l(Mp), c(Mp), D(Mp),
        scores(S * Mp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < groups; item++) {
      const int64_t b = item / nkv, g = item % nkv;
      const float* kh = kp + item * S * hd;
      const float* vh = vp + item * S * hd;
      float* dkh = dkp + item * S * hd;
      float* dvh = dvp + item * S * hd;
      std::fill(dkh, dkh + S * hd, 0.0f);
      std::fill(dvh, dvh + S * hd, 0.0f);
      for (int64_t tile = 0; tile < tl.count; tile++) {
        const int64_t i0 = tile * tl.T, rows = std::min(tl.T, L - i0), M = rows * rep;
        const int64_t first = S - L + i0, end = causal ? first + rows : S;
        for (auto* buf : {&qt, &gt, &ot, &qrow, &grow, &dq})
          std::fill(buf->begin(), buf->end(), 0.0f);
        // q in (B, nq, L, hd), g and o in the output's (B, L, nq, hd).
        auto q_at = [&](int64_t t, int64_t r) { return qp + ((b * nq + g * rep + r) * L + i0 + t) * hd; };
        auto out_at = [&](const float* x) {
          return [=](int64_t t, int64_t r) { return x + ((b * L + i0 + t) * nq + g * rep + r) * hd; };
        };
        const auto g_at = out_at(gp);
        transpose_tile(qt.data(), Mp, rows, rep, hd, scale, q_at);
        transpose_tile(gt.data(), Mp, rows, rep, hd, 1.0f, g_at);
        transpose_tile(ot.data(), Mp, rows, rep, hd, 1.0f, out_at(op));
        for (int64_t t = 0; t < rows; t++)
          for (int64_t r = 0; r < rep; r++) {
            std::copy_n(q_at(t, r), hd, qrow.data() + (t * rep + r) * hd);
            std::copy_n(g_at(t, r), hd, grow.data() + (t * rep + r) * hd);
          }
        // D = g . o, in the lanes and order of dp's sums: where a row sees one key, o is that
        // key's v, and its ds is exactly 0, as it should be.
        for (int64_t m0 = 0; m0 < Mp; m0 += X::N) {
          auto a = X::zero();
          for (int64_t d = 0; d < hd; d++)
            a = X::fma(X::load(ot.data() + d * Mp + m0), X::load(gt.data() + d * Mp + m0), a);
          X::store(D.data() + m0, a);
        }
        std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
        std::fill(l.begin(), l.end(), 0.0f);
        // The scores, kept for the second pass, and the softmax's maximum and sum.
        for (int64_t j0 = 0; j0 < end; j0 += BLOCK) {
          const int64_t n = std::min(BLOCK, end - j0);
          float* sj = scores.data() + j0 * Mp;
          block_scores(qt.data(), Mp, kh + j0 * hd, hd, hd, n, sj);
          if (causal) mask_block(sj, Mp, n, j0, first, M, rep);
          std::copy_n(sj, n * Mp, s.data());
          online_softmax(s.data(), Mp, n, m.data(), l.data(), c.data());
        }
        for (int64_t q = 0; q < Mp; q++) l[q] = 1.0f / l[q];
        const auto sv = X::bcast(&scale);
        for (int64_t j0 = 0; j0 < end; j0 += BLOCK) {
          const int64_t n = std::min(BLOCK, end - j0);
          const float* sj = scores.data() + j0 * Mp;
          block_scores(gt.data(), Mp, vh + j0 * hd, hd, hd, n, ds.data());
          for (int64_t m0 = 0; m0 < Mp; m0 += X::N) {  // p, then ds in place of dp
            const auto mv = X::load(m.data() + m0), inv = X::load(l.data() + m0);
            const auto Dv = X::load(D.data() + m0);
            for (int64_t j = 0; j < n; j++) {
              const auto p = X::mul(X::exp(X::sub(X::load(sj + j * Mp + m0), mv)), inv);
              X::store(s.data() + j * Mp + m0, p);
              const auto dpv = X::sub(X::load(ds.data() + j * Mp + m0), Dv);
              X::store(ds.data() + j * Mp + m0, X::mul(X::mul(p, dpv), sv));
            }
          }
          for (int64_t r0 = 0; r0 < M; r0 += 4)  // dq[m] += sum_j ds[j][m] k[j]
            block_values(dq.data() + r0 * hd, hd, nullptr, ds.data() + r0, Mp, 1, kh + j0 * hd,
                         hd, n, hd);
          // dk[j] += sum_m ds[j][m] q[m] and dv[j] += sum_m p[j][m] g[m], four keys at a time;
          // the last few through `tail`, so that no row past the block is written.
          for (int64_t r0 = 0; r0 < n; r0 += 4) {
            const int64_t keys = std::min<int64_t>(4, n - r0);
            for (auto [from, rows_in, dst] : {std::tuple{ds.data(), qrow.data(), dkh},
                                              std::tuple{s.data(), grow.data(), dvh}}) {
              float* acc = dst + (j0 + r0) * hd;
              if (keys == 4) {
                block_values(acc, hd, nullptr, from + r0 * Mp, 1, Mp, rows_in, hd, M, hd);
                continue;
              }
              std::fill(tail.begin(), tail.end(), 0.0f);
              block_values(tail.data(), hd, nullptr, from + r0 * Mp, 1, Mp, rows_in, hd, M, hd);
              for (int64_t i = 0; i < keys * hd; i++) acc[i] += tail[i];
            }
          }
        }
        for (int64_t t = 0; t < rows; t++)
          for (int64_t r = 0; r < rep; r++)
            std::copy_n(dq.data() + (t * rep + r) * hd, hd,
                        dqp + ((b * nq + g * rep + r) * L + i0 + t) * hd);
      }
    }
  }
}

// softmax(scale q k^T [causal]) v: q (B, nq, L, hd) contiguous, keys and values rows of hd floats
// at strides (batch, head, row) = ks, vs, S of them; out (B, L, nq, hd).
void attend(const float* qp, const float* kp, std::array<int64_t, 3> ks, const float* vp,
            std::array<int64_t, 3> vs, float* op, int64_t B, int64_t nq, int64_t L, int64_t hd,
            int64_t nkv, int64_t S, float scale, bool causal) {
  if (L > 1) return attend_tiles(qp, kp, ks, vp, vs, op, B, nq, L, hd, nkv, S, scale, causal);
  // One row, decoding: it sees every key, masked or not. It has only a few (kv head) items, fewer
  // than the threads or unevenly many, so its keys go in spans of SPAN, each with its own softmax
  // state, merged at the end. The spans depend on the shape alone, so the result does not depend
  // on the thread count.
  const int64_t rep = nq / nkv, items = B * nkv, parts = (S + SPAN - 1) / SPAN;
  const int64_t units = items * parts;
  std::vector<float> partial(units * rep * (hd + 2));  // per span and head: m, l, the output
  const int threads = items * S * rep * hd < 65536 ? 1 : omp_get_max_threads();
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> block(rep * BLOCK), acc(rep * hd), m(rep), l(rep);
#pragma omp for schedule(dynamic, 1)
    for (int64_t unit = 0; unit < units; unit++) {
      const int64_t item = unit / parts, b = item / nkv, g = item % nkv;
      const float* kh = kp + b * ks[0] + g * ks[1];
      const float* vh = vp + b * vs[0] + g * vs[1];
      const int64_t begin = unit % parts * SPAN, end = std::min(S, begin + SPAN);
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0f);
      for (int64_t j0 = begin; j0 < end; j0 += BLOCK) {
        const int64_t n = std::min(BLOCK, end - j0);
        for (int64_t r = 0; r < rep; r++) {
          const float* qr = qp + (b * nq + g * rep + r) * hd;
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
        float* st = partial.data() + (unit * rep + r) * (hd + 2);
        st[0] = m[r];
        st[1] = l[r];
        std::copy_n(acc.data() + r * hd, hd, st + 2);
      }
    }
  }
  for (int64_t item = 0; item < items; item++) {
    const int64_t b = item / nkv, g = item % nkv;
    for (int64_t r = 0; r < rep; r++) {
      auto state = [&](int64_t p) { return partial.data() + ((item * parts + p) * rep + r) * (hd + 2); };
      float mx_all = -std::numeric_limits<float>::infinity(), total = 0;
      for (int64_t p = 0; p < parts; p++) mx_all = std::max(mx_all, state(p)[0]);
      float* o = op + (b * nq + g * rep + r) * hd;
      std::fill(o, o + hd, 0.0f);
      for (int64_t p = 0; p < parts; p++) {
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

}  // namespace

// dq, dk, dv of Attention from q, k, v, its output o (B, L, nq, hd) and o's cotangent g, in
// attention's tiles (attend_grad_tiles).
class AttentionGrad : public CpuPrimitive {
 public:
  AttentionGrad(mx::Stream s, float scale, bool causal)
      : CpuPrimitive(s, backward_reference(attention_reference(scale, causal, s), 3, 3)),
        scale_(scale), causal_(causal) {}
  const char* name() const override { return "OpenELMAttentionGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const AttentionGrad&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_;
  }

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    auto q = row_contiguous(inputs[0], enc);
    auto k = row_contiguous(inputs[1], enc);
    auto v = row_contiguous(inputs[2], enc);
    auto o = row_contiguous(inputs[3], enc);
    auto g = row_contiguous(inputs[4], enc);
    for (auto& a : outputs) alloc(a);
    const int64_t B = q.shape(0), nq = q.shape(1), L = q.shape(2), hd = q.shape(3);
    const int64_t nkv = k.shape(1), S = k.shape(2);
    enc.dispatch([qp = q.data<float>(), kp = k.data<float>(), vp = v.data<float>(),
                  op = o.data<float>(), gp = g.data<float>(), dqp = outputs[0].data<float>(),
                  dkp = outputs[1].data<float>(), dvp = outputs[2].data<float>(), B, nq, L, hd,
                  nkv, S, scale = scale_, causal = causal_]() {
      attend_grad_tiles(qp, kp, vp, op, gp, dqp, dkp, dvp, B, nq, L, hd, nkv, S, scale, causal);
    });
  }

 private:
  float scale_;
  bool causal_;
};

class Attention : public CpuPrimitive {
 public:
  Attention(mx::Stream s, float scale, bool causal)
      : CpuPrimitive(s, attention_reference(scale, causal, s)),
        scale_(scale), causal_(causal) {}
  const char* name() const override { return "OpenELMAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Attention&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_;
  }

  // The backward pass is a kernel too (AttentionGrad): MLX's would rebuild the score matrix and
  // differentiate its softmax one element at a time.
  std::vector<mx::array> grad_kernel(const std::vector<mx::array>& primals,
                                     const std::vector<mx::array>& cotangents,
                                     const std::vector<mx::array>& outputs) override {
    const auto& k = primals[1];
    return mx::array::make_arrays(
        {primals[0].shape(), k.shape(), k.shape()}, {mx::float32, mx::float32, mx::float32},
        std::make_shared<AttentionGrad>(stream(), scale_, causal_),
        {primals[0], primals[1], primals[2], outputs[0], cotangents[0]});
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

// ---- a KV cache of one buffer ----------------------------------------------------------------
//
// A decoding layer ran six graph nodes around its attention: the attention inputs (a three-output
// node), two slice updates of the cache, two slices of it and the attention. On a 2-core CPU each
// costs more in MLX's scheduling than in arithmetic. With keys and values in one buffer kv
// (B, 2, nkv, capacity, hd), two single-output nodes do it all: KVWrite writes the step's k and v
// rows into kv (in place: MLX donates the buffer to a single-output node once nothing else holds
// it), and CachedAttention prepares q itself and attends over kv's first offset + L rows.

// Inputs: kv, qkv, inv_freqs (the reference makes its own from base), and the k-norm weight.
class KVWrite : public CpuPrimitive {
 public:
  KVWrite(mx::Stream s, int nq, int nkv, bool k_norm, float eps, float base, int offset)
      : CpuPrimitive(s,
                     [=](const std::vector<mx::array>& in) {
                       auto h = split_heads_reference(in[1], nq, nkv, nullptr,
                                                      k_norm ? &in[3] : nullptr, eps, base, offset, s);
                       auto rows = mx::stack({h[1], h[2]}, 1, s);  // (B, 2, nkv, L, hd)
                       mx::Shape start(5, 0), stop = in[0].shape();
                       start[3] = offset;
                       stop[3] = offset + rows.shape(3);
                       return std::vector<mx::array>{mx::slice_update(in[0], rows, start, stop, s)};
                     }),
        nq_(nq), nkv_(nkv), k_norm_(k_norm), eps_(eps), base_(base), offset_(offset) {}
  const char* name() const override { return "OpenELMKVWrite"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const KVWrite&>(other);
    return nq_ == o.nq_ && nkv_ == o.nkv_ && k_norm_ == o.k_norm_ && eps_ == o.eps_ &&
           base_ == o.base_ && offset_ == o.offset_;
  }

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    const auto& kv = inputs[0];
    auto qkv = row_contiguous(inputs[1], enc), freqs = row_contiguous(inputs[2], enc);
    std::optional<mx::array> kw;
    if (k_norm_) kw = row_contiguous(inputs[3], enc);
    auto& out = outputs[0];
    const bool in_place = kv.is_donatable() && kv.flags().row_contiguous;
    const float* src = nullptr;
    if (in_place) {
      out.copy_shared_buffer(kv);
    } else {  // someone else still reads kv: write a copy
      auto c = row_contiguous(kv, enc);
      alloc(out);
      src = c.data<float>();
      enc.add_temporary(c);
    }
    const int64_t B = qkv.shape(0), L = qkv.shape(1), H = qkv.shape(2), hd = qkv.shape(3);
    const int64_t cap = kv.shape(3);
    enc.dispatch([src, dst = out.data<float>(), n = out.size(), x_in = qkv.data<float>(),
                  fp = freqs.data<float>(), kwp = kw ? kw->data<float>() : nullptr, B, L, H, hd,
                  cap, nq = int64_t(nq_), nkv = int64_t(nkv_), eps = eps_, offset = offset_]() {
      if (src) std::memcpy(dst, src, n * sizeof(float));
      std::vector<float> cos_t, sin_t, tmp(hd);
      rope_tables(fp, L, hd / 2, offset, cos_t, sin_t);
      for (int64_t b = 0; b < B; b++)
        for (int64_t l = 0; l < L; l++) {
          const float* row = x_in + (b * L + l) * H * hd;
          const float *c = cos_t.data() + l * (hd / 2), *sn = sin_t.data() + l * (hd / 2);
          for (int64_t h = 0; h < nkv; h++) {
            float* kdst = dst + (((b * 2 + 0) * nkv + h) * cap + offset + l) * hd;
            float* vdst = dst + (((b * 2 + 1) * nkv + h) * cap + offset + l) * hd;
            norm_and_rotate(row + (nq + h) * hd, kwp, eps, c, sn, hd, tmp.data(), kdst);
            std::memcpy(vdst, row + (nq + nkv + h) * hd, hd * sizeof(float));
          }
        }
    });
  }

 private:
  int nq_, nkv_;
  bool k_norm_;
  float eps_, base_;
  int offset_;
};

// Inputs: qkv, kv (after this step's KVWrite), inv_freqs, and the q-norm weight.
class CachedAttention : public CpuPrimitive {
 public:
  CachedAttention(mx::Stream s, int nq, int nkv, bool q_norm, float eps, float base, int offset,
                  float scale)
      : CpuPrimitive(s,
                     [=](const std::vector<mx::array>& in) {
                       auto q = split_heads_reference(in[0], nq, nkv, q_norm ? &in[3] : nullptr,
                                                      nullptr, eps, base, offset, s)[0];
                       const auto& kv = in[1];
                       const int B = kv.shape(0), hd = kv.shape(4), L = in[0].shape(1);
                       auto part = [&](int i) {
                         return mx::squeeze(
                             mx::slice(kv, {0, i, 0, 0, 0}, {B, i + 1, nkv, offset + L, hd}, s), 1, s);
                       };
                       auto o = mx::fast::scaled_dot_product_attention(
                           q, part(0), part(1), scale, L > 1 ? "causal" : "", {}, {}, false, s);
                       return std::vector<mx::array>{
                           mx::reshape(mx::transpose(o, {0, 2, 1, 3}, s), {B, L, nq * hd}, s)};
                     }),
        nq_(nq), nkv_(nkv), q_norm_(q_norm), eps_(eps), base_(base), offset_(offset),
        scale_(scale) {}
  const char* name() const override { return "OpenELMCachedAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const CachedAttention&>(other);
    return nq_ == o.nq_ && nkv_ == o.nkv_ && q_norm_ == o.q_norm_ && eps_ == o.eps_ &&
           base_ == o.base_ && offset_ == o.offset_ && scale_ == o.scale_;
  }

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    auto qkv = row_contiguous(inputs[0], enc), kv = row_contiguous(inputs[1], enc);
    auto freqs = row_contiguous(inputs[2], enc);
    std::optional<mx::array> qw;
    if (q_norm_) qw = row_contiguous(inputs[3], enc);
    auto& out = outputs[0];
    alloc(out);
    const int64_t B = qkv.shape(0), L = qkv.shape(1), H = qkv.shape(2), hd = qkv.shape(3);
    const auto st = kv.strides();
    enc.dispatch([x_in = qkv.data<float>(), kvp = kv.data<float>(), fp = freqs.data<float>(),
                  qwp = qw ? qw->data<float>() : nullptr, op = out.data<float>(), st, B, L, H, hd,
                  nq = int64_t(nq_), nkv = int64_t(nkv_), eps = eps_, offset = offset_,
                  scale = scale_]() {
      std::vector<float> cos_t, sin_t, tmp(hd), q(B * nq * L * hd);
      rope_tables(fp, L, hd / 2, offset, cos_t, sin_t);
      for (int64_t b = 0; b < B; b++)
        for (int64_t l = 0; l < L; l++)
          for (int64_t h = 0; h < nq; h++)
            norm_and_rotate(x_in + ((b * L + l) * H + h) * hd, qwp, eps,
                            cos_t.data() + l * (hd / 2), sin_t.data() + l * (hd / 2), hd,
                            tmp.data(), q.data() + ((b * nq + h) * L + l) * hd);
      attend(q.data(), kvp, {st[0], st[2], st[3]}, kvp + st[1], {st[0], st[2], st[3]}, op, B, nq,
             L, hd, nkv, offset + L, scale, L > 1);
    });
  }

 private:
  int nq_, nkv_;
  bool q_norm_;
  float eps_, base_;
  int offset_;
  float scale_;
};

namespace {

std::vector<mx::array> cache_inputs(const char* op, const mx::array& qkv, const mx::array& kv,
                                    int n_heads, int n_kv_heads,
                                    const std::optional<mx::array>& norm_weight,
                                    const mx::array& inv_freqs, int offset) {
  check_heads(op, qkv, n_heads, n_kv_heads, inv_freqs);
  const std::string at = std::string(op) + ": ";
  const int B = qkv.shape(0), L = qkv.shape(1), hd = qkv.shape(3);
  require(kv.dtype() == mx::float32 && kv.ndim() == 5 && kv.shape(0) == B && kv.shape(1) == 2 &&
              kv.shape(2) == n_kv_heads && kv.shape(4) == hd,
          at + "kv must be float32 (B, 2, n_kv_heads, capacity, head_dim)");
  require(offset >= 0 && offset + L <= kv.shape(3), at + "offset + L must fit the capacity");
  std::vector<mx::array> in = {qkv, kv, inv_freqs};
  if (norm_weight) {
    require(norm_weight->dtype() == mx::float32 && norm_weight->shape() == mx::Shape{hd},
            at + "the norm weight must be float32 (head_dim,)");
    in.push_back(*norm_weight);
  }
  return in;
}

}  // namespace

mx::array kv_write(const mx::array& kv, const mx::array& qkv, int n_heads, int n_kv_heads,
                   const std::optional<mx::array>& k_weight, float eps, const mx::array& inv_freqs,
                   float base, int offset, mx::StreamOrDevice s) {
  auto in = cache_inputs("kv_write", qkv, kv, n_heads, n_kv_heads, k_weight, inv_freqs, offset);
  std::swap(in[0], in[1]);  // kv first
  return mx::array(kv.shape(), mx::float32,
                   std::make_shared<KVWrite>(cpu_stream(s), n_heads, n_kv_heads, bool(k_weight),
                                             eps, base, offset),
                   std::move(in));
}

mx::array cached_attention(const mx::array& qkv, const mx::array& kv, int n_heads, int n_kv_heads,
                           const std::optional<mx::array>& q_weight, float eps,
                           const mx::array& inv_freqs, float base, int offset, float scale,
                           mx::StreamOrDevice s) {
  auto in = cache_inputs("cached_attention", qkv, kv, n_heads, n_kv_heads, q_weight, inv_freqs,
                         offset);
  return mx::array({qkv.shape(0), qkv.shape(1), n_heads * qkv.shape(3)}, mx::float32,
                   std::make_shared<CachedAttention>(cpu_stream(s), n_heads, n_kv_heads,
                                                     bool(q_weight), eps, base, offset, scale),
                   std::move(in));
}

}  // namespace oe
