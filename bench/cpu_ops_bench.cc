// CPU op micro-benchmarks; each reports its achieved fraction of a ceiling measured in the
// same run (memory read bandwidth for memory-bound ops, the 1024^3 sgemm rate for GEMMs).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "bench/ceilings.h"
#include "kernels/attention.h"
#include "kernels/gemm.h"
#include "kernels/norm.h"
#include "kernels/threads.h"

namespace pds::bench {
namespace {

std::vector<float> Random(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// Linear layer of the `small` preset shape: [m, 512] x [n, 512]^T.
void BM_Gemm(benchmark::State& state) {
  const int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  // Rotate over weight copies totalling >= 512 MiB so every iteration streams from memory.
  const int64_t copies = std::max<int64_t>(1, (int64_t{512} << 20) / (4 * n * k));
  const auto a = Random(m * k, 1);
  std::vector<float> w = Random(copies * n * k, 2);
  std::vector<float> c(m * n);
  int64_t i = 0;
  for (auto _ : state) {
    kernels::cpu::Gemm(a.data(), k, w.data() + (i++ % copies) * n * k, c.data(), n, m, n, k);
    benchmark::DoNotOptimize(c.data());
  }
  const double flops = 2.0 * m * n * k;
  const double bytes = 4.0 * (n * k + m * k + m * n);
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * state.iterations() / 1e9, benchmark::Counter::kIsRate);
  state.counters["GB/s"] =
      benchmark::Counter(bytes * state.iterations() / 1e9, benchmark::Counter::kIsRate);
  state.counters["frac_gemm_peak"] = benchmark::Counter(
      flops * state.iterations() / MeasuredGemmRate(), benchmark::Counter::kIsRate);
  state.counters["frac_mem_bw"] = benchmark::Counter(
      bytes * state.iterations() / MeasuredReadBandwidth(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_Gemm)
    ->Args({1, 1536, 512})
    ->Args({8, 1536, 512})
    ->Args({512, 1536, 512})
    ->Args({1, 8192, 512})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

void BM_RmsNorm(benchmark::State& state) {
  const int64_t rows = state.range(0), cols = 512;
  auto x = Random(rows * cols, 3);
  const auto w = Random(cols, 4);
  std::vector<float> out(rows * cols);
  for (auto _ : state) {
    kernels::cpu::RmsNorm(x.data(), cols, w.data(), out.data(), cols, rows, cols, 1e-5f);
    benchmark::DoNotOptimize(out.data());
  }
  const double bytes = 8.0 * rows * cols;
  state.counters["GB/s"] =
      benchmark::Counter(bytes * state.iterations() / 1e9, benchmark::Counter::kIsRate);
}
BENCHMARK(BM_RmsNorm)->Arg(1)->Arg(512)->Unit(benchmark::kMicrosecond)->UseRealTime();

// Decode attention: `seqs` sequences of `ctx` cached tokens, one query each, small-preset
// heads (8 q heads, 4 kv heads, head_dim 64), block size 16. Memory-bound on the KV read.
void BM_DecodeAttention(benchmark::State& state) {
  const int32_t seqs = state.range(0), ctx = state.range(1), bs = 16;
  const int64_t heads = 8, kv_heads = 4, hd = 64;
  const int32_t blocks_per_seq = (ctx + bs - 1) / bs;
  const int64_t num_blocks = static_cast<int64_t>(seqs) * blocks_per_seq;
  const auto k = Random(num_blocks * kv_heads * bs * hd, 5);
  const auto v = Random(num_blocks * kv_heads * bs * hd, 6);
  const auto q = Random(seqs * heads * hd, 7);
  std::vector<float> out(seqs * heads * hd);
  std::vector<int32_t> cu_q(seqs + 1), kv_lens(seqs, ctx), tables(num_blocks);
  for (int32_t s = 0; s <= seqs; ++s) cu_q[s] = s;
  for (int64_t b = 0; b < num_blocks; ++b) tables[b] = static_cast<int32_t>(b);
  kernels::PagedBatch batch{seqs, cu_q.data(), kv_lens.data(), tables.data(), blocks_per_seq, bs};
  for (auto _ : state) {
    kernels::cpu::PagedAttention(q.data(), heads * hd, k.data(), v.data(), batch, out.data(), heads,
                                 kv_heads, hd, 0.125f);
    benchmark::DoNotOptimize(out.data());
  }
  // Every q head reads its kv head's K and V (GQA reuse may hit cache; count the floor).
  const double bytes = 2.0 * 4.0 * seqs * ctx * kv_heads * hd;
  state.counters["GB/s"] =
      benchmark::Counter(bytes * state.iterations() / 1e9, benchmark::Counter::kIsRate);
  state.counters["frac_mem_bw"] = benchmark::Counter(
      bytes * state.iterations() / MeasuredReadBandwidth(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_DecodeAttention)
    ->Args({1, 1024})
    ->Args({16, 1024})
    ->Args({16, 4096})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

}  // namespace
}  // namespace pds::bench

int main(int argc, char** argv) { return pds::bench::RunBenchmarks(argc, argv); }
