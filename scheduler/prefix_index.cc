#include "scheduler/prefix_index.h"

namespace pds::scheduler {

void PrefixIndex::set_capacity(size_t capacity) {
  capacity_ = capacity;
  Trim();
}

int32_t PrefixIndex::Match(std::span<const uint64_t> hashes) const {
  int32_t n = 0;
  while (n < static_cast<int32_t>(hashes.size()) && map_.contains(hashes[n])) ++n;
  return n;
}

void PrefixIndex::Insert(std::span<const uint64_t> hashes) {
  for (auto it = hashes.rbegin(); it != hashes.rend(); ++it) {
    auto found = map_.find(*it);
    if (found != map_.end()) {
      lru_.splice(lru_.begin(), lru_, found->second);
    } else {
      lru_.push_front(*it);
      map_[*it] = lru_.begin();
    }
  }
  Trim();
}

void PrefixIndex::Clear() {
  lru_.clear();
  map_.clear();
}

void PrefixIndex::Trim() {
  while (map_.size() > capacity_) {
    map_.erase(lru_.back());
    lru_.pop_back();
  }
}

}  // namespace pds::scheduler
