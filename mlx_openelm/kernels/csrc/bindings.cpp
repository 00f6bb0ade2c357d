// Python bindings: nanobind in MLX's domain, so mlx.core.array crosses without a copy.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "kernels.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_openelm_kernels, m) {
  m.doc() = "mlx-openelm's CPU kernels (AVX2/FMA where the compiler targets it, on thread_pool.h's threads)";
#ifdef OE_AVX2
  m.attr("avx2") = true;
#else
  m.attr("avx2") = false;
#endif
#ifdef OE_VNNI
  m.attr("vnni") = true;
#else
  m.attr("vnni") = false;
#endif
#ifdef OE_VNNI512
  m.attr("vnni512") = true;
#else
  m.attr("vnni512") = false;
#endif
  m.def("linear", &oe::linear, "x"_a, "w"_a, nb::kw_only(), "norm_weight"_a = nb::none(),
        "eps"_a = 0.0f, "gate"_a = false, "residual"_a = nb::none(), "stream"_a = nb::none());
  m.def("quantized_linear", &oe::quantized_linear, "x"_a, "w"_a, "scales"_a, "biases"_a,
        "group_size"_a, "bits"_a, nb::kw_only(), "norm_weight"_a = nb::none(), "eps"_a = 0.0f,
        "gate"_a = false, "residual"_a = nb::none(), "stream"_a = nb::none());
  m.def("quantized_matmul", &oe::quantized_matmul, "x"_a, "w"_a, "scales"_a, "biases"_a,
        "transpose"_a, "group_size"_a, "bits"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("rms_norm", &oe::rms_norm, "x"_a, "weight"_a, "eps"_a, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("silu_gate", &oe::silu_gate, "x"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("attention_inputs", &oe::attention_inputs, "qkv"_a, "n_heads"_a, "n_kv_heads"_a,
        "q_weight"_a.none(), "k_weight"_a.none(), "eps"_a, "inv_freqs"_a, "base"_a, "offset"_a,
        nb::kw_only(), "stream"_a = nb::none());
  m.def("attention", &oe::attention, "q"_a, "k"_a, "v"_a, "scale"_a, "causal"_a, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("kv_write", &oe::kv_write, "kv"_a, "qkv"_a, "n_heads"_a, "n_kv_heads"_a,
        "k_weight"_a.none(), "eps"_a, "inv_freqs"_a, "base"_a, "offset"_a, nb::kw_only(),
        "row"_a = -1, "stream"_a = nb::none());
  m.def("cached_attention", &oe::cached_attention, "qkv"_a, "kv"_a, "n_heads"_a, "n_kv_heads"_a,
        "q_weight"_a.none(), "eps"_a, "inv_freqs"_a, "base"_a, "offset"_a, "scale"_a,
        nb::kw_only(), "stream"_a = nb::none());
  m.def("rows_attention", &oe::rows_attention, "qkv"_a, "kvs"_a, "offsets"_a, "n_heads"_a,
        "n_kv_heads"_a, "q_weight"_a.none(), "eps"_a, "inv_freqs"_a, "base"_a, "scale"_a,
        nb::kw_only(), "stream"_a = nb::none());
  m.def("cross_entropy", &oe::cross_entropy, "logits"_a, "targets"_a, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("log_softmax", &oe::log_softmax, "x"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("set_threads", [](int n) { omp_set_num_threads(n); }, "n"_a);
  m.def("threads", []() { return omp_get_max_threads(); });
}
