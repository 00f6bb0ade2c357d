// Few-row products x @ W.T for decoding with MLX's affine 4/8-bit weights, and dequantize.
//
// MLX runs a quantized product as a scalar loop. These read each weight row once for all M input
// rows, over all cores: one row (decoding) in integer dot products (quant_dot_x86.h), more in
// float FMAs on the unpacked weights (q_row).
#include "fused_product.h"
#include "quant_dot_x86.h"

namespace oe {

namespace {

#ifdef OE_AVX2
// Eight weights of row `p` starting at element k (a multiple of 8), as floats.
template <int BITS>
inline __m256 unpack8(const uint8_t* p, int64_t k) {
  if constexpr (BITS == 8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + k))));
  } else {  // eight nibbles of one uint32, lowest first
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    __m256i word = _mm256_castps_si256(_mm256_broadcast_ss((const float*)(p + k / 2)));
    __m256i v = _mm256_srlv_epi32(word, shifts);
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
  }
}
#endif

template <int BITS>
inline float qvalue(const uint8_t* p, int64_t k) {
  if constexpr (BITS == 8) return p[k];
  else return float((p[k / 2] >> (4 * (k % 2))) & 15);
}

// out[m, n] = sum_g scale[n,g] (x[m,g] . q[n,g]) + bias[n,g] sum(x[m,g]) (+ res[m, n]); xsum
// holds the sums, so a group costs one FMA per eight weights and one per row to scale.
template <int BITS, int MR, typename S>
inline void q_row(const float* x, const float* xsum, const uint8_t* w, const S* scales,
                  const S* biases, const float* res, float* out, int64_t K, int64_t N, int64_t gs,
                  int64_t n) {
  const int64_t groups = K / gs;
  const uint8_t* wr = w + n * K * BITS / 8;
  float acc_s[MR] = {};
#ifdef OE_AVX2
  __m256 acc[MR];
  for (int m = 0; m < MR; m++) acc[m] = _mm256_setzero_ps();
#endif
  for (int64_t g = 0; g < groups; g++) {
    const int64_t k0 = g * gs;
#ifdef OE_AVX2
    // This group's bytes in the row AHEAD rows on: the hardware prefetcher alone left these
    // rows, slower to consume than fp32 ones, well short of the memory bandwidth.
    for (int64_t c = k0 * BITS / 8; c < (k0 + gs) * BITS / 8; c += 64)
      _mm_prefetch((const char*)(wr + AHEAD * K * BITS / 8 + c), _MM_HINT_T0);
    __m256 gacc[MR];
    for (int m = 0; m < MR; m++) gacc[m] = _mm256_setzero_ps();
    if constexpr (BITS == 4) {
      // Sixteen nibbles from eight bytes: low nibbles are the even elements, high ones the odd;
      // x comes permuted to match (see QuantizedLinear), so no shuffle is needed here.
      const __m256i low4 = _mm256_set1_epi32(15);
      for (int64_t k = k0; k < k0 + gs; k += 16) {
        const __m256i b8 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(wr + k / 2)));
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(b8, low4));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b8, 4));
        for (int m = 0; m < MR; m++) {
          const __m256 xe = _mm256_loadu_ps(x + m * K + k), xo = _mm256_loadu_ps(x + m * K + k + 8);
          gacc[m] = _mm256_fmadd_ps(hi, xo, _mm256_fmadd_ps(lo, xe, gacc[m]));
        }
      }
    } else {
      for (int64_t k = k0; k < k0 + gs; k += 8) {
        const __m256 wv = unpack8<BITS>(wr, k);
        for (int m = 0; m < MR; m++)
          gacc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), gacc[m]);
      }
    }
    const __m256 sv = _mm256_set1_ps(to_f32(scales[n * groups + g]));
    for (int m = 0; m < MR; m++) acc[m] = _mm256_fmadd_ps(gacc[m], sv, acc[m]);
#else
    const float s = to_f32(scales[n * groups + g]);
    for (int m = 0; m < MR; m++) {
      float d = 0;
      for (int64_t k = k0; k < k0 + gs; k++) d += qvalue<BITS>(wr, k) * x[m * K + k];
      acc_s[m] += s * d;
    }
#endif
  }
#ifdef OE_AVX2
  for (int m = 0; m < MR; m++) acc_s[m] = hsum(acc[m]);
#endif
  for (int m = 0; m < MR; m++)
    out[m * N + n] = acc_s[m] + bias_term(biases + n * groups, xsum + m * groups, groups) +
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

template <int BITS, typename S>
void dequantize_rows(const uint8_t* w, const S* scales, const S* biases, float* out, int64_t K,
                     int64_t gs, int64_t n0, int64_t n1) {
  const int64_t groups = K / gs;
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* wr = w + n * K * BITS / 8;
    for (int64_t g = 0; g < groups; g++) {
      const float s = to_f32(scales[n * groups + g]), b = to_f32(biases[n * groups + g]);
      float* o = out + n * K;
      int64_t k = g * gs;
#ifdef OE_AVX2
      const __m256 sv = _mm256_set1_ps(s), bv = _mm256_set1_ps(b);
      for (; k + 8 <= (g + 1) * gs; k += 8)
        _mm256_storeu_ps(o + k, _mm256_fmadd_ps(unpack8<BITS>(wr, k), sv, bv));
#endif
      for (; k < (g + 1) * gs; k++) o[k] = qvalue<BITS>(wr, k) * s + b;
    }
  }
}

