// The CUDA IPC KV transport between two processes on one GPU: the test re-executes itself as a
// child (a fresh process, no CUDA state inherited through fork) that owns a decode-side KV pool
// and serves a receiver; the parent sends sequences with ragged block lists from its own pool
// and checks that the child's reserved blocks hold exactly the parent's bytes, plus
// back-pressure, cancellation mid-transfer and refusal. Skips without a CUDA device.
#include "engine/transfer/cuda_ipc_transport.h"

#include <cuda_runtime_api.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/backend/cuda_backend.h"
#include "gtest/gtest.h"

extern char** environ;

namespace pds::engine {
namespace {

constexpr int32_t kLayers = 4;
constexpr int32_t kKvHeads = 2;
constexpr int32_t kBlockSize = 16;
constexpr int32_t kHeadDim = 64;
constexpr int32_t kBlocks = 64;
constexpr const char* kChildDirEnv = "PDS_CUDA_IPC_TEST_CHILD_DIR";

size_t BlockBytes() { return size_t{kKvHeads} * kBlockSize * kHeadDim * 2; }  // bf16

KvTransferHeader Header(const std::string& id, int32_t blocks) {
  KvTransferHeader h;
  h.request_id = id;
  h.num_layers = kLayers;
  h.num_blocks = blocks;
  h.kv_heads = kKvHeads;
  h.block_size = kBlockSize;
  h.head_dim = kHeadDim;
  h.num_tokens = blocks * kBlockSize - 3;
  h.dtype = DType::kBF16;
  h.next_token = 1;
  return h;
}

// The blocks each request gets on each side (ragged: runs, singletons, reversed order).
struct Plan {
  std::vector<int32_t> src, dst;
};
const std::map<std::string, Plan>& Plans() {
  static const auto* plans = new std::map<std::string, Plan>{
      {"one", {{5}, {60}}},
      {"run", {{10, 11, 12, 13}, {20, 21, 22, 23}}},
      {"ragged", {{1, 2, 3, 40, 41, 7}, {30, 31, 50, 51, 52, 0}}},
      {"reversed", {{33, 32, 31}, {9, 8, 7}}},
      {"bp", {{44, 45}, {46, 47}}},
      {"cancel", {{2, 3, 4}, {55, 56, 57}}},
      {"refused", {{6}, {6}}},
  };
  return *plans;
}

absl::Status Cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(err)));
}

#define PDS_TEST_RETURN(expr) \
  do {                        \
    absl::Status s_ = (expr); \
    if (!s_.ok()) return s_;  \
  } while (0)

struct DevicePool {
  absl::Status Allocate(uint64_t seed) {
    bytes = 2 * size_t{kLayers} * kBlocks * BlockBytes();
    PDS_TEST_RETURN(Cuda(cudaSetDevice(0), "cudaSetDevice"));
    PDS_TEST_RETURN(Cuda(cudaMalloc(&data, bytes), "cudaMalloc"));
    std::vector<uint8_t> host(bytes);
    std::mt19937_64 rng(seed);
    for (auto& b : host) b = static_cast<uint8_t>(rng());
    PDS_TEST_RETURN(Cuda(cudaMemcpy(data, host.data(), bytes, cudaMemcpyHostToDevice), "fill"));
    return absl::OkStatus();
  }
  KvPoolLayout Layout() const {
    KvPoolLayout l;
    l.data = data;
    l.bytes = bytes;
    l.block_bytes = BlockBytes();
    l.pool_bytes = BlockBytes() * kBlocks;
    l.num_layers = kLayers;
    l.num_blocks = kBlocks;
    l.device = 0;
    return l;
  }
  // The blocks' bytes, layer by layer, K then V, in list order.
  std::string Gather(const std::vector<int32_t>& blocks) const {
    const KvPoolLayout l = Layout();
    std::string out;
    std::string block(BlockBytes(), '\0');
    for (int32_t layer = 0; layer < kLayers; ++layer) {
      for (int kv = 0; kv < 2; ++kv) {
        for (int32_t b : blocks) {
          cudaMemcpy(block.data(), static_cast<uint8_t*>(data) + l.Offset(layer, kv, b),
                     BlockBytes(), cudaMemcpyDeviceToHost);
          out += block;
        }
      }
    }
    return out;
  }
  void* data = nullptr;
  size_t bytes = 0;
};

