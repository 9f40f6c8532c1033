// The paged KV cache memory of one worker: per layer a K pool and a V pool in backend memory,
// each [num_blocks, kv_heads, block_size, head_dim] in the backend's compute dtype, plus the
// block allocator that hands those blocks out. All pools live in one allocation (layer l's K
// at 2 l * PoolBytes, its V right after), so a GPU worker exports its whole cache to a peer
// process with one IPC handle.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend/backend.h"
#include "engine/kv_cache/block_allocator.h"

namespace pds::engine {

struct KvCacheShape {
  int32_t num_layers = 0;
  int32_t num_blocks = 0;
  int32_t block_size = 16;
  int32_t kv_heads = 0;
  int32_t head_dim = 0;
  // Bytes of one block of one layer, K or V alone.
  size_t BlockBytes(DType dtype) const {
    return static_cast<size_t>(kv_heads) * block_size * head_dim * DTypeSize(dtype);
  }
};

class KvCache {
 public:
  static absl::StatusOr<KvCache> Create(Backend& backend, const KvCacheShape& shape);

  const KvCacheShape& shape() const { return shape_; }
  int32_t block_size() const { return shape_.block_size; }
  void* k(int layer) const { return base() + (2 * static_cast<size_t>(layer)) * pool_bytes_; }
  void* v(int layer) const { return base() + (2 * static_cast<size_t>(layer) + 1) * pool_bytes_; }
  // The one allocation holding every pool, and the bytes of one layer's K (or V) pool.
  void* data() const { return memory_.data(); }
  size_t bytes() const { return memory_.bytes(); }
  size_t pool_bytes() const { return pool_bytes_; }
  BlockAllocator& allocator() { return allocator_; }
  const BlockAllocator& allocator() const { return allocator_; }

 private:
  uint8_t* base() const { return static_cast<uint8_t*>(memory_.data()); }

  KvCacheShape shape_;
  DeviceBuffer memory_;
  size_t pool_bytes_ = 0;
  BlockAllocator allocator_{0};
};

}  // namespace pds::engine
