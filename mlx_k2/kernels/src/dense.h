// Dense matmul: float32 x (T, in) against a stored weight (out, in) in bf16, f16 or f32 -> float32 (T, out).
// Each weight is widened to float32 exactly, then the fixed reduction of common.h.
#pragma once

#include "common.h"

namespace mlx_k2 {

mx::array dense_matmul(const mx::array& x, const mx::array& weight, int threads, int simd,
                       mx::StreamOrDevice s = {});

class DenseMatmul : public mx::Primitive {
 public:
  DenseMatmul(mx::Stream stream, int threads, Simd simd)
      : mx::Primitive(stream), threads_(threads), simd_(simd) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "MlxK2DenseMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int threads_;
  Simd simd_;
};

}  // namespace mlx_k2
