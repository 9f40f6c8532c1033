// End-to-end tests of the serving path: `pdserve up` starts real processes on 127.0.0.1 with
// ephemeral ports; the tests talk to the public API and compare with offline generation.

#include <sched.h>
#include <signal.h>
#include <sys/wait.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <future>
#include <limits>
#include <map>
#include <memory>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/backend/cpu_backend.h"
#include "engine/model/transformer.h"
#include "engine/runtime/llm_engine.h"
#include "engine/tokenizer/tokenizer.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "pdserve/internal/control.grpc.pb.h"
#include "pdserve/v1/serving.grpc.pb.h"
#include "tests/testing/local_cluster.h"
#include "tests/testing/test_util.h"

namespace pds {
namespace {

namespace api = ::pdserve::v1;

// A local cluster and a stub of its public API.
class LocalCluster {
 public:
  static std::unique_ptr<LocalCluster> Start(const std::string& model,
                                             std::vector<std::string> flags) {
    flags.insert(flags.end(), {"--kv-cache-mb", "8"});
    auto process = testing::LocalCluster::Start(PDSERVE_BINARY, model, std::move(flags));
    if (process == nullptr) return nullptr;
    auto cluster = std::unique_ptr<LocalCluster>(new LocalCluster());
    cluster->stub_ = api::Serving::NewStub(
        grpc::CreateChannel(process->address(), grpc::InsecureChannelCredentials()));
    cluster->process_ = std::move(process);
    return cluster;
  }
  api::Serving::Stub& stub() { return *stub_; }
  const std::string& address() const { return process_->address(); }
  testing::LocalCluster& process() { return *process_; }

 private:
  LocalCluster() = default;
  std::unique_ptr<testing::LocalCluster> process_;
  std::unique_ptr<api::Serving::Stub> stub_;
};

struct Streamed {
  grpc::Status status;
  std::vector<int32_t> tokens;
  std::string text;
  int messages = 0;
  api::Done done;
};

Streamed Generate(api::Serving::Stub& stub, const api::GenerateRequest& request,
                  int timeout_s = 120) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(timeout_s));
  auto reader = stub.Generate(&ctx, request);
  Streamed out;
  api::GenerateResponse response;
  while (reader->Read(&response)) {
    ++out.messages;
    out.tokens.insert(out.tokens.end(), response.token_ids().begin(), response.token_ids().end());
    out.text += response.text();
    if (response.has_done()) out.done = response.done();
  }
  out.status = reader->Finish();
  return out;
}

// Sends `n` concurrent requests of `prompt_len` tokens (ids from `first_id` on, shifted per
// request) for `max_tokens` tokens each. Every request either gets all its tokens or is
// refused with RESOURCE_EXHAUSTED before any token; returns {served, refused}.
std::pair<int, int> Burst(api::Serving::Stub& stub, int n, int first_id, int prompt_len,
                          int max_tokens) {
  std::vector<std::future<Streamed>> futures;
  for (int i = 0; i < n; ++i) {
    api::GenerateRequest r;
    for (int j = 0; j < prompt_len; ++j) r.add_prompt_token_ids(first_id + i + j);
    r.set_max_tokens(max_tokens);
    r.set_ignore_eos(true);
    futures.push_back(std::async(std::launch::async, [&stub, r] { return Generate(stub, r); }));
  }
  int ok = 0, exhausted = 0;
  for (auto& f : futures) {
    const Streamed got = f.get();
    if (got.status.ok()) {
      ++ok;
      EXPECT_EQ(got.tokens.size(), static_cast<size_t>(max_tokens));
    } else {
      EXPECT_EQ(got.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
          << got.status.error_message();
      EXPECT_TRUE(got.tokens.empty()) << "refused after streaming " << got.tokens.size();
      ++exhausted;
    }
  }
  return {ok, exhausted};
}

api::ClusterStatus Status(api::Serving::Stub& stub) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  api::ClusterStatus status;
  EXPECT_TRUE(stub.GetClusterStatus(&ctx, api::ClusterStatusRequest(), &status).ok());
  return status;
}

// The cluster status once every instance's figures were taken after this call (the
// front-end polls workers every 200 ms; a worker refreshes its figures at least every 50 ms).
api::ClusterStatus FreshStatus(api::Serving::Stub& stub) {
  const absl::Time start = absl::Now();
  api::ClusterStatus status;
  while (absl::Now() < start + absl::Seconds(30)) {
    status = Status(stub);
    const int64_t elapsed_ms = absl::ToInt64Milliseconds(absl::Now() - start);
    bool fresh = status.instances_size() > 0;
    for (const auto& i : status.instances()) {
      fresh = fresh && i.last_seen_ms_ago() >= 0 && i.last_seen_ms_ago() + 100 < elapsed_ms;
    }
    if (fresh) return status;
    absl::SleepFor(absl::Milliseconds(50));
  }
  ADD_FAILURE() << "no fresh status: " << status.DebugString();
  return status;
}

// Waits until no request is in flight and every instance's KV blocks are free.
void ExpectAllFree(api::Serving::Stub& stub) {
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  api::ClusterStatus status;
  while (absl::Now() < deadline) {
    status = FreshStatus(stub);
    int used = 0;  // and booked by the front-end
    for (const auto& i : status.instances()) used += i.kv_blocks_used() + i.kv_blocks_booked();
    if (used == 0 && status.requests_in_flight() == 0) return;
    absl::SleepFor(absl::Milliseconds(50));
  }
  ADD_FAILURE() << "blocks or requests left: " << status.DebugString();
}

class ServingTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto config = testing::SmallTestConfig();
    config.max_position_embeddings = 256;
    auto dir = testing::MakeModelDir(config, "serving", 21, engine::DType::kF32, 0,
                                     /*tokenizer=*/true);
    ASSERT_TRUE(dir.ok()) << dir.status();
    model_dir_ = new std::string(*dir);
  }
  static void TearDownTestSuite() { delete model_dir_; }

  // Offline reference: one engine, all requests at once.
  static std::vector<engine::GenerateResult> Offline(
      const std::vector<engine::GenerateRequest>& requests) {
    engine::CpuBackend backend(1);
    auto model = engine::Transformer::Load(*model_dir_, backend);
    EXPECT_TRUE(model.ok()) << model.status();
    auto eng = engine::LlmEngine::Create(
        **model, {.block_size = 16, .num_blocks = 512, .prefix_caching = false});
    EXPECT_TRUE(eng.ok());
    auto results = (*eng)->Generate(requests);
    EXPECT_TRUE(results.ok()) << results.status();
    return *results;
  }

  // Mixed prompts and lengths, sent concurrently; the cluster's tokens equal offline ones.
  // `period` > 0: prompts repeat a pattern of that many tokens.
  static void ExpectClusterMatchesOffline(LocalCluster& cluster, int n, float temperature,
                                          int max_new = 24, int period = 0) {
    std::vector<engine::GenerateRequest> offline;
    std::vector<api::GenerateRequest> online;
    for (int i = 0; i < n; ++i) {
      engine::GenerateRequest r;
      r.id = absl::StrCat("r", i);
      const int len = 1 + (i * 37) % 90;
      for (int j = 0; j < len; ++j) {
        r.prompt.push_back(3 + (i * 131 + (period > 0 ? j % period : j) * 17) % 250);
      }
      r.params.max_tokens = 1 + (i * 7) % max_new;
      r.params.ignore_eos = i % 3 != 0;
      r.params.temperature = temperature;
      r.params.seed = 1000 + i;
      offline.push_back(r);
      api::GenerateRequest a;
      a.set_request_id(r.id);
      *a.mutable_prompt_token_ids() = {r.prompt.begin(), r.prompt.end()};
      a.set_max_tokens(r.params.max_tokens);
      a.set_ignore_eos(r.params.ignore_eos);
      a.set_temperature(temperature);
      a.set_seed(*r.params.seed);
      online.push_back(a);
    }
    const auto expected = Offline(offline);
    std::vector<std::future<Streamed>> futures;
    for (const auto& a : online) {
      futures.push_back(
          std::async(std::launch::async, [&cluster, a] { return Generate(cluster.stub(), a); }));
    }
    for (int i = 0; i < n; ++i) {
      Streamed got = futures[i].get();
      ASSERT_TRUE(got.status.ok()) << i << ": " << got.status.error_message();
      EXPECT_EQ(got.tokens, expected[i].token_ids) << "request " << i;
      EXPECT_EQ(got.done.finish_reason(), engine::FinishReasonName(expected[i].finish));
      EXPECT_EQ(got.done.completion_tokens(), static_cast<int>(got.tokens.size()));
    }
    ExpectAllFree(cluster.stub());
  }

  static std::string* model_dir_;
};
std::string* ServingTest::model_dir_ = nullptr;

TEST_F(ServingTest, OnePrefillOneDecodeMatchesOfflineGreedyAndSeeded) {
  auto cluster = LocalCluster::Start(*model_dir_, {"--prefill", "1", "--decode", "1"});
  ASSERT_NE(cluster, nullptr);
  ExpectClusterMatchesOffline(*cluster, 24, 0.0f);
  ExpectClusterMatchesOffline(*cluster, 12, 0.8f);
  const api::ClusterStatus status = Status(cluster->stub());
  EXPECT_EQ(status.instances_size(), 2);
  EXPECT_EQ(status.requests_finished(), 36);
}

// Requests that share a long prefix: the prefill worker computes it once and the decode worker
// holds it once (prefix caching, on by default), and the tokens equal an engine's without a
// cache; `--prefix-caching off` turns it off.
TEST_F(ServingTest, SharedPrefixesComeFromThePrefillWorkersCache) {
  std::vector<int32_t> system;
  for (int j = 0; j < 85; ++j) system.push_back(5 + (j * 29) % 240);  // 5 blocks of 16 + 5
  std::vector<engine::GenerateRequest> offline;
  std::vector<api::GenerateRequest> online;
  for (int i = 0; i < 7; ++i) {
    engine::GenerateRequest r;
    r.id = absl::StrCat("s", i);
    r.prompt = system;
    for (int j = 0; j <= i * 3; ++j) r.prompt.push_back(7 + (i * 53 + j * 11) % 240);
    r.params.max_tokens = 6;
    r.params.ignore_eos = true;
    offline.push_back(r);
    api::GenerateRequest a;
    a.set_request_id(r.id);
    *a.mutable_prompt_token_ids() = {r.prompt.begin(), r.prompt.end()};
    a.set_max_tokens(6);
    a.set_ignore_eos(true);
    online.push_back(a);
  }
  const auto expected = Offline(offline);
  int64_t blocks = 0;  // the prompts' blocks of 16, all handed off without the cache
  for (const auto& r : offline) blocks += (static_cast<int64_t>(r.prompt.size()) + 15) / 16;
  int64_t sent_on = 0, held_on = 0;
  for (const char* caching : {"on", "off"}) {
    SCOPED_TRACE(caching);
    auto cluster = LocalCluster::Start(
        *model_dir_, {"--prefill", "1", "--decode", "1", "--prefix-caching", caching});
    ASSERT_NE(cluster, nullptr);
    // The first request alone, then the other six at once: each starts after the 80 tokens
    // the first left in the cache.
    Streamed first = Generate(cluster->stub(), online[0]);
    ASSERT_TRUE(first.status.ok()) << first.status.error_message();
    EXPECT_EQ(first.tokens, expected[0].token_ids);
    EXPECT_EQ(first.done.cached_prompt_tokens(), 0);
    std::vector<std::future<Streamed>> futures;
    for (int i = 1; i < 7; ++i) {
      futures.push_back(std::async(
          std::launch::async, [&cluster, a = online[i]] { return Generate(cluster->stub(), a); }));
    }
    for (int i = 1; i < 7; ++i) {
      Streamed got = futures[i - 1].get();
      ASSERT_TRUE(got.status.ok()) << i << ": " << got.status.error_message();
      EXPECT_EQ(got.tokens, expected[i].token_ids) << "request " << i;
      EXPECT_EQ(got.done.cached_prompt_tokens(), std::string(caching) == "on" ? 80 : 0) << i;
    }
    ExpectAllFree(cluster->stub());
    const api::ClusterStatus status = FreshStatus(cluster->stub());
    int64_t query = 0, hit = 0, cached = 0, decode_hit = -1, sent = 0, held = 0, received = 0;
    for (const auto& inst : status.instances()) {
      if (inst.role() == "decode") {
        decode_hit = inst.prefix_cache_hit_tokens();
        received = inst.kv_bytes_received();
      }
      if (inst.role() != "prefill") continue;
      query = inst.prefix_cache_query_tokens();
      hit = inst.prefix_cache_hit_tokens();
      cached = inst.kv_blocks_cached();
      sent = inst.kv_bytes_sent();
      held = inst.kv_bytes_held();
    }
    EXPECT_EQ(received, sent);
    if (std::string(caching) == "on") {
      sent_on = sent;
      held_on = held;
    } else {
      // Without the cache every block moves; with it, the 5 blocks of the system prompt that
      // the decode worker held for each of the last six requests did not.
      EXPECT_EQ(held, 0);
      EXPECT_EQ(sent_on + held_on, sent);
      EXPECT_EQ(held_on * blocks, sent * 6 * 5) << "held " << held_on << " of " << sent;
    }
    // The decode worker shares the first request's imported system prompt with the others.
    EXPECT_EQ(decode_hit, std::string(caching) == "on" ? 6 * 80 : 0);
    int64_t prompt_tokens = 0;
    for (const auto& r : offline) prompt_tokens += static_cast<int64_t>(r.prompt.size());
    EXPECT_EQ(query, std::string(caching) == "on" ? prompt_tokens : 0);
    EXPECT_EQ(hit, std::string(caching) == "on" ? 6 * 80 : 0);
    if (std::string(caching) == "on") EXPECT_GE(cached, 5);
  }
}

