// RMSNorm, the SiLU gate and the attention inputs (split, q/k-norm, RoPE) as one pass each.
//
// On the CPU MLX runs RMSNorm and RoPE as graphs of separate ops, and exp one element at a time;
// per layer that is dozens of small passes over the activations.
#include "kernels.h"

namespace oe {

namespace {

// RMSNorm's backward over one row: with u = x r, dx = r (du - u mean(u du)) for du = g w, and
// g u added into dw (the weight's gradient, summed over rows by the caller).
inline void rms_row_backward(const float* x, const float* w, const float* g, float* dx, float* dw,
                             int64_t D, float eps) {
  float ss = 0;
  for (int64_t i = 0; i < D; i++) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / float(D) + eps);
  float dot = 0;
  for (int64_t i = 0; i < D; i++) {
    const float u = x[i] * r;
    dw[i] += g[i] * u;
    dot += g[i] * w[i] * u;
  }
  dot /= float(D);
  for (int64_t i = 0; i < D; i++) dx[i] = r * (g[i] * w[i] - x[i] * r * dot);
}

}  // namespace

static Reference rms_norm_reference(mx::Stream s, float eps) {
  return [s, eps](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{mx::fast::rms_norm(in[0], in[1], eps, s)};
  };
}

// d x and d weight of RMSNorm from x, weight and the cotangent (`rms_row_backward` per row,
// d weight summed by `sum_over_rows`).
class RMSNormGrad : public Kernel<RMSNormGrad> {
 public:
  RMSNormGrad(mx::Stream s, float eps)
      : Kernel(s, backward_reference(rms_norm_reference(s, eps), 2, 2)), eps_(eps) {}
  const char* name() const override { return "OpenELMRMSNormGrad"; }
  auto state() const { return std::tuple(eps_); }

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    const auto in = row_major(inputs, enc);
    const auto &x = in[0], &w = in[1], &g = in[2];
    alloc(outputs);
    const int64_t D = x.shape(-1), rows = x.size() / D;
    enc.dispatch([xp = x.data<float>(), wp = w.data<float>(), gp = g.data<float>(),
                  dxp = outputs[0].data<float>(), dwp = outputs[1].data<float>(), D, rows,
                  eps = eps_]() {
      sum_over_rows(rows, D, dwp, [&](int64_t r0, int64_t r1, float* dw) {
        for (int64_t r = r0; r < r1; r++)
          rms_row_backward(xp + r * D, wp, gp + r * D, dxp + r * D, dw, D, eps);
      });
    });
  }

 private:
  float eps_;
};

class RMSNorm : public Kernel<RMSNorm> {
 public:
  RMSNorm(mx::Stream s, float eps) : Kernel(s, rms_norm_reference(s, eps)), eps_(eps) {}
  const char* name() const override { return "OpenELMRMSNorm"; }
  auto state() const { return std::tuple(eps_); }

  std::vector<mx::array> grad_kernel(const std::vector<mx::array>& primals,
                                     const std::vector<mx::array>& cotangents,
                                     const std::vector<mx::array>&) override {
    return mx::array::make_arrays({primals[0].shape(), primals[1].shape()},
                                  {mx::float32, mx::float32},
                                  std::make_shared<RMSNormGrad>(stream(), eps_),
                                  {primals[0], primals[1], cotangents[0]});
  }

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    auto x = row_contiguous(inputs[0], enc), w = row_contiguous(inputs[1], enc);
    auto& out = outputs[0];
    alloc(out);
    int64_t D = x.shape(-1), rows = x.size() / D;
    enc.dispatch([xp = x.data<float>(), wp = w.data<float>(), op = out.data<float>(), D, rows,
                  eps = eps_]() {
      parallel_for(rows, std::max<int64_t>(1, 16384 / D), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++) rms_row(xp + r * D, wp, op + r * D, D, eps);
      });
    });
  }

 private:
  float eps_;
};

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s) {
  require(x.dtype() == mx::float32 && weight.dtype() == mx::float32, "rms_norm: float32 only");
  require(weight.ndim() == 1 && x.ndim() >= 1 && x.shape(-1) == weight.shape(0),
          "rms_norm: weight must be (D,) for x (..., D)");
  return mx::array(x.shape(), mx::float32, std::make_shared<RMSNorm>(cpu_stream(s), eps),
                   {x, weight});
}

