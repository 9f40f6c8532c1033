#include "tests/testing/test_util.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "engine/model/model_writer.h"
#if PDS_HAVE_CUDA
#include "engine/backend/cuda_backend.h"
#endif

namespace pds::testing {
namespace {

template <typename E>
::testing::AssertionResult AllCloseImpl(const std::vector<float>& actual,
                                        const std::vector<E>& expected, double rtol, double atol) {
  if (actual.size() != expected.size()) {
    return ::testing::AssertionFailure()
           << "size mismatch: " << actual.size() << " vs " << expected.size();
  }
  size_t mismatches = 0, worst = 0;
  double worst_excess = -1.0;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double a = actual[i], e = static_cast<double>(expected[i]);
    if (!std::isfinite(a) || !std::isfinite(e)) {
      return ::testing::AssertionFailure()
             << "non-finite value at " << i << ": actual " << a << ", expected " << e;
    }
    const double err = std::abs(a - e);
    const double tol = atol + rtol * std::abs(e);
    if (err > tol) ++mismatches;
    const double excess = err / tol;
    if (excess > worst_excess) {
      worst_excess = excess;
      worst = i;
    }
  }
  if (mismatches == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << mismatches << " of " << actual.size() << " elements differ; worst at " << worst
         << ": actual " << actual[worst] << ", expected " << static_cast<double>(expected[worst])
         << " (rtol " << rtol << ", atol " << atol << ")";
}

// Removes this process's scratch directory at exit.
struct ScratchCleanup {
  std::string dir;
  ~ScratchCleanup() {
    std::error_code ec;
    if (!dir.empty()) std::filesystem::remove_all(dir, ec);
  }
};

}  // namespace

const std::string& ScratchDir() {
  static ScratchCleanup cleanup{absl::StrCat(::testing::TempDir(), "pds_test_", getpid())};
  static const bool created = [] {
    std::filesystem::create_directories(cleanup.dir);
    return true;
  }();
  (void)created;
  return cleanup.dir;
}

::testing::AssertionResult AllClose(const std::vector<float>& actual,
                                    const std::vector<double>& expected, double rtol, double atol) {
  return AllCloseImpl(actual, expected, rtol, atol);
}

::testing::AssertionResult AllClose(const std::vector<float>& actual,
                                    const std::vector<float>& expected, double rtol, double atol) {
  return AllCloseImpl(actual, expected, rtol, atol);
}

double MaxRelativeError(const std::vector<float>& actual, const std::vector<double>& expected) {
  double max_err = 0.0, max_ref = 0.0;
  for (size_t i = 0; i < actual.size() && i < expected.size(); ++i) {
    if (!std::isfinite(actual[i])) return INFINITY;
    max_err = std::max(max_err, std::abs(actual[i] - expected[i]));
    max_ref = std::max(max_ref, std::abs(expected[i]));
  }
  return max_ref > 0 ? max_err / max_ref : max_err;
}

std::vector<float> RandomVector(size_t n, uint64_t seed, float lo, float hi) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

absl::StatusOr<std::string> MakeModelDir(const engine::ModelConfig& config, const std::string& name,
                                         uint64_t seed, engine::DType dtype, int64_t shard_bytes,
                                         bool tokenizer) {
  const std::string dir = absl::StrCat(ScratchDir(), "/", name);
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  engine::MakeModelOptions options;
  options.out_dir = dir;
  options.seed = seed;
  options.dtype = dtype;
  options.max_shard_bytes = shard_bytes;
  options.write_tokenizer = tokenizer;
  absl::Status status = engine::WriteRandomModel(config, options);
  if (!status.ok()) return status;
  return dir;
}

engine::ModelConfig SmallTestConfig() {
  engine::ModelConfig c;
  c.architecture_name = "LlamaForCausalLM";
  c.architecture = engine::Architecture::kLlama;
  c.vocab_size = 300;
  c.hidden_size = 48;
  c.intermediate_size = 100;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 12;
  c.max_position_embeddings = 1024;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  return c;
}

bool HasCudaDevice() {
#if PDS_HAVE_CUDA
  static const bool available = engine::CudaDeviceAvailable();
  return available;
#else
  return false;
#endif
}

int FreeLoopbackPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return 0;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  close(fd);
  return port;
}

}  // namespace pds::testing
