#include "server/cpu_affinity.h"

#include <sched.h>

#include <thread>

#include "gtest/gtest.h"

namespace pds::server {
namespace {

TEST(CpuListTest, ParsesSinglesRangesAndMixes) {
  EXPECT_EQ(*ParseCpuList("3"), std::vector<int>({3}));
  EXPECT_EQ(*ParseCpuList("0-3"), std::vector<int>({0, 1, 2, 3}));
  EXPECT_EQ(*ParseCpuList("6,0-2,1,4-4"), std::vector<int>({0, 1, 2, 4, 6}));
}

TEST(CpuListTest, RejectsWhatIsNotAList) {
  for (const char* bad : {"", ",", "1,", "a", "-1", "3-1", "0-", "-", "1-2-3", "1024", "0x1"}) {
    const auto parsed = ParseCpuList(bad);
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument) << "'" << bad << "'";
  }
}

TEST(CpuListTest, FormatsCompactlyAndRoundTrips) {
  EXPECT_EQ(FormatCpuList({0, 1, 2, 3, 6, 8, 9}), "0-3,6,8-9");
  EXPECT_EQ(FormatCpuList({5}), "5");
  EXPECT_EQ(FormatCpuList({}), "");
  EXPECT_EQ(*ParseCpuList(FormatCpuList({0, 2, 3, 4, 7})), std::vector<int>({0, 2, 3, 4, 7}));
}

TEST(CpuListTest, PinsTheThreadAndItsChildren) {
  // In a thread of its own, so the test binary's main thread keeps its mask.
  std::thread([] {
    cpu_set_t before;
    ASSERT_EQ(sched_getaffinity(0, sizeof(before), &before), 0);
    int first = -1;
    for (int c = 0; c < CPU_SETSIZE && first < 0; ++c) {
      if (CPU_ISSET(c, &before)) first = c;
    }
    ASSERT_GE(first, 0);
    ASSERT_TRUE(PinToCpus(std::to_string(first)).ok());
    std::thread([first] {
      cpu_set_t now;
      ASSERT_EQ(sched_getaffinity(0, sizeof(now), &now), 0);
      EXPECT_EQ(CPU_COUNT(&now), 1);
      EXPECT_TRUE(CPU_ISSET(first, &now));
    }).join();
    // A CPU outside the mask is refused with a message naming it.
    const absl::Status refused = PinToCpus("1023");
    EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(refused.message().find("1023"), std::string::npos);
  }).join();
}

}  // namespace
}  // namespace pds::server
