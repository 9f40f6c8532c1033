// Fixed-size KV block allocator with reference counts and an optional prefix cache (host
// logic only; the memory lives in KvCache). Not thread-safe: its owner serializes access.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"

namespace pds::engine {

class BlockAllocator {
 public:
  explicit BlockAllocator(int32_t num_blocks);

  int32_t num_blocks() const { return static_cast<int32_t>(ref_counts_.size()); }
  // Blocks an allocation can take: unreferenced ones, cached or not.
  int32_t num_free() const { return static_cast<int32_t>(free_.size()) + num_evictable_; }
  // Free blocks that hold no cached K/V (allocating them evicts nothing).
  int32_t num_uncached_free() const { return static_cast<int32_t>(free_.size()); }
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

  // Prefix caching (off until enabled). A block all of whose `block_size` positions hold
  // computed K/V can be registered as block `i` of a token sequence: it is then found by any
  // sequence with the same tokens up to the block's end. An unreferenced registered block
  // stays cached (and counts as free) until an allocation that finds no uncached free block
  // takes it, least recently released first. Lookups compare the tokens themselves and the
  // identity of the block before: a hash collision is a miss, never wrong K/V.
  void EnablePrefixCache(int32_t block_size);
  bool prefix_cache_enabled() const { return cache_block_size_ > 0; }
  // Appends to `hashes` the chained hashes of the whole blocks of `tokens` not yet hashed (the
  // hash of block i covers tokens [0, (i + 1) * block_size)).
  static void ExtendPrefixHashes(std::span<const int32_t> tokens, int32_t block_size,
                                 std::vector<uint64_t>& hashes);
  // The cached blocks holding the longest prefix of `tokens` in whole blocks, at most
  // `max_blocks` (`hashes`: ExtendPrefixHashes of `tokens`, possibly fewer). Takes nothing.
  std::vector<int32_t> MatchPrefix(std::span<const int32_t> tokens,
                                   std::span<const uint64_t> hashes, int32_t max_blocks) const;
  // Takes a reference to each of `blocks`, which MatchPrefix has just returned (cached ones
  // that no one references leave the evictable list).
  void AcquireCached(const std::vector<int32_t>& blocks);
  // Registers `block`, which holds block `index` of `tokens` (its positions computed; `hashes`:
  // ExtendPrefixHashes of `tokens`, covering `index`), after `parent`: the cached block of the
  // tokens before it, as this call returned for block `index - 1` (-1 for the first block),
  // which must still be cached with those tokens. Returns the cached block that holds these
  // tokens after `parent` now, to pass as the next block's `parent`: `block`, or an equal block
  // registered before (another sequence computed the same tokens), or -1 when there is none
  // (caching off, no parent past the first block, a parent since evicted or reused, an
  // unreferenced `block`, or another block under the same hash: a collision).
  int32_t Register(int32_t block, int32_t index, std::span<const int32_t> tokens,
                   std::span<const uint64_t> hashes, int32_t parent);
  // Registers the whole blocks of a sequence's computed positions from position `from` on
  // (`computed`: its tokens whose K/V are written; `table`: its blocks; `hashes`: extended
  // here; `chain`: per block, what Register returned, cut back to the block of `from` and
  // extended). Nothing when caching is off.
  void RegisterComputed(std::span<const int32_t> table, std::span<const int32_t> computed,
                        int32_t from, std::vector<uint64_t>& hashes, std::vector<int32_t>& chain);
  int32_t num_cached() const { return static_cast<int32_t>(by_hash_.size()); }
  int32_t num_evictable() const { return num_evictable_; }
  int64_t num_evictions() const { return num_evictions_; }

 private:
  absl::Status Check(const std::vector<int32_t>& blocks, const char* op) const;
  // The evictable list (unreferenced registered blocks, least recently released at the head).
  void PushEvictable(int32_t block);
  void RemoveEvictable(int32_t block);
  void Unregister(int32_t block);
  bool IsRegistered(int32_t block) const { return !registered_.empty() && registered_[block]; }
  bool IsEvictable(int32_t block) const { return prev_[block] >= 0 || head_ == block; }

  std::vector<int32_t> ref_counts_;
  std::vector<int32_t> free_;  // uncached; a stack, low ids are handed out first

  int32_t cache_block_size_ = 0;  // > 0: prefix caching on
  absl::flat_hash_map<uint64_t, int32_t> by_hash_;
  // Per block: registered, its hash, its tokens, the block registered before it in its chain
  // (-1 for a first block) and that block's registration count then; `generation_` counts a
  // block's registrations, so a chain whose earlier block was evicted and reused is not found.
  std::vector<uint8_t> registered_;
  std::vector<uint64_t> hash_;
  std::vector<int32_t> tokens_;  // num_blocks x block_size
  std::vector<int32_t> parent_;
  std::vector<uint64_t> parent_generation_;
  std::vector<uint64_t> generation_;
  std::vector<int32_t> prev_, next_;  // the evictable list, -1 terminated
  int32_t head_ = -1, tail_ = -1;
  int32_t num_evictable_ = 0;
  int64_t num_evictions_ = 0;
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
  // Starts an empty table with `blocks`, whose references the caller has taken (a cached
  // prefix: BlockAllocator::AcquireCached), holding `num_tokens` positions.
  void Adopt(std::vector<int32_t> blocks, int32_t num_tokens) {
    blocks_ = std::move(blocks);
    num_tokens_ = num_tokens;
  }
  void set_num_tokens(int32_t n) { num_tokens_ = n; }
  // Cache slot of position `pos`.
  int32_t Slot(int32_t pos, int32_t block_size) const {
    return blocks_[pos / block_size] * block_size + pos % block_size;
  }
  // Returns the blocks past the first `keep` to `allocator` (none when it holds no more); they
  // must hold none of its num_tokens() positions.
  absl::Status Shrink(int32_t keep, BlockAllocator& allocator);
  // Returns every block to `allocator` and empties the table.
  absl::Status Release(BlockAllocator& allocator);

 private:
  std::vector<int32_t> blocks_;
  int32_t num_tokens_ = 0;
};

}  // namespace pds::engine
