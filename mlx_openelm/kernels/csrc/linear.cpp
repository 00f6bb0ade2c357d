// Few-row products x @ W.T for decoding: fp32 weights, and MLX's affine 4/8-bit weights.
//
// A decode step multiplies one row by every weight matrix, so it is bound by how fast the weights
// stream from memory. MLX sends that row to cblas_sgemm (or, quantized, to a scalar loop); these
// read each weight row once for all M input rows, eight lanes at a time, over all cores.
#include "kernels.h"

namespace oe {

namespace {

// How many weight rows a product reads at once differs by CPU, as measured. On the AMD EPYC VM,
// reading four at once (each with its own prefetch every 32 bytes) gave the prefetcher four
// streams per thread, and one sequential stream was faster: ~2x for the quantized products, ~10%
// for fp32 (the README has the figures). So the quantized products read one row at a time, and so
// does fp32 except on Intel: on the Xeon VM, a 32000 x 1280 fp32 product streamed 28 GB/s one row
// at a time (with a software prefetch 4 KB ahead; 24.5 without), 32 with 8 rows at once and no
// prefetch, 34 with 8 rows in 16-float vectors, as MKL's sgemv.
inline bool many_streams() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool intel = __builtin_cpu_is("intel");
  return intel;
#else
  return false;
#endif
}

// out[m, n + r] = x[m] . w[n + r] (+ res[m, n + r]) for MR input rows and NR weight rows at once.
// One weight row alone gets two accumulators per input row, to hide the FMA latency (one 16-float
// accumulator streamed 22 GB/s where two did 28), and a prefetch 4 KB ahead.
template <int MR, int NR>
inline void f32_rows(const float* x, const float* w, const float* res, float* out, int64_t K,
                     int64_t N, int64_t n) {
  using X = VecW;
  constexpr int U = NR == 1 ? 2 : 1;
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
template <int MR>
void f32_span(const float* x, const float* w, const float* res, float* out, int64_t K, int64_t N,
              int64_t n0, int64_t n1, bool many) {
  constexpr int NR = MR == 1 ? 8 : MR == 2 ? 4 : 2;  // at most 8 accumulators
  int64_t n = n0;
  if (many)
    for (; n + NR <= n1; n += NR) f32_rows<MR, NR>(x, w, res, out, K, N, n);
  for (; n < n1; n++) f32_rows<MR, 1>(x, w, res, out, K, N, n);
}

// Weight rows per tile: its 4-row blocks of input rows take it while it is in L2.
constexpr int64_t TILE = 16;

// out (M, N) = x (M, K) @ w.T (+ res), the input rows four at a time (what the registers hold).
// Past four, each tile of weight rows serves every block before the next one is read: with the
// blocks one after the other over all of w, eight rows (a server's batch) streamed w twice.
// A row's sums do not depend on its block, so each row gets what it would alone.
void f32_product(const float* x, const float* w, const float* res, float* out, int64_t M,
                 int64_t K, int64_t N) {
  const bool many = many_streams();
  parallel_for(N, 64, [&](int64_t n0, int64_t n1) {
    const int64_t tile = M > 4 ? TILE : n1 - n0;
    for (int64_t t0 = n0; t0 < n1; t0 += tile) {
      const int64_t t1 = std::min(n1, t0 + tile);
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const float* xm = x + m0 * K;
        const float* rm = res ? res + m0 * N : nullptr;
        float* om = out + m0 * N;
        switch (std::min<int64_t>(4, M - m0)) {
          case 1: f32_span<1>(xm, w, rm, om, K, N, t0, t1, many); break;
          case 2: f32_span<2>(xm, w, rm, om, K, N, t0, t1, many); break;
          case 3: f32_span<3>(xm, w, rm, om, K, N, t0, t1, many); break;
          default: f32_span<4>(xm, w, rm, om, K, N, t0, t1, many);
        }
      }
    }
  });
}

inline float to_f32(float v) { return v; }
inline float to_f32(mx::float16_t v) { return static_cast<float>(v); }
inline float to_f32(mx::bfloat16_t v) { return static_cast<float>(v); }

#ifdef OE_AVX2
// Eight scales or biases as floats.
inline __m256 load8f(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8f(const mx::float16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
}
inline __m256 load8f(const mx::bfloat16_t* p) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}
#endif

// sum_g biases[g] xsum[g]: a row's bias term, vectorised (as a scalar chain of dependent adds it
// was a tenth of a 1280-wide row's time).
template <typename S>
inline float bias_term(const S* biases, const float* xsum, int64_t groups) {
  int64_t g = 0;
  float t = 0;
#ifdef OE_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; g + 8 <= groups; g += 8) acc = _mm256_fmadd_ps(load8f(biases + g), _mm256_loadu_ps(xsum + g), acc);
  t = hsum(acc);
#endif
  for (; g < groups; g++) t += to_f32(biases[g]) * xsum[g];
  return t;
}

// n scales or biases as floats: `p` itself when they are, else converted into `buf`, eight at a
// time. The VNNI rows convert a row's once and read floats within; converting each where it was
// used made a folder with 16-bit scales (what `convert -q` writes on a Mac, and mlx-community's
// quantized models) decode up to 1.5x slower than one with float32 scales.
template <typename S>
inline const float* as_floats(const S* p, int64_t n, float* buf) {
  if constexpr (std::is_same_v<S, float>) {
    return p;
  } else {
    int64_t i = 0;
#ifdef OE_AVX2
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(buf + i, load8f(p + i));
#endif
    for (; i < n; i++) buf[i] = to_f32(p[i]);
    return buf;
  }
}

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

// How many weight rows ahead the quantized products prefetch (8-bit rows ran ~20% faster).
constexpr int64_t AHEAD = 4;

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

#ifdef OE_INT8_DOT
#ifdef OE_VNNI
inline __m256i dpbusd(__m256i acc, __m256i u8, __m256i s8) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u8, s8);
#else
  return _mm256_dpbusd_avx_epi32(acc, u8, s8);
