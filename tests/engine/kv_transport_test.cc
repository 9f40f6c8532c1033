// The host TCP KV transport: header validation, the wire format, and sender/receiver over
// loopback (round trips, concurrency, back-pressure, refusal, deadlines, cancellation, source
// and sink errors, shutdown mid-transfer, corrupted or hostile frames). Every socket binds
// 127.0.0.1 and every wait is bounded.
#include "engine/transfer/kv_transport.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/transfer/tcp_transport.h"
#include "gtest/gtest.h"

namespace pds::engine {
namespace {

// Whether `text` contains `part`, printing both when not.
::testing::AssertionResult Contains(absl::string_view text, absl::string_view part) {
  if (text.find(part) != absl::string_view::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "'" << text << "' does not contain '" << part << "'";
}
namespace wire = tcp_wire;

KvTransferHeader MakeHeader(const std::string& id, int32_t layers = 4, int32_t blocks = 3) {
  KvTransferHeader h;
  h.request_id = id;
  h.num_layers = layers;
  h.num_blocks = blocks;
  h.kv_heads = 2;
  h.block_size = 16;
  h.head_dim = 8;
  h.num_tokens = blocks * h.block_size - 5;
  h.dtype = DType::kF32;
  return h;
}

std::vector<std::string> RandomLayers(const KvTransferHeader& h, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::string> layers(h.num_layers, std::string(h.LayerBytes(), '\0'));
  for (auto& layer : layers) {
    for (auto& c : layer) c = static_cast<char>(rng());
  }
  return layers;
}

// The packed K/V of the blocks from `first_block` on, of a layer packed from all blocks (K of
// every block, then V).
std::string MovedPart(const std::string& layer, size_t block_bytes, int32_t first_block) {
  if (first_block == 0) return layer;
  const size_t half = layer.size() / 2, skip = static_cast<size_t>(first_block) * block_bytes;
  return layer.substr(skip, half - skip) + layer.substr(half + skip);
}

class FakeSource : public KvSource {
 public:
  explicit FakeSource(std::vector<std::string> layers) : layers_(std::move(layers)) {}
  // Runs before each read; an error fails the read.
  std::function<absl::Status(int32_t)> before_read;
  // The token a kNextTokenAtEnd transfer sends after the last layer.
  std::function<absl::StatusOr<int32_t>()> next_token;

  absl::StatusOr<int32_t> NextToken() override {
    return next_token ? next_token() : KvSource::NextToken();
  }

  // The size of one block's K (or V) in the layers, for reads that skip held blocks.
  size_t block_bytes = 0;

  absl::Status ReadLayer(int32_t layer, int32_t first_block, uint8_t* dst, size_t bytes) override {
    if (before_read) {
      absl::Status status = before_read(layer);
      if (!status.ok()) return status;
    }
    if (layer < 0 || layer >= static_cast<int32_t>(layers_.size())) {
      return absl::InternalError("bad ReadLayer arguments");
    }
    const std::string moved = MovedPart(layers_[layer], block_bytes, first_block);
    if (bytes != moved.size()) return absl::InternalError("bad ReadLayer size");
    std::memcpy(dst, moved.data(), bytes);
    return absl::OkStatus();
  }

 private:
  std::vector<std::string> layers_;
};

class FakeSink : public KvSink {
 public:
  // Answer for each Reserve (default OK) and each WriteLayer (default OK).
  std::function<absl::Status(const KvTransferHeader&)> on_reserve;
  std::function<absl::Status(int32_t)> on_write;
  // The leading blocks the sink holds already (default none).
  std::function<int32_t(const KvTransferHeader&)> held_blocks;

  absl::StatusOr<int32_t> Reserve(const KvTransferHeader& header) override {
    std::lock_guard<std::mutex> lock(mu_);
    ++reserves_;
    absl::Status status = on_reserve ? on_reserve(header) : absl::OkStatus();
    if (!status.ok()) return status;
    if (reserved_.count(header.request_id)) return absl::AlreadyExistsError("double reserve");
    const int32_t held = held_blocks ? held_blocks(header) : 0;
    reserved_[header.request_id] = header.Moved(std::clamp(held, 0, header.num_blocks - 1));
    layers_[header.request_id].clear();
    return held;
  }

  absl::Status WriteLayer(const std::string& request_id, int32_t layer, const uint8_t* data,
                          size_t bytes) override {
    if (on_write) {
      absl::Status status = on_write(layer);
      if (!status.ok()) return status;
    }
    std::lock_guard<std::mutex> lock(mu_);
    auto it = reserved_.find(request_id);
    if (it == reserved_.end()) return absl::NotFoundError("WriteLayer without a reservation");
    auto& layers = layers_[request_id];
    if (layer != static_cast<int32_t>(layers.size())) return absl::InternalError("out of order");
    if (bytes != it->second.LayerBytes()) return absl::InternalError("wrong size");
    layers.emplace_back(reinterpret_cast<const char*>(data), bytes);
    return absl::OkStatus();
  }

  void Complete(const std::string& request_id, absl::Status status, int32_t next_token) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!reserved_.erase(request_id)) unexpected_completes_++;
    completions_[request_id].push_back(std::move(status));
    next_tokens_[request_id].push_back(next_token);
    ++total_completions_;
    cv_.notify_all();
  }

