#include "engine/transfer/device_transport.h"

#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/common/logging.h"
#include "engine/common/status_macros.h"

namespace pds::engine::transfer_internal {
namespace {

using tcp_wire::FrameType;

std::shared_ptr<spdlog::logger> Log() {
  static auto logger = Logger("transfer");
  return logger;
}

absl::Status Malformed(absl::string_view what, size_t bytes) {
  return absl::InvalidArgumentError(
      absl::StrCat("malformed ", what, " payload of ", bytes, " bytes"));
}

}  // namespace

absl::string_view DevicePlaneName(DevicePlaneKind kind) {
  switch (kind) {
    case DevicePlaneKind::kCudaIpc:
      return "cuda-ipc";
    case DevicePlaneKind::kNccl:
      return "nccl";
  }
  return "unknown";
}

std::string EncodeDeviceOffer(const DeviceOffer& offer) {
  std::string out;
  Put(out, static_cast<uint8_t>(offer.plane));
  Put(out, static_cast<uint32_t>(offer.plane_data.size()));
  out += offer.plane_data;
  out += tcp_wire::EncodeOffer(offer.header);
  return out;
}

absl::StatusOr<DeviceOffer> DecodeDeviceOffer(const ControlFrame& frame) {
  Reader reader(frame.data(), frame.payload.size());
  DeviceOffer offer;
  uint8_t plane = 0;
  uint32_t length = 0;
  if (!reader.Get(&plane) || !reader.Get(&length) || length > reader.left() ||
      !reader.GetBytes(length, &offer.plane_data)) {
    return Malformed("DEVICE_OFFER", frame.payload.size());
  }
  if (plane != static_cast<uint8_t>(DevicePlaneKind::kCudaIpc) &&
      plane != static_cast<uint8_t>(DevicePlaneKind::kNccl)) {
    return absl::InvalidArgumentError(absl::StrCat("DEVICE_OFFER names unknown plane ", plane));
  }
  offer.plane = static_cast<DevicePlaneKind>(plane);
  const size_t consumed = frame.payload.size() - reader.left();
  PDS_ASSIGN_OR_RETURN(offer.header, tcp_wire::DecodeOffer(frame.data() + consumed, reader.left()));
  return offer;
}

std::string EncodeDeviceOfferReply(const DeviceOfferReply& reply) {
  const std::string status = tcp_wire::EncodeStatus(reply.status);
  std::string out;
  Put(out, static_cast<uint32_t>(status.size()));
  out += status;
  Put(out, static_cast<uint32_t>(reply.blocks.size()));
  for (int32_t block : reply.blocks) Put(out, block);
  Put(out, static_cast<uint32_t>(reply.plane_data.size()));
  out += reply.plane_data;
  return out;
}

absl::StatusOr<DeviceOfferReply> DecodeDeviceOfferReply(const ControlFrame& frame) {
  Reader reader(frame.data(), frame.payload.size());
  DeviceOfferReply reply;
  uint32_t status_bytes = 0, count = 0, plane_bytes = 0;
  std::string status;
  if (!reader.Get(&status_bytes) || status_bytes > reader.left() ||
      !reader.GetBytes(status_bytes, &status) || !reader.Get(&count) ||
      count > reader.left() / sizeof(int32_t)) {
    return Malformed("DEVICE_OFFER_REPLY", frame.payload.size());
  }
  reply.blocks.resize(count);
  for (int32_t& block : reply.blocks) reader.Get(&block);
  if (!reader.Get(&plane_bytes) || plane_bytes != reader.left() ||
      !reader.GetBytes(plane_bytes, &reply.plane_data)) {
    return Malformed("DEVICE_OFFER_REPLY", frame.payload.size());
  }
  PDS_ASSIGN_OR_RETURN(
      reply.status,
      tcp_wire::DecodeStatus(reinterpret_cast<const uint8_t*>(status.data()), status.size()));
  return reply;
}

absl::StatusOr<absl::Status> DecodeStatusFrame(const ControlFrame& frame) {
  return tcp_wire::DecodeStatus(frame.data(), frame.payload.size());
}

std::vector<BlockRun> CoalesceRuns(const std::vector<int32_t>& src,
                                   const std::vector<int32_t>& dst) {
  std::vector<BlockRun> runs;
  const size_t n = std::min(src.size(), dst.size());
  for (size_t i = 0; i < n; ++i) {
    if (!runs.empty()) {
      BlockRun& last = runs.back();
      if (src[i] == last.src + last.count && dst[i] == last.dst + last.count) {
        ++last.count;
        continue;
      }
    }
    runs.push_back({src[i], dst[i], 1});
  }
  return runs;
}

absl::Status CheckDone(const ControlFrame& frame) {
  if (frame.type != FrameType::kDeviceDone) {
    return absl::InvalidArgumentError(
        absl::StrCat("expected DEVICE_DONE, got frame type ", static_cast<int>(frame.type)));
  }
  PDS_ASSIGN_OR_RETURN(absl::Status carried, DecodeStatusFrame(frame));
  return WithContext(carried, "the sender broke off");
}

bool Woken(const Io& io) {
  if (io.wake_fd < 0) return false;
  pollfd p{io.wake_fd, POLLIN, 0};
  return ::poll(&p, 1, 0) > 0 && (p.revents & POLLIN);
}

absl::Status ReceiverPlane::Setup(const Io& io, const ControlFrame& frame) {
  return absl::InvalidArgumentError(
      absl::StrCat("the ", DevicePlaneName(kind()), " receiver takes no DEVICE_SETUP"));
}

namespace {

// ---------------------------------------------------------------------------------------------
// Sender.

class DeviceKvSender final : public KvSender {
 public:
  DeviceKvSender(std::shared_ptr<SenderPlane> plane, DeviceTransportOptions options)
      : plane_(std::move(plane)), options_(std::move(options)) {}

