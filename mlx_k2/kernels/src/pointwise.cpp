// The step's non-matmul operations (see pointwise.h): the ops' checks, the launch, the primitive. The arithmetic:
// pointwise_rows.h.
#include "pointwise.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "pointwise_rows.h"

namespace mlx_k2 {

namespace {

// Elementwise ops run in blocks of this many elements (parallel_rows' rows).
constexpr size_t kBlock = 4096;

const char* op_name(PointwiseKind k) {
  switch (k) {
    case PointwiseKind::Exp: return "exp";
    case PointwiseKind::Sigmoid: return "sigmoid";
    case PointwiseKind::SiluMul: return "silu_mul";
    case PointwiseKind::Softmax: return "softmax";
    case PointwiseKind::RmsNorm: return "rms_norm";
  }
  return "?";
}

// x as the kernels read it: float32 (widened exactly from another float dtype), row-contiguous.
mx::array prepared(const mx::array& x, PointwiseKind k, mx::Stream st) {
  if (x.dtype() != mx::float32 && x.dtype() != mx::bfloat16 && x.dtype() != mx::float16) {
    throw std::invalid_argument(std::string("[") + op_name(k) + "] takes float32, bf16 or f16 arrays");
  }
  return mx::contiguous(mx::astype(x, mx::float32, st), false, st);
}

mx::array launch(PointwiseKind k, std::vector<mx::array> inputs, int threads, double eps, mx::Stream st) {
  const int nt = resolve_threads(threads);
  const auto shape = inputs[0].shape();
  return mx::array(shape, mx::float32, std::make_shared<Pointwise>(st, k, nt, eps), std::move(inputs));
}

}  // namespace

mx::array own_exp(const mx::array& x, int threads, mx::StreamOrDevice s) {
  auto st = cpu_stream(s, "exp");
  return launch(PointwiseKind::Exp, {prepared(x, PointwiseKind::Exp, st)}, threads, 0.0, st);
}

mx::array sigmoid(const mx::array& x, int threads, mx::StreamOrDevice s) {
  auto st = cpu_stream(s, "sigmoid");
  return launch(PointwiseKind::Sigmoid, {prepared(x, PointwiseKind::Sigmoid, st)}, threads, 0.0, st);
}

mx::array silu_mul(const mx::array& gate, const mx::array& up, int threads, mx::StreamOrDevice s) {
  auto st = cpu_stream(s, "silu_mul");
  if (gate.shape() != up.shape()) {
    throw std::invalid_argument("[silu_mul] gate and up must have one shape (gate " + shape_str(gate) + ", up " +
                                shape_str(up) + ")");
  }
  return launch(PointwiseKind::SiluMul,
                {prepared(gate, PointwiseKind::SiluMul, st), prepared(up, PointwiseKind::SiluMul, st)}, threads, 0.0,
                st);
}

mx::array softmax(const mx::array& x, int threads, mx::StreamOrDevice s) {
  auto st = cpu_stream(s, "softmax");
  if (x.ndim() < 1 || x.shape(-1) < 1) throw std::invalid_argument("[softmax] x needs a last axis of entries");
  return launch(PointwiseKind::Softmax, {prepared(x, PointwiseKind::Softmax, st)}, threads, 0.0, st);
}

mx::array rms_norm(const mx::array& x, const mx::array& weight, double eps, int threads, mx::StreamOrDevice s) {
  auto st = cpu_stream(s, "rms_norm");
  if (x.ndim() < 1 || weight.ndim() != 1 || weight.shape(0) != x.shape(-1) || x.shape(-1) < 1) {
    throw std::invalid_argument("[rms_norm] x must be (..., D) and weight (D,) (x " + shape_str(x) + ", weight " +
                                shape_str(weight) + ")");
  }
  if (!(eps >= 0.0)) throw std::invalid_argument("[rms_norm] eps must be >= 0");
  return launch(PointwiseKind::RmsNorm,
                {prepared(x, PointwiseKind::RmsNorm, st), prepared(weight, PointwiseKind::RmsNorm, st)}, threads, eps,
                st);
}

void Pointwise::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  for (const auto& a : inputs) {
    if (!a.flags().row_contiguous) {
      throw std::runtime_error(std::string("[mlx_k2] ") + name() + " inputs must be row-contiguous");
    }
  }
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(out);
  const float* x = inputs[0].data<float>();
  const float* y = inputs.size() > 1 ? inputs[1].data<float>() : nullptr;
  float* o = out.data<float>();
  const size_t n = out.size();
  const size_t row = (kind_ == PointwiseKind::Softmax || kind_ == PointwiseKind::RmsNorm) && out.ndim() > 0
                         ? size_t(out.shape(-1)) : 0;
  const PointwiseKind kind = kind_;
  const int nt = threads_;
  const double eps = eps_;
  enc.dispatch([=]() {
    if (row == 0) {  // elementwise: blocks of kBlock elements
      const size_t blocks = (n + kBlock - 1) / kBlock;
      parallel_rows(blocks, nt, [&](size_t b0, size_t b1) {
        const size_t i0 = b0 * kBlock, i1 = std::min(n, b1 * kBlock);
        if (kind == PointwiseKind::Exp) exp_span(x + i0, o + i0, i1 - i0);
        if (kind == PointwiseKind::Sigmoid) sigmoid_span(x + i0, o + i0, i1 - i0);
        if (kind == PointwiseKind::SiluMul) silu_mul_span(x + i0, y + i0, o + i0, i1 - i0);
      });
      return;
    }
    const size_t rows = n / row;
    parallel_rows(rows, nt, [&](size_t r0, size_t r1) {
      std::vector<double> scratch(kind == PointwiseKind::Softmax ? row : 0);
      for (size_t r = r0; r < r1; ++r) {
        if (kind == PointwiseKind::Softmax) {
          softmax_row(x + r * row, row, o + r * row, scratch.data());
        } else {
          rms_norm_row(x + r * row, y, row, eps, o + r * row);
        }
      }
    });
  });
}

