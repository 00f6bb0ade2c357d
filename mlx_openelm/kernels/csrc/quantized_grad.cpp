// dx = dy @ dequantize(w) for many rows: the gradient of x @ dequantize(w).T with respect to x,
// the backward pass of a quantized product in training (QLoRA).
//
// MLX's vjp of quantized_matmul is its scalar loop (QLoRA ran 30x slower than LoRA). Dequantizing
// the whole matrix and then calling sgemm writes N*K fresh floats per layer and step (the pages
// are new each time, past MLX's 32 MB buffer cache) and holds a float copy of the weights while
// it runs. This dequantizes TILE rows of w at a time into one buffer that stays in cache and hands
// each tile to the sgemm MLX uses (the BLAS mlx_openelm loaded). A 6 x 16 register-blocked
// micro-kernel of our own on cached tiles ran at about half of MKL's speed, and the same tiling
// for the forward product lost to dequantize + one sgemm in a QLoRA step (bench/results).
#include "quantized.h"

extern "C" void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta, float* c,
                            int ldc);

namespace oe {

namespace {

constexpr int ROW_MAJOR = 101, NO_TRANS = 111;  // CBLAS_ORDER, CBLAS_TRANSPOSE
constexpr int64_t TILE = 256;  // rows of w per tile: 1.3 MB at K = 1280

// dx (M x K) = dy (M x N) @ dequantize(w), TILE rows of w at a time.
template <int BITS, typename S>
void quantized_grad(const float* dy, const uint8_t* w, const S* scales, const S* biases,
                    float* dx, int64_t M, int64_t N, int64_t K, int64_t gs) {
  std::vector<float> tile(std::min(TILE, N) * K);
  for (int64_t n0 = 0; n0 < N; n0 += TILE) {
    const int64_t n1 = std::min(N, n0 + TILE);
    parallel_for(n1 - n0, 8, [&](int64_t r0, int64_t r1) {
      dequantize_rows<BITS>(w, scales, biases, tile.data() + r0 * K, K, gs, n0 + r0, n0 + r1);
    });
    cblas_sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, int(M), int(K), int(n1 - n0), 1.0f, dy + n0,
                int(N), tile.data(), int(K), n0 ? 1.0f : 0.0f, dx, int(K));
  }
}

}  // namespace

class QuantizedLinearGrad : public Kernel<QuantizedLinearGrad> {
 public:
  QuantizedLinearGrad(mx::Stream s, int group_size, int bits)
      : Kernel(s, [s, group_size, bits](const std::vector<mx::array>& in) {
          return std::vector<mx::array>{mx::quantized_matmul(in[0], in[1], in[2], in[3], false,
                                                             group_size, bits, "affine", s)};
        }),
        group_size_(group_size), bits_(bits) {}
  const char* name() const override { return "OpenELMQuantizedLinearGrad"; }
  auto state() const { return std::tuple(group_size_, bits_); }

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    auto dy = row_contiguous(inputs[0], enc), w = row_contiguous(inputs[1], enc);
    auto scales = row_contiguous(inputs[2], enc), biases = row_contiguous(inputs[3], enc);
    auto& out = outputs[0];
    alloc(out);
    const int64_t N = w.shape(0), K = out.shape(-1), M = dy.size() / N;
    auto run = [&](auto tag) {
      using S = decltype(tag);
      enc.dispatch([dp = dy.data<float>(), wp = w.data<uint8_t>(), sp = scales.data<S>(),
                    bp = biases.data<S>(), op = out.data<float>(), M, N, K, gs = group_size_,
                    bits = bits_]() {
        if (bits == 8) quantized_grad<8>(dp, wp, sp, bp, op, M, N, K, gs);
        else quantized_grad<4>(dp, wp, sp, bp, op, M, N, K, gs);
      });
    };
    with_scale_type(scales.dtype(), run);
  }

 private:
  int group_size_, bits_;
};

mx::array quantized_linear_grad(const mx::array& dy, const mx::array& w, const mx::array& scales,
                                const mx::array& biases, int group_size, int bits,
                                mx::StreamOrDevice s) {
  check_quantized("quantized_linear_grad", w, scales, biases, group_size, bits);
  const int64_t N = w.shape(0), K = w.shape(1) * 32 / bits;
  require(dy.dtype() == mx::float32 && dy.ndim() >= 1 && dy.shape(-1) == N,
          "quantized_linear_grad: dy must be float32 (..., N) for w (N, K*bits/32)");
  auto shape = dy.shape();
  shape.back() = int(K);
  return mx::array(shape, mx::float32,
                   std::make_shared<QuantizedLinearGrad>(cpu_stream(s), group_size, bits),
                   {dy, w, scales, biases});
}

}  // namespace oe