#endif
}
#endif

// Each 32-bit lane's sum of its four u8 x s8 byte products, for two pairs of operands: the 4-bit
// product's low nibbles against x's even elements and high nibbles against its odd ones. Plain
// AVX2 has no dpbusd; maddubs + madd (llama.cpp's q4_0 route) give the same integers here, since
// nibbles (<= 15) times pieces (|p| <= 127) cannot reach maddubs' int16 saturation: the two pair
// sums add to at most 4 * 15 * 127 = 7620. An 8-bit weight could, so 8-bit needs VNNI.
inline __m256i dot_nibbles(__m256i lo, __m256i even, __m256i hi, __m256i odd) {
#ifdef OE_VNNI
  return dpbusd(dpbusd(_mm256_setzero_si256(), lo, even), hi, odd);
#else
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, even), _mm256_maddubs_epi16(hi, odd));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
#endif
}

// One-row 4- and 8-bit products with integer dot products (VNNI: 32 unsigned-by-signed byte
// products per 256-bit instruction, against one float FMA per eight weights above), keeping
// float32 accuracy: each 32-element block of x is split into three int8 pieces,
// x = d (p1 + p2 / 254 + p3 / 254^2), which leaves an error of d / 2 / 254^3 (~6e-8 of the
// block's largest |x|), below float32's own rounding in the sums. A single int8 piece, as
// llama.cpp's q8 activations, would be ~4e-3 off.
constexpr int PIECES = 3;
constexpr float PIECE = 254.f;

// Where chunk c's (64 elements of x) even and odd elements start in a piece: x goes in blocks of
// 128 (the last may be 64), the even elements of the block's chunks first, then the odd ones, as
// the low and high nibbles of the block's weight bytes hold them. One 512-bit load of weights then
// meets one load of x for each nibble; a 256-bit load is one chunk of each half.
struct ChunkAt {
  int64_t even, odd;
};
inline ChunkAt chunk_at(int64_t c, int64_t K) {
  const int64_t block = c / 2 * 128, chunks = block + 128 <= K ? 2 : 1;
  const int64_t even = block + c % 2 * 32;
  return {even, even + 32 * chunks};
}

inline __m256i pack_int8(__m256 a, __m256 b, __m256 c, __m256 d) {  // 32 integral floats, in order
  const __m256i ab = _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b));
  const __m256i cd = _mm256_packs_epi32(_mm256_cvtps_epi32(c), _mm256_cvtps_epi32(d));
  return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd),
                                     _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// x (K floats, K % 64 == 0) -> PIECES rows of K int8 and each 32-block's d. For 4-bit weights
