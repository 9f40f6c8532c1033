// Parity of every CUDA backend op against the CPU backend (the reference) on random inputs
// at awkward sizes: inputs are rounded to the CUDA compute dtype first so both backends see
// the same values; outputs are compared with per-dtype tolerances scaled by the output's RMS,
// zero mismatches allowed, NaN fails; sentinels around every CUDA output catch
// out-of-bounds writes. Skips without a CUDA device.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "engine/backend/backend.h"
#include "engine/common/dtype.h"
#include "gtest/gtest.h"
#include "tests/testing/test_util.h"
#if PDS_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "engine/backend/cuda_backend.h"
#include "kernels/cuda/ops.h"
#include "kernels/sampling.h"
#endif

namespace pds::engine {
namespace {

#if PDS_HAVE_CUDA

using testing::RandomVector;

constexpr int kGuard = 64;              // sentinel elements on each side of a CUDA output
constexpr uint16_t kSentinel = 0x7B7B;  // a finite value in bf16 and fp16

constexpr uint32_t kSentinelF32 = 0x7B7B7B7B;  // a finite fp32 value (about 1.3e36)

// Sets an environment variable for the scope of a test step.
class ScopedEnv {
 public:
  // The kernels read their settings from the environment only when told to reload them.
  ScopedEnv(const char* name, const char* value) : name_(name) {
    setenv(name, value, 1);
    kernels::cuda::ReloadKernelSettings();
  }
  ~ScopedEnv() {
    unsetenv(name_);
    kernels::cuda::ReloadKernelSettings();
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
};

// Elementwise |a - e| <= rtol * |e| + atol * rms(e); NaN/Inf always fail.
::testing::AssertionResult Close(const std::vector<float>& a, const std::vector<float>& e,
                                 double rtol, double atol) {
  if (a.size() != e.size()) return ::testing::AssertionFailure() << "size mismatch";
  double sq = 0;
  for (float v : e) sq += static_cast<double>(v) * v;
  const double rms = e.empty() ? 0.0 : std::sqrt(sq / e.size());
  size_t bad = 0, worst = 0;
  double worst_excess = -1;
  for (size_t i = 0; i < a.size(); ++i) {
    const double err = std::fabs(static_cast<double>(a[i]) - e[i]);
    const double tol = rtol * std::fabs(e[i]) + atol * rms;
    const bool fail = !std::isfinite(a[i]) || !std::isfinite(e[i]) || err > tol;
    if (fail) ++bad;
    const double excess = std::isfinite(err) ? err - tol : 1e30;
    if (excess > worst_excess) {
      worst_excess = excess;
      worst = i;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << bad << " of " << a.size() << " elements differ; worst [" << worst << "]: cuda "
         << a[worst] << " vs cpu " << e[worst] << " (rms " << rms << ")";
}

class CudaOpsTest : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
    auto cpu = CreateBackend({.kind = "cpu", .num_threads = 0});
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    cpu_ = std::move(*cpu);
    BackendOptions o;
    o.kind = "cuda";
    o.dtype = GetParam();
    auto gpu = CreateBackend(o);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    gpu_ = std::move(*gpu);
  }
  DType dt() const { return GetParam(); }
  // Tolerances of one rounding step of the dtype, a few times over.
  double rtol() const { return dt() == DType::kBF16 ? 1.6e-2 : 4e-3; }
  double atol() const { return dt() == DType::kBF16 ? 1e-2 : 3e-3; }

  // Random values rounded to the CUDA dtype (what both backends then compute on).
  std::vector<float> Rand(size_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
    std::vector<float> v = RandomVector(n, seed, lo, hi);
    std::vector<uint16_t> h(n);
    ConvertFromFloat(dt(), v.data(), h.data(), n);
    ConvertToFloat(dt(), h.data(), v.data(), n);
    return v;
  }
  DeviceBuffer Cpu(const std::vector<float>& v) {
    auto b = cpu_->Upload(v.data(), DType::kF32, v.size(), "test");
    EXPECT_TRUE(b.ok()) << b.status();
    return std::move(*b);
  }
  // A CUDA copy of `v` with sentinel guards; Gpu(...).data() is the first element.
  struct Guarded {
    DeviceBuffer buffer;
    size_t n = 0;
    size_t esize = 2;
    void* data() const { return buffer.as<uint8_t>() + kGuard * esize; }
  };
  Guarded Gpu(const std::vector<float>& v) {
    Guarded g;
    g.n = v.size();
    std::vector<uint16_t> h(v.size() + 2 * kGuard, kSentinel);
    ConvertFromFloat(dt(), v.data(), h.data() + kGuard, v.size());
    auto b = gpu_->Allocate(h.size() * 2, "test");
    EXPECT_TRUE(b.ok()) << b.status();
    g.buffer = std::move(*b);
    EXPECT_TRUE(gpu_->CopyFromHost(g.buffer.data(), h.data(), h.size() * 2).ok());
    return g;
  }
  // The values of a guarded buffer; fails the test if a sentinel changed.
  std::vector<float> Down(const Guarded& g) {
    EXPECT_TRUE(gpu_->Synchronize().ok());
    std::vector<uint16_t> h(g.n + 2 * kGuard);
    EXPECT_TRUE(gpu_->CopyToHost(h.data(), g.buffer.data(), h.size() * 2).ok());
    for (int i = 0; i < kGuard; ++i) {
      EXPECT_EQ(h[i], kSentinel) << "write before the output at -" << (kGuard - i);
      EXPECT_EQ(h[kGuard + g.n + i], kSentinel) << "write past the output at +" << i;
    }
    std::vector<float> out(g.n);
    ConvertToFloat(dt(), h.data() + kGuard, out.data(), g.n);
    return out;
  }
  // An fp32 CUDA output (logits) with sentinel guards; GpuF32(n).data() is the first element.
  struct GuardedF32 {
    DeviceBuffer buffer;
    size_t n = 0;
    float* data() const { return buffer.as<float>() + kGuard; }
  };
  GuardedF32 GpuF32(size_t n) {
    GuardedF32 g;
    g.n = n;
    const std::vector<uint32_t> h(n + 2 * kGuard, kSentinelF32);
    auto b = gpu_->Allocate(h.size() * 4, "test");
    EXPECT_TRUE(b.ok()) << b.status();
    g.buffer = std::move(*b);
    EXPECT_TRUE(gpu_->CopyFromHost(g.buffer.data(), h.data(), h.size() * 4).ok());
    return g;
  }
  // The values of an fp32 guarded buffer (after a device-wide synchronization: the writer may
  // be any stream); fails the test if a sentinel changed.
  std::vector<float> DownF32(const GuardedF32& g) {
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<uint32_t> h(g.n + 2 * kGuard);
    EXPECT_TRUE(gpu_->CopyToHost(h.data(), g.buffer.data(), h.size() * 4).ok());
    for (int i = 0; i < kGuard; ++i) {
      EXPECT_EQ(h[i], kSentinelF32) << "write before the output at -" << (kGuard - i);
      EXPECT_EQ(h[kGuard + g.n + i], kSentinelF32) << "write past the output at +" << i;
    }
    std::vector<float> out(g.n);
    std::memcpy(out.data(), h.data() + kGuard, g.n * 4);
    return out;
  }
  kernels::cuda::Half16 Half() const {
    return dt() == DType::kBF16 ? kernels::cuda::Half16::kBF16 : kernels::cuda::Half16::kF16;
  }
  // The op names a CUDA backend timed since the last call ("gemv 733x64", "gemm 733x64"...).
  static std::vector<std::string> OpNames(Backend& b) {
    std::vector<std::string> names;
    for (const auto& op : dynamic_cast<CudaBackend&>(b).TakeOpProfile()) names.push_back(op.name);
    return names;
  }
  std::vector<float> DownCpu(const DeviceBuffer& b, size_t n) {
    const float* p = b.as<float>();
    return {p, p + n};
  }
  Weight CpuWeight(const std::vector<float>& v, int64_t rows, int64_t cols) {
    Weight w;
    w.buffer = Cpu(v);
    w.rows = rows;
    w.cols = cols;
    return w;
  }
  Weight GpuWeight(const std::vector<float>& v, int64_t rows, int64_t cols) {
    auto b = gpu_->Upload(v.data(), DType::kF32, v.size(), "test weight");
    EXPECT_TRUE(b.ok()) << b.status();
    Weight w;
    w.buffer = std::move(*b);
    w.rows = rows;
    w.cols = cols;
    return w;
  }
  void Begin(const BatchMetadata& m) {
    ASSERT_TRUE(cpu_->BeginBatch(m).ok());
    ASSERT_TRUE(gpu_->BeginBatch(m).ok());
  }
  // A batch of `tokens` tokens in one sequence (enough for the ops that only index tokens).
  BatchMetadata Tokens(int tokens, uint64_t seed, int vocab = 1 << 30) {
    BatchMetadata m;
    std::mt19937_64 rng(seed);
    for (int t = 0; t < tokens; ++t) {
      m.token_ids.push_back(static_cast<int32_t>(rng() % std::min(vocab, 1 << 20)));
      m.positions.push_back(static_cast<int32_t>(rng() % 8192));
      m.slots.push_back(t);
    }
    m.cu_q = {0, tokens};
    m.kv_lens = {tokens};
    m.last_rows = {tokens - 1};
    m.block_size = 16;
    m.max_blocks = (tokens + 15) / 16;
    m.block_tables.resize(m.max_blocks);
    std::iota(m.block_tables.begin(), m.block_tables.end(), 0);
    return m;
  }

  std::unique_ptr<Backend> cpu_, gpu_;
};

const int kSizes[] = {1, 3, 7, 37, 733};

TEST_P(CudaOpsTest, FillRandomMatchesCpuValues) {
  const size_t n = 100003;
  auto c = cpu_->Allocate(n * 4, "c");
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(cpu_->FillRandom(c->data(), n, 0.5f, 1.0f, 77).ok());
  Guarded g = Gpu(std::vector<float>(n, 0.0f));
  ASSERT_TRUE(gpu_->FillRandom(g.data(), n, 0.5f, 1.0f, 77).ok());
  std::vector<float> expect = DownCpu(*c, n);
  std::vector<uint16_t> h(n);
  ConvertFromFloat(dt(), expect.data(), h.data(), n);
  ConvertToFloat(dt(), h.data(), expect.data(), n);
  EXPECT_TRUE(Close(Down(g), expect, 0, 0));
}

TEST_P(CudaOpsTest, Gemm) {
  for (int m : kSizes) {
    for (auto [n, k] : {std::pair{7, 37}, std::pair{733, 64}, std::pair{96, 733}}) {
      SCOPED_TRACE(::testing::Message() << "m " << m << " n " << n << " k " << k);
      const int lda = k + 8;  // a row stride wider than k
      const auto a = Rand(static_cast<size_t>(m) * lda, 1 + m);
      const auto w = Rand(static_cast<size_t>(n) * k, 2 + n);
      Weight wc = CpuWeight(w, n, k), wg = GpuWeight(w, n, k);
      DeviceBuffer ac = Cpu(a), cc = Cpu(std::vector<float>(size_t(m) * n));
      Guarded ag = Gpu(a), cg = Gpu(std::vector<float>(size_t(m) * n));
      ASSERT_TRUE(cpu_->Gemm(ac.data(), lda, wc, cc.data(), m).ok());
      ASSERT_TRUE(gpu_->Gemm(ag.data(), lda, wg, cg.data(), m).ok());
      EXPECT_TRUE(Close(Down(cg), DownCpu(cc, size_t(m) * n), rtol(), atol()));
    }
  }
}

// --- GEMV (kernels/cuda/gemv.cu): the backend's Gemm and logits at m <= kGemvMaxRows ---

TEST_P(CudaOpsTest, GemvMatchesCpuAtEveryShape) {
  namespace kc = kernels::cuda;
  auto& cuda = dynamic_cast<CudaBackend&>(*gpu_);
  // n = 8449: the FMA kernel's two-rows-per-warp shape (n >= 8448), with an odd last row.
  for (int n : {1, 3, 37, 733, 4096, 8449}) {
    for (int k : {8, 64, 744, 4096}) {
      if (n == 8449 && k == 4096) continue;
      const auto w = Rand(static_cast<size_t>(n) * k, 100 + n + k);
      Weight wc = CpuWeight(w, n, k), wg = GpuWeight(w, n, k);
      for (int m : {1, 2, 3, 4, 5, 7, 8}) {
        SCOPED_TRACE(::testing::Message() << "m " << m << " n " << n << " k " << k);
        const int lda = k + 8 * (m % 3);  // contiguous rows and wider strides
        const size_t out_n = static_cast<size_t>(m) * n;
        const auto a = Rand(static_cast<size_t>(m) * lda, 200 + m + k);
        DeviceBuffer ac = Cpu(a), cc = Cpu(std::vector<float>(out_n));
        Guarded ag = Gpu(a), cg = Gpu(std::vector<float>(out_n));
        ASSERT_TRUE(kc::GemvSupported(ag.data(), lda, wg.data(), k, m));
        ASSERT_TRUE(cpu_->Gemm(ac.data(), lda, wc, cc.data(), m).ok());
        const std::vector<float> expect = DownCpu(cc, out_n);
        // The backend's Gemm takes the GEMV kernel up to kGemvDefaultRows rows by default,
        // cuBLAS above (16-bit output)...
        cuda.SetOpProfiling(true);
        const absl::Status s = gpu_->Gemm(ag.data(), lda, wg, cg.data(), m);
        ASSERT_TRUE(s.ok()) << s;
        EXPECT_EQ(OpNames(cuda), std::vector<std::string>{absl::StrCat(
                                     m <= kc::kGemvDefaultRows ? "gemv " : "gemm ", n, "x", k)});
        cuda.SetOpProfiling(false);
        EXPECT_TRUE(Close(Down(cg), expect, rtol(), atol())) << "16-bit output";
        // ...Gemv itself at every m (m > kGemvFmaRows: the tensor-core kernel)...
        Guarded dg = Gpu(std::vector<float>(out_n));
        ASSERT_EQ(kc::Gemv(Half(), ag.data(), lda, wg.data(), n, k, dg.data(), /*c_fp32=*/false, m,
                           nullptr),
                  cudaSuccess);
        // Launched on the legacy stream, which the backend's Synchronize in Down does not wait
        // for (its streams are non-blocking).
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        EXPECT_TRUE(Close(Down(dg), expect, rtol(), atol())) << "Gemv, 16-bit output";
        // ...and the fp32-output variant (the logits'), launched directly: only the summation
        // order differs from the CPU.
        GuardedF32 fg = GpuF32(out_n);
        ASSERT_EQ(kc::Gemv(Half(), ag.data(), lda, wg.data(), n, k, fg.data(), /*c_fp32=*/true, m,
                           nullptr),
                  cudaSuccess);
        EXPECT_TRUE(Close(DownF32(fg), expect, 1e-4, 1e-4)) << "fp32 output";
      }
    }
  }
}

TEST_P(CudaOpsTest, GemvRejectsWhatItCannotTakeAndGemmFallsBackToCublas) {
  namespace kc = kernels::cuda;
  auto& cuda = dynamic_cast<CudaBackend&>(*gpu_);
  struct Case {
    int m, n, k, lda, a_offset;
    const char* what;
  };
  for (const Case& c :
       {Case{3, 37, 12, 12, 0, "k not a multiple of 8"}, Case{1, 733, 37, 37, 0, "odd k"},
        Case{3, 37, 64, 68, 0, "lda not a multiple of 8"},
        Case{2, 37, 64, 64, 1, "activations not 16-byte aligned"},
        Case{9, 37, 64, 64, 0, "more than kGemvMaxRows rows"}}) {
    SCOPED_TRACE(c.what);
    const size_t out_n = static_cast<size_t>(c.m) * c.n;
    const auto a = Rand(static_cast<size_t>(c.m) * c.lda + c.a_offset, 300 + c.k + c.lda);
    const auto w = Rand(static_cast<size_t>(c.n) * c.k, 301 + c.k);
    Weight wc = CpuWeight(w, c.n, c.k), wg = GpuWeight(w, c.n, c.k);
    DeviceBuffer ac = Cpu(a), cc = Cpu(std::vector<float>(out_n));
    Guarded ag = Gpu(a), cg = Gpu(std::vector<float>(out_n));
    void* a_gpu = static_cast<uint16_t*>(ag.data()) + c.a_offset;
    float* a_cpu = ac.as<float>() + c.a_offset;
    EXPECT_FALSE(kc::GemvSupported(a_gpu, c.lda, wg.data(), c.k, c.m));
    // The launcher refuses, launching and writing nothing...
    for (bool fp32 : {false, true}) {
      EXPECT_EQ(kc::Gemv(Half(), a_gpu, c.lda, wg.data(), c.n, c.k, cg.data(), fp32, c.m, nullptr),
                cudaErrorInvalidValue);
    }
    EXPECT_EQ(cudaGetLastError(), cudaSuccess);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_TRUE(Close(Down(cg), std::vector<float>(out_n, 0.0f), 0, 0)) << "written";
    // ...and the backend's Gemm computes the product with cuBLAS.
    ASSERT_TRUE(cpu_->Gemm(a_cpu, c.lda, wc, cc.data(), c.m).ok());
    cuda.SetOpProfiling(true);
    const absl::Status s = gpu_->Gemm(a_gpu, c.lda, wg, cg.data(), c.m);
    ASSERT_TRUE(s.ok()) << s;
    EXPECT_EQ(OpNames(cuda), std::vector<std::string>{absl::StrCat("gemm ", c.n, "x", c.k)});
    cuda.SetOpProfiling(false);
    EXPECT_TRUE(Close(Down(cg), DownCpu(cc, out_n), rtol(), atol()));
  }
  // A misaligned weight is refused; one row ignores lda; no rows or no columns do nothing.
  const auto a = Rand(64, 310), w = Rand(37 * 64 + 8, 311);
  Guarded ag = Gpu(a), wg = Gpu(w), cg = Gpu(std::vector<float>(37));
  void* w_odd = static_cast<uint16_t*>(wg.data()) + 1;
  EXPECT_FALSE(kc::GemvSupported(ag.data(), 64, w_odd, 64, 1));
  EXPECT_EQ(kc::Gemv(Half(), ag.data(), 64, w_odd, 37, 64, cg.data(), false, 1, nullptr),
            cudaErrorInvalidValue);
  EXPECT_TRUE(kc::GemvSupported(ag.data(), 13, wg.data(), 64, 1));
  EXPECT_FALSE(kc::GemvSupported(ag.data(), 13, wg.data(), 64, 2));
  EXPECT_EQ(kc::Gemv(Half(), ag.data(), 64, wg.data(), 37, 64, cg.data(), false, 0, nullptr),
            cudaSuccess);
  EXPECT_EQ(kc::Gemv(Half(), ag.data(), 64, wg.data(), 0, 64, cg.data(), false, 1, nullptr),
            cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_TRUE(Close(Down(cg), std::vector<float>(37, 0.0f), 0, 0)) << "written";
}

TEST_P(CudaOpsTest, GemvMaxRowsFromTheEnvironment) {
  const int m = 3, n = 733, k = 64;
  const size_t out_n = static_cast<size_t>(m) * n;
  const auto a = Rand(static_cast<size_t>(m) * k, 320), w = Rand(static_cast<size_t>(n) * k, 321);
  Weight wc = CpuWeight(w, n, k), wg = GpuWeight(w, n, k);
  DeviceBuffer ac = Cpu(a), cc = Cpu(std::vector<float>(out_n));
  ASSERT_TRUE(cpu_->Gemm(ac.data(), k, wc, cc.data(), m).ok());
  const std::vector<float> expect = DownCpu(cc, out_n);
  BackendOptions o;
  o.kind = "cuda";
  o.dtype = dt();
  // Read once, when the backend is created: rows above the limit go to cuBLAS.
  for (auto [value, path] : {std::pair{"0", "gemm"}, std::pair{"2", "gemm"}, std::pair{"3", "gemv"},
                             std::pair{"8", "gemv"}, std::pair{"", "gemm"}}) {
    SCOPED_TRACE(::testing::Message() << "PDS_GEMV_MAX_ROWS=\"" << value << "\"");
    std::unique_ptr<Backend> gpu;
    {
      ScopedEnv env("PDS_GEMV_MAX_ROWS", value);
      auto created = CreateBackend(o);
      ASSERT_TRUE(created.ok()) << created.status();
      gpu = std::move(*created);
    }
    Guarded ag = Gpu(a), cg = Gpu(std::vector<float>(out_n));
    dynamic_cast<CudaBackend&>(*gpu).SetOpProfiling(true);
    ASSERT_TRUE(gpu->Gemm(ag.data(), k, wg, cg.data(), m).ok());
    EXPECT_EQ(OpNames(*gpu), std::vector<std::string>{absl::StrCat(path, " ", n, "x", k)});
    ASSERT_TRUE(gpu->Synchronize().ok());
    EXPECT_TRUE(Close(Down(cg), expect, rtol(), atol()));
  }
  for (const char* bad : {"9", "-1", "x", "4x"}) {
    ScopedEnv env("PDS_GEMV_MAX_ROWS", bad);
    auto created = CreateBackend(o);
    EXPECT_EQ(created.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(created.status().message().find("PDS_GEMV_MAX_ROWS"), std::string::npos);
  }
}

TEST_P(CudaOpsTest, GemvEveryLaunchShapeAgrees) {
  // The tensor-core kernel at every m (PDS_GEMV_IMPL=mma); its measurement knobs (warps per
  // block, unroll) change only how k is split.
  namespace kc = kernels::cuda;
  ScopedEnv impl("PDS_GEMV_IMPL", "mma");
  for (auto [m, n, k] :
       {std::tuple{8, 37, 744}, std::tuple{1, 733, 4096}, std::tuple{5, 4099, 64}}) {
    const auto a = Rand(static_cast<size_t>(m) * k, 330 + m),
               w = Rand(static_cast<size_t>(n) * k, 331 + n);
    Weight wc = CpuWeight(w, n, k);
    DeviceBuffer ac = Cpu(a), cc = Cpu(std::vector<float>(static_cast<size_t>(m) * n));
    ASSERT_TRUE(cpu_->Gemm(ac.data(), k, wc, cc.data(), m).ok());
    const std::vector<float> expect = DownCpu(cc, static_cast<size_t>(m) * n);
    Guarded ag = Gpu(a), wg = Gpu(w);
    for (const char* warps : {"1", "3", "16"}) {
      for (const char* unroll : {"4", "8"}) {
        SCOPED_TRACE(::testing::Message() << "m " << m << " n " << n << " k " << k << " warps "
                                          << warps << " unroll " << unroll);
        ScopedEnv e1("PDS_GEMV_WARPS", warps), e2("PDS_GEMV_UNROLL", unroll);
        GuardedF32 fg = GpuF32(static_cast<size_t>(m) * n);
        ASSERT_EQ(kc::Gemv(Half(), ag.data(), k, wg.data(), n, k, fg.data(), true, m, nullptr),
                  cudaSuccess);
        EXPECT_TRUE(Close(DownF32(fg), expect, 1e-4, 1e-4));
      }
    }
  }
}

TEST_P(CudaOpsTest, GemvRecordsInACudaGraph) {
  // No allocation, no synchronization: the launch records into a graph, and each replay
  // recomputes from the current inputs.
  namespace kc = kernels::cuda;
  const int m = 2, n = 733, k = 744;
  const auto a1 = Rand(static_cast<size_t>(m) * k, 340), a2 = Rand(static_cast<size_t>(m) * k, 341);
  const auto w = Rand(static_cast<size_t>(n) * k, 342);
  Weight wc = CpuWeight(w, n, k);
  Guarded ag = Gpu(a1), wg = Gpu(w);
  GuardedF32 fg = GpuF32(static_cast<size_t>(m) * n);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed), cudaSuccess);
  const cudaError_t launched =
      kc::Gemv(Half(), ag.data(), k, wg.data(), n, k, fg.data(), true, m, stream);
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  ASSERT_EQ(launched, cudaSuccess);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiateWithFlags(&exec, graph, 0), cudaSuccess);
  for (const auto* a : {&a1, &a2}) {
    Guarded next = Gpu(*a);  // new activations copied into the recorded input
    ASSERT_EQ(cudaMemcpy(ag.data(), next.data(), a->size() * 2, cudaMemcpyDeviceToDevice),
              cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    DeviceBuffer ac = Cpu(*a), cc = Cpu(std::vector<float>(static_cast<size_t>(m) * n));
    ASSERT_TRUE(cpu_->Gemm(ac.data(), k, wc, cc.data(), m).ok());
    EXPECT_TRUE(Close(DownF32(fg), DownCpu(cc, static_cast<size_t>(m) * n), 1e-4, 1e-4));
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

TEST_P(CudaOpsTest, NormsBiasSiluAddGatherEmbed) {
  for (int rows : kSizes) {
    for (int cols : {16, 48, 733, 4096}) {
      SCOPED_TRACE(::testing::Message() << "rows " << rows << " cols " << cols);
      const size_t n = static_cast<size_t>(rows) * cols;
      const auto x = Rand(n, 10 + rows), d = Rand(n, 11 + cols), wv = Rand(cols, 12, 0.5f, 1.5f);
      Weight wc = CpuWeight(wv, cols, 1), wg = GpuWeight(wv, cols, 1);
      {  // RmsNorm
        DeviceBuffer xc = Cpu(x), oc = Cpu(std::vector<float>(n));
        Guarded xg = Gpu(x), og = Gpu(std::vector<float>(n));
        ASSERT_TRUE(cpu_->RmsNorm(xc.data(), wc, oc.data(), rows, 1e-5f).ok());
        ASSERT_TRUE(gpu_->RmsNorm(xg.data(), wg, og.data(), rows, 1e-5f).ok());
        EXPECT_TRUE(Close(Down(og), DownCpu(oc, n), rtol(), atol())) << "RmsNorm";
      }
      {  // AddRmsNorm: both the residual and the normed output
        DeviceBuffer rc = Cpu(x), dc = Cpu(d), oc = Cpu(std::vector<float>(n));
        Guarded rg = Gpu(x), dg = Gpu(d), og = Gpu(std::vector<float>(n));
        ASSERT_TRUE(cpu_->AddRmsNorm(rc.data(), dc.data(), wc, oc.data(), rows, 1e-5f).ok());
        ASSERT_TRUE(gpu_->AddRmsNorm(rg.data(), dg.data(), wg, og.data(), rows, 1e-5f).ok());
        EXPECT_TRUE(Close(Down(rg), DownCpu(rc, n), rtol(), atol())) << "AddRmsNorm residual";
        EXPECT_TRUE(Close(Down(og), DownCpu(oc, n), 2 * rtol(), 2 * atol())) << "AddRmsNorm";
      }
      {  // AddBias over a strided view, and Add
        DeviceBuffer xc = Cpu(x), dc = Cpu(d);
        Guarded xg = Gpu(x), dg = Gpu(d);
        const int bias_cols = std::max(1, cols - 5);
        const auto bv = Rand(bias_cols, 13);
        Weight bc = CpuWeight(bv, bias_cols, 1), bg = GpuWeight(bv, bias_cols, 1);
        ASSERT_TRUE(cpu_->AddBias(xc.data(), cols, bc, rows).ok());
        ASSERT_TRUE(gpu_->AddBias(xg.data(), cols, bg, rows).ok());
        ASSERT_TRUE(cpu_->Add(xc.data(), dc.data(), n).ok());
        ASSERT_TRUE(gpu_->Add(xg.data(), dg.data(), n).ok());
        EXPECT_TRUE(Close(Down(xg), DownCpu(xc, n), 2 * rtol(), 2 * atol())) << "AddBias+Add";
      }
      {  // SiluGate: [rows, 2 cols] -> [rows, cols]
        const auto gu = Rand(2 * n, 14, -4.0f, 4.0f);
        DeviceBuffer gc = Cpu(gu), oc = Cpu(std::vector<float>(n));
        Guarded gg = Gpu(gu), og = Gpu(std::vector<float>(n));
        ASSERT_TRUE(cpu_->SiluGate(gc.data(), oc.data(), rows, cols).ok());
        ASSERT_TRUE(gpu_->SiluGate(gg.data(), og.data(), rows, cols).ok());
        EXPECT_TRUE(Close(Down(og), DownCpu(oc, n), rtol(), atol())) << "SiluGate";
      }
      {  // Embed and GatherLastRows through batch metadata
        const int vocab = 37;
        BatchMetadata m = Tokens(rows, 15 + rows, vocab);
        for (auto& id : m.token_ids) id %= vocab;
        m.last_rows.clear();
        for (int r = rows - 1; r >= 0; r -= 2) m.last_rows.push_back(r);
        m.kv_lens.assign(m.last_rows.size(), 1);
        m.cu_q.resize(m.last_rows.size() + 1);
        std::iota(m.cu_q.begin(), m.cu_q.end(), 0);
        Begin(m);
        const auto table = Rand(size_t(vocab) * cols, 16);
        Weight tc = CpuWeight(table, vocab, cols), tg = GpuWeight(table, vocab, cols);
        DeviceBuffer ec = Cpu(std::vector<float>(n));
        Guarded eg = Gpu(std::vector<float>(n));
        ASSERT_TRUE(cpu_->Embed(tc, ec.data(), cols).ok());
        ASSERT_TRUE(gpu_->Embed(tg, eg.data(), cols).ok());
        EXPECT_TRUE(Close(Down(eg), DownCpu(ec, n), 0, 0)) << "Embed";
        const size_t gn = m.last_rows.size() * cols;
        DeviceBuffer xc = Cpu(x), lc = Cpu(std::vector<float>(gn));
        Guarded xg = Gpu(x), lg = Gpu(std::vector<float>(gn));
        ASSERT_TRUE(cpu_->GatherLastRows(xc.data(), lc.data(), cols).ok());
        ASSERT_TRUE(gpu_->GatherLastRows(xg.data(), lg.data(), cols).ok());
        EXPECT_TRUE(Close(Down(lg), DownCpu(lc, gn), 0, 0)) << "GatherLastRows";
      }
    }
  }
}

TEST_P(CudaOpsTest, HeadNormAndRope) {
  for (int tokens : kSizes) {
    for (auto [heads, kv_heads, head_dim] :
         {std::tuple{4, 2, 16}, std::tuple{8, 1, 64}, std::tuple{32, 8, 128}}) {
      SCOPED_TRACE(::testing::Message() << "tokens " << tokens << " head_dim " << head_dim);
      const int stride = (heads + 2 * kv_heads) * head_dim;
      const size_t n = size_t(tokens) * stride;
      const auto x = Rand(n, 20 + tokens);
      const auto nw = Rand(head_dim, 21, 0.5f, 1.5f);
      Weight wc = CpuWeight(nw, head_dim, 1), wg = GpuWeight(nw, head_dim, 1);
      BatchMetadata m = Tokens(tokens, 22 + tokens);
      m.positions.back() = 131071;  // a long position: angles need double precision
      Begin(m);
      std::vector<float> inv_freq(head_dim / 2);
      for (int j = 0; j < head_dim / 2; ++j) {
        inv_freq[j] = static_cast<float>(std::pow(500000.0, -2.0 * j / head_dim));
      }
      DeviceBuffer xc = Cpu(x);
      Guarded xg = Gpu(x);
      void* qc = xc.data();
      void* kc = xc.as<float>() + heads * head_dim;
      void* qg = xg.data();
      void* kg = static_cast<uint16_t*>(xg.data()) + heads * head_dim;
      ASSERT_TRUE(cpu_->HeadRmsNorm(qc, stride, wc, tokens, heads, 1e-6f).ok());
      ASSERT_TRUE(gpu_->HeadRmsNorm(qg, stride, wg, tokens, heads, 1e-6f).ok());
      ASSERT_TRUE(cpu_->Rope(qc, kc, stride, heads, kv_heads, head_dim, inv_freq.data()).ok());
      ASSERT_TRUE(gpu_->Rope(qg, kg, stride, heads, kv_heads, head_dim, inv_freq.data()).ok());
      // Twice: the second call reuses the batch's cos/sin tables.
      ASSERT_TRUE(cpu_->Rope(qc, kc, stride, heads, kv_heads, head_dim, inv_freq.data()).ok());
      ASSERT_TRUE(gpu_->Rope(qg, kg, stride, heads, kv_heads, head_dim, inv_freq.data()).ok());
      EXPECT_TRUE(Close(Down(xg), DownCpu(xc, n), 3 * rtol(), 3 * atol()));
    }
  }
}

TEST_P(CudaOpsTest, RopeFrequenciesAreReadAgainWhenTheirValuesChange) {
  // Another model's frequencies may come at the same host address (the first model's vector
  // freed, the next one allocated in its place): the device copy follows the values.
  const int tokens = 37, heads = 8, kv_heads = 2, head_dim = 64;
  const int stride = (heads + 2 * kv_heads) * head_dim;
  const size_t n = size_t(tokens) * stride;
  const auto x = Rand(n, 50);
  BatchMetadata m = Tokens(tokens, 51);
  std::vector<float> inv_freq(head_dim / 2);
  for (double theta : {10000.0, 500000.0}) {
    SCOPED_TRACE(::testing::Message() << "theta " << theta);
    for (int j = 0; j < head_dim / 2; ++j) {
      inv_freq[j] = static_cast<float>(std::pow(theta, -2.0 * j / head_dim));
    }
    Begin(m);
    DeviceBuffer xc = Cpu(x);
    Guarded xg = Gpu(x);
    float* qc = xc.as<float>();
    auto* qg = static_cast<uint16_t*>(xg.data());
    ASSERT_TRUE(
        cpu_->Rope(qc, qc + heads * head_dim, stride, heads, kv_heads, head_dim, inv_freq.data())
            .ok());
    ASSERT_TRUE(
        gpu_->Rope(qg, qg + heads * head_dim, stride, heads, kv_heads, head_dim, inv_freq.data())
            .ok());
    EXPECT_TRUE(Close(Down(xg), DownCpu(xc, n), 3 * rtol(), 3 * atol()));
  }
}

TEST_P(CudaOpsTest, RopeWriteKvFusedMatchesRopeThenWriteKv) {
  // PDS_FUSE_ROPE_KV=1 makes RopeWriteKv one launch: q, k and both caches must come out
  // exactly as from the two launches (and within rounding of the CPU's), a negative slot
  // writes nothing, and nothing outside the outputs is touched.
  for (int tokens : kSizes) {
    for (auto [heads, kv_heads, head_dim, block_size] :
         {std::tuple{4, 2, 16, 7}, std::tuple{8, 1, 64, 16}, std::tuple{32, 8, 128, 32}}) {
      SCOPED_TRACE(::testing::Message()
                   << "tokens " << tokens << " heads " << heads << "/" << kv_heads << " head_dim "
                   << head_dim << " block " << block_size);
      const int stride = (heads + 2 * kv_heads) * head_dim;
      const size_t n = size_t(tokens) * stride;
      const auto x = Rand(n, 40 + tokens);
      BatchMetadata m = Tokens(tokens, 41 + tokens);
      const int num_blocks = (tokens + block_size - 1) / block_size + 2;
      std::vector<int32_t> slots(size_t(num_blocks) * block_size);
      std::iota(slots.begin(), slots.end(), 0);
      std::shuffle(slots.begin(), slots.end(), std::mt19937_64(42 + tokens));
      m.block_size = block_size;
      for (int t = 0; t < tokens; ++t) m.slots[t] = slots[t];
      if (tokens > 1) m.slots[tokens / 2] = -1;
      m.positions.back() = 131071;
      Begin(m);
      std::vector<float> inv_freq(head_dim / 2);
      for (int j = 0; j < head_dim / 2; ++j) {
        inv_freq[j] = static_cast<float>(std::pow(500000.0, -2.0 * j / head_dim));
      }
      const size_t cache_n = size_t(num_blocks) * kv_heads * block_size * head_dim;
      const auto kcache = Rand(cache_n, 43), vcache = Rand(cache_n, 44);
      auto run_gpu = [&](const char* fuse, std::vector<float>& qkv, std::vector<float>& kc,
                         std::vector<float>& vc) {
        ScopedEnv env("PDS_FUSE_ROPE_KV", fuse);
        Guarded xg = Gpu(x), kg = Gpu(kcache), vg = Gpu(vcache);
        auto* q = static_cast<uint16_t*>(xg.data());
        dynamic_cast<CudaBackend&>(*gpu_).SetOpProfiling(true);
        ASSERT_TRUE(gpu_->RopeWriteKv(q, q + heads * head_dim, q + (heads + kv_heads) * head_dim,
                                      stride, heads, kv_heads, head_dim, inv_freq.data(), kg.data(),
                                      vg.data())
                        .ok());
        const std::vector<std::string> ops = OpNames(*gpu_);
        dynamic_cast<CudaBackend&>(*gpu_).SetOpProfiling(false);
        const std::vector<std::string> fused_ops = {"rope+write kv"},
                                       two_ops = {"rope", "write kv"};
        EXPECT_EQ(ops, std::string(fuse) == "1" ? fused_ops : two_ops);
        qkv = Down(xg);
        kc = Down(kg);
        vc = Down(vg);
      };
      std::vector<float> q1, k1, v1, q2, k2, v2;
      run_gpu("1", q1, k1, v1);
      run_gpu("0", q2, k2, v2);
      EXPECT_TRUE(Close(q1, q2, 0, 0)) << "q/k: fused vs two launches";
      EXPECT_TRUE(Close(k1, k2, 0, 0)) << "K cache: fused vs two launches";
      EXPECT_TRUE(Close(v1, v2, 0, 0)) << "V cache: fused vs two launches";
      DeviceBuffer xc = Cpu(x), kc = Cpu(kcache), vc = Cpu(vcache);
      float* qc = xc.as<float>();
      ASSERT_TRUE(cpu_->RopeWriteKv(qc, qc + heads * head_dim, qc + (heads + kv_heads) * head_dim,
                                    stride, heads, kv_heads, head_dim, inv_freq.data(), kc.data(),
                                    vc.data())
                      .ok());
      EXPECT_TRUE(Close(q1, DownCpu(xc, n), 3 * rtol(), 3 * atol())) << "q/k vs cpu";
      EXPECT_TRUE(Close(k1, DownCpu(kc, cache_n), 3 * rtol(), 3 * atol())) << "K cache vs cpu";
      EXPECT_TRUE(Close(v1, DownCpu(vc, cache_n), 0, 0)) << "V cache vs cpu";
      if (tokens > 1) {  // the token without a slot left its would-be slot alone
        const int32_t unused = slots[tokens / 2];
        for (int h = 0; h < kv_heads; ++h) {
          const size_t at =
              ((size_t(unused / block_size) * kv_heads + h) * block_size + unused % block_size) *
              head_dim;
          for (int d = 0; d < head_dim; ++d) ASSERT_EQ(k1[at + d], kcache[at + d]);
        }
      }
    }
  }
}

// A paged attention case: per sequence (new query rows, context length).
struct AttnCase {
  std::vector<std::pair<int, int>> seqs;
  int heads, kv_heads, head_dim, block_size;
};

class CudaAttentionTest : public CudaOpsTest {
 protected:
  // `fused_repeats` > 0: afterwards the same attention that many times more with the fused
  // split combine (PDS_ATTN_COMBINE=fused), each output bitwise the first one's (an ordering
  // race between the merging block and the others would show as a difference).
  void Run(const AttnCase& c, uint64_t seed, int fused_repeats = 0) {
    std::mt19937_64 rng(seed);
    BatchMetadata m;
    m.block_size = c.block_size;
    m.cu_q = {0};
    int total_blocks = 0;
    for (auto [q_len, kv_len] : c.seqs) total_blocks += (kv_len + c.block_size - 1) / c.block_size;
    const int num_blocks = total_blocks + 5;  // a few blocks nobody owns
    std::vector<int32_t> perm(num_blocks);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    int next = 0;
    std::vector<std::vector<int32_t>> tables;
    for (auto [q_len, kv_len] : c.seqs) {
      const int nb = (kv_len + c.block_size - 1) / c.block_size;
      tables.emplace_back(perm.begin() + next, perm.begin() + next + nb);
      next += nb;
      m.max_blocks = std::max(m.max_blocks, nb);
      for (int i = 0; i < q_len; ++i) {
        const int pos = kv_len - q_len + i;
        m.positions.push_back(pos);
        m.token_ids.push_back(0);
        m.slots.push_back(tables.back()[pos / c.block_size] * c.block_size + pos % c.block_size);
      }
      m.cu_q.push_back(m.cu_q.back() + q_len);
      m.kv_lens.push_back(kv_len);
      m.last_rows.push_back(m.cu_q.back() - 1);
    }
    m.block_tables.assign(c.seqs.size() * m.max_blocks, 0);
    for (size_t s = 0; s < tables.size(); ++s) {
      std::copy(tables[s].begin(), tables[s].end(), m.block_tables.begin() + s * m.max_blocks);
    }
    const int tokens = m.num_tokens();
    const int D = c.head_dim;
    // Cache: every slot random, then NaN in every slot no sequence owns or has reached, so a
    // read outside the context poisons the output.
    const size_t cache_n = size_t(num_blocks) * c.kv_heads * c.block_size * D;
    auto kcache = Rand(cache_n, seed + 1), vcache = Rand(cache_n, seed + 2);
    std::vector<bool> live(size_t(num_blocks) * c.block_size, false);
    for (size_t s = 0; s < tables.size(); ++s) {
      for (int p = 0; p < c.seqs[s].second; ++p) {
        live[size_t(tables[s][p / c.block_size]) * c.block_size + p % c.block_size] = true;
      }
    }
    for (int b = 0; b < num_blocks; ++b) {
      for (int h = 0; h < c.kv_heads; ++h) {
        for (int o = 0; o < c.block_size; ++o) {
          if (live[size_t(b) * c.block_size + o]) continue;
          const size_t at = ((size_t(b) * c.kv_heads + h) * c.block_size + o) * D;
          std::fill_n(kcache.begin() + at, D, NAN);
          std::fill_n(vcache.begin() + at, D, NAN);
        }
      }
    }
    const int stride = (c.heads + 2 * c.kv_heads) * D;
    const auto qkv = Rand(size_t(tokens) * stride, seed + 3);
    const size_t out_n = size_t(tokens) * c.heads * D;
    Begin(m);
    DeviceBuffer kc = Cpu(kcache), vc = Cpu(vcache), qc = Cpu(qkv);
    DeviceBuffer oc = Cpu(std::vector<float>(out_n));
    Guarded kg = Gpu(kcache), vg = Gpu(vcache), qg = Gpu(qkv), og = Gpu(std::vector<float>(out_n));
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    // New K/V go through WriteKv first (as in the model), then attention reads them back.
    float* kc_new = qc.as<float>() + c.heads * D;
    float* vc_new = kc_new + c.kv_heads * D;
    auto* kg_new = static_cast<uint16_t*>(qg.data()) + c.heads * D;
    auto* vg_new = kg_new + c.kv_heads * D;
    ASSERT_TRUE(cpu_->WriteKv(kc_new, vc_new, stride, kc.data(), vc.data(), c.kv_heads, D).ok());
    ASSERT_TRUE(gpu_->WriteKv(kg_new, vg_new, stride, kg.data(), vg.data(), c.kv_heads, D).ok());
    ASSERT_TRUE(cpu_->Attention(qc.data(), stride, kc.data(), vc.data(), oc.data(), c.heads,
                                c.kv_heads, D, scale)
                    .ok());
    const absl::Status s = gpu_->Attention(qg.data(), stride, kg.data(), vg.data(), og.data(),
                                           c.heads, c.kv_heads, D, scale);
    ASSERT_TRUE(s.ok()) << s;
    std::vector<float> cache_after = Down(kg);
    std::vector<float> cache_cpu = DownCpu(kc, cache_n);
    for (size_t i = 0; i < cache_n; ++i) {
      if (std::isnan(cache_cpu[i])) {
        ASSERT_TRUE(std::isnan(cache_after[i])) << "cache slot " << i << " written";
        cache_after[i] = cache_cpu[i] = 0.0f;
      }
    }
    EXPECT_TRUE(Close(cache_after, cache_cpu, 0, 0)) << "WriteKv";
    const std::vector<float> first = Down(og);
    EXPECT_TRUE(Close(first, DownCpu(oc, out_n), 2 * rtol(), 2 * atol())) << "attention";
    if (fused_repeats > 0) {
      ScopedEnv fused("PDS_ATTN_COMBINE", "fused");
      for (int r = 0; r < fused_repeats; ++r) {
        ASSERT_TRUE(gpu_->Attention(qg.data(), stride, kg.data(), vg.data(), og.data(), c.heads,
                                    c.kv_heads, D, scale)
                        .ok());
        const std::vector<float> again = Down(og);
        ASSERT_EQ(std::memcmp(again.data(), first.data(), first.size() * sizeof(float)), 0)
            << "fused call " << r << " differs from the combine launch's output";
      }
    }
  }
};

TEST_P(CudaAttentionTest, DecodeRaggedContexts) {
  for (int head_dim : {64, 128, 16, 32, 256}) {
    for (auto [heads, kv_heads] : {std::pair{8, 8}, std::pair{32, 8}, std::pair{8, 1},
                                   std::pair{28, 4}, std::pair{6, 2}, std::pair{16, 8}}) {
      for (int bs : {16, 32, 7}) {
        SCOPED_TRACE(::testing::Message() << "D " << head_dim << " heads " << heads << "/"
                                          << kv_heads << " block " << bs);
        Run({{{1, 1}, {1, 3}, {1, 37}, {1, 733}, {1, 17}, {1, 2049}},
             heads,
             kv_heads,
             head_dim,
             bs},
            head_dim * 100 + heads + bs);
      }
    }
  }
}

// Head dims 64 and 128 take the pipelined decode kernel; PDS_ATTN_DECODE=legacy selects the
// register-loading one (kept for measurements), which must agree as well.
TEST_P(CudaAttentionTest, DecodeLegacyKernel) {
  setenv("PDS_ATTN_DECODE", "legacy", 1);
  kernels::cuda::ReloadKernelSettings();
  for (auto [heads, kv_heads] : {std::pair{32, 8}, std::pair{8, 1}, std::pair{16, 8}}) {
    for (int bs : {16, 7}) {
      SCOPED_TRACE(::testing::Message() << "heads " << heads << "/" << kv_heads << " block " << bs);
      Run({{{1, 1}, {1, 37}, {1, 733}, {1, 2049}}, heads, kv_heads, 128, bs}, heads + bs);
    }
  }
  unsetenv("PDS_ATTN_DECODE");
  kernels::cuda::ReloadKernelSettings();
}

// PDS_ATTN_DECODE=mma selects the tensor-core decode kernel (head dims 64 and 128): every GQA
// shape (1, 2, 3, 4, 7, 8 and 16 query heads per KV head), block sizes that do and do not
// divide its 16-position chunks, contexts that leave chunks part-filled, one split and many,
// and decode rows batched with prefill rows.
TEST_P(CudaAttentionTest, DecodeMmaKernel) {
  ScopedEnv mma("PDS_ATTN_DECODE", "mma");
  for (int head_dim : {128, 64}) {
    for (auto [heads, kv_heads] :
         {std::pair{32, 8}, std::pair{8, 8}, std::pair{8, 1}, std::pair{28, 4}, std::pair{6, 2},
          std::pair{16, 8}, std::pair{32, 2}}) {
      for (int bs : {16, 32, 7}) {
        SCOPED_TRACE(::testing::Message() << "D " << head_dim << " heads " << heads << "/"
                                          << kv_heads << " block " << bs);
        Run({{{1, 1}, {1, 3}, {1, 37}, {1, 733}, {1, 17}, {1, 2049}, {1, 16}, {1, 64}},
             heads,
             kv_heads,
             head_dim,
             bs},
            head_dim * 100 + heads + bs + 7);
      }
    }
  }
  Run({{{37, 37}, {1, 300}, {5, 1000}, {1, 9}}, 32, 8, 128, 16}, 99);
}

// PDS_ATTN_COMBINE=fused: the decode block that finishes a (sequence, head group) last merges
// its splits (no combine launch), with each decode kernel; the backend's split counters are
// reused call after call (each call must leave them zero), with one split and many, and with
// sequences whose contexts give them fewer splits than the batch's longest.
TEST_P(CudaAttentionTest, DecodeFusedCombine) {
  ScopedEnv fused("PDS_ATTN_COMBINE", "fused");
  for (const char* kernel : {"", "legacy", "mma"}) {
    ScopedEnv which("PDS_ATTN_DECODE", kernel);
    for (int head_dim : {128, 64}) {
      for (auto [heads, kv_heads] : {std::pair{32, 8}, std::pair{8, 1}, std::pair{28, 4}}) {
        for (int bs : {16, 7}) {
          SCOPED_TRACE(::testing::Message()
                       << "kernel '" << kernel << "' D " << head_dim << " heads " << heads << "/"
                       << kv_heads << " block " << bs);
          Run({{{1, 1}, {1, 37}, {1, 733}, {1, 2049}, {1, 64}, {1, 65}},
               heads,
               kv_heads,
               head_dim,
               bs},
              head_dim * 100 + heads + bs + 11);
          Run({{{1, 300}, {1, 5}}, heads, kv_heads, head_dim, bs}, heads + bs + 12);
        }
      }
    }
  }
  Run({{{37, 37}, {1, 300}, {5, 1000}, {1, 9}}, 32, 8, 128, 16}, 98);  // with prefill rows
}

// The fused combine's output is bitwise the combine launch's, call after call, with each
// decode kernel (the first call of each case without the setting, 50 more with it).
TEST_P(CudaAttentionTest, FusedCombineIsBitwiseTheCombineLaunch) {
  for (const char* kernel : {"", "legacy", "mma"}) {
    ScopedEnv which("PDS_ATTN_DECODE", kernel);
    SCOPED_TRACE(::testing::Message() << "kernel '" << kernel << "'");
    Run({{{1, 2049}, {1, 37}, {1, 700}, {1, 64}, {1, 1}}, 32, 8, 128, 16}, 21, 50);
    Run({{{1, 1100}, {1, 9}, {1, 300}}, 8, 1, 64, 7}, 22, 50);
  }
}

TEST_P(CudaAttentionTest, PrefillCausalRaggedWithCachedPrefix) {
  for (int head_dim : {64, 128, 16, 256}) {
    for (auto [heads, kv_heads] : {std::pair{8, 8}, std::pair{32, 8}, std::pair{8, 1}}) {
      for (int bs : {16, 32, 7}) {
        SCOPED_TRACE(::testing::Message() << "D " << head_dim << " heads " << heads << "/"
                                          << kv_heads << " block " << bs);
        // Fresh prompts of awkward lengths, chunks extending a cached prefix, and decode rows
        // mixed in (both kernels in one call).
        Run({{{3, 3}, {7, 7}, {37, 37}, {200, 200}, {64, 64}, {65, 200}, {5, 1000}, {1, 90}},
             heads,
             kv_heads,
             head_dim,
             bs},
            /*seed=*/head_dim * 1000 + heads + bs);
      }
    }
  }
}

// A few cases covering both kernels, splits, GQA and odd block sizes: small enough for the
// compute-sanitizer runs (memcheck, racecheck) of bench/gpu/run.sh.
TEST_P(CudaAttentionTest, SanitizerSized) {
  Run({{{1, 37}, {1, 700}, {37, 37}, {65, 200}, {5, 100}}, 32, 8, 128, 16}, 3);
  Run({{{1, 9}, {1, 1100}, {20, 20}, {70, 90}}, 8, 1, 64, 7}, 4);
}

// The tensor-core decode kernel at sizes compute-sanitizer gets through (run.sh's memcheck
// and racecheck pick the SanitizerSized tests).
TEST_P(CudaAttentionTest, SanitizerSizedMmaDecode) {
  ScopedEnv mma("PDS_ATTN_DECODE", "mma");
  Run({{{1, 37}, {1, 700}, {37, 37}, {1, 16}, {1, 5}}, 32, 8, 128, 16}, 5);
  Run({{{1, 9}, {1, 1100}, {20, 20}, {1, 33}}, 8, 1, 64, 7}, 6);
}

// The fused combine at sizes compute-sanitizer gets through.
TEST_P(CudaAttentionTest, SanitizerSizedFusedCombine) {
  ScopedEnv fused("PDS_ATTN_COMBINE", "fused");
  Run({{{1, 37}, {1, 700}, {37, 37}, {1, 200}}, 32, 8, 128, 16}, 7);
  Run({{{1, 9}, {1, 1100}, {1, 70}}, 8, 1, 64, 7}, 8);
}

TEST_P(CudaAttentionTest, PrefillWith128RowTiles) {
  // The mma kernel's other tile height (PDS_ATTN_PREFILL_WARPS=8), same cases.
  setenv("PDS_ATTN_PREFILL_WARPS", "8", 1);
  kernels::cuda::ReloadKernelSettings();
  Run({{{733, 733}, {1, 733}, {300, 1500}, {65, 200}, {5, 100}}, 32, 8, 128, 16}, 17);
  Run({{{200, 200}, {129, 129}, {70, 90}}, 8, 1, 64, 7}, 18);
  unsetenv("PDS_ATTN_PREFILL_WARPS");
  kernels::cuda::ReloadKernelSettings();
}

TEST_P(CudaAttentionTest, PrefillWith64RowTiles) {
  // The mma kernel's 4 warps x 16 rows tile (PDS_ATTN_PREFILL_WARPS=4), same cases.
  setenv("PDS_ATTN_PREFILL_WARPS", "4", 1);
  kernels::cuda::ReloadKernelSettings();
  Run({{{733, 733}, {1, 733}, {300, 1500}, {65, 200}, {5, 100}}, 32, 8, 128, 16}, 19);
  Run({{{200, 200}, {129, 129}, {70, 90}}, 8, 1, 64, 7}, 20);
  unsetenv("PDS_ATTN_PREFILL_WARPS");
  kernels::cuda::ReloadKernelSettings();
}

// Chunks over cached prefixes of every length modulo 64 around the tile edges (where the
// causal mask and the skipped tiles start), one query head per KV head and GQA.
TEST_P(CudaAttentionTest, PrefillPrefixAlignments) {
  for (int warps : {0, 4, 8}) {
    if (warps != 0) setenv("PDS_ATTN_PREFILL_WARPS", std::to_string(warps).c_str(), 1);
    kernels::cuda::ReloadKernelSettings();
    for (int head_dim : {64, 128}) {
      SCOPED_TRACE(::testing::Message() << "warps " << warps << " D " << head_dim);
      std::vector<std::pair<int, int>> seqs;
      for (int prefix = 0; prefix < 64; prefix += 3) {
        const int q_len = 17 + prefix % 23;
        seqs.push_back({q_len, q_len + prefix});  // (new rows, context): the prefix is the rest
      }
      for (int prefix : {127, 128, 129, 191, 255, 256}) seqs.push_back({70, 70 + prefix});
      Run({seqs, 8, 2, head_dim, 16}, 30 + warps + head_dim);
    }
    unsetenv("PDS_ATTN_PREFILL_WARPS");
    kernels::cuda::ReloadKernelSettings();
  }
}

TEST_P(CudaAttentionTest, PrefillLongPrompt) {
  Run({{{733, 733}, {1, 733}, {300, 1500}}, 32, 8, 128, 16}, 7);
}

TEST_P(CudaOpsTest, LogitsInFp32) {
  // Row 1 takes the GEMV kernel (fp32 output), the others cuBLAS.
  for (int rows : {1, 3, 7, 8, 9, 37}) {
    const int vocab = 733, hidden = 96;
    const auto x = Rand(size_t(rows) * hidden, 30 + rows), w = Rand(size_t(vocab) * hidden, 31);
    Weight wc = CpuWeight(w, vocab, hidden), wg = GpuWeight(w, vocab, hidden);
    DeviceBuffer xc = Cpu(x);
    Guarded xg = Gpu(x);
    std::vector<float> lc(size_t(rows) * vocab), lg(size_t(rows) * vocab);
    ASSERT_TRUE(cpu_->Logits(xc.data(), wc, rows, lc.data()).ok());
    ASSERT_TRUE(gpu_->Logits(xg.data(), wg, rows, lg.data()).ok());
    // Same inputs, fp32 output: only the summation order differs.
    EXPECT_TRUE(Close(lg, lc, 1e-4, 1e-4));
  }
}

TEST_P(CudaOpsTest, ArgmaxRowsMatchesCpu) {
  for (int n : {1, 7, 733, 128256}) {
    const int rows = 5;
    std::vector<float> logits = RandomVector(size_t(rows) * n, 40 + n, -10.0f, 10.0f);
    if (n > 7) {
      logits[n + 3] = NAN;                            // row 1: NaN is never chosen
      logits[2 * n + 5] = logits[2 * n + 6] = 50.0f;  // row 2: tie -> lower index
    }
    float* d_logits = nullptr;
    int32_t* d_ids = nullptr;
    ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_logits), logits.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_ids), rows * 4), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(d_logits, logits.data(), logits.size() * 4, cudaMemcpyHostToDevice),
              cudaSuccess);
    ASSERT_EQ(kernels::cuda::ArgmaxRows(d_logits, rows, n, d_ids, nullptr), cudaSuccess);
    std::vector<int32_t> ids(rows);
    ASSERT_EQ(cudaMemcpy(ids.data(), d_ids, rows * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    for (int r = 0; r < rows; ++r) {
      EXPECT_EQ(ids[r], kernels::cpu::Argmax(logits.data() + size_t(r) * n, n)) << "row " << r;
    }
    cudaFree(d_logits);
    cudaFree(d_ids);
  }
}

TEST_P(CudaOpsTest, SampleRowsMatchesCpuSampler) {
  // Same logits, same draws: the device sampler picks exactly the CPU sampler's tokens, for
  // temperature, top-k, top-p and their mixes, with NaNs and ties in the rows.
  std::mt19937_64 rng(5);
  for (int n : {7, 733, 128256}) {
    SCOPED_TRACE(::testing::Message() << "vocab " << n);
    const int rows = 96;
    std::vector<float> logits = RandomVector(size_t(rows) * n, 50 + n, -6.0f, 6.0f);
    std::vector<kernels::RowSampling> params(rows);
    const float temps[] = {0.0f, 0.3f, 0.7f, 1.0f, 1.6f};
    const int32_t top_ks[] = {0, 1, 2, 5, 50, 1000};
    const float top_ps[] = {1.0f, 0.95f, 0.5f, 0.1f};
    for (int r = 0; r < rows; ++r) {
      params[r].temperature = temps[rng() % 5];
      params[r].top_k = top_ks[rng() % 6];
      params[r].top_p = top_ps[rng() % 4];
      params[r].u = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
      float* row = logits.data() + size_t(r) * n;
      if (n > 7) {
        row[rng() % n] = NAN;
        row[3] = row[n - 2] = 9.0f;  // a tie at the top
      }
      if (n > 7 && r % 8 == 1) {  // +inf at the top: the first +inf, whatever the draw
        row[5] = row[n - 3] = INFINITY;
      }
      if (n > 7 && r % 8 == 2) {  // nothing but -inf (and a NaN): the first -inf
        for (int i = 0; i < n; ++i) row[i] = std::isnan(row[i]) ? NAN : -INFINITY;
      }
      if (n > 7 && r % 8 == 0) {  // a tie at the top between -0.0 (lower index) and +0.0
        for (int i = 0; i < n; ++i) row[i] = -1.0f - std::fabs(row[i]);
        row[3] = -0.0f;
        row[n - 2] = 0.0f;
      }
    }
    float* d_logits = nullptr;
    kernels::RowSampling* d_params = nullptr;
    int32_t* d_ids = nullptr;
    ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_logits), logits.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_params), rows * sizeof(params[0])),
              cudaSuccess);
    ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_ids), rows * 4), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(d_logits, logits.data(), logits.size() * 4, cudaMemcpyHostToDevice),
              cudaSuccess);
    ASSERT_EQ(cudaMemcpy(d_params, params.data(), rows * sizeof(params[0]), cudaMemcpyHostToDevice),
              cudaSuccess);
    ASSERT_EQ(kernels::cuda::SampleRows(d_logits, rows, n, d_params, d_ids, nullptr), cudaSuccess);
    std::vector<int32_t> ids(rows);
    ASSERT_EQ(cudaMemcpy(ids.data(), d_ids, rows * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    for (int r = 0; r < rows; ++r) {
      const kernels::RowSampling& sp = params[r];
      const int32_t expect = kernels::cpu::DrawToken(logits.data() + size_t(r) * n, n, sp);
      EXPECT_EQ(ids[r], expect) << "row " << r << " T " << sp.temperature << " k " << sp.top_k
                                << " p " << sp.top_p << " u " << sp.u;
    }
    cudaFree(d_logits);
    cudaFree(d_params);
    cudaFree(d_ids);
  }
}

