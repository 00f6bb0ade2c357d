// The ops the Python module binds: each builds an array whose primitive runs a CPU kernel.
#pragma once

#include <optional>

#include "common.h"

namespace oe {

// x (..., K) @ w.T, w (N, K): for a few rows (decoding).
// pre(x) @ w.T (+ residual), pre being RMSNorm with `norm_weight` and `eps`, the SiLU gate (x is
// then (..., 2K)) or nothing: a decoding product with the ops beside it (linear.cpp says why).
mx::array linear(const mx::array& x, const mx::array& w,
                 const std::optional<mx::array>& norm_weight = std::nullopt, float eps = 0,
                 bool gate = false, const std::optional<mx::array>& residual = std::nullopt,
                 mx::StreamOrDevice s = {});

// The same with MLX's affine quantized w (N, K*bits/32 uint32), scales and biases (N, K/group).
mx::array quantized_linear(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits,
                           const std::optional<mx::array>& norm_weight = std::nullopt,
                           float eps = 0, bool gate = false,
                           const std::optional<mx::array>& residual = std::nullopt,
                           mx::StreamOrDevice s = {});

// x (..., K) @ dequantize(w).T -> (..., N) (transpose), or x (..., N) @ dequantize(w) -> (..., K)
// (the gradient of x in the first), for many rows: mx::quantized_matmul's arguments.
mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, bool transpose, int group_size, int bits,
                           mx::StreamOrDevice s = {});

// x * rsqrt(mean(x^2) + eps) * weight over the last axis.
mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps,
                   mx::StreamOrDevice s = {});

// silu(x[..., :F]) * x[..., F:] for x (..., 2F).
mx::array silu_gate(const mx::array& x, mx::StreamOrDevice s = {});

// qkv (B, L, nq + 2 nkv, hd) -> q (B, nq, L, hd), k, v (B, nkv, L, hd): q/k RMS-normed over hd
// (when weights are given), then rotated (NeoX RoPE from position `offset`; inv_freqs (hd/2,)
// as MLX's RoPE makes them from `base`, which the gradient's reference uses).
std::vector<mx::array> attention_inputs(const mx::array& qkv, int n_heads, int n_kv_heads,
                                        const std::optional<mx::array>& q_weight,
                                        const std::optional<mx::array>& k_weight, float eps,
                                        const mx::array& inv_freqs, float base, int offset,
                                        mx::StreamOrDevice s = {});

// Shared by the kernels that take qkv (norm.cpp): the check of their inputs, and their reference:
// q, k, v (B, heads, L, hd), q and k RMS-normed with their weights (when given) and rotated.
void check_heads(const char* op, const mx::array& qkv, int n_heads, int n_kv_heads,
                 const mx::array& inv_freqs);
std::vector<mx::array> split_heads_reference(const mx::array& qkv, int nq, int nkv,
                                             const mx::array* q_weight, const mx::array* k_weight,
                                             float eps, float base, int offset, mx::Stream s);

// softmax(scale q k^T [causal]) v for q (B, nq, L, hd), k, v (B, nkv, S, hd) (strided views of
// a cache are fine); query i sees keys up to S - L + i when causal. Returns (B, L, nq, hd).
mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                    bool causal, mx::StreamOrDevice s = {});

// The gradient of `attention` (dq, dk, dv) is a kernel as well: Attention's vjp builds it.

// A KV cache of one buffer kv (B, 2, n_kv_heads, capacity, head_dim): keys, then values.
// kv_write: kv with qkv's k rows (k-normed when k_weight is given, rotated from `offset`) and v
// rows at positions offset .. offset + L - 1; in place when kv is MLX's to give (nothing else
// holds it), else on a copy. With row >= 0, kv (1, ...) takes qkv's row `row` alone.
mx::array kv_write(const mx::array& kv, const mx::array& qkv, int n_heads, int n_kv_heads,
                   const std::optional<mx::array>& k_weight, float eps, const mx::array& inv_freqs,
                   float base, int offset, int row = -1, mx::StreamOrDevice s = {});

// cached_attention: attention of qkv's q rows (q-normed, rotated from `offset`) over kv's first
// offset + L positions, causal; (B, L, n_heads * head_dim).
mx::array cached_attention(const mx::array& qkv, const mx::array& kv, int n_heads, int n_kv_heads,
                           const std::optional<mx::array>& q_weight, float eps,
                           const mx::array& inv_freqs, float base, int offset, float scale,
                           mx::StreamOrDevice s = {});

// rows_attention: a batch of sequences of their own lengths, one decoding step: qkv (B, 1, ...)
// row b's q (q-normed, rotated to position offsets[b]) over kvs[b] (1, 2, n_kv_heads, capacity,
// head_dim), its first offsets[b] + 1 positions (written by kv_write with row b); (B, 1, n_heads *
// head_dim). Each row is the same bits as cached_attention of that row alone.
mx::array rows_attention(const mx::array& qkv, const std::vector<mx::array>& kvs,
                         const std::vector<int>& offsets, int n_heads, int n_kv_heads,
                         const std::optional<mx::array>& q_weight, float eps,
                         const mx::array& inv_freqs, float base, float scale,
                         mx::StreamOrDevice s = {});

// logsumexp(logits) - logits[target] over the last axis, for targets of logits' shape without it
// (an out-of-range target gives NaN). Its gradient is a kernel too.
mx::array cross_entropy(const mx::array& logits, const mx::array& targets,
                        mx::StreamOrDevice s = {});

mx::array log_softmax(const mx::array& x, mx::StreamOrDevice s = {});

}  // namespace oe
