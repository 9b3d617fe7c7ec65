// Block-scaled float8 e4m3 matmul (see fp8.h): the launch (positions grouped by expert), the ops' checks, the
// primitive. The row kernels: fp8_rows.h.
#include "fp8.h"

#include <algorithm>
#include <stdexcept>

#include "fp8_rows.h"

namespace mlx_k2 {

namespace {

// x rows a launch takes at a time: the SIMD path's copy of x * 2^8 (fp8_rows.h) is at most this many floats
// (16 MB) whatever T is. A launch of more rows reads the weights once a slice, each slice at least a few
// hundred rows, so that re-read is small beside the slice's products; each output element is still computed
// whole, in one slice.
constexpr size_t kSliceFloats = size_t(1) << 22;

template <class S>
void run_fp8(const float* x, size_t in, const uint8_t* weight, const S* scales, size_t out_rows, size_t n_experts,
             size_t block_out, size_t block_in, const uint32_t* indices, size_t T, float* out, int threads,
             Simd simd) {
  const size_t spr = (in + block_in - 1) / block_in, srows = (out_rows + block_out - 1) / block_out;
  const size_t slice = std::max<size_t>(8, kSliceFloats / std::max<size_t>(in, 1) / 8 * 8);
  std::vector<float> x256;
  for (size_t p0 = 0; p0 < T; p0 += slice) {
    const size_t n = std::min(slice, T - p0);
    const float* xs = x + p0 * in;   // the slice's rows of x and out; positions p0 .. p0+n-1
    float* os = out + p0 * out_rows;
    const ExpertBatches b = batch_by_expert(indices ? indices + p0 : nullptr, n, n_experts, os, out_rows);
    const Simd path = fp8_prepare_x(xs, n * in, block_in, simd, x256);
    parallel_rows(out_rows, threads, [&](size_t o0, size_t o1) {
      for (size_t g = 0; g + 1 < b.starts.size(); ++g) {
        const size_t e = b.experts[g];
        Fp8Loader<S> w{weight + e * out_rows * in, in, scales + e * srows * spr, spr, block_out, block_in};
        RowSet rs{xs, b.order.data() + b.starts[g], b.starts[g + 1] - b.starts[g], in, os, out_rows};
        fp8_rows(w, rs, o0, o1, path);
      }
    });
  }
}

int ceil_div(int a, int b) { return (a + b - 1) / b; }

mx::array make(const char* op, const mx::array& x, const mx::array& weight, const mx::array& scales,
               const std::optional<mx::array>& indices, int block_out, int block_in, int threads, int simd,
               mx::StreamOrDevice s) {
  const bool gather = indices.has_value();
  const int wd = gather ? 3 : 2;
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument(std::string("[") + op + "] " + why + " (x " + shape_str(x) + ", weight " +
                                shape_str(weight) + ", weight_scale_inv " + shape_str(scales) + ", block_size (" +
                                std::to_string(block_out) + ", " + std::to_string(block_in) + "))");
  };
  if (x.ndim() != 2) fail("x must be 2-D (rows, in)");
  if (weight.ndim() != wd || scales.ndim() != wd) fail("weight and weight_scale_inv must be " +
                                                       std::to_string(wd) + "-D");
  if (block_out < 1 || block_in < 1) fail("block_size must be two positive ints");
  const int in = x.shape(1);
  const int out = weight.shape(wd - 2);
  if (weight.shape(wd - 1) != in) fail("weight must have in columns");
  if (scales.shape(wd - 2) != ceil_div(out, block_out) || scales.shape(wd - 1) != ceil_div(in, block_in))
    fail("weight_scale_inv must be (ceil(out/block_out), ceil(in/block_in))");
  if (gather && scales.shape(0) != weight.shape(0)) fail("weight_scale_inv and weight disagree on experts");
  if (weight.dtype() != mx::uint8) fail("weight must be uint8 (the F8_E4M3 bytes as stored)");
  if (scales.dtype() != mx::bfloat16 && scales.dtype() != mx::float32) fail("weight_scale_inv must be bf16 or f32");
  const Simd path = resolve_simd(simd);
  const int nt = resolve_threads(threads);
  auto st = cpu_stream(s, op);
  std::vector<mx::array> inputs = scaled_inputs(x, weight, scales, indices, st, fail);
  return mx::array({x.shape(0), out}, mx::float32,
                   std::make_shared<Fp8Matmul>(st, block_out, block_in, nt, path, gather), std::move(inputs));
}

}  // namespace

mx::array fp8_matmul(const mx::array& x, const mx::array& weight, const mx::array& scales, int block_out,
                     int block_in, int threads, int simd, mx::StreamOrDevice s) {
  return make("fp8_matmul", x, weight, scales, std::nullopt, block_out, block_in, threads, simd, s);
}

mx::array fp8_gather_matmul(const mx::array& x, const mx::array& weight, const mx::array& scales,
                            const mx::array& indices, int block_out, int block_in, int threads, int simd,
                            mx::StreamOrDevice s) {
  return make("fp8_gather_matmul", x, weight, scales, indices, block_out, block_in, threads, simd, s);
}

void Fp8Matmul::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const size_t bo = block_out_, bi = block_in_;
  const int nt = threads_;
  const Simd simd = simd_;
  dispatch_scaled(stream(), "fp8", gather_, inputs, outputs[0], [=](const ScaledLaunch& l, auto scale) {
    using S = decltype(scale);  // the scales' element type
    std::vector<char> gw, gs;
    run_fp8(l.x, l.in, static_cast<const uint8_t*>(l.weight.gathered(gw)), static_cast<const S*>(l.scales.gathered(gs)),
            l.out_rows, l.experts, bo, bi, l.indices, l.T, l.out, nt, simd);
  });
}

void Fp8Matmul::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[mlx_k2] fp8 kernels run on the CPU only");
}

bool Fp8Matmul::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const Fp8Matmul&>(other);
  return block_out_ == o.block_out_ && block_in_ == o.block_in_ && threads_ == o.threads_ && simd_ == o.simd_ &&
         gather_ == o.gather_;
}

}  // namespace mlx_k2
