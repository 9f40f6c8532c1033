#include "engine/kv_cache/kv_cache.h"

#include "absl/strings/str_cat.h"
#include "engine/common/status_macros.h"

namespace pds::engine {

absl::StatusOr<KvCache> KvCache::Create(Backend& backend, const KvCacheShape& shape) {
  if (shape.num_layers <= 0 || shape.num_blocks <= 0 || shape.block_size <= 0 ||
      shape.kv_heads <= 0 || shape.head_dim <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("invalid KV cache shape: layers ",
                                                   shape.num_layers, ", blocks ", shape.num_blocks,
                                                   ", block size ", shape.block_size, ", kv heads ",
                                                   shape.kv_heads, ", head dim ", shape.head_dim));
  }
  KvCache cache;
  cache.shape_ = shape;
  cache.pool_bytes_ = shape.BlockBytes(backend.compute_dtype()) * shape.num_blocks;
  const size_t total = 2 * static_cast<size_t>(shape.num_layers) * cache.pool_bytes_;
  PDS_ASSIGN_OR_RETURN(
      cache.memory_,
      backend.Allocate(total, absl::StrCat("KV cache (", shape.num_layers, " layers, ",
                                           shape.num_blocks, " blocks)")));
  // Never read uninitialized memory, even from blocks no sequence has written yet.
  PDS_RETURN_IF_ERROR(backend.Zero(cache.memory_.data(), total));
  // Done before any other stream (a KV transfer's host copies) writes into the pools.
  PDS_RETURN_IF_ERROR(backend.Synchronize());
  cache.allocator_ = BlockAllocator(shape.num_blocks);
  return cache;
}

}  // namespace pds::engine