  // Waits (bounded) until `n` completions in all.
  bool WaitForCompletions(int n, absl::Duration timeout = absl::Seconds(10)) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, absl::ToChronoMilliseconds(timeout),
                        [&] { return total_completions_ >= n; });
  }
  int reserves() {
    std::lock_guard<std::mutex> lock(mu_);
    return reserves_;
  }
  int total_completions() {
    std::lock_guard<std::mutex> lock(mu_);
    return total_completions_;
  }
  int unexpected_completes() {
    std::lock_guard<std::mutex> lock(mu_);
    return unexpected_completes_;
  }
  std::vector<absl::Status> completions(const std::string& id) {
    std::lock_guard<std::mutex> lock(mu_);
    return completions_[id];
  }
  std::vector<std::string> layers(const std::string& id) {
    std::lock_guard<std::mutex> lock(mu_);
    return layers_[id];
  }
  std::vector<int32_t> next_tokens(const std::string& id) {
    std::lock_guard<std::mutex> lock(mu_);
    return next_tokens_[id];
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int reserves_ = 0;
  int total_completions_ = 0;
  int unexpected_completes_ = 0;
  std::map<std::string, KvTransferHeader> reserved_;
  std::map<std::string, std::vector<std::string>> layers_;
  std::map<std::string, std::vector<absl::Status>> completions_;
  std::map<std::string, std::vector<int32_t>> next_tokens_;
};

