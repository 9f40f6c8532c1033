#include "engine/transfer/tcp_transport.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/common/logging.h"
#include "engine/common/status_macros.h"
#include "engine/transfer/socket_io.h"

namespace pds::engine {

static_assert(std::endian::native == std::endian::little,
              "the KV wire format is little-endian and encoded with memcpy");

namespace tcp_wire {
namespace {

constexpr uint64_t kP1 = 0x9E3779B185EBCA87ull;
constexpr uint64_t kP2 = 0xC2B2AE3D27D4EB4Full;
constexpr uint64_t kP3 = 0x165667B19E3779F9ull;
constexpr uint64_t kP4 = 0x85EBCA77C2B2AE63ull;
constexpr uint64_t kP5 = 0x27D4EB2F165667C5ull;

inline uint64_t Load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline uint32_t Load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t Round(uint64_t acc, uint64_t word) {
  acc += word * kP2;
  acc = std::rotl(acc, 31);
  return acc * kP1;
}
inline uint64_t MergeRound(uint64_t h, uint64_t lane) {
  h ^= Round(0, lane);
  return h * kP1 + kP4;
}

using transfer_internal::Put;
using transfer_internal::Reader;

}  // namespace

ChecksumState::ChecksumState() : lanes_{kP1 + kP2, kP2, 0, 0 - kP1} {}

void ChecksumState::Update(const void* data, size_t bytes) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  total_ += bytes;
  if (pending_bytes_ > 0) {
    const size_t take = std::min(bytes, sizeof(pending_) - pending_bytes_);
    std::memcpy(pending_ + pending_bytes_, p, take);
    pending_bytes_ += take;
    p += take;
    bytes -= take;
    if (pending_bytes_ < sizeof(pending_)) return;
    for (int i = 0; i < 4; ++i) lanes_[i] = Round(lanes_[i], Load64(pending_ + 8 * i));
    pending_bytes_ = 0;
  }
  uint64_t v0 = lanes_[0], v1 = lanes_[1], v2 = lanes_[2], v3 = lanes_[3];
  for (; bytes >= 32; p += 32, bytes -= 32) {
    v0 = Round(v0, Load64(p));
    v1 = Round(v1, Load64(p + 8));
    v2 = Round(v2, Load64(p + 16));
    v3 = Round(v3, Load64(p + 24));
  }
  lanes_[0] = v0, lanes_[1] = v1, lanes_[2] = v2, lanes_[3] = v3;
  std::memcpy(pending_, p, bytes);
  pending_bytes_ = bytes;
}

uint64_t ChecksumState::Finish() const {
  uint64_t h;
  if (total_ >= 32) {
    h = std::rotl(lanes_[0], 1) + std::rotl(lanes_[1], 7) + std::rotl(lanes_[2], 12) +
        std::rotl(lanes_[3], 18);
    for (uint64_t lane : lanes_) h = MergeRound(h, lane);
  } else {
    h = kP5;
  }
  h += total_;
  const uint8_t* p = pending_;
  size_t n = pending_bytes_;
  for (; n >= 8; p += 8, n -= 8) h = std::rotl(h ^ Round(0, Load64(p)), 27) * kP1 + kP4;
  if (n >= 4) {
    h = std::rotl(h ^ (static_cast<uint64_t>(Load32(p)) * kP1), 23) * kP2 + kP3;
    p += 4;
    n -= 4;
  }
  for (; n > 0; ++p, --n) h = std::rotl(h ^ (*p * kP5), 11) * kP1;
  h ^= h >> 33;
  h *= kP2;
  h ^= h >> 29;
  h *= kP3;
  h ^= h >> 32;
  return h;
}

uint64_t Checksum(const void* data, size_t bytes) {
  ChecksumState state;
  state.Update(data, bytes);
  return state.Finish();
}

std::string EncodeFrameHeader(FrameType type, uint64_t length, uint64_t checksum) {
  std::string out;
  out.reserve(kFrameHeaderBytes);
  Put(out, kMagic);
  Put(out, kVersion);
  Put(out, static_cast<uint16_t>(type));
  Put(out, length);
  Put(out, checksum);
  return out;
}

std::string EncodeFrame(FrameType type, const std::string& payload) {
  return EncodeFrameHeader(type, payload.size(), Checksum(payload.data(), payload.size())) +
         payload;
}

absl::StatusOr<FrameHeader> ParseFrameHeader(const uint8_t* bytes, uint64_t max_payload) {
  const uint32_t magic = Load32(bytes);
  uint16_t version, type;
  std::memcpy(&version, bytes + 4, 2);
  std::memcpy(&type, bytes + 6, 2);
  if (magic != kMagic) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "bad frame magic 0x%08x (want 0x%08x; not a pdserve KV transfer peer?)", magic, kMagic));
  }
  if (version != kVersion) {
    return absl::InvalidArgumentError(
        absl::StrCat("unsupported frame version ", version, " (this side speaks ", kVersion, ")"));
  }
  if (type < static_cast<uint16_t>(FrameType::kOffer) ||
      type > static_cast<uint16_t>(FrameType::kLast)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown frame type ", type));
  }
  FrameHeader header;
  header.type = static_cast<FrameType>(type);
  header.length = Load64(bytes + 8);
  header.checksum = Load64(bytes + 16);
  if (header.length > max_payload) {
    return absl::InvalidArgumentError(absl::StrCat("frame payload of ", header.length,
                                                   " bytes exceeds the limit of ", max_payload));
  }
  return header;
}

