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

}  // namespace
}  // namespace pds::engine