// A blocking socket speaking raw bytes to the receiver (5 s timeouts).
class RawClient {
 public:
  explicit RawClient(const std::string& address) {
    const int port = std::stoi(address.substr(address.rfind(':') + 1));
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    timeval tv{5, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  }
  ~RawClient() { ::close(fd_); }
  bool connected() const { return connected_; }

  bool Send(const std::string& bytes) {
    size_t sent = 0;
    while (sent < bytes.size()) {
      const ssize_t n = ::send(fd_, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return false;
      sent += n;
    }
    return true;
  }

  bool ReadExact(uint8_t* dst, size_t bytes) {
    size_t got = 0;
    while (got < bytes) {
      const ssize_t n = ::recv(fd_, dst + got, bytes - got, 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return false;
      got += n;
    }
    return true;
  }

  // The status a reply frame carries (an OFFER_REPLY's held count in *held, when given); fails
  // if none could be read.
  absl::StatusOr<wire::PeerStatus> ReadReply(int32_t* held = nullptr) {
    uint8_t raw[wire::kFrameHeaderBytes];
    if (!ReadExact(raw, sizeof(raw))) return absl::UnavailableError("no reply");
    auto header = wire::ParseFrameHeader(raw, wire::kMaxControlPayload);
    if (!header.ok()) return header.status();
    std::vector<uint8_t> payload(header->length);
    if (!ReadExact(payload.data(), payload.size())) return absl::UnavailableError("short reply");
    if (wire::Checksum(payload.data(), payload.size()) != header->checksum) {
      return absl::DataLossError("reply checksum");
    }
    if (header->type != wire::FrameType::kOfferReply) {
      return wire::DecodeStatus(payload.data(), payload.size());
    }
    auto reply = wire::DecodeOfferReply(payload.data(), payload.size());
    if (!reply.ok()) return reply.status();
    if (held != nullptr) *held = reply->held_blocks;
    return wire::PeerStatus(reply->status);
  }

  // True when the receiver closed the connection (EOF or reset) within the timeout.
  bool WaitClosed() {
    uint8_t buf[4096];
    while (true) {
      const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n > 0) continue;
      if (n == 0) return true;
      if (errno == EINTR) continue;
      return errno != EAGAIN && errno != EWOULDBLOCK;
    }
  }

 private:
  int fd_ = -1;
  bool connected_ = false;
};

std::string LayerFrame(int32_t layer, const std::string& data, bool flip_bit = false) {
  std::string payload(wire::kLayerPrefixBytes, '\0');
  std::memcpy(payload.data(), &layer, 4);
  payload += data;
  std::string frame = wire::EncodeFrame(wire::FrameType::kLayer, payload);
  if (flip_bit) frame[wire::kFrameHeaderBytes + 8 + data.size() / 2] ^= 0x10;
  return frame;
}

class KvTransportTest : public ::testing::Test {
 protected:
  void SetUp() override { StartReceiver({}); }

  void StartReceiver(TcpTransportOptions options) {
    receiver_.reset();
    auto receiver = StartTcpKvReceiver("127.0.0.1", 0, &sink_, options);
    ASSERT_TRUE(receiver.ok()) << receiver.status();
    receiver_ = std::move(*receiver);
  }

  absl::StatusOr<KvSendStats> Send(const KvTransferHeader& h, KvSource& source,
                                   absl::Duration timeout = absl::Seconds(10),
                                   std::function<bool()> cancelled = nullptr) {
    return sender_->Send(receiver_->address(), h, source, absl::Now() + timeout,
                         std::move(cancelled));
  }

  FakeSink sink_;
  std::unique_ptr<KvReceiver> receiver_;
  std::unique_ptr<KvSender> sender_ = CreateTcpKvSender();
};

// --- header validation and the wire format ------------------------------------------------

TEST(KvTransferHeaderTest, Validate) {
  EXPECT_TRUE(MakeHeader("r").Validate().ok());
  const auto invalid = [](auto mutate) {
    KvTransferHeader h = MakeHeader("r");
    mutate(h);
    return h.Validate().code() == absl::StatusCode::kInvalidArgument;
  };
  EXPECT_TRUE(invalid([](KvTransferHeader& h) { h.request_id.clear(); }));
  EXPECT_TRUE(invalid([](KvTransferHeader& h) { h.request_id = std::string(353, 'x'); }));
  EXPECT_FALSE(invalid([](KvTransferHeader& h) { h.request_id = std::string(352, 'x'); }));
  EXPECT_TRUE(invalid([](KvTransferHeader& h) { h.num_tokens = 0; }));
  EXPECT_TRUE(invalid([](KvTransferHeader& h) { h.num_layers = 0; }));
  EXPECT_TRUE(invalid([](KvTransferHeader& h) { h.num_blocks = -1; }));
  EXPECT_TRUE(invalid([](KvTransferHeader& h) { h.kv_heads = 0; }));
  EXPECT_TRUE(invalid([](KvTransferHeader& h) { h.block_size = -16; }));
  EXPECT_TRUE(invalid([](KvTransferHeader& h) { h.head_dim = 0; }));
  EXPECT_TRUE(invalid([](KvTransferHeader& h) { h.dtype = static_cast<DType>(7); }));
  EXPECT_TRUE(invalid([](KvTransferHeader& h) { h.next_token = -3; }));
  EXPECT_FALSE(invalid([](KvTransferHeader& h) { h.next_token = kNextTokenAtEnd; }));
  EXPECT_FALSE(invalid([](KvTransferHeader& h) { h.next_token = 17; }));
  EXPECT_TRUE(invalid([](KvTransferHeader& h) { h.num_layers = 1025; }));
  EXPECT_FALSE(invalid([](KvTransferHeader& h) { h.num_layers = 1024; }));
  EXPECT_TRUE(invalid([](KvTransferHeader& h) { h.num_blocks = (1 << 20) + 1; }));
  EXPECT_TRUE(invalid([](KvTransferHeader& h) { h.num_tokens = h.num_blocks * 16 + 1; }));
  // 8192 blocks x 8 heads x 16 x 128 x f32 x (K, V) = exactly 1 GiB; one more block is over.
  const auto gib = [](int32_t blocks) {
    return [blocks](KvTransferHeader& h) {
      h.num_blocks = blocks;
      h.kv_heads = 8;
      h.block_size = 16;
      h.head_dim = 128;
    };
  };
  EXPECT_FALSE(invalid(gib(8192)));
  EXPECT_TRUE(invalid(gib(8193)));
  // Products that overflow 64 bits are rejected, not wrapped.
  EXPECT_TRUE(invalid([](KvTransferHeader& h) {
    h.kv_heads = h.block_size = h.head_dim = INT_MAX;
    h.num_tokens = 1;
  }));
  const absl::Status status = MakeHeader("req-7", 0).Validate();
  EXPECT_TRUE(Contains(status.message(), "num_layers"));
  EXPECT_TRUE(Contains(status.message(), "req-7"));
}

TEST(TcpWireTest, ChecksumIsXxh64AndStreams) {
  // Known XXH64 (seed 0) values.
  EXPECT_EQ(wire::Checksum("", 0), 0xEF46DB3751D8E999ull);
  EXPECT_EQ(wire::Checksum("abc", 3), 0x44BC2CF5AD770999ull);
  std::mt19937_64 rng(5);
  std::string data(1000, '\0');
  for (auto& c : data) c = static_cast<char>(rng());
  const uint64_t whole = wire::Checksum(data.data(), data.size());
  for (size_t a : {0, 1, 7, 31, 32, 33, 500}) {
    for (size_t b : {a, a + 3, a + 40, size_t{999}}) {
      wire::ChecksumState state;
      state.Update(data.data(), a);
      state.Update(data.data() + a, b - a);
      state.Update(data.data() + b, data.size() - b);
      EXPECT_EQ(state.Finish(), whole) << a << " " << b;
    }
  }
}

TEST(TcpWireTest, EveryBitFlipChangesTheChecksum) {
  for (size_t size : {5, 37, 200}) {
    std::string data(size, '\0');
    std::mt19937_64 rng(size);
    for (auto& c : data) c = static_cast<char>(rng());
    const uint64_t original = wire::Checksum(data.data(), data.size());
    for (size_t bit = 0; bit < 8 * size; ++bit) {
      data[bit / 8] ^= static_cast<char>(1 << (bit % 8));
      EXPECT_NE(wire::Checksum(data.data(), data.size()), original) << size << " " << bit;
      data[bit / 8] ^= static_cast<char>(1 << (bit % 8));
    }
  }
}

TEST(TcpWireTest, OfferAndStatusRoundTrip) {
  KvTransferHeader h = MakeHeader("req-1", 7, 9);
  h.dtype = DType::kBF16;
  h.next_token = 4242;
  const std::string offer = wire::EncodeOffer(h);
  auto decoded = wire::DecodeOffer(reinterpret_cast<const uint8_t*>(offer.data()), offer.size());
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->request_id, "req-1");
  EXPECT_EQ(decoded->num_layers, 7);
  EXPECT_EQ(decoded->num_blocks, 9);
  EXPECT_EQ(decoded->num_tokens, h.num_tokens);
  EXPECT_EQ(decoded->dtype, DType::kBF16);
  EXPECT_EQ(decoded->next_token, 4242);
  for (size_t cut = 0; cut < offer.size(); ++cut) {
    EXPECT_FALSE(wire::DecodeOffer(reinterpret_cast<const uint8_t*>(offer.data()), cut).ok());
  }
  const std::string status = wire::EncodeStatus(absl::NotFoundError("gone"));
  auto carried = wire::DecodeStatus(reinterpret_cast<const uint8_t*>(status.data()), status.size());
  ASSERT_TRUE(carried.ok());
  EXPECT_EQ(*carried, absl::NotFoundError("gone"));
  const std::string ok = wire::EncodeStatus(absl::OkStatus());
  EXPECT_TRUE(wire::DecodeStatus(reinterpret_cast<const uint8_t*>(ok.data()), ok.size())->ok());
  // A malformed payload fails the decoding itself; it is not taken as a carried error.
  for (size_t cut = 0; cut < status.size(); ++cut) {
    EXPECT_FALSE(wire::DecodeStatus(reinterpret_cast<const uint8_t*>(status.data()), cut).ok())
        << cut;
  }
  // Nor is a failure to read a reply: it converts to an error, not to a carried one.
  const absl::StatusOr<absl::Status> converted =
      absl::StatusOr<wire::PeerStatus>(absl::UnavailableError("connection lost"));
  EXPECT_EQ(converted.status().code(), absl::StatusCode::kUnavailable);
}

TEST(TcpWireTest, OfferReplyCarriesTheHeldBlocksOfAnOkOnly) {
  const auto decode = [](const std::string& payload) {
    return wire::DecodeOfferReply(reinterpret_cast<const uint8_t*>(payload.data()), payload.size());
  };
  const std::string ok = wire::EncodeOfferReply({absl::OkStatus(), 6});
  auto reply = decode(ok);
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_TRUE(reply->status.ok());
  EXPECT_EQ(reply->held_blocks, 6);
  // An error carries no count: earlier error replies (and the connection limit's) still decode.
  const std::string refused = wire::EncodeOfferReply({absl::NotFoundError("gone"), 6});
  EXPECT_EQ(refused, wire::EncodeStatus(absl::NotFoundError("gone")));
  reply = decode(refused);
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_EQ(reply->status, absl::NotFoundError("gone"));
  EXPECT_EQ(reply->held_blocks, 0);
  // An OK without its count, an error with one, a negative count and every cut are malformed.
  EXPECT_FALSE(decode(wire::EncodeStatus(absl::OkStatus())).ok());
  EXPECT_FALSE(decode(refused + std::string(4, '\0')).ok());
  EXPECT_FALSE(decode(wire::EncodeOfferReply({absl::OkStatus(), -1})).ok());
  for (size_t cut = 0; cut < ok.size(); ++cut) EXPECT_FALSE(decode(ok.substr(0, cut)).ok()) << cut;
}

TEST(KvTransferHeaderTest, HeldBlocksLeaveTheLastBlockToMove) {
  const KvTransferHeader h = MakeHeader("r", 4, 3);  // 43 tokens in 3 blocks of 16
  for (int32_t held : {0, 1, 2}) {
    EXPECT_TRUE(h.CheckHeld(held).ok()) << held;
    const KvTransferHeader moved = h.Moved(held);
    EXPECT_EQ(moved.num_blocks, 3 - held);
    EXPECT_EQ(moved.num_tokens, 43 - 16 * held);
    EXPECT_EQ(moved.LayerBytes(), h.LayerBytes() / 3 * (3 - held));
    EXPECT_TRUE(moved.Validate().ok()) << held;
  }
  EXPECT_EQ(h.CheckHeld(-1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(h.CheckHeld(3).code(), absl::StatusCode::kInvalidArgument);
  KvTransferHeader loose = h;  // 3 blocks for 20 tokens: the second block holds the last one
  loose.num_tokens = 20;
  EXPECT_TRUE(loose.CheckHeld(1).ok());
  EXPECT_EQ(loose.CheckHeld(2).code(), absl::StatusCode::kInvalidArgument);
}

TEST(TcpWireTest, FrameHeaderChecks) {
  std::string header = wire::EncodeFrameHeader(wire::FrameType::kLayer, 100, 1);
  const auto parse = [&](uint64_t max) {
    return wire::ParseFrameHeader(reinterpret_cast<const uint8_t*>(header.data()), max);
  };
  ASSERT_TRUE(parse(100).ok());
  EXPECT_EQ(parse(100)->type, wire::FrameType::kLayer);
  EXPECT_TRUE(Contains(parse(99).status().message(), "exceeds"));
  header[0] ^= 1;
  EXPECT_TRUE(Contains(parse(100).status().message(), "magic"));
  header[0] ^= 1;
  header[4] = 9;
  EXPECT_TRUE(Contains(parse(100).status().message(), "version"));
  header[4] = wire::kVersion;
  header[6] = 42;
  EXPECT_TRUE(Contains(parse(100).status().message(), "type"));
}

// --- transfers over loopback --------------------------------------------------------------

TEST_F(KvTransportTest, RoundTrip) {
  const KvTransferHeader h = MakeHeader("round-trip", 5, 4);
  const auto layers = RandomLayers(h, 1);
  FakeSource source(layers);
  auto stats = Send(h, source);
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->offers, 1);
  EXPECT_EQ(stats->bytes, 5 * h.LayerBytes());
  EXPECT_LE(stats->offered, stats->reserved);
  EXPECT_LE(stats->reserved, stats->finished);
  EXPECT_EQ(sink_.layers("round-trip"), layers);
  const auto completions = sink_.completions("round-trip");
  ASSERT_EQ(completions.size(), 1u);
  EXPECT_TRUE(completions[0].ok());
  EXPECT_EQ(receiver_->bytes_received(), 5 * h.LayerBytes());
  EXPECT_EQ(sink_.unexpected_completes(), 0);
}

// A receiver that holds the first blocks (its prefix cache) is sent only the rest: the sink
// gets exactly the packed K/V of the later blocks, and both sides count only those bytes.
TEST_F(KvTransportTest, HeldBlocksAreNotSent) {
  const KvTransferHeader h = MakeHeader("held", 5, 4);
  const auto layers = RandomLayers(h, 3);
  FakeSource source(layers);
  source.block_bytes = h.BlockBytes();
  sink_.held_blocks = [](const KvTransferHeader&) { return 3; };
  auto stats = Send(h, source);
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->held_blocks, 3);
  EXPECT_EQ(stats->bytes, 5 * h.Moved(3).LayerBytes());
  EXPECT_EQ(stats->bytes + stats->held_bytes, 5 * h.LayerBytes());
  std::vector<std::string> expected;
  for (const std::string& layer : layers) {
    expected.push_back(MovedPart(layer, h.BlockBytes(), 3));
    ASSERT_EQ(expected.back().size(), 2 * h.BlockBytes());
  }
  EXPECT_EQ(sink_.layers("held"), expected);
  EXPECT_EQ(receiver_->bytes_received(), stats->bytes);
  ASSERT_EQ(sink_.completions("held").size(), 1u);
  EXPECT_TRUE(sink_.completions("held")[0].ok());
}

// A sink naming every block (or more) as held is a bug on the receiving side: the reservation is
// completed with the error and the sender is refused, nothing is sent.
TEST_F(KvTransportTest, ImpossibleHeldCountIsRefused) {
  const KvTransferHeader h = MakeHeader("all-held", 2, 3);
  FakeSource source(RandomLayers(h, 4));
  sink_.held_blocks = [](const KvTransferHeader& header) { return header.num_blocks; };
  auto stats = Send(h, source);
  ASSERT_FALSE(stats.ok());
  EXPECT_EQ(stats.status().code(), absl::StatusCode::kInvalidArgument) << stats.status();
  EXPECT_TRUE(Contains(stats.status().message(), "holds 3 of its 3 blocks")) << stats.status();
  ASSERT_TRUE(sink_.WaitForCompletions(1));
  ASSERT_EQ(sink_.completions("all-held").size(), 1u);
  EXPECT_FALSE(sink_.completions("all-held")[0].ok());
  EXPECT_EQ(receiver_->bytes_received(), 0u);
  EXPECT_EQ(sink_.unexpected_completes(), 0);
}

TEST_F(KvTransportTest, LargeLayersRoundTrip) {
  // 2 MiB layers: several socket buffers each, so partial writes and reads happen.
  KvTransferHeader h = MakeHeader("large", 3, 64);
  h.kv_heads = 8;
  h.head_dim = 64;
  const auto layers = RandomLayers(h, 2);
  FakeSource source(layers);
  auto stats = Send(h, source);
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(sink_.layers("large"), layers);
}

TEST_F(KvTransportTest, ConcurrentTransfers) {
  constexpr int kThreads = 16;
  std::vector<absl::Status> results(kThreads);
  std::vector<std::vector<std::string>> sent(kThreads);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      const KvTransferHeader h = MakeHeader(absl::StrCat("seq-", i), 3 + i % 4, 1 + i % 5);
      sent[i] = RandomLayers(h, 100 + i);
      FakeSource source(sent[i]);
      results[i] = Send(h, source).status();
    });
  }
  for (auto& t : threads) t.join();
  size_t bytes = 0;
  for (int i = 0; i < kThreads; ++i) {
    const std::string id = absl::StrCat("seq-", i);
    EXPECT_TRUE(results[i].ok()) << results[i];
    EXPECT_EQ(sink_.layers(id), sent[i]) << id;
    ASSERT_EQ(sink_.completions(id).size(), 1u) << id;
    EXPECT_TRUE(sink_.completions(id)[0].ok());
    for (const auto& layer : sent[i]) bytes += layer.size();
  }
  EXPECT_EQ(receiver_->bytes_received(), bytes);
}