std::string EncodeOffer(const KvTransferHeader& header) {
  std::string out;
  Put(out, static_cast<uint32_t>(header.request_id.size()));
  out += header.request_id;
  for (int32_t v : {header.num_tokens, header.num_layers, header.num_blocks, header.kv_heads,
                    header.block_size, header.head_dim, header.next_token}) {
    Put(out, v);
  }
  Put(out, static_cast<uint8_t>(header.dtype));
  return out;
}

absl::StatusOr<KvTransferHeader> DecodeOffer(const uint8_t* data, size_t bytes) {
  Reader reader(data, bytes);
  KvTransferHeader header;
  uint32_t id_bytes = 0;
  uint8_t dtype = 0;
  if (!reader.Get(&id_bytes) || id_bytes > reader.left() ||
      !reader.GetBytes(id_bytes, &header.request_id) || !reader.Get(&header.num_tokens) ||
      !reader.Get(&header.num_layers) || !reader.Get(&header.num_blocks) ||
      !reader.Get(&header.kv_heads) || !reader.Get(&header.block_size) ||
      !reader.Get(&header.head_dim) || !reader.Get(&header.next_token) || !reader.Get(&dtype) ||
      reader.left() != 0) {
    return absl::InvalidArgumentError(absl::StrCat("malformed OFFER payload of ", bytes, " bytes"));
  }
  if (dtype > static_cast<uint8_t>(DType::kBF16)) {
    return absl::InvalidArgumentError(absl::StrCat("OFFER names unknown dtype ", dtype));
  }
  header.dtype = static_cast<DType>(dtype);
  return header;
}

std::string EncodeStatus(const absl::Status& status) {
  const absl::string_view message = status.message().substr(0, 4096);
  std::string out;
  Put(out, static_cast<uint32_t>(status.code()));
  Put(out, static_cast<uint32_t>(message.size()));
  out.append(message.data(), message.size());
  return out;
}

namespace {

// Reads a status encoding off the front of `reader`; false when malformed.
bool GetStatus(Reader& reader, absl::Status* status) {
  uint32_t code = 0, length = 0;
  std::string message;
  if (!reader.Get(&code) || !reader.Get(&length) || length > reader.left() ||
      !reader.GetBytes(length, &message)) {
    return false;
  }
  if (code > static_cast<uint32_t>(absl::StatusCode::kUnauthenticated)) return false;
  *status =
      code == 0 ? absl::OkStatus() : absl::Status(static_cast<absl::StatusCode>(code), message);
  return true;
}

}  // namespace

