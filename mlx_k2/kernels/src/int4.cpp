// Packed int4 group-quant matmul (see int4.h): the launch (positions grouped by expert), the ops' checks,
// the primitive. The row kernels: int4_rows.h.
#include "int4.h"

#include <stdexcept>

#include "int4_rows.h"

namespace mlx_k2 {

namespace {

template <class S>
void run_int4(const float* x, size_t in, const uint32_t* words, const S* scales, size_t out_rows,
              size_t n_experts, size_t group, const uint32_t* indices, size_t T, float* out, int threads,
              Simd simd) {
  const size_t wpr = (in + 7) / 8, spr = (in + group - 1) / group;
  const ExpertBatches b = batch_by_expert(indices, T, n_experts, out, out_rows);
  parallel_rows(out_rows, threads, [&](size_t o0, size_t o1) {
    for (size_t g = 0; g + 1 < b.starts.size(); ++g) {
      const size_t e = b.experts[g];
      Int4Loader<S> w{words + e * out_rows * wpr, wpr, scales + e * out_rows * spr, spr, group};
      RowSet rs{x, b.order.data() + b.starts[g], b.starts[g + 1] - b.starts[g], in, out, out_rows};
      int4_rows(w, rs, o0, o1, simd);
    }
  });
}

mx::array make(const char* op, const mx::array& x, const mx::array& words, const mx::array& scales,
               const std::optional<mx::array>& indices, int group, int threads, int simd,
               mx::StreamOrDevice s) {
  const bool gather = indices.has_value();
  const int wd = gather ? 3 : 2;
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument(std::string("[") + op + "] " + why + " (x " + shape_str(x) + ", weight_packed " +
                                shape_str(words) + ", weight_scale " + shape_str(scales) + ")");
  };
  if (x.ndim() != 2) fail("x must be 2-D (rows, in)");
  if (words.ndim() != wd || scales.ndim() != wd) fail("weight_packed and weight_scale must be " +
                                                      std::to_string(wd) + "-D");
  if (group < 1) fail("group_size must be >= 1");
  const int in = x.shape(1);
  const int out = words.shape(wd - 2);
  if (words.shape(wd - 1) != (in + 7) / 8) fail("weight_packed must have ceil(in/8) words per row");
  if (scales.shape(wd - 1) != (in + group - 1) / group) fail("weight_scale must have ceil(in/group) columns");
  if (scales.shape(wd - 2) != out || (gather && scales.shape(0) != words.shape(0)))
    fail("weight_scale and weight_packed disagree on rows/experts");
  if (words.dtype() != mx::uint32 && words.dtype() != mx::int32) fail("weight_packed must be uint32 or int32");
  if (scales.dtype() != mx::bfloat16 && scales.dtype() != mx::float32) fail("weight_scale must be bf16 or f32");
  const Simd path = resolve_simd(simd);
  const int nt = resolve_threads(threads);
  auto st = cpu_stream(s, op);
  std::vector<mx::array> inputs = scaled_inputs(
      x, words.dtype() == mx::uint32 ? words : mx::view(words, mx::uint32, st), scales, indices, st, fail);
  return mx::array({x.shape(0), out}, mx::float32, std::make_shared<Int4Matmul>(st, group, nt, path, gather),
                   std::move(inputs));
}

}  // namespace

mx::array int4_matmul(const mx::array& x, const mx::array& words, const mx::array& scales, int group,
                      int threads, int simd, mx::StreamOrDevice s) {
  return make("int4_matmul", x, words, scales, std::nullopt, group, threads, simd, s);
}

mx::array int4_gather_matmul(const mx::array& x, const mx::array& words, const mx::array& scales,
                             const mx::array& indices, int group, int threads, int simd,
                             mx::StreamOrDevice s) {
  return make("int4_gather_matmul", x, words, scales, indices, group, threads, simd, s);
}

void Int4Matmul::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const size_t group = group_;
  const int nt = threads_;
  const Simd simd = simd_;
  dispatch_scaled(stream(), "int4", gather_, inputs, outputs[0], [=](const ScaledLaunch& l, auto scale) {
    using S = decltype(scale);  // the scales' element type
    std::vector<char> gw, gs;
    run_int4(l.x, l.in, static_cast<const uint32_t*>(l.weight.gathered(gw)),
             static_cast<const S*>(l.scales.gathered(gs)), l.out_rows, l.experts, group, l.indices, l.T, l.out, nt,
             simd);
  });
}

void Int4Matmul::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[mlx_k2] int4 kernels run on the CPU only");
}

bool Int4Matmul::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const Int4Matmul&>(other);
  return group_ == o.group_ && threads_ == o.threads_ && simd_ == o.simd_ && gather_ == o.gather_;
}

}  // namespace mlx_k2
