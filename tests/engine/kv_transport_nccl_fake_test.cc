// The NCCL KV transport's protocol over the in-process fake communicator (host memory): ragged
// block lists land in the receiver's reserved blocks byte for byte, one communicator per pair
// is set up once and shared by concurrent transfers, back-pressure, refusals, shape
// mismatches, deadlines, cancellation, asynchronous send failures (the pair sets up a new
// communicator afterwards), a receiver restarted on the same address (set up again), a
// transport mismatch and the kept-alive control connections (reused; replaced once the
// receiver closed them). Every socket binds 127.0.0.1 and every wait is bounded.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <future>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/transfer/fake_communicator.h"
#include "engine/transfer/nccl_transport.h"
#include "engine/transfer/tcp_transport.h"
#include "gtest/gtest.h"

namespace pds::engine {
namespace {

::testing::AssertionResult Contains(absl::string_view text, absl::string_view part) {
  if (text.find(part) != absl::string_view::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "'" << text << "' does not contain '" << part << "'";
}

constexpr int32_t kLayers = 3;
constexpr int32_t kKvHeads = 2;
constexpr int32_t kBlockSize = 4;
constexpr int32_t kHeadDim = 8;

// A host "KV cache" with the device layout (one allocation, K and V pool per layer).
struct HostPool {
  explicit HostPool(int32_t blocks, uint64_t seed) : memory(Bytes(blocks)) {
    std::mt19937_64 rng(seed);
    for (auto& b : memory) b = static_cast<uint8_t>(rng());
    layout.data = memory.data();
    layout.bytes = memory.size();
    layout.block_bytes = BlockBytes();
    layout.pool_bytes = BlockBytes() * blocks;
    layout.num_layers = kLayers;
    layout.num_blocks = blocks;
  }
  static size_t BlockBytes() { return size_t{kKvHeads} * kBlockSize * kHeadDim * 4; }
  static size_t Bytes(int32_t blocks) { return 2 * kLayers * BlockBytes() * blocks; }
  const uint8_t* Block(int32_t layer, int kv, int32_t block) const {
    return memory.data() + layout.Offset(layer, kv, block);
  }
  std::vector<uint8_t> memory;
  KvPoolLayout layout;
};

KvTransferHeader Header(const std::string& id, int32_t blocks) {
  KvTransferHeader h;
  h.request_id = id;
  h.num_layers = kLayers;
  h.num_blocks = blocks;
  h.kv_heads = kKvHeads;
  h.block_size = kBlockSize;
  h.head_dim = kHeadDim;
  h.num_tokens = blocks * kBlockSize - 1;
  h.dtype = DType::kF32;
  h.next_token = 7;
  return h;
}

class Source : public KvSource {
 public:
  explicit Source(std::vector<int32_t> blocks) : blocks_(std::move(blocks)) {}
  absl::Status ReadLayer(int32_t, int32_t, uint8_t*, size_t) override {
    return absl::InternalError("the device path must not read host layers");
  }
  absl::StatusOr<std::vector<int32_t>> Blocks() override { return blocks_; }
  absl::Status WaitLayer(int32_t layer) override {
    if (on_layer) return on_layer(layer);
    return absl::OkStatus();
  }
  std::function<absl::Status(int32_t)> on_layer;
  absl::StatusOr<int32_t> NextToken() override {
    return next_token ? next_token() : KvSource::NextToken();
  }
  std::function<absl::StatusOr<int32_t>()> next_token;

 private:
  std::vector<int32_t> blocks_;
};

// The decode side: hands out the blocks a test chose for each request.
class Sink : public KvSink {
 public:
  absl::StatusOr<int32_t> Reserve(const KvTransferHeader& header) override {
    std::lock_guard<std::mutex> lock(mu);
    ++reserve_calls;
    reserve_threads[header.request_id] = std::this_thread::get_id();
    if (exhausted_left != 0) {
      if (exhausted_left > 0) --exhausted_left;
      return absl::ResourceExhaustedError("no room");
    }
    if (!refuse.ok()) return refuse;
    auto it = plan.find(header.request_id);
    if (it == plan.end()) return absl::NotFoundError("unknown request");
    reserved[header.request_id] = it->second;
    auto h = held.find(header.request_id);
    return h == held.end() ? 0 : h->second;
  }
  absl::Status WriteLayer(const std::string&, int32_t, const uint8_t*, size_t) override {
    return absl::InternalError("the device path must not write host layers");
  }
  void Complete(const std::string& id, absl::Status status, int32_t next_token) override {
    std::lock_guard<std::mutex> lock(mu);
    completed[id].push_back(status);
    tokens[id].push_back(next_token);
  }
  absl::StatusOr<std::vector<int32_t>> ReservedBlocks(const std::string& id) override {
    std::lock_guard<std::mutex> lock(mu);
    auto it = reserved.find(id);
    if (it == reserved.end()) return absl::NotFoundError("not reserved");
    return it->second;
  }
  std::vector<absl::Status> Completions(const std::string& id) {
    std::lock_guard<std::mutex> lock(mu);
    return completed[id];
  }
  // The completions of `id` once there is one (or after 5 s).
  std::vector<absl::Status> AwaitCompletions(const std::string& id) {
    const absl::Time limit = absl::Now() + absl::Seconds(5);
    while (Completions(id).empty() && absl::Now() < limit) absl::SleepFor(absl::Milliseconds(5));
    return Completions(id);
  }
  std::vector<int32_t> Tokens(const std::string& id) {
    std::lock_guard<std::mutex> lock(mu);
    return tokens[id];
  }

  std::mutex mu;
  std::map<std::string, std::vector<int32_t>> plan;  // the receiver's blocks per request
  std::map<std::string, int32_t> held;  // leading blocks the receiver holds (default none)
  std::map<std::string, std::vector<int32_t>> reserved;
  std::map<std::string, std::vector<absl::Status>> completed;
  std::map<std::string, std::vector<int32_t>> tokens;  // Complete's next_token
  int exhausted_left = 0;                              // -1: always
  absl::Status refuse;
  int reserve_calls = 0;
  // The receiver's connection thread that reserved each request (one thread per connection).
  std::map<std::string, std::thread::id> reserve_threads;
};

class NcclFakeTransportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    world_ = std::make_shared<FakeCommWorld>();
    Start(Options(absl::Seconds(5)));
  }
  static DeviceKvTransportOptions Options(absl::Duration setup_timeout) {
    DeviceKvTransportOptions options;
    options.idle_timeout = absl::Seconds(5);
    options.setup_timeout = setup_timeout;
    return options;
  }
  // A receiver on `port` (0: ephemeral) and, unless `keep_sender`, a new sender, both with
  // `options`, in world_.
  void Start(const DeviceKvTransportOptions& options, int port = 0, bool keep_sender = false) {
    if (receiver_) receiver_->Shutdown();
    receiver_.reset();
    auto receiver = StartNcclKvReceiver("127.0.0.1", port, &sink_, world_, dst_.layout, options);
    ASSERT_TRUE(receiver.ok()) << receiver.status();
    receiver_ = *std::move(receiver);
    if (!keep_sender) sender_ = CreateNcclKvSender(world_, src_.layout, options);
  }
  void TearDown() override {
    if (receiver_) receiver_->Shutdown();
  }