// Conditional disaggregation: a conversation's second turn, whose prompt the decode worker holds
// all but 16 tokens of (the first turn's prompt and answer), runs there whole: no hand-off, the
// same tokens as offline. The first turn, which it held none of, is disaggregated.
// (Started from a plan file that says so, as `pdserve plan --local-prefill-max-tokens` writes.)
TEST_F(ServingTest, ShortNextTurnIsPrefilledOnTheDecodeWorker) {
  const std::string plan = testing::ScratchDir() + "/local-prefill-plan.json";
  {
    std::ofstream out(plan);
    out << R"({"prefill_instances": 1, "decode_instances": 1,)"
        << R"( "policies": {"local_prefill_max_tokens": 32}})";
  }
  auto cluster = LocalCluster::Start(*model_dir_, {"--plan", plan});
  ASSERT_NE(cluster, nullptr);
  engine::GenerateRequest turn1;
  turn1.id = "turn1";
  for (int j = 0; j < 40; ++j) turn1.prompt.push_back(20 + (j * 7) % 200);
  turn1.params.max_tokens = 30;
  turn1.params.ignore_eos = true;
  const auto first_expected = Offline({turn1});
  engine::GenerateRequest turn2 = turn1;
  turn2.id = "turn2";
  const std::vector<int32_t>& answer = first_expected[0].token_ids;
  turn2.prompt.insert(turn2.prompt.end(), answer.begin(), answer.end());
  for (int j = 0; j < 10; ++j) turn2.prompt.push_back(200 + j);  // 80 tokens: 64 held
  turn2.params.max_tokens = 6;
  const auto second_expected = Offline({turn2});
  const auto to_api = [](const engine::GenerateRequest& r) {
    api::GenerateRequest a;
    a.set_request_id(r.id);
    *a.mutable_prompt_token_ids() = {r.prompt.begin(), r.prompt.end()};
    a.set_max_tokens(r.params.max_tokens);
    a.set_ignore_eos(true);
    return a;
  };
  Streamed first = Generate(cluster->stub(), to_api(turn1));
  ASSERT_TRUE(first.status.ok()) << first.status.error_message();
  EXPECT_EQ(first.tokens, answer);
  EXPECT_EQ(first.done.timeline().prefill_instance(), "prefill-0");
  EXPECT_EQ(first.done.timeline().decode_instance(), "decode-0");
  ExpectAllFree(cluster->stub());
  const int64_t sent = [&] {
    const api::ClusterStatus status = FreshStatus(cluster->stub());
    for (const auto& inst : status.instances()) {
      if (inst.role() == "prefill") return inst.kv_bytes_sent();
    }
    return int64_t{-1};
  }();
  ASSERT_GT(sent, 0);
  Streamed second = Generate(cluster->stub(), to_api(turn2));
  ASSERT_TRUE(second.status.ok()) << second.status.error_message();
  EXPECT_EQ(second.tokens, second_expected[0].token_ids);
  const api::Timeline& t = second.done.timeline();
  EXPECT_EQ(t.prefill_instance(), "decode-0");
  EXPECT_EQ(t.decode_instance(), "");
  EXPECT_TRUE(absl::StrContains(t.scheduler_note(), "prefilled on decode-0 (16 of 80"))
      << t.scheduler_note();
  EXPECT_EQ(second.done.cached_prompt_tokens(), 64);
  ExpectAllFree(cluster->stub());
  const api::ClusterStatus status = FreshStatus(cluster->stub());
  EXPECT_EQ(status.requests_local_prefill(), 1);
  for (const auto& inst : status.instances()) {
    if (inst.role() == "prefill") EXPECT_EQ(inst.kv_bytes_sent(), sent) << "nothing handed off";
  }
}

// Conversations in parallel with local prefill and small KV pools: turns run on the decode
// workers or disaggregated (9-11 of the 18 local in three runs: first turns too, whose 6-20
// tokens are under the bound even with nothing cached; a turn with more than 24 prompt tokens
// uncached on its decode worker, or over the bound on the local prefill tokens queued there,
// goes to the prefill worker); every turn's tokens equal offline ones.
TEST_F(ServingTest, ConcurrentConversationsWithLocalPrefillMatchOffline) {
  auto cluster =
      LocalCluster::Start(*model_dir_, {"--prefill", "1", "--decode", "2",
                                        "--local-prefill-max-tokens", "24", "--num-blocks", "28"});
  ASSERT_NE(cluster, nullptr);
  constexpr int kConversations = 6, kTurns = 3;
  const auto message = [](int c, int t) {
    std::vector<int32_t> m;
    for (int j = 0; j < 6 + (c * 5 + t * 7) % 15; ++j) m.push_back(3 + (c * 97 + t * 31 + j) % 250);
    return m;
  };
  const auto max_tokens = [](int c, int t) { return 8 + (c * 11 + t * 5) % 20; };
  // Offline: each turn on its own engine run, after the offline answers before it.
  std::vector<std::vector<std::vector<int32_t>>> expected(kConversations);
  for (int c = 0; c < kConversations; ++c) {
    std::vector<int32_t> history;
    for (int t = 0; t < kTurns; ++t) {
      const std::vector<int32_t> m = message(c, t);
      history.insert(history.end(), m.begin(), m.end());
      engine::GenerateRequest r;
      r.id = absl::StrCat("c", c, "t", t);
      r.prompt = history;
      r.params.max_tokens = max_tokens(c, t);
      r.params.ignore_eos = true;
      expected[c].push_back(Offline({r})[0].token_ids);
      history.insert(history.end(), expected[c][t].begin(), expected[c][t].end());
    }
  }
  std::vector<std::future<std::string>> runs;
  for (int c = 0; c < kConversations; ++c) {
    runs.push_back(std::async(std::launch::async, [&, c]() -> std::string {
      std::vector<int32_t> history;
      for (int t = 0; t < kTurns; ++t) {
        const std::vector<int32_t> m = message(c, t);
        history.insert(history.end(), m.begin(), m.end());
        api::GenerateRequest a;
        *a.mutable_prompt_token_ids() = {history.begin(), history.end()};
        a.set_max_tokens(max_tokens(c, t));
        a.set_ignore_eos(true);
        Streamed got = Generate(cluster->stub(), a);
        if (!got.status.ok()) return absl::StrCat(c, "/", t, ": ", got.status.error_message());
        if (got.tokens != expected[c][t]) {
          return absl::StrCat(c, "/", t, " on ", got.done.timeline().prefill_instance(),
                              ": tokens differ from offline");
        }
        history.insert(history.end(), got.tokens.begin(), got.tokens.end());
      }
      return "";
    }));
  }
  for (auto& run : runs) EXPECT_EQ(run.get(), "");
  ExpectAllFree(cluster->stub());
  const api::ClusterStatus status = FreshStatus(cluster->stub());
  EXPECT_GT(status.requests_local_prefill(), 0);
  EXPECT_LT(status.requests_local_prefill(), kConversations * kTurns);
}

