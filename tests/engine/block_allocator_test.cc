#include "engine/kv_cache/block_allocator.h"

#include <set>

#include "gtest/gtest.h"

namespace pds::engine {
namespace {

TEST(BlockAllocatorTest, AllocatesDistinctBlocksAndReturnsThemAll) {
  BlockAllocator allocator(10);
  auto a = allocator.Allocate(4);
  auto b = allocator.Allocate(6);
  ASSERT_TRUE(a.ok() && b.ok());
  std::set<int32_t> seen(a->begin(), a->end());
  seen.insert(b->begin(), b->end());
  EXPECT_EQ(seen.size(), 10u);
  EXPECT_EQ(allocator.num_free(), 0);
  ASSERT_TRUE(allocator.Free(*a).ok());
  ASSERT_TRUE(allocator.Free(*b).ok());
  EXPECT_EQ(allocator.num_free(), 10);
}

TEST(BlockAllocatorTest, ExhaustionIsAClearStatusAndAllOrNothing) {
  BlockAllocator allocator(5);
  ASSERT_TRUE(allocator.Allocate(3).ok());
  auto fail = allocator.Allocate(3);
  ASSERT_FALSE(fail.ok());
  EXPECT_EQ(fail.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(fail.status().message().find("2 of 5 free"), std::string::npos)
      << fail.status().message();
  EXPECT_EQ(allocator.num_free(), 2);
}

TEST(BlockAllocatorTest, ReferenceCountsKeepSharedBlocksAlive) {
  BlockAllocator allocator(4);
  auto a = allocator.Allocate(2);
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(allocator.AddRef(*a).ok());
  EXPECT_EQ(allocator.ref_count((*a)[0]), 2);
  ASSERT_TRUE(allocator.Free(*a).ok());
  EXPECT_EQ(allocator.num_free(), 2) << "still referenced once";
  ASSERT_TRUE(allocator.Free(*a).ok());
  EXPECT_EQ(allocator.num_free(), 4);
}

TEST(BlockAllocatorTest, DoubleFreeAndBadIdsAreRejectedWithoutDamage) {
  BlockAllocator allocator(4);
  auto a = allocator.Allocate(2);
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(allocator.Free(*a).ok());
  EXPECT_EQ(allocator.Free(*a).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(allocator.Free({7}).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(allocator.AddRef({-1}).code(), absl::StatusCode::kFailedPrecondition);
  auto b = allocator.Allocate(1);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(allocator.Free({(*b)[0], (*b)[0]}).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(allocator.num_free(), 3);
  EXPECT_EQ(allocator.Allocate(-1).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(BlockTableTest, GrowsBlockByBlockAndMapsSlots) {
  BlockAllocator allocator(8);
  BlockTable table;
  ASSERT_TRUE(table.Reserve(5, 4, allocator).ok());
  EXPECT_EQ(table.blocks().size(), 2u);
  ASSERT_TRUE(table.Reserve(8, 4, allocator).ok());
  EXPECT_EQ(table.blocks().size(), 2u);
  ASSERT_TRUE(table.Reserve(9, 4, allocator).ok());
  EXPECT_EQ(table.blocks().size(), 3u);
  EXPECT_EQ(table.Slot(5, 4), table.blocks()[1] * 4 + 1);
  EXPECT_EQ(table.Reserve(100, 4, allocator).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(table.blocks().size(), 3u);
  ASSERT_TRUE(table.Release(allocator).ok());
  EXPECT_EQ(allocator.num_free(), 8);
}

// Prefix caching: a sequence of `n` blocks of 4 tokens, its hashes and a table holding them.
struct CachedSeq {
  std::vector<int32_t> tokens;
  std::vector<uint64_t> hashes;
  std::vector<int32_t> blocks;
  std::vector<int32_t> chain;  // what Register returned per block
};

CachedSeq Fill(BlockAllocator& allocator, std::vector<int32_t> tokens) {
  CachedSeq s;
  s.tokens = std::move(tokens);
  BlockAllocator::ExtendPrefixHashes(s.tokens, 4, s.hashes);
  auto blocks = allocator.Allocate(static_cast<int32_t>(s.tokens.size() / 4));
  EXPECT_TRUE(blocks.ok()) << blocks.status();
  s.blocks = *blocks;
  for (int32_t i = 0; i < static_cast<int32_t>(s.blocks.size()); ++i) {
    s.chain.push_back(
        allocator.Register(s.blocks[i], i, s.tokens, s.hashes, i == 0 ? -1 : s.chain.back()));
  }
  return s;
}

std::vector<int32_t> Iota(int32_t n, int32_t from = 0) {
  std::vector<int32_t> v(n);
  for (int32_t i = 0; i < n; ++i) v[i] = from + i;
  return v;
}

TEST(PrefixCacheTest, HashesChainOverWholeBlocksOnly) {
  std::vector<uint64_t> a, b, c;
  BlockAllocator::ExtendPrefixHashes(Iota(11), 4, a);
  EXPECT_EQ(a.size(), 2u) << "the partial third block is not hashed";
  BlockAllocator::ExtendPrefixHashes(Iota(12), 4, a);
  EXPECT_EQ(a.size(), 3u) << "extends what is there";
  std::vector<int32_t> other = Iota(12);
  other[0] = 99;  // first block differs: every later hash differs too
  BlockAllocator::ExtendPrefixHashes(other, 4, b);
  for (int i = 0; i < 3; ++i) EXPECT_NE(a[i], b[i]) << i;
  BlockAllocator::ExtendPrefixHashes(Iota(12), 4, c);
  EXPECT_EQ(a, c);
}

TEST(PrefixCacheTest, ReleasedBlocksStayCachedAndCountAsFree) {
  BlockAllocator allocator(8);
  allocator.EnablePrefixCache(4);
  CachedSeq s = Fill(allocator, Iota(12));
  EXPECT_EQ(allocator.num_cached(), 3);
  EXPECT_EQ(allocator.MatchPrefix(s.tokens, s.hashes, 8), s.blocks);
  EXPECT_EQ(allocator.MatchPrefix(s.tokens, s.hashes, 2).size(), 2u) << "at most max_blocks";
  ASSERT_TRUE(allocator.Free(s.blocks).ok());
  EXPECT_EQ(allocator.num_free(), 8) << "cached blocks can be allocated";
  EXPECT_EQ(allocator.num_evictable(), 3);
  // Another sequence with the same first 8 tokens finds two blocks and takes them.
  std::vector<int32_t> tokens = Iota(12);
  tokens[9] = 77;
  std::vector<uint64_t> hashes;
  BlockAllocator::ExtendPrefixHashes(tokens, 4, hashes);
  std::vector<int32_t> hit = allocator.MatchPrefix(tokens, hashes, 8);
  ASSERT_EQ(hit, std::vector<int32_t>(s.blocks.begin(), s.blocks.begin() + 2));
  allocator.AcquireCached(hit);
  EXPECT_EQ(allocator.ref_count(hit[0]), 1);
  EXPECT_EQ(allocator.num_evictable(), 1);
  EXPECT_EQ(allocator.num_free(), 6);
  allocator.AcquireCached(hit);  // and a second sequence shares them
  EXPECT_EQ(allocator.ref_count(hit[1]), 2);
  ASSERT_TRUE(allocator.Free(hit).ok());
  ASSERT_TRUE(allocator.Free(hit).ok());
  EXPECT_EQ(allocator.num_evictable(), 3);
  EXPECT_EQ(allocator.Free(hit).code(), absl::StatusCode::kFailedPrecondition)
      << "a cached, unreferenced block is not allocated";
  EXPECT_EQ(allocator.AddRef(hit).code(), absl::StatusCode::kFailedPrecondition);
}

TEST(PrefixCacheTest, AllocationTakesUncachedBlocksFirstThenEvictsTailsFirst) {
  BlockAllocator allocator(6);
  allocator.EnablePrefixCache(4);
  CachedSeq s = Fill(allocator, Iota(12));
  ASSERT_TRUE(allocator.Free(s.blocks).ok());
  auto three = allocator.Allocate(3);
  ASSERT_TRUE(three.ok());
  EXPECT_EQ(allocator.num_evictions(), 0);
  EXPECT_EQ(allocator.MatchPrefix(s.tokens, s.hashes, 8).size(), 3u) << "nothing evicted";
  auto one = allocator.Allocate(1);
  ASSERT_TRUE(one.ok());
  EXPECT_EQ((*one)[0], s.blocks[2]) << "the sequence's last block goes first";
  EXPECT_EQ(allocator.num_evictions(), 1);
  EXPECT_EQ(allocator.MatchPrefix(s.tokens, s.hashes, 8).size(), 2u);
  EXPECT_EQ(allocator.num_cached(), 2);
  auto two = allocator.Allocate(2);
  ASSERT_TRUE(two.ok());
  EXPECT_TRUE(allocator.MatchPrefix(s.tokens, s.hashes, 8).empty());
  EXPECT_EQ(allocator.num_free(), 0);
  EXPECT_EQ(allocator.Allocate(1).status().code(), absl::StatusCode::kResourceExhausted);
}

TEST(PrefixCacheTest, LookupsCompareTokensAndTheBlockBefore) {
  BlockAllocator allocator(8);
  allocator.EnablePrefixCache(4);
  CachedSeq s = Fill(allocator, Iota(8));
  // The right hashes with other tokens (a hash collision, as far as the cache can tell).
  std::vector<int32_t> other = Iota(8, 50);
  EXPECT_TRUE(allocator.MatchPrefix(other, s.hashes, 8).empty());
  // The same second block's tokens after another first block, cached too. A lookup of `s`
  // whose second hash collides with that one's must not take it: its K/V followed other tokens.
  std::vector<int32_t> mixed = Iota(8);
  mixed[0] = 42;
  CachedSeq m = Fill(allocator, mixed);
  EXPECT_EQ(allocator.num_cached(), 4);
  std::vector<uint64_t> colliding = {s.hashes[0], m.hashes[1]};
  EXPECT_EQ(allocator.MatchPrefix(s.tokens, colliding, 8), std::vector<int32_t>({s.blocks[0]}));
  // A first block evicted and registered again (same tokens, new K/V): the second block,
  // registered under the first block's previous life, is not trusted.
  ASSERT_TRUE(allocator.Free({s.blocks[0]}).ok());  // released first: evicted first
  ASSERT_TRUE(allocator.Free({s.blocks[1]}).ok());
  auto all = allocator.Allocate(5);  // the 4 uncached, then the evictable list's head
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->back(), s.blocks[0]);
  EXPECT_EQ(allocator.num_cached(), 3) << "the second block is still cached";
  EXPECT_EQ(allocator.Register(s.blocks[0], 0, s.tokens, s.hashes, -1), s.blocks[0]);
  EXPECT_EQ(allocator.MatchPrefix(s.tokens, s.hashes, 8), std::vector<int32_t>({s.blocks[0]}));
}

TEST(PrefixCacheTest, RegistrationFollowsTheCachedChain) {
  BlockAllocator allocator(12);
  allocator.EnablePrefixCache(4);
  CachedSeq a = Fill(allocator, Iota(8));
  EXPECT_EQ(a.chain, a.blocks);
  // A copy computed at the same time: its first block is a's (nothing new registered), and
  // its further blocks chain on a's, so the longer sequence is found whole.
  std::vector<int32_t> longer = Iota(12);
  longer[9] = 70;
  CachedSeq b = Fill(allocator, longer);
  ASSERT_EQ(b.chain.size(), 3u);
  EXPECT_EQ(b.chain[0], a.blocks[0]);
  EXPECT_EQ(b.chain[1], a.blocks[1]);
  EXPECT_EQ(b.chain[2], b.blocks[2]);
  EXPECT_EQ(allocator.num_cached(), 3);
  EXPECT_EQ(allocator.MatchPrefix(b.tokens, b.hashes, 8),
            std::vector<int32_t>({a.blocks[0], a.blocks[1], b.blocks[2]}));
  ASSERT_TRUE(allocator.Free(b.blocks).ok());
  EXPECT_EQ(allocator.num_evictable(), 1) << "b's copies of a's blocks were never cached";
  // Registering again changes nothing; no parent past the first block, a parent that is not
  // cached, or an unreferenced block registers nothing.
  EXPECT_EQ(allocator.Register(a.blocks[0], 0, a.tokens, a.hashes, -1), a.blocks[0]);
  auto lone = allocator.Allocate(2);
  ASSERT_TRUE(lone.ok());
  std::vector<int32_t> t = Iota(8, 100);
  std::vector<uint64_t> h;
  BlockAllocator::ExtendPrefixHashes(t, 4, h);
  EXPECT_EQ(allocator.Register((*lone)[1], 1, t, h, -1), -1);
  EXPECT_EQ(allocator.Register((*lone)[1], 1, t, h, (*lone)[0]), -1);
  EXPECT_EQ(allocator.Register(b.blocks[2], 0, t, h, -1), -1) << "b's block is free";
  // The right hash after the wrong parent (a collision, or another chain) is no match.
  EXPECT_EQ(allocator.Register((*lone)[1], 1, a.tokens, a.hashes, b.blocks[2]), -1);
  EXPECT_EQ(allocator.num_cached(), 3);
  // Caching off: Register and MatchPrefix do nothing.
  BlockAllocator plain(4);
  EXPECT_EQ(plain.Register(0, 0, a.tokens, a.hashes, -1), -1);
  CachedSeq p = Fill(plain, Iota(8));
  EXPECT_EQ(p.chain, std::vector<int32_t>({-1, -1}));
  EXPECT_EQ(plain.num_cached(), 0);
  EXPECT_TRUE(plain.MatchPrefix(p.tokens, p.hashes, 8).empty());
  ASSERT_TRUE(plain.Free(p.blocks).ok());
  EXPECT_EQ(plain.num_free(), 4);
}

TEST(PrefixCacheTest, AParentEvictedAndReusedSinceIsNoParent) {
  // b's first block chained on a's (b computed the same tokens at the same time); a ends, its
  // first block is evicted and registered again for other tokens: b's second block, computed
  // after, must not chain on it.
  BlockAllocator allocator(6);
  allocator.EnablePrefixCache(4);
  CachedSeq a = Fill(allocator, Iota(8));
  std::vector<int32_t> bt = Iota(8);
  bt[6] = 90;
  std::vector<uint64_t> bh;
  BlockAllocator::ExtendPrefixHashes(bt, 4, bh);
  auto b = allocator.Allocate(2);
  ASSERT_TRUE(b.ok());
  const int32_t parent = allocator.Register((*b)[0], 0, bt, bh, -1);
  ASSERT_EQ(parent, a.blocks[0]);
  ASSERT_TRUE(allocator.Free(a.blocks).ok());
  auto taken = allocator.Allocate(4);  // 2 uncached, then a's second block and its first
  ASSERT_TRUE(taken.ok());
  ASSERT_EQ(taken->back(), a.blocks[0]);
  const std::vector<int32_t> other = Iota(4, 50);
  std::vector<uint64_t> oh;
  BlockAllocator::ExtendPrefixHashes(other, 4, oh);
  ASSERT_EQ(allocator.Register(a.blocks[0], 0, other, oh, -1), a.blocks[0]);
  EXPECT_EQ(allocator.Register((*b)[1], 1, bt, bh, parent), -1);
  EXPECT_TRUE(allocator.MatchPrefix(bt, bh, 8).empty());
}

}  // namespace
}  // namespace pds::engine
