// SIMD selection, the thread split and the CPU stream (see common.h).
#include "common.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace mlx_k2 {

namespace {
bool cpu_has_avx2() {
#if defined(MLX_K2_X86)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}
}  // namespace

Simd best_simd() { return cpu_has_avx2() ? Simd::Avx2 : Simd::Scalar; }

Simd resolve_simd(int requested) {
  switch (static_cast<Simd>(requested)) {
    case Simd::Auto: return best_simd();
    case Simd::Scalar: return Simd::Scalar;
    case Simd::Avx2:
      if (!cpu_has_avx2()) throw std::invalid_argument("[mlx_k2] simd='avx2': this CPU lacks AVX2/FMA/F16C");
      return Simd::Avx2;
    case Simd::Neon:
      throw std::invalid_argument("[mlx_k2] simd='neon' is not built into this extension");
  }
  throw std::invalid_argument("[mlx_k2] unknown simd path " + std::to_string(requested));
}

const char* simd_name(Simd s) {
  switch (s) {
    case Simd::Scalar: return "scalar";
    case Simd::Avx2: return "avx2";
    case Simd::Neon: return "neon";
    default: return "auto";
  }
}

int resolve_threads(int requested) {
  if (requested < 0) throw std::invalid_argument("[mlx_k2] threads must be >= 1");
  if (requested > 0) return requested;
  return std::max(1u, std::thread::hardware_concurrency());
}

mx::Stream cpu_stream(mx::StreamOrDevice s, const char* op) {
  if (std::holds_alternative<std::monostate>(s)) {
    auto st = mx::default_stream(mx::default_device());
    return st.device.type == mx::Device::DeviceType::cpu ? st : mx::default_stream(mx::Device::cpu);
  }
  auto st = mx::to_stream(s);
  if (st.device.type != mx::Device::DeviceType::cpu) {
    throw std::invalid_argument(std::string("[") + op + "] runs on the CPU only; pass a CPU stream");
  }
  return st;
}

void parallel_rows(size_t n, int threads, const std::function<void(size_t, size_t)>& fn) {
  if (n == 0) return;
  // Chunks of a multiple of 4 rows (the widest row tile); fewer threads than chunks of 4 is pointless.
  size_t nt = std::max<size_t>(1, std::min<size_t>(threads, (n + 3) / 4));
  size_t chunk = ((n + nt - 1) / nt + 3) & ~size_t(3);
  if (nt == 1 || chunk >= n) {
    fn(0, n);
    return;
  }
  std::vector<std::thread> pool;
  for (size_t b = chunk; b < n; b += chunk) pool.emplace_back(fn, b, std::min(n, b + chunk));
  fn(0, chunk);  // the MLX stream's own thread takes the first chunk
  for (auto& th : pool) th.join();
}

}  // namespace mlx_k2
