// Few-row products x @ W.T for decoding with fp32 weights (the quantized ones are in
// quantized_linear.cpp).
//
// A decode step multiplies one row by every weight matrix, so it is bound by how fast the weights
// stream from memory. MLX sends that row to cblas_sgemm; this reads each weight row once for all
// M input rows, a vector at a time, over all cores.
#include "fused_product.h"

namespace oe {

namespace {

// A product reads several weight rows at once per thread, as many as 8 accumulators allow, to keep
// several streams of loads in flight; how many, and how many accumulators a (row, weight row)
// pair gets, differ by CPU, as measured:
// - AMD EPYC VM, two per pair, to hide the FMA latency: a server's 4- and 8-row steps ran 1.3-1.8x
//   slower with one. So 4 weight rows for one input row, 2 for two, 1 for three or four. In a
//   microbenchmark streaming 1.08 GB of fp32 weights on two threads, 4 or 8 rows at once ran
//   1.15-1.25x faster than one row with a software prefetch 4 KB ahead (~19 GB/s), and the 270M's
//   fp32 decode 1.16-1.26x (alternating `generate_step` rounds).
// - Intel Xeon VM (AVX-512), one per pair: a 32000 x 1280 product streamed 34 GB/s with 8 weight
//   rows at once, 28 one row at a time with two accumulators and a prefetch 4 KB ahead.
// Every pair sums in the same order on a given CPU whatever the rows beside it, so a row gets the
// bits in a server's batch that it gets alone.
inline bool intel_cpu() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool intel = __builtin_cpu_is("intel");
  return intel;
#else
  return false;
#endif
}

// out[m, n + r] = x[m] . w[n + r] (+ res[m, n + r]) for MR input rows and NR weight rows, with U
// accumulators a pair.
template <int MR, int NR, int U>
inline void f32_rows(const float* x, const float* w, const float* res, float* out, int64_t K,
                     int64_t N, int64_t n) {
  using X = VecW;
  typename X::V acc[MR][NR][U];
  for (int m = 0; m < MR; m++)
    for (int r = 0; r < NR; r++)
      for (int u = 0; u < U; u++) acc[m][r][u] = X::zero();
  int64_t k = 0;
  for (; k + U * X::N <= K; k += U * X::N) {
    for (int u = 0; u < U; u++) {
      if constexpr (NR == 1) __builtin_prefetch(w + n * K + k + u * X::N + 1024);
      typename X::V xv[MR];
      for (int m = 0; m < MR; m++) xv[m] = X::load(x + m * K + k + u * X::N);
      for (int r = 0; r < NR; r++) {
        const auto wv = X::load(w + (n + r) * K + k + u * X::N);
        for (int m = 0; m < MR; m++) acc[m][r][u] = X::fma(wv, xv[m], acc[m][r][u]);
      }
    }
  }
  float acc_s[MR][NR];
  for (int m = 0; m < MR; m++)
    for (int r = 0; r < NR; r++) {
      auto a = acc[m][r][0];
      for (int u = 1; u < U; u++) a = X::add(a, acc[m][r][u]);
      acc_s[m][r] = X::sum(a);
    }
  for (; k < K; k++)
    for (int m = 0; m < MR; m++)
      for (int r = 0; r < NR; r++) acc_s[m][r] += w[(n + r) * K + k] * x[m * K + k];
  for (int m = 0; m < MR; m++)
    for (int r = 0; r < NR; r++)
      out[m * N + n + r] = acc_s[m][r] + (res ? res[m * N + n + r] : 0.0f);
}

// Weight rows n0 .. n1 - 1 against MR input rows.
template <int MR, int U>
void f32_span(const float* x, const float* w, const float* res, float* out, int64_t K, int64_t N,
              int64_t n0, int64_t n1) {
  constexpr int NR = 8 / U / (MR == 1 ? 1 : MR == 2 ? 2 : 4);  // 8 accumulators
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) f32_rows<MR, NR, U>(x, w, res, out, K, N, n);
  for (; n < n1; n++) f32_rows<MR, 1, U>(x, w, res, out, K, N, n);
}

// Weight rows per tile: its 4-row blocks of input rows take it while it is in L2.
constexpr int64_t TILE = 16;

// out (M, N) = x (M, K) @ w.T (+ res), the input rows four at a time (what the registers hold).
// Past four, each tile of weight rows serves every block before the next one is read: with the
// blocks one after the other over all of w, eight rows (a server's batch) streamed w twice.
// A row's sums do not depend on its block, so each row gets what it would alone.
void f32_product(const float* x, const float* w, const float* res, float* out, int64_t M,
                 int64_t K, int64_t N) {
  const bool intel = intel_cpu();
  parallel_for(N, 64, [&](int64_t n0, int64_t n1) {
    const int64_t tile = M > 4 ? TILE : n1 - n0;
    for (int64_t t0 = n0; t0 < n1; t0 += tile) {
      const int64_t t1 = std::min(n1, t0 + tile);
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const float* xm = x + m0 * K;
        const float* rm = res ? res + m0 * N : nullptr;
        float* om = out + m0 * N;
        auto span = [&](auto u) {
          constexpr int U = decltype(u)::value;
          switch (std::min<int64_t>(4, M - m0)) {
            case 1: return f32_span<1, U>(xm, w, rm, om, K, N, t0, t1);
            case 2: return f32_span<2, U>(xm, w, rm, om, K, N, t0, t1);
            case 3: return f32_span<3, U>(xm, w, rm, om, K, N, t0, t1);
            default: return f32_span<4, U>(xm, w, rm, om, K, N, t0, t1);
          }
        };
        if (intel) span(std::integral_constant<int, 1>{});
        else span(std::integral_constant<int, 2>{});
      }
    }
  });
}

}  // namespace

// ---- fp32 -------------------------------------------------------------------------------------

class LinearF32 : public Kernel<LinearF32> {
 public:
  LinearF32(mx::Stream s, Fusion fusion)
      : Kernel(s, [s, fusion](const std::vector<mx::array>& in) {
          return fused_reference(fusion, in, 2, s, [&](mx::array x) {
            return mx::matmul(x, mx::transpose(in[1], s), s);
          });
        }),
        fusion_(fusion) {}
  const char* name() const override { return "OpenELMLinear"; }
  auto state() const { return std::tuple(fusion_); }

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    auto x = row_contiguous(inputs[0], enc), w = row_contiguous(inputs[1], enc);
    const FusedData fd = fused_data(fusion_, inputs, 2, enc);
    auto& out = outputs[0];
    alloc(out);
    int64_t K = w.shape(1), N = w.shape(0), M = x.size() / x.shape(-1);
    enc.dispatch([x_in = x.data<float>(), wp = w.data<float>(), fd, f = fusion_,
                  op = out.data<float>(), M, K, N]() {
      std::vector<float> buffer;
      const float* xp = input_rows(f, x_in, fd.norm_weight, M, K, buffer);
      f32_product(xp, wp, fd.residual, op, M, K, N);
    });
  }

 private:
  Fusion fusion_;
};

mx::array linear(const mx::array& x, const mx::array& w,
                 const std::optional<mx::array>& norm_weight, float eps, bool gate,
                 const std::optional<mx::array>& residual, mx::StreamOrDevice s) {
  require(w.dtype() == mx::float32 && w.ndim() == 2, "linear: w must be float32 (N, K)");
  auto p = fuse({x, w}, w.shape(1), w.shape(0), norm_weight, eps, gate, residual);
  return mx::array(p.shape, mx::float32, std::make_shared<LinearF32>(cpu_stream(s), p.fusion),
                   p.inputs);
}

}  // namespace oe