// Small KV pools on both sides: decode workers refuse hand-offs until they have room, prefill
// workers keep finished KV caches meanwhile and stop admitting when their own pool is full.
TEST_F(ServingTest, BackPressureWithSmallKvPoolsKeepsResultsExact) {
  auto cluster =
      LocalCluster::Start(*model_dir_, {"--prefill", "1", "--decode", "1", "--num-blocks", "24"});
  ASSERT_NE(cluster, nullptr);
  ExpectClusterMatchesOffline(*cluster, 24, 0.0f, /*max_new=*/120);
  int64_t deferred = 0;
  const api::ClusterStatus status = FreshStatus(cluster->stub());
  for (const auto& inst : status.instances()) {
    deferred += inst.kv_handoffs_deferred();
  }
  EXPECT_GT(deferred, 0) << "the decode pool never pushed back";
}

TEST_F(ServingTest, TwoPrefillTwoDecodeMatchesOfflineAndUsesEveryInstance) {
  auto cluster = LocalCluster::Start(*model_dir_, {"--prefill", "2", "--decode", "2"});
  ASSERT_NE(cluster, nullptr);
  ExpectClusterMatchesOffline(*cluster, 32, 0.0f);
  const api::ClusterStatus status = FreshStatus(cluster->stub());
  ASSERT_EQ(status.instances_size(), 4);
  for (const auto& inst : status.instances()) {
    EXPECT_TRUE(inst.healthy()) << inst.id();
    EXPECT_GT(inst.requests_served(), 0) << inst.id() << " never served";
  }
}

// Speculative decoding (prompt lookup) on the decode and colocated workers changes no token,
// greedy or seeded, and the status reports its drafts.
TEST_F(ServingTest, SpeculativeDecodingMatchesOffline) {
  for (const std::vector<std::string>& shape :
       {std::vector<std::string>{"--prefill", "1", "--decode", "1"},
        std::vector<std::string>{"--colocated", "1"}}) {
    std::vector<std::string> flags = shape;
    flags.insert(flags.end(), {"--speculative-tokens", "4", "--prompt-lookup-min", "1",
                               "--speculative-drafts", "all"});
    auto cluster = LocalCluster::Start(*model_dir_, flags);
    ASSERT_NE(cluster, nullptr);
    ExpectClusterMatchesOffline(*cluster, 16, 0.0f, 40, 5);
    ExpectClusterMatchesOffline(*cluster, 8, 0.8f, 40, 3);
    int64_t drafts = 0, accepted = 0;
    const api::ClusterStatus status = FreshStatus(cluster->stub());
    for (const auto& inst : status.instances()) {
      if (inst.role() == "prefill") EXPECT_EQ(inst.spec_draft_tokens(), 0) << inst.id();
      drafts += inst.spec_draft_tokens();
      accepted += inst.spec_accepted_tokens();
      // --speculative-drafts all: the steps carry what the lookup proposed, less what the
      // token budget, the blocks and the 1/32 floor cut.
      EXPECT_GE(inst.spec_proposed_tokens(), inst.spec_draft_tokens()) << inst.id();
    }
    EXPECT_GT(drafts, 0) << shape[0];
    EXPECT_GT(accepted, 0) << shape[0];
    EXPECT_LE(accepted, drafts);
  }
}

TEST_F(ServingTest, UnevenShapesAndColocatedMatchOffline) {
  for (const auto& [prefill, decode] : {std::pair{"1", "2"}, std::pair{"2", "1"}}) {
    auto cluster = LocalCluster::Start(*model_dir_, {"--prefill", prefill, "--decode", decode});
    ASSERT_NE(cluster, nullptr);
    ExpectClusterMatchesOffline(*cluster, 16, 0.0f);
  }
  auto cluster = LocalCluster::Start(*model_dir_, {"--colocated", "2"});
  ASSERT_NE(cluster, nullptr);
  ExpectClusterMatchesOffline(*cluster, 16, 0.0f);
  api::GenerateRequest r;
  r.add_prompt_token_ids(7);
  r.set_max_tokens(3);
  const Streamed got = Generate(cluster->stub(), r);
  ASSERT_TRUE(got.status.ok());
  EXPECT_TRUE(got.done.timeline().decode_instance().empty());
  EXPECT_EQ(got.done.timeline().prefill_instance().rfind("colocated-", 0), 0u);
}

// The KV sent after the prefill step instead of layer by layer during it (--kv-handoff
// after) gives the same tokens; and on the layered path, requests that end with their first
// token (a stop token) while their KV is already leaving finish cleanly, leaving no blocks.
TEST_F(ServingTest, HandoffAfterTheStepAndFirstTokenStopsMatchOffline) {
  {
    auto after = LocalCluster::Start(*model_dir_,
                                     {"--prefill", "1", "--decode", "1", "--kv-handoff", "after"});
    ASSERT_NE(after, nullptr);
    ExpectClusterMatchesOffline(*after, 12, 0.0f);
  }
  auto cluster = LocalCluster::Start(*model_dir_, {"--prefill", "1", "--decode", "1"});
  ASSERT_NE(cluster, nullptr);
  std::vector<engine::GenerateRequest> offline;
  for (int i = 0; i < 6; ++i) {
    engine::GenerateRequest r;
    r.id = absl::StrCat("first-", i);
    for (int j = 0; j < 20 + 9 * i; ++j) r.prompt.push_back(5 + (i * 71 + j * 13) % 240);
    r.params.max_tokens = 1;
    r.params.ignore_eos = true;
    offline.push_back(r);
  }
  const auto first = Offline(offline);
  for (int i = 0; i < 6; ++i) {
    ASSERT_EQ(first[i].token_ids.size(), 1u);
    api::GenerateRequest a;
    a.set_request_id(offline[i].id);
    *a.mutable_prompt_token_ids() = {offline[i].prompt.begin(), offline[i].prompt.end()};
    a.set_max_tokens(16);
    a.set_ignore_eos(true);
    a.add_stop_token_ids(first[i].token_ids[0]);
    Streamed got = Generate(cluster->stub(), a);
    ASSERT_TRUE(got.status.ok()) << i << ": " << got.status.error_message();
    EXPECT_EQ(got.tokens, first[i].token_ids) << i;
    EXPECT_EQ(got.done.finish_reason(), "stop") << i;
  }
  ExpectAllFree(cluster->stub());
  ExpectClusterMatchesOffline(*cluster, 8, 0.0f);  // and the cluster goes on serving
}

