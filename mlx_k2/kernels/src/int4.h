// Packed int4 group-quant matmul, plain and gathered over a stack of experts (compressed-tensors layout).
//
// Weights as stored: words (out, ceil(in/8)) uint32, column c at bits 4*(c % 8) of word c / 8, value q + 8;
// scales (out, ceil(in/group)) bf16 or float32. Column c's weight is (q - 8) * scale[c / group], reduced by the
// int4 reduction of common.h: x * (q - 8) summed within each scale group, then scaled once per group. No
// activation quantisation. The SIMD paths need group % 8 == 0; other groups run the scalar path whatever
// simd says.
// The gathered form: x (P, in), a stack (E, out, ..), indices (P,): row p = x[p] @ W[indices[p]].T. Positions
// sharing an expert are multiplied together (that expert's rows are read once); an index >= E gives a NaN row.
#pragma once

#include <optional>

#include "common.h"

namespace mlx_k2 {

// Lazy ops: unevaluated float32 (T, out) / (P, out).
mx::array int4_matmul(const mx::array& x, const mx::array& words, const mx::array& scales, int group,
                      int threads, int simd, mx::StreamOrDevice s = {});
mx::array int4_gather_matmul(const mx::array& x, const mx::array& words, const mx::array& scales,
                             const mx::array& indices, int group, int threads, int simd,
                             mx::StreamOrDevice s = {});

class Int4Matmul : public mx::Primitive {
 public:
  Int4Matmul(mx::Stream stream, int group, int threads, Simd simd, bool gather)
      : mx::Primitive(stream), group_(group), threads_(threads), simd_(simd), gather_(gather) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return gather_ ? "MlxK2Int4GatherMatmul" : "MlxK2Int4Matmul"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int group_;
  int threads_;
  Simd simd_;
  bool gather_;
};

}  // namespace mlx_k2