  absl::StatusOr<KvSendStats> Send(const std::string& id, Source& source, int32_t blocks,
                                   absl::Duration timeout = absl::Seconds(10),
                                   std::function<bool()> cancelled = nullptr) {
    return sender_->Send(receiver_->address(), Header(id, blocks), source, absl::Now() + timeout,
                         std::move(cancelled));
  }

  void ExpectCopied(const std::vector<int32_t>& src, const std::vector<int32_t>& dst) {
    ASSERT_EQ(src.size(), dst.size());
    for (int32_t layer = 0; layer < kLayers; ++layer) {
      for (int kv = 0; kv < 2; ++kv) {
        for (size_t i = 0; i < src.size(); ++i) {
          EXPECT_EQ(0, std::memcmp(src_.Block(layer, kv, src[i]), dst_.Block(layer, kv, dst[i]),
                                   HostPool::BlockBytes()))
              << "layer " << layer << " kv " << kv << " block " << i;
        }
      }
    }
  }

  HostPool src_{16, 1};
  HostPool dst_{16, 2};
  Sink sink_;
  std::shared_ptr<FakeCommWorld> world_;
  std::unique_ptr<KvReceiver> receiver_;
  std::unique_ptr<KvSender> sender_;
};

TEST_F(NcclFakeTransportTest, RaggedBlockListsLandInTheReservedBlocks) {
  const std::vector<std::vector<int32_t>> src = {{3}, {5, 6, 7, 2, 9}, {0, 1, 2, 3}, {15, 4}};
  const std::vector<std::vector<int32_t>> dst = {{8}, {0, 1, 10, 3, 4}, {12, 13, 14, 15}, {5, 6}};
  const HostPool untouched = dst_;
  for (size_t i = 0; i < src.size(); ++i) {
    const std::string id = absl::StrCat("r", i);
    sink_.plan[id] = dst[i];
    Source source(src[i]);
    auto stats = Send(id, source, static_cast<int32_t>(src[i].size()));
    ASSERT_TRUE(stats.ok()) << stats.status();
    EXPECT_EQ(stats->offers, 1);
    EXPECT_EQ(stats->bytes, kLayers * Header(id, src[i].size()).LayerBytes());
    ExpectCopied(src[i], dst[i]);
    ASSERT_EQ(sink_.Completions(id).size(), 1u);
    EXPECT_TRUE(sink_.Completions(id)[0].ok());
  }
  // Blocks no request reserved are untouched.
  for (int32_t block : {2, 7, 9, 11}) {
    for (int32_t layer = 0; layer < kLayers; ++layer) {
      EXPECT_EQ(0, std::memcmp(untouched.Block(layer, 1, block), dst_.Block(layer, 1, block),
                               HostPool::BlockBytes()));
    }
  }
  EXPECT_EQ(world_->joins(), 2) << "one communicator for the pair, set up once";
  EXPECT_EQ(receiver_->bytes_received(), kLayers * HostPool::BlockBytes() * 2 * (1 + 5 + 4 + 2));
}

// A receiver holding the first blocks (its prefix cache) reserves and is sent only the rest;
// the transfer after it, on the same communicator, moves every block again.
TEST_F(NcclFakeTransportTest, HeldBlocksAreNotMoved) {
  sink_.plan["held"] = {10, 11};
  sink_.held["held"] = 2;
  const HostPool untouched = dst_;
  Source source({3, 5, 6, 7});
  auto stats = Send("held", source, 4);
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->held_blocks, 2);
  EXPECT_EQ(stats->bytes, kLayers * 2 * 2 * HostPool::BlockBytes());
  EXPECT_EQ(stats->held_bytes, stats->bytes);
  ExpectCopied({6, 7}, {10, 11});
  EXPECT_EQ(receiver_->bytes_received(), stats->bytes);
  // Only the two reserved blocks changed.
  for (int32_t block = 0; block < 16; ++block) {
    if (block == 10 || block == 11) continue;
    for (int32_t layer = 0; layer < kLayers; ++layer) {
      for (int kv = 0; kv < 2; ++kv) {
        ASSERT_EQ(0, std::memcmp(untouched.Block(layer, kv, block), dst_.Block(layer, kv, block),
                                 HostPool::BlockBytes()))
            << "block " << block;
      }
    }
  }
  sink_.plan["all"] = {0, 1, 2};
  Source all({8, 9, 12});
  ASSERT_TRUE(Send("all", all, 3).ok());
  ExpectCopied({8, 9, 12}, {0, 1, 2});
  EXPECT_EQ(world_->joins(), 2);
}

