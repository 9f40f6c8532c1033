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
  // Uncached free blocks first, then the least recently released cached ones.
  const int32_t plain = std::min<int32_t>(n, static_cast<int32_t>(free_.size()));
  std::vector<int32_t> blocks(free_.end() - plain, free_.end());
  free_.resize(free_.size() - plain);
  std::reverse(blocks.begin(), blocks.end());
  while (static_cast<int32_t>(blocks.size()) < n) {
    const int32_t b = head_;
    RemoveEvictable(b);
    Unregister(b);
    ++num_evictions_;
    blocks.push_back(b);
  }
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
    if (--ref_counts_[b] == 0 && !IsRegistered(b)) free_.push_back(b);
  }
  // Cached blocks are released last block first, so a sequence's later blocks are evicted
  // before the prefix they extend.
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
    if (ref_counts_[*it] == 0 && IsRegistered(*it) && !IsEvictable(*it)) PushEvictable(*it);
  }
  return absl::OkStatus();
}

void BlockAllocator::EnablePrefixCache(int32_t block_size) {
  if (block_size <= 0 || cache_block_size_ > 0) return;
  const size_t n = ref_counts_.size();
  cache_block_size_ = block_size;
  registered_.assign(n, 0);
  hash_.assign(n, 0);
  tokens_.assign(n * static_cast<size_t>(block_size), 0);
  parent_.assign(n, -1);
  parent_generation_.assign(n, 0);
  generation_.assign(n, 0);
  prev_.assign(n, -1);
  next_.assign(n, -1);
}

void BlockAllocator::PushEvictable(int32_t block) {
  prev_[block] = tail_;
  next_[block] = -1;
  if (tail_ >= 0) next_[tail_] = block;
  tail_ = block;
  if (head_ < 0) head_ = block;
  ++num_evictable_;
}

void BlockAllocator::RemoveEvictable(int32_t block) {
  if (prev_[block] >= 0) next_[prev_[block]] = next_[block];
  if (next_[block] >= 0) prev_[next_[block]] = prev_[block];
  if (head_ == block) head_ = next_[block];
  if (tail_ == block) tail_ = prev_[block];
  prev_[block] = next_[block] = -1;
  --num_evictable_;
}

void BlockAllocator::Unregister(int32_t block) {
  if (registered_[block] == 0) return;
  auto it = by_hash_.find(hash_[block]);
  if (it != by_hash_.end() && it->second == block) by_hash_.erase(it);
  registered_[block] = 0;
}

