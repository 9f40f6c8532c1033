#include "bench/ceilings.h"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <vector>

#include "kernels/gemm.h"
#include "kernels/threads.h"

namespace pds::bench {
namespace {
double Seconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double>(d).count();
}
}  // namespace

double MeasuredReadBandwidth() {
  static const double value = [] {
    const size_t n = size_t{1} << 30 >> 2;  // 1 GiB of floats, far beyond any cache
    std::vector<float> data(n, 1.0f);
    double best = 0.0;
    volatile float sink = 0.0f;
    for (int rep = 0; rep < 5; ++rep) {
      const auto start = std::chrono::steady_clock::now();
      std::vector<float> partial(kernels::cpu::NumThreads(), 0.0f);
      kernels::cpu::ParallelFor(static_cast<int64_t>(n) / 4096, [&](int64_t b, int64_t e) {
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (int64_t i = b * 4096; i < e * 4096; i += 4) {
          s0 += data[i];
          s1 += data[i + 1];
          s2 += data[i + 2];
          s3 += data[i + 3];
        }
        sink = sink + s0 + s1 + s2 + s3;
      });
      const double secs = Seconds(std::chrono::steady_clock::now() - start);
      best = std::max(best, n * sizeof(float) / secs);
    }
    return best;
  }();
  return value;
}

double MeasuredGemmRate() {
  static const double value = [] {
    const int64_t n = 1024;
    std::vector<float> a(n * n, 0.5f), w(n * n, 0.25f), c(n * n);
    double best = 0.0;
    for (int rep = 0; rep < 5; ++rep) {
      const auto start = std::chrono::steady_clock::now();
      kernels::cpu::Gemm(a.data(), n, w.data(), c.data(), n, n, n, n);
      const double secs = Seconds(std::chrono::steady_clock::now() - start);
      best = std::max(best, 2.0 * n * n * n / secs);
    }
    return best;
  }();
  return value;
}

int RunBenchmarks(int argc, char** argv,
                  const std::vector<std::pair<std::string, std::string>>& context) {
  const char* threads = std::getenv("PDS_THREADS");
  kernels::cpu::SetNumThreads(threads ? std::atoi(threads) : 2);
  benchmark::Initialize(&argc, argv);
  for (const auto& [name, value] : context) benchmark::AddCustomContext(name, value);
  benchmark::AddCustomContext("threads", std::to_string(kernels::cpu::NumThreads()));
  benchmark::AddCustomContext("mem_read_GBps", std::to_string(MeasuredReadBandwidth() / 1e9));
  benchmark::AddCustomContext("sgemm_1024_GFLOPs", std::to_string(MeasuredGemmRate() / 1e9));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace pds::bench
