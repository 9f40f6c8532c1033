#include "engine/transfer/device_transport.h"

#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

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

// A receiver watching a DEVICE_DONE_PENDING gives up this long after the sender's budget
// (when neither the data nor the sender's verdict came).
constexpr absl::Duration kVerdictMargin = absl::Seconds(1);

// absl::SleepFor overshoots by the kernel's timer slack (50 us by default): a wait for pending
// copies sleeps only until this long before they are expected to end, then polls.
constexpr absl::Duration kWakeEarly = absl::Microseconds(120);

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
  Put(out, reply.held_blocks);
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
      !reader.GetBytes(status_bytes, &status) || !reader.Get(&reply.held_blocks) ||
      reply.held_blocks < 0 || !reader.Get(&count) || count > reader.left() / sizeof(int32_t)) {
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

absl::StatusOr<tcp_wire::PeerStatus> DecodeStatusFrame(const ControlFrame& frame) {
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

std::string EncodeDone(const absl::Status& status, int32_t next_token) {
  return tcp_wire::EncodeEnd({status, status.ok() ? next_token : -1});
}

absl::Status CheckDone(const ControlFrame& frame, int32_t* next_token) {
  if (frame.type != FrameType::kDeviceDone) {
    return absl::InvalidArgumentError(
        absl::StrCat("expected DEVICE_DONE, got frame type ", static_cast<int>(frame.type)));
  }
  PDS_ASSIGN_OR_RETURN(const tcp_wire::TransferEnd end,
                       tcp_wire::DecodeEnd(frame.data(), frame.payload.size()));
  if (next_token != nullptr) *next_token = end.next_token;
  return WithContext(end.status, "the sender broke off");
}

std::string EncodeDevicePending(const DevicePending& pending) {
  std::string out;
  Put(out, static_cast<uint32_t>(pending.plane_data.size()));
  out += pending.plane_data;
  Put(out, absl::ToInt64Microseconds(pending.expected));
  Put(out, absl::ToInt64Microseconds(pending.budget));
  Put(out, pending.next_token);
  return out;
}

absl::StatusOr<DevicePending> DecodeDevicePending(const ControlFrame& frame) {
  Reader reader(frame.data(), frame.payload.size());
  DevicePending pending;
  uint32_t length = 0;
  int64_t expected_us = 0, budget_us = 0;
  if (!reader.Get(&length) || length > reader.left() ||
      !reader.GetBytes(length, &pending.plane_data) || !reader.Get(&expected_us) ||
      !reader.Get(&budget_us) || !reader.Get(&pending.next_token) || reader.left() != 0 ||
      expected_us < 0 || budget_us < 0 || pending.next_token < -1) {
    return Malformed("DEVICE_DONE_PENDING", frame.payload.size());
  }
  pending.expected = absl::Microseconds(expected_us);
  pending.budget = absl::Microseconds(budget_us);
  return pending;
}

bool SpinUntilReadable(const Io& io, absl::Duration spin) {
  if (spin <= absl::ZeroDuration()) return PeerReadable(io);
  const absl::Time until = absl::Now() + spin;
  while (true) {
    if (PeerReadable(io)) return true;
    if (absl::Now() >= until) return false;
    std::this_thread::yield();
  }
}

absl::StatusOr<ReceiverPlane::CompletionProbe> ReceiverPlane::WatchPending(
    const std::string& plane_data, ConnectionState* state) {
  return absl::UnimplementedError(
      absl::StrCat("the ", DevicePlaneName(kind()), " receiver cannot watch pending data"));
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
    // A kept connection to the receiver, or a new one; offered until the receiver has room. A
    // kept connection the receiver closed in the meantime fails before any reply: then once
    // more on a fresh connection.
    Fd fd;
    std::string plane_data;
    DeviceOfferReply reply;
    for (bool fresh_only = false;; fresh_only = true) {
      fd = fresh_only ? Fd() : TakeIdle(address);
      const bool reused = fd.get() >= 0;
      if (!reused) {
        PDS_ASSIGN_OR_RETURN(fd,
                             Connect(address, deadline, &cancelled, options_.socket_buffer_bytes));
      }
      const Io io{fd.get(), deadline, absl::InfiniteDuration(), -1, &cancelled};
      bool replied = false;
      absl::Status offered =
          Offer(io, address, header, deadline, is_cancelled, &stats, &plane_data, &reply, &replied);
      if (offered.ok()) break;
      if (!reused || replied || !absl::IsUnavailable(offered) || is_cancelled()) return offered;
      Log()->debug("{} kv sender: the kept connection to {} was closed ({}); reconnecting",
                   std::string(DevicePlaneName(plane_->kind())), address, offered.ToString());
      stats.offers = 0;  // that offer never reached the receiver
    }
    const Io io{fd.get(), deadline, absl::InfiniteDuration(), -1, &cancelled};
    stats.reserved = absl::Now();
    // The plane moves only the blocks after those the receiver holds.
    absl::Status held = WithContext(header.CheckHeld(reply.held_blocks), "the offer reply");
    const KvTransferHeader moved_header = held.ok() ? header.Moved(reply.held_blocks) : header;
    if (held.ok() && static_cast<int32_t>(reply.blocks.size()) != moved_header.num_blocks) {
      held = absl::InvalidArgumentError(absl::StrCat("the receiver reserved ", reply.blocks.size(),
                                                     " blocks for ", moved_header.num_blocks));
    }
    if (!held.ok()) {
      SendDone(io, held);
      return held;
    }
    stats.held_blocks = reply.held_blocks;
    stats.held_bytes =
        static_cast<size_t>(header.num_layers) * (header.LayerBytes() - moved_header.LayerBytes());
    const std::vector<int32_t> moved_blocks(src_blocks.begin() + reply.held_blocks,
                                            src_blocks.end());

    absl::StatusOr<std::unique_ptr<PendingMove>> started =
        plane_->MoveAsync(io, address, moved_header, source, moved_blocks, reply, plane_data);
    if (started.ok() && *started != nullptr) {
      return FinishEarly(io, address, moved_header, source, std::move(*started), std::move(fd),
                         &stats);
    }
    absl::Status moved = started.status();
    stats.moved = absl::Now();
    absl::StatusOr<int32_t> next_token = header.next_token;
    if (moved.ok() && header.next_token == kNextTokenAtEnd) {
      next_token = source.NextToken();
      if (!next_token.ok())
        moved = WithContext(next_token.status(), "the source has no next token");
    }
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
    PDS_RETURN_IF_ERROR(
        WithContext(WriteFrame(io, FrameType::kDeviceDone,
                               EncodeDone(absl::OkStatus(), LateToken(header, *next_token))),
                    "sending DONE"));
    SpinUntilReadable(io, options_.spin);
    absl::StatusOr<absl::Status> done = ReadReply(io, FrameType::kDoneReply);
    if (!done.ok()) return WithContext(done.status(), "waiting for the receiver's confirmation");
    if (!done->ok()) return WithContext(*done, "the receiver failed the transfer");
    return Finished(moved_header, &stats, address, std::move(fd));
  }

  // Early DONE (device_transport.h): DONE_PENDING at once, then the sender's own wait for the
  // copies and its verdict, and the receiver's answer.
  absl::StatusOr<KvSendStats> FinishEarly(const Io& io, const std::string& address,
                                          const KvTransferHeader& header, KvSource& source,
                                          std::unique_ptr<PendingMove> pending, Fd fd,
                                          KvSendStats* stats) {
    DevicePending frame;
    if (header.next_token == kNextTokenAtEnd) {
      absl::StatusOr<int32_t> token = source.NextToken();
      if (!token.ok()) {
        // The receiver has not seen the copies: it gets DONE(error) once none is in flight.
        const absl::Status failed = WithContext(token.status(), "the source has no next token");
        if (!pending->Wait(NoCancel(io)).ok()) pending->Drain().IgnoreError();
        pending->Finish(/*receiver_answered=*/true, absl::Now());
        SendFrame(io, FrameType::kDeviceDone, failed);
        return failed;
      }
      frame.next_token = *token;
    }
    const absl::Time sent = absl::Now();
    frame.plane_data = pending->plane_data();
    frame.expected = std::max(pending->expected() - sent, absl::ZeroDuration());
    frame.budget = std::max(io.deadline - sent, absl::ZeroDuration());
    if (io.deadline == absl::InfiniteFuture()) frame.budget = absl::Hours(24);
    // The receiver stops watching by then at the latest (kVerdictMargin past the budget; one
    // more second for the frame's way there).
    const absl::Time receiver_limit = sent + frame.budget + kVerdictMargin + absl::Seconds(1);
    absl::Status wrote =
        WithContext(WriteFrame(io, FrameType::kDeviceDonePending, EncodeDevicePending(frame)),
                    "sending DONE_PENDING");
    if (!wrote.ok()) {
      // The connection is lost: the receiver fails the transfer. Nothing may stay in flight.
      if (!pending->Wait(NoCancel(io)).ok()) pending->Drain().IgnoreError();
      pending->Finish(/*receiver_answered=*/false, receiver_limit);
      return wrote;
    }

    absl::Status copies = pending->Wait(io);
    if (copies.ok()) {
      stats->moved = absl::Now();
      // The verdict: the receiver reads it after its confirmation (or decides on it, when it
      // could not watch the copies itself).
      absl::Status verdict = WithContext(
          WriteFrame(io, FrameType::kDeviceDone, EncodeDone(absl::OkStatus(), frame.next_token)),
          "sending DONE");
      SpinUntilReadable(io, options_.spin);
      absl::StatusOr<absl::Status> done =
          ReadReply(verdict.ok() ? io : Quick(io), FrameType::kDoneReply);
      pending->Finish(/*receiver_answered=*/done.ok(), receiver_limit);
      if (!done.ok()) {
        return WithContext(done.status(), verdict.ok() ? "waiting for the receiver's confirmation"
                                                       : verdict.message());
      }
      if (!done->ok()) return WithContext(*done, "the receiver failed the transfer");
      if (!verdict.ok()) return verdict;  // confirmed, but the verdict did not go out
      return Finished(header, stats, address, std::move(fd));
    }

    // The copies failed, or the wait for them was cancelled or timed out: the receiver must
    // not accept them now (ABORT), and must not free its blocks while any is still in flight
    // (the final DONE after the drain).
    const bool stopped = absl::IsCancelled(copies) || absl::IsDeadlineExceeded(copies);
    SendFrame(io, FrameType::kDeviceAbort, copies);
    absl::Status drained = pending->Drain();
    absl::Status verdict = copies;
    if (!drained.ok()) {
      verdict = absl::Status(copies.code(), absl::StrCat(copies.message(),
                                                         " (copies still in "
                                                         "flight: ",
                                                         drained.message(), ")"));
    }
    SendFrame(io, FrameType::kDeviceDone, verdict);
    absl::StatusOr<absl::Status> answer = ReadReply(Quick(io), FrameType::kDoneReply);
    pending->Finish(/*receiver_answered=*/answer.ok(), receiver_limit);
    if (answer.ok() && answer->ok() && stopped && drained.ok()) {
      // The receiver confirmed before the abort reached it, and every copy completed: the
      // transfer succeeded on both sides. The connection has frames in flight: not kept.
      Log()->info("{} kv sender: request '{}' to {}: {} after the receiver had confirmed it",
                  std::string(DevicePlaneName(plane_->kind())), header.request_id, address,
                  copies.ToString());
      return Finished(header, stats, address, Fd());
    }
    if (answer.ok() && answer->ok()) {
      Log()->error(
          "{} kv sender: request '{}' to {}: the receiver confirmed it, but the copies failed: "
          "{}",
          std::string(DevicePlaneName(plane_->kind())), header.request_id, address,
          verdict.ToString());
    }
    if (answer.ok() && !answer->ok() && !stopped) {
      return absl::Status(verdict.code(), absl::StrCat(verdict.message(),
                                                       " (the receiver: ", answer->message(), ")"));
    }
    return verdict;
  }

  KvSendStats Finished(const KvTransferHeader& header, KvSendStats* stats,
                       const std::string& address, Fd fd) {
    stats->bytes = static_cast<size_t>(header.num_layers) * header.LayerBytes();
    stats->finished = absl::Now();
    if (fd.get() >= 0) KeepIdle(address, std::move(fd));  // nothing left unread
    return *stats;
  }

  static Io NoCancel(const Io& io) {
    Io quiet = io;
    quiet.cancelled = nullptr;
    return quiet;
  }
  static Io Quick(const Io& io) {
    Io quick = NoCancel(io);
    quick.deadline = absl::Now() + absl::Milliseconds(200);
    return quick;
  }
  // Best effort: a status frame (DONE, ABORT) to the receiver.
  static void SendFrame(const Io& io, FrameType type, const absl::Status& status) {
    WriteFrame(Quick(io), type,
               type == FrameType::kDeviceDone ? EncodeDone(status) : tcp_wire::EncodeStatus(status))
        .IgnoreError();
  }
  // DONE's token: the late one of a kNextTokenAtEnd header, else -1 (the header has it).
  static int32_t LateToken(const KvTransferHeader& header, int32_t next_token) {
    return header.next_token == kNextTokenAtEnd ? next_token : -1;
  }

  // Prepares the plane and offers until the receiver has room (OK: `reply` is its
  // reservation). *replied: the receiver answered something on this connection.
  absl::Status Offer(const Io& io, const std::string& address, const KvTransferHeader& header,
                     absl::Time deadline, const std::function<bool()>& is_cancelled,
                     KvSendStats* stats, std::string* plane_data, DeviceOfferReply* reply,
                     bool* replied) {
    PDS_ASSIGN_OR_RETURN(*plane_data, plane_->Prepare(io, address));
    std::string offer = EncodeDeviceOffer(DeviceOffer{plane_->kind(), *plane_data, header});
    absl::Duration backoff = options_.initial_backoff;
    bool set_up_again = false;
    while (true) {
      ++stats->offers;
      PDS_RETURN_IF_ERROR(WithContext(WriteFrame(io, FrameType::kDeviceOffer, offer), "offer"));
      SpinUntilReadable(io, options_.spin);
      absl::StatusOr<DeviceOfferReply> got = ReadOfferReply(io);
      if (!got.ok()) return WithContext(got.status(), "waiting for the offer reply");
      *replied = true;
      *reply = *std::move(got);
      if (reply->status.ok()) return absl::OkStatus();
      if (reply->status.code() == absl::StatusCode::kAborted && !set_up_again) {
        // The receiver does not know this setup (it restarted, or dropped it after a failed
        // transfer): once per send, set up again on this connection and offer again.
        Log()->info("{} kv sender: {} no longer knows our setup ({}); setting up again",
                    std::string(DevicePlaneName(plane_->kind())), address,
                    reply->status.ToString());
        set_up_again = true;
        plane_->Forget(address, *plane_data);
        PDS_ASSIGN_OR_RETURN(*plane_data, plane_->Prepare(io, address));
        offer = EncodeDeviceOffer(DeviceOffer{plane_->kind(), *plane_data, header});
        continue;
      }
      if (reply->status.code() != absl::StatusCode::kResourceExhausted) {
        return WithContext(reply->status, "refused by the receiver");
      }
      PDS_RETURN_IF_ERROR(WaitToOfferAgain(&backoff, options_.max_backoff, deadline, is_cancelled,
                                           stats->offers, reply->status));
    }
  }

  // A kept connection to `address` that is still usable, or an empty Fd.
  Fd TakeIdle(const std::string& address) {
    std::vector<Fd> closed;  // closed outside the lock
    Fd taken;
    std::lock_guard<std::mutex> lock(idle_mu_);
    auto it = idle_.find(address);
    if (it == idle_.end()) return taken;
    std::vector<IdleConnection>& kept = it->second;
    const absl::Time now = absl::Now();
    while (!kept.empty() && taken.get() < 0) {
      IdleConnection c = std::move(kept.back());
      kept.pop_back();
      // Readable while idle: the receiver closed it (EOF) or broke the protocol.
      if (now - c.since >= keepalive_ || PeerReadable(Io{c.fd.get()})) {
        closed.push_back(std::move(c.fd));
      } else {
        taken = std::move(c.fd);
      }
    }
    if (kept.empty()) idle_.erase(it);
    return taken;
  }

  // Keeps a connection that finished a transfer cleanly for the next transfer to `address`.
  void KeepIdle(const std::string& address, Fd fd) {
    if (options_.max_idle_connections <= 0) return;
    std::lock_guard<std::mutex> lock(idle_mu_);
    std::vector<IdleConnection>& kept = idle_[address];
    const absl::Time now = absl::Now();
    kept.erase(std::remove_if(kept.begin(), kept.end(),
                              [&](const IdleConnection& c) { return now - c.since >= keepalive_; }),
               kept.end());
    if (static_cast<int>(kept.size()) >= options_.max_idle_connections) return;  // closes fd
    kept.push_back(IdleConnection{std::move(fd), now});
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
    SendFrame(io, FrameType::kDeviceDone, status);
  }

  struct IdleConnection {
    Fd fd;
    absl::Time since;  // when its last transfer finished
  };

  const std::shared_ptr<SenderPlane> plane_;
  const DeviceTransportOptions options_;
  // Kept connections are closed before the receiver's idle timeout would close them.
  const absl::Duration keepalive_ = std::min(options_.keepalive, options_.idle_timeout / 2);
  std::mutex idle_mu_;
  std::map<std::string, std::vector<IdleConnection>> idle_;  // by address; guarded by idle_mu_
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
    std::unique_ptr<ReceiverPlane::ConnectionState> plane_state;
  };

  void ServeConnection(const Io& io) {
    Connection conn;
    conn.io = io;
    conn.plane_state = plane_->NewConnectionState();
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
    bool kept = false;  // a transfer finished on this connection: the sender may keep it
    while (true) {
      if (kept && !SpinUntilReadable(conn.io, options_.spin)) {
        // Between transfers, a connection with no next offer is closed after the idle timeout
        // (no error: the sender kept it for later and will notice).
        absl::StatusOr<WaitResult> ready = Wait(conn.io, POLLIN);
        if (absl::IsDeadlineExceeded(ready.status())) return absl::OkStatus();
        PDS_RETURN_IF_ERROR(ready.status());
      }
      bool eof = false;
      PDS_ASSIGN_OR_RETURN(ControlFrame frame, ReadControlFrame(conn.io, &eof));
      if (eof) return absl::OkStatus();  // the sender gave up or finished
      switch (frame.type) {
        case FrameType::kDeviceSetup:
          PDS_RETURN_IF_ERROR(WithContext(plane_->Setup(conn.io, frame), "setup"));
          break;
        case FrameType::kDeviceOffer: {
          PDS_ASSIGN_OR_RETURN(const OfferOutcome outcome, HandleOffer(conn, frame));
          if (outcome == OfferOutcome::kEnd) return absl::OkStatus();
          if (outcome == OfferOutcome::kTransferred) {
            kept = true;
            conn.header = KvTransferHeader();
          }
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

  enum class OfferOutcome {
    kNoRoom,       // answered RESOURCE_EXHAUSTED: the sender offers again on this connection
    kEnd,          // refused for good, or the confirmation failed: the connection ends
    kTransferred,  // the transfer completed: the sender may send the next offer
  };

  absl::StatusOr<OfferOutcome> HandleOffer(Connection& conn, const ControlFrame& frame) {
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
    if (reply.status.ok()) reply.status = plane_->Precheck(offer.plane_data);
    int32_t held = 0;
    if (reply.status.ok()) reply.status = ReserveChecked(*sink_, offer.header, &held);
    // The plane moves only the blocks after those this receiver holds.
    const KvTransferHeader moved = offer.header.Moved(held);
    if (reply.status.ok()) {
      conn.reserved = true;
      absl::StatusOr<std::vector<int32_t>> blocks = sink_->ReservedBlocks(offer.header.request_id);
      if (blocks.ok() && static_cast<int32_t>(blocks->size()) != moved.num_blocks) {
        blocks = absl::InternalError(
            absl::StrCat("the sink reserved ", blocks->size(), " blocks for ", moved.num_blocks));
      }
      absl::StatusOr<std::string> accepted =
          blocks.ok() ? plane_->Accept(moved, offer.plane_data, *blocks) : blocks.status();
      if (accepted.ok()) {
        reply.held_blocks = held;
        reply.blocks = *std::move(blocks);
        reply.plane_data = *std::move(accepted);
      } else {
        conn.reserved = false;
        reply.status = accepted.status();
        sink_->Complete(offer.header.request_id, reply.status, -1);
      }
    }
    PDS_RETURN_IF_ERROR(WithContext(
        WriteFrame(conn.io, FrameType::kDeviceOfferReply, EncodeDeviceOfferReply(reply)),
        "sending the offer reply"));
    if (!reply.status.ok()) {
      // No room yet, or an unknown setup (the sender sets up again): the next frame comes on
      // this connection.
      if (reply.status.code() == absl::StatusCode::kResourceExhausted ||
          reply.status.code() == absl::StatusCode::kAborted) {
        return OfferOutcome::kNoRoom;
      }
      Log()->info("{} kv receiver {}: refused request '{}': {}",
                  std::string(DevicePlaneName(plane_->kind())), server_.address(),
                  offer.header.request_id, reply.status.ToString());
      return OfferOutcome::kEnd;
    }

    ReceiverPlane::DoneRead done_read;
    PDS_RETURN_IF_ERROR(
        WithContext(plane_->Receive(conn.io, moved, offer.plane_data, reply.blocks, &done_read),
                    "receiving the layers"));
    bool verdict_pending = false;  // confirmed on the plane's probe: the verdict still comes
    int32_t late_token = done_read.next_token;
    if (!done_read.read) {
      SpinUntilReadable(conn.io, options_.spin);
      PDS_ASSIGN_OR_RETURN(ControlFrame done, ReadControlFrame(conn.io));
      if (done.type == FrameType::kDeviceDonePending) {
        PDS_ASSIGN_OR_RETURN(verdict_pending, AwaitPending(conn, done, &late_token));
      } else {
        PDS_RETURN_IF_ERROR(CheckDone(done, &late_token));
      }
    }
    int32_t next_token = offer.header.next_token;
    if (next_token == kNextTokenAtEnd) {
      if (late_token < 0) return absl::InvalidArgumentError("DONE(OK) without the next token");
      next_token = late_token;
    }
    conn.reserved = false;
    sink_->Complete(offer.header.request_id, absl::OkStatus(), next_token);
    bytes_received_.fetch_add(static_cast<size_t>(moved.num_layers) * moved.LayerBytes());
    absl::Status replied =
        WriteFrame(conn.io, FrameType::kDoneReply, tcp_wire::EncodeStatus(absl::OkStatus()));
    if (!replied.ok()) {
      Log()->warn("{} kv receiver {}: request '{}' stored, but the confirmation failed: {}",
                  std::string(DevicePlaneName(plane_->kind())), server_.address(),
                  offer.header.request_id, replied.ToString());
      return OfferOutcome::kEnd;
    }
    if (verdict_pending) {
      // The sender's verdict, sent once its own copies are done: OK, or (only where its stream
      // failed after the copies completed, or its abort crossed the confirmation) too late.
      SpinUntilReadable(conn.io, options_.spin);
      absl::StatusOr<ControlFrame> verdict = ReadControlFrame(conn.io);
      absl::Status late = verdict.ok() ? CheckDone(*verdict) : verdict.status();
      if (verdict.ok() && verdict->type == FrameType::kDeviceAbort) {
        absl::StatusOr<absl::Status> carried = DecodeStatusFrame(*verdict);
        late = carried.ok() ? WithContext(*carried, "the sender aborted") : carried.status();
      }
      if (!late.ok()) {
        Log()->warn("{} kv receiver {}: request '{}' was confirmed, then the sender reported: {}",
                    std::string(DevicePlaneName(plane_->kind())), server_.address(),
                    offer.header.request_id, late.ToString());
        return OfferOutcome::kEnd;
      }
    }
    return OfferOutcome::kTransferred;
  }

  // After DEVICE_DONE_PENDING (its token in *next_token): waits until the plane's probe reports the
  // data complete (true: the sender's verdict is still to come) or the sender's verdict arrives
  // (false: it was OK), or fails: the sender aborted or failed, the connection broke, shutdown, or
  // neither came by min(idle_timeout, the sender's budget + kVerdictMargin).
  absl::StatusOr<bool> AwaitPending(Connection& conn, const ControlFrame& frame,
                                    int32_t* next_token) {
    PDS_ASSIGN_OR_RETURN(const DevicePending pending, DecodeDevicePending(frame));
    *next_token = pending.next_token;
    const absl::Time start = absl::Now();
    const absl::Time limit =
        start + std::min(options_.idle_timeout, pending.budget + kVerdictMargin);
    absl::StatusOr<ReceiverPlane::CompletionProbe> watched =
        plane_->WatchPending(pending.plane_data, conn.plane_state.get());
    ReceiverPlane::CompletionProbe probe;
    if (watched.ok()) {
      probe = *std::move(watched);
    } else {
      Log()->warn("{} kv receiver {}: request '{}': waiting for the sender's verdict: {}",
                  std::string(DevicePlaneName(plane_->kind())), server_.address(),
                  conn.header.request_id, watched.status().ToString());
    }
    // Asleep until shortly before the copies are expected to end, then polling with only a
    // yield between polls for a while, then with short naps.
    const absl::Time expected = start + pending.expected;
    const absl::Time spin_until =
        expected + std::max(absl::Microseconds(300), pending.expected) + options_.spin;
    absl::Duration nap = absl::Microseconds(20);
    while (true) {
      bool complete = false;
      if (probe) {
        absl::StatusOr<bool> done = probe();
        if (!done.ok()) {
          Log()->warn("{} kv receiver {}: request '{}': waiting for the sender's verdict: {}",
                      std::string(DevicePlaneName(plane_->kind())), server_.address(),
                      conn.header.request_id, done.status().ToString());
          probe = nullptr;
        } else {
          complete = *done;
        }
      }
      // The connection first: an abort or a failed verdict decides even when the data looks
      // complete.
      if (PeerReadable(conn.io)) {
        bool eof = false;
        PDS_ASSIGN_OR_RETURN(ControlFrame next, ReadControlFrame(conn.io, &eof));
        if (eof)
          return absl::UnavailableError("the sender closed the connection after DONE_PENDING");
        if (next.type == FrameType::kDeviceAbort) {
          PDS_ASSIGN_OR_RETURN(absl::Status carried, DecodeStatusFrame(next));
          if (carried.ok()) carried = absl::InternalError("aborted without a reason");
          // Never accepted now; the blocks are freed once nothing is in flight any more: after
          // the sender's final DONE (or the connection's idle timeout, or its loss).
          PDS_ASSIGN_OR_RETURN(ControlFrame last, ReadControlFrame(conn.io));
          if (last.type != FrameType::kDeviceDone) return CheckDone(last);
          return WithContext(carried, "the sender broke off");
        }
        PDS_RETURN_IF_ERROR(CheckDone(next));
        return false;
      }
      if (complete) return true;
      if (Woken(conn.io)) return absl::UnavailableError("receiver shutting down");
      const absl::Time now = absl::Now();
      if (now >= limit) {
        return absl::DeadlineExceededError(
            absl::StrCat("neither the data nor the sender's verdict within ",
                         absl::FormatDuration(limit - start), " of DONE_PENDING"));
      }
      if (!probe) {
        // Only the verdict can end the wait: block for it.
        Io until = conn.io;
        until.deadline = limit;
        absl::StatusOr<WaitResult> ready = Wait(until, POLLIN);
        if (!ready.ok() && !absl::IsDeadlineExceeded(ready.status())) return ready.status();
      } else if (expected - now > kWakeEarly + absl::Microseconds(30)) {
        absl::SleepFor(std::min(expected - now, limit - now) - kWakeEarly);
      } else if (now < spin_until) {
        std::this_thread::yield();
      } else {
        absl::SleepFor(std::min(nap, limit - now));
        nap = std::min(nap * 2, absl::Microseconds(100));
      }
    }
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
