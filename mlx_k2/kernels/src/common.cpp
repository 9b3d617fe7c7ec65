// SIMD selection, the thread split and the CPU stream (see common.h).
#include "common.h"

#include <pthread.h>

#include <algorithm>
#include <cstring>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <limits>
#include <mutex>
#include <numeric>
#include <sstream>
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

#if defined(MLX_K2_NEON)
constexpr bool kHasNeon = true;   // part of every arm64 CPU
#else
constexpr bool kHasNeon = false;
#endif
}  // namespace

Simd best_simd() { return kHasNeon ? Simd::Neon : cpu_has_avx2() ? Simd::Avx2 : Simd::Scalar; }

Simd resolve_simd(int requested) {
  switch (static_cast<Simd>(requested)) {
    case Simd::Auto: return best_simd();
    case Simd::Scalar: return Simd::Scalar;
    case Simd::Avx2:
      if (!cpu_has_avx2()) throw std::invalid_argument("[mlx_k2] simd='avx2': this CPU lacks AVX2/FMA/F16C");
      return Simd::Avx2;
    case Simd::Neon:
      if (!kHasNeon) throw std::invalid_argument("[mlx_k2] simd='neon' runs on arm64 only");
      return Simd::Neon;
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

namespace {

// One launch: chunks [c * chunk, (c + 1) * chunk) of [0, n), claimed in increasing c.
struct Job {
  const std::function<void(size_t, size_t)>* fn;
  size_t n, chunk, n_chunks;
  std::atomic<size_t> next{0};
  std::exception_ptr error;  // the first exception a worker hit (under Pool::m)
};

void work(Job& job) {
  for (size_t c; (c = job.next.fetch_add(1, std::memory_order_relaxed)) < job.n_chunks;) {
    (*job.fn)(c * job.chunk, std::min(job.n, (c + 1) * job.chunk));
  }
}

// Workers park on a condition variable between launches. A launch posts its job with a generation number;
// up to `want` workers join it; the caller claims chunks too, then withdraws the job (no more joins) and
// waits for the joined ones to leave. A worker that wakes after that finds no job and parks again.
class Pool {
 public:
  void run(Job& job, int threads) {
    std::unique_lock<std::mutex> busy(launch_, std::try_to_lock);
    if (!busy.owns_lock()) {  // another stream's launch has the workers: run alone rather than queue
      work(job);
      return;
    }
    const int want = threads - 1;
    {
      std::lock_guard<std::mutex> lk(m_);
      while (int(workers_) < want) {
        std::thread(&Pool::loop, this).detach();  // never joined: parked workers cost nothing at exit
        ++workers_;
      }
      job_ = &job;
      want_ = want;
      joined_ = 0;
      ++gen_;
    }
    if (want >= int(workers_)) {
      wake_.notify_all();
    } else {
      for (int i = 0; i < want; ++i) wake_.notify_one();
    }
    std::exception_ptr mine;
    try {
      work(job);
    } catch (...) {
      mine = std::current_exception();
      job.next.store(job.n_chunks);  // the others stop claiming
    }
    std::unique_lock<std::mutex> lk(m_);
    job_ = nullptr;
    done_.wait(lk, [&] { return active_ == 0; });
    if (mine) std::rethrow_exception(mine);
    if (job.error) std::rethrow_exception(job.error);
  }

 private:
  void loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      wake_.wait(lk, [&] { return job_ != nullptr && gen_ != seen; });
      seen = gen_;
      if (joined_ >= want_) continue;
      ++joined_;
      ++active_;
      Job* job = job_;
      lk.unlock();
      try {
        work(*job);
      } catch (...) {
        lk.lock();
        if (!job->error) job->error = std::current_exception();
        job->next.store(job->n_chunks);
        lk.unlock();
      }
      lk.lock();
      if (--active_ == 0) done_.notify_all();
    }
  }

  std::mutex launch_;  // one launch at a time uses the workers
  std::mutex m_;       // guards what follows
  std::condition_variable wake_, done_;
  Job* job_ = nullptr;
  uint64_t gen_ = 0;
  int want_ = 0, joined_ = 0, active_ = 0;
  size_t workers_ = 0;
};

Pool* g_pool = nullptr;
std::once_flag g_pool_once;

// Made on first use and never destroyed (workers may still be parked at exit). A forked child has none of
// the parent's threads, so it starts a new pool (the old one's memory is left as it was).
Pool& pool() {
  std::call_once(g_pool_once, [] {
    g_pool = new Pool;
    pthread_atfork(nullptr, nullptr, [] { g_pool = new Pool; });
  });
  return *g_pool;
}

}  // namespace