static Reference silu_gate_reference(mx::Stream s) {
  return [s](const std::vector<mx::array>& in) {
    auto halves = mx::split(in[0], 2, -1, s);  // the first half is the gate
    auto& a = halves[0];
    return std::vector<mx::array>{mx::multiply(mx::multiply(a, mx::sigmoid(a, s), s), halves[1], s)};
  };
}

// d/dx of silu(a) * b, for x = [a, b] and the cotangent g: [g b s (1 + a (1 - s)), g a s] with
// s = sigmoid(a). MLX's own backward runs the sigmoid and its products one element at a time.
class SiluGateGrad : public Kernel<SiluGateGrad> {
 public:
  explicit SiluGateGrad(mx::Stream s)
      : Kernel(s, backward_reference(silu_gate_reference(s), 1, 1)) {}
  const char* name() const override { return "OpenELMSiluGateGrad"; }
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    auto x = row_contiguous(inputs[0], enc);
    auto g = row_contiguous(inputs[1], enc);
    auto& out = outputs[0];
    alloc(out);
    int64_t F = g.shape(-1), rows = g.size() / F;
    enc.dispatch([xp = x.data<float>(), gp = g.data<float>(), op = out.data<float>(), F, rows]() {
      parallel_for(rows, std::max<int64_t>(1, 16384 / F), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++) {
          const float *a = xp + r * 2 * F, *b = a + F, *gr = gp + r * F;
          float *da = op + r * 2 * F, *db = da + F;
          each_vec(F, [&]<class X>(X, int64_t k) {
            const auto av = X::load(a + k), sig = sigmoid<X>(av), gs = X::mul(X::load(gr + k), sig);
            const auto t = X::fma(av, X::sub(X::set(1.0f), sig), X::set(1.0f));
            X::store(da + k, X::mul(X::mul(gs, X::load(b + k)), t));
            X::store(db + k, X::mul(gs, av));
          });
        }
      });
    });
  }
};

class SiluGate : public Kernel<SiluGate> {
 public:
  explicit SiluGate(mx::Stream s)
      : Kernel(s, silu_gate_reference(s)) {}
  const char* name() const override { return "OpenELMSiluGate"; }
  std::vector<mx::array> grad_kernel(const std::vector<mx::array>& primals,
                                     const std::vector<mx::array>& cotangents,
                                     const std::vector<mx::array>&) override {
    return {mx::array(primals[0].shape(), mx::float32, std::make_shared<SiluGateGrad>(stream()),
                      {primals[0], cotangents[0]})};
  }

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    auto x = row_contiguous(inputs[0], enc);
    auto& out = outputs[0];
    alloc(out);
    int64_t F = out.shape(-1), rows = out.size() / F;
    enc.dispatch([xp = x.data<float>(), op = out.data<float>(), F, rows]() {
      parallel_for(rows, std::max<int64_t>(1, 16384 / F), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++) silu_gate_row(xp + r * 2 * F, op + r * F, F);
      });
    });
  }
};

mx::array silu_gate(const mx::array& x, mx::StreamOrDevice s) {
  require(x.dtype() == mx::float32, "silu_gate: float32 only");
  require(x.ndim() >= 1 && x.shape(-1) % 2 == 0, "silu_gate: the last axis must be even");
  auto shape = x.shape();
  shape.back() /= 2;
  return mx::array(shape, mx::float32, std::make_shared<SiluGate>(cpu_stream(s)), {x});
}