TEST_F(ServingTest, StreamsTextTimelineAndLogprobs) {
  auto cluster = LocalCluster::Start(*model_dir_, {"--prefill", "1", "--decode", "1"});
  ASSERT_NE(cluster, nullptr);
  api::GenerateRequest r;
  r.set_prompt_text("The quick brown fox");
  r.set_max_tokens(16);
  r.set_ignore_eos(true);
  r.set_logprobs(3);
  grpc::ClientContext ctx;
  auto reader = cluster->stub().Generate(&ctx, r);
  api::GenerateResponse m;
  std::vector<api::GenerateResponse> messages;
  while (reader->Read(&m)) messages.push_back(m);
  const grpc::Status finished = reader->Finish();
  ASSERT_TRUE(finished.ok()) << finished.error_message();
  ASSERT_GE(messages.size(), 2u);
  int tokens = 0, logprobs = 0;
  for (const auto& msg : messages) {
    tokens += msg.token_ids_size();
    logprobs += msg.logprobs_size();
    for (const auto& lp : msg.logprobs()) {
      EXPECT_LE(lp.logprob(), 0.0f);
      EXPECT_EQ(lp.top_size(), 3);
    }
  }
  EXPECT_EQ(tokens, 16);
  EXPECT_EQ(logprobs, 16);
  // The streamed text is the decode of the tokens, special tokens left out.
  auto tok = engine::Tokenizer::Load(*model_dir_ + "/tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  std::vector<int32_t> ids;
  std::string text;
  for (const auto& msg : messages) {
    ids.insert(ids.end(), msg.token_ids().begin(), msg.token_ids().end());
    text += msg.text();
  }
  EXPECT_EQ(text, (*tok)->Decode(ids, /*skip_special_tokens=*/true));
  const api::Done& done = messages.back().done();
  EXPECT_EQ(done.finish_reason(), "length");
  const api::Timeline& t = done.timeline();
  // The KV leaves layer by layer from the start of the prefill step, so its transfer starts
  // before the step ends and ends after it.
  for (const std::vector<int64_t>& order : std::vector<std::vector<int64_t>>{
           {t.arrival_us(), t.queued_us(), t.prefill_start_us(), t.prefill_end_us(),
            t.kv_transfer_end_us(), t.decode_start_us(), t.finish_us()},
           {t.prefill_start_us(), t.kv_transfer_start_us(), t.kv_transfer_end_us()}}) {
    for (size_t i = 0; i < order.size(); ++i) {
      EXPECT_GT(order[i], 0) << i;
      if (i > 0) {
        EXPECT_LE(order[i - 1], order[i]) << i << ": " << t.DebugString();
      }
    }
  }
  EXPECT_LE(t.prefill_end_us(), t.first_token_us());
  EXPECT_EQ(t.prefill_instance(), "prefill-0");
  EXPECT_EQ(t.decode_instance(), "decode-0");
  EXPECT_FALSE(t.scheduler_note().empty());

  // skip_special_tokens false keeps special tokens' text (a bias makes the model write one), but
  // not that of the special token that ends the reply.
  const std::optional<int32_t> special = (*tok)->TokenToId("<|reserved_special_token_0|>");
  const std::optional<int32_t> eos = (*tok)->TokenToId("<|end_of_text|>");
  ASSERT_TRUE(special && eos && (*tok)->IsSpecial(*special) && (*tok)->IsSpecial(*eos));
  api::GenerateRequest k;
  k.set_prompt_text("The quick brown fox");
  k.set_max_tokens(3);
  k.set_ignore_eos(true);
  (*k.mutable_logit_bias())[*special] = 100;
  Streamed kept = Generate(cluster->stub(), k);  // the default: left out
  ASSERT_TRUE(kept.status.ok()) << kept.status.error_message();
  EXPECT_EQ(kept.tokens, std::vector<int32_t>(3, *special));
  EXPECT_EQ(kept.text, "");
  k.set_skip_special_tokens(false);
  kept = Generate(cluster->stub(), k);
  ASSERT_TRUE(kept.status.ok()) << kept.status.error_message();
  EXPECT_EQ(kept.tokens, std::vector<int32_t>(3, *special));
  EXPECT_EQ(kept.text,
            "<|reserved_special_token_0|><|reserved_special_token_0|>"
            "<|reserved_special_token_0|>");
  // The special token, then EOS, which ends it (finish "stop") and is no text.
  k.set_ignore_eos(false);
  k.set_min_tokens(1);
  (*k.mutable_logit_bias())[*special] = 50;
  (*k.mutable_logit_bias())[*eos] = 100;
  kept = Generate(cluster->stub(), k);
  ASSERT_TRUE(kept.status.ok()) << kept.status.error_message();
  EXPECT_EQ(kept.tokens, (std::vector<int32_t>{*special, *eos}));
  EXPECT_EQ(kept.done.finish_reason(), "stop");
  EXPECT_EQ(kept.text, "<|reserved_special_token_0|>");

  // allowed_token_ids holds on both sides of the hand-off; include_stop_str_in_output keeps the
  // stop sequence that ended the text.
  const std::optional<int32_t> a = (*tok)->TokenToId("a"), b = (*tok)->TokenToId("b");
  ASSERT_TRUE(a && b);
  api::GenerateRequest only;
  only.set_prompt_text("The quick brown fox");
  only.set_max_tokens(6);
  only.set_ignore_eos(true);
  only.add_allowed_token_ids(*a);
  only.add_allowed_token_ids(*b);
  Streamed ab = Generate(cluster->stub(), only);
  ASSERT_TRUE(ab.status.ok()) << ab.status.error_message();
  EXPECT_EQ(ab.done.timeline().prefill_instance(), "prefill-0");
  EXPECT_EQ(ab.done.timeline().decode_instance(), "decode-0");
  ASSERT_EQ(ab.tokens.size(), 6u);
  for (int32_t t : ab.tokens) EXPECT_TRUE(t == *a || t == *b) << t;
  (*only.mutable_logit_bias())[*b] = 100;  // "bbbbbb", stopped at its first "bb"
  only.add_stop("bb");
  Streamed stopped = Generate(cluster->stub(), only);
  ASSERT_TRUE(stopped.status.ok()) << stopped.status.error_message();
  EXPECT_EQ(stopped.text, "");
  EXPECT_EQ(stopped.done.finish_reason(), "stop");
  only.set_include_stop_str_in_output(true);
  stopped = Generate(cluster->stub(), only);
  ASSERT_TRUE(stopped.status.ok()) << stopped.status.error_message();
  EXPECT_EQ(stopped.text, "bb");
  EXPECT_EQ(stopped.tokens.size(), 2u);
  // A stop token ends the reply and is no text (an ordinary one too), unless included.
  only.clear_stop();
  only.set_include_stop_str_in_output(false);
  only.add_stop_token_ids(*b);
  stopped = Generate(cluster->stub(), only);
  ASSERT_TRUE(stopped.status.ok()) << stopped.status.error_message();
  EXPECT_EQ(stopped.tokens, std::vector<int32_t>{*b});
  EXPECT_EQ(stopped.done.finish_reason(), "stop");
  EXPECT_EQ(stopped.text, "");
  only.set_include_stop_str_in_output(true);
  stopped = Generate(cluster->stub(), only);
  ASSERT_TRUE(stopped.status.ok()) << stopped.status.error_message();
  EXPECT_EQ(stopped.text, "b");
}

TEST_F(ServingTest, BadRequestsAreInvalidArgumentAndDisturbNothing) {
  auto cluster = LocalCluster::Start(*model_dir_, {"--prefill", "1", "--decode", "1"});
  ASSERT_NE(cluster, nullptr);
  // A long request in flight while the bad ones arrive; it must finish intact.
  api::GenerateRequest good;
  good.set_request_id("busy");
  for (int i = 0; i < 20; ++i) good.add_prompt_token_ids(10 + i);
  good.set_max_tokens(150);
  good.set_ignore_eos(true);
  auto in_flight = std::async(std::launch::async, [&] { return Generate(cluster->stub(), good); });
  absl::SleepFor(absl::Milliseconds(300));

  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<std::pair<std::string, api::GenerateRequest>> bad;
  auto base = [] {
    api::GenerateRequest r;
    r.add_prompt_token_ids(5);
    r.set_max_tokens(4);
    return r;
  };
  {
    api::GenerateRequest r;
    r.set_max_tokens(4);
    bad.push_back({"empty prompt", r});
  }
  {
    auto r = base();
    r.set_prompt_text("hi");
    bad.push_back({"text and ids", r});
  }
  {
    auto r = base();
    r.clear_prompt_token_ids();
    r.set_prompt_text("");
    bad.push_back({"empty text", r});
  }
  {
    auto r = base();
    r.add_prompt_token_ids(1 << 20);
    bad.push_back({"id beyond vocab", r});
  }
  {
    auto r = base();
    r.add_prompt_token_ids(-1);
    bad.push_back({"negative id", r});
  }
  {
    auto r = base();
    r.set_max_tokens(256);
    bad.push_back({"beyond context", r});
  }
  {
    auto r = base();
    r.set_max_tokens(0);
    bad.push_back({"max_tokens 0", r});
  }
  {
    auto r = base();
    r.set_max_tokens(-3);
    bad.push_back({"max_tokens negative", r});
  }
  {
    auto r = base();
    r.set_temperature(-0.5f);
    bad.push_back({"temperature negative", r});
  }
  {
    auto r = base();
    r.set_temperature(nan);
    bad.push_back({"temperature NaN", r});
  }
  {
    auto r = base();
    r.set_top_p(0.0f);
    bad.push_back({"top_p 0", r});
  }
  {
    auto r = base();
    r.set_top_p(1.5f);
    bad.push_back({"top_p > 1", r});
  }
  {
    auto r = base();
    r.set_top_k(-1);
    bad.push_back({"top_k negative", r});
  }
  for (const auto& [what, r] : bad) {
    const Streamed got = Generate(cluster->stub(), r);
    EXPECT_EQ(got.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << what;
    EXPECT_FALSE(got.status.error_message().empty()) << what;
    EXPECT_EQ(got.messages, 0) << what;
  }
  const Streamed finished = in_flight.get();
  ASSERT_TRUE(finished.status.ok()) << finished.status.error_message();
  EXPECT_EQ(finished.tokens.size(), 150u);

  // A duplicate id while the first is in flight (the first is read one message at a time,
  // so it cannot finish before the duplicate was answered).
  api::GenerateRequest first = good;
  first.set_request_id("dup");
  grpc::ClientContext ctx;
  auto reader = cluster->stub().Generate(&ctx, first);
  api::GenerateResponse m;
  ASSERT_TRUE(reader->Read(&m));
  api::GenerateRequest dup = base();
  dup.set_request_id("dup");
  const Streamed got = Generate(cluster->stub(), dup);
  int tokens = m.token_ids_size();
  while (reader->Read(&m)) tokens += m.token_ids_size();
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(tokens, 150);
  if (got.status.ok()) {
    // Only acceptable if the first had already ended on the server.
    EXPECT_LT(m.done().timeline().finish_us(), got.done.timeline().arrival_us());
  } else {
    EXPECT_EQ(got.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(got.status.error_message().find("in flight"), std::string::npos);
  }
  ExpectAllFree(cluster->stub());
  EXPECT_EQ(Status(cluster->stub()).requests_rejected(),
            static_cast<int64_t>(bad.size()) + (got.status.ok() ? 0 : 1));
}

TEST_F(ServingTest, OverloadIsResourceExhaustedAndCancellationFreesEverything) {
  auto cluster =
      LocalCluster::Start(*model_dir_, {"--prefill", "1", "--decode", "1", "--max-in-flight", "4"});
  ASSERT_NE(cluster, nullptr);
  const auto [ok, exhausted] = Burst(cluster->stub(), 12, 20, 30, 60);
  EXPECT_GE(ok, 4);
  EXPECT_GE(exhausted, 1);
  ExpectAllFree(cluster->stub());

  // Clients that cancel mid-stream, at different points: after the first token, later in
  // decode, and before anything arrives.
  for (int wait_messages : {1, 5, 0}) {
    for (int i = 0; i < 3; ++i) {
      api::GenerateRequest r;
      for (int j = 0; j < 40; ++j) r.add_prompt_token_ids(30 + j);
      r.set_max_tokens(200);
      r.set_ignore_eos(true);
      grpc::ClientContext ctx;
      auto reader = cluster->stub().Generate(&ctx, r);
      api::GenerateResponse m;
      for (int k = 0; k < wait_messages; ++k) ASSERT_TRUE(reader->Read(&m));
      ctx.TryCancel();
      EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
    }
  }
  // Long prompts cancelled a few ms in: most cancels land while the prefill step runs and its
  // KV is leaving layer by layer.
  for (int i = 0; i < 4; ++i) {
    api::GenerateRequest r;
    for (int j = 0; j < 200; ++j) r.add_prompt_token_ids(10 + (j * 7 + i) % 200);
    r.set_max_tokens(50);
    r.set_ignore_eos(true);
    grpc::ClientContext ctx;
    auto reader = cluster->stub().Generate(&ctx, r);
    absl::SleepFor(absl::Milliseconds(2 + 2 * i));
    ctx.TryCancel();
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  ExpectAllFree(cluster->stub());
  // A client may reuse an id as soon as its call has ended, even while the workers still
  // break off the cancelled call's KV transfer: the retry is served.
  for (int i = 0; i < 4; ++i) {
    api::GenerateRequest r;
    r.set_request_id(absl::StrCat("reused-", i));
    for (int j = 0; j < 200; ++j) r.add_prompt_token_ids(10 + (j * 11 + i) % 200);
    r.set_max_tokens(5);
    r.set_ignore_eos(true);
    {
      grpc::ClientContext ctx;
      auto reader = cluster->stub().Generate(&ctx, r);
      absl::SleepFor(absl::Milliseconds(2 + 2 * i));
      ctx.TryCancel();
      reader->Finish();
    }
    const Streamed retry = Generate(cluster->stub(), r);
    EXPECT_TRUE(retry.status.ok()) << i << ": " << retry.status.error_message();
    EXPECT_EQ(retry.tokens.size(), 5u);
  }
  ExpectAllFree(cluster->stub());
  const api::ClusterStatus status = Status(cluster->stub());
  // Calls cancelled before they reached the front-end are not counted there.
  EXPECT_GE(status.requests_cancelled(), 6);
  EXPECT_LE(status.requests_cancelled(), 17);
  // The cluster still serves.
  api::GenerateRequest r;
  r.add_prompt_token_ids(9);
  r.set_max_tokens(5);
  r.set_ignore_eos(true);
  EXPECT_EQ(Generate(cluster->stub(), r).tokens.size(), 5u);
}

// Pools with different caches (a plan may give them): a prompt that fits the prefill workers'
// cache but can never fit the decode workers' is refused at once with a status naming the
// sizes, not after its prefill with a wait for room that never comes; what fits is served.
TEST_F(ServingTest, PromptsTheDecodeCacheCanNeverHoldAreRefusedAtOnce) {
  const std::string plan = testing::ScratchDir() + "/small-decode-plan.json";
  {
    std::ofstream out(plan);
    out << R"({"prefill_instances": 1, "decode_instances": 1, "instance": {)"
        << R"("prefill": {"kv_blocks": 64, "block_size": 16},)"
        << R"("decode": {"kv_blocks": 4, "block_size": 16}}})";
  }
  auto cluster = LocalCluster::Start(*model_dir_, {"--plan", plan});
  ASSERT_NE(cluster, nullptr);
  api::GenerateRequest big;
  for (int j = 0; j < 80; ++j) big.add_prompt_token_ids(5 + j);
  big.set_max_tokens(4);
  big.set_ignore_eos(true);
  const absl::Time start = absl::Now();
  const Streamed refused = Generate(cluster->stub(), big, 60);
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(refused.status.error_message().find("more KV blocks than the cache holds"),
            std::string::npos)
      << refused.status.error_message();
  api::GenerateRequest fits;
  for (int j = 0; j < 30; ++j) fits.add_prompt_token_ids(5 + j);
  fits.set_max_tokens(4);
  fits.set_ignore_eos(true);
  const Streamed served = Generate(cluster->stub(), fits);
  EXPECT_TRUE(served.status.ok()) << served.status.error_message();
  EXPECT_EQ(served.tokens.size(), 4u);
  ExpectAllFree(cluster->stub());
}

// `pdserve up --pin-cpus` hands out the CPUs it was given (a taskset, a container's cpuset),
// not CPUs 0.. of the machine: started on one CPU, every process it starts stays on it.
TEST_F(ServingTest, PinnedWorkersStayInsideTheCpusUpWasGiven) {
  cpu_set_t before;
  ASSERT_EQ(sched_getaffinity(0, sizeof(before), &before), 0);
  int last = -1;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &before)) last = c;
  }
  ASSERT_GE(last, 0);
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(last, &one);
  ASSERT_EQ(sched_setaffinity(0, sizeof(one), &one), 0);  // inherited by `up` and its children
  auto cluster =
      LocalCluster::Start(*model_dir_, {"--prefill", "1", "--decode", "1", "--pin-cpus"});
  ASSERT_EQ(sched_setaffinity(0, sizeof(before), &before), 0);
  ASSERT_NE(cluster, nullptr);
  const std::vector<pid_t> children = cluster->process().Children();
  ASSERT_EQ(children.size(), 3u);  // front-end, prefill, decode
  for (pid_t pid : children) {
    std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
    std::string line, allowed;
    while (std::getline(status, line)) {
      if (line.rfind("Cpus_allowed_list:", 0) == 0) allowed = line.substr(line.find(':') + 1);
    }
    allowed.erase(0, allowed.find_first_not_of(" \t"));
    EXPECT_EQ(allowed, std::to_string(last)) << "pid " << pid;
  }
  api::GenerateRequest r;
  for (int j = 0; j < 10; ++j) r.add_prompt_token_ids(5 + j);
  r.set_max_tokens(3);
  r.set_ignore_eos(true);
  EXPECT_EQ(Generate(cluster->stub(), r).tokens.size(), 3u);
}

// A decode worker answers ACCEPTED without waiting for its engine step (the registration is
// off the TTFT path); what it cannot take (an id in use) it refuses before ACCEPTED.
TEST_F(ServingTest, DecodeAcceptsAtOnceAndRefusesADuplicateIdUpFront) {
  auto cluster = LocalCluster::Start(*model_dir_, {"--prefill", "1", "--decode", "1"});
  ASSERT_NE(cluster, nullptr);
  std::string decode_address;
  const api::ClusterStatus status = FreshStatus(cluster->stub());
  for (const auto& i : status.instances()) {
    if (i.role() == "decode") decode_address = i.address();
  }
  ASSERT_FALSE(decode_address.empty());
  auto worker = ::pdserve::internal::Worker::NewStub(
      grpc::CreateChannel(decode_address, grpc::InsecureChannelCredentials()));
  ::pdserve::internal::WorkRequest work;
  work.set_request_id("direct-1");
  for (int j = 0; j < 8; ++j) work.add_prompt_token_ids(10 + j);
  work.set_max_tokens(4);
  work.set_deadline_unix_us(absl::ToUnixMicros(absl::Now() + absl::Seconds(60)));
  grpc::ClientContext first_ctx;
  first_ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto first = worker->Decode(&first_ctx, work);
  ::pdserve::internal::WorkEvent event;
  ASSERT_TRUE(first->Read(&event));
  EXPECT_EQ(event.kind(), ::pdserve::internal::WorkEvent::ACCEPTED);

  // The same id again: refused before anything is streamed.
  grpc::ClientContext second_ctx;
  second_ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto second = worker->Decode(&second_ctx, work);
  EXPECT_FALSE(second->Read(&event));
  const grpc::Status refused = second->Finish();
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::ALREADY_EXISTS) << refused.error_message();
  EXPECT_NE(refused.error_message().find("direct-1"), std::string::npos);

  // The first one still waits for its KV; cancelling it frees everything.
  first_ctx.TryCancel();
  EXPECT_EQ(first->Finish().error_code(), grpc::StatusCode::CANCELLED);
  ExpectAllFree(cluster->stub());
  // The cluster still serves through that decode worker.
  api::GenerateRequest r;
  for (int j = 0; j < 8; ++j) r.add_prompt_token_ids(10 + j);
  r.set_max_tokens(4);
  r.set_ignore_eos(true);
  EXPECT_EQ(Generate(cluster->stub(), r).tokens.size(), 4u);
}