// (NIBBLES) the pieces are laid out as chunk_at says and d is spread over the lanes that the
// block's products land in: dl[8c .. 8c+3] for chunk c's first 32 elements, dl[8c+4 .. 8c+7] for
// the others. For 8-bit weights they are in x's order and dl[b] is block b's d.
template <bool NIBBLES>
inline void split_x(const float* x, int64_t K, int8_t* pieces, float* dl) {
  const __m256 sign = _mm256_set1_ps(-0.0f), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  const __m256 piece = _mm256_set1_ps(PIECE);
  for (int64_t c = 0; c < K / 64; c++) {
    const float* xc = x + c * 64;
    __m256 r[8], inv[2];
    for (int h = 0; h < 2; h++) {  // the two 32-blocks
      __m256 m = _mm256_setzero_ps();
      for (int i = 0; i < 4; i++) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(xc + 32 * h + 8 * i)));
      const float largest = hmax(m);
      if constexpr (NIBBLES) std::fill_n(dl + 8 * c + 4 * h, 4, largest / 127);
      else dl[2 * c + h] = largest / 127;
      inv[h] = _mm256_set1_ps(largest > 0 ? 127 / largest : 0);
    }
    // Each times its block's 127 / max. With NIBBLES, r[0..3] are the even elements in order and
    // r[4..7] the odd ones; else r[0..3] are the first 32-block and r[4..7] the second.
    for (int i = 0; i < 4; i++) {
      if constexpr (NIBBLES) {
        const __m256 a = _mm256_loadu_ps(xc + 16 * i), b = _mm256_loadu_ps(xc + 16 * i + 8);
        const __m256 ev = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
        const __m256 od = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
        r[i] = _mm256_mul_ps(_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ev), 0xD8)), inv[i / 2]);
        r[4 + i] = _mm256_mul_ps(_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(od), 0xD8)), inv[i / 2]);
      } else {
        r[i] = _mm256_mul_ps(_mm256_loadu_ps(xc + 8 * i), inv[0]);
        r[4 + i] = _mm256_mul_ps(_mm256_loadu_ps(xc + 32 + 8 * i), inv[1]);
      }
    }
    const ChunkAt at = NIBBLES ? chunk_at(c, K) : ChunkAt{c * 64, c * 64 + 32};
    for (int p = 0; p < PIECES; p++) {
      __m256 q[8];
      for (int i = 0; i < 8; i++) {
        q[i] = _mm256_round_ps(r[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q[i] = _mm256_min_ps(_mm256_max_ps(q[i], lo), hi);
        r[i] = _mm256_mul_ps(_mm256_sub_ps(r[i], q[i]), piece);
      }
      _mm256_storeu_si256((__m256i*)(pieces + p * K + at.even), pack_int8(q[0], q[1], q[2], q[3]));
      _mm256_storeu_si256((__m256i*)(pieces + p * K + at.odd), pack_int8(q[4], q[5], q[6], q[7]));
    }
  }
}

// The scales of 32-blocks b and b + 1 (sidx: each block's group) over the 8 lanes that their
// products land in.
inline __m256 lane_scales8(const float* sr, const int32_t* sidx, int64_t b) {
  return _mm256_set_m128(_mm_set1_ps(sr[sidx[b + 1]]), _mm_set1_ps(sr[sidx[b]]));
}

#ifdef OE_VNNI512
// The scales of 32-blocks b .. b + 3 over the 16 lanes that their products land in (4 each). In
// groups of 32, 64 or 128 (what `convert -q` writes) that is one load and at most one permute:
// building it from four scalars took a quarter of the loop's instructions.
inline __m512 lane_scales16(const float* sr, const int32_t* sidx, int64_t b, int64_t gs) {
  const __m512i spread4 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i spread2 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  if (gs == 32) return _mm512_permutexvar_ps(spread4, _mm512_castps128_ps512(_mm_loadu_ps(sr + b)));
  if (gs == 64) {
    const __m128 two = _mm_castpd_ps(_mm_load_sd((const double*)(sr + b / 2)));
    return _mm512_permutexvar_ps(spread2, _mm512_castps128_ps512(two));
  }
  if (gs % 128 == 0) return _mm512_set1_ps(sr[sidx[b]]);
  const __m128 s4 = _mm_setr_ps(sr[sidx[b]], sr[sidx[b + 1]], sr[sidx[b + 2]], sr[sidx[b + 3]]);
  return _mm512_permutexvar_ps(spread4, _mm512_castps128_ps512(s4));
}
#endif

// The pieces' lane sums (piece p in units of d / 254^p) as one float. They are combined in the
// lanes, so a row ends in one horizontal sum rather than one per piece.
inline __m256 combine_pieces(const __m256* acc) {
  return _mm256_fmadd_ps(acc[2], _mm256_set1_ps(1 / (PIECE * PIECE)),
                         _mm256_fmadd_ps(acc[1], _mm256_set1_ps(1 / PIECE), acc[0]));
}
#ifdef OE_VNNI512
inline __m512 combine_pieces(const __m512* acc) {
  return _mm512_fmadd_ps(acc[2], _mm512_set1_ps(1 / (PIECE * PIECE)),
                         _mm512_fmadd_ps(acc[1], _mm512_set1_ps(1 / PIECE), acc[0]));
}
#endif
static_assert(PIECES == 3, "combine_pieces sums three pieces");