std::vector<mx::array> split_heads_reference(const mx::array& qkv, int nq, int nkv,
                                             const mx::array* q_weight, const mx::array* k_weight,
                                             float eps, float base, int offset, mx::Stream s) {
  auto heads = mx::split(mx::transpose(qkv, {0, 2, 1, 3}, s), {nq, nq + nkv}, 1, s);
  const int hd = qkv.shape(3);
  auto rotate = [&](mx::array x, const mx::array* w) {
    if (w) x = mx::fast::rms_norm(x, *w, eps, s);
    return mx::fast::rope(x, hd, false, base, 1.0f, offset, {}, s);
  };
  return {rotate(heads[0], q_weight), rotate(heads[1], k_weight), heads[2]};
}

void check_heads(const char* op, const mx::array& qkv, int n_heads, int n_kv_heads,
                 const mx::array& inv_freqs) {
  const std::string at = std::string(op) + ": ";
  require(qkv.dtype() == mx::float32 && inv_freqs.dtype() == mx::float32, at + "float32 only");
  require(qkv.ndim() == 4 && qkv.shape(2) == n_heads + 2 * n_kv_heads && qkv.shape(3) % 2 == 0,
          at + "qkv must be (B, L, n_heads + 2 n_kv_heads, head_dim)");
  require(inv_freqs.ndim() == 1 && inv_freqs.shape(0) == qkv.shape(3) / 2,
          at + "inv_freqs must be (head_dim / 2,)");
}

// Inputs: qkv, inv_freqs (the kernel's angles; the reference makes its own from base), and the
// q/k norm weights when there are norms.
static Reference attention_inputs_reference(mx::Stream s, int nq, int nkv, bool qk_norm, float eps,
                                            float base, int offset) {
  return [=](const std::vector<mx::array>& in) {
    return split_heads_reference(in[0], nq, nkv, qk_norm ? &in[2] : nullptr,
                                 qk_norm ? &in[3] : nullptr, eps, base, offset, s);
  };
}