  absl::StatusOr<KvSendStats> Send(const std::string& address, const KvTransferHeader& header,
                                   KvSource& source, absl::Time deadline,
                                   std::function<bool()> cancelled) override {
    const std::string context =
        absl::StrCat(DevicePlaneName(plane_->kind()), " kv send of request '", header.request_id,
                     "' to ", address);
    absl::StatusOr<KvSendStats> stats = SendImpl(address, header, source, deadline, cancelled);
    if (!stats.ok()) return WithContext(stats.status(), context);
    return stats;
  }

 private:
  absl::StatusOr<KvSendStats> SendImpl(const std::string& address, const KvTransferHeader& header,
                                       KvSource& source, absl::Time deadline,
                                       const std::function<bool()>& cancelled) {
    PDS_RETURN_IF_ERROR(header.Validate());
    const auto is_cancelled = [&] { return cancelled && cancelled(); };
    if (is_cancelled()) return absl::CancelledError("cancelled before connecting");
    if (absl::Now() >= deadline) return absl::DeadlineExceededError("deadline already passed");
    PDS_ASSIGN_OR_RETURN(const std::vector<int32_t> src_blocks, source.Blocks());
    if (static_cast<int32_t>(src_blocks.size()) != header.num_blocks) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the source has ", src_blocks.size(), " blocks, the header says ", header.num_blocks));
    }

    KvSendStats stats;
    stats.offered = absl::Now();
    PDS_ASSIGN_OR_RETURN(Fd fd,
                         Connect(address, deadline, &cancelled, options_.socket_buffer_bytes));
    const Io io{fd.get(), deadline, absl::InfiniteDuration(), -1, &cancelled};
    PDS_ASSIGN_OR_RETURN(std::string plane_data, plane_->Prepare(io, address));