// Workers hold a request's admission until it ends, whichever way: with room for three
// requests per worker, many more in sequence (decoded, finished by the prefill worker with
// their only token, cancelled) all get through, and a burst beyond the room is refused.
TEST_F(ServingTest, WorkerAdmissionIsReleasedWhenRequestsEnd) {
  auto cluster = LocalCluster::Start(*model_dir_, {"--prefill", "1", "--decode", "1",
                                                   "--max-queued", "1", "--max-batch-size", "2"});
  ASSERT_NE(cluster, nullptr);
  for (int i = 0; i < 12; ++i) {
    api::GenerateRequest r;
    for (int j = 0; j < 10; ++j) r.add_prompt_token_ids(20 + i + j);
    r.set_max_tokens(i % 3 == 0 ? 1 : 5);
    r.set_ignore_eos(true);
    if (i % 4 == 3) {
      grpc::ClientContext ctx;
      auto reader = cluster->stub().Generate(&ctx, r);
      api::GenerateResponse m;
      reader->Read(&m);
      ctx.TryCancel();
      reader->Finish();
      continue;
    }
    // A worker notices a cancelled call within its 20 ms poll and then frees the request on
    // its loop: the admissions of the calls before are released by then.
    absl::SleepFor(absl::Milliseconds(200));
    const Streamed got = Generate(cluster->stub(), r);
    ASSERT_TRUE(got.status.ok()) << i << ": " << got.status.error_message();
    EXPECT_EQ(got.tokens.size(), static_cast<size_t>(r.max_tokens())) << i;
  }
  ExpectAllFree(cluster->stub());
  // A burst of 12 long requests: some are refused by a full worker queue.
  const auto [ok, exhausted] = Burst(cluster->stub(), 12, 40, 30, 40);
  EXPECT_GE(ok, 3);
  EXPECT_GE(exhausted, 1);
  ExpectAllFree(cluster->stub());
  api::GenerateRequest r;
  r.add_prompt_token_ids(9);
  r.set_max_tokens(3);
  r.set_ignore_eos(true);
  EXPECT_EQ(Generate(cluster->stub(), r).tokens.size(), 3u);
}

