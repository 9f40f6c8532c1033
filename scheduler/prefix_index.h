// What a front-end knows of a worker's prefix cache: the block hashes of the prompts it sent
// there, least recently sent first out, bounded by the worker's cache size. An estimate (the
// worker may have evicted blocks since, or lost them in a restart): dispatch policies use it
// to prefer the instance that probably holds a request's prefix. Pure logic; the hashes are
// the engine's chained block hashes (engine::BlockAllocator::ExtendPrefixHashes).
#pragma once

#include <cstdint>
#include <list>
#include <span>

#include "absl/container/flat_hash_map.h"

namespace pds::scheduler {

class PrefixIndex {
 public:
  // At most `capacity` hashes are kept (0: none).
  void set_capacity(size_t capacity);
  size_t size() const { return map_.size(); }
  // How many of `hashes`, from the first, are present.
  int32_t Match(std::span<const uint64_t> hashes) const;
  // Adds (or refreshes) `hashes`; a prompt's first blocks become the most recent, so its later
  // blocks leave first, as the worker evicts them.
  void Insert(std::span<const uint64_t> hashes);
  void Clear();

 private:
  void Trim();
  size_t capacity_ = 0;
  std::list<uint64_t> lru_;  // most recent first
  absl::flat_hash_map<uint64_t, std::list<uint64_t>::iterator> map_;
};

}  // namespace pds::scheduler
