#include "engine/transfer/nccl_transport.h"

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/common/logging.h"
#include "engine/common/status_macros.h"

namespace pds::engine {
namespace {

using tcp_wire::FrameType;
using transfer_internal::BlockRun;
using transfer_internal::CheckDone;
using transfer_internal::CoalesceRuns;
using transfer_internal::ControlFrame;
using transfer_internal::DeviceOfferReply;
using transfer_internal::DevicePlaneKind;
using transfer_internal::Io;
using transfer_internal::PeerReadable;
using transfer_internal::Put;
using transfer_internal::ReadControlFrame;
using transfer_internal::Reader;
using transfer_internal::WithContext;
using transfer_internal::Woken;
using transfer_internal::WriteFrame;

constexpr int kSenderRank = 0;
constexpr int kReceiverRank = 1;

std::shared_ptr<spdlog::logger> Log() {
  static auto logger = Logger("transfer");
  return logger;
}

// One side's communicator with one peer. `mu` is held for a transfer's data phase, so the
// transfers between a pair issue their operations in one order on both sides.
struct Peer {
  ~Peer() {
    if (stream != nullptr) device->DestroyStream(stream);
  }
  std::shared_ptr<CommDevice> device;
  uint64_t key = 0;
  std::timed_mutex mu;
  std::unique_ptr<Communicator> comm;  // guarded by mu
  StreamHandle stream = nullptr;
  DeviceBuffer staging;  // guarded by mu
  bool broken = false;   // guarded by mu
  // Receiver: when it was registered, and whether an offer has named it since.
  absl::Time set_up_at = absl::InfinitePast();
  std::atomic<bool> offered{false};
};

// Takes `mu` before `deadline`, polling `stop`.
absl::Status LockBefore(std::timed_mutex& mu, absl::Time deadline,
                        const std::function<bool()>& stop, absl::string_view what) {
  while (!mu.try_lock_for(std::chrono::milliseconds(5))) {
    if (stop && stop()) return absl::CancelledError(absl::StrCat("cancelled waiting for ", what));
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("deadline exceeded waiting for ", what));
    }
  }
  return absl::OkStatus();
}

absl::Status EnsureStaging(Peer& peer, size_t bytes) {
  if (peer.staging.bytes() >= bytes) return absl::OkStatus();
  peer.staging.Reset();
  PDS_ASSIGN_OR_RETURN(peer.staging, peer.device->Allocate(bytes));
  return absl::OkStatus();
}

// Enqueues the copies between the packed layer in `staging` (K of every block, then V) and
// the pool's blocks: pack (pool -> staging) or scatter (staging -> pool). In each run, `src`
// indexes the pool and `dst` the packed position for packing, the reverse for scattering.
absl::Status CopyLayer(CommDevice& device, const KvPoolLayout& pool, int32_t layer,
                       const std::vector<BlockRun>& runs, int32_t num_blocks, uint8_t* staging,
                       bool pack, StreamHandle stream) {
  auto* base = static_cast<uint8_t*>(pool.data);
  const size_t bb = pool.block_bytes;
  for (int kv = 0; kv < 2; ++kv) {
    uint8_t* packed = staging + static_cast<size_t>(kv) * num_blocks * bb;
    for (const BlockRun& run : runs) {
      const size_t bytes = static_cast<size_t>(run.count) * bb;
      absl::Status copied =
          pack ? device.CopyAsync(packed + static_cast<size_t>(run.dst) * bb,
                                  base + pool.Offset(layer, kv, run.src), bytes, stream)
               : device.CopyAsync(base + pool.Offset(layer, kv, run.dst),
                                  packed + static_cast<size_t>(run.src) * bb, bytes, stream);
      PDS_RETURN_IF_ERROR(copied);
    }
  }
  return absl::OkStatus();
}

std::vector<int32_t> Iota(int32_t n) {
  std::vector<int32_t> v(n);
  std::iota(v.begin(), v.end(), 0);
  return v;
}

std::string EncodeKey(uint64_t key) {
  std::string out;
  Put(out, key);
  return out;
}

