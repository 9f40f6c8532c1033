// The CUDA IPC KV transport between two processes on one GPU: the test re-executes itself as a
// child (a fresh process, no CUDA state inherited through fork) that owns a decode-side KV pool
// and serves a receiver; the parent sends sequences with ragged block lists from its own pool
// and checks that the child's reserved blocks hold exactly the parent's bytes (also with layers
// that become ready one at a time, and over repeated transfers), plus back-pressure,
// cancellation mid-transfer and refusal; and the early DONE: no confirmation before the copies
// complete, a cancellation or copy failure after DONE failing the transfer on both sides, the
// receiver giving up on a stalled sender. Skips without a CUDA device.
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
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
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
  std::vector<int32_t> src, dst;  // dst: the receiver's blocks for src after the held ones
  int32_t held = 0;               // leading blocks of src the receiver holds already
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
      {"staged", {{1, 2, 3, 40, 41, 7, 9}, {30, 31, 50, 51, 52, 0, 12}}},
      {"staged_run", {{10, 11, 12}, {24, 25, 26}}},
      {"gated", {{14, 15, 16, 50}, {33, 34, 35, 9}}},
      {"late_cancel", {{17, 18, 19}, {36, 37, 38}}},
      {"copy_fault", {{20, 21, 22}, {39, 40, 41}}},
      {"stalled", {{23, 24}, {42, 43}}},
      {"sync", {{1, 2, 3, 40, 41, 7}, {30, 31, 50, 51, 52, 0}}},
      {"late", {{25, 26, 27, 60}, {44, 45, 46, 1}}},
      {"no_token", {{28, 29}, {47, 48}}},
      {"held", {{34, 35, 36, 37, 38}, {58, 59}, 3}},
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
  absl::StatusOr<int32_t> Reserve(const KvTransferHeader& header) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (header.request_id == "refused") return absl::FailedPreconditionError("KV layout mismatch");
    if (header.request_id == "bp" && ++bp_offers_ <= 3) return absl::ResourceExhaustedError("full");
    auto plan = Plans().find(header.request_id);
    if (plan == Plans().end()) return absl::NotFoundError("unknown request");
    return plan->second.held;
  }
  absl::Status WriteLayer(const std::string&, int32_t, const uint8_t*, size_t) override {
    return absl::InternalError("host path used");
  }
  absl::StatusOr<std::vector<int32_t>> ReservedBlocks(const std::string& id) override {
    return Plans().at(id).dst;
  }
  void Complete(const std::string& id, absl::Status status, int32_t next_token) override {
    if (status.ok()) {
      WriteFile(dir_ / (id + ".token"), std::to_string(next_token));  // before .bin
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
  absl::Status ReadLayer(int32_t, int32_t, uint8_t*, size_t) override {
    return absl::InternalError("host path used");
  }
  absl::StatusOr<std::vector<int32_t>> Blocks() override { return blocks_; }
  absl::Status WaitLayer(int32_t layer) override {
    if (on_layer) on_layer(layer);
    return absl::OkStatus();
  }
  std::function<void(int32_t)> on_layer;
  absl::StatusOr<int32_t> NextToken() override {
    return next_token ? next_token() : KvSource::NextToken();
  }
  std::function<absl::StatusOr<int32_t>()> next_token;

 private:
  std::vector<int32_t> blocks_;
};

// Layers "computed" one at a time by another thread, every few milliseconds: WaitLayer blocks
// until its layer is, LayerReady tells without blocking. Records the WaitLayer calls.
class StagedSource : public Source {
 public:
  explicit StagedSource(std::vector<int32_t> blocks) : Source(std::move(blocks)) {
    producer_ = std::thread([this] {
      for (int32_t l = 1; l <= kLayers; ++l) {
        absl::SleepFor(absl::Milliseconds(5));
        ready_.store(l);
      }
    });
  }
  ~StagedSource() override { producer_.join(); }
  absl::Status WaitLayer(int32_t layer) override {
    const absl::Time limit = absl::Now() + absl::Seconds(10);
    while (ready_.load() <= layer) {
      if (absl::Now() > limit) return absl::DeadlineExceededError("layer never computed");
      absl::SleepFor(absl::Microseconds(200));
    }
    std::lock_guard<std::mutex> lock(mu_);
    waited_.push_back(layer);
    return absl::OkStatus();
  }
  bool LayerReady(int32_t layer) override { return ready_.load() > layer; }
  std::vector<int32_t> waited() {
    std::lock_guard<std::mutex> lock(mu_);
    return waited_;
  }

 private:
  std::atomic<int32_t> ready_{0};  // layers computed
  std::thread producer_;
  std::mutex mu_;
  std::vector<int32_t> waited_;
};

// Holds a copy stream until opened (or 30 s): a host function enqueued on it that waits.
struct Gate {
  std::atomic<bool> open{false};
  void Hold(void* stream) {
    cudaLaunchHostFunc(
        static_cast<cudaStream_t>(stream),
        [](void* arg) {
          auto* gate = static_cast<Gate*>(arg);
          const absl::Time limit = absl::Now() + absl::Seconds(30);
          while (!gate->open.load() && absl::Now() < limit) absl::SleepFor(absl::Milliseconds(1));
        },
        this);
  }
};

bool WaitFor(const std::function<bool()>& condition, absl::Duration timeout) {
  const absl::Time limit = absl::Now() + timeout;
  while (!condition()) {
    if (absl::Now() > limit) return false;
    absl::SleepFor(absl::Milliseconds(2));
  }
  return true;
}

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
                                   std::function<bool()> cancelled = nullptr,
                                   absl::Duration timeout = absl::Seconds(30)) {
    const Plan& plan = Plans().at(id);
    return sender_->Send(address_, Header(id, static_cast<int32_t>(plan.src.size())), source,
                         absl::Now() + timeout, std::move(cancelled));
  }

  // Replaces the sender (closing its mapping of the child's pool first) with one with `hooks`.
  // A sender whose copy stream `gate` holds before the event is recorded; after_pending runs
  // once DONE_PENDING is out.
  void UseGatedSender(Gate& gate, std::function<absl::Status()> after_pending) {
    CudaIpcSenderTestHooks hooks;
    hooks.before_record = [&gate](void* stream) { gate.Hold(stream); };
    hooks.after_pending = std::move(after_pending);
    UseSender(std::move(hooks));
  }

  void UseSender(CudaIpcSenderTestHooks hooks, DeviceKvTransportOptions options = {}) {
    sender_.reset();
    auto sender = CreateCudaIpcKvSenderForTest(src_.Layout(), options, std::move(hooks));
    ASSERT_TRUE(sender.ok()) << sender.status();
    sender_ = *std::move(sender);
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

TEST_F(CudaIpcTransportTest, LayersComputedOneAtATimeArriveByteForByte) {
  // Ragged blocks (the kernel path) and one run (a memcpy per layer and K/V when the layers
  // come one at a time); every layer is waited for, in order, before its copy.
  for (const char* id : {"staged", "staged_run"}) {
    const Plan& plan = Plans().at(id);
    StagedSource source(plan.src);
    auto stats = Send(id, source);
    ASSERT_TRUE(stats.ok()) << stats.status();
    EXPECT_EQ(source.waited(), (std::vector<int32_t>{0, 1, 2, 3})) << id;
    const std::string got = Await(absl::StrCat(id, ".bin"));
    const std::string want = src_.Gather(plan.src);
    ASSERT_EQ(got.size(), want.size()) << id;
    EXPECT_TRUE(got == want) << id << ": the child's blocks differ from the parent's";
  }
}

// A receiver that holds the first blocks (its prefix cache) has only the rest copied.
TEST_F(CudaIpcTransportTest, HeldBlocksAreNotCopied) {
  const Plan& plan = Plans().at("held");
  Source source(plan.src);
  auto stats = Send("held", source);
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->held_blocks, 3);
  EXPECT_EQ(stats->bytes, size_t{kLayers} * 2 * 2 * BlockBytes());
  const std::string got = Await("held.bin");
  const std::string want = src_.Gather({plan.src.begin() + plan.held, plan.src.end()});
  ASSERT_EQ(got.size(), want.size());
  EXPECT_TRUE(got == want) << "the child's blocks differ from the parent's";
}