// A sink whose reserved blocks do not match the blocks left to move fails the offer for good
// (its reservation completed with the error); so does a held count the header cannot have.
TEST_F(NcclFakeTransportTest, HeldCountsThatDoNotAddUpAreRefused) {
  sink_.plan["short"] = {10};
  sink_.held["short"] = 1;
  Source source({3, 5, 6});
  auto stats = Send("short", source, 3);
  ASSERT_FALSE(stats.ok());
  EXPECT_TRUE(Contains(stats.status().message(), "reserved 1 blocks for 2")) << stats.status();
  ASSERT_EQ(sink_.AwaitCompletions("short").size(), 1u);
  EXPECT_FALSE(sink_.Completions("short")[0].ok());
  sink_.plan["every"] = {};
  sink_.held["every"] = 3;
  Source every({3, 5, 6});
  stats = Send("every", every, 3);
  ASSERT_EQ(stats.status().code(), absl::StatusCode::kInvalidArgument) << stats.status();
  EXPECT_TRUE(Contains(stats.status().message(), "holds 3 of its 3 blocks")) << stats.status();
  ASSERT_EQ(sink_.AwaitCompletions("every").size(), 1u);
  EXPECT_EQ(receiver_->bytes_received(), 0u);
}

TEST_F(NcclFakeTransportTest, ConcurrentTransfersShareTheCommunicatorInOrder) {
  constexpr int kThreads = 4;
  std::vector<std::vector<int32_t>> src(kThreads), dst(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    src[t] = {static_cast<int32_t>(t), static_cast<int32_t>(t + 8), static_cast<int32_t>(t + 4)};
    dst[t] = {static_cast<int32_t>(15 - t), static_cast<int32_t>(t), static_cast<int32_t>(t + 4)};
    sink_.plan[absl::StrCat("c", t)] = dst[t];
  }
  std::vector<absl::Status> results(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 3; ++round) {
        Source source(src[t]);
        auto stats = Send(absl::StrCat("c", t), source, 3);
        if (!stats.ok()) results[t] = stats.status();
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (int t = 0; t < kThreads; ++t) {
    EXPECT_TRUE(results[t].ok()) << results[t];
    ExpectCopied(src[t], dst[t]);
  }
  EXPECT_EQ(world_->joins(), 2);
}

TEST_F(NcclFakeTransportTest, BackPressureRetriesUntilReserved) {
  sink_.plan["bp"] = {1, 2};
  sink_.exhausted_left = 3;
  Source source({4, 5});
  auto stats = Send("bp", source, 2);
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->offers, 4);
  ExpectCopied({4, 5}, {1, 2});
}

