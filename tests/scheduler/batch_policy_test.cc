#include "scheduler/batch_policy.h"

#include <vector>

#include "gtest/gtest.h"

namespace pds::scheduler {
namespace {

BatchCandidate Waiting(int32_t pending, std::optional<double> deadline = std::nullopt) {
  BatchCandidate c;
  c.pending_tokens = pending;
  c.deadline_s = deadline;
  return c;
}

BatchCandidate Running(int32_t pending = 1) {
  BatchCandidate c;
  c.pending_tokens = pending;
  c.running = true;
  return c;
}

using Plan = std::vector<std::pair<size_t, int32_t>>;

Plan Flatten(const std::vector<PlannedChunk>& planned) {
  Plan out;
  for (const PlannedChunk& p : planned) out.emplace_back(p.index, p.chunk);
  return out;
}

TEST(BatchPolicyTest, FcfsChunksUnderTheTokenBudget) {
  auto policy = MakeFcfsBatchPolicy();
  EXPECT_EQ(policy->name(), "fcfs");
  const std::vector<BatchCandidate> c = {Waiting(100), Running(), Waiting(3000), Waiting(5)};
  EXPECT_EQ(Flatten(policy->Plan(c, {2048, 64})),
            (Plan{{0, 100}, {1, 1}, {2, 1947}}));  // the budget is spent: 3 is not reached
  EXPECT_EQ(Flatten(policy->Plan(c, {4000, 64})), (Plan{{0, 100}, {1, 1}, {2, 3000}, {3, 5}}));
}

TEST(BatchPolicyTest, FcfsStopsAtMaxRunningAndSkipsNothingPending) {
  auto policy = MakeFcfsBatchPolicy();
  const std::vector<BatchCandidate> c = {Running(), Waiting(0), Running(), Running()};
  EXPECT_EQ(Flatten(policy->Plan(c, {2048, 2})), (Plan{{0, 1}, {2, 1}}));
  EXPECT_TRUE(policy->Plan(c, {0, 64}).empty());
  EXPECT_TRUE(policy->Plan(c, {2048, 0}).empty());
  EXPECT_TRUE(policy->Plan({}, {2048, 64}).empty());
}

// Steps a FCFS engine with a fake clock (one step per tick) and checks each step's plan and
// the resulting states against a table: three prompts (5, 3, 4 tokens) that each generate 2
// tokens, under a budget of 4 tokens and 2 sequences.
TEST(BatchPolicyTest, FcfsStepByStepTable) {
  auto policy = MakeFcfsBatchPolicy();
  struct State {
    int32_t pending;
    bool running;
    int32_t generated;
  };
  std::vector<State> s = {{5, false, 0}, {3, false, 0}, {4, false, 0}};
  const std::vector<Plan> expected = {
      {{0, 4}},          // tick 0: the first prompt takes the whole budget
      {{0, 1}, {1, 3}},  // tick 1: its last token, then all of the second prompt
      {{0, 1}, {1, 1}},  // tick 2: two decodes; max_running 2 keeps the third waiting
      {{2, 4}},          // tick 3: both finished: the third prompt
      {{2, 1}},          // tick 4: its decode
  };
  for (size_t tick = 0; tick < expected.size(); ++tick) {
    std::vector<BatchCandidate> c;
    std::vector<size_t> ids;
    for (size_t i = 0; i < s.size(); ++i) {
      if (s[i].generated >= 2) continue;  // finished
      BatchCandidate b;
      b.pending_tokens = s[i].pending;
      b.running = s[i].running;
      c.push_back(b);
      ids.push_back(i);
    }
    Plan got;
    for (const PlannedChunk& p : policy->Plan(c, {4, 2})) {
      const size_t id = ids[p.index];
      got.emplace_back(id, p.chunk);
      s[id].running = true;
      s[id].pending -= p.chunk;
      if (s[id].pending == 0) {  // all computed: a token is sampled
        ++s[id].generated;
        s[id].pending = 1;
      }
    }
    EXPECT_EQ(got, expected[tick]) << "tick " << tick;
  }
  for (const State& st : s) EXPECT_EQ(st.generated, 2);
}

TEST(BatchPolicyTest, EdfRunsRunningFirstThenEarliestDeadline) {
  auto policy = MakeEdfBatchPolicy();
  EXPECT_EQ(policy->name(), "edf");
  const std::vector<BatchCandidate> c = {Waiting(10, 5.0), Waiting(10),      Running(),
                                         Waiting(10, 2.0), Waiting(10, 2.0), Running()};
  EXPECT_EQ(Flatten(policy->Plan(c, {2048, 64})),
            (Plan{{2, 1}, {5, 1}, {3, 10}, {4, 10}, {0, 10}, {1, 10}}));
  // The budget cuts the later ones, as FCFS would.
  EXPECT_EQ(Flatten(policy->Plan(c, {15, 64})), (Plan{{2, 1}, {5, 1}, {3, 10}, {4, 3}}));
  // Without deadlines it is FCFS for the waiting ones.
  const std::vector<BatchCandidate> plain = {Waiting(3), Running(), Waiting(4)};
  EXPECT_EQ(Flatten(policy->Plan(plain, {2048, 64})), (Plan{{1, 1}, {0, 3}, {2, 4}}));
}

BatchCandidate BestEffort(int32_t pending, std::optional<double> deadline = std::nullopt,
                          bool running = false) {
  BatchCandidate c = Waiting(pending, deadline);
  c.best_effort = true;
  c.running = running;
  return c;
}

TEST(BatchPolicyTest, WaitingBestEffortGoesAfterEveryOtherInBothPolicies) {
  // 0: best-effort waiting with the earliest deadline, 1: normal waiting, 2: running,
  // 3: best-effort already running (keeps its place), 4: normal waiting.
  const std::vector<BatchCandidate> c = {BestEffort(10, 1.0), Waiting(10, 5.0), Running(),
                                         BestEffort(1, 1.0, /*running=*/true), Waiting(10, 3.0)};
  EXPECT_EQ(Flatten(MakeFcfsBatchPolicy()->Plan(c, {2048, 64})),
            (Plan{{1, 10}, {2, 1}, {3, 1}, {4, 10}, {0, 10}}));
  EXPECT_EQ(Flatten(MakeEdfBatchPolicy()->Plan(c, {2048, 64})),
            (Plan{{2, 1}, {3, 1}, {4, 10}, {1, 10}, {0, 10}}));
  // With a tight budget the best-effort prefill is what waits.
  EXPECT_EQ(Flatten(MakeEdfBatchPolicy()->Plan(c, {22, 64})),
            (Plan{{2, 1}, {3, 1}, {4, 10}, {1, 10}}));
}

TEST(BatchPolicyTest, ByName) {
  ASSERT_TRUE(MakeBatchPolicy("fcfs").ok());
  ASSERT_TRUE(MakeBatchPolicy("edf").ok());
  auto bad = MakeBatchPolicy("lifo");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("lifo"), absl::string_view::npos);
}

}  // namespace
}  // namespace pds::scheduler
