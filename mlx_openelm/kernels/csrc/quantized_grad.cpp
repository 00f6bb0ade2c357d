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
#include "kernels.h"

extern "C" void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta, float* c,
                            int ldc);

namespace oe {

namespace {

constexpr int ROW_MAJOR = 101, NO_TRANS = 111;  // CBLAS_ORDER, CBLAS_TRANSPOSE
constexpr int64_t TILE = 256;  // rows of w per tile: 1.3 MB at K = 1280

// tile[n - n0, :] = dequantize(w)[n, :] for n in [n0, n1), over the threads.
template <int BITS, typename S>
void dequantize_tile(const uint8_t* w, const S* scales, const S* biases, int64_t K, int64_t gs,
                     int64_t n0, int64_t n1, float* tile) {
  const int64_t groups = K / gs;
  parallel_for(n1 - n0, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t n = n0 + r0; n < n0 + r1; n++) {
      const uint8_t* wr = w + n * K * BITS / 8;
      float* t = tile + (n - n0) * K;
      for (int64_t g = 0; g < groups; g++) {
        const float s = static_cast<float>(scales[n * groups + g]);
        const float b = static_cast<float>(biases[n * groups + g]);
        if constexpr (BITS == 8) {
          for (int64_t k = g * gs; k < (g + 1) * gs; k++) t[k] = float(wr[k]) * s + b;
        } else {  // two per byte, the low nibble first: a loop the compiler vectorizes
          for (int64_t k = g * gs; k < (g + 1) * gs; k += 2) {
            t[k] = float(wr[k / 2] & 15) * s + b;
            t[k + 1] = float(wr[k / 2] >> 4) * s + b;
          }
        }
      }
    }
  });
}

// dx (M x K) = dy (M x N) @ dequantize(w), TILE rows of w at a time.
template <int BITS, typename S>
void quantized_grad(const float* dy, const uint8_t* w, const S* scales, const S* biases,
                    float* dx, int64_t M, int64_t N, int64_t K, int64_t gs) {
  std::vector<float> tile(std::min(TILE, N) * K);
  for (int64_t n0 = 0; n0 < N; n0 += TILE) {
    const int64_t n1 = std::min(N, n0 + TILE);
    dequantize_tile<BITS>(w, scales, biases, K, gs, n0, n1, tile.data());
    cblas_sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, int(M), int(K), int(n1 - n0), 1.0f, dy + n0,
                int(N), tile.data(), int(K), n0 ? 1.0f : 0.0f, dx, int(K));
  }
}

}  // namespace

class QuantizedLinearGrad : public CpuPrimitive {
 public:
  QuantizedLinearGrad(mx::Stream s, int group_size, int bits)
      : CpuPrimitive(s, [s, group_size, bits](const std::vector<mx::array>& in) {
          return std::vector<mx::array>{mx::quantized_matmul(in[0], in[1], in[2], in[3], false,
                                                             group_size, bits, "affine", s)};
        }),
        group_size_(group_size), bits_(bits) {}
  const char* name() const override { return "OpenELMQuantizedLinearGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QuantizedLinearGrad&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_;
  }

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
    if (scales.dtype() == mx::float32) run(float{});
    else if (scales.dtype() == mx::float16) run(mx::float16_t{});
    else run(mx::bfloat16_t{});
  }

 private:
  int group_size_, bits_;
};

mx::array quantized_linear_grad(const mx::array& dy, const mx::array& w, const mx::array& scales,
                                const mx::array& biases, int group_size, int bits,
                                mx::StreamOrDevice s) {
  require(bits == 4 || bits == 8, "quantized_linear_grad: bits must be 4 or 8");
  const int64_t N = w.shape(0), K = w.ndim() == 2 ? w.shape(1) * 32 / bits : 0;
  require(w.dtype() == mx::uint32 && w.ndim() == 2 && group_size % 16 == 0 &&
              K % group_size == 0 &&
              scales.shape() == mx::Shape{int(N), int(K / group_size)} &&
              biases.shape() == scales.shape() && scales.dtype() == biases.dtype() &&
              (scales.dtype() == mx::float32 || scales.dtype() == mx::float16 ||
               scales.dtype() == mx::bfloat16),
          "quantized_linear_grad: w, scales and biases as quantized_linear takes them");
  require(dy.dtype() == mx::float32 && dy.ndim() >= 1 && dy.shape(-1) == N,
          "quantized_linear_grad: dy must be float32 (..., N) for w (N, K*bits/32)");
  auto shape = dy.shape();
  shape.back() = int(K);
  return mx::array(shape, mx::float32,
                   std::make_shared<QuantizedLinearGrad>(cpu_stream(s), group_size, bits),
                   {dy, w, scales, biases});
}

}  // namespace oe
