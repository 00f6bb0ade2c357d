// Cross-entropy over a vocabulary, forward and backward, and the log-softmax that decoding samples
// from.
//
// MLX's CPU logsumexp and its gradient (a softmax) take exp one element at a time, over every
// logit of the batch twice per training step, and over the vocabulary at every decoded token
// (~0.4 ms of a 15 ms step at 32000 logits); here it is a vector at a time, and the gradient row is
// written in the same pass that exponentiates it.
#include <limits>

#include "kernels.h"

namespace oe {

namespace {

// Largest of x[0:n] and log(sum exp(x - that)).
inline std::pair<float, float> max_and_log_sum_exp(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  if (n >= VecW::N) {
    auto mv = VecW::load(x);
    for (j = VecW::N; j + VecW::N <= n; j += VecW::N) mv = VecW::max(mv, VecW::load(x + j));
    m = VecW::max_of(mv);
  }
  for (; j < n; j++) m = std::max(m, x[j]);
  const float s = sum_vec(n, [&]<class X>(X, int64_t k, typename X::V acc) {
    return X::add(acc, X::exp(X::sub(X::load(x + k), X::set(m))));
  });
  return {m, std::log(s)};
}

Reference cross_entropy_reference(mx::Stream s) {
  return [=](const std::vector<mx::array>& in) {
    const auto &logits = in[0], &targets = in[1];
    auto picked = mx::take_along_axis(logits, mx::expand_dims(targets, -1, s), -1, s);
    return std::vector<mx::array>{
        mx::subtract(mx::logsumexp(logits, -1, false, s), mx::squeeze(picked, -1, s), s)};
  };
}

}  // namespace

// d loss / d logits = g (softmax(logits) - onehot(target)), row by row. The forward's loss gives
// the softmax's shift (max + log-sum-exp = loss + logits[target]), so this is one pass per row.
// Inputs: logits, targets, the forward's loss, the cotangent; the reference ignores the loss.
class CrossEntropyGrad : public Kernel<CrossEntropyGrad> {
 public:
  explicit CrossEntropyGrad(mx::Stream s)
      : Kernel(s, backward_reference(cross_entropy_reference(s), 2, 1)) {}
  const char* name() const override { return "OpenELMCrossEntropyGrad"; }
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    const auto in = row_major(inputs, enc);
    const auto &x = in[0], &t = in[1], &loss = in[2], &g = in[3];
    auto& out = outputs[0];
    alloc(out);
    const int64_t V = x.shape(-1), N = x.size() / V;
    enc.dispatch([xp = x.data<float>(), tp = t.data<int32_t>(), lp = loss.data<float>(),
                  gp = g.data<float>(), op = out.data<float>(), N, V]() {
      parallel_for(N, 4, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; r++) {
          const float* xr = xp + r * V;
          float* dr = op + r * V;
          const int32_t tr = tp[r];
          // The forward's loss is NaN for a target outside the vocabulary; so is this row.
          const float shift = tr >= 0 && tr < V ? lp[r] + xr[tr] : lp[r], gr = gp[r];
          each_vec(V, [&]<class X>(X, int64_t j) {
            X::store(dr + j, X::mul(X::exp(X::sub(X::load(xr + j), X::set(shift))), X::set(gr)));
          });
          if (tr >= 0 && tr < V) dr[tr] -= gr;
        }
      });
    });
  }
};

// logsumexp(logits) - logits[target] per row.
class CrossEntropy : public Kernel<CrossEntropy> {
 public:
  explicit CrossEntropy(mx::Stream s)
      : Kernel(s, cross_entropy_reference(s)) {}
  const char* name() const override { return "OpenELMCrossEntropy"; }
  std::vector<mx::array> grad_kernel(const std::vector<mx::array>& primals,
                                     const std::vector<mx::array>& cotangents,
                                     const std::vector<mx::array>& outputs) override {
    return {mx::array(primals[0].shape(), mx::float32, std::make_shared<CrossEntropyGrad>(stream()),
                      {primals[0], primals[1], outputs[0], cotangents[0]}),
            mx::zeros_like(primals[1], stream())};
  }

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    auto x = row_contiguous(inputs[0], enc);
    auto t = row_contiguous(inputs[1], enc);
    auto& out = outputs[0];
    alloc(out);
    const int64_t V = x.shape(-1), N = x.size() / V;
    enc.dispatch([xp = x.data<float>(), tp = t.data<int32_t>(), op = out.data<float>(), N, V]() {
      parallel_for(N, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; r++) {
          const float* xr = xp + r * V;
          auto [m, lse] = max_and_log_sum_exp(xr, V);
          const int32_t tr = tp[r];
          op[r] = tr >= 0 && tr < V ? m + lse - xr[tr] : std::numeric_limits<float>::quiet_NaN();
        }
      });
    });
  }
};

// x - logsumexp(x) over the last axis.
class LogSoftmax : public Kernel<LogSoftmax> {
 public:
  explicit LogSoftmax(mx::Stream s)
      : Kernel(s, [s](const std::vector<mx::array>& in) {
          return std::vector<mx::array>{
              mx::subtract(in[0], mx::logsumexp(in[0], -1, true, s), s)};
        }) {}
  const char* name() const override { return "OpenELMLogSoftmax"; }
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    auto x = row_contiguous(inputs[0], enc);
    auto& out = outputs[0];
    alloc(out);
    const int64_t V = x.shape(-1), N = x.size() / V;
    enc.dispatch([xp = x.data<float>(), op = out.data<float>(), N, V]() {
      parallel_for(N, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; r++) {
          const float* xr = xp + r * V;
          auto [m, lse] = max_and_log_sum_exp(xr, V);
          const float shift = m + lse;
          float* o = op + r * V;
          for (int64_t j = 0; j < V; j++) o[j] = xr[j] - shift;
        }
      });
    });
  }
};

mx::array log_softmax(const mx::array& x, mx::StreamOrDevice s) {
  require(x.dtype() == mx::float32 && x.ndim() >= 1, "log_softmax: float32 (..., V) only");
  return mx::array(x.shape(), mx::float32, std::make_shared<LogSoftmax>(cpu_stream(s)), {x});
}

mx::array cross_entropy(const mx::array& logits, const mx::array& targets, mx::StreamOrDevice s) {
  require(logits.dtype() == mx::float32 && targets.dtype() == mx::int32,
          "cross_entropy: float32 logits and int32 targets only");
  require(logits.ndim() >= 1 && targets.shape() == mx::Shape(logits.shape().begin(),
                                                             logits.shape().end() - 1),
          "cross_entropy: targets must have the shape of logits without its last axis");
  return mx::array(targets.shape(), mx::float32, std::make_shared<CrossEntropy>(cpu_stream(s)),
                   {logits, targets});
}

}  // namespace oe
