// Batched float32 matmul (see batched.h): the op's checks, the launch, the primitive. The kernels:
// batched_rows.h.
#include "batched.h"

#include <stdexcept>
#include <string>

#include "batched_rows.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace mlx_k2 {

mx::array batched_matmul(const mx::array& a, const mx::array& b_in, int threads, int simd, mx::StreamOrDevice s) {
  auto st = cpu_stream(s, "batched_matmul");
  const mx::array b = b_in.ndim() == 2 ? mx::expand_dims(b_in, 0, st) : b_in;
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument("[batched_matmul] " + why + " (a " + shape_str(a) + ", b " + shape_str(b_in) + ")");
  };
  if (a.ndim() != 3 || b.ndim() != 3) fail("a must be (B, M, K) and b (B, K, N), (1, K, N) or (K, N)");
  if (a.shape(2) != b.shape(1)) fail("a's K (last axis) must equal b's K (second to last)");
  if (b.shape(0) != a.shape(0) && b.shape(0) != 1) fail("b's batch must be a's or 1");
  if (a.dtype() != mx::float32 || b.dtype() != mx::float32) fail("a and b must be float32");
  const Simd path = resolve_simd(simd);
  const int nt = resolve_threads(threads);
  // Passed as they are: the kernel reads strided views in place (a copy would cost as much as the product).
  return mx::array({a.shape(0), a.shape(1), b.shape(2)}, mx::float32, std::make_shared<BatchedMatmul>(st, nt, path),
                   {a, b});
}

namespace {

// The stride of axis d in elements, 0 for an axis of one element (its stride is never used).
int64_t stride(const mx::array& x, int d) { return x.shape(d) == 1 ? 0 : int64_t(x.strides()[d]); }

}  // namespace

void BatchedMatmul::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const auto& a = inputs[0];
  const auto& b = inputs[1];
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(a);
  enc.set_input_array(b);
  enc.set_output_array(out);
  const size_t B = a.shape(0), M = a.shape(1), K = a.shape(2), N = b.shape(2);
  BatchedLaunch L{a.data<float>(), stride(a, 0), stride(a, 1), b.data<float>(), stride(b, 0), stride(b, 1),
                  stride(b, 2), out.data<float>(), B, M, N, K, b.shape(0) == 1 && B > 1};
  // A row of a must be contiguous along k, and b contiguous along k ("nk") or along n ("kn"); an operand that
  // is neither is gathered row-major inside the task, where its data is ready (b then reads as "kn").
  const bool gather_a = K > 1 && a.strides()[2] != 1;
  if (K <= 1) L.b_ks = 1;                    // one k: "nk" whatever the strides
  else if (L.b_ks != 1 && N <= 1) L.b_ns = 1;  // one column: "kn"
  const bool gather_b = L.b_ks != 1 && L.b_ns != 1;
  const WeightInput ga(a), gb(b);
  const int nt = threads_;
  const Simd simd = simd_;
  enc.dispatch([=]() mutable {
    std::vector<char> sa, sb;
    if (gather_a) {
      L.a = static_cast<const float*>(ga.gathered(sa));
      L.a_bs = int64_t(M * K);
      L.a_ms = int64_t(K);
    }
    if (gather_b) {
      L.b = static_cast<const float*>(gb.gathered(sb));
      L.b_bs = int64_t(K * N);   // unused when b's batch is 1
      L.b_ks = int64_t(N);
      L.b_ns = 1;
    }
    const BatchedUnits U = batched_units(L);
    parallel_rows(U.count(), nt, [&](size_t u0, size_t u1) { batched_rows(L, U, u0, u1, simd); });
  });
}

void BatchedMatmul::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[mlx_k2] batched kernels run on the CPU only");
}

bool BatchedMatmul::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const BatchedMatmul&>(other);
  return threads_ == o.threads_ && simd_ == o.simd_;
}

}  // namespace mlx_k2