TEST_F(NcclFakeTransportTest, DeadlineWhileTheReceiverStaysFull) {
  sink_.plan["full"] = {1};
  sink_.exhausted_left = -1;
  Source source({4});
  auto stats = Send("full", source, 1, absl::Milliseconds(150));
  ASSERT_EQ(stats.status().code(), absl::StatusCode::kDeadlineExceeded) << stats.status();
  EXPECT_TRUE(Contains(stats.status().message(), "no room"));
  EXPECT_TRUE(Contains(stats.status().message(), "'full'"));
  EXPECT_TRUE(sink_.Completions("full").empty());
}

TEST_F(NcclFakeTransportTest, CancelledDuringBackOff) {
  sink_.plan["cb"] = {1};
  sink_.exhausted_left = -1;
  Source source({4});
  const absl::Time cancel_at = absl::Now() + absl::Milliseconds(50);
  auto stats = Send("cb", source, 1, absl::Seconds(10), [&] { return absl::Now() > cancel_at; });
  EXPECT_EQ(stats.status().code(), absl::StatusCode::kCancelled) << stats.status();
}

TEST_F(NcclFakeTransportTest, CancelledMidTransferFailsBothSidesThenRecovers) {
  sink_.plan["mid"] = {1, 2, 3};
  std::atomic<bool> cancel{false};
  Source source({4, 5, 6});
  source.on_layer = [&](int32_t layer) {
    if (layer == 1) cancel = true;
    return absl::OkStatus();
  };
  auto stats = Send("mid", source, 3, absl::Seconds(10), [&] { return cancel.load(); });
  EXPECT_EQ(stats.status().code(), absl::StatusCode::kCancelled) << stats.status();
  // The receiver completes the reservation with an error (it may still be finishing).
  ASSERT_EQ(sink_.AwaitCompletions("mid").size(), 1u);
  EXPECT_FALSE(sink_.Completions("mid")[0].ok());
  // The pair sets up a new communicator and the next transfer goes through.
  sink_.plan["after"] = {7, 8, 9};
  Source next({4, 5, 6});
  auto again = Send("after", next, 3);
  ASSERT_TRUE(again.ok()) << again.status();
  ExpectCopied({4, 5, 6}, {7, 8, 9});
  EXPECT_EQ(world_->joins(), 4);
}