absl::StatusOr<PeerStatus> DecodeStatus(const uint8_t* data, size_t bytes) {
  Reader reader(data, bytes);
  absl::Status status;
  if (!GetStatus(reader, &status) || reader.left() != 0) {
    return absl::InvalidArgumentError(absl::StrCat("malformed reply payload of ", bytes, " bytes"));
  }
  return PeerStatus(std::move(status));
}

std::string EncodeOfferReply(const OfferReply& reply) {
  std::string out = EncodeStatus(reply.status);
  if (reply.status.ok()) Put(out, reply.held_blocks);
  return out;
}

absl::StatusOr<OfferReply> DecodeOfferReply(const uint8_t* data, size_t bytes) {
  Reader reader(data, bytes);
  OfferReply reply;
  if (!GetStatus(reader, &reply.status) ||
      (reply.status.ok() ? !reader.Get(&reply.held_blocks) : false) || reader.left() != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed offer reply payload of ", bytes, " bytes"));
  }
  if (reply.held_blocks < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("offer reply names ", reply.held_blocks, " held blocks"));
  }
  return reply;
}

std::string EncodeEnd(const TransferEnd& end) {
  std::string out = EncodeStatus(end.status);
  Put(out, end.next_token);
  return out;
}

absl::StatusOr<TransferEnd> DecodeEnd(const uint8_t* data, size_t bytes) {
  if (bytes < sizeof(int32_t)) {
    return absl::InvalidArgumentError(absl::StrCat("malformed end payload of ", bytes, " bytes"));
  }
  TransferEnd end;
  const size_t status_bytes = bytes - sizeof(int32_t);
  PDS_ASSIGN_OR_RETURN(end.status, DecodeStatus(data, status_bytes));
  std::memcpy(&end.next_token, data + status_bytes, sizeof(int32_t));
  if (end.status.ok() && end.next_token < -1) {
    return absl::InvalidArgumentError(absl::StrCat("end carries token ", end.next_token));
  }
  return end;
}

}  // namespace tcp_wire

namespace {

using tcp_wire::FrameType;
using transfer_internal::Connect;
using transfer_internal::EndFailedConnection;
using transfer_internal::Fd;
using transfer_internal::Io;
using transfer_internal::kPeerSpoke;
using transfer_internal::PeerReadable;
using transfer_internal::ReadExact;
using transfer_internal::ReadReply;
using transfer_internal::ReserveChecked;
using transfer_internal::Wait;
using transfer_internal::WaitToOfferAgain;
using transfer_internal::WithContext;
using transfer_internal::WriteFrame;

std::shared_ptr<spdlog::logger> Log() {
  static auto logger = Logger("transfer");
  return logger;
}

// ---------------------------------------------------------------------------------------------
// Sender.

class TcpKvSender final : public KvSender {
 public:
  explicit TcpKvSender(TcpTransportOptions options) : options_(std::move(options)) {}

  absl::StatusOr<KvSendStats> Send(const std::string& address, const KvTransferHeader& header,
                                   KvSource& source, absl::Time deadline,
                                   std::function<bool()> cancelled) override {
    const std::string context =
        absl::StrCat("kv send of request '", header.request_id, "' to ", address);
    absl::StatusOr<KvSendStats> stats = SendImpl(address, header, source, deadline, cancelled);
    if (!stats.ok()) return WithContext(stats.status(), context);
    return stats;
  }

 private:
  absl::StatusOr<KvSendStats> SendImpl(const std::string& address, const KvTransferHeader& header,
                                       KvSource& source, absl::Time deadline,
                                       const std::function<bool()>& cancelled) {
    PDS_RETURN_IF_ERROR(header.Validate());
    const uint64_t max_frame_bytes = tcp_wire::kLayerPrefixBytes + header.LayerBytes();
    if (max_frame_bytes > options_.max_frame_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("a layer frame of ", max_frame_bytes,
                                                     " bytes exceeds max_frame_bytes ",
                                                     options_.max_frame_bytes));
    }
    const auto is_cancelled = [&] { return cancelled && cancelled(); };
    if (is_cancelled()) return absl::CancelledError("cancelled before connecting");
    if (absl::Now() >= deadline) return absl::DeadlineExceededError("deadline already passed");