absl::StatusOr<uint64_t> DecodeKey(const std::string& data) {
  Reader reader(reinterpret_cast<const uint8_t*>(data.data()), data.size());
  uint64_t key = 0;
  if (!reader.Get(&key) || reader.left() != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed nccl offer data of ", data.size(), " bytes"));
  }
  return key;
}

// ---------------------------------------------------------------------------------------------
// Sender.

class NcclSenderPlane final : public transfer_internal::SenderPlane {
 public:
  NcclSenderPlane(std::shared_ptr<CommDevice> device, KvPoolLayout pool,
                  DeviceKvTransportOptions options)
      : device_(std::move(device)), pool_(pool), options_(std::move(options)) {}

  DevicePlaneKind kind() const override { return DevicePlaneKind::kNccl; }

  absl::StatusOr<std::string> Prepare(const Io& io, const std::string& address) override {
    std::shared_ptr<Slot> slot;
    {
      std::lock_guard<std::mutex> lock(mu_);
      std::shared_ptr<Slot>& entry = slots_[address];
      if (!entry) entry = std::make_shared<Slot>();
      slot = entry;
    }
    // One setup per address at a time; a setup is bounded by setup_timeout and io.deadline,
    // and so is the wait for another transfer's (this one's deadline and cancel hold there).
    const std::function<bool()> cancelled =
        io.cancelled != nullptr ? *io.cancelled : std::function<bool()>();
    PDS_RETURN_IF_ERROR(
        LockBefore(slot->setup_mu, io.deadline, cancelled, "the communicator setup"));
    std::unique_lock<std::timed_mutex> setup(slot->setup_mu, std::adopt_lock);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (slot->peer) return EncodeKey(slot->peer->key);
    }
    PDS_ASSIGN_OR_RETURN(std::shared_ptr<Peer> peer, SetUp(io, address));
    std::lock_guard<std::mutex> lock(mu_);
    slot->peer = peer;
    return EncodeKey(peer->key);
  }

  void Forget(const std::string& address, const std::string& plane_data) override {
    absl::StatusOr<uint64_t> key = DecodeKey(plane_data);
    if (!key.ok()) return;
    std::shared_ptr<Peer> peer = Find(address, *key);
    if (peer == nullptr) return;
    Drop(address, peer);
    // Its other side is gone: abort it, unless a transfer still holds it (that one fails and
    // aborts it itself).
    if (peer->mu.try_lock_for(std::chrono::milliseconds(100))) {
      std::unique_lock<std::timed_mutex> lock(peer->mu, std::adopt_lock);
      if (!peer->broken) {
        peer->comm->Abort();
        peer->broken = true;
      }
    }
    Log()->info("nccl kv sender: forgot communicator {:016x} with {}", *key, address);
  }

  absl::Status Move(const Io& io, const std::string& address, const KvTransferHeader& header,
                    KvSource& source, const std::vector<int32_t>& src_blocks,
                    const DeviceOfferReply& reply, const std::string& plane_data) override {
    PDS_RETURN_IF_ERROR(pool_.Check(header, src_blocks));
    PDS_ASSIGN_OR_RETURN(const uint64_t key, DecodeKey(plane_data));
    std::shared_ptr<Peer> peer = Find(address, key);
    if (peer == nullptr) {
      return absl::UnavailableError("the communicator with the receiver was dropped; retry");
    }
    const std::function<bool()> cancelled =
        io.cancelled != nullptr ? *io.cancelled : std::function<bool()>();
    PDS_RETURN_IF_ERROR(LockBefore(peer->mu, io.deadline, cancelled, "the communicator"));
    std::unique_lock<std::timed_mutex> lock(peer->mu, std::adopt_lock);
    if (peer->broken) return absl::UnavailableError("the communicator broke; retry");
    PDS_RETURN_IF_ERROR(EnsureStaging(*peer, header.LayerBytes()));
    PDS_RETURN_IF_ERROR(WithContext(WriteFrame(io, FrameType::kDeviceStart, std::string()),
                                    "sending DEVICE_START"));
    // The receiver answers once it holds its side's lock: the next transfer's DEVICE_START
    // (sent after this lock is released) then cannot overtake this one's receives there.
    absl::Status started = ReadReplyOfType(io, FrameType::kDeviceStartReply);
    // From here the receiver posts its receives: any failure leaves the pair out of step.
    absl::Status sent = started.ok() ? SendLayers(io, header, source, src_blocks, *peer)
                                     : WithContext(started, "the receiver's start reply");
    if (!sent.ok()) {
      Log()->warn("nccl kv sender: dropping the communicator with {} after request '{}' failed: {}",
                  address, header.request_id, sent.ToString());
      peer->comm->Abort();
      peer->broken = true;
      Drop(address, peer);
    }
    return sent;
  }

 private:
  struct Slot {
    std::timed_mutex setup_mu;
    std::shared_ptr<Peer> peer;  // guarded by NcclSenderPlane::mu_
  };

  absl::StatusOr<std::shared_ptr<Peer>> SetUp(const Io& io, const std::string& address) {
    auto peer = std::make_shared<Peer>();
    peer->device = device_;
    peer->key = std::random_device{}() | (static_cast<uint64_t>(std::random_device{}()) << 32);
    PDS_ASSIGN_OR_RETURN(const std::string id, device_->NewUniqueId());
    // The stream first: once both sides have joined, nothing on this side may fail before the
    // receiver's last reply (a failure after it would leave the receiver's side registered).
    PDS_ASSIGN_OR_RETURN(peer->stream, device_->CreateStream());
    std::string payload;
    Put(payload, peer->key);
    payload += id;
    PDS_RETURN_IF_ERROR(
        WithContext(WriteFrame(io, FrameType::kDeviceSetup, payload), "sending DEVICE_SETUP"));
    const absl::Time deadline = std::min(io.deadline, absl::Now() + options_.setup_timeout);
    Io reply_io = io;
    reply_io.deadline = deadline;
    // The receiver acknowledges before joining, so a peer that is no NCCL receiver fails fast.
    PDS_RETURN_IF_ERROR(WithContext(ReadReplyOfType(reply_io, FrameType::kDeviceSetupReply),
                                    "the receiver's setup reply"));
    absl::StatusOr<std::unique_ptr<Communicator>> comm =
        device_->Join(id, 2, kSenderRank, deadline);
    if (!comm.ok()) {
      return WithContext(comm.status(), absl::StrCat("joining a communicator with ", address));
    }
    peer->comm = *std::move(comm);
    absl::Status joined = ReadReplyOfType(reply_io, FrameType::kDeviceSetupReply);
    if (!joined.ok()) {
      peer->comm->Abort();
      return WithContext(joined, "the receiver's setup reply");
    }
    Log()->info("nccl kv sender: communicator with {} set up on {}", address, device_->name());
    return peer;
  }

  // A reply frame of type `want` with OK, or the error in any reply frame.
  static absl::Status ReadReplyOfType(const Io& io, FrameType want) {
    PDS_ASSIGN_OR_RETURN(const ControlFrame frame, ReadControlFrame(io));
    PDS_ASSIGN_OR_RETURN(const absl::Status carried, transfer_internal::DecodeStatusFrame(frame));
    if (!carried.ok()) return carried;
    if (frame.type != want) {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected OK frame of type ", static_cast<int>(frame.type)));
    }
    return absl::OkStatus();
  }

  absl::Status SendLayers(const Io& io, const KvTransferHeader& header, KvSource& source,
                          const std::vector<int32_t>& src_blocks, Peer& peer) {
    const std::vector<BlockRun> runs = CoalesceRuns(src_blocks, Iota(header.num_blocks));
    auto* staging = static_cast<uint8_t*>(peer.staging.data());
    const auto cancelled = [&] {
      return io.cancelled != nullptr && *io.cancelled && (*io.cancelled)();
    };
    for (int32_t layer = 0; layer < header.num_layers; ++layer) {
      const std::string where = absl::StrCat("layer ", layer, " of ", header.num_layers);
      if (cancelled()) return absl::CancelledError(absl::StrCat("cancelled before ", where));
      if (absl::Now() >= io.deadline) {
        return absl::DeadlineExceededError(absl::StrCat("deadline exceeded before ", where));
      }
      PDS_RETURN_IF_ERROR(
          WithContext(source.WaitLayer(layer), absl::StrCat("source failed to produce ", where)));
      PDS_RETURN_IF_ERROR(WithContext(CopyLayer(*device_, pool_, layer, runs, header.num_blocks,
                                                staging, /*pack=*/true, peer.stream),
                                      absl::StrCat("packing ", where)));
      PDS_RETURN_IF_ERROR(peer.comm->GroupStart());
      absl::Status sent = peer.comm->Send(staging, header.LayerBytes(), kReceiverRank, peer.stream);
      absl::Status ended = peer.comm->GroupEnd(io.deadline);
      PDS_RETURN_IF_ERROR(WithContext(sent.ok() ? ended : sent, absl::StrCat("sending ", where)));
    }
    // The receiver says nothing before DONE unless it broke off.
    return WithContext(
        peer.comm->Wait(peer.stream, io.deadline, [&] { return cancelled() || PeerReadable(io); }),
        "waiting for the sends");
  }

  std::shared_ptr<Peer> Find(const std::string& address, uint64_t key) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = slots_.find(address);
    if (it == slots_.end() || !it->second->peer || it->second->peer->key != key) return nullptr;
    return it->second->peer;
  }

  void Drop(const std::string& address, const std::shared_ptr<Peer>& peer) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = slots_.find(address);
    if (it != slots_.end() && it->second->peer == peer) it->second->peer.reset();
  }

  const std::shared_ptr<CommDevice> device_;
  const KvPoolLayout pool_;
  const DeviceKvTransportOptions options_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<Slot>> slots_;  // by receiver address; guarded by mu_
};