TEST_F(NcclFakeTransportTest, RefusalFailsFastWithoutRetry) {
  sink_.refuse = absl::FailedPreconditionError("KV layout mismatch");
  Source source({4});
  auto stats = Send("ref", source, 1);
  ASSERT_EQ(stats.status().code(), absl::StatusCode::kFailedPrecondition) << stats.status();
  EXPECT_TRUE(Contains(stats.status().message(), "layout mismatch"));
  EXPECT_EQ(sink_.reserve_calls, 1);
}

TEST_F(NcclFakeTransportTest, ShapeMismatchWithTheReceiversPoolIsRefused) {
  // The sink accepts, but the receiver's pool has other block bytes than the header says.
  sink_.plan["shape"] = {1};
  Source source({4});
  KvTransferHeader header = Header("shape", 1);
  header.head_dim = kHeadDim * 2;
  auto stats = sender_->Send(receiver_->address(), header, source, absl::Now() + absl::Seconds(5));
  ASSERT_EQ(stats.status().code(), absl::StatusCode::kInvalidArgument) << stats.status();
  EXPECT_TRUE(Contains(stats.status().message(), "do not match"));
  ASSERT_EQ(sink_.Completions("shape").size(), 1u);
  EXPECT_FALSE(sink_.Completions("shape")[0].ok());
}

TEST_F(NcclFakeTransportTest, WrongNumberOfReservedBlocksIsRefused) {
  sink_.plan["count"] = {1, 2};  // the header says 1
  Source source({4});
  auto stats = Send("count", source, 1);
  ASSERT_FALSE(stats.ok());
  EXPECT_TRUE(Contains(stats.status().message(), "2 blocks"));
  ASSERT_EQ(sink_.Completions("count").size(), 1u);
}

TEST_F(NcclFakeTransportTest, SourceErrorBreaksOffTheTransfer) {
  sink_.plan["src"] = {1, 2};
  Source source({4, 5});
  source.on_layer = [](int32_t layer) {
    return layer == 2 ? absl::DataLossError("layer lost") : absl::OkStatus();
  };
  auto stats = Send("src", source, 2);
  ASSERT_EQ(stats.status().code(), absl::StatusCode::kDataLoss) << stats.status();
  EXPECT_TRUE(Contains(stats.status().message(), "layer 2 of 3"));
  ASSERT_EQ(sink_.AwaitCompletions("src").size(), 1u);
  EXPECT_FALSE(sink_.Completions("src")[0].ok());
}

// Layer-by-layer hand-off over NCCL: the source produces its layers one by one (each wait
// returns only when the layer is "computed") and gives the token after the last; the receiver
// gets the header's token otherwise.
TEST_F(NcclFakeTransportTest, TokenAtTheEndFollowsLayersProducedOneByOne) {
  sink_.plan["late"] = {3, 9};
  Source source({4, 5});
  std::vector<int32_t> waited;
  source.on_layer = [&](int32_t layer) {
    absl::SleepFor(absl::Milliseconds(2));  // the layer's compute
    waited.push_back(layer);
    return absl::OkStatus();
  };
  source.next_token = [&]() -> absl::StatusOr<int32_t> {
    EXPECT_EQ(waited.size(), static_cast<size_t>(kLayers)) << "the token after every layer";
    return 99;
  };
  KvTransferHeader h = Header("late", 2);
  h.next_token = kNextTokenAtEnd;
  auto stats = sender_->Send(receiver_->address(), h, source, absl::Now() + absl::Seconds(10));
  ASSERT_TRUE(stats.ok()) << stats.status();
  ExpectCopied({4, 5}, {3, 9});
  ASSERT_EQ(sink_.Completions("late").size(), 1u);
  EXPECT_TRUE(sink_.Completions("late")[0].ok());
  EXPECT_EQ(sink_.Tokens("late"), std::vector<int32_t>{99});

  sink_.plan["offered"] = {1};
  Source plain({2});
  ASSERT_TRUE(Send("offered", plain, 1).ok());
  EXPECT_EQ(sink_.Tokens("offered"), std::vector<int32_t>{7});
}

