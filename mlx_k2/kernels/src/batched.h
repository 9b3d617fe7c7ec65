// Batched float32 matmul: out = a @ b per batch, a (B, M, K), b (B, K, N) or (1, K, N) or (K, N) (one b for
// every batch), float32 in and out -> (B, M, N) float32. Each element is reduced in the batched order of
// common.h, so its bits depend on neither the SIMD path, the thread count nor how b is laid out in memory:
// a transposed view (b's K axis contiguous: keys^T) and a row-major b (values) are both read in place
// (batched_rows.h). Threads split batches x rows x columns of the output, never a sum.
#pragma once

#include "common.h"

namespace mlx_k2 {

mx::array batched_matmul(const mx::array& a, const mx::array& b, int threads, int simd, mx::StreamOrDevice s = {});

class BatchedMatmul : public mx::Primitive {
 public:
  BatchedMatmul(mx::Stream stream, int threads, Simd simd) : mx::Primitive(stream), threads_(threads), simd_(simd) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "MlxK2BatchedMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int threads_;
  Simd simd_;
};

}  // namespace mlx_k2
