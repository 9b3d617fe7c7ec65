// Block-scaled float8 e4m3 matmul (DeepSeek-V3's FP8 checkpoints), plain and gathered over a stack of experts.
//
// Weights as stored: weight (out, in) bytes, float8 e4m3fn (lanes.h); weight_scale_inv (ceil(out/bo),
// ceil(in/bi)) float32 or bf16, one scale per block of bo rows x bi columns (edge blocks partial). Column c of
// row o is e4m3(weight[o, c]) * weight_scale_inv[o / bo, c / bi], reduced by the fp8 reduction of common.h:
// x * e4m3 summed within each block's columns, then scaled once per block. No activation quantisation. The
// SIMD paths need bi % 8 == 0; other block widths run the scalar path whatever simd says.
// The gathered form: x (P, in), stacks (E, out, in) and (E, ceil(out/bo), ceil(in/bi)), indices (P,): row
// p = x[p] @ W[indices[p]].T. Positions sharing an expert are multiplied together (that expert's rows are read
// once); an index >= E gives a NaN row.
#pragma once

#include <optional>

#include "common.h"

namespace mlx_k2 {

// Lazy ops: unevaluated float32 (T, out) / (P, out).
mx::array fp8_matmul(const mx::array& x, const mx::array& weight, const mx::array& scales, int block_out,
                     int block_in, int threads, int simd, mx::StreamOrDevice s = {});
mx::array fp8_gather_matmul(const mx::array& x, const mx::array& weight, const mx::array& scales,
                            const mx::array& indices, int block_out, int block_in, int threads, int simd,
                            mx::StreamOrDevice s = {});

class Fp8Matmul : public mx::Primitive {
 public:
  Fp8Matmul(mx::Stream stream, int block_out, int block_in, int threads, Simd simd, bool gather)
      : mx::Primitive(stream), block_out_(block_out), block_in_(block_in), threads_(threads), simd_(simd),
        gather_(gather) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return gather_ ? "MlxK2Fp8GatherMatmul" : "MlxK2Fp8Matmul"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int block_out_;
  int block_in_;
  int threads_;
  Simd simd_;
  bool gather_;
};

}  // namespace mlx_k2