// No token at the end (the sequence ended with its first token): the data moved, but the
// receiver fails the transfer with the source's reason; the pair goes on working.
TEST_F(NcclFakeTransportTest, NoTokenAtTheEndBreaksOffTheTransfer) {
  sink_.plan["ended"] = {1, 2};
  Source source({4, 5});
  source.next_token = [] { return absl::CancelledError("ended with its first token"); };
  KvTransferHeader h = Header("ended", 2);
  h.next_token = kNextTokenAtEnd;
  auto stats = sender_->Send(receiver_->address(), h, source, absl::Now() + absl::Seconds(10));
  EXPECT_EQ(stats.status().code(), absl::StatusCode::kCancelled) << stats.status();
  EXPECT_TRUE(Contains(stats.status().message(), "ended with its first token"));
  ASSERT_EQ(sink_.AwaitCompletions("ended").size(), 1u);
  EXPECT_TRUE(Contains(sink_.Completions("ended")[0].message(), "ended with its first token"));
  EXPECT_EQ(sink_.Tokens("ended"), std::vector<int32_t>{-1});
  sink_.plan["next"] = {6};
  Source next({7});
  ASSERT_TRUE(Send("next", next, 1).ok());
  ExpectCopied({7}, {6});
}

TEST_F(NcclFakeTransportTest, AsynchronousSendFailureThenRecovery) {
  sink_.plan["async"] = {1};
  world_->FailSends(1);
  Source source({4});
  auto stats = Send("async", source, 1);
  ASSERT_FALSE(stats.ok());
  EXPECT_TRUE(Contains(stats.status().message(), "injected"));
  sink_.plan["ok"] = {2};
  Source next({5});
  auto again = Send("ok", next, 1);
  ASSERT_TRUE(again.ok()) << again.status();
  ExpectCopied({5}, {2});
}

// A decode worker that restarts on the same address knows none of the sender's communicators:
// its refusal (before anything is reserved) makes the sender set up a new one on the same
// connection and offer again, so no request fails and the pair goes on.
TEST_F(NcclFakeTransportTest, ReceiverRestartedOnTheSameAddressGetsANewCommunicator) {
  sink_.plan["a"] = {1};
  Source a({4});
  ASSERT_TRUE(Send("a", a, 1).ok());
  const std::string address = receiver_->address();
  const int port = std::stoi(address.substr(address.rfind(':') + 1));
  ASSERT_NO_FATAL_FAILURE(Start(Options(absl::Seconds(5)), port, /*keep_sender=*/true));
  for (const char* id : {"b", "c"}) {
    sink_.plan[id] = {2, 9};
    Source s({5, 11});
    auto stats = Send(id, s, 2);
    ASSERT_TRUE(stats.ok()) << id << ": " << stats.status();
    ExpectCopied({5, 11}, {2, 9});
    ASSERT_EQ(sink_.Completions(id).size(), 1u);
    EXPECT_TRUE(sink_.Completions(id)[0].ok());
  }
  // The unknown communicator was refused before any reservation; one new setup served both.
  EXPECT_EQ(sink_.reserve_calls, 3);
  EXPECT_EQ(world_->joins(), 4);
}

// A sender whose setup deadline passes after both sides joined (the receiver's stream is slow
// to come) gives its side up; the receiver's side, which no offer will ever name, is dropped at
// the receiver's next setup or offer once twice the setup timeout has passed, not kept (with
// its stream) until the receiver restarts.
TEST_F(NcclFakeTransportTest, CommunicatorsTheSenderGaveUpAreDropped) {
  ASSERT_NO_FATAL_FAILURE(Start(Options(absl::Seconds(1))));
  // The sender's stream comes at once, the receiver's (after the join) 2 s later.
  world_->DelayCreateStream(/*skip=*/1, absl::Seconds(2));
  sink_.plan["a"] = {1};
  Source a({4});
  Send("a", a, 1).status().IgnoreError();  // gave up, or set up again and sent
  EXPECT_GE(world_->joins(), 2);
  absl::SleepFor(absl::Milliseconds(3500));  // past twice the setup timeout since its setup
  sink_.plan["b"] = {2};
  Source b({5});
  auto sent = Send("b", b, 1);
  ASSERT_TRUE(sent.ok()) << sent.status();
  ExpectCopied({5}, {2});
  EXPECT_EQ(world_->live(), 2) << "only the pair in use is left";
}

