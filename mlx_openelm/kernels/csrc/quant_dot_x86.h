// The decoding 4- and 8-bit products in integer dot products (VNNI's dpbusd, or AVX2's maddubs):
// x split into int8 pieces, each 32-element block's products summed as integers. Per instruction
// set, as ggml's arch/x86/quants.c: the float code of the other kernels is written once over VecW
// (vec.h), these are not.
#pragma once

#include "quantized.h"

namespace oe {

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

// One-row 4- and 8-bit products with integer dot products (32 unsigned-by-signed byte
// products per 256-bit instruction, against one float FMA per eight weights in q_row), keeping
// float32 accuracy: each 32-element block of x is split into three int8 pieces,
// x = d (p1 + p2 / 254 + p3 / 254^2), which leaves an error of d / 2 / 254^3 (~6e-8 of the
// block's largest |x|), below float32's own rounding in the sums. A single int8 piece, as
// llama.cpp's q8 activations, would be ~4e-3 off.
constexpr int PIECES = 3;
constexpr float PIECE = 254.f;

// A 64-element chunk of 4-bit weights (lo: the low nibbles, x's even elements; hi: the high
// ones, the odd) against x's three pieces (e[p], o[p]: piece p's even and odd elements), in two
// exact int32 sums a lane: s1 = q . p1 and s23 = q . (254 p2 + p3). Each lane holds 8 products,
// so |s| <= 8 * 15 * 127 = 15240 and |s23| <= 255 * 15240 < 2^24: both convert to float exactly,
// and the chunk costs two conversions and FMAs instead of one per piece. Plain AVX2 has no
// dpbusd: maddubs + madd (llama.cpp's q4_0 route) give the same integers here, since nibbles
// (<= 15) times pieces (|p| <= 127) cannot reach maddubs' int16 saturation: a lane's two pair
// sums add to at most 4 * 15 * 127 = 7620. 8-bit weights could: see q8_row_int16.
inline void dot_chunk(__m256i lo, __m256i hi, const __m256i* e, const __m256i* o, __m256i& s1,
                      __m256i& s23) {
#ifdef OE_VNNI
  const __m256i zero = _mm256_setzero_si256();
  s1 = dpbusd(dpbusd(zero, lo, e[0]), hi, o[0]);
  const __m256i s2 = dpbusd(dpbusd(zero, lo, e[1]), hi, o[1]);
  s23 = dpbusd(dpbusd(_mm256_mullo_epi32(s2, _mm256_set1_epi32(254)), lo, e[2]), hi, o[2]);
#else
  __m256i pairs[PIECES];
  for (int p = 0; p < PIECES; p++)
    pairs[p] = _mm256_add_epi16(_mm256_maddubs_epi16(lo, e[p]), _mm256_maddubs_epi16(hi, o[p]));
  const __m256i one = _mm256_set1_epi16(1);
  s1 = _mm256_madd_epi16(pairs[0], one);
  s23 = _mm256_add_epi32(_mm256_madd_epi16(pairs[1], _mm256_set1_epi16(254)),
                         _mm256_madd_epi16(pairs[2], one));
#endif
}

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

// The largest |x| of 32 floats: a block's scale for its integer pieces.
inline float abs_max32(const float* x) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  for (int i = 0; i < 4; i++) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + 8 * i)));
  return hmax(m);
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
  const __m256 lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  const __m256 piece = _mm256_set1_ps(PIECE);
  for (int64_t c = 0; c < K / 64; c++) {
    const float* xc = x + c * 64;
    __m256 r[8], inv[2];
    for (int h = 0; h < 2; h++) {  // the two 32-blocks
      const float largest = abs_max32(xc + 32 * h);
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
static_assert(PIECES == 3, "combine_pieces and dot_chunk sum three pieces");

// Row n of a 4-bit product for R input rows at once (sr, br: its scales and biases as floats;
// pieces, dl, xsum, res and out of row r at r times their strides). Each chunk of weight bytes is
// unpacked once for all R rows, and each row takes exactly the operations, in the order, that it
// takes with R = 1, so a server's batch gives each row the bits it would get alone.
template <int R>
inline void q4_rows_int8(const int8_t* pieces, int64_t piece_stride, const float* dl,
                         const int32_t* sidx, const float* xsum, const uint8_t* w, const float* sr,
                         const float* br, const float* res, float* out, int64_t N, int64_t K,
                         int64_t gs, int64_t n) {
  const int64_t row_bytes = K / 2, chunks = K / 64, groups = K / gs;
  const uint8_t* wr = w + n * row_bytes;
  float total[R];
  for (int r = 0; r < R; r++)
    total[r] = bias_term(br, xsum + r * groups, groups) + (res ? res[r * N + n] : 0.0f);
  int64_t c = 0;
#ifdef OE_VNNI512
  {
    const __m512i low4 = _mm512_set1_epi8(15);
    __m512 acc[R][PIECES];
    for (int r = 0; r < R; r++)
      for (int p = 0; p < PIECES; p++) acc[r][p] = _mm512_setzero_ps();
    for (; c + 2 <= chunks; c += 2) {  // a block of 128: two chunks
      _mm_prefetch((const char*)(wr + AHEAD * row_bytes + c * 32), _MM_HINT_T0);
      const __m512i bytes = _mm512_loadu_si512((const void*)(wr + c * 32));
      const __m512i lo = _mm512_and_si512(bytes, low4);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4);
      const __m512 scale = lane_scales16(sr, sidx, 2 * c, gs);
      for (int r = 0; r < R; r++) {
        const int8_t* pr = pieces + r * piece_stride;
        const __m512 mult = _mm512_mul_ps(scale, _mm512_loadu_ps(dl + r * (K / 8) + 8 * c));
        for (int p = 0; p < PIECES; p++) {
          const int8_t* xp = pr + p * K + c * 64;
          const __m512i sum = _mm512_dpbusd_epi32(
              _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xp)), hi,
              _mm512_loadu_si512(xp + 64));
          acc[r][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), mult, acc[r][p]);
        }
      }
    }
    for (int r = 0; r < R; r++) total[r] += _mm512_reduce_add_ps(combine_pieces(acc[r]));
  }
