// The CUDA IPC KV transport (kv_transport.h) for GPU workers on one node, including two
// processes on one GPU: the device control protocol of device_transport.h, with the sender
// copying each layer's K/V straight into the receiver's reserved blocks.
//
//   - The receiver exports its whole KV cache (one allocation, KvPoolLayout) once with
//     cudaIpcGetMemHandle and returns the handle and the pool's geometry in every offer reply,
//     with the reserved block ids. The offer carries the sender's host name; a receiver on
//     another host refuses (FAILED_PRECONDITION: use nccl).
//   - The sender opens each receiver's handle once (cached by receiver address + handle; a new
//     handle from the same address, a restarted receiver, replaces the old mapping). After
//     source.WaitLayer(l) it extends the batch over the following layers the source already
//     has (KvSource::LayerReady, each still WaitLayer'd) and copies layers [l, end) with one
//     kernels::cuda::CopyBlocks launch (both block lists uploaded once per transfer), or, where
//     that takes at most two calls (one run of blocks consecutive on both sides, one layer),
//     with cudaMemcpyAsync. A source that computes its layers while the transfer runs thus gets
//     layer-by-layer overlap, a finished one a single launch for the whole sequence.
//   - The copies run on a copy stream of a small pool of reusable contexts (stream, pinned and
//     device buffers for the block lists), created once and shared by the sender's transfers,
//     one transfer per context at a time.
//   - Completion (early DONE, device_transport.h; DeviceKvTransportOptions::early_done): each
//     copy context has an interprocess event (cudaEventInterprocess | cudaEventDisableTiming).
//     The sender records it on the copy stream right after the copies and sends
//     DEVICE_DONE_PENDING with its handle (and an id) at once; the receiver opens it (cached per
//     connection, closed with it) and polls cudaEventQuery (asleep until shortly before the
//     copies are expected to end, then yielding, then short naps; never past min(idle_timeout,
//     the sender's budget + 1 s)) while watching the connection for the sender's ABORT or
//     verdict, then completes the sink and confirms. The sender meanwhile waits for its own
//     stream (copy errors, cancellation, deadline), sends its verdict (DEVICE_DONE) and reads
//     the confirmation, so the confirmation round trip overlaps the copies. A failed,
//     cancelled or timed-out wait sends DEVICE_ABORT at once (the receiver then never accepts),
//     still waits for the copies in flight (up to the deadline plus a grace period), then sends
//     DEVICE_DONE(error): the receiver frees the blocks only then, so that a failed transfer
//     never writes into blocks the receiver has already freed. An event is recorded again only
//     after the receiver answered (stopped watching it); otherwise it is retired until the
//     receiver's limit has passed. A context whose copies outlive even the drain is reused only
//     once its stream is idle. Without early DONE (or where the event cannot be made) the sender
//     waits for its stream (asleep until shortly before the copies are expected to end at the
//     device's memory bandwidth, then cudaStreamQuery polled, always against the deadline)
//     before DEVICE_DONE.
//
// Requirements: the receiver's pool must be a cudaMalloc allocation whose base is
// KvPoolLayout::data (cudaIpcGetMemHandle does not export cudaMallocAsync pool memory, and the
// opened pointer is the allocation's base); the sender's device must be able to reach the
// receiver's (the same GPU, or peer access between the two).
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/transfer/device_transport.h"
#include "engine/transfer/kv_transport.h"

namespace pds::engine {

// `pool` is the sending worker's KV cache (sources' Blocks() index it), on pool.device. Creates
// the first copy context (a stream and the block-list buffers) at once.
absl::StatusOr<std::unique_ptr<KvSender>> CreateCudaIpcKvSender(
    KvPoolLayout pool, DeviceKvTransportOptions options = {});

// Testing only (tests/engine/cuda_ipc_transport_test.cc): where a test holds or breaks the
// sender's early DONE path.
struct CudaIpcSenderTestHooks {
  // Called with the copy stream (a cudaStream_t) after the copies are enqueued and before the
  // event is recorded: may enqueue work that holds the stream (e.g. a host function that waits
  // for the test).
  std::function<void(void* stream)> before_record;
  // Called after DEVICE_DONE_PENDING was sent, before the sender waits for its copies: may block
  // (a stalled sender), and an error it returns is taken as a failure of the copies.
  std::function<absl::Status()> after_pending;
};
absl::StatusOr<std::unique_ptr<KvSender>> CreateCudaIpcKvSenderForTest(
    KvPoolLayout pool, DeviceKvTransportOptions options, CudaIpcSenderTestHooks hooks);

// Listens on host:port (0: ephemeral), exports `pool` (the receiving worker's cache on
// pool.device) and lets senders write `sink`'s reserved blocks. `sink` must outlive the
// receiver.
absl::StatusOr<std::unique_ptr<KvReceiver>> StartCudaIpcKvReceiver(
    const std::string& host, int port, KvSink* sink, KvPoolLayout pool,
    DeviceKvTransportOptions options = {});

}  // namespace pds::engine