// SLO-aware dispatch with the latency model profiled from this model: every request carries
// the predictions in its timeline, and under a flood those that cannot meet their TTFT are
// refused at once with RESOURCE_EXHAUSTED instead of queueing past their target.
TEST_F(ServingTest, SloAwareAdmissionRefusesWhatCannotMeetItsTtft) {
  const std::string profile = testing::ScratchDir() + "/profile.json";
  const std::string cmd = absl::StrCat(PDSERVE_BINARY, " profile --model ", *model_dir_,
                                       " --quick --threads 1 --out ", profile, " > /dev/null 2>&1");
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  // EDF batch formation on the workers, by the TTFT deadlines the front-end sets.
  auto cluster = LocalCluster::Start(*model_dir_, {"--prefill", "1", "--decode", "1", "--profile",
                                                   profile, "--batch-policy", "edf"});
  ASSERT_NE(cluster, nullptr);
  api::GenerateRequest probe;
  for (int j = 0; j < 90; ++j) probe.add_prompt_token_ids(40 + j);
  probe.set_max_tokens(4);
  probe.set_ttft_slo_ms(1e6);
  const Streamed first = Generate(cluster->stub(), probe);
  ASSERT_TRUE(first.status.ok()) << first.status.error_message();
  const double alone_ms = first.done.timeline().predicted_ttft_ms();
  ASSERT_GT(alone_ms, 0);
  EXPECT_GT(first.done.timeline().predicted_tpot_ms(), 0);
  EXPECT_NE(first.done.timeline().scheduler_note().find("slo-aware"), std::string::npos);

  // 48 at once, each allowing 4x the time of a prefill alone: the queue outgrows that. (Each
  // starts with its own token: no prefix in common, nothing to take from the cache.)
  api::GenerateRequest r = probe;
  r.set_max_tokens(8);
  r.set_ttft_slo_ms(4 * alone_ms);
  std::vector<std::future<Streamed>> futures;
  for (int i = 0; i < 48; ++i) {
    r.set_prompt_token_ids(0, 150 + i);
    futures.push_back(
        std::async(std::launch::async, [&cluster, r] { return Generate(cluster->stub(), r); }));
  }
  int ok = 0, refused = 0;
  for (auto& f : futures) {
    const Streamed got = f.get();
    if (got.status.ok()) {
      ++ok;
      EXPECT_LE(got.done.timeline().predicted_ttft_ms(), 4 * alone_ms + 1e-6);
    } else {
      ASSERT_EQ(got.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
          << got.status.error_message();
      EXPECT_NE(got.status.error_message().find("TTFT"), std::string::npos);
      ++refused;
    }
  }
  EXPECT_GE(ok, 1);
  EXPECT_GE(refused, 1);
  const api::ClusterStatus status = FreshStatus(cluster->stub());
  EXPECT_EQ(status.policy(), "slo-aware");
  EXPECT_EQ(status.requests_refused_slo(), refused);
  ExpectAllFree(cluster->stub());
  cluster.reset();

  // pdserve plan on that profile, then pdserve up --plan starts what it planned.
  const std::string plan = testing::ScratchDir() + "/plan.json";
  const std::string plan_cmd =
      absl::StrCat(PDSERVE_BINARY, " plan --profile ", profile,
                   " --workload code --length-scale 0.1 --max-model-len 200 --slo-ttft 200 "
                   "--slo-tpot 50 --gpus 3 --num-requests 100 --bisect-steps 4 --policy "
                   "slo-aware --step-time-scale 2 --out ",
                   plan, " > /dev/null 2>&1");
  ASSERT_EQ(std::system(plan_cmd.c_str()), 0) << plan_cmd;
  std::ifstream in(plan);
  const nlohmann::json j = nlohmann::json::parse(in);
  const int planned = j["prefill_instances"].get<int>() + j["decode_instances"].get<int>();
  ASSERT_GE(planned, 2);
  ASSERT_LE(planned, 3);
  cluster = LocalCluster::Start(*model_dir_, {"--plan", plan});
  ASSERT_NE(cluster, nullptr);
  const api::ClusterStatus planned_status = FreshStatus(cluster->stub());
  int prefill = 0, decode = 0;
  for (const auto& inst : planned_status.instances()) {
    prefill += inst.role() == "prefill";
    decode += inst.role() == "decode";
  }
  EXPECT_EQ(prefill, j["prefill_instances"].get<int>());
  EXPECT_EQ(decode, j["decode_instances"].get<int>());
  EXPECT_EQ(planned_status.policy(), "slo-aware");
  const Streamed planned_probe = Generate(cluster->stub(), probe);
  EXPECT_EQ(planned_probe.tokens.size(), 4u);
  // The plan's live step-time scale reaches the front-end's predictions: the same prompt on
  // an idle cluster is predicted twice as long.
  EXPECT_NEAR(planned_probe.done.timeline().predicted_ttft_ms(), 2 * alone_ms, 1e-3 * alone_ms);
}

// A worker that dies takes the cluster down, and `pdserve up` says so in its exit status.
TEST_F(ServingTest, UpStopsAndFailsWhenAChildDies) {
  auto cluster = LocalCluster::Start(*model_dir_, {"--prefill", "1", "--decode", "1"});
  ASSERT_NE(cluster, nullptr);
  const std::vector<pid_t> children = cluster->process().Children();
  ASSERT_EQ(children.size(), 3u);
  kill(children.back(), SIGKILL);
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  int status = 0;
  while (waitpid(cluster->process().pid(), &status, WNOHANG) == 0 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 1);
  for (pid_t child : children) EXPECT_NE(kill(child, 0), 0) << child << " outlived up";
}

}  // namespace
}  // namespace pds