void WriteFile(const std::filesystem::path& path, const std::string& data) {
  const auto tmp = path.string() + ".tmp";
  std::ofstream(tmp, std::ios::binary) << data;
  std::filesystem::rename(tmp, path);
}

std::string ReadFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The decode side in the child: reserves the planned blocks, dumps them when complete.
class ChildSink : public KvSink {
 public:
  ChildSink(const DevicePool& pool, std::filesystem::path dir)
      : pool_(pool), dir_(std::move(dir)) {}
  absl::Status Reserve(const KvTransferHeader& header) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (header.request_id == "refused") return absl::FailedPreconditionError("KV layout mismatch");
    if (header.request_id == "bp" && ++bp_offers_ <= 3) return absl::ResourceExhaustedError("full");
    if (!Plans().count(header.request_id)) return absl::NotFoundError("unknown request");
    return absl::OkStatus();
  }
  absl::Status WriteLayer(const std::string&, int32_t, const uint8_t*, size_t) override {
    return absl::InternalError("host path used");
  }
  absl::StatusOr<std::vector<int32_t>> ReservedBlocks(const std::string& id) override {
    return Plans().at(id).dst;
  }
  void Complete(const std::string& id, absl::Status status) override {
    if (status.ok()) {
      WriteFile(dir_ / (id + ".bin"), pool_.Gather(Plans().at(id).dst));
    } else {
      WriteFile(dir_ / (id + ".err"), status.ToString());
    }
  }

 private:
  const DevicePool& pool_;
  const std::filesystem::path dir_;
  std::mutex mu_;
  int bp_offers_ = 0;
};

// Runs only in the child (the environment names its directory; disabled so that a normal run
// does not list it): serves until `stop` appears.
TEST(CudaIpcChild, DISABLED_ServeDecodePool) {
  const char* dir_env = std::getenv(kChildDirEnv);
  if (dir_env == nullptr) GTEST_SKIP() << "the child process of CudaIpcTransportTest";
  const std::filesystem::path dir(dir_env);
  DevicePool pool;
  ASSERT_TRUE(pool.Allocate(2).ok());
  ChildSink sink(pool, dir);
  auto receiver = StartCudaIpcKvReceiver("127.0.0.1", 0, &sink, pool.Layout());
  ASSERT_TRUE(receiver.ok()) << receiver.status();
  WriteFile(dir / "address", (*receiver)->address());
  const absl::Time limit = absl::Now() + absl::Seconds(300);
  while (!std::filesystem::exists(dir / "stop") && absl::Now() < limit) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  (*receiver)->Shutdown();
}

class Source : public KvSource {
 public:
  explicit Source(std::vector<int32_t> blocks) : blocks_(std::move(blocks)) {}
  absl::Status ReadLayer(int32_t, uint8_t*, size_t) override {
    return absl::InternalError("host path used");
  }
  absl::StatusOr<std::vector<int32_t>> Blocks() override { return blocks_; }
  absl::Status WaitLayer(int32_t layer) override {
    if (on_layer) on_layer(layer);
    return absl::OkStatus();
  }
  std::function<void(int32_t)> on_layer;

 private:
  std::vector<int32_t> blocks_;
};

class CudaIpcTransportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::getenv(kChildDirEnv) != nullptr) GTEST_SKIP() << "in the child";
    if (!CudaDeviceAvailable()) GTEST_SKIP() << "no CUDA device";
    dir_ = std::filesystem::temp_directory_path() / absl::StrCat("pds-ipc-test-", getpid());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    // The child: this binary again, running only the child test.
    const std::string self = std::filesystem::read_symlink("/proc/self/exe");
    const std::string filter = "--gtest_filter=CudaIpcChild.DISABLED_ServeDecodePool";
    const std::string disabled = "--gtest_also_run_disabled_tests";
    std::vector<std::string> env_strings;
    for (char** e = environ; *e != nullptr; ++e) env_strings.push_back(*e);
    env_strings.push_back(absl::StrCat(kChildDirEnv, "=", dir_.string()));
    std::vector<char*> envp;
    for (auto& s : env_strings) envp.push_back(s.data());
    envp.push_back(nullptr);
    char* argv[] = {const_cast<char*>(self.c_str()), const_cast<char*>(filter.c_str()),
                    const_cast<char*>(disabled.c_str()), nullptr};
    ASSERT_EQ(posix_spawn(&child_, self.c_str(), nullptr, nullptr, argv, envp.data()), 0);
    const absl::Time limit = absl::Now() + absl::Seconds(60);
    while (!std::filesystem::exists(dir_ / "address")) {
      ASSERT_LT(absl::Now(), limit) << "the child did not start its receiver";
      int status = 0;
      ASSERT_EQ(waitpid(child_, &status, WNOHANG), 0) << "the child exited early";
      absl::SleepFor(absl::Milliseconds(20));
    }
    address_ = ReadFile(dir_ / "address");
    ASSERT_TRUE(src_.Allocate(1).ok());
    auto sender = CreateCudaIpcKvSender(src_.Layout());
    ASSERT_TRUE(sender.ok()) << sender.status();
    sender_ = *std::move(sender);
  }

  void TearDown() override {
    if (child_ > 0) {
      WriteFile(dir_ / "stop", "");
      const absl::Time limit = absl::Now() + absl::Seconds(30);
      int status = 0;
      while (waitpid(child_, &status, WNOHANG) == 0) {
        if (absl::Now() > limit) {
          kill(child_, SIGKILL);
          waitpid(child_, &status, 0);
          break;
        }
        absl::SleepFor(absl::Milliseconds(20));
      }
      EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
    }
    if (src_.data != nullptr) cudaFree(src_.data);
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }

  // Waits for the child's record of request `id` (".bin" or ".err").
  std::string Await(const std::string& name) {
    const absl::Time limit = absl::Now() + absl::Seconds(30);
    while (!std::filesystem::exists(dir_ / name) && absl::Now() < limit) {
      absl::SleepFor(absl::Milliseconds(10));
    }
    return ReadFile(dir_ / name);
  }

  absl::StatusOr<KvSendStats> Send(const std::string& id, Source& source,
                                   std::function<bool()> cancelled = nullptr) {
    const Plan& plan = Plans().at(id);
    return sender_->Send(address_, Header(id, static_cast<int32_t>(plan.src.size())), source,
                         absl::Now() + absl::Seconds(30), std::move(cancelled));
  }

  std::filesystem::path dir_;
  pid_t child_ = -1;
  std::string address_;
  DevicePool src_;
  std::unique_ptr<KvSender> sender_;
};

TEST_F(CudaIpcTransportTest, RaggedSequencesArriveByteForByte) {
  for (const char* id : {"one", "run", "ragged", "reversed"}) {
    const Plan& plan = Plans().at(id);
    Source source(plan.src);
    auto stats = Send(id, source);
    ASSERT_TRUE(stats.ok()) << stats.status();
    EXPECT_EQ(stats->offers, 1);
    const std::string got = Await(absl::StrCat(id, ".bin"));
    const std::string want = src_.Gather(plan.src);
    ASSERT_EQ(got.size(), want.size()) << id;
    EXPECT_TRUE(got == want) << id << ": the child's blocks differ from the parent's";
  }
}

TEST_F(CudaIpcTransportTest, BackPressureRetriesUntilReserved) {
  Source source(Plans().at("bp").src);
  auto stats = Send("bp", source);
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->offers, 4);
  EXPECT_TRUE(Await("bp.bin") == src_.Gather(Plans().at("bp").src));
}

TEST_F(CudaIpcTransportTest, CancelledMidTransfer) {
  std::atomic<bool> cancel{false};
  Source source(Plans().at("cancel").src);
  source.on_layer = [&](int32_t layer) {
    if (layer == 2) cancel = true;
  };
  auto stats = Send("cancel", source, [&] { return cancel.load(); });
  EXPECT_EQ(stats.status().code(), absl::StatusCode::kCancelled) << stats.status();
  EXPECT_NE(Await("cancel.err").find("CANCELLED"), std::string::npos);
}

TEST_F(CudaIpcTransportTest, RefusalNamesTheRequest) {
  Source source(Plans().at("refused").src);
  auto stats = Send("refused", source);
  ASSERT_EQ(stats.status().code(), absl::StatusCode::kFailedPrecondition) << stats.status();
  EXPECT_NE(stats.status().message().find("'refused'"), std::string::npos) << stats.status();
  EXPECT_NE(stats.status().message().find(address_), std::string::npos) << stats.status();
}

}  // namespace
}  // namespace pds::engine