namespace {

uint64_t Mix(uint64_t x) {  // splitmix64's finalizer
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

void BlockAllocator::ExtendPrefixHashes(std::span<const int32_t> tokens, int32_t block_size,
                                        std::vector<uint64_t>& hashes) {
  const size_t whole = tokens.size() / static_cast<size_t>(block_size);
  for (size_t i = hashes.size(); i < whole; ++i) {
    uint64_t h = Mix((i == 0 ? 0x9e3779b97f4a7c15ull : hashes[i - 1]) + block_size);
    const int32_t* t = tokens.data() + i * static_cast<size_t>(block_size);
    for (int32_t j = 0; j < block_size; ++j) h = Mix(h ^ static_cast<uint32_t>(t[j]));
    hashes.push_back(h);
  }
}

std::vector<int32_t> BlockAllocator::MatchPrefix(std::span<const int32_t> tokens,
                                                 std::span<const uint64_t> hashes,
                                                 int32_t max_blocks) const {
  std::vector<int32_t> match;
  if (!prefix_cache_enabled()) return match;
  const size_t bs = static_cast<size_t>(cache_block_size_);
  const size_t limit =
      std::min({static_cast<size_t>(std::max(max_blocks, 0)), hashes.size(), tokens.size() / bs});
  for (size_t i = 0; i < limit; ++i) {
    auto it = by_hash_.find(hashes[i]);
    if (it == by_hash_.end()) break;
    const int32_t b = it->second;
    if (!std::equal(tokens.begin() + i * bs, tokens.begin() + (i + 1) * bs,
                    tokens_.begin() + b * bs)) {
      break;
    }
    const bool chained =
        i == 0 ? parent_[b] == -1
               : parent_[b] == match.back() && parent_generation_[b] == generation_[match.back()];
    if (!chained) break;
    match.push_back(b);
  }
  return match;
}

void BlockAllocator::AcquireCached(const std::vector<int32_t>& blocks) {
  for (int32_t b : blocks) {
    if (ref_counts_[b]++ == 0) RemoveEvictable(b);
  }
}

int32_t BlockAllocator::Register(int32_t block, int32_t index, std::span<const int32_t> tokens,
                                 std::span<const uint64_t> hashes, int32_t parent) {
  const size_t bs = static_cast<size_t>(cache_block_size_);
  if (!prefix_cache_enabled() || block < 0 || block >= num_blocks() || index < 0 ||
      static_cast<size_t>(index) >= hashes.size() ||
      tokens.size() < (static_cast<size_t>(index) + 1) * bs || (index == 0) != (parent < 0)) {
    return -1;
  }
  if (parent >= 0) {
    // Still the cached block of the tokens before (not evicted, or reused for others since).
    const std::span<const int32_t> before = tokens.subspan((index - 1) * bs, bs);
    if (parent >= num_blocks() || registered_[parent] == 0 || hash_[parent] != hashes[index - 1] ||
        !std::equal(before.begin(), before.end(), tokens_.begin() + parent * bs)) {
      return -1;
    }
  }
  const uint64_t hash = hashes[index];
  const std::span<const int32_t> own = tokens.subspan(index * bs, bs);
  if (auto it = by_hash_.find(hash); it != by_hash_.end()) {
    const int32_t b = it->second;
    const bool same = std::equal(own.begin(), own.end(), tokens_.begin() + b * bs) &&
                      parent_[b] == parent &&
                      (parent < 0 || parent_generation_[b] == generation_[parent]);
    return same ? b : -1;
  }
  if (registered_[block] != 0 || ref_counts_[block] == 0) return -1;
  registered_[block] = 1;
  hash_[block] = hash;
  std::copy(own.begin(), own.end(), tokens_.begin() + block * bs);
  parent_[block] = parent;
  parent_generation_[block] = parent >= 0 ? generation_[parent] : 0;
  ++generation_[block];
  by_hash_[hash] = block;
  return block;
}

void BlockAllocator::RegisterComputed(std::span<const int32_t> table,
                                      std::span<const int32_t> computed, int32_t from,
                                      std::vector<uint64_t>& hashes, std::vector<int32_t>& chain) {
  if (!prefix_cache_enabled()) return;
  const int32_t bs = cache_block_size_;
  ExtendPrefixHashes(computed, bs, hashes);
  const int32_t first = from / bs;
  chain.resize(first, -1);
  const int32_t whole =
      std::min(static_cast<int32_t>(computed.size()) / bs, static_cast<int32_t>(table.size()));
  for (int32_t i = first; i < whole; ++i) {
    const int32_t parent = i == 0 ? -1 : chain[i - 1];
    chain.push_back(Register(table[i], i, computed, hashes, parent));
  }
}

absl::Status BlockTable::Reserve(int32_t total_tokens, int32_t block_size,
                                 BlockAllocator& allocator) {
  const int32_t needed = BlocksFor(total_tokens, block_size) - static_cast<int32_t>(blocks_.size());
  if (needed <= 0) return absl::OkStatus();
  PDS_ASSIGN_OR_RETURN(std::vector<int32_t> more, allocator.Allocate(needed));
  blocks_.insert(blocks_.end(), more.begin(), more.end());
  return absl::OkStatus();
}

absl::Status BlockTable::Shrink(int32_t keep, BlockAllocator& allocator) {
  if (keep < 0 || keep >= static_cast<int32_t>(blocks_.size())) return absl::OkStatus();
  const std::vector<int32_t> extra(blocks_.begin() + keep, blocks_.end());
  blocks_.resize(static_cast<size_t>(keep));
  return allocator.Free(extra);
}

absl::Status BlockTable::Release(BlockAllocator& allocator) {
  absl::Status status = allocator.Free(blocks_);
  blocks_.clear();
  num_tokens_ = 0;
  return status;
}

}  // namespace pds::engine