    KvSendStats stats;
    stats.offered = absl::Now();
    PDS_ASSIGN_OR_RETURN(Fd fd,
                         Connect(address, deadline, &cancelled, options_.socket_buffer_bytes));
    const Io io{fd.get(), deadline, absl::InfiniteDuration(), -1, &cancelled};

    // Offer until the receiver has room.
    const std::string offer = tcp_wire::EncodeOffer(header);
    absl::Duration backoff = options_.initial_backoff;
    int32_t held = 0;
    while (true) {
      ++stats.offers;
      PDS_RETURN_IF_ERROR(WithContext(WriteFrame(io, FrameType::kOffer, offer), "offer"));
      absl::StatusOr<absl::Status> reply = ReadReply(io, FrameType::kOfferReply, &held);
      if (!reply.ok()) return WithContext(reply.status(), "waiting for the offer reply");
      if (reply->ok()) break;
      if (reply->code() != absl::StatusCode::kResourceExhausted) {
        return WithContext(*reply, "refused by the receiver");
      }
      // Back-pressure: wait, then offer again on the same connection.
      PDS_RETURN_IF_ERROR(WaitToOfferAgain(&backoff, options_.max_backoff, deadline, is_cancelled,
                                           stats.offers, *reply));
    }
    stats.reserved = absl::Now();
    PDS_RETURN_IF_ERROR(WithContext(header.CheckHeld(held), "the offer reply"));
    const size_t layer_bytes = header.Moved(held).LayerBytes();
    const uint64_t frame_bytes = tcp_wire::kLayerPrefixBytes + layer_bytes;
    stats.held_blocks = held;
    stats.held_bytes = static_cast<size_t>(header.num_layers) * (header.LayerBytes() - layer_bytes);

    // Stream the layers in order through one reusable buffer: prefix, then the packed K/V.
    std::unique_ptr<uint8_t[]> buffer(new uint8_t[frame_bytes]);
    for (int32_t layer = 0; layer < header.num_layers; ++layer) {
      const std::string where = absl::StrCat("layer ", layer, " of ", header.num_layers);
      if (is_cancelled()) return absl::CancelledError(absl::StrCat("cancelled before ", where));
      if (absl::Now() >= deadline) {
        return absl::DeadlineExceededError(absl::StrCat("deadline exceeded before ", where));
      }
      absl::Status read =
          source.ReadLayer(layer, held, buffer.get() + tcp_wire::kLayerPrefixBytes, layer_bytes);
      if (!read.ok()) return WithContext(read, absl::StrCat("source failed to read ", where));
      std::memcpy(buffer.get(), &layer, 4);
      std::memset(buffer.get() + 4, 0, 4);
      const uint64_t checksum = tcp_wire::Checksum(buffer.get(), frame_bytes);
      absl::Status sent = PeerReadable(io)
                              ? absl::AbortedError(kPeerSpoke)
                              : WriteFrame(io, FrameType::kLayer, buffer.get(), frame_bytes,
                                           checksum, /*watch_readable=*/true);
      if (!sent.ok()) return WithContext(EarlyReply(io, sent), absl::StrCat("sending ", where));
      stats.bytes += layer_bytes;
    }
    if (header.next_token == kNextTokenAtEnd) {
      // The token sampled after the positions, known once the prefill step has ended; or why
      // the sequence is not to be decoded, which breaks the transfer off.
      absl::StatusOr<int32_t> token = source.NextToken();
      tcp_wire::TransferEnd end;
      if (token.ok()) {
        end.next_token = *token;
      } else {
        end.status = WithContext(token.status(), "the source has no next token");
      }
      absl::Status sent = PeerReadable(io)
                              ? absl::AbortedError(kPeerSpoke)
                              : WriteFrame(io, FrameType::kEnd, tcp_wire::EncodeEnd(end));
      if (!sent.ok()) return WithContext(EarlyReply(io, sent), "sending the end");
      if (!end.status.ok()) return end.status;  // the receiver frees the room on reading it
    }

