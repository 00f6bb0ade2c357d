// Attention's backward pass, in the forward's tiles of query vectors (attention.h): MLX's would
// rebuild the score matrix and differentiate its softmax one element at a time.
#include <tuple>

#include "attention.h"

namespace oe {

namespace {

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
  ThreadPool::get().run(ThreadPool::threads(), groups, [&](int64_t item) {
    std::vector<float> qt(hd * Mp), gt(hd * Mp), ot(hd * Mp), qrow(Mp * hd), grow(Mp * hd),
        s(BLOCK * Mp), ds(BLOCK * Mp), dq(Mp * hd), tail(4 * hd), m(Mp), l(Mp), c(Mp), D(Mp),
        scores(S * Mp);
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
  });
}

// dq, dk, dv of Attention from q, k, v, its output o (B, L, nq, hd) and o's cotangent g, in
// attention's tiles (attend_grad_tiles).
class AttentionGrad : public Kernel<AttentionGrad> {
 public:
  AttentionGrad(mx::Stream s, float scale, bool causal)
      : Kernel(s, backward_reference(attention_reference(scale, causal, s), 3, 3)),
        scale_(scale), causal_(causal) {}
  const char* name() const override { return "OpenELMAttentionGrad"; }
  auto state() const { return std::tuple(scale_, causal_); }

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    const auto in = row_major(inputs, enc);
    const auto &q = in[0], &k = in[1], &v = in[2], &o = in[3], &g = in[4];
    alloc(outputs);
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

}  // namespace

std::vector<mx::array> attention_grad(const std::vector<mx::array>& primals,
                                      const std::vector<mx::array>& cotangents,
                                      const std::vector<mx::array>& outputs, float scale,
                                      bool causal, mx::Stream s) {
  const auto& k = primals[1];
  return mx::array::make_arrays(
      {primals[0].shape(), k.shape(), k.shape()}, {mx::float32, mx::float32, mx::float32},
      std::make_shared<AttentionGrad>(s, scale, causal),
      {primals[0], primals[1], primals[2], outputs[0], cotangents[0]});
}

}  // namespace oe