void parallel_rows(size_t n, int threads, const std::function<void(size_t, size_t)>& fn) {
  if (n == 0) return;
  // About eight chunks a thread, so a slow CPU's share can move to the others; a multiple of 4 rows.
  const size_t nt = std::max(1, threads);
  const size_t chunk = std::max<size_t>(4, (n / (8 * nt) + 3) & ~size_t(3));
  Job job{&fn, n, chunk, (n + chunk - 1) / chunk};
  if (nt == 1 || job.n_chunks == 1) {
    fn(0, n);
    return;
  }
  pool().run(job, int(std::min(nt, job.n_chunks)));
}

ExpertBatches batch_by_expert(const uint32_t* indices, size_t T, size_t n_experts, float* out, size_t out_rows) {
  ExpertBatches b;
  b.order.resize(T);
  if (indices == nullptr) {
    std::iota(b.order.begin(), b.order.end(), 0u);
    b.starts = {0, T};
    b.experts = {0};
    return b;
  }
  std::vector<size_t> count(n_experts + 1, 0);
  for (size_t p = 0; p < T; ++p) {
    if (indices[p] < n_experts) {
      ++count[indices[p]];
    } else {  // out of range: a NaN row rather than a read past the stack
      std::fill(out + p * out_rows, out + (p + 1) * out_rows, std::numeric_limits<float>::quiet_NaN());
    }
  }
  std::vector<size_t> at(n_experts, 0);
  size_t pos = 0;
  for (size_t e = 0; e < n_experts; ++e) {
    if (count[e] == 0) continue;
    b.experts.push_back(uint32_t(e));
    b.starts.push_back(pos);
    at[e] = pos;
    pos += count[e];
  }
  b.starts.push_back(pos);
  b.order.resize(pos);
  for (size_t p = 0; p < T; ++p)
    if (indices[p] < n_experts) b.order[at[indices[p]]++] = uint32_t(p);
  return b;
}

std::string shape_str(const mx::array& a) {
  std::ostringstream s;
  s << "(";
  for (int i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  s << (a.ndim() == 1 ? ",)" : ")");
  return s.str();
}

std::vector<mx::array> scaled_inputs(const mx::array& x, const mx::array& weight, const mx::array& scales,
                                     const std::optional<mx::array>& indices, mx::Stream st,
                                     const std::function<void(const std::string&)>& fail) {
  if (indices) {
    if (indices->ndim() != 1 || indices->shape(0) != x.shape(0)) fail("indices must be (P,) with P = x rows");
    if (!mx::issubdtype(indices->dtype(), mx::integer)) fail("indices must be integers");
  }
  std::vector<mx::array> inputs = {mx::contiguous(mx::astype(x, mx::float32, st), false, st), weight, scales};
  if (indices) inputs.push_back(mx::contiguous(mx::astype(*indices, mx::uint32, st), false, st));
  return inputs;
}

const void* WeightInput::gathered(std::vector<char>& scratch) const {
  if (in_place) return array.data<char>();
  const size_t item = array.itemsize(), n = array.size();
  const int nd = array.ndim();
  scratch.resize(n * item);
  std::vector<int64_t> index(nd, 0);
  const char* base = array.data<char>();
  for (size_t e = 0; e < n; ++e) {
    int64_t at = 0;
    for (int d = 0; d < nd; ++d) at += index[d] * array.strides()[d];
    std::memcpy(scratch.data() + e * item, base + at * int64_t(item), item);
    for (int d = nd - 1; d >= 0; --d) {  // the next element in row-major order
      if (++index[d] < array.shape(d)) break;
      index[d] = 0;
    }
  }
  return scratch.data();
}

}  // namespace mlx_k2