// run(T{}) with T the C++ type of the scales (check_quantized allows these three).
template <class F>
void with_scale_type(mx::Dtype dtype, F&& run) {
  switch (dtype) {
    case mx::float32: return run(float{});
    case mx::float16: return run(mx::float16_t{});
    default: return run(mx::bfloat16_t{});
  }
}

void check_quantized(const mx::array& w, const mx::array& scales, const mx::array& biases,
                     int group_size, int bits) {
  require(bits == 4 || bits == 8, "quantized: bits must be 4 or 8");
  require(group_size % 16 == 0 && group_size > 0, "quantized: group size must be a multiple of 16");
  require(w.dtype() == mx::uint32 && w.ndim() == 2, "quantized: w must be uint32 (N, K*bits/32)");
  int64_t K = w.shape(1) * 32 / bits;
  require(K % group_size == 0, "quantized: K must be a multiple of the group size");
  require(scales.dtype() == biases.dtype() &&
              (scales.dtype() == mx::float32 || scales.dtype() == mx::float16 ||
               scales.dtype() == mx::bfloat16),
          "quantized: scales and biases must share a float dtype");
  require(scales.shape() == mx::Shape{w.shape(0), int(K / group_size)} &&
              biases.shape() == scales.shape(),
          "quantized: scales/biases must be (N, K / group_size)");
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
#ifdef OE_VNNI
        constexpr bool eight_bit = true;
#else
        constexpr bool eight_bit = false;  // maddubs would saturate (dot_nibbles)
#endif
        // One row (decoding), or a server's batch of single rows: each row takes the integer
        // dots that it would take alone, while the weight row is in L1 (4-bit rows share the
        // unpacking of its bytes, four at a time).
        if (M <= MAX_INT8_ROWS && vnni_fits(K, gs) && (bits == 4 || eight_bit)) {
          // At a cache line's start, so that no 512-bit load of a piece spans two lines.
          const int64_t stride = (PIECES * K + 63) / 64 * 64;
          std::vector<int8_t> piece_store(M * stride + 64);
          int8_t* pieces = piece_store.data() + (64 - uintptr_t(piece_store.data()) % 64) % 64;
          std::vector<float> dl(M * (K / 8));
          std::vector<int32_t> sidx(K / 32);
          for (int64_t b = 0; b < K / 32; b++) sidx[b] = int32_t(b * 32 / gs);
          for (int64_t m = 0; m < M; m++) {
            if (bits == 4) split_x<true>(xp + m * K, K, pieces + m * stride, dl.data() + m * (K / 8));
            else split_x<false>(xp + m * K, K, pieces + m * stride, dl.data() + m * (K / 8));
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
#ifdef OE_VNNI
                else
                  q8_row_vnni(pm, dm, sidx.data(), xs, wp, sr, br, rm, op + m * N, K, gs, n);
#endif
              }
            }
          });
          return;
        }
#endif
        std::vector<float> xt;
#ifdef OE_AVX2
        if (bits == 4) {  // even elements then odd ones, per sixteen (see q_row)
          xt.resize(M * K);
          for (int64_t i = 0; i < M * K; i += 16)
            for (int64_t j = 0; j < 8; j++) {
              xt[i + j] = xp[i + 2 * j];
              xt[i + 8 + j] = xp[i + 2 * j + 1];
            }
        }
#endif
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
  check_quantized(w, scales, biases, group_size, bits);
  auto p = fuse({x, w, scales, biases}, w.shape(1) * 32 / bits, w.shape(0), norm_weight, eps,
                gate, residual);
  return mx::array(p.shape, mx::float32,
                   std::make_shared<QuantizedLinear>(cpu_stream(s), group_size, bits, p.fusion),
                   p.inputs);
}


// ---- dequantize (prefill with quantized weights: dequantize once, then one sgemm) ---------------

class Dequantize : public Kernel<Dequantize> {
 public:
  Dequantize(mx::Stream s, int group_size, int bits)
      : Kernel(s, [s, group_size, bits](const std::vector<mx::array>& in) {
          return std::vector<mx::array>{mx::dequantize(in[0], in[1], in[2], group_size, bits,
                                                       "affine", std::nullopt, mx::float32, s)};
        }),
        group_size_(group_size), bits_(bits) {}
  const char* name() const override { return "OpenELMDequantize"; }
  auto state() const { return std::tuple(group_size_, bits_); }

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    auto w = row_contiguous(inputs[0], enc), scales = row_contiguous(inputs[1], enc),
         biases = row_contiguous(inputs[2], enc);
    auto& out = outputs[0];
    alloc(out);
    int64_t N = out.shape(0), K = out.shape(1), gs = group_size_;
    auto run = [&](auto tag) {
      using S = decltype(tag);
      enc.dispatch([wp = w.data<uint8_t>(), sp = scales.data<S>(), bp = biases.data<S>(),
                    op = out.data<float>(), N, K, gs, bits = bits_]() {
        parallel_for(N, 16, [&](int64_t n0, int64_t n1) {
          if (bits == 8) dequantize_rows<8>(wp, sp, bp, op, K, gs, n0, n1);
          else dequantize_rows<4>(wp, sp, bp, op, K, gs, n0, n1);
        });
      });
    };
    with_scale_type(scales.dtype(), run);
  }

 private:
  int group_size_, bits_;
};

mx::array dequantize(const mx::array& w, const mx::array& scales, const mx::array& biases,
                     int group_size, int bits, mx::StreamOrDevice s) {
  check_quantized(w, scales, biases, group_size, bits);
  return mx::array({w.shape(0), int(w.shape(1) * 32 / bits)}, mx::float32,
                   std::make_shared<Dequantize>(cpu_stream(s), group_size, bits),
                   {w, scales, biases});
}

}  // namespace oe