    // Offer until the receiver has room.
    const std::string offer = EncodeDeviceOffer(DeviceOffer{plane_->kind(), plane_data, header});
    absl::Duration backoff = options_.initial_backoff;
    DeviceOfferReply reply;
    while (true) {
      ++stats.offers;
      PDS_RETURN_IF_ERROR(WithContext(WriteFrame(io, FrameType::kDeviceOffer, offer), "offer"));
      absl::StatusOr<DeviceOfferReply> got = ReadOfferReply(io);
      if (!got.ok()) return WithContext(got.status(), "waiting for the offer reply");
      reply = *std::move(got);
      if (reply.status.ok()) break;
      if (reply.status.code() != absl::StatusCode::kResourceExhausted) {
        return WithContext(reply.status, "refused by the receiver");
      }
      const absl::Time wake = std::min(absl::Now() + backoff, deadline);
      while (absl::Now() < wake) {
        if (is_cancelled()) return absl::CancelledError("cancelled while the receiver had no room");
        absl::SleepFor(std::min(wake - absl::Now(), absl::Milliseconds(5)));
      }
      if (absl::Now() >= deadline) {
        return absl::DeadlineExceededError(
            absl::StrCat("deadline exceeded; the receiver had no room after ", stats.offers,
                         " offers (last answer: ", reply.status.message(), ")"));
      }
      backoff = std::min(backoff * 2, options_.max_backoff);
    }
    stats.reserved = absl::Now();
    if (static_cast<int32_t>(reply.blocks.size()) != header.num_blocks) {
      absl::Status bad = absl::InvalidArgumentError(absl::StrCat(
          "the receiver reserved ", reply.blocks.size(), " blocks for ", header.num_blocks));
      SendDone(io, bad);
      return bad;
    }

    absl::Status moved = plane_->Move(io, address, header, source, src_blocks, reply, plane_data);
    if (!moved.ok()) {
      absl::Status early = EarlyError(io);
      SendDone(io, moved);
      if (early.ok()) return moved;
      // A wait the receiver's early reply stopped: its reason is the cause.
      if (moved.code() == absl::StatusCode::kCancelled && !is_cancelled()) {
        return WithContext(early, "the receiver broke off");
      }
      return absl::Status(moved.code(),
                          absl::StrCat(moved.message(), " (the receiver: ", early.message(), ")"));
    }
    PDS_RETURN_IF_ERROR(WithContext(
        WriteFrame(io, FrameType::kDeviceDone, tcp_wire::EncodeStatus(absl::OkStatus())),
        "sending DONE"));
    absl::StatusOr<absl::Status> done = ReadReply(io, FrameType::kDoneReply);
    if (!done.ok()) return WithContext(done.status(), "waiting for the receiver's confirmation");
    if (!done->ok()) return WithContext(*done, "the receiver failed the transfer");
    stats.bytes = static_cast<size_t>(header.num_layers) * header.LayerBytes();
    stats.finished = absl::Now();
    return stats;
  }

  // The OFFER reply: DEVICE_OFFER_REPLY, or an error in a plain reply frame (a TCP receiver, a
  // connection refused at the limit).
  static absl::StatusOr<DeviceOfferReply> ReadOfferReply(const Io& io) {
    PDS_ASSIGN_OR_RETURN(ControlFrame frame, ReadControlFrame(io));
    if (frame.type == FrameType::kDeviceOfferReply) return DecodeDeviceOfferReply(frame);
    if (frame.type == FrameType::kOfferReply || frame.type == FrameType::kDoneReply) {
      PDS_ASSIGN_OR_RETURN(absl::Status carried, DecodeStatusFrame(frame));
      if (carried.ok()) {
        return absl::FailedPreconditionError(
            "the receiver answered OK to a device offer in a plain reply: not a device receiver");
      }
      DeviceOfferReply reply;
      reply.status = WithContext(carried, "(is the receiver a device KV receiver?)");
      return reply;
    }
    return absl::InvalidArgumentError(
        absl::StrCat("expected an offer reply, got frame type ", static_cast<int>(frame.type)));
  }

  // An error the receiver already sent (it broke off), or OK when it sent nothing.
  static absl::Status EarlyError(const Io& io) {
    if (!PeerReadable(io)) return absl::OkStatus();
    Io quick = io;
    quick.deadline = absl::Now() + absl::Milliseconds(200);
    quick.cancelled = nullptr;
    absl::StatusOr<absl::Status> reply = ReadReply(quick, FrameType::kDoneReply);
    if (reply.ok()) return *reply;
    return absl::UnavailableError(absl::StrCat("connection lost (", reply.status().message(), ")"));
  }

