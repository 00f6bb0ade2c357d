// A KV cache of one buffer: the step's keys and values written in place, and attention that
// prepares its own q over the cache (kv_cache.py), two graph nodes a decoding layer.
#include "attention.h"

namespace oe {

// ---- a KV cache of one buffer ----------------------------------------------------------------
//
// A decoding layer ran six graph nodes around its attention: the attention inputs (a three-output
// node), two slice updates of the cache, two slices of it and the attention. On a 2-core CPU each
// costs more in MLX's scheduling than in arithmetic. With keys and values in one buffer kv
// (B, 2, nkv, capacity, hd), two single-output nodes do it all: KVWrite writes the step's k and v
// rows into kv (in place: MLX donates the buffer to a single-output node once nothing else holds
// it), and CachedAttention prepares q itself and attends over kv's first offset + L rows.

// Inputs: kv, qkv, inv_freqs (the reference makes its own from base), and the k-norm weight. With
// row >= 0, kv holds one sequence and takes qkv's row `row` (the server's batch: rows_attention).
class KVWrite : public Kernel<KVWrite> {
 public:
  KVWrite(mx::Stream s, int nq, int nkv, bool k_norm, float eps, float base, int offset, int row)
      : Kernel(s,
                     [=](const std::vector<mx::array>& in) {
                       auto qkv = row < 0 ? in[1] : mx::slice(in[1], {row, 0, 0, 0},
                                                               {row + 1, in[1].shape(1), in[1].shape(2), in[1].shape(3)}, s);
                       auto h = split_heads_reference(qkv, nq, nkv, nullptr,
                                                      k_norm ? &in[3] : nullptr, eps, base, offset, s);
                       auto rows = mx::stack({h[1], h[2]}, 1, s);  // (B, 2, nkv, L, hd)
                       mx::Shape start(5, 0), stop = in[0].shape();
                       start[3] = offset;
                       stop[3] = offset + rows.shape(3);
                       return std::vector<mx::array>{mx::slice_update(in[0], rows, start, stop, s)};
                     }),
        nq_(nq), nkv_(nkv), k_norm_(k_norm), eps_(eps), base_(base), offset_(offset), row_(row) {}
  const char* name() const override { return "OpenELMKVWrite"; }
  auto state() const { return std::tuple(nq_, nkv_, k_norm_, eps_, base_, offset_, row_); }

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
    const int64_t B = kv.shape(0), L = qkv.shape(1), H = qkv.shape(2), hd = qkv.shape(3);
    const int64_t cap = kv.shape(3), first = std::max(row_, 0);
    enc.dispatch([src, dst = out.data<float>(), n = out.size(),
                  x_in = qkv.data<float>() + first * L * H * hd, fp = freqs.data<float>(),
                  kwp = kw ? kw->data<float>() : nullptr, B, L, H, hd, cap, nq = int64_t(nq_),
                  nkv = int64_t(nkv_), eps = eps_, offset = offset_]() {
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
  int offset_, row_;
};

namespace {

// What CachedAttention and RowsAttention compute, in MLX ops: qkv's q rows (q-normed, rotated
// from `offset`) over kv's first offset + L positions, causal; (B, L, nq * hd).
mx::array cache_attention_reference(const mx::array& qkv, const mx::array& kv, int nq, int nkv,
                                    const mx::array* q_weight, float eps, float base, int offset,
                                    float scale, mx::Stream s) {
  auto q = split_heads_reference(qkv, nq, nkv, q_weight, nullptr, eps, base, offset, s)[0];
  const int B = kv.shape(0), hd = kv.shape(4), L = qkv.shape(1);
  auto part = [&](int i) {
    return mx::squeeze(mx::slice(kv, {0, i, 0, 0, 0}, {B, i + 1, nkv, offset + L, hd}, s), 1, s);
  };
  auto o = mx::fast::scaled_dot_product_attention(q, part(0), part(1), scale,
                                                  L > 1 ? "causal" : "", {}, {}, false, s);
  return mx::reshape(mx::transpose(o, {0, 2, 1, 3}, s), {B, L, nq * hd}, s);
}

}  // namespace

// Inputs: qkv, kv (after this step's KVWrite), inv_freqs, and the q-norm weight.
class CachedAttention : public Kernel<CachedAttention> {
 public:
  CachedAttention(mx::Stream s, int nq, int nkv, bool q_norm, float eps, float base, int offset,
                  float scale)
      : Kernel(s,
                     [=](const std::vector<mx::array>& in) {
                       return std::vector<mx::array>{cache_attention_reference(
                           in[0], in[1], nq, nkv, q_norm ? &in[3] : nullptr, eps, base, offset,
                           scale, s)};
                     }),
        nq_(nq), nkv_(nkv), q_norm_(q_norm), eps_(eps), base_(base), offset_(offset),
        scale_(scale) {}
  const char* name() const override { return "OpenELMCachedAttention"; }
  auto state() const { return std::tuple(nq_, nkv_, q_norm_, eps_, base_, offset_, scale_); }

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

// Inputs: qkv (B, 1, heads, hd), inv_freqs, the q-norm weight (when given), then each row's kv
// (1, 2, nkv, capacity, hd) after its KVWrite: row b's query (position offsets[b]) over its first
// offsets[b] + 1 keys, all rows in one node and one pass of the threads (attend_rows).
class RowsAttention : public Kernel<RowsAttention> {
 public:
  RowsAttention(mx::Stream s, int nq, int nkv, bool q_norm, float eps, float base,
                std::vector<int> offsets, float scale)
      : Kernel(s,
                     [=](const std::vector<mx::array>& in) {
                       const int B = in[0].shape(0), H = in[0].shape(2), hd = in[0].shape(3);
                       const int first_kv = q_norm ? 3 : 2;
                       std::vector<mx::array> outs;
                       for (int b = 0; b < B; b++) {
                         auto qkv = mx::slice(in[0], {b, 0, 0, 0}, {b + 1, 1, H, hd}, s);
                         outs.push_back(cache_attention_reference(
                             qkv, in[first_kv + b], nq, nkv, q_norm ? &in[2] : nullptr, eps, base,
                             offsets[b], scale, s));
                       }
                       return std::vector<mx::array>{mx::concatenate(outs, 0, s)};
                     }),
        nq_(nq), nkv_(nkv), q_norm_(q_norm), eps_(eps), base_(base), offsets_(std::move(offsets)),
        scale_(scale) {}
  const char* name() const override { return "OpenELMRowsAttention"; }
  auto state() const { return std::tuple(nq_, nkv_, q_norm_, eps_, base_, offsets_, scale_); }

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    auto qkv = row_contiguous(inputs[0], enc), freqs = row_contiguous(inputs[1], enc);
    std::optional<mx::array> qw;
    if (q_norm_) qw = row_contiguous(inputs[2], enc);
    std::vector<mx::array> kvs;
    for (size_t i = q_norm_ ? 3 : 2; i < inputs.size(); i++)
      kvs.push_back(row_contiguous(inputs[i], enc));
    auto& out = outputs[0];
    alloc(out);
    const int64_t H = qkv.shape(2), hd = qkv.shape(3), nq = nq_, nkv = nkv_;
    std::vector<DecodeRow> rows;
    for (size_t b = 0; b < kvs.size(); b++) {
      const auto st = kvs[b].strides();
      const float* k = kvs[b].data<float>();
      rows.push_back({nullptr, k, k + st[1], {st[2], st[3]}, {st[2], st[3]}, offsets_[b] + 1,
                      out.data<float>() + b * nq * hd});
    }
    enc.dispatch([x_in = qkv.data<float>(), fp = freqs.data<float>(),
                  qwp = qw ? qw->data<float>() : nullptr, rows, H, hd, nq, nkv, eps = eps_,
                  offsets = offsets_, scale = scale_]() mutable {
      std::vector<float> cos_t, sin_t, tmp(hd), q(rows.size() * nq * hd);
      for (size_t b = 0; b < rows.size(); b++) {
        rope_tables(fp, 1, hd / 2, offsets[b], cos_t, sin_t);
        for (int64_t h = 0; h < nq; h++)
          norm_and_rotate(x_in + (b * H + h) * hd, qwp, eps, cos_t.data(), sin_t.data(), hd,
                          tmp.data(), q.data() + (b * nq + h) * hd);
        rows[b].q = q.data() + b * nq * hd;
      }
      attend_rows(rows, nq, nkv, hd, scale);
    });
  }

 private:
  int nq_, nkv_;
  bool q_norm_;
  float eps_, base_;
  std::vector<int> offsets_;
  float scale_;
};

namespace {

// kv for qkv's batch (row < 0) or for its row `row` alone.
void check_cache(const std::string& at, const mx::array& qkv, const mx::array& kv, int n_kv_heads,
                 int offset, int row) {
  const int B = row < 0 ? qkv.shape(0) : 1, L = qkv.shape(1), hd = qkv.shape(3);
  require(row < qkv.shape(0), at + "row must be one of qkv's");
  require(kv.dtype() == mx::float32 && kv.ndim() == 5 && kv.shape(0) == B && kv.shape(1) == 2 &&
              kv.shape(2) == n_kv_heads && kv.shape(4) == hd,
          at + "kv must be float32 (B, 2, n_kv_heads, capacity, head_dim)");
  require(offset >= 0 && offset + L <= kv.shape(3), at + "offset + L must fit the capacity");
}

void check_norm(const std::string& at, const std::optional<mx::array>& norm_weight, int hd) {
  require(!norm_weight || (norm_weight->dtype() == mx::float32 && norm_weight->shape() == mx::Shape{hd}),
          at + "the norm weight must be float32 (head_dim,)");
}

std::vector<mx::array> cache_inputs(const char* op, const mx::array& qkv, const mx::array& kv,
                                    int n_heads, int n_kv_heads,
                                    const std::optional<mx::array>& norm_weight,
                                    const mx::array& inv_freqs, int offset, int row = -1) {
  check_heads(op, qkv, n_heads, n_kv_heads, inv_freqs);
  const std::string at = std::string(op) + ": ";
  check_cache(at, qkv, kv, n_kv_heads, offset, row);
  check_norm(at, norm_weight, qkv.shape(3));
  std::vector<mx::array> in = {qkv, kv, inv_freqs};
  if (norm_weight) in.push_back(*norm_weight);
  return in;
}

}  // namespace

mx::array kv_write(const mx::array& kv, const mx::array& qkv, int n_heads, int n_kv_heads,
                   const std::optional<mx::array>& k_weight, float eps, const mx::array& inv_freqs,
                   float base, int offset, int row, mx::StreamOrDevice s) {
  auto in = cache_inputs("kv_write", qkv, kv, n_heads, n_kv_heads, k_weight, inv_freqs, offset,
                         row);
  std::swap(in[0], in[1]);  // kv first
  return mx::array(kv.shape(), mx::float32,
                   std::make_shared<KVWrite>(cpu_stream(s), n_heads, n_kv_heads, bool(k_weight),
                                             eps, base, offset, row),
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

mx::array rows_attention(const mx::array& qkv, const std::vector<mx::array>& kvs,
                         const std::vector<int>& offsets, int n_heads, int n_kv_heads,
                         const std::optional<mx::array>& q_weight, float eps,
                         const mx::array& inv_freqs, float base, float scale,
                         mx::StreamOrDevice s) {
  check_heads("rows_attention", qkv, n_heads, n_kv_heads, inv_freqs);
  const std::string at = "rows_attention: ";
  require(qkv.shape(1) == 1, at + "one query a row (qkv (B, 1, heads, head_dim))");
  require(kvs.size() == size_t(qkv.shape(0)) && offsets.size() == kvs.size(),
          at + "one kv and one offset for each of qkv's rows");
  check_norm(at, q_weight, qkv.shape(3));
  std::vector<mx::array> in = {qkv, inv_freqs};
  if (q_weight) in.push_back(*q_weight);
  for (size_t b = 0; b < kvs.size(); b++) {
    check_cache(at, qkv, kvs[b], n_kv_heads, offsets[b], int(b));
    in.push_back(kvs[b]);
  }
  return mx::array({qkv.shape(0), 1, n_heads * qkv.shape(3)}, mx::float32,
                   std::make_shared<RowsAttention>(cpu_stream(s), n_heads, n_kv_heads,
                                                   bool(q_weight), eps, base, offsets, scale),
                   std::move(in));
}

}  // namespace oe