// The gradients of AttentionInputs: d qkv, and d q_weight, d k_weight when there are norms. Inputs:
// the forward's, then the cotangents of q, k and v. Per head row: RoPE's rotation backwards, then
// RMSNorm's backward; the weights' gradients are summed by `sum_over_rows`.
class AttentionInputsGrad : public Kernel<AttentionInputsGrad> {
 public:
  AttentionInputsGrad(mx::Stream s, Reference forward, int nq, int nkv, bool qk_norm, float eps,
                      int offset)
      : Kernel(s, [forward, qk_norm](const std::vector<mx::array>& in) {
          // In qkv and the norm weights; inv_freqs (input 1) is a constant.
          const size_t n = qk_norm ? 4 : 2;
          return vjp_in(forward, {in.begin(), in.begin() + n},
                        qk_norm ? std::vector<int>{0, 2, 3} : std::vector<int>{0},
                        {in.begin() + n, in.end()});
        }),
        nq_(nq), nkv_(nkv), qk_norm_(qk_norm), eps_(eps), offset_(offset) {}
  const char* name() const override { return "OpenELMAttentionInputsGrad"; }
  auto state() const { return std::tuple(nq_, nkv_, qk_norm_, eps_, offset_); }

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    const size_t n = qk_norm_ ? 4 : 2;
    const auto in = row_major(inputs, enc);
    alloc(outputs);
    const int64_t B = in[0].shape(0), L = in[0].shape(1), H = in[0].shape(2), hd = in[0].shape(3);
    enc.dispatch([src = in[0].data<float>(), fp = in[1].data<float>(),
                  qwp = qk_norm_ ? in[2].data<float>() : nullptr,
                  kwp = qk_norm_ ? in[3].data<float>() : nullptr, dqp = in[n].data<float>(),
                  dkp = in[n + 1].data<float>(), dvp = in[n + 2].data<float>(),
                  dxp = outputs[0].data<float>(),
                  dqwp = qk_norm_ ? outputs[1].data<float>() : nullptr,
                  dkwp = qk_norm_ ? outputs[2].data<float>() : nullptr, B, L, H, hd,
                  nq = int64_t(nq_), nkv = int64_t(nkv_), eps = eps_, offset = offset_]() {
      const int64_t half = hd / 2, rows = B * L;
      std::vector<float> cos_t, sin_t;
      rope_tables(fp, L, half, offset, cos_t, sin_t);
      // The weights' gradients side by side: d q_weight, then d k_weight (none without norms).
      const int64_t width = qwp ? 2 * hd : 0;
      std::vector<float> dws(width);
      sum_over_rows(rows, width, dws.data(), [&](int64_t r0, int64_t r1, float* dw_q) {
        float* dw_k = qwp ? dw_q + hd : nullptr;
        std::vector<float> dn(hd);
        for (int64_t r = r0; r < r1; r++) {
          const int64_t b = r / L, l = r % L;
          const float *co = cos_t.data() + l * half, *sn = sin_t.data() + l * half;
          for (int64_t h = 0; h < H; h++) {
            const float* x = src + (r * H + h) * hd;
            float* dx = dxp + (r * H + h) * hd;
            const float* dy;
            if (h < nq) dy = dqp + ((b * nq + h) * L + l) * hd;
            else if (h < nq + nkv) dy = dkp + ((b * nkv + h - nq) * L + l) * hd;
            else {
              std::memcpy(dx, dvp + ((b * nkv + h - nq - nkv) * L + l) * hd, hd * sizeof(float));
              continue;
            }
            float* out = qwp ? dn.data() : dx;  // RoPE's rotation, backwards
            for (int64_t i = 0; i < half; i++) {
              out[i] = dy[i] * co[i] + dy[i + half] * sn[i];
              out[i + half] = dy[i + half] * co[i] - dy[i] * sn[i];
            }
            if (!qwp) continue;
            if (h < nq) rms_row_backward(x, qwp, dn.data(), dx, dw_q, hd, eps);
            else rms_row_backward(x, kwp, dn.data(), dx, dw_k, hd, eps);
          }
        }
      });
      if (dqwp) {
        std::memcpy(dqwp, dws.data(), hd * sizeof(float));
        std::memcpy(dkwp, dws.data() + hd, hd * sizeof(float));
      }
    });
  }

 private:
  int nq_, nkv_;
  bool qk_norm_;
  float eps_;
  int offset_;
};

class AttentionInputs : public Kernel<AttentionInputs> {
 public:
  AttentionInputs(mx::Stream s, int nq, int nkv, bool qk_norm, float eps, float base, int offset)
      : Kernel(s, attention_inputs_reference(s, nq, nkv, qk_norm, eps, base, offset)),
        nq_(nq), nkv_(nkv), qk_norm_(qk_norm), eps_(eps), base_(base), offset_(offset) {}
  const char* name() const override { return "OpenELMAttentionInputs"; }
  auto state() const { return std::tuple(nq_, nkv_, qk_norm_, eps_, base_, offset_); }

