// The nanobind module `mlx_k2.kernels._ext`: the lazy ops and what the CPU runs. Python's API is __init__.py.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>

#include "batched.h"
#include "dense.h"
#include "fp8.h"
#include "int4.h"
#include "pointwise.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_ext, m) {
  m.doc() = "mlx_k2 CPU kernels (MLX primitives). simd: 0 auto, 1 scalar, 2 avx2, 3 neon; threads: 0 auto.";
  m.attr("NAME") = mlx_k2::kKernelName;
  m.def("best_simd", []() { return std::string(mlx_k2::simd_name(mlx_k2::best_simd())); });
  m.def("int4_matmul", &mlx_k2::int4_matmul, "x"_a, "weight_packed"_a, "weight_scale"_a, "group_size"_a,
        "threads"_a = 0, "simd"_a = 0, nb::kw_only(), "stream"_a = nb::none());
  m.def("int4_gather_matmul", &mlx_k2::int4_gather_matmul, "x"_a, "weight_packed"_a, "weight_scale"_a,
        "indices"_a, "group_size"_a, "threads"_a = 0, "simd"_a = 0, nb::kw_only(), "stream"_a = nb::none());
  m.def("fp8_matmul", &mlx_k2::fp8_matmul, "x"_a, "weight"_a, "weight_scale_inv"_a, "block_out"_a, "block_in"_a,
        "threads"_a = 0, "simd"_a = 0, nb::kw_only(), "stream"_a = nb::none());
  m.def("fp8_gather_matmul", &mlx_k2::fp8_gather_matmul, "x"_a, "weight"_a, "weight_scale_inv"_a, "indices"_a,
        "block_out"_a, "block_in"_a, "threads"_a = 0, "simd"_a = 0, nb::kw_only(), "stream"_a = nb::none());
  m.def("dense_matmul", &mlx_k2::dense_matmul, "x"_a, "weight"_a, "threads"_a = 0, "simd"_a = 0, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("batched_matmul", &mlx_k2::batched_matmul, "a"_a, "b"_a, "threads"_a = 0, "simd"_a = 0, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("exp", &mlx_k2::own_exp, "x"_a, "threads"_a = 0, nb::kw_only(), "stream"_a = nb::none());
  m.def("sigmoid", &mlx_k2::sigmoid, "x"_a, "threads"_a = 0, nb::kw_only(), "stream"_a = nb::none());
  m.def("silu_mul", &mlx_k2::silu_mul, "gate"_a, "up"_a, "threads"_a = 0, nb::kw_only(), "stream"_a = nb::none());
  m.def("softmax", &mlx_k2::softmax, "x"_a, "threads"_a = 0, nb::kw_only(), "stream"_a = nb::none());
  m.def("sum_by_position", &mlx_k2::sum_by_position, "y"_a, "positions"_a, "T"_a, "parts"_a, "threads"_a = 0,
        nb::kw_only(), "stream"_a = nb::none());
  m.def("rms_norm", &mlx_k2::rms_norm, "x"_a, "weight"_a, "eps"_a, "threads"_a = 0, nb::kw_only(),
        "stream"_a = nb::none());
}