TEST_F(KvTransportTest, BackPressureRetriesUntilReserved) {
  std::atomic<int> calls{0};
  sink_.on_reserve = [&](const KvTransferHeader&) {
    return ++calls <= 3 ? absl::ResourceExhaustedError("no blocks") : absl::OkStatus();
  };
  const KvTransferHeader h = MakeHeader("busy");
  const auto layers = RandomLayers(h, 3);
  FakeSource source(layers);
  auto stats = Send(h, source);
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->offers, 4);
  EXPECT_EQ(sink_.reserves(), 4);
  // Back-off 2 + 4 + 8 ms before the accepted offer.
  EXPECT_GE(stats->reserved - stats->offered, absl::Milliseconds(12));
  EXPECT_EQ(sink_.layers("busy"), layers);
  ASSERT_EQ(sink_.completions("busy").size(), 1u);
}

TEST_F(KvTransportTest, RefusalFailsFastWithoutRetry) {
  sink_.on_reserve = [](const KvTransferHeader&) { return absl::NotFoundError("unknown request"); };
  const KvTransferHeader h = MakeHeader("stranger");
  FakeSource source(RandomLayers(h, 4));
  const absl::Time start = absl::Now();
  auto stats = Send(h, source);
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
  ASSERT_EQ(stats.status().code(), absl::StatusCode::kNotFound) << stats.status();
  EXPECT_TRUE(Contains(stats.status().message(), "unknown request"));
  EXPECT_TRUE(Contains(stats.status().message(), "stranger"));
  EXPECT_TRUE(Contains(stats.status().message(), receiver_->address()));
  EXPECT_EQ(sink_.reserves(), 1);
  EXPECT_EQ(sink_.total_completions(), 0);
}

