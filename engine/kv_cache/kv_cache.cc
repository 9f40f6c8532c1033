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
  const size_t bytes = shape.BlockBytes(backend.compute_dtype()) * shape.num_blocks;
  for (int l = 0; l < shape.num_layers; ++l) {
    PDS_ASSIGN_OR_RETURN(DeviceBuffer k,
                         backend.Allocate(bytes, absl::StrCat("K cache layer ", l)));
    PDS_ASSIGN_OR_RETURN(DeviceBuffer v,
                         backend.Allocate(bytes, absl::StrCat("V cache layer ", l)));
    // Never read uninitialized memory, even from blocks no sequence has written yet.
    PDS_RETURN_IF_ERROR(backend.Zero(k.data(), bytes));
    PDS_RETURN_IF_ERROR(backend.Zero(v.data(), bytes));
    cache.k_.push_back(std::move(k));
    cache.v_.push_back(std::move(v));
  }
  cache.allocator_ = BlockAllocator(shape.num_blocks);
  return cache;
}

}  // namespace pds::engine
