// The pieces that attention's files share: the tiles of query vectors that a prefill and the
// backward pass work in (attention.cpp, attention_backward.cpp), and the attention that the KV
// cache's kernel runs (kv_cache.cpp).
#pragma once

#include <algorithm>
#include <array>
#include <limits>

#include "kernels.h"

namespace oe {

constexpr int64_t BLOCK = 64;  // keys per softmax block

// ---- prefill and training: tiles of query vectors -------------------------------------------
//
// Row by row, a prefill would meet each key once per query row and head, in a dot product that
// ends in a horizontal sum. Instead a tile of query vectors (the heads of a GQA group times a few
// rows) is held transposed, so each key row meets the whole tile in plain FMAs, a small matrix
// product scores[key][query]; the online softmax then runs down the columns, a vector of queries
// at a time, and each value row is added into all the tile's outputs at once. On the Xeon VM, 12
// query heads over 3 key heads and 512 causal rows: 4.2 ms row by row, 1.7 with tiles of 16-float
// vectors, 2.8 with 8-float ones (PyTorch's SDPA: 3.2). The backward pass uses the same pieces.

constexpr int64_t TILE_VECTORS = 32;  // query vectors per tile, at least (rounded up to 2 vectors)

// The tile products are written once for VecW (vec.h): 16 floats where the CPU has AVX-512
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
    T = std::max<int64_t>(1, TILE_VECTORS / rep);
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

// softmax(scale q k^T [causal]) v: q (B, nq, L, hd) contiguous, keys and values rows of hd floats
// at strides (batch, head, row) = ks, vs, S of them; out (B, L, nq, hd).
void attend(const float* qp, const float* kp, std::array<int64_t, 3> ks, const float* vp,
            std::array<int64_t, 3> vs, float* op, int64_t B, int64_t nq, int64_t L, int64_t hd,
            int64_t nkv, int64_t S, float scale, bool causal);

// One decoding query (all its heads) over keys and values of its own: q and out (nq, hd), key and
// value rows of hd floats at strides (head, row), S of them.
struct DecodeRow {
  const float* q;
  const float* k;
  const float* v;
  std::array<int64_t, 2> ks, vs;
  int64_t S;
  float* out;
};

// attend() for rows of one query each, of any lengths, in one pass of the threads: a row's
// output is the same bits alone or beside others (the server's batched decode step).
void attend_rows(const std::vector<DecodeRow>& rows, int64_t nq, int64_t nkv, int64_t hd,
                 float scale);

// q, k, v (B, heads, L or S, hd) -> (B, L, nq, hd) in MLX ops.
Reference attention_reference(float scale, bool causal, mx::Stream s);

// dq, dk, dv of `attention` from its inputs, output and the output's cotangent (a kernel).
std::vector<mx::array> attention_grad(const std::vector<mx::array>& primals,
                                      const std::vector<mx::array>& cotangents,
                                      const std::vector<mx::array>& outputs, float scale,
                                      bool causal, mx::Stream s);

}  // namespace oe