TEST_F(KvTransportTest, DeadlineWhileReceiverStaysFull) {
  sink_.on_reserve = [](const KvTransferHeader&) { return absl::ResourceExhaustedError("full"); };
  const KvTransferHeader h = MakeHeader("patient");
  FakeSource source(RandomLayers(h, 5));
  const absl::Time start = absl::Now();
  auto stats = Send(h, source, absl::Milliseconds(300));
  const absl::Duration elapsed = absl::Now() - start;
  EXPECT_EQ(stats.status().code(), absl::StatusCode::kDeadlineExceeded) << stats.status();
  EXPECT_GE(elapsed, absl::Milliseconds(250));
  EXPECT_LT(elapsed, absl::Milliseconds(300 + 200));
  EXPECT_GT(sink_.reserves(), 3);
  EXPECT_EQ(sink_.total_completions(), 0);
}

TEST_F(KvTransportTest, CancelledMidTransfer) {
  const KvTransferHeader h = MakeHeader("cancel-me", 6);
  FakeSource source(RandomLayers(h, 6));
  std::atomic<bool> cancel{false};
  source.before_read = [&](int32_t layer) {
    if (layer == 2) cancel = true;
    return absl::OkStatus();
  };
  auto stats = Send(h, source, absl::Seconds(10), [&] { return cancel.load(); });
  EXPECT_EQ(stats.status().code(), absl::StatusCode::kCancelled) << stats.status();
  ASSERT_TRUE(sink_.WaitForCompletions(1));
  absl::SleepFor(absl::Milliseconds(50));
  const auto completions = sink_.completions("cancel-me");
  ASSERT_EQ(completions.size(), 1u);
  EXPECT_FALSE(completions[0].ok());
  EXPECT_EQ(sink_.unexpected_completes(), 0);
}

