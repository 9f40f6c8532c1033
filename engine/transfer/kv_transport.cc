#include "engine/transfer/kv_transport.h"

#include "absl/strings/str_cat.h"

namespace pds::engine {
namespace {

// A worker-call id: the client's (at most 256 bytes) and the front-end's suffix (at most 96).
constexpr size_t kMaxRequestIdBytes = 352;
constexpr int32_t kMaxLayers = 1024;
constexpr int32_t kMaxBlocks = 1 << 20;
constexpr uint64_t kMaxLayerBytes = uint64_t{1} << 30;

absl::Status Positive(const char* name, int32_t value) {
  if (value > 0) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("kv transfer header: ", name, " is ", value, ", must be positive"));
}

}  // namespace

absl::Status KvTransferHeader::Validate() const {
  if (request_id.empty()) {
    return absl::InvalidArgumentError("kv transfer header: request_id is empty");
  }
  if (request_id.size() > kMaxRequestIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat("kv transfer header: request_id of ",
                                                   request_id.size(), " bytes exceeds ",
                                                   kMaxRequestIdBytes));
  }
  const auto context = [&] { return absl::StrCat(" (request '", request_id, "')"); };
  for (const auto& [name, value] : {std::pair<const char*, int32_t>{"num_tokens", num_tokens},
                                    {"num_layers", num_layers},
                                    {"num_blocks", num_blocks},
                                    {"kv_heads", kv_heads},
                                    {"block_size", block_size},
                                    {"head_dim", head_dim}}) {
    absl::Status status = Positive(name, value);
    if (!status.ok()) return absl::InvalidArgumentError(absl::StrCat(status.message(), context()));
  }
  if (static_cast<int>(dtype) > static_cast<int>(DType::kBF16)) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv transfer header: unknown dtype ", static_cast<int>(dtype), context()));
  }
  if (next_token < kNextTokenAtEnd) {
    return absl::InvalidArgumentError(absl::StrCat("kv transfer header: next_token ", next_token,
                                                   " (-1 for none, ", kNextTokenAtEnd,
                                                   " for one sent at the end)", context()));
  }
  if (num_layers > kMaxLayers) {
    return absl::InvalidArgumentError(absl::StrCat("kv transfer header: num_layers ", num_layers,
                                                   " exceeds ", kMaxLayers, context()));
  }
  if (num_blocks > kMaxBlocks) {
    return absl::InvalidArgumentError(absl::StrCat("kv transfer header: num_blocks ", num_blocks,
                                                   " exceeds ", kMaxBlocks, context()));
  }
  // The blocks must hold the tokens.
  if (static_cast<int64_t>(num_tokens) > static_cast<int64_t>(num_blocks) * block_size) {
    return absl::InvalidArgumentError(absl::StrCat("kv transfer header: ", num_tokens,
                                                   " tokens do not fit in ", num_blocks,
                                                   " blocks of ", block_size, context()));
  }
  // Every factor is positive and below 2^31, so the product of the first two fits in 62 bits;
  // check each further multiplication against the limit before doing it.
  uint64_t bytes = static_cast<uint64_t>(kv_heads) * static_cast<uint64_t>(block_size);
  for (uint64_t factor : {static_cast<uint64_t>(head_dim), static_cast<uint64_t>(DTypeSize(dtype)),
                          uint64_t{2}, static_cast<uint64_t>(num_blocks)}) {
    if (bytes > kMaxLayerBytes || factor > kMaxLayerBytes / bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("kv transfer header: a layer of ", num_blocks, " blocks x ", kv_heads,
                       " kv heads x ", block_size, " tokens x ", head_dim, " x ", DTypeName(dtype),
                       " (K and V) exceeds 1 GiB", context()));
    }
    bytes *= factor;
  }
  return absl::OkStatus();
}

absl::Status KvTransferHeader::CheckHeld(int32_t held_blocks) const {
  if (held_blocks < 0 || held_blocks >= num_blocks ||
      static_cast<int64_t>(held_blocks) * block_size >= num_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("request '", request_id, "': the receiver holds ", held_blocks, " of its ",
                     num_blocks, " blocks (", num_tokens, " tokens, blocks of ", block_size,
                     "); at least the block of the last position must move"));
  }
  return absl::OkStatus();
}

KvTransferHeader KvTransferHeader::Moved(int32_t held_blocks) const {
  KvTransferHeader moved = *this;
  moved.num_blocks -= held_blocks;
  moved.num_tokens -= held_blocks * block_size;
  return moved;
}

absl::Status KvPoolLayout::Validate() const {
  if (num_layers <= 0 || num_blocks <= 0 || block_bytes == 0) {
    return absl::InvalidArgumentError(absl::StrCat("kv pool layout: ", num_layers, " layers, ",
                                                   num_blocks, " blocks of ", block_bytes,
                                                   " bytes; all must be positive"));
  }
  if (data == nullptr) return absl::InvalidArgumentError("kv pool layout: no memory");
  if (pool_bytes / block_bytes < static_cast<size_t>(num_blocks)) {
    return absl::InvalidArgumentError(absl::StrCat("kv pool layout: ", num_blocks, " blocks of ",
                                                   block_bytes, " bytes exceed a pool of ",
                                                   pool_bytes));
  }
  if (bytes / pool_bytes < 2 * static_cast<size_t>(num_layers)) {
    return absl::InvalidArgumentError(absl::StrCat("kv pool layout: ", 2 * num_layers, " pools of ",
                                                   pool_bytes, " bytes exceed the allocation of ",
                                                   bytes));
  }
  return absl::OkStatus();
}

absl::Status KvPoolLayout::Check(const KvTransferHeader& header,
                                 const std::vector<int32_t>& blocks) const {
  if (header.num_layers != num_layers || header.BlockBytes() != block_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("request '", header.request_id, "': ", header.num_layers, " layers of ",
                     header.BlockBytes(), "-byte blocks do not match the pool's ", num_layers,
                     " layers of ", block_bytes, "-byte blocks"));
  }
  if (static_cast<int32_t>(blocks.size()) != header.num_blocks) {
    return absl::InvalidArgumentError(absl::StrCat("request '", header.request_id,
                                                   "': ", blocks.size(),
                                                   " blocks, the header says ", header.num_blocks));
  }
  for (int32_t block : blocks) {
    if (block < 0 || block >= num_blocks) {
      return absl::InvalidArgumentError(absl::StrCat("request '", header.request_id, "': block ",
                                                     block, " outside the pool of ", num_blocks));
    }
  }
  return absl::OkStatus();
}

}  // namespace pds::engine