    absl::StatusOr<absl::Status> done = ReadReply(io, FrameType::kDoneReply);
    if (!done.ok()) return WithContext(done.status(), "waiting for the receiver's confirmation");
    if (!done->ok()) return WithContext(*done, "the receiver failed the transfer");
    stats.finished = absl::Now();
    return stats;
  }

  // After a failed send: the receiver's reason if it sent one, else the send error.
  static absl::Status EarlyReply(const Io& io, const absl::Status& send_error) {
    if (send_error.code() == absl::StatusCode::kCancelled ||
        send_error.code() == absl::StatusCode::kDeadlineExceeded) {
      return send_error;
    }
    Io quick = io;
    quick.deadline = std::min(io.deadline, absl::Now() + absl::Milliseconds(200));
    quick.cancelled = nullptr;
    absl::StatusOr<absl::Status> reply = ReadReply(quick, FrameType::kDoneReply);
    if (reply.ok() && !reply->ok()) return WithContext(*reply, "the receiver broke off");
    if (send_error.message() == kPeerSpoke) {
      return reply.ok() ? absl::InvalidArgumentError("receiver replied OK before the last layer")
                        : absl::UnavailableError(
                              absl::StrCat("connection lost (", reply.status().message(), ")"));
    }
    return send_error;
  }

  const TcpTransportOptions options_;
};

// ---------------------------------------------------------------------------------------------
// Receiver.

class TcpKvReceiver final : public KvReceiver {
 public:
  TcpKvReceiver(KvSink* sink, TcpTransportOptions options)
      : sink_(sink),
        options_(std::move(options)),
        server_("kv receiver",
                {options_.max_connections, options_.socket_buffer_bytes, options_.idle_timeout},
                [this](const Io& io) { ServeConnection(io); }) {}
  ~TcpKvReceiver() override { Shutdown(); }

  absl::Status Start(const std::string& host, int port) { return server_.Start(host, port); }

  std::string address() const override { return server_.address(); }
  size_t bytes_received() const override { return bytes_received_.load(); }
  void Shutdown() override { server_.Shutdown(); }

 private:
  void ServeConnection(const Io& io) {
    Connection conn;
    conn.io = io;
    absl::Status status = Serve(conn);
    if (!status.ok()) {
      status = EndFailedConnection(status, server_.stopping(),
                                   absl::StrCat("kv receiver ", server_.address()), conn.header,
                                   conn.reserved, *sink_);
      ReplyError(conn, status);
    }
  }

  struct Connection {
    Io io;
    KvTransferHeader header;
    bool reserved = false;
    int32_t next_layer = 0;
    size_t layer_bytes = 0;  // of the moved blocks
    std::unique_ptr<uint8_t[]> buffer;
  };