TEST_F(KvTransportTest, CancelledDuringBackOff) {
  sink_.on_reserve = [](const KvTransferHeader&) { return absl::ResourceExhaustedError("full"); };
  const KvTransferHeader h = MakeHeader("cancel-waiting");
  FakeSource source(RandomLayers(h, 7));
  const absl::Time start = absl::Now();
  auto stats = Send(h, source, absl::Seconds(10),
                    [&] { return absl::Now() - start > absl::Milliseconds(100); });
  EXPECT_EQ(stats.status().code(), absl::StatusCode::kCancelled) << stats.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
}

TEST_F(KvTransportTest, SourceErrorBreaksOffTheTransfer) {
  const KvTransferHeader h = MakeHeader("broken-source", 5);
  FakeSource source(RandomLayers(h, 8));
  source.before_read = [](int32_t layer) {
    return layer == 2 ? absl::InternalError("disk on fire") : absl::OkStatus();
  };
  auto stats = Send(h, source);
  ASSERT_EQ(stats.status().code(), absl::StatusCode::kInternal) << stats.status();
  EXPECT_TRUE(Contains(stats.status().message(), "disk on fire"));
  EXPECT_TRUE(Contains(stats.status().message(), "layer 2"));
  ASSERT_TRUE(sink_.WaitForCompletions(1));
  absl::SleepFor(absl::Milliseconds(50));
  ASSERT_EQ(sink_.completions("broken-source").size(), 1u);
  EXPECT_FALSE(sink_.completions("broken-source")[0].ok());
  EXPECT_EQ(sink_.layers("broken-source").size(), 2u);
}

// Layer-by-layer hand-off: each layer leaves as soon as the source has it (the source here
// produces layer l only once the receiver has stored layer l - 1), and the token follows the
// last layer.
TEST_F(KvTransportTest, LayersLeaveWhileTheSourceIsProducingAndTheTokenComesLast) {
  KvTransferHeader h = MakeHeader("streamed", 4);
  h.next_token = kNextTokenAtEnd;
  const auto layers = RandomLayers(h, 11);
  FakeSource source(layers);
  source.before_read = [&](int32_t layer) {
    const absl::Time limit = absl::Now() + absl::Seconds(5);
    while (static_cast<int32_t>(sink_.layers("streamed").size()) < layer) {
      if (absl::Now() > limit) return absl::DeadlineExceededError("the receiver lags");
      absl::SleepFor(absl::Milliseconds(1));
    }
    return absl::OkStatus();
  };
  bool asked_early = false;
  source.next_token = [&]() -> absl::StatusOr<int32_t> {
    // Asked once every layer is sent (the receiver may still be storing the last one).
    asked_early = sink_.layers("streamed").size() < 3;
    return 4321;
  };
  auto stats = Send(h, source);
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_FALSE(asked_early);
  EXPECT_EQ(sink_.layers("streamed"), layers);
  ASSERT_EQ(sink_.completions("streamed").size(), 1u);
  EXPECT_TRUE(sink_.completions("streamed")[0].ok());
  EXPECT_EQ(sink_.next_tokens("streamed"), std::vector<int32_t>{4321});

  // The token in the offer reaches the sink as it is.
  KvTransferHeader with_token = MakeHeader("offered", 2);
  with_token.next_token = 77;
  FakeSource plain(RandomLayers(with_token, 12));
  ASSERT_TRUE(Send(with_token, plain).ok());
  EXPECT_EQ(sink_.next_tokens("offered"), std::vector<int32_t>{77});
}