// Row n of a one-row 4-bit product; sr and br are its scales and biases as floats.
inline void q4_row_vnni(const int8_t* pieces, const float* dl, const int32_t* sidx,
                        const float* xsum, const uint8_t* w, const float* sr, const float* br,
                        const float* res, float* out, int64_t K, int64_t gs, int64_t n) {
  const int64_t row_bytes = K / 2, chunks = K / 64;
  const uint8_t* wr = w + n * row_bytes;
  float total = bias_term(br, xsum, K / gs) + (res ? res[n] : 0.0f);
  int64_t c = 0;
#ifdef OE_VNNI512
  {
    const __m512i low4 = _mm512_set1_epi8(15);
    __m512 acc[PIECES];
    for (int p = 0; p < PIECES; p++) acc[p] = _mm512_setzero_ps();
    for (; c + 2 <= chunks; c += 2) {  // a block of 128: two chunks
      _mm_prefetch((const char*)(wr + AHEAD * row_bytes + c * 32), _MM_HINT_T0);
      const __m512i bytes = _mm512_loadu_si512((const void*)(wr + c * 32));
      const __m512i lo = _mm512_and_si512(bytes, low4);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4);
      __m512i sum[PIECES];
      for (int p = 0; p < PIECES; p++) {
        const int8_t* xp = pieces + p * K + c * 64;
        sum[p] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xp)),
                                     hi, _mm512_loadu_si512(xp + 64));
      }
      const __m512 mult = _mm512_mul_ps(lane_scales16(sr, sidx, 2 * c, gs), _mm512_loadu_ps(dl + 8 * c));
      for (int p = 0; p < PIECES; p++) acc[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[p]), mult, acc[p]);
    }
    total += _mm512_reduce_add_ps(combine_pieces(acc));
  }
#endif
  if (c == chunks) {
    out[n] = total;
    return;
  }
  const __m256i low4 = _mm256_set1_epi8(15);
  __m256 acc[PIECES];
  for (int p = 0; p < PIECES; p++) acc[p] = _mm256_setzero_ps();
  for (; c < chunks; c++) {
    _mm_prefetch((const char*)(wr + AHEAD * row_bytes + c * 32), _MM_HINT_T0);
    const __m256i bytes = _mm256_loadu_si256((const __m256i*)(wr + c * 32));
    const __m256i lo = _mm256_and_si256(bytes, low4);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
    const ChunkAt at = chunk_at(c, K);
    __m256i sum[PIECES];
    for (int p = 0; p < PIECES; p++) {
      const int8_t* xp = pieces + p * K;
      sum[p] = dot_nibbles(lo, _mm256_loadu_si256((const __m256i*)(xp + at.even)), hi,
                           _mm256_loadu_si256((const __m256i*)(xp + at.odd)));
    }
    // Lanes 0-3 hold elements 0-31 of these 64, lanes 4-7 elements 32-63.
    const __m256 mult = _mm256_mul_ps(lane_scales8(sr, sidx, 2 * c), _mm256_loadu_ps(dl + 8 * c));
    for (int p = 0; p < PIECES; p++) acc[p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[p]), mult, acc[p]);
  }
  out[n] = total + hsum(combine_pieces(acc));
}

#ifdef OE_VNNI
// 8-bit decode with the same integer products. The weight bytes are the unsigned operand as they
// are, and x's pieces lie in order, so a 32-element block is one 256-bit dpbusd per piece whose 8
// lanes all carry that block's weight scale and d.
inline void q8_row_vnni(const int8_t* pieces, const float* d, const int32_t* sidx, const float* xsum,
                        const uint8_t* w, const float* sr, const float* br, const float* res,
                        float* out, int64_t K, int64_t gs, int64_t n) {
  const int64_t blocks = K / 32;
  const uint8_t* wr = w + n * K;
  float total = bias_term(br, xsum, K / gs) + (res ? res[n] : 0.0f);
  int64_t b = 0;
#ifdef OE_VNNI512
  {
    __m512 acc[PIECES];
    for (int p = 0; p < PIECES; p++) acc[p] = _mm512_setzero_ps();
    for (; b + 2 <= blocks; b += 2) {  // 64 bytes: one cache line, two blocks
      _mm_prefetch((const char*)(wr + AHEAD * K + b * 32), _MM_HINT_T0);
      const __m512i bytes = _mm512_loadu_si512((const void*)(wr + b * 32));
      const __m256 lo = _mm256_set1_ps(sr[sidx[b]] * d[b]);
      const __m256 hi = _mm256_set1_ps(sr[sidx[b + 1]] * d[b + 1]);
      const __m512 mult = _mm512_castpd_ps(_mm512_insertf64x4(
          _mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
      for (int p = 0; p < PIECES; p++) {
        const __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), bytes,
                                                _mm512_loadu_si512(pieces + p * K + b * 32));
        acc[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), mult, acc[p]);
      }
    }
    total += _mm512_reduce_add_ps(combine_pieces(acc));
  }
