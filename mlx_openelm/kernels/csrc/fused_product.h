// What a decoding product fuses (linear.cpp, quantized_linear.cpp): the input rows' RMSNorm or
// SiLU gate and the skip connection, with their checks, their reference in MLX ops and the rows
// the product then reads.
#pragma once

#include "kernels.h"

namespace oe {

// ---- what a decoding product fuses ---------------------------------------------------------------
//
// In a decode step MLX's scheduling of a small op costs more than its arithmetic, so the products
// take in the ops beside them: RMSNorm or the SiLU gate of the input rows (computed once, before the
// threads start, with the same row functions as their own kernels) and the skip connection, added
// as each output is stored. Their extra inputs follow the product's own: the norm's weight, then
// the residual.
struct Fusion {
  enum Input { plain, rms_norm, silu_gate } input = plain;
  float eps = 0;
  bool residual = false;
  bool operator==(const Fusion& o) const {
    return input == o.input && eps == o.eps && residual == o.residual;
  }
};

// A product's graph node: what it fuses, its inputs (its own, x first, then the fused ones) and
// the output's shape (x's with N for its last axis).
struct FusedProduct {
  Fusion fusion;
  std::vector<mx::array> inputs;
  mx::Shape shape;
};

// Checks what is asked for against x (..., K, or 2K with the gate) and the output (..., N).
inline FusedProduct fuse(std::vector<mx::array> in, int64_t K, int64_t N,
                         const std::optional<mx::array>& norm_weight, float eps, bool gate,
                         const std::optional<mx::array>& residual) {
  const auto& x = in[0];
  require(x.dtype() == mx::float32, "linear: float32 activations only");
  require(!(norm_weight && gate), "linear: RMSNorm or the SiLU gate on the input, not both");
  require(x.ndim() >= 1 && x.shape(-1) == (gate ? 2 * K : K),
          "linear: x (..., K) does not match w (x is (..., 2K) with the gate)");
  auto out_shape = x.shape();
  out_shape.back() = int(N);
  Fusion f;
  if (norm_weight) {
    require(norm_weight->dtype() == mx::float32 && norm_weight->shape() == mx::Shape{int(K)},
            "linear: the norm's weight must be float32 (K,)");
    f.input = Fusion::rms_norm;
    f.eps = eps;
    in.push_back(*norm_weight);
  } else if (gate) {
    f.input = Fusion::silu_gate;
  }
  if (residual) {
    require(residual->dtype() == mx::float32 && residual->shape() == out_shape,
            "linear: the residual must be float32 and shaped like the output");
    f.residual = true;
    in.push_back(*residual);
  }
  return {f, std::move(in), std::move(out_shape)};
}

// The same in MLX terms, around `product` (of the input rows): the kernels' own RMSNorm and gate,
// whose vjps have kernels, and an add.
inline std::vector<mx::array> fused_reference(const Fusion& f, const std::vector<mx::array>& in,
                                              size_t n_own, mx::Stream s,
                                              const std::function<mx::array(mx::array)>& product) {
  size_t i = n_own;
  mx::array x = in[0];
  if (f.input == Fusion::rms_norm) x = rms_norm(x, in[i++], f.eps, s);
  else if (f.input == Fusion::silu_gate) x = silu_gate(x, s);
  auto out = product(x);
  return {f.residual ? mx::add(out, in[i], s) : out};
}

// Row-major pointers to the fused inputs (null where there are none).
struct FusedData {
  const float* norm_weight = nullptr;
  const float* residual = nullptr;
};

inline FusedData fused_data(const Fusion& f, const std::vector<mx::array>& in, size_t n_own,
                            mx::cpu::CommandEncoder& enc) {
  FusedData d;
  size_t i = n_own;
  if (f.input == Fusion::rms_norm) d.norm_weight = row_contiguous(in[i++], enc).data<float>();
  if (f.residual) d.residual = row_contiguous(in[i], enc).data<float>();
  return d;
}

// The product's M input rows of K: x itself, or its RMSNorm or SiLU gate in `buffer`.
inline const float* input_rows(const Fusion& f, const float* x, const float* norm_weight,
                               int64_t M, int64_t K, std::vector<float>& buffer) {
  if (f.input == Fusion::plain) return x;
  buffer.resize(M * K);
  for (int64_t m = 0; m < M; m++) {
    if (f.input == Fusion::rms_norm) rms_row(x + m * K, norm_weight, buffer.data() + m * K, K, f.eps);
    else silu_gate_row(x + m * 2 * K, buffer.data() + m * K, K);
  }
  return buffer.data();
}

}  // namespace oe