TEST_F(NcclFakeTransportTest, DeadlineDuringTheDataPhase) {
  sink_.plan["slow"] = {1};
  Source source({4});
  source.on_layer = [](int32_t layer) {
    if (layer == 1) absl::SleepFor(absl::Milliseconds(300));
    return absl::OkStatus();
  };
  auto stats = Send("slow", source, 1, absl::Milliseconds(200));
  ASSERT_EQ(stats.status().code(), absl::StatusCode::kDeadlineExceeded) << stats.status();
}

TEST_F(NcclFakeTransportTest, TransportMismatchIsReported) {
  // An NCCL sender against a TCP receiver, and a TCP sender against the NCCL receiver.
  class NullSink : public KvSink {
    absl::StatusOr<int32_t> Reserve(const KvTransferHeader&) override { return 0; }
    absl::Status WriteLayer(const std::string&, int32_t, const uint8_t*, size_t) override {
      return absl::OkStatus();
    }
    void Complete(const std::string&, absl::Status, int32_t) override {}
  } null_sink;
  auto tcp = StartTcpKvReceiver("127.0.0.1", 0, &null_sink);
  ASSERT_TRUE(tcp.ok());
  Source source({4});
  auto stats =
      sender_->Send((*tcp)->address(), Header("x", 1), source, absl::Now() + absl::Seconds(5));
  ASSERT_FALSE(stats.ok());
  EXPECT_TRUE(Contains(stats.status().message(), "unexpected frame type"));

  struct HostSource : KvSource {
    absl::Status ReadLayer(int32_t, int32_t, uint8_t* dst, size_t bytes) override {
      std::memset(dst, 0, bytes);
      return absl::OkStatus();
    }
  } host_source;
  auto tcp_sender = CreateTcpKvSender();
  auto sent = tcp_sender->Send(receiver_->address(), Header("y", 1), host_source,
                               absl::Now() + absl::Seconds(5));
  ASSERT_FALSE(sent.ok());
  EXPECT_TRUE(Contains(sent.status().message(), "unexpected frame type"));
}

TEST_F(NcclFakeTransportTest, ConsecutiveTransfersShareOneKeptConnection) {
  for (int i = 0; i < 3; ++i) {
    const std::string id = absl::StrCat("k", i);
    sink_.plan[id] = {static_cast<int32_t>(i + 1)};
    Source source({static_cast<int32_t>(i + 4)});
    auto stats = Send(id, source, 1);
    ASSERT_TRUE(stats.ok()) << stats.status();
    ExpectCopied({i + 4}, {i + 1});
  }
  std::lock_guard<std::mutex> lock(sink_.mu);
  EXPECT_EQ(sink_.reserve_threads["k0"], sink_.reserve_threads["k1"]);
  EXPECT_EQ(sink_.reserve_threads["k1"], sink_.reserve_threads["k2"]);
}

TEST_F(NcclFakeTransportTest, ConnectionsTheReceiverClosedAreReplaced) {
  // A receiver that drops idle connections quickly, a sender that would keep them longer: the
  // next transfer notices the closed connection and connects again.
  Sink sink;
  DeviceKvTransportOptions receiver_options;
  receiver_options.idle_timeout = absl::Milliseconds(200);
  auto receiver = StartNcclKvReceiver("127.0.0.1", 0, &sink, world_, dst_.layout, receiver_options);
  ASSERT_TRUE(receiver.ok()) << receiver.status();
  std::unique_ptr<KvSender> sender = CreateNcclKvSender(world_, src_.layout);
  for (int i = 0; i < 3; ++i) {
    const std::string id = absl::StrCat("idle", i);
    sink.plan[id] = {static_cast<int32_t>(i + 1)};
    Source source({static_cast<int32_t>(i + 4)});
    auto stats = sender->Send((*receiver)->address(), Header(id, 1), source,
                              absl::Now() + absl::Seconds(10));
    ASSERT_TRUE(stats.ok()) << stats.status();
    EXPECT_EQ(stats->offers, 1);
    ExpectCopied({i + 4}, {i + 1});
    ASSERT_EQ(sink.Completions(id).size(), 1u);
    EXPECT_TRUE(sink.Completions(id)[0].ok());
    absl::SleepFor(absl::Milliseconds(500));  // the receiver closes the kept connection
  }
  (*receiver)->Shutdown();
}