  // Best effort: tells the receiver the transfer failed.
  static void SendDone(const Io& io, const absl::Status& status) {
    Io quick = io;
    quick.deadline = absl::Now() + absl::Milliseconds(200);
    quick.cancelled = nullptr;
    WriteFrame(quick, FrameType::kDeviceDone, tcp_wire::EncodeStatus(status)).IgnoreError();
  }

  const std::shared_ptr<SenderPlane> plane_;
  const DeviceTransportOptions options_;
};

// ---------------------------------------------------------------------------------------------
// Receiver.

class DeviceKvReceiver final : public KvReceiver {
 public:
  DeviceKvReceiver(KvSink* sink, std::shared_ptr<ReceiverPlane> plane,
                   DeviceTransportOptions options)
      : sink_(sink),
        plane_(std::move(plane)),
        options_(std::move(options)),
        server_(absl::StrCat(DevicePlaneName(plane_->kind()), " kv receiver"),
                {options_.max_connections, options_.socket_buffer_bytes, options_.idle_timeout},
                [this](const Io& io) { ServeConnection(io); }) {}
  ~DeviceKvReceiver() override { Shutdown(); }

  absl::Status Start(const std::string& host, int port) { return server_.Start(host, port); }
  std::string address() const override { return server_.address(); }
  size_t bytes_received() const override { return bytes_received_.load(); }
  void Shutdown() override { server_.Shutdown(); }

 private:
  struct Connection {
    Io io;
    KvTransferHeader header;
    bool reserved = false;
  };

  void ServeConnection(const Io& io) {
    Connection conn;
    conn.io = io;
    absl::Status status = Serve(conn);
    if (status.ok()) return;
    status = EndFailedConnection(
        status, server_.stopping(),
        absl::StrCat(DevicePlaneName(plane_->kind()), " kv receiver ", server_.address()),
        conn.header, conn.reserved, *sink_);
    Io quick = conn.io;
    quick.deadline = absl::Now() + absl::Milliseconds(100);
    if (WriteFrame(quick, FrameType::kDoneReply, tcp_wire::EncodeStatus(status)).ok()) {
      ::shutdown(conn.io.fd, SHUT_WR);
    }
  }

  absl::Status Serve(Connection& conn) {
    while (true) {
      bool eof = false;
      PDS_ASSIGN_OR_RETURN(ControlFrame frame, ReadControlFrame(conn.io, &eof));
      if (eof) return absl::OkStatus();  // the sender gave up or finished
      switch (frame.type) {
        case FrameType::kDeviceSetup:
          PDS_RETURN_IF_ERROR(WithContext(plane_->Setup(conn.io, frame), "setup"));
          break;
        case FrameType::kDeviceOffer: {
          PDS_ASSIGN_OR_RETURN(bool done, HandleOffer(conn, frame));
          if (done) return absl::OkStatus();
          break;
        }
        default:
          return absl::InvalidArgumentError(
              absl::StrCat("unexpected frame type ", static_cast<int>(frame.type), " (a ",
                           DevicePlaneName(plane_->kind()), " receiver takes ",
                           "DEVICE_SETUP and DEVICE_OFFER)"));
      }
    }
  }