#endif
  if (c == chunks) {
    for (int r = 0; r < R; r++) out[r * N + n] = total[r];
    return;
  }
  // 256 bits at a time: a chunk of 64 elements. acc[r][0] sums piece 1, acc[r][1] pieces 2-3.
  __m256 acc[R][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  // Chunk c (x's even elements at `even` in each piece, odd at `odd`): lanes 0-3 hold its
  // elements 0-31, lanes 4-7 elements 32-63.
  auto chunk = [&](int64_t c, int64_t even, int64_t odd) __attribute__((always_inline)) {
    const __m256i bytes = _mm256_loadu_si256((const __m256i*)(wr + c * 32));
    const __m256i low4 = _mm256_set1_epi8(15);
    const __m256i lo = _mm256_and_si256(bytes, low4);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
    const __m256 scale = gs == 32 ? lane_scales8(sr, sidx, 2 * c) : _mm256_broadcast_ss(sr + sidx[2 * c]);
    for (int r = 0; r < R; r++) {
      const int8_t* xp = pieces + r * piece_stride;
      __m256i e[PIECES], o[PIECES], s1, s23;
      for (int p = 0; p < PIECES; p++) {
        e[p] = _mm256_loadu_si256((const __m256i*)(xp + p * K + even));
        o[p] = _mm256_loadu_si256((const __m256i*)(xp + p * K + odd));
      }
      dot_chunk(lo, hi, e, o, s1, s23);
      const __m256 mult = _mm256_mul_ps(scale, _mm256_loadu_ps(dl + r * (K / 8) + 8 * c));
      acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), mult, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s23), mult, acc[r][1]);
    }
  };
  for (; c + 2 <= chunks; c += 2) {  // a block of 128: even elements first, then the odd ones
    _mm_prefetch((const char*)(wr + AHEAD * row_bytes + c * 32), _MM_HINT_T0);
    chunk(c, c * 64, c * 64 + 64);
    chunk(c + 1, c * 64 + 32, c * 64 + 96);
  }
  if (c < chunks) chunk(c, c * 64, c * 64 + 32);  // a last block of 64
  const __m256 unit23 = _mm256_set1_ps(1 / (PIECE * PIECE));
  for (int r = 0; r < R; r++)
    out[r * N + n] = total[r] + hsum(_mm256_fmadd_ps(acc[r][1], unit23, acc[r][0]));
}

// Input rows that q4_rows takes at once: more would spill the accumulators out of AVX2's 16
// registers.
constexpr int64_t Q4_ROWS = 4;

template <class... Args>
inline void q4_rows(int64_t rows, Args... args) {
  switch (rows) {
    case 1: return q4_rows_int8<1>(args...);
    case 2: return q4_rows_int8<2>(args...);
    case 3: return q4_rows_int8<3>(args...);
    default: return q4_rows_int8<4>(args...);
  }
}

#ifdef OE_VNNI
// 8-bit decode with the same integer products: dpbusd takes the weight bytes as they are. x's
// pieces lie in order, so a 32-element block is one 256-bit product per piece whose 8 lanes all
// carry that block's weight scale and d.
inline void q8_row_int8(const int8_t* pieces, const float* d, const int32_t* sidx, const float* xsum,
                        const uint8_t* w, const float* sr, const float* br, const float* res,
                        float* out, int64_t K, int64_t gs, int64_t n) {
  const int64_t blocks = K / 32, groups = K / gs;
  const uint8_t* wr = w + n * K;
  float total = bias_term(br, xsum, groups) + (res ? res[n] : 0.0f);
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
    const __m256i q = _mm256_loadu_si256((const __m256i*)(wr + b * 32));
    const __m256 mult = _mm256_set1_ps(sr[sidx[b]] * d[b]);
    for (int p = 0; p < PIECES; p++) {
      const __m256i sum = dpbusd(_mm256_setzero_si256(), q,
                                 _mm256_loadu_si256((const __m256i*)(pieces + p * K + b * 32)));
      acc[p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), mult, acc[p]);
    }
  }
  out[n] = total + hsum(combine_pieces(acc));
}
#else
// Plain AVX2 has no byte dot product that takes 8-bit weights whole: maddubs sums two byte
// products in int16 and would saturate (255 * 127 * 2 > 32767). So x goes in two int16 pieces
// per 32-element block, x = d (p1 + p2 / 32766) with |p| <= 16383 (an error of d / 65532, ~1e-9
// of the block's largest |x|), against the weight bytes widened to int16 (madd: 16 products an
// instruction, two to a lane). A lane sums 4 products, |s| <= 4 * 255 * 16383 < 2^24: exact as a
// float. That is 4 multiplies a block where three int8 pieces through maddubs took 6 and 3 sign
// flips: the 270M's 8-bit decode ran 1.09x faster (2-core AMD EPYC VM, no VNNI).
constexpr float PIECE16 = 32766.f, LIMIT16 = 16383.f;