TEST_F(NcclFakeTransportTest, WithoutKeptConnectionsEachTransferConnects) {
  DeviceKvTransportOptions options;
  options.max_idle_connections = 0;
  std::unique_ptr<KvSender> sender = CreateNcclKvSender(world_, src_.layout, options);
  for (int i = 0; i < 2; ++i) {
    const std::string id = absl::StrCat("nk", i);
    sink_.plan[id] = {static_cast<int32_t>(i + 1)};
    Source source({static_cast<int32_t>(i + 4)});
    auto stats =
        sender->Send(receiver_->address(), Header(id, 1), source, absl::Now() + absl::Seconds(10));
    ASSERT_TRUE(stats.ok()) << stats.status();
    ExpectCopied({i + 4}, {i + 1});
  }
}

// A listener on 127.0.0.1 that accepts connections and never answers (a receiver that hangs).
class SilentListener {
 public:
  SilentListener() {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    EXPECT_EQ(::bind(fd_, reinterpret_cast<sockaddr*>(&addr), len), 0);
    EXPECT_EQ(::listen(fd_, 16), 0);
    EXPECT_EQ(::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len), 0);
    address_ = absl::StrCat("127.0.0.1:", ntohs(addr.sin_port));
    thread_ = std::thread([this] {
      while (!stop_.load()) {
        pollfd p{fd_, POLLIN, 0};
        if (::poll(&p, 1, 20) <= 0) continue;
        const int c = ::accept(fd_, nullptr, nullptr);
        if (c >= 0) accepted_.push_back(c);
      }
    });
  }
  ~SilentListener() {
    stop_ = true;
    thread_.join();
    for (int c : accepted_) ::close(c);
    ::close(fd_);
  }
  const std::string& address() const { return address_; }

 private:
  int fd_ = -1;
  std::string address_;
  std::atomic<bool> stop_{false};
  std::vector<int> accepted_;  // owned by thread_ until it is joined
  std::thread thread_;
};

// A transfer waiting for another's communicator setup with the same receiver keeps its own
// deadline (and cancel): it does not wait for that setup's longer one.
TEST_F(NcclFakeTransportTest, WaitingForAnotherSetupKeepsTheTransfersDeadline) {
  SilentListener hung;
  auto first = std::async(std::launch::async, [&] {
    Source source({1});
    return sender_->Send(hung.address(), Header("first", 1), source,
                         absl::Now() + absl::Seconds(3));
  });
  absl::SleepFor(absl::Milliseconds(100));  // the first is waiting for its setup reply
  Source source({2});
  const absl::Time start = absl::Now();
  auto second = sender_->Send(hung.address(), Header("second", 1), source,
                              absl::Now() + absl::Milliseconds(300));
  EXPECT_LT(absl::Now() - start, absl::Seconds(1.5));
  EXPECT_EQ(second.status().code(), absl::StatusCode::kDeadlineExceeded) << second.status();
  EXPECT_TRUE(Contains(second.status().message(), "setup")) << second.status();
  EXPECT_FALSE(first.get().ok());
}

TEST(BlockRunsTest, CoalescesRunsConsecutiveOnBothSides) {
  auto runs = transfer_internal::CoalesceRuns({1, 2, 3, 7, 8, 4}, {5, 6, 9, 10, 11, 12});
  ASSERT_EQ(runs.size(), 4u);
  EXPECT_EQ(runs[0].src, 1);
  EXPECT_EQ(runs[0].count, 2);
  EXPECT_EQ(runs[1].src, 3);
  EXPECT_EQ(runs[1].dst, 9);
  EXPECT_EQ(runs[1].count, 1);
  EXPECT_EQ(runs[2].src, 7);
  EXPECT_EQ(runs[2].count, 2);
  EXPECT_EQ(runs[3].src, 4);
}

}  // namespace
}  // namespace pds::engine
