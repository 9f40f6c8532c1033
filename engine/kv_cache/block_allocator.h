// Fixed-size KV block allocator with reference counts (host logic only; the memory lives
// in KvCache). Not thread-safe: its owner serializes access.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace pds::engine {

class BlockAllocator {
 public:
  explicit BlockAllocator(int32_t num_blocks);

  int32_t num_blocks() const { return static_cast<int32_t>(ref_counts_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t num_used() const { return num_blocks() - num_free(); }

  // Allocates `n` blocks with reference count 1, all or nothing. RESOURCE_EXHAUSTED when
  // fewer than `n` blocks are free.
  absl::StatusOr<std::vector<int32_t>> Allocate(int32_t n);
  // Adds a reference to each block (prefix sharing). FAILED_PRECONDITION on a free block.
  absl::Status AddRef(const std::vector<int32_t>& blocks);
  // Drops one reference to each block; blocks reaching zero become free.
  // FAILED_PRECONDITION on a block that is already free or out of range (nothing changes).
  absl::Status Free(const std::vector<int32_t>& blocks);
  int32_t ref_count(int32_t block) const { return ref_counts_.at(block); }

 private:
  absl::Status Check(const std::vector<int32_t>& blocks, const char* op) const;
  std::vector<int32_t> ref_counts_;
  std::vector<int32_t> free_;  // a stack; low ids are handed out first
};

// The blocks of one sequence and how many token positions they hold.
class BlockTable {
 public:
  const std::vector<int32_t>& blocks() const { return blocks_; }
  int32_t num_tokens() const { return num_tokens_; }
  // Blocks needed in all to hold `total_tokens` positions.
  static int32_t BlocksFor(int32_t total_tokens, int32_t block_size) {
    return (total_tokens + block_size - 1) / block_size;
  }
  // Grows the table (allocating from `allocator`) so that it can hold `total_tokens`.
  absl::Status Reserve(int32_t total_tokens, int32_t block_size, BlockAllocator& allocator);
  void set_num_tokens(int32_t n) { num_tokens_ = n; }
  // Cache slot of position `pos`.
  int32_t Slot(int32_t pos, int32_t block_size) const {
    return blocks_[pos / block_size] * block_size + pos % block_size;
  }
  // Returns every block to `allocator` and empties the table.
  absl::Status Release(BlockAllocator& allocator);

 private:
  std::vector<int32_t> blocks_;
  int32_t num_tokens_ = 0;
};

}  // namespace pds::engine