  std::vector<mx::array> grad_kernel(const std::vector<mx::array>& primals,
                                     const std::vector<mx::array>& cotangents,
                                     const std::vector<mx::array>&) override {
    std::vector<mx::array> in = primals;
    in.insert(in.end(), cotangents.begin(), cotangents.end());
    const int hd = primals[0].shape(3);
    std::vector<mx::Shape> shapes = {primals[0].shape()};
    if (qk_norm_) shapes.insert(shapes.end(), {{hd}, {hd}});
    auto grads = mx::array::make_arrays(
        shapes, std::vector<mx::Dtype>(shapes.size(), mx::float32),
        std::make_shared<AttentionInputsGrad>(
            stream(), attention_inputs_reference(stream(), nq_, nkv_, qk_norm_, eps_, base_, offset_),
            nq_, nkv_, qk_norm_, eps_, offset_),
        in);
    grads.insert(grads.begin() + 1, mx::zeros_like(primals[1], stream()));  // inv_freqs: constant
    return grads;
  }

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    auto qkv = row_contiguous(inputs[0], enc), freqs = row_contiguous(inputs[1], enc);
    std::optional<mx::array> qw, kw;
    if (qk_norm_) {
      qw = row_contiguous(inputs[2], enc);
      kw = row_contiguous(inputs[3], enc);
    }
    alloc(outputs);
    const int64_t B = qkv.shape(0), L = qkv.shape(1), H = qkv.shape(2), hd = qkv.shape(3);
    enc.dispatch([src = qkv.data<float>(), fp = freqs.data<float>(),
                  qwp = qw ? qw->data<float>() : nullptr, kwp = kw ? kw->data<float>() : nullptr,
                  qp = outputs[0].data<float>(), kp = outputs[1].data<float>(),
                  vp = outputs[2].data<float>(), B, L, H, hd, nq = int64_t(nq_),
                  nkv = int64_t(nkv_), eps = eps_, offset = offset_]() {
      const int64_t half = hd / 2;
      std::vector<float> cos_t, sin_t;
      rope_tables(fp, L, half, offset, cos_t, sin_t);
      parallel_for(B * L, 8, [&](int64_t r0, int64_t r1) {
        std::vector<float> tmp(hd);
        for (int64_t r = r0; r < r1; r++) {
          const int64_t b = r / L, l = r % L;
          const float* row = src + r * H * hd;
          const float *c = cos_t.data() + l * half, *sn = sin_t.data() + l * half;
          for (int64_t h = 0; h < H; h++) {
            const float* x = row + h * hd;
            if (h < nq)
              norm_and_rotate(x, qwp, eps, c, sn, hd, tmp.data(), qp + ((b * nq + h) * L + l) * hd);
            else if (h < nq + nkv)
              norm_and_rotate(x, kwp, eps, c, sn, hd, tmp.data(), kp + ((b * nkv + h - nq) * L + l) * hd);
            else
              std::memcpy(vp + ((b * nkv + h - nq - nkv) * L + l) * hd, x, hd * sizeof(float));
          }
        }
      });
    });
  }

 private:
  int nq_, nkv_;
  bool qk_norm_;
  float eps_, base_;
  int offset_;
};

std::vector<mx::array> attention_inputs(const mx::array& qkv, int n_heads, int n_kv_heads,
                                        const std::optional<mx::array>& q_weight,
                                        const std::optional<mx::array>& k_weight, float eps,
                                        const mx::array& inv_freqs, float base, int offset,
                                        mx::StreamOrDevice s) {
  check_heads("attention_inputs", qkv, n_heads, n_kv_heads, inv_freqs);
  const int hd = qkv.shape(3);
  require(bool(q_weight) == bool(k_weight), "attention_inputs: give both norm weights or neither");
  require(offset >= 0, "attention_inputs: offset must be >= 0");
  std::vector<mx::array> in = {qkv, inv_freqs};
  if (q_weight) {
    require(q_weight->dtype() == mx::float32 && k_weight->dtype() == mx::float32 &&
                q_weight->shape() == mx::Shape{hd} && k_weight->shape() == mx::Shape{hd},
            "attention_inputs: norm weights must be float32 (head_dim,)");
    in.push_back(*q_weight);
    in.push_back(*k_weight);
  }
  const int B = qkv.shape(0), L = qkv.shape(1);
  auto prim = std::make_shared<AttentionInputs>(cpu_stream(s), n_heads, n_kv_heads, bool(q_weight),
                                                eps, base, offset);
  return mx::array::make_arrays(
      {{B, n_heads, L, hd}, {B, n_kv_heads, L, hd}, {B, n_kv_heads, L, hd}},
      {mx::float32, mx::float32, mx::float32}, prim, in);
}

}  // namespace oe
