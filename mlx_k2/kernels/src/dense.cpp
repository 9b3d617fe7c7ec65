// Dense matmul (see dense.h): the launch, the op's checks, the primitive. The row kernels: dense_rows.h.
#include "dense.h"

#include <stdexcept>
#include <string>

#include "dense_rows.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace mlx_k2 {

namespace {

template <Kind K>
void run_dense(const float* x, size_t T, size_t in, const void* w, size_t O, float* out, int threads, Simd simd) {
  std::vector<uint32_t> order(T);
  for (size_t t = 0; t < T; ++t) order[t] = uint32_t(t);
  DenseLoader<K> loader{w, in};
  RowSet rs{x, order.data(), T, in, out, O};
  parallel_rows(O, threads, [&](size_t o0, size_t o1) { dense_rows(loader, rs, o0, o1, simd); });
}

}  // namespace

mx::array dense_matmul(const mx::array& x, const mx::array& weight, int threads, int simd, mx::StreamOrDevice s) {
  if (x.ndim() != 2 || weight.ndim() != 2 || x.shape(1) != weight.shape(1)) {
    throw std::invalid_argument("[dense_matmul] x must be (T, in) and weight (out, in)");
  }
  if (weight.dtype() != mx::bfloat16 && weight.dtype() != mx::float16 && weight.dtype() != mx::float32) {
    throw std::invalid_argument("[dense_matmul] weight must be bf16, f16 or f32");
  }
  const Simd path = resolve_simd(simd);
  const int nt = resolve_threads(threads);
  auto st = cpu_stream(s, "dense_matmul");
  std::vector<mx::array> inputs = {mx::contiguous(mx::astype(x, mx::float32, st), false, st), weight};
  return mx::array({x.shape(0), weight.shape(0)}, mx::float32, std::make_shared<DenseMatmul>(st, nt, path),
                   std::move(inputs));
}

void DenseMatmul::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const auto& x = inputs[0];
  const auto& w = inputs[1];
  if (!x.flags().row_contiguous) throw std::runtime_error("[mlx_k2] dense x must be row-contiguous");
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(x);
  enc.set_input_array(w);
  enc.set_output_array(out);
  const size_t T = x.shape(0), in = x.shape(1), O = w.shape(0);
  const float* xp = x.data<float>();
  const WeightInput wi(w);
  float* op = out.data<float>();
  const int nt = threads_;
  const Simd simd = simd_;
  if (w.dtype() == mx::bfloat16) {
    enc.dispatch([=]() { std::vector<char> g; run_dense<Kind::BF16>(xp, T, in, wi.gathered(g), O, op, nt, simd); });
  } else if (w.dtype() == mx::float16) {
    enc.dispatch([=]() { std::vector<char> g; run_dense<Kind::F16>(xp, T, in, wi.gathered(g), O, op, nt, simd); });
  } else {
    enc.dispatch([=]() { std::vector<char> g; run_dense<Kind::F32>(xp, T, in, wi.gathered(g), O, op, nt, simd); });
  }
}

void DenseMatmul::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[mlx_k2] dense kernels run on the CPU only");
}

bool DenseMatmul::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const DenseMatmul&>(other);
  return threads_ == o.threads_ && simd_ == o.simd_;
}

}  // namespace mlx_k2