  // Serves one connection until it closes cleanly (OK) or fails. On failure the caller
  // completes a reserved transfer with the error.
  absl::Status Serve(Connection& conn) {
    uint8_t raw[tcp_wire::kFrameHeaderBytes];
    while (true) {
      bool eof = false;
      PDS_RETURN_IF_ERROR(ReadExact(conn.io, raw, sizeof(raw), nullptr, &eof));
      if (eof) {
        if (!conn.reserved) return absl::OkStatus();  // the sender gave up or finished
        return absl::UnavailableError(absl::StrCat("connection closed by the sender after ",
                                                   conn.next_layer, " of ", conn.header.num_layers,
                                                   " layers"));
      }
      PDS_ASSIGN_OR_RETURN(const tcp_wire::FrameHeader frame,
                           tcp_wire::ParseFrameHeader(raw, options_.max_frame_bytes));
      switch (frame.type) {
        case FrameType::kOffer: {
          if (conn.reserved) return absl::InvalidArgumentError("OFFER after the reservation");
          PDS_ASSIGN_OR_RETURN(bool done, HandleOffer(conn, frame));
          if (done) return absl::OkStatus();
          break;
        }
        case FrameType::kLayer: {
          if (!conn.reserved) return absl::InvalidArgumentError("LAYER before a reservation");
          PDS_RETURN_IF_ERROR(HandleLayer(conn, frame));
          if (conn.next_layer == conn.header.num_layers &&
              conn.header.next_token != kNextTokenAtEnd) {
            Confirm(conn, conn.header.next_token);
            return absl::OkStatus();
          }
          break;
        }
        case FrameType::kEnd: {
          if (!conn.reserved || conn.header.next_token != kNextTokenAtEnd ||
              conn.next_layer != conn.header.num_layers) {
            return absl::InvalidArgumentError(absl::StrCat(
                "END after ", conn.next_layer, " of ", conn.header.num_layers, " layers",
                conn.header.next_token == kNextTokenAtEnd ? "" : " (the offer had its token)"));
          }
          if (frame.length > tcp_wire::kMaxControlPayload) {
            return absl::InvalidArgumentError(
                absl::StrCat("END payload of ", frame.length, " bytes"));
          }
          std::vector<uint8_t> payload(frame.length);
          tcp_wire::ChecksumState checksum;
          PDS_RETURN_IF_ERROR(ReadExact(conn.io, payload.data(), payload.size(), &checksum));
          if (checksum.Finish() != frame.checksum) {
            return absl::DataLossError("END frame checksum mismatch");
          }
          PDS_ASSIGN_OR_RETURN(const tcp_wire::TransferEnd end,
                               tcp_wire::DecodeEnd(payload.data(), payload.size()));
          if (!end.status.ok()) return WithContext(end.status, "the sender broke off");
          if (end.next_token < 0) return absl::InvalidArgumentError("END(OK) without a token");
          Confirm(conn, end.next_token);
          return absl::OkStatus();
        }
        default:
          return absl::InvalidArgumentError(
              absl::StrCat("unexpected frame type ", static_cast<int>(frame.type)));
      }
    }
  }

  // Every layer (and the token) is in: completes the sink and confirms.
  void Confirm(Connection& conn, int32_t next_token) {
    conn.reserved = false;
    sink_->Complete(conn.header.request_id, absl::OkStatus(), next_token);
    // The sender may already be gone; the sink has the data either way.
    absl::Status replied =
        WriteFrame(conn.io, FrameType::kDoneReply, tcp_wire::EncodeStatus(absl::OkStatus()));
    if (!replied.ok()) {
      Log()->warn("kv receiver {}: request '{}' stored, but the confirmation failed: {}",
                  server_.address(), conn.header.request_id, replied.ToString());
    }
  }

  // Returns true when the connection is finished (the offer was refused for good).
  absl::StatusOr<bool> HandleOffer(Connection& conn, const tcp_wire::FrameHeader& frame) {
    if (frame.length > tcp_wire::kMaxControlPayload) {
      return absl::InvalidArgumentError(absl::StrCat(
          "OFFER payload of ", frame.length, " bytes exceeds ", tcp_wire::kMaxControlPayload));
    }
    std::vector<uint8_t> payload(frame.length);
    tcp_wire::ChecksumState checksum;
    PDS_RETURN_IF_ERROR(ReadExact(conn.io, payload.data(), payload.size(), &checksum));
    if (checksum.Finish() != frame.checksum) {
      return absl::DataLossError("OFFER frame checksum mismatch");
    }
    PDS_ASSIGN_OR_RETURN(KvTransferHeader header,
                         tcp_wire::DecodeOffer(payload.data(), payload.size()));
    absl::Status answer = header.Validate();
    if (answer.ok() &&
        tcp_wire::kLayerPrefixBytes + header.LayerBytes() > options_.max_frame_bytes) {
      answer = absl::InvalidArgumentError(
          absl::StrCat("a layer of ", header.LayerBytes(),
                       " bytes exceeds this receiver's frame limit of ", options_.max_frame_bytes));
    }
    int32_t held = 0;
    if (answer.ok()) answer = ReserveChecked(*sink_, header, &held);
    conn.header = std::move(header);
    if (answer.ok()) {
      conn.reserved = true;
      conn.next_layer = 0;
      conn.layer_bytes = conn.header.Moved(held).LayerBytes();
      conn.buffer.reset(new uint8_t[tcp_wire::kLayerPrefixBytes + conn.layer_bytes]);
    }
    absl::Status replied =
        WriteFrame(conn.io, FrameType::kOfferReply, tcp_wire::EncodeOfferReply({answer, held}));
    PDS_RETURN_IF_ERROR(WithContext(replied, "sending the offer reply"));
    if (answer.ok() || answer.code() == absl::StatusCode::kResourceExhausted) return false;
    Log()->info("kv receiver {}: refused request '{}': {}", server_.address(),
                conn.header.request_id, answer.ToString());
    return true;
  }

