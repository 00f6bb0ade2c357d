// x @ dequantize(w).T and x @ dequantize(w) for many rows: a quantized model's prefill, and the
// forward and backward passes of its products in training (QLoRA).
//
// MLX's quantized_matmul is a scalar loop (QLoRA ran 30x slower than LoRA), and its vjp too.
// Dequantizing the whole matrix and then calling sgemm writes N*K fresh floats per layer and call
// (the pages are new each time, past MLX's 32 MB buffer cache: a fifth of a 4-bit 270M's prefill
// went to the kernel zeroing them) and holds a float copy of the weights while it runs. This
// dequantizes a tile of rows of w at a time into one buffer that stays in cache and hands each tile to
// the sgemm MLX uses (the BLAS mlx_openelm loaded). A 6 x 16 register-blocked micro-kernel of our
// own on cached tiles ran at about half of MKL's speed.
#include "quantized.h"

extern "C" void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta, float* c,
                            int ldc);

namespace oe {

namespace {

constexpr int ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112;  // CBLAS_ORDER, CBLAS_TRANSPOSE
// Rows of w per tile: 5 MB of floats (1024 rows at K = 1280). Against dequantize + one sgemm on
// the 270M's 4-bit shapes (2-core AMD EPYC), 1024-row tiles took 1.85x less time at 128 rows of x,
// 1.19x at 512 and the same at 2048; 256-row ones 1.91x, 1.05x, 0.91x.
inline int64_t tile_rows(int64_t K) { return std::max<int64_t>(64, (5 << 20) / (4 * K)); }

// out = x @ dequantize(w).T (M x N, transpose) or x @ dequantize(w) (M x K, x being M x N),
// a tile of rows of w at a time.
template <int BITS, typename S>
void tiled_product(const float* x, const uint8_t* w, const S* scales, const S* biases, float* out,
                   int64_t M, int64_t N, int64_t K, int64_t gs, bool transpose) {
  const int64_t rows = tile_rows(K);
  std::vector<float> tile(std::min(rows, N) * K);
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n1 = std::min(N, n0 + rows);
    parallel_for(n1 - n0, 8, [&](int64_t r0, int64_t r1) {
      dequantize_rows<BITS>(w, scales, biases, tile.data() + r0 * K, K, gs, n0 + r0, n0 + r1);
    });
    if (transpose)  // out[:, n0:n1] = x @ tile.T
      cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS, int(M), int(n1 - n0), int(K), 1.0f, x, int(K),
                  tile.data(), int(K), 0.0f, out + n0, int(N));
    else  // out += x[:, n0:n1] @ tile
      cblas_sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, int(M), int(K), int(n1 - n0), 1.0f, x + n0,
                  int(N), tile.data(), int(K), n0 ? 1.0f : 0.0f, out, int(K));
  }
}

}  // namespace

class QuantizedMatmul : public Kernel<QuantizedMatmul> {
 public:
  QuantizedMatmul(mx::Stream s, bool transpose, int group_size, int bits)
      : Kernel(s, [s, transpose, group_size, bits](const std::vector<mx::array>& in) {
          return std::vector<mx::array>{mx::quantized_matmul(
              in[0], in[1], in[2], in[3], transpose, group_size, bits, "affine", s)};
        }),
        transpose_(transpose), group_size_(group_size), bits_(bits) {}
  const char* name() const override { return "OpenELMQuantizedMatmul"; }
  auto state() const { return std::tuple(transpose_, group_size_, bits_); }

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    auto x = row_contiguous(inputs[0], enc), w = row_contiguous(inputs[1], enc);
    auto scales = row_contiguous(inputs[2], enc), biases = row_contiguous(inputs[3], enc);
    auto& out = outputs[0];
    alloc(out);
    const int64_t N = w.shape(0), K = w.shape(1) * 32 / bits_, M = x.size() / x.shape(-1);
    auto run = [&](auto tag) {
      using S = decltype(tag);
      enc.dispatch([xp = x.data<float>(), wp = w.data<uint8_t>(), sp = scales.data<S>(),
                    bp = biases.data<S>(), op = out.data<float>(), M, N, K, gs = group_size_,
                    bits = bits_, t = transpose_]() {
        if (bits == 8) tiled_product<8>(xp, wp, sp, bp, op, M, N, K, gs, t);
        else tiled_product<4>(xp, wp, sp, bp, op, M, N, K, gs, t);
      });
    };
    with_scale_type(scales.dtype(), run);
  }

 private:
  bool transpose_;
  int group_size_, bits_;
};

mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, bool transpose, int group_size, int bits,
                           mx::StreamOrDevice s) {
  check_quantized("quantized_matmul", w, scales, biases, group_size, bits);
  const int64_t N = w.shape(0), K = w.shape(1) * 32 / bits;
  const int64_t in = transpose ? K : N, out = transpose ? N : K;
  require(x.dtype() == mx::float32 && x.ndim() >= 1 && x.shape(-1) == in,
          transpose ? "quantized_matmul: x must be float32 (..., K) for w (N, K*bits/32)"
                    : "quantized_matmul: x must be float32 (..., N) for w (N, K*bits/32)");
  auto shape = x.shape();
  shape.back() = int(out);
  return mx::array(shape, mx::float32,
                   std::make_shared<QuantizedMatmul>(cpu_stream(s), transpose, group_size, bits),
                   {x, w, scales, biases});
}

}  // namespace oe