// ---------------------------------------------------------------------------------------------
// Receiver.

class NcclReceiverPlane final : public transfer_internal::ReceiverPlane {
 public:
  NcclReceiverPlane(std::shared_ptr<CommDevice> device, KvPoolLayout pool,
                    DeviceKvTransportOptions options)
      : device_(std::move(device)), pool_(pool), options_(std::move(options)) {}

  DevicePlaneKind kind() const override { return DevicePlaneKind::kNccl; }

  absl::Status Setup(const Io& io, const ControlFrame& frame) override {
    Reader reader(frame.data(), frame.payload.size());
    uint64_t key = 0;
    std::string id;
    if (!reader.Get(&key) || !reader.GetBytes(reader.left(), &id) || id.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("malformed DEVICE_SETUP payload of ", frame.payload.size(), " bytes"));
    }
    auto peer = std::make_shared<Peer>();
    peer->device = device_;
    peer->key = key;
    PDS_RETURN_IF_ERROR(WriteFrame(io, FrameType::kDeviceSetupReply,
                                   tcp_wire::EncodeStatus(absl::OkStatus())));  // joining
    PDS_ASSIGN_OR_RETURN(peer->comm,
                         device_->Join(id, 2, kReceiverRank, absl::Now() + options_.setup_timeout));
    absl::StatusOr<StreamHandle> stream = device_->CreateStream();
    if (!stream.ok()) {
      peer->comm->Abort();
      return stream.status();
    }
    peer->stream = *stream;
    DropUnoffered();
    {
      std::lock_guard<std::mutex> lock(mu_);
      peer->set_up_at = absl::Now();
      peers_[key] = peer;
    }
    Log()->info("nccl kv receiver: communicator {:016x} set up on {}", key, device_->name());
    absl::Status replied =
        WriteFrame(io, FrameType::kDeviceSetupReply, tcp_wire::EncodeStatus(absl::OkStatus()));
    if (!replied.ok()) {  // the sender never learns it joined: it gives the pair up
      peer->comm->Abort();
      Forget(key, peer);
    }
    return replied;
  }

  absl::Status Precheck(const std::string& offer_plane_data) override {
    PDS_ASSIGN_OR_RETURN(const uint64_t key, DecodeKey(offer_plane_data));
    {
      // Marked under the lock DropUnoffered takes, so that it never drops a peer found here.
      std::lock_guard<std::mutex> lock(mu_);
      if (auto it = peers_.find(key); it != peers_.end()) {
        it->second->offered = true;
        return absl::OkStatus();
      }
    }
    DropUnoffered();
    return absl::AbortedError(absl::StrCat("no communicator ", absl::Hex(key, absl::kZeroPad16),
                                           " with the sender here (restarted, or dropped after "
                                           "a failed transfer)"));
  }

  absl::StatusOr<std::string> Accept(const KvTransferHeader& header,
                                     const std::string& offer_plane_data,
                                     const std::vector<int32_t>& blocks) override {
    PDS_RETURN_IF_ERROR(pool_.Check(header, blocks));
    PDS_ASSIGN_OR_RETURN(const uint64_t key, DecodeKey(offer_plane_data));
    if (Find(key) == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(
          "no communicator ", key, " with the sender (dropped after a failure?); retry"));
    }
    return std::string();
  }

  absl::Status Receive(const Io& io, const KvTransferHeader& header,
                       const std::string& offer_plane_data, const std::vector<int32_t>& blocks,
                       DoneRead* done) override {
    PDS_ASSIGN_OR_RETURN(const uint64_t key, DecodeKey(offer_plane_data));
    PDS_ASSIGN_OR_RETURN(ControlFrame start, ReadControlFrame(io));
    if (start.type == FrameType::kDeviceDone) {
      PDS_RETURN_IF_ERROR(CheckDone(start));
      return absl::InvalidArgumentError("DEVICE_DONE(OK) before DEVICE_START");
    }
    if (start.type != FrameType::kDeviceStart) {
      return absl::InvalidArgumentError(
          absl::StrCat("expected DEVICE_START, got frame type ", static_cast<int>(start.type)));
    }
    std::shared_ptr<Peer> peer = Find(key);
    if (peer == nullptr) return absl::UnavailableError("the communicator was dropped");
    // Bounded: the holder's wait is bounded by the same idle limit. Failing here, the sender
    // drops the communicator: so does this side (the holder, if any, still has it).
    const absl::Time deadline = absl::Now() + options_.idle_timeout;
    absl::Status locked = LockBefore(
        peer->mu, deadline, [&] { return Woken(io); }, "the communicator");
    if (!locked.ok()) {
      Forget(key, peer);
      return locked;
    }
    std::unique_lock<std::timed_mutex> lock(peer->mu, std::adopt_lock);
    if (peer->broken) {
      Forget(key, peer);
      return absl::UnavailableError("the communicator broke");
    }
    PDS_RETURN_IF_ERROR(WithContext(
        WriteFrame(io, FrameType::kDeviceStartReply, tcp_wire::EncodeStatus(absl::OkStatus())),
        "sending the start reply"));
    absl::Status received = ReceiveLayers(io, header, blocks, *peer, deadline, done);
    if (!received.ok()) {
      Log()->warn("nccl kv receiver: dropping communicator {:016x} after request '{}' failed: {}",
                  key, header.request_id, received.ToString());
      peer->comm->Abort();
      peer->broken = true;
      Forget(key, peer);
    }
    return received;
  }

 private:
  absl::Status ReceiveLayers(const Io& io, const KvTransferHeader& header,
                             const std::vector<int32_t>& blocks, Peer& peer, absl::Time deadline,
                             DoneRead* done) {
    PDS_RETURN_IF_ERROR(EnsureStaging(peer, header.LayerBytes()));
    const std::vector<BlockRun> runs = CoalesceRuns(Iota(header.num_blocks), blocks);
    auto* staging = static_cast<uint8_t*>(peer.staging.data());
    for (int32_t layer = 0; layer < header.num_layers; ++layer) {
      const std::string where = absl::StrCat("layer ", layer, " of ", header.num_layers);
      PDS_RETURN_IF_ERROR(peer.comm->GroupStart());
      absl::Status posted = peer.comm->Recv(staging, header.LayerBytes(), kSenderRank, peer.stream);
      absl::Status ended = peer.comm->GroupEnd(deadline);
      PDS_RETURN_IF_ERROR(
          WithContext(posted.ok() ? ended : posted, absl::StrCat("receiving ", where)));
      PDS_RETURN_IF_ERROR(WithContext(CopyLayer(*device_, pool_, layer, runs, header.num_blocks,
                                                staging, /*pack=*/false, peer.stream),
                                      absl::StrCat("scattering ", where)));
    }
    // The sender may send DONE(OK) before the scatter copies finish here; only an error (or a
    // lost connection) stops the wait.
    absl::Status sender_error;
    const auto stop = [&] {
      if (Woken(io)) {
        sender_error = absl::UnavailableError("receiver shutting down");
        return true;
      }
      if (done->read || !PeerReadable(io)) return false;
      Io quick = io;
      quick.deadline = absl::Now() + absl::Seconds(1);
      absl::StatusOr<ControlFrame> frame = ReadControlFrame(quick);
      sender_error = frame.ok() ? CheckDone(*frame, &done->next_token) : frame.status();
      if (sender_error.ok()) done->read = true;
      return !sender_error.ok();
    };
    absl::Status waited = peer.comm->Wait(peer.stream, deadline, stop);
    if (!sender_error.ok()) return sender_error;
    return WithContext(waited, "waiting for the receives");
  }

  std::shared_ptr<Peer> Find(uint64_t key) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = peers_.find(key);
    return it == peers_.end() ? nullptr : it->second;
  }

  void Forget(uint64_t key, const std::shared_ptr<Peer>& peer) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = peers_.find(key);
    if (it != peers_.end() && it->second == peer) peers_.erase(it);
  }

  // Drops the communicators no offer has named within twice the setup timeout of their setup.
  // A sender offers at once after its setup succeeds; one whose setup deadline passed after
  // both sides joined (before this side's last reply reached it) gave its side up and never
  // will, and nothing else would free this side's communicator and stream.
  void DropUnoffered() {
    std::vector<std::shared_ptr<Peer>> dropped;
    {
      const absl::Time limit = absl::Now() - 2 * options_.setup_timeout;
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = peers_.begin(); it != peers_.end();) {
        if (!it->second->offered.load() && it->second->set_up_at < limit) {
          dropped.push_back(std::move(it->second));
          it = peers_.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (const std::shared_ptr<Peer>& peer : dropped) {
      Log()->warn("nccl kv receiver: dropping communicator {:016x}: no offer since its setup",
                  peer->key);
      peer->comm->Abort();
    }
  }

  const std::shared_ptr<CommDevice> device_;
  const KvPoolLayout pool_;
  const DeviceKvTransportOptions options_;
  std::mutex mu_;
  std::map<uint64_t, std::shared_ptr<Peer>> peers_;  // by key; guarded by mu_
};

}  // namespace

std::unique_ptr<KvSender> CreateNcclKvSender(std::shared_ptr<CommDevice> device, KvPoolLayout pool,
                                             DeviceKvTransportOptions options) {
  auto plane = std::make_shared<NcclSenderPlane>(std::move(device), pool, options);
  return transfer_internal::CreateDeviceKvSender(std::move(plane), std::move(options));
}

absl::StatusOr<std::unique_ptr<KvReceiver>> StartNcclKvReceiver(const std::string& host, int port,
                                                                KvSink* sink,
                                                                std::shared_ptr<CommDevice> device,
                                                                KvPoolLayout pool,
                                                                DeviceKvTransportOptions options) {
  if (device == nullptr) return absl::InvalidArgumentError("nccl kv receiver needs a device");
  PDS_RETURN_IF_ERROR(pool.Validate());
  auto plane = std::make_shared<NcclReceiverPlane>(std::move(device), pool, options);
  return transfer_internal::StartDeviceKvReceiver(host, port, sink, std::move(plane),
                                                  std::move(options));
}

}  // namespace pds::engine