// Layer-by-layer hand-off: layers computed one at a time, the token given after the last
// (DONE_PENDING carries it); a source without one (the sequence ended with its first token)
// fails the transfer on both sides once no copy is in flight.
TEST_F(CudaIpcTransportTest, TokenAtTheEndOrTheTransferBreaksOff) {
  const Plan& plan = Plans().at("late");
  StagedSource source(plan.src);
  source.next_token = [&]() -> absl::StatusOr<int32_t> {
    EXPECT_EQ(source.waited().size(), static_cast<size_t>(kLayers)) << "asked before the layers";
    return 321;
  };
  KvTransferHeader h = Header("late", static_cast<int32_t>(plan.src.size()));
  h.next_token = kNextTokenAtEnd;
  auto stats = sender_->Send(address_, h, source, absl::Now() + absl::Seconds(30));
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_TRUE(Await("late.bin") == src_.Gather(plan.src));
  EXPECT_EQ(ReadFile(dir_ / "late.token"), "321");

  Source ended(Plans().at("no_token").src);
  ended.next_token = [] { return absl::CancelledError("ended with its first token"); };
  h = Header("no_token", 2);
  h.next_token = kNextTokenAtEnd;
  stats = sender_->Send(address_, h, ended, absl::Now() + absl::Seconds(30));
  EXPECT_EQ(stats.status().code(), absl::StatusCode::kCancelled) << stats.status();
  EXPECT_NE(Await("no_token.err").find("ended with its first token"), std::string::npos);
  // The sender goes on working.
  Source again(Plans().at("one").src);
  std::filesystem::remove(dir_ / "one.bin");
  ASSERT_TRUE(Send("one", again).ok());
  EXPECT_TRUE(Await("one.bin") == src_.Gather(Plans().at("one").src));
}