TEST_P(CudaOpsTest, CopyBlocksMovesEveryListedBlockAndNothingElse) {
  // Two caches paged differently (other pool sizes, shuffled block ids): the kernel copies
  // layers [1, 3) of the listed blocks; every other byte of the destination is untouched.
  const int layers = 4, src_blocks_n = 40, dst_blocks_n = 57;
  const size_t block_bytes = 3 * 7 * 16 * 2;  // kv heads x block size x head dim x 2 bytes
  const size_t src_pool = src_blocks_n * block_bytes, dst_pool = dst_blocks_n * block_bytes;
  std::vector<uint8_t> src(2 * layers * src_pool), dst(2 * layers * dst_pool);
  std::mt19937 rng(8);
  for (auto& b : src) b = static_cast<uint8_t>(rng());
  for (auto& b : dst) b = static_cast<uint8_t>(rng());
  std::vector<int32_t> sb(src_blocks_n), db(dst_blocks_n);
  std::iota(sb.begin(), sb.end(), 0);
  std::iota(db.begin(), db.end(), 0);
  std::shuffle(sb.begin(), sb.end(), rng);
  std::shuffle(db.begin(), db.end(), rng);
  const int count = 23;
  sb.resize(count);
  db.resize(count);
  std::vector<uint8_t> expect = dst;
  for (int l = 1; l < 3; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      for (int i = 0; i < count; ++i) {
        std::memcpy(expect.data() + (2 * l + kv) * dst_pool + db[i] * block_bytes,
                    src.data() + (2 * l + kv) * src_pool + sb[i] * block_bytes, block_bytes);
      }
    }
  }
  void *d_src = nullptr, *d_dst = nullptr;
  int32_t* d_lists = nullptr;
  ASSERT_EQ(cudaMalloc(&d_src, src.size()), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&d_dst, dst.size()), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_lists), 2 * count * 4), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_src, src.data(), src.size(), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_dst, dst.data(), dst.size(), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_lists, sb.data(), count * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_lists + count, db.data(), count * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(kernels::cuda::CopyBlocks(d_src, src_pool, d_dst, dst_pool, d_lists, d_lists + count,
                                      count, 1, 3, block_bytes, nullptr),
            cudaSuccess);
  std::vector<uint8_t> got(dst.size());
  ASSERT_EQ(cudaMemcpy(got.data(), d_dst, got.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_TRUE(got == expect);
  cudaFree(d_src);
  cudaFree(d_dst);
  cudaFree(d_lists);
}

TEST_P(CudaOpsTest, ErrorsAreStatuses) {
  // An unsupported head dim is a clear status, not a crash.
  BatchMetadata m = Tokens(3, 1);
  Begin(m);
  Guarded q = Gpu(std::vector<float>(3 * 3 * 48)), o = Gpu(std::vector<float>(3 * 48));
  Guarded k = Gpu(std::vector<float>(16 * 48)), v = Gpu(std::vector<float>(16 * 48));
  const absl::Status s =
      gpu_->Attention(q.data(), 3 * 48, k.data(), v.data(), o.data(), 1, 1, 48, 1.0f);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented) << s;
  auto huge = gpu_->Allocate(size_t{1} << 50, "a petabyte");
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kResourceExhausted) << huge.status();
  EXPECT_NE(huge.status().message().find("a petabyte"), std::string::npos);
  // The backend still works after the failed allocation.
  Guarded x = Gpu(std::vector<float>(8, 1.0f)), y = Gpu(std::vector<float>(8, 2.0f));
  ASSERT_TRUE(gpu_->Add(x.data(), y.data(), 8).ok());
  EXPECT_TRUE(Close(Down(x), std::vector<float>(8, 3.0f), 0, 0));
}

std::string DTypeParamName(const ::testing::TestParamInfo<DType>& info) {
  return std::string(DTypeName(info.param));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaOpsTest, ::testing::Values(DType::kBF16, DType::kF16),
                         DTypeParamName);
INSTANTIATE_TEST_SUITE_P(Dtypes, CudaAttentionTest, ::testing::Values(DType::kBF16, DType::kF16),
                         DTypeParamName);

#else

TEST(CudaOpsTest, NotBuilt) { GTEST_SKIP() << "built without CUDA"; }

#endif

}  // namespace
}  // namespace pds::engine
