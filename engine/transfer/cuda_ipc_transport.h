// The CUDA IPC KV transport (kv_transport.h) for GPU workers on one node, including two
// processes on one GPU: the device control protocol of device_transport.h, with the sender
// copying each layer's K/V straight into the receiver's reserved blocks.
//
//   - The receiver exports its whole KV cache (one allocation, KvPoolLayout) once with
//     cudaIpcGetMemHandle and returns the handle and the pool's geometry in every offer reply,
//     with the reserved block ids. The offer carries the sender's host name; a receiver on
//     another host refuses (FAILED_PRECONDITION: use nccl).
//   - The sender opens each receiver's handle once (cached by receiver address + handle; a new
//     handle from the same address, a restarted receiver, replaces the old mapping), and per
//     layer enqueues device-to-device cudaMemcpyAsync copies on its own copy stream, one per run
//     of blocks consecutive on both sides, K then V, after source.WaitLayer(layer).
//   - Completion: the sender waits for its copy stream (cudaStreamQuery polled against the
//     deadline) before it sends DONE, so the receiver may use the blocks as soon as DONE
//     arrives. This is chosen over an interprocess event (cudaIpcGetEventHandle) because the
//     sender must know the copies are done anyway before it frees its own blocks, and because an
//     event would make the decode engine's compute stream wait on another process's event
//     (cudaStreamWaitEvent inside the engine loop) for no gain: the DONE round trip is
//     microseconds next to the copies. Once copies are enqueued the sender always waits for
//     them (up to the deadline plus a grace period) before reporting, so that a failed transfer
//     never writes into blocks the receiver has already freed.
//
// Requirements: the receiver's pool must be a cudaMalloc allocation whose base is
// KvPoolLayout::data (cudaIpcGetMemHandle does not export cudaMallocAsync pool memory, and the
// opened pointer is the allocation's base); the sender's device must be able to reach the
// receiver's (the same GPU, or peer access between the two).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/transfer/device_transport.h"
#include "engine/transfer/kv_transport.h"

namespace pds::engine {

// `pool` is the sending worker's KV cache (sources' Blocks() index it), on pool.device.
absl::StatusOr<std::unique_ptr<KvSender>> CreateCudaIpcKvSender(
    KvPoolLayout pool, DeviceKvTransportOptions options = {});

// Listens on host:port (0: ephemeral), exports `pool` (the receiving worker's cache on
// pool.device) and lets senders write `sink`'s reserved blocks. `sink` must outlive the
// receiver.
absl::StatusOr<std::unique_ptr<KvReceiver>> StartCudaIpcKvReceiver(
    const std::string& host, int port, KvSink* sink, KvPoolLayout pool,
    DeviceKvTransportOptions options = {});

}  // namespace pds::engine