mx::array sum_by_position(const mx::array& y, const mx::array& positions, int T, int parts, int threads,
                          mx::StreamOrDevice s) {
  auto st = cpu_stream(s, "sum_by_position");
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument("[sum_by_position] " + why + " (y " + shape_str(y) + ", positions " +
                                shape_str(positions) + ")");
  };
  if (y.ndim() != 2) fail("y must be (P, D)");
  if (positions.ndim() != 1 || positions.shape(0) != y.shape(0)) fail("positions must be (P,) with P = y's rows");
  if (!mx::issubdtype(positions.dtype(), mx::integer)) fail("positions must be integers");
  if (T < 0 || parts < 1) fail("T must be >= 0 and parts >= 1");
  const int nt = resolve_threads(threads);
  if (y.dtype() != mx::float32) fail("y must be float32");
  std::vector<mx::array> inputs = {mx::contiguous(y, false, st),
                                   mx::contiguous(mx::astype(positions, mx::uint32, st), false, st)};
  return mx::array({T, y.shape(1)}, mx::float32, std::make_shared<SumByPosition>(st, parts, nt), std::move(inputs));
}

void SumByPosition::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const auto& y = inputs[0];
  const auto& pos = inputs[1];
  if (!y.flags().row_contiguous || !pos.flags().row_contiguous) {
    throw std::runtime_error("[mlx_k2] sum_by_position inputs must be row-contiguous");
  }
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(y);
  enc.set_input_array(pos);
  enc.set_output_array(out);
  const float* yp = y.data<float>();
  const uint32_t* pp = pos.data<uint32_t>();
  float* op = out.data<float>();
  const size_t P = y.shape(0), D = y.shape(1), T = out.shape(0);
  const Slices sl{P, size_t(parts_)};
  const int nt = threads_;
  enc.dispatch([=]() {
    // Each position's pairs in increasing p (a stable counting sort), then positions split over threads.
    std::vector<size_t> start(T + 1, 0);
    for (size_t p = 0; p < P; ++p)
      if (pp[p] < T) ++start[pp[p] + 1];
    for (size_t t = 0; t < T; ++t) start[t + 1] += start[t];
    std::vector<uint32_t> order(start[T]);
    std::vector<size_t> at(start.begin(), start.end() - 1);
    for (size_t p = 0; p < P; ++p)
      if (pp[p] < T) order[at[pp[p]]++] = uint32_t(p);
    parallel_rows(T, nt, [&](size_t t0, size_t t1) {
      std::vector<float> tmp(D);
      for (size_t t = t0; t < t1; ++t) {
        sum_rows_in_slices(yp, D, order.data() + start[t], start[t + 1] - start[t], sl, op + t * D, tmp.data());
      }
    });
  });
}

void SumByPosition::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[mlx_k2] the pointwise kernels run on the CPU only");
}

bool SumByPosition::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const SumByPosition&>(other);
  return parts_ == o.parts_ && threads_ == o.threads_;
}

void Pointwise::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[mlx_k2] the pointwise kernels run on the CPU only");
}

const char* Pointwise::name() const {
  switch (kind_) {
    case PointwiseKind::Exp: return "MlxK2Exp";
    case PointwiseKind::Sigmoid: return "MlxK2Sigmoid";
    case PointwiseKind::SiluMul: return "MlxK2SiluMul";
    case PointwiseKind::Softmax: return "MlxK2Softmax";
    case PointwiseKind::RmsNorm: return "MlxK2RmsNorm";
  }
  return "MlxK2Pointwise";
}

bool Pointwise::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const Pointwise&>(other);
  return kind_ == o.kind_ && threads_ == o.threads_ && eps_ == o.eps_;
}

}  // namespace mlx_k2