// A source that has every layer but no token (the sequence ended with its first token)
// breaks the transfer off after the last layer: the receiver frees the room with its reason.
TEST_F(KvTransportTest, NoTokenAtTheEndBreaksOffTheTransfer) {
  KvTransferHeader h = MakeHeader("ended", 3);
  h.next_token = kNextTokenAtEnd;
  FakeSource source(RandomLayers(h, 13));
  source.next_token = [] { return absl::CancelledError("ended with its first token"); };
  auto stats = Send(h, source);
  EXPECT_EQ(stats.status().code(), absl::StatusCode::kCancelled) << stats.status();
  EXPECT_TRUE(Contains(stats.status().message(), "ended with its first token"));
  ASSERT_TRUE(sink_.WaitForCompletions(1));
  const auto completions = sink_.completions("ended");
  ASSERT_EQ(completions.size(), 1u);
  EXPECT_EQ(completions[0].code(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(Contains(completions[0].message(), "ended with its first token"));
  EXPECT_EQ(sink_.next_tokens("ended"), std::vector<int32_t>{-1});
  EXPECT_EQ(sink_.unexpected_completes(), 0);
  // A source without a token for such a header fails the same way.
  FakeSource tokenless(RandomLayers(h, 14));
  h.request_id = "tokenless";
  EXPECT_EQ(Send(h, tokenless).status().code(), absl::StatusCode::kUnimplemented);
}

TEST(TcpWireTest, EndRoundTripsAndRejectsGarbage) {
  const std::string ok = wire::EncodeEnd({absl::OkStatus(), 1234});
  auto end = wire::DecodeEnd(reinterpret_cast<const uint8_t*>(ok.data()), ok.size());
  ASSERT_TRUE(end.ok()) << end.status();
  EXPECT_TRUE(end->status.ok());
  EXPECT_EQ(end->next_token, 1234);
  const std::string failed = wire::EncodeEnd({absl::AbortedError("no"), -1});
  end = wire::DecodeEnd(reinterpret_cast<const uint8_t*>(failed.data()), failed.size());
  ASSERT_TRUE(end.ok()) << end.status();
  EXPECT_EQ(end->status.code(), absl::StatusCode::kAborted);
  EXPECT_FALSE(wire::DecodeEnd(reinterpret_cast<const uint8_t*>(ok.data()), 3).ok());
  EXPECT_FALSE(wire::DecodeEnd(reinterpret_cast<const uint8_t*>(ok.data()), ok.size() - 1).ok());
  const std::string bad = wire::EncodeEnd({absl::OkStatus(), -7});
  EXPECT_FALSE(wire::DecodeEnd(reinterpret_cast<const uint8_t*>(bad.data()), bad.size()).ok());
}

TEST_F(KvTransportTest, SinkWriteErrorReachesTheSender) {
  sink_.on_write = [](int32_t layer) {
    return layer == 1 ? absl::FailedPreconditionError("cache gone") : absl::OkStatus();
  };
  const KvTransferHeader h = MakeHeader("bad-sink", 4);
  FakeSource source(RandomLayers(h, 9));
  auto stats = Send(h, source);
  ASSERT_EQ(stats.status().code(), absl::StatusCode::kFailedPrecondition) << stats.status();
  EXPECT_TRUE(Contains(stats.status().message(), "cache gone"));
  EXPECT_TRUE(Contains(stats.status().message(), "layer 1"));
  ASSERT_EQ(sink_.completions("bad-sink").size(), 1u);
  EXPECT_FALSE(sink_.completions("bad-sink")[0].ok());
}

TEST_F(KvTransportTest, ReceiverShutdownMidTransfer) {
  const KvTransferHeader h = MakeHeader("orphan", 6);
  FakeSource source(RandomLayers(h, 10));
  std::mutex mu;
  std::condition_variable cv;
  bool at_layer_3 = false, release = false;
  source.before_read = [&](int32_t layer) {
    if (layer != 3) return absl::OkStatus();
    std::unique_lock<std::mutex> lock(mu);
    at_layer_3 = true;
    cv.notify_all();
    cv.wait_for(lock, std::chrono::seconds(10), [&] { return release; });
    return absl::OkStatus();
  };
  absl::Status result;
  std::thread sender([&] { result = Send(h, source).status(); });
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(10), [&] { return at_layer_3; }));
  }
  const absl::Time start = absl::Now();
  receiver_->Shutdown();
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  receiver_->Shutdown();  // idempotent
  {
    std::lock_guard<std::mutex> lock(mu);
    release = true;
    cv.notify_all();
  }
  sender.join();
  EXPECT_FALSE(result.ok());
  EXPECT_TRUE(Contains(result.message(), "orphan")) << result;
  const auto completions = sink_.completions("orphan");
  ASSERT_EQ(completions.size(), 1u);
  EXPECT_FALSE(completions[0].ok());
  EXPECT_TRUE(Contains(completions[0].message(), "shutting down"));
  EXPECT_EQ(sink_.unexpected_completes(), 0);
}

TEST_F(KvTransportTest, ConnectingToAClosedPortFailsFast) {
  // A port that was just free: bind, read it, close.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  const KvTransferHeader h = MakeHeader("nobody-home");
  FakeSource source(RandomLayers(h, 11));
  const absl::Time start = absl::Now();
  auto stats = sender_->Send(absl::StrCat("127.0.0.1:", ntohs(addr.sin_port)), h, source,
                             absl::Now() + absl::Seconds(10));
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
  EXPECT_EQ(stats.status().code(), absl::StatusCode::kUnavailable) << stats.status();
  EXPECT_TRUE(Contains(stats.status().message(), "nobody-home"));
}

TEST_F(KvTransportTest, InvalidHeaderIsRejectedBeforeConnecting) {
  KvTransferHeader h = MakeHeader("bad");
  h.num_layers = 0;
  FakeSource source({});
  auto stats = Send(h, source);
  EXPECT_EQ(stats.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(sink_.reserves(), 0);
}

TEST_F(KvTransportTest, ConnectionLimitRefusesExtraConnections) {
  TcpTransportOptions options;
  options.max_connections = 1;
  StartReceiver(options);
  const KvTransferHeader first = MakeHeader("first", 3);
  const auto layers = RandomLayers(first, 12);
  FakeSource source(layers);
  std::atomic<bool> blocked{false}, release{false};
  source.before_read = [&](int32_t layer) {
    blocked = true;
    while (!release) absl::SleepFor(absl::Milliseconds(1));
    return absl::OkStatus();
  };
  absl::Status result;
  std::thread t([&] { result = Send(first, source).status(); });
  while (!blocked) absl::SleepFor(absl::Milliseconds(1));
  const KvTransferHeader second = MakeHeader("second");
  FakeSource other(RandomLayers(second, 13));
  auto refused = Send(second, other, absl::Seconds(5));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable) << refused.status();
  release = true;
  t.join();
  EXPECT_TRUE(result.ok()) << result;
  EXPECT_EQ(sink_.layers("first"), layers);
}

// --- hostile or broken peers --------------------------------------------------------------

TEST_F(KvTransportTest, GarbageIsRejected) {
  RawClient client(receiver_->address());
  ASSERT_TRUE(client.connected());
  std::string garbage(64, '\0');
  std::mt19937_64 rng(14);
  for (auto& c : garbage) c = static_cast<char>(rng());
  ASSERT_TRUE(client.Send(garbage));
  auto reply = client.ReadReply();
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_TRUE(Contains(reply->message(), "magic"));
  EXPECT_TRUE(client.WaitClosed());
  EXPECT_EQ(sink_.reserves(), 0);
  // The receiver still serves others.
  const KvTransferHeader h = MakeHeader("after-garbage");
  FakeSource source(RandomLayers(h, 15));
  EXPECT_TRUE(Send(h, source).ok());
}