  absl::Status HandleLayer(Connection& conn, const tcp_wire::FrameHeader& frame) {
    const size_t layer_bytes = conn.layer_bytes;
    const std::string where =
        absl::StrCat("layer ", conn.next_layer, " of ", conn.header.num_layers);
    if (frame.length != tcp_wire::kLayerPrefixBytes + layer_bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("LAYER frame of ", frame.length, " bytes, expected ",
                       tcp_wire::kLayerPrefixBytes + layer_bytes, " for ", where));
    }
    tcp_wire::ChecksumState checksum;
    PDS_RETURN_IF_ERROR(WithContext(ReadExact(conn.io, conn.buffer.get(), frame.length, &checksum),
                                    absl::StrCat("reading ", where)));
    if (checksum.Finish() != frame.checksum) {
      return absl::DataLossError(absl::StrCat("LAYER frame checksum mismatch (", where, ")"));
    }
    int32_t layer;
    std::memcpy(&layer, conn.buffer.get(), 4);
    if (layer != conn.next_layer) {
      return absl::InvalidArgumentError(
          absl::StrCat("got layer ", layer, " where ", where, " was due"));
    }
    PDS_RETURN_IF_ERROR(
        WithContext(sink_->WriteLayer(conn.header.request_id, layer,
                                      conn.buffer.get() + tcp_wire::kLayerPrefixBytes, layer_bytes),
                    absl::StrCat("the sink failed to store ", where)));
    bytes_received_.fetch_add(layer_bytes);
    ++conn.next_layer;
    return absl::OkStatus();
  }

  // Best effort: tells the sender why the connection ends, then drains briefly so the reply is
  // not lost to a reset.
  void ReplyError(Connection& conn, const absl::Status& status) {
    Io quick = conn.io;
    quick.deadline = absl::Now() + absl::Milliseconds(100);
    const FrameType type = conn.buffer ? FrameType::kDoneReply : FrameType::kOfferReply;
    if (!WriteFrame(quick, type, tcp_wire::EncodeStatus(status)).ok()) return;
    ::shutdown(conn.io.fd, SHUT_WR);
    uint8_t sink[65536];
    size_t drained = 0;
    while (drained < (size_t{64} << 20)) {
      const ssize_t n = ::recv(conn.io.fd, sink, sizeof(sink), 0);
      if (n > 0) {
        drained += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && Wait(quick, POLLIN).ok()) continue;
      return;
    }
  }

  KvSink* const sink_;
  const TcpTransportOptions options_;
  std::atomic<size_t> bytes_received_{0};
  // Last member: destroyed (shut down) first, while the members its handlers use still exist.
  transfer_internal::ConnectionServer server_;
};

}  // namespace

std::unique_ptr<KvSender> CreateTcpKvSender(TcpTransportOptions options) {
  return std::make_unique<TcpKvSender>(std::move(options));
}

absl::StatusOr<std::unique_ptr<KvReceiver>> StartTcpKvReceiver(const std::string& host, int port,
                                                               KvSink* sink,
                                                               TcpTransportOptions options) {
  if (sink == nullptr) return absl::InvalidArgumentError("kv receiver needs a sink");
  if (port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("kv receiver port ", port, " out of range"));
  }
  if (options.max_connections < 1) {
    return absl::InvalidArgumentError("kv receiver max_connections must be positive");
  }
  auto receiver = std::make_unique<TcpKvReceiver>(sink, std::move(options));
  PDS_RETURN_IF_ERROR(receiver->Start(host, port));
  return std::unique_ptr<KvReceiver>(std::move(receiver));
}

}  // namespace pds::engine
