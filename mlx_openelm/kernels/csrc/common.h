// Shared pieces of the CPU kernels: the primitive base, threading, contiguous inputs, and the row
// functions that more than one kernel runs (so that a fused product equals the ops one by one).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iterator>
#include <numeric>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "thread_pool.h"
#include "vec.h"

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

// A kernel whose parameters its state() gives as a tuple (as MLX's own primitives do): two nodes
// are equivalent, and may be merged by mx.compile, when those are equal. None: always.
template <class Self>
class Kernel : public CpuPrimitive {
 public:
  using CpuPrimitive::CpuPrimitive;
  bool is_equivalent(const mx::Primitive& other) const override {
    if constexpr (requires(const Self& k) { k.state(); })
      return static_cast<const Self&>(*this).state() == static_cast<const Self&>(other).state();
    else
      return true;
  }
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

inline void alloc(std::vector<mx::array>& outputs) {
  for (auto& out : outputs) alloc(out);
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

// All of `inputs` row-major (row_contiguous each).
inline std::vector<mx::array> row_major(const std::vector<mx::array>& inputs,
                                        mx::cpu::CommandEncoder& enc) {
  std::vector<mx::array> in;
  for (const auto& a : inputs) in.push_back(row_contiguous(a, enc));
  return in;
}

// Run f(begin, end) over [0, n) on the thread pool (thread_pool.h), in a few chunks per thread
// taken as threads come free: on a shared machine one descheduled thread then delays a chunk, not
// half the job. Small jobs stay on the calling thread.
template <class F>
inline void parallel_for(int64_t n, int64_t min_per_thread, F&& f) {
  int threads = ThreadPool::threads();
  if (min_per_thread > 0) threads = int(std::min<int64_t>(threads, std::max<int64_t>(1, n / min_per_thread)));
  if (threads <= 1) return f(int64_t(0), n);
  const int64_t chunks = std::min<int64_t>(n, 4 * threads);
  ThreadPool::get().run(threads, chunks, [&](int64_t c) {
    int64_t begin = n * c / chunks, end = n * (c + 1) / chunks;
    if (begin < end) f(begin, end);
  });
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

// out = x * rsqrt(mean(x^2) + eps) * w over one row of D.
inline void rms_row(const float* x, const float* w, float* out, int64_t D, float eps) {
  const float ss = sum_vec(D, [&]<class X>(X, int64_t k, typename X::V acc) {
    const auto v = X::load(x + k);
    return X::fma(v, v, acc);
  });
  const float r = 1.0f / std::sqrt(ss / float(D) + eps);
  each_vec(D, [&]<class X>(X, int64_t k) {
    X::store(out + k, X::mul(X::mul(X::load(x + k), X::set(r)), X::load(w + k)));
  });
}

// sigmoid(a) = 1 / (1 + exp(-a)).
template <class X>
inline typename X::V sigmoid(typename X::V a) {
  return X::div(X::set(1.0f), X::add(X::set(1.0f), X::exp(X::sub(X::zero(), a))));
}

// out = silu(x[0:F]) * x[F:2F] over one row of 2F (OpenELM's SwiGLU, the gate first).
inline void silu_gate_row(const float* x, float* out, int64_t F) {
  each_vec(F, [&]<class X>(X, int64_t k) {
    const auto a = X::load(x + k);
    X::store(out + k, X::mul(X::mul(a, sigmoid<X>(a)), X::load(x + F + k)));
  });
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