#endif
  if (b == blocks) {
    out[n] = total;
    return;
  }
  __m256 acc[PIECES];
  for (int p = 0; p < PIECES; p++) acc[p] = _mm256_setzero_ps();
  for (; b < blocks; b++) {
    if (b % 2 == 0) _mm_prefetch((const char*)(wr + AHEAD * K + b * 32), _MM_HINT_T0);
    const __m256i bytes = _mm256_loadu_si256((const __m256i*)(wr + b * 32));
    const __m256 mult = _mm256_set1_ps(sr[sidx[b]] * d[b]);
    for (int p = 0; p < PIECES; p++) {
      const __m256i sum = dpbusd(_mm256_setzero_si256(), bytes,
                                 _mm256_loadu_si256((const __m256i*)(pieces + p * K + b * 32)));
      acc[p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), mult, acc[p]);
    }
  }
  out[n] = total + hsum(combine_pieces(acc));
}
#endif

// Input rows that take the integer rows (one at a time each); more go to the float rows below.
constexpr int64_t MAX_INT8_ROWS = 16;

// Whether the integer rows take this shape: whole 64-element chunks, none across two groups.
inline bool vnni_fits(int64_t K, int64_t gs) { return K % 64 == 0 && (gs == 32 || gs % 64 == 0); }
#endif

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

// ---- fp32 -------------------------------------------------------------------------------------

class LinearF32 : public CpuPrimitive {
 public:
  LinearF32(mx::Stream s, Fusion fusion)
      : CpuPrimitive(s, [s, fusion](const std::vector<mx::array>& in) {
          return fused_reference(fusion, in, 2, s, [&](mx::array x) {
            return mx::matmul(x, mx::transpose(in[1], s), s);
          });
        }),
        fusion_(fusion) {}
  const char* name() const override { return "OpenELMLinear"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return fusion_ == static_cast<const LinearF32&>(other).fusion_;
  }

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

// ---- MLX affine quantized -----------------------------------------------------------------------

class QuantizedLinear : public CpuPrimitive {
 public:
  QuantizedLinear(mx::Stream s, int group_size, int bits, Fusion fusion)
      : CpuPrimitive(s, [s, group_size, bits, fusion](const std::vector<mx::array>& in) {
          return fused_reference(fusion, in, 4, s, [&](mx::array x) {
            return mx::quantized_matmul(x, in[1], in[2], in[3], true, group_size, bits, "affine",
                                        s);
          });
        }),
        group_size_(group_size), bits_(bits), fusion_(fusion) {}
  const char* name() const override { return "OpenELMQuantizedLinear"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QuantizedLinear&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_ && fusion_ == o.fusion_;
  }

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
        // dots one by one while the weight row is in L1, so each gets what it would alone.
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
              for (int64_t m = 0; m < M; m++) {
                const int8_t* pm = pieces + m * stride;
                const float *dm = dl.data() + m * (K / 8), *xs = xsum.data() + m * groups;
                const float* rm = rp ? rp + m * N : nullptr;
                if (bits == 4)
                  q4_row_vnni(pm, dm, sidx.data(), xs, wp, sr, br, rm, op + m * N, K, gs, n);
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

class Dequantize : public CpuPrimitive {
 public:
  Dequantize(mx::Stream s, int group_size, int bits)
      : CpuPrimitive(s, [s, group_size, bits](const std::vector<mx::array>& in) {
          return std::vector<mx::array>{mx::dequantize(in[0], in[1], in[2], group_size, bits,
                                                       "affine", std::nullopt, mx::float32, s)};
        }),
        group_size_(group_size), bits_(bits) {}
  const char* name() const override { return "OpenELMDequantize"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Dequantize&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_;
  }

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
