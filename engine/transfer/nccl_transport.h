// The NCCL KV transport (kv_transport.h) for GPU workers on different GPUs or hosts: the
// device control protocol of device_transport.h, with the data over a two-rank communicator
// per (sender, receiver) pair (sender rank 0, receiver rank 1) behind the Communicator
// interface (communicator.h), so the protocol is tested on FakeCommWorld without GPUs.
//
//   - Setup, once per peer: the sender draws a communicator id (ncclGetUniqueId) and a random
//     64-bit key and sends them in DEVICE_SETUP on the transfer's control connection; the
//     receiver acknowledges (so a peer that is no NCCL receiver fails fast), both join
//     (nonblocking init, bounded by setup_timeout), the receiver confirms, and both cache the
//     communicator (the sender by receiver address, the receiver by key). The id travels on
//     the TCP control connection rather than through the front-end's gRPC control plane: only
//     the pair needs it, when they first talk, on a connection that exists anyway, so the
//     front-end needs no new RPC and no extra round trip.
//   - Each offer names the key. After the reservation the sender takes the communicator's lock
//     (transfers to one receiver share it; NCCL needs both sides to issue their operations in
//     the same order), sends DEVICE_START and waits for DEVICE_START_REPLY, which the receiver
//     sends once it holds its side's lock (so the next transfer's receives cannot be posted
//     before this one's: small sends may complete before their receives are posted). Then per
//     layer the sender packs its blocks (K then V, block-table order) into a staging buffer
//     with device copies and sends it as one send in one group, and the receiver receives into
//     its staging buffer and scatters into the reserved blocks, all on one stream per side.
//     Runs of blocks consecutive on both sides are one copy. Both wait for their stream with a
//     deadline; the sender then sends DONE.
//   - A failure after DEVICE_START (cancel, deadline, source error, asynchronous NCCL error,
//     the peer breaking off) aborts the communicator on that side and drops it from the cache;
//     the peer does the same when its wait fails, and the next transfer sets up a new one.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/transfer/communicator.h"
#include "engine/transfer/device_transport.h"
#include "engine/transfer/kv_transport.h"

namespace pds::engine {

// `pool` is the sending worker's KV cache on `device`'s memory (sources' Blocks() index it).
std::unique_ptr<KvSender> CreateNcclKvSender(std::shared_ptr<CommDevice> device, KvPoolLayout pool,
                                             DeviceKvTransportOptions options = {});

// Listens on host:port (0: ephemeral) and stores into `sink`'s reserved blocks of `pool` (the
// receiving worker's cache on `device`'s memory). `sink` must outlive the receiver.
absl::StatusOr<std::unique_ptr<KvReceiver>> StartNcclKvReceiver(
    const std::string& host, int port, KvSink* sink, std::shared_ptr<CommDevice> device,
    KvPoolLayout pool, DeviceKvTransportOptions options = {});

#if PDS_HAVE_NCCL
// NCCL on CUDA device `device` (nccl_communicator.cc; built where CUDA and NCCL are found).
absl::StatusOr<std::shared_ptr<CommDevice>> CreateNcclCommDevice(int device);
#endif

}  // namespace pds::engine
