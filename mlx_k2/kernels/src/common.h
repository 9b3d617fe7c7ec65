// Shared by every kernel family: SIMD selection, the thread split, the CPU stream, the fixed reductions.
//
// THE REDUCTIONS (every SIMD path, every thread count). For one output element
//   out[t, o] = sum_i x[t, i] * w[o, i]      (i = 0 .. in-1)
// eight float32 lane accumulators acc[0..7] start at +0.0f, every fma is fused (one rounding), and the result
// is hsum8(acc) = ((acc0 + acc4) + (acc2 + acc6)) + ((acc1 + acc5) + (acc3 + acc7)).
// - dense (w widened exactly to float32): for i = 0, 1, ..., in-1 in increasing order
//     acc[i % 8] = fma(x[i], w[i], acc[i % 8]).
// - int4 (w[i] = (q_i - 8) * scale[i / G], group size G): for each group g = 0, 1, .. in increasing order,
//   over its columns i = gG .. min(in, gG + G) - 1: eight partials p[0..7] start at +0.0f, then in increasing i
//     p[i % 8] = fma(x[i], float(q_i - 8), p[i % 8])        (float(q_i - 8) is exact)
//   and at the group's end, for l = 0 .. 7 (every lane, whether or not the group has a column on it)
//     acc[l] = fma(p[l], scale[g], acc[l]).
//   The scale multiplies once per group rather than once per weight: fewer operations a weight, and the
//   weight's (q - 8) * scale is never rounded on its own.
// - fp8 (w[i] = e4m3(b_i) * scale[o / bo][i / bi], blocks of bo rows x bi columns; e4m3 -> float32 is exact,
//   lanes.h): the int4 reduction with G = bi and the scale row chosen by the output row: for each column block
//   g = 0, 1, .. in increasing order, over its columns i = g*bi .. min(in, g*bi + bi) - 1: eight partials
//   p[0..7] start at +0.0f, then in increasing i
//     p[i % 8] = fma(x[i], e4m3(b_i), p[i % 8])
//   and at the block's end, for l = 0 .. 7
//     acc[l] = fma(p[l], scale[o / bo][g], acc[l]).
//   Both bytes 0x7F and 0xFF are one NaN (lanes.h), so a NaN weight's bits are the same on every path.
// - batched (float32 a (B, M, K) and b (B or 1, K, N), attention's products; batched_rows.h): out[i, m, n] is the
//   dense reduction with x = a[i, m, :] and w = b[i, :, n]: for k = 0, 1, ..., K-1 in increasing order
//     acc[k % 8] = fma(a[i, m, k], b[i, k, n], acc[k % 8])
//   then hsum8(acc). Whether b is read along k (lanes of one element in one register, summed across it) or
//   along n (eight registers of eight elements, summed register by register) the operations per element are
//   these, so neither b's memory layout nor the path changes a bit. Threads split (batch, rows of a, columns
//   of b) blocks of the output only.
// A SIMD register's lane l is acc[l] (or p[l]); columns past the last full group of 8 follow the same rule
// (the int4 and fp8 SIMD paths load x there as +0.0f in the lanes past the row's end, against finite weights,
// which leaves p as it was: p is never -0). Threads split output rows only, so neither the thread count nor
// the SIMD path changes a sum.
// The int4 and fp8 tiles are one template (group_rows.h) over each family's loader.
// - the step's other operations (exp, sigmoid, silu(gate) * up, softmax, RMSNorm; pointwise_rows.h): in double,
//   by +, -, *, / and sqrt only, in the order written there, rounded once to float32; their row sums (softmax's
//   sum of exponentials, RMSNorm's sum of squares) are the lane sum above in double (entry i into lane i % 8 in
//   increasing i, then the hsum8 tree), within one thread. One code path: no SIMD intrinsics.
#pragma once

#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "lanes.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlx_k2 {

namespace mx = mlx::core;

// Bump when the arithmetic of any kernel changes: anchors are keyed by it. Adding a family (fp8 joined with
// /2) changes no existing one's arithmetic, so the name stays while int4's and dense's bits are unchanged.
// /3: attention's matmuls are the batched kernel's (they were MLX's `@`): bits change from the second position on.
// /4: the step's other operations are the kernels' too (pointwise.h: RMSNorm, softmax, sigmoid, silu(gate) * up,
// on the own exp), and the forward pass computes its rope tables and YaRN scalars with mlx_k2/exact: a step of
// these kernels is wholly the product's own arithmetic in a fixed order.
inline constexpr const char* kKernelName = "mlx_k2-cpu/4";

Simd best_simd();                      // what this CPU runs with Auto
Simd resolve_simd(int requested);      // Auto -> best; throws if the CPU lacks the requested path
const char* simd_name(Simd s);
int resolve_threads(int requested);    // 0 -> hardware threads; >= 1 otherwise

