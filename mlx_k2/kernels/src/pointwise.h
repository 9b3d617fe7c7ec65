// The step's operations other than matmuls, as lazy float32 ops: exp, sigmoid, silu(gate) * up, softmax over the
// last axis and RMSNorm over the last axis. Each value is the fixed sequence of IEEE double operations of
// pointwise_rows.h, rounded once to float32: the same bits on every CPU, compiler, SIMD width and thread count.
// Threads split rows (elementwise ops: blocks of elements) only, never a sum. There is one code path (no
// hand-written SIMD): `simd` does not apply.
#pragma once

#include "common.h"

namespace mlx_k2 {

enum class PointwiseKind : int { Exp, Sigmoid, SiluMul, Softmax, RmsNorm };

// Lazy ops: unevaluated float32 arrays of x's shape. Inputs of another float dtype are widened exactly first.
mx::array own_exp(const mx::array& x, int threads, mx::StreamOrDevice s = {});
mx::array sigmoid(const mx::array& x, int threads, mx::StreamOrDevice s = {});
mx::array silu_mul(const mx::array& gate, const mx::array& up, int threads, mx::StreamOrDevice s = {});
mx::array softmax(const mx::array& x, int threads, mx::StreamOrDevice s = {});
mx::array rms_norm(const mx::array& x, const mx::array& weight, double eps, int threads, mx::StreamOrDevice s = {});

// out (T, D) float32: row t the sum of the rows y[p] (y (P, D)) with positions[p] == t, in the order of
// pointwise_rows.h's sum_by_position (pairs cut into `parts` slices). A position >= T is in no row.
mx::array sum_by_position(const mx::array& y, const mx::array& positions, int T, int parts, int threads,
                          mx::StreamOrDevice s = {});

class SumByPosition : public mx::Primitive {
 public:
  SumByPosition(mx::Stream stream, int parts, int threads) : mx::Primitive(stream), parts_(parts), threads_(threads) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "MlxK2SumByPosition"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int parts_;
  int threads_;
};

class Pointwise : public mx::Primitive {
 public:
  Pointwise(mx::Stream stream, PointwiseKind kind, int threads, double eps = 0.0)
      : mx::Primitive(stream), kind_(kind), threads_(threads), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override;
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  PointwiseKind kind_;
  int threads_;
  double eps_;
};

}  // namespace mlx_k2