TEST_F(KvTransportTest, CorruptedLayerChecksumIsRejected) {
  const KvTransferHeader h = MakeHeader("flipped", 3);
  const auto layers = RandomLayers(h, 16);
  RawClient client(receiver_->address());
  ASSERT_TRUE(client.Send(wire::EncodeFrame(wire::FrameType::kOffer, wire::EncodeOffer(h))));
  auto offered = client.ReadReply();
  ASSERT_TRUE(offered.ok() && offered->ok()) << offered.status();
  ASSERT_TRUE(client.Send(LayerFrame(0, layers[0])));
  ASSERT_TRUE(client.Send(LayerFrame(1, layers[1], /*flip_bit=*/true)));
  auto done = client.ReadReply();
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->code(), absl::StatusCode::kDataLoss) << *done;
  EXPECT_TRUE(Contains(done->message(), "checksum"));
  EXPECT_TRUE(client.WaitClosed());
  ASSERT_TRUE(sink_.WaitForCompletions(1));
  const auto completions = sink_.completions("flipped");
  ASSERT_EQ(completions.size(), 1u);
  EXPECT_EQ(completions[0].code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(sink_.layers("flipped").size(), 1u);
  EXPECT_EQ(receiver_->bytes_received(), h.LayerBytes());
}

TEST_F(KvTransportTest, CorruptedOfferChecksumIsRejected) {
  std::string frame =
      wire::EncodeFrame(wire::FrameType::kOffer, wire::EncodeOffer(MakeHeader("bad-offer")));
  frame.back() ^= 1;
  RawClient client(receiver_->address());
  ASSERT_TRUE(client.Send(frame));
  auto reply = client.ReadReply();
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_EQ(reply->code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(client.WaitClosed());
  EXPECT_EQ(sink_.reserves(), 0);
}

TEST_F(KvTransportTest, OversizedLengthsAreRejectedBeforeAllocating) {
  {
    RawClient client(receiver_->address());
    ASSERT_TRUE(client.Send(wire::EncodeFrameHeader(wire::FrameType::kOffer, 1ull << 40, 0)));
    auto reply = client.ReadReply();
    ASSERT_TRUE(reply.ok()) << reply.status();
    EXPECT_TRUE(Contains(reply->message(), "exceeds"));
    EXPECT_TRUE(client.WaitClosed());
  }
  const KvTransferHeader h = MakeHeader("huge", 2);
  RawClient client(receiver_->address());
  ASSERT_TRUE(client.Send(wire::EncodeFrame(wire::FrameType::kOffer, wire::EncodeOffer(h))));
  ASSERT_TRUE(client.ReadReply().ok());
  // Under the frame limit but not this transfer's layer size, then far over the limit.
  ASSERT_TRUE(client.Send(wire::EncodeFrameHeader(wire::FrameType::kLayer, 1ull << 50, 0)));
  auto reply = client.ReadReply();
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_EQ(reply->code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(client.WaitClosed());
  ASSERT_TRUE(sink_.WaitForCompletions(1));
  ASSERT_EQ(sink_.completions("huge").size(), 1u);
  EXPECT_FALSE(sink_.completions("huge")[0].ok());
}

TEST_F(KvTransportTest, WrongLayerSizeOrOrderIsRejected) {
  const KvTransferHeader h = MakeHeader("disorder", 3);
  const auto layers = RandomLayers(h, 17);
  for (const std::string& frame : {LayerFrame(1, layers[1]), LayerFrame(0, layers[0].substr(1))}) {
    RawClient client(receiver_->address());
    ASSERT_TRUE(client.Send(wire::EncodeFrame(wire::FrameType::kOffer, wire::EncodeOffer(h))));
    ASSERT_TRUE(client.ReadReply().ok());
    ASSERT_TRUE(client.Send(frame));
    auto reply = client.ReadReply();
    ASSERT_TRUE(reply.ok()) << reply.status();
    EXPECT_EQ(reply->code(), absl::StatusCode::kInvalidArgument) << *reply;
    EXPECT_TRUE(client.WaitClosed());
  }
  ASSERT_TRUE(sink_.WaitForCompletions(2));
  EXPECT_EQ(sink_.completions("disorder").size(), 2u);
  EXPECT_EQ(sink_.unexpected_completes(), 0);
}

TEST_F(KvTransportTest, IdleConnectionTimesOut) {
  TcpTransportOptions options;
  options.idle_timeout = absl::Milliseconds(200);
  StartReceiver(options);
  const KvTransferHeader h = MakeHeader("sleepy", 2);
  RawClient client(receiver_->address());
  ASSERT_TRUE(client.Send(wire::EncodeFrame(wire::FrameType::kOffer, wire::EncodeOffer(h))));
  ASSERT_TRUE(client.ReadReply().ok());
  const absl::Time start = absl::Now();
  ASSERT_TRUE(sink_.WaitForCompletions(1, absl::Seconds(5)));
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  ASSERT_EQ(sink_.completions("sleepy").size(), 1u);
  EXPECT_EQ(sink_.completions("sleepy")[0].code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(client.WaitClosed());
}

TEST_F(KvTransportTest, SenderVanishingMidTransferCompletesWithError) {
  const KvTransferHeader h = MakeHeader("vanished", 3);
  const auto layers = RandomLayers(h, 18);
  {
    RawClient client(receiver_->address());
    ASSERT_TRUE(client.Send(wire::EncodeFrame(wire::FrameType::kOffer, wire::EncodeOffer(h))));
    ASSERT_TRUE(client.ReadReply().ok());
    ASSERT_TRUE(client.Send(LayerFrame(0, layers[0])));
  }
  ASSERT_TRUE(sink_.WaitForCompletions(1));
  ASSERT_EQ(sink_.completions("vanished").size(), 1u);
  EXPECT_TRUE(Contains(sink_.completions("vanished")[0].message(), "1 of 3"));
}

}  // namespace
}  // namespace pds::engine
