// Loopback bandwidth of the host TCP KV transport: one sequence's K/V (16 layers x 8 kv heads x
// head_dim 64 x block 16, fp32; 512 or 2048 tokens) packed by a source from a prefill-side
// cache region, sent over 127.0.0.1 and stored by a sink into a decode-side cache region.
// Each reports GB/s of packed K/V and the achieved fraction of two ceilings measured in the
// same run: a single-threaded memcpy of the same bytes (the transfer is a chain of copies:
// pack, socket send, socket receive, store) and the machine's memory read bandwidth. The
// checksum is measured alone too, to show it is not the bottleneck.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "bench/ceilings.h"
#include "engine/transfer/kv_transport.h"
#include "engine/transfer/tcp_transport.h"

namespace pds::bench {
namespace {

using namespace pds::engine;

KvTransferHeader Shape(int32_t tokens) {
  KvTransferHeader h;
  h.request_id = "bench";
  h.num_tokens = tokens;
  h.num_layers = 16;
  h.kv_heads = 8;
  h.head_dim = 64;
  h.block_size = 16;
  h.num_blocks = (tokens + h.block_size - 1) / h.block_size;
  h.dtype = DType::kF32;
  return h;
}

std::unique_ptr<uint8_t[]> Region(size_t bytes, uint64_t seed) {
  std::unique_ptr<uint8_t[]> region(new uint8_t[bytes]);
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i + 8 <= bytes; i += 8) {
    const uint64_t v = rng();
    std::memcpy(region.get() + i, &v, 8);
  }
  return region;
}

// Single-threaded memcpy of `bytes` between two fresh regions, best of 5, in bytes/s.
double MeasuredMemcpyBandwidth(size_t bytes) {
  auto src = Region(bytes, 1);
  std::unique_ptr<uint8_t[]> dst(new uint8_t[bytes]);
  std::memset(dst.get(), 0, bytes);
  double best = 0.0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    std::memcpy(dst.get(), src.get(), bytes);
    benchmark::DoNotOptimize(dst.get());
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, bytes / secs);
  }
  return best;
}

class RegionSource : public KvSource {
 public:
  RegionSource(const uint8_t* region, size_t layer_bytes)
      : region_(region), layer_bytes_(layer_bytes) {}
  absl::Status ReadLayer(int32_t layer, int32_t, uint8_t* dst, size_t bytes) override {
    std::memcpy(dst, region_ + layer * layer_bytes_, bytes);
    return absl::OkStatus();
  }

 private:
  const uint8_t* region_;
  size_t layer_bytes_;
};

class RegionSink : public KvSink {
 public:
  RegionSink(uint8_t* region, size_t layer_bytes) : region_(region), layer_bytes_(layer_bytes) {}
  absl::StatusOr<int32_t> Reserve(const KvTransferHeader& header) override { return 0; }
  absl::Status WriteLayer(const std::string& request_id, int32_t layer, const uint8_t* data,
                          size_t bytes) override {
    std::memcpy(region_ + layer * layer_bytes_, data, bytes);
    return absl::OkStatus();
  }
  void Complete(const std::string& request_id, absl::Status status, int32_t next_token) override {}

 private:
  uint8_t* region_;
  size_t layer_bytes_;
};

void BM_TcpKvTransfer(benchmark::State& state) {
  const KvTransferHeader h = Shape(static_cast<int32_t>(state.range(0)));
  TcpTransportOptions options;
  options.socket_buffer_bytes = static_cast<int>(state.range(1)) << 10;
  const size_t layer_bytes = h.LayerBytes(), total = layer_bytes * h.num_layers;
  const auto src = Region(total, 2);
  std::unique_ptr<uint8_t[]> dst(new uint8_t[total]);
  std::memset(dst.get(), 0, total);
  RegionSource source(src.get(), layer_bytes);
  RegionSink sink(dst.get(), layer_bytes);
  auto receiver = StartTcpKvReceiver("127.0.0.1", 0, &sink, options);
  if (!receiver.ok()) return state.SkipWithError(receiver.status().ToString().c_str());
  auto sender = CreateTcpKvSender(options);
  for (auto _ : state) {
    auto stats = sender->Send((*receiver)->address(), h, source, absl::Now() + absl::Seconds(60));
    if (!stats.ok()) return state.SkipWithError(stats.status().ToString().c_str());
  }
  if (std::memcmp(src.get(), dst.get(), total) != 0) return state.SkipWithError("data differs");
  const double bytes = static_cast<double>(total) * state.iterations();
  state.counters["MiB"] = static_cast<double>(total) / (1 << 20);
  state.counters["GB/s"] = benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsRate);
  state.counters["frac_memcpy"] =
      benchmark::Counter(bytes / MeasuredMemcpyBandwidth(total), benchmark::Counter::kIsRate);
  state.counters["frac_mem_bw"] =
      benchmark::Counter(bytes / MeasuredReadBandwidth(), benchmark::Counter::kIsRate);
}
// Args: tokens, socket buffer KiB (0: kernel autotuning).
BENCHMARK(BM_TcpKvTransfer)
    ->Args({512, 4096})
    ->Args({2048, 4096})
    ->Args({512, 0})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_Checksum(benchmark::State& state) {
  const size_t bytes = Shape(static_cast<int32_t>(state.range(0))).LayerBytes();
  const auto data = Region(bytes, 3);
  for (auto _ : state) benchmark::DoNotOptimize(tcp_wire::Checksum(data.get(), bytes));
  const double total = static_cast<double>(bytes) * state.iterations();
  state.counters["GB/s"] = benchmark::Counter(total / 1e9, benchmark::Counter::kIsRate);
  state.counters["frac_memcpy"] =
      benchmark::Counter(total / MeasuredMemcpyBandwidth(bytes), benchmark::Counter::kIsRate);
}
// One layer of the 512- and 2048-token shapes (2 and 8 MiB).
BENCHMARK(BM_Checksum)->Arg(512)->Arg(2048)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace
}  // namespace pds::bench

int main(int argc, char** argv) {
  return pds::bench::RunBenchmarks(
      argc, argv,
      {{"kv_shape", "16 layers x 8 kv heads x head_dim 64 x block 16, fp32, K and V"},
       {"transport", "host TCP over 127.0.0.1, one connection per transfer"}});
}