  // Returns true when the connection is finished (the transfer ended or was refused for good).
  absl::StatusOr<bool> HandleOffer(Connection& conn, const ControlFrame& frame) {
    PDS_ASSIGN_OR_RETURN(DeviceOffer offer, DecodeDeviceOffer(frame));
    conn.header = offer.header;
    DeviceOfferReply reply;
    reply.status = offer.header.Validate();
    if (reply.status.ok() && offer.plane != plane_->kind()) {
      reply.status = absl::FailedPreconditionError(
          absl::StrCat("the sender speaks ", DevicePlaneName(offer.plane), ", this receiver ",
                       DevicePlaneName(plane_->kind()),
                       " (give both workers the same "
                       "--kv-transport)"));
    }
    if (reply.status.ok()) reply.status = sink_->Reserve(offer.header);
    if (reply.status.ok()) {
      conn.reserved = true;
      absl::StatusOr<std::vector<int32_t>> blocks = sink_->ReservedBlocks(offer.header.request_id);
      absl::StatusOr<std::string> accepted =
          blocks.ok() ? plane_->Accept(offer.header, offer.plane_data, *blocks) : blocks.status();
      if (accepted.ok()) {
        reply.blocks = *std::move(blocks);
        reply.plane_data = *std::move(accepted);
      } else {
        conn.reserved = false;
        reply.status = accepted.status();
        sink_->Complete(offer.header.request_id, reply.status);
      }
    }
    PDS_RETURN_IF_ERROR(WithContext(
        WriteFrame(conn.io, FrameType::kDeviceOfferReply, EncodeDeviceOfferReply(reply)),
        "sending the offer reply"));
    if (!reply.status.ok()) {
      if (reply.status.code() == absl::StatusCode::kResourceExhausted) return false;
      Log()->info("{} kv receiver {}: refused request '{}': {}",
                  std::string(DevicePlaneName(plane_->kind())), server_.address(),
                  offer.header.request_id, reply.status.ToString());
      return true;
    }

    bool done_read = false;
    PDS_RETURN_IF_ERROR(WithContext(
        plane_->Receive(conn.io, offer.header, offer.plane_data, reply.blocks, &done_read),
        "receiving the layers"));
    if (!done_read) {
      PDS_ASSIGN_OR_RETURN(ControlFrame done, ReadControlFrame(conn.io));
      PDS_RETURN_IF_ERROR(CheckDone(done));
    }
    conn.reserved = false;
    sink_->Complete(offer.header.request_id, absl::OkStatus());
    bytes_received_.fetch_add(static_cast<size_t>(offer.header.num_layers) *
                              offer.header.LayerBytes());
    absl::Status replied =
        WriteFrame(conn.io, FrameType::kDoneReply, tcp_wire::EncodeStatus(absl::OkStatus()));
    if (!replied.ok()) {
      Log()->warn("{} kv receiver {}: request '{}' stored, but the confirmation failed: {}",
                  std::string(DevicePlaneName(plane_->kind())), server_.address(),
                  offer.header.request_id, replied.ToString());
    }
    return true;
  }

  KvSink* const sink_;
  const std::shared_ptr<ReceiverPlane> plane_;
  const DeviceTransportOptions options_;
  std::atomic<size_t> bytes_received_{0};
  // Last member: destroyed (shut down) first, while the members its handlers use still exist.
  ConnectionServer server_;
};

}  // namespace

std::unique_ptr<KvSender> CreateDeviceKvSender(std::shared_ptr<SenderPlane> plane,
                                               DeviceTransportOptions options) {
  return std::make_unique<DeviceKvSender>(std::move(plane), std::move(options));
}

absl::StatusOr<std::unique_ptr<KvReceiver>> StartDeviceKvReceiver(
    const std::string& host, int port, KvSink* sink, std::shared_ptr<ReceiverPlane> plane,
    DeviceTransportOptions options) {
  if (sink == nullptr) return absl::InvalidArgumentError("kv receiver needs a sink");
  if (plane == nullptr) return absl::InvalidArgumentError("kv receiver needs a plane");
  if (port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("kv receiver port ", port, " out of range"));
  }
  if (options.max_connections < 1) {
    return absl::InvalidArgumentError("kv receiver max_connections must be positive");
  }
  auto receiver = std::make_unique<DeviceKvReceiver>(sink, std::move(plane), std::move(options));
  PDS_RETURN_IF_ERROR(receiver->Start(host, port));
  return std::unique_ptr<KvReceiver>(std::move(receiver));
}

}  // namespace pds::engine::transfer_internal