// x (K floats, K % 32 == 0) -> two rows of K int16 pieces in x's order, and each 32-block's d.
inline void split_x16(const float* x, int64_t K, int16_t* pieces, float* d) {
  const __m256 hi = _mm256_set1_ps(LIMIT16), lo = _mm256_set1_ps(-LIMIT16);
  for (int64_t b = 0; b < K / 32; b++) {
    const float* xb = x + b * 32;
    const float largest = abs_max32(xb);
    d[b] = largest / LIMIT16;
    const __m256 inv = _mm256_set1_ps(largest > 0 ? LIMIT16 / largest : 0);
    __m256 r[4];
    for (int i = 0; i < 4; i++) r[i] = _mm256_mul_ps(_mm256_loadu_ps(xb + 8 * i), inv);
    for (int p = 0; p < 2; p++) {
      __m256i q[4];
      for (int i = 0; i < 4; i++) {
        __m256 f = _mm256_round_ps(r[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        f = _mm256_min_ps(_mm256_max_ps(f, lo), hi);
        r[i] = _mm256_mul_ps(_mm256_sub_ps(r[i], f), _mm256_set1_ps(PIECE16));
        q[i] = _mm256_cvtps_epi32(f);
      }
      // packs works within 128-bit halves: put the 64-bit quarters back in order
      int16_t* out = pieces + p * K + b * 32;
      _mm256_storeu_si256((__m256i*)out, _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8));
      _mm256_storeu_si256((__m256i*)(out + 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8));
    }
  }
}

inline void q8_row_int16(const int16_t* pieces, const float* d, const int32_t* sidx,
                         const float* xsum, const uint8_t* w, const float* sr, const float* br,
                         const float* res, float* out, int64_t K, int64_t gs, int64_t n) {
  const int64_t blocks = K / 32, groups = K / gs;
  const uint8_t* wr = w + n * K;
  const float total = bias_term(br, xsum, groups) + (res ? res[n] : 0.0f);
  __m256 acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; b++) {
    if (b % 2 == 0) _mm_prefetch((const char*)(wr + AHEAD * K + b * 32), _MM_HINT_T0);
    const __m256i w0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(wr + b * 32)));
    const __m256i w1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(wr + b * 32 + 16)));
    const __m256i* p1 = (const __m256i*)(pieces + b * 32);
    const __m256i* p2 = (const __m256i*)(pieces + K + b * 32);
    const __m256i s1 = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(p1)),
                                        _mm256_madd_epi16(w1, _mm256_loadu_si256(p1 + 1)));
    const __m256i s2 = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(p2)),
                                        _mm256_madd_epi16(w1, _mm256_loadu_si256(p2 + 1)));
    const __m256 mult = _mm256_set1_ps(sr[sidx[b]] * d[b]);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), mult, acc1);
    acc2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s2), mult, acc2);
  }
  out[n] = total + hsum(_mm256_fmadd_ps(acc2, _mm256_set1_ps(1 / PIECE16), acc1));
}
#endif

// The 8-bit rows' x pieces per ISA, behind one interface: PIECES int8 rows or two int16 ones.
inline int64_t q8_piece_bytes(int64_t K) {
#ifdef OE_VNNI
  return PIECES * K;
#else
  return 2 * K * int64_t(sizeof(int16_t));
#endif
}
inline void split_x8(const float* x, int64_t K, int8_t* pieces, float* d) {
#ifdef OE_VNNI
  split_x<false>(x, K, pieces, d);
#else
  split_x16(x, K, reinterpret_cast<int16_t*>(pieces), d);
#endif
}
template <class... Args>
inline void q8_row(const int8_t* pieces, Args... args) {
#ifdef OE_VNNI
  q8_row_int8(pieces, args...);
#else
  q8_row_int16(reinterpret_cast<const int16_t*>(pieces), args...);
#endif
}

// Input rows that take the integer dots (a server's batch); more go to the float rows (q_row).
constexpr int64_t MAX_INT8_ROWS = 16;

// Whether the integer rows take this shape: whole 64-element chunks, none across two groups.
inline bool int8_fits(int64_t K, int64_t gs) { return K % 64 == 0 && (gs == 32 || gs % 64 == 0); }
#endif

}  // namespace oe
