#include "engine/kv_cache/block_allocator.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "engine/common/status_macros.h"

namespace pds::engine {

BlockAllocator::BlockAllocator(int32_t num_blocks) : ref_counts_(num_blocks, 0) {
  free_.reserve(num_blocks);
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
}

absl::StatusOr<std::vector<int32_t>> BlockAllocator::Allocate(int32_t n) {
  if (n < 0) return absl::InvalidArgumentError("cannot allocate a negative number of KV blocks");
  if (n > num_free()) {
    return absl::ResourceExhaustedError(absl::StrCat("KV cache full: ", n, " blocks requested, ",
                                                     num_free(), " of ", num_blocks(), " free"));
  }
  std::vector<int32_t> blocks(free_.end() - n, free_.end());
  free_.resize(free_.size() - n);
  std::reverse(blocks.begin(), blocks.end());
  for (int32_t b : blocks) ref_counts_[b] = 1;
  return blocks;
}

absl::Status BlockAllocator::Check(const std::vector<int32_t>& blocks, const char* op) const {
  for (int32_t b : blocks) {
    if (b < 0 || b >= num_blocks()) {
      return absl::FailedPreconditionError(absl::StrCat(op, ": block ", b, " out of range"));
    }
    if (ref_counts_[b] == 0) {
      return absl::FailedPreconditionError(absl::StrCat(op, ": block ", b, " is not allocated"));
    }
  }
  return absl::OkStatus();
}

absl::Status BlockAllocator::AddRef(const std::vector<int32_t>& blocks) {
  PDS_RETURN_IF_ERROR(Check(blocks, "AddRef"));
  for (int32_t b : blocks) ++ref_counts_[b];
  return absl::OkStatus();
}

absl::Status BlockAllocator::Free(const std::vector<int32_t>& blocks) {
  PDS_RETURN_IF_ERROR(Check(blocks, "Free"));
  // A block listed twice must hold enough references for both.
  std::vector<int32_t> sorted = blocks;
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 0; i < sorted.size();) {
    size_t j = i;
    while (j < sorted.size() && sorted[j] == sorted[i]) ++j;
    if (static_cast<int32_t>(j - i) > ref_counts_[sorted[i]]) {
      return absl::FailedPreconditionError(
          absl::StrCat("Free: block ", sorted[i], " released more often than it is referenced"));
    }
    i = j;
  }
  for (int32_t b : blocks) {
    if (--ref_counts_[b] == 0) free_.push_back(b);
  }
  return absl::OkStatus();
}

absl::Status BlockTable::Reserve(int32_t total_tokens, int32_t block_size,
                                 BlockAllocator& allocator) {
  const int32_t needed = BlocksFor(total_tokens, block_size) - static_cast<int32_t>(blocks_.size());
  if (needed <= 0) return absl::OkStatus();
  PDS_ASSIGN_OR_RETURN(std::vector<int32_t> more, allocator.Allocate(needed));
  blocks_.insert(blocks_.end(), more.begin(), more.end());
  return absl::OkStatus();
}

absl::Status BlockTable::Release(BlockAllocator& allocator) {
  absl::Status status = allocator.Free(blocks_);
  blocks_.clear();
  num_tokens_ = 0;
  return status;
}

}  // namespace pds::engine