// A CPU stream for an op: the given one, else the default stream when the default device is the CPU,
// else the CPU's default stream (on a GPU machine the kernels still run on the CPU).
mx::Stream cpu_stream(mx::StreamOrDevice s, const char* op);

// fn(begin, end) over chunks of [0, n) (multiples of 4 rows, the widest row tile), on the calling thread and up
// to `threads - 1` workers of a pool made once; each thread claims the next chunk when it finishes one, so a
// descheduled CPU takes fewer. When another launch holds the pool (a second MLX stream), the caller runs
// every chunk itself. Which thread runs a chunk never changes its bits: fn computes each row whole.
void parallel_rows(size_t n, int threads, const std::function<void(size_t, size_t)>& fn);

// A gathered launch's positions grouped by expert (stable), so one pass over an expert's rows serves all its
// positions: batch b is positions order[starts[b] .. starts[b+1]) on expert experts[b]. Without indices, one
// batch of every position on expert 0. A position whose index is >= n_experts is in no batch: its out row
// (out_rows floats) is filled with NaN here, rather than read past the stack.
struct ExpertBatches {
  std::vector<uint32_t> order;
  std::vector<size_t> starts;
  std::vector<uint32_t> experts;
};
ExpertBatches batch_by_expert(const uint32_t* indices, size_t T, size_t n_experts, float* out, size_t out_rows);

std::string shape_str(const mx::array& a);  // "(2, 3)", for the ops' messages

// The end of a scaled-weight op (int4, fp8) after its family's own checks: checks indices (P,) integers with P
// = x's rows (through fail), and returns the primitive's inputs {x as contiguous float32 (a no-op when it is
// one), weight and scales as they are (see WeightInput), indices as contiguous uint32}.
std::vector<mx::array> scaled_inputs(const mx::array& x, const mx::array& weight, const mx::array& scales,
                                     const std::optional<mx::array>& indices, mx::Stream st,
                                     const std::function<void(const std::string&)>& fail);

// A weight input as a kernel reads it: its elements in row-major order. The ops pass weights as they are, not
// through mx::contiguous: MLX's Contiguous copies even a row-contiguous view when its buffer is much larger
// than the view (so a small view never keeps a big buffer alive), and a weight read into an arena is exactly
// such a view: every launch copied its weights, 13x the time of a one-row int4 product. Row-contiguous
// arrays are read in place; any other (a transposed or strided view) is gathered into `scratch` by
// `gathered()`, inside the task, where its data is ready.
struct WeightInput {
  mx::array array;
  bool in_place;  // row-contiguous: its own buffer is read
  explicit WeightInput(const mx::array& a) : array(a), in_place(a.flags().row_contiguous) {}
  const void* gathered(std::vector<char>& scratch) const;
};

// What the task of a scaled-weight launch (int4, fp8) reads: inputs (x, weight, scales[, indices]) as the ops
// make them, x and indices row-contiguous, the output allocated.
struct ScaledLaunch {
  const float* x;
  size_t T, in, out_rows;
  size_t experts;            // the stack's experts (1 without indices)
  const uint32_t* indices;   // (T,) into the stack, or nullptr
  float* out;
  WeightInput weight, scales;
};

// The shared body of a scaled-weight primitive's eval_cpu: checks the inputs, allocates the output, registers
// the arrays with the stream's encoder and dispatches run(launch, S{}) with S the scales' element type
// (uint16_t for bf16 bits, float). The data pointers are fixed now; the values are read when the task runs.
template <class Run>
void dispatch_scaled(const mx::Stream& stream, const char* family, bool gather, const std::vector<mx::array>& inputs,
                     mx::array& out, Run run) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  if (!inputs[0].flags().row_contiguous || (gather && !inputs[3].flags().row_contiguous))
    throw std::runtime_error(std::string("[mlx_k2] ") + family + " x and indices must be row-contiguous");
  auto& enc = mx::cpu::get_command_encoder(stream);
  for (const auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(out);
  const auto& x = inputs[0];
  const ScaledLaunch launch{x.data<float>(), size_t(x.shape(0)), size_t(x.shape(1)), size_t(out.shape(1)),
                            gather ? size_t(inputs[1].shape(0)) : 1, gather ? inputs[3].data<uint32_t>() : nullptr,
                            out.data<float>(), WeightInput(inputs[1]), WeightInput(inputs[2])};
  if (inputs[2].dtype() == mx::bfloat16) {
    enc.dispatch([=]() { run(launch, uint16_t{}); });
  } else {
    enc.dispatch([=]() { run(launch, float{}); });
  }
}

}  // namespace mlx_k2