TEST_F(CudaIpcTransportTest, RepeatedTransfersStayExact) {
  // The same sender again and again: its kept connection, copy stream and block lists are
  // reused, for plans of other sizes in turn.
  for (int round = 0; round < 3; ++round) {
    for (const char* id : {"ragged", "one"}) {
      std::filesystem::remove(dir_ / absl::StrCat(id, ".bin"));
      const Plan& plan = Plans().at(id);
      Source source(plan.src);
      auto stats = Send(id, source);
      ASSERT_TRUE(stats.ok()) << stats.status();
      EXPECT_EQ(stats->offers, 1);
      EXPECT_LE(stats->reserved, stats->moved);
      EXPECT_LE(stats->moved, stats->finished);
      EXPECT_TRUE(Await(absl::StrCat(id, ".bin")) == src_.Gather(plan.src)) << id;
    }
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

TEST_F(CudaIpcTransportTest, EarlyDoneConfirmsOnlyOnceTheCopiesAreComplete) {
  // DONE_PENDING goes out while the event (recorded after the copies) is held back: the
  // receiver must not confirm before it completes, and confirms once it does.
  Gate gate;
  std::atomic<bool> pending_sent{false};
  UseGatedSender(gate, [&] {
    pending_sent = true;
    return absl::OkStatus();
  });
  const Plan& plan = Plans().at("gated");
  Source source(plan.src);
  absl::StatusOr<KvSendStats> stats;
  std::atomic<bool> returned{false};
  std::thread sending([&] {
    stats = Send("gated", source);
    returned = true;
  });
  ASSERT_TRUE(WaitFor([&] { return pending_sent.load(); }, absl::Seconds(30)));
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_FALSE(returned.load()) << "Send returned while its copies were held";
  EXPECT_FALSE(std::filesystem::exists(dir_ / "gated.bin")) << "confirmed before the copies";
  gate.open = true;
  sending.join();
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_LE(stats->reserved, stats->moved);
  EXPECT_LE(stats->moved, stats->finished);
  EXPECT_TRUE(Await("gated.bin") == src_.Gather(plan.src));
  // The event is recorded again by the next transfers (the receiver answered).
  for (const char* id : {"ragged", "one"}) {
    std::filesystem::remove(dir_ / absl::StrCat(id, ".bin"));
    Source again(Plans().at(id).src);
    auto more = Send(id, again);
    ASSERT_TRUE(more.ok()) << more.status();
    EXPECT_TRUE(Await(absl::StrCat(id, ".bin")) == src_.Gather(Plans().at(id).src)) << id;
  }
}

TEST_F(CudaIpcTransportTest, CancelAfterDoneFailsBothSides) {
  // Cancelled after DONE_PENDING, while the copies are held: the sender aborts, waits for its
  // copies, then fails; the receiver never accepts and fails the transfer.
  Gate gate;
  std::atomic<bool> pending_sent{false};
  UseGatedSender(gate, [&] {
    pending_sent = true;
    return absl::OkStatus();
  });
  std::atomic<bool> cancel{false};
  Source source(Plans().at("late_cancel").src);
  absl::StatusOr<KvSendStats> stats;
  std::thread sending([&] { stats = Send("late_cancel", source, [&] { return cancel.load(); }); });
  ASSERT_TRUE(WaitFor([&] { return pending_sent.load(); }, absl::Seconds(30)));
  cancel = true;
  absl::SleepFor(absl::Milliseconds(200));  // the abort reaches the receiver
  EXPECT_FALSE(std::filesystem::exists(dir_ / "late_cancel.err"))
      << "the receiver freed the blocks while copies were in flight";
  gate.open = true;  // the sender's drain ends
  sending.join();
  EXPECT_EQ(stats.status().code(), absl::StatusCode::kCancelled) << stats.status();
  EXPECT_NE(Await("late_cancel.err").find("CANCELLED"), std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(dir_ / "late_cancel.bin"));
}

TEST_F(CudaIpcTransportTest, CopyFailureAfterDoneFailsBothSides) {
  // The copy stream reports an error after DONE_PENDING (injected while the event is held):
  // the receiver must fail the transfer, not accept it.
  Gate gate;
  UseGatedSender(gate, [] { return absl::InternalError("injected copy fault"); });
  Source source(Plans().at("copy_fault").src);
  absl::StatusOr<KvSendStats> stats;
  std::thread sending([&] { stats = Send("copy_fault", source); });
  absl::SleepFor(absl::Milliseconds(300));
  gate.open = true;
  sending.join();
  EXPECT_EQ(stats.status().code(), absl::StatusCode::kInternal) << stats.status();
  EXPECT_NE(stats.status().message().find("injected copy fault"), std::string::npos)
      << stats.status();
  const std::string err = Await("copy_fault.err");
  EXPECT_NE(err.find("injected copy fault"), std::string::npos) << err;
  EXPECT_FALSE(std::filesystem::exists(dir_ / "copy_fault.bin"));
}

TEST_F(CudaIpcTransportTest, ReceiverGivesUpOnAStalledSender) {
  // After DONE_PENDING the sender stalls (no verdict, connection open) and its event never
  // completes: the receiver fails the transfer by itself within the sender's budget + 1 s.
  Gate gate;
  std::atomic<bool> release{false};
  UseGatedSender(gate, [&] {
    WaitFor([&] { return release.load(); }, absl::Seconds(60));
    return absl::OkStatus();
  });
  Source source(Plans().at("stalled").src);
  absl::StatusOr<KvSendStats> stats;
  const absl::Time start = absl::Now();
  std::thread sending([&] { stats = Send("stalled", source, nullptr, absl::Seconds(2)); });
  const bool failed =
      WaitFor([&] { return std::filesystem::exists(dir_ / "stalled.err"); }, absl::Seconds(20));
  const absl::Duration took = absl::Now() - start;
  release = true;
  gate.open = true;
  sending.join();
  ASSERT_TRUE(failed) << "the receiver kept waiting for a stalled sender";
  EXPECT_LT(took, absl::Seconds(10));
  EXPECT_NE(ReadFile(dir_ / "stalled.err").find("DEADLINE_EXCEEDED"), std::string::npos)
      << ReadFile(dir_ / "stalled.err");
  EXPECT_FALSE(stats.ok());
  EXPECT_FALSE(std::filesystem::exists(dir_ / "stalled.bin"));
}

TEST_F(CudaIpcTransportTest, WithoutEarlyDoneStillExact) {
  DeviceKvTransportOptions options;
  options.early_done = false;
  UseSender({}, options);
  const Plan& plan = Plans().at("sync");
  Source source(plan.src);
  auto stats = Send("sync", source);
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_TRUE(Await("sync.bin") == src_.Gather(plan.src));
}

}  // namespace
}  // namespace pds::engine
