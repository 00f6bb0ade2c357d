// Few-row products x @ W.T for decoding with MLX's affine 4/8-bit weights (more rows are
// quantized_matmul.cpp's).
//
// MLX runs a quantized product as a scalar loop. These read each weight row once for all M input
// rows, over all cores: one row (decoding) in integer dot products (quant_dot_x86.h), more in
// float FMAs on the unpacked weights (q_row).
#include "fused_product.h"
#include "quant_dot_x86.h"

namespace oe {

namespace {

// out[m, n] = sum_g scale[n,g] (x[m,g] . q[n,g]) + bias[n,g] sum(x[m,g]) (+ res[m, n]); xsum
// holds the sums, so a group costs one FMA per X::N weights and one per row to scale.
template <int BITS, int MR, typename S>
inline void q_row(const float* x, const float* xsum, const uint8_t* w, const S* scales,
                  const S* biases, const float* res, float* out, int64_t K, int64_t N, int64_t gs,
                  int64_t n) {
  using X = VecQ;
  const int64_t groups = K / gs;
  const uint8_t* wr = w + n * K * BITS / 8;
  typename X::V acc[MR];
  for (int m = 0; m < MR; m++) acc[m] = X::zero();
  for (int64_t g = 0; g < groups; g++) {
    const int64_t k0 = g * gs;
    // This group's bytes in the row AHEAD rows on: the hardware prefetcher alone left these
    // rows, slower to consume than fp32 ones, well short of the memory bandwidth.
    for (int64_t c = k0 * BITS / 8; c < (k0 + gs) * BITS / 8; c += 64)
      __builtin_prefetch(wr + AHEAD * K * BITS / 8 + c, 0, 3);
    typename X::V gacc[MR];
    for (int m = 0; m < MR; m++) gacc[m] = X::zero();
    if constexpr (BITS == 4) {
      // The low nibbles are the even elements, the high ones the odd; x comes permuted to match
      // (see QuantizedLinear), so no shuffle is needed here.
      for (int64_t k = k0; k < k0 + gs; k += 2 * X::N) {
        typename X::V lo, hi;
        nibbles<X>(wr + k / 2, lo, hi);
        for (int m = 0; m < MR; m++) {
          const auto xe = X::load(x + m * K + k), xo = X::load(x + m * K + k + X::N);
          gacc[m] = X::fma(hi, xo, X::fma(lo, xe, gacc[m]));
        }
      }
    } else {
      for (int64_t k = k0; k < k0 + gs; k += X::N) {
        const auto wv = weights<BITS, X>(wr, k);
        for (int m = 0; m < MR; m++) gacc[m] = X::fma(wv, X::load(x + m * K + k), gacc[m]);
      }
    }
    const auto sv = X::set(to_f32(scales[n * groups + g]));
    for (int m = 0; m < MR; m++) acc[m] = X::fma(gacc[m], sv, acc[m]);
  }
  float sums[MR];
  for (int m = 0; m < MR; m++) sums[m] = X::sum(acc[m]);
  for (int m = 0; m < MR; m++)
    out[m * N + n] = sums[m] + bias_term(biases + n * groups, xsum + m * groups, groups) +
                     (res ? res[m * N + n] : 0.0f);
}

template <int BITS, int MR, typename S>
void q_rows(const float* x, const float* xsum, const uint8_t* w, const S* scales, const S* biases,
            const float* res, float* out, int64_t K, int64_t N, int64_t gs, int64_t n0,
            int64_t n1) {
  for (int64_t n = n0; n < n1; n++)
    q_row<BITS, MR>(x, xsum, w, scales, biases, res, out, K, N, gs, n);
}

template <int BITS, typename S>
void q_block(int64_t mr, const float* x, const float* xsum, const uint8_t* w, const S* scales,
             const S* biases, const float* res, float* out, int64_t K, int64_t N, int64_t gs) {
  parallel_for(N, 16, [&](int64_t n0, int64_t n1) {
    switch (mr) {
      case 1: return q_rows<BITS, 1>(x, xsum, w, scales, biases, res, out, K, N, gs, n0, n1);
      case 2: return q_rows<BITS, 2>(x, xsum, w, scales, biases, res, out, K, N, gs, n0, n1);
      case 3: return q_rows<BITS, 3>(x, xsum, w, scales, biases, res, out, K, N, gs, n0, n1);
      default: return q_rows<BITS, 4>(x, xsum, w, scales, biases, res, out, K, N, gs, n0, n1);
    }
  });
}

}  // namespace

// ---- MLX affine quantized -----------------------------------------------------------------------

class QuantizedLinear : public Kernel<QuantizedLinear> {
 public:
  QuantizedLinear(mx::Stream s, int group_size, int bits, Fusion fusion)
      : Kernel(s, [s, group_size, bits, fusion](const std::vector<mx::array>& in) {
          return fused_reference(fusion, in, 4, s, [&](mx::array x) {
            return mx::quantized_matmul(x, in[1], in[2], in[3], true, group_size, bits, "affine",
                                        s);
          });
        }),
        group_size_(group_size), bits_(bits), fusion_(fusion) {}
  const char* name() const override { return "OpenELMQuantizedLinear"; }
  auto state() const { return std::tuple(group_size_, bits_, fusion_); }

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    auto x = row_contiguous(inputs[0], enc), w = row_contiguous(inputs[1], enc);
    auto scales = row_contiguous(inputs[2], enc), biases = row_contiguous(inputs[3], enc);
    const FusedData fd = fused_data(fusion_, inputs, 4, enc);
    auto& out = outputs[0];
    alloc(out);
    int64_t N = w.shape(0), K = w.shape(1) * 32 / bits_, M = x.size() / x.shape(-1);
    int64_t gs = group_size_;
    auto run = [&](auto tag) {
      using S = decltype(tag);
      enc.dispatch([x_in = x.data<float>(), wp = w.data<uint8_t>(), sp = scales.data<S>(),
                    bp = biases.data<S>(), fd, f = fusion_, op = out.data<float>(), M, K, N, gs,
                    bits = bits_]() {
        std::vector<float> buffer;
        const float* xp = input_rows(f, x_in, fd.norm_weight, M, K, buffer);
        const float* rp = fd.residual;
        const int64_t groups = K / gs;
        std::vector<float> xsum(M * groups);
        for (int64_t i = 0; i < M * groups; i++) {
          float t = 0;
          for (int64_t k = 0; k < gs; k++) t += xp[i * gs + k];
          xsum[i] = t;
        }
#ifdef OE_INT8_DOT
        // One row (decoding), or a server's batch of single rows: each row takes the integer
        // dots that it would take alone, while the weight row is in L1 (4-bit rows share the
        // unpacking of its bytes, four at a time).
        if (M <= MAX_INT8_ROWS && int8_fits(K, gs)) {
          // At a cache line's start, so that no 512-bit load of a piece spans two lines.
          const int64_t stride = ((bits == 4 ? PIECES * K : q8_piece_bytes(K)) + 63) / 64 * 64;
          std::vector<int8_t> piece_store(M * stride + 64);
          int8_t* pieces = piece_store.data() + (64 - uintptr_t(piece_store.data()) % 64) % 64;
          std::vector<float> dl(M * (K / 8));
          std::vector<int32_t> sidx(K / 32);
          for (int64_t b = 0; b < K / 32; b++) sidx[b] = int32_t(b * 32 / gs);
          for (int64_t m = 0; m < M; m++) {
            if (bits == 4) split_x<true>(xp + m * K, K, pieces + m * stride, dl.data() + m * (K / 8));
            else split_x8(xp + m * K, K, pieces + m * stride, dl.data() + m * (K / 8));
          }
          parallel_for(N, 16, [&](int64_t n0, int64_t n1) {
            std::vector<float> buf(2 * groups);
            for (int64_t n = n0; n < n1; n++) {
              const float* sr = as_floats(sp + n * groups, groups, buf.data());
              const float* br = as_floats(bp + n * groups, groups, buf.data() + groups);
              for (int64_t m = 0; m < M; m += bits == 4 ? Q4_ROWS : 1) {
                const int8_t* pm = pieces + m * stride;
                const float *dm = dl.data() + m * (K / 8), *xs = xsum.data() + m * groups;
                const float* rm = rp ? rp + m * N : nullptr;
                if (bits == 4)
                  q4_rows(std::min<int64_t>(Q4_ROWS, M - m), pm, stride, dm, sidx.data(), xs, wp,
                          sr, br, rm, op + m * N, N, K, gs, n);
                else
                  q8_row(pm, dm, sidx.data(), xs, wp, sr, br, rm, op + m * N, K, gs, n);
              }
            }
          });
          return;
        }
#endif
        std::vector<float> xt;
        if (bits == 4) {  // even elements then odd ones, per 2 VecQ::N (see q_row)
          constexpr int64_t H = VecQ::N;
          xt.resize(M * K);
          for (int64_t i = 0; i < M * K; i += 2 * H)
            for (int64_t j = 0; j < H; j++) {
              xt[i + j] = xp[i + 2 * j];
              xt[i + H + j] = xp[i + 2 * j + 1];
            }
        }
        const float* xk = xt.empty() ? xp : xt.data();
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
          int64_t mr = std::min<int64_t>(4, M - m0);
          const float *xm = xk + m0 * K, *xs = xsum.data() + m0 * groups;
          const float* rm = rp ? rp + m0 * N : nullptr;
          if (bits == 8) q_block<8, S>(mr, xm, xs, wp, sp, bp, rm, op + m0 * N, K, N, gs);
          else q_block<4, S>(mr, xm, xs, wp, sp, bp, rm, op + m0 * N, K, N, gs);
        }
      });
    };
    with_scale_type(scales.dtype(), run);
  }

 private:
  int group_size_, bits_;
  Fusion fusion_;
};

mx::array quantized_linear(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits,
                           const std::optional<mx::array>& norm_weight, float eps, bool gate,
                           const std::optional<mx::array>& residual, mx::StreamOrDevice s) {
  check_quantized("quantized_linear", w, scales, biases, group_size, bits);
  auto p = fuse({x, w, scales, biases}, w.shape(1) * 32 / bits, w.shape(0), norm_weight, eps,
                gate, residual);
  return mx::array(p.shape, mx::float32,
                   std::make_shared<QuantizedLinear>(cpu_stream(s), group_size, bits, p.fusion),
                   p.inputs);
}

}  // namespace oe
