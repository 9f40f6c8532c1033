// pdbench workloads: arrival processes against their distributions, length distributions,
// synthetic workloads and the ShareGPT / trace loaders (including their errors).
#include "client/workload.h"

#include <cmath>
#include <fstream>
#include <set>

#include "gtest/gtest.h"
#include "tests/testing/test_util.h"

namespace pds::client {
namespace {

struct GapStats {
  double rate;  // arrivals per second over the span
  double cv;    // coefficient of variation of the gaps
};

GapStats Gaps(const std::vector<double>& t) {
  std::vector<double> gaps;
  for (size_t i = 1; i < t.size(); ++i) gaps.push_back(t[i] - t[i - 1]);
  double mean = 0;
  for (double g : gaps) mean += g;
  mean /= gaps.size();
  double var = 0;
  for (double g : gaps) var += (g - mean) * (g - mean);
  var /= gaps.size();
  return {1.0 / mean, std::sqrt(var) / mean};
}

std::vector<double> Arrivals(ArrivalKind kind, double rate, double burstiness, int64_t n,
                             uint64_t seed = 7) {
  ArrivalOptions o;
  o.kind = kind;
  o.rate = rate;
  o.burstiness = burstiness;
  o.seed = seed;
  auto t = ArrivalTimes(o, n);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *t : std::vector<double>();
}

// 20000 gaps: the mean's relative standard error is <= 1/sqrt(20000 * burstiness) ~ 1%, so
// 4% bounds are ~4 sigma; the CV bounds are similarly loose.
constexpr int64_t kN = 20000;

TEST(PdbenchArrivalTest, PoissonHasTheRateAndUnitCv) {
  auto t = Arrivals(ArrivalKind::kPoisson, 10.0, 1.0, kN);
  ASSERT_EQ(t.size(), kN);
  EXPECT_EQ(t[0], 0.0);
  for (size_t i = 1; i < t.size(); ++i) ASSERT_GE(t[i], t[i - 1]);
  GapStats s = Gaps(t);
  EXPECT_NEAR(s.rate, 10.0, 0.4);
  EXPECT_NEAR(s.cv, 1.0, 0.05);
}

TEST(PdbenchArrivalTest, GammaBurstinessSetsTheCv) {
  // CV = 1 / sqrt(burstiness): 0.5 -> 1.414 (burstier), 2 -> 0.707 (smoother), 1 -> Poisson.
  for (double b : {0.5, 1.0, 2.0}) {
    SCOPED_TRACE(b);
    auto t = Arrivals(ArrivalKind::kGamma, 4.0, b, kN);
    ASSERT_EQ(t.size(), kN);
    GapStats s = Gaps(t);
    EXPECT_NEAR(s.rate, 4.0, 4.0 * 0.04);
    EXPECT_NEAR(s.cv, 1.0 / std::sqrt(b), 0.06 / std::sqrt(b));
  }
}

TEST(PdbenchArrivalTest, ConstantIsEvenlySpaced) {
  auto t = Arrivals(ArrivalKind::kConstant, 8.0, 1.0, 1000);
  ASSERT_EQ(t.size(), 1000u);
  for (size_t i = 0; i < t.size(); ++i) ASSERT_DOUBLE_EQ(t[i], i / 8.0);
  GapStats s = Gaps(t);
  EXPECT_NEAR(s.rate, 8.0, 1e-9);
  EXPECT_LT(s.cv, 1e-9);
}

TEST(PdbenchArrivalTest, SeededAndDurationBounded) {
  EXPECT_EQ(Arrivals(ArrivalKind::kPoisson, 3, 1, 100, 1),
            Arrivals(ArrivalKind::kPoisson, 3, 1, 100, 1));
  EXPECT_NE(Arrivals(ArrivalKind::kPoisson, 3, 1, 100, 1),
            Arrivals(ArrivalKind::kPoisson, 3, 1, 100, 2));
  ArrivalOptions o;
  o.rate = 50;
  auto t = ArrivalTimes(o, -1, 100.0);
  ASSERT_TRUE(t.ok());
  EXPECT_NEAR(static_cast<double>(t->size()), 5000, 300);
  EXPECT_LT(t->back(), 100.0);
  auto capped = ArrivalTimes(o, -1, 100.0, /*max_count=*/10);
  ASSERT_TRUE(capped.ok());
  EXPECT_EQ(capped->size(), 10u);
  o.kind = ArrivalKind::kConstant;
  o.rate = 2;
  auto c = ArrivalTimes(o, -1, 3.0);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(*c, (std::vector<double>{0, 0.5, 1.0, 1.5, 2.0, 2.5}));
}

TEST(PdbenchArrivalTest, BadOptionsAreErrors) {
  ArrivalOptions o;
  o.rate = 0;
  EXPECT_EQ(ArrivalTimes(o, 10).status().code(), absl::StatusCode::kInvalidArgument);
  o.rate = 1;
  o.burstiness = -1;
  EXPECT_EQ(ArrivalTimes(o, 10).status().code(), absl::StatusCode::kInvalidArgument);
  o.burstiness = 1;
  EXPECT_EQ(ArrivalTimes(o, -1, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(ParseArrivalKind("uniform").ok());
  EXPECT_EQ(*ParseArrivalKind("gamma"), ArrivalKind::kGamma);
}

TEST(PdbenchLengthDistTest, FixedUniformLogNormal) {
  Rng rng(3);
  LengthDist fixed = LengthDist::Fixed(17);
  for (int i = 0; i < 100; ++i) ASSERT_EQ(fixed.Sample(rng), 17);

  LengthDist uni = LengthDist::Uniform(10, 20);
  std::set<int64_t> seen;
  double sum = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    int64_t v = uni.Sample(rng);
    ASSERT_GE(v, 10);
    ASSERT_LE(v, 20);
    seen.insert(v);
    sum += v;
  }
  EXPECT_EQ(seen.size(), 11u);
  EXPECT_NEAR(sum / n, 15.0, 0.1);
  EXPECT_DOUBLE_EQ(uni.UnclippedMean(), 15.0);

  LengthDist ln = LengthDist::LogNormal(100, 0.5, 10, 1000);
  std::vector<int64_t> v;
  for (int i = 0; i < n; ++i) v.push_back(ln.Sample(rng));
  std::sort(v.begin(), v.end());
  EXPECT_GE(v.front(), 10);
  EXPECT_LE(v.back(), 1000);
  EXPECT_NEAR(static_cast<double>(v[n / 2]), 100, 4);
  double mean = 0;
  for (int64_t x : v) mean += x;
  EXPECT_NEAR(mean / n, ln.UnclippedMean(), 0.04 * ln.UnclippedMean());
}

TEST(PdbenchSyntheticTest, ShapesMatchTheirDocumentation) {
  struct Want {
    DatasetKind kind;
    double prompt_median, output_median;
    int64_t prompt_min, prompt_max, output_min, output_max;
  };
  for (const Want& w : {Want{DatasetKind::kChatbot, 256, 160, 8, 2048, 8, 1024},
                        Want{DatasetKind::kCode, 150, 90, 32, 512, 16, 384},
                        Want{DatasetKind::kSummarization, 1600, 80, 512, 4096, 16, 256}}) {
    SCOPED_TRACE(DatasetKindName(w.kind));
    DatasetOptions o;
    o.kind = w.kind;
    o.num_requests = 4000;
    o.seed = 11;
    auto specs = BuildDataset(o);
    ASSERT_TRUE(specs.ok()) << specs.status();
    ASSERT_EQ(specs->size(), 4000u);
    std::vector<int64_t> p, out;
    for (const RequestSpec& s : *specs) {
      ASSERT_FALSE(s.use_text);
      ASSERT_EQ(static_cast<int64_t>(s.prompt_token_ids.size()), s.prompt_len);
      p.push_back(s.prompt_len);
      out.push_back(s.output_len);
    }
    std::sort(p.begin(), p.end());
    std::sort(out.begin(), out.end());
    EXPECT_NEAR(p[p.size() / 2], w.prompt_median, 0.06 * w.prompt_median);
    EXPECT_NEAR(out[out.size() / 2], w.output_median, 0.06 * w.output_median);
    EXPECT_GE(p.front(), w.prompt_min);
    EXPECT_LE(p.back(), w.prompt_max);
    EXPECT_GE(out.front(), w.output_min);
    EXPECT_LE(out.back(), w.output_max);
  }
  auto scaled = SyntheticWorkloadShape(DatasetKind::kSummarization, 0.1);
  ASSERT_TRUE(scaled.ok());
  EXPECT_DOUBLE_EQ(scaled->prompt.a, 160);
  EXPECT_EQ(scaled->prompt.max, 410);
  EXPECT_FALSE(SyntheticWorkloadShape(DatasetKind::kRandom, 1).ok());
  EXPECT_FALSE(SyntheticWorkloadShape(DatasetKind::kChatbot, 0).ok());
}

TEST(PdbenchDatasetTest, RandomPromptsAreIdsInTheVocabRange) {
  DatasetOptions o;
  o.num_requests = 50;
  o.input_len = 33;
  o.output_len = 7;
  o.vocab_lo = 100;
  o.vocab_hi = 110;
  o.seed = 5;
  auto specs = BuildDataset(o);
  ASSERT_TRUE(specs.ok()) << specs.status();
  ASSERT_EQ(specs->size(), 50u);
  for (const RequestSpec& s : *specs) {
    ASSERT_EQ(s.prompt_token_ids.size(), 33u);
    EXPECT_EQ(s.output_len, 7);
    EXPECT_LT(s.arrival_s, 0);
    for (int32_t id : s.prompt_token_ids) {
      ASSERT_GE(id, 100);
      ASSERT_LT(id, 110);
    }
  }
  auto again = BuildDataset(o);
  EXPECT_EQ((*again)[3].prompt_token_ids, (*specs)[3].prompt_token_ids);

  o.range_ratio = 0.5;
  auto ranged = BuildDataset(o);
  ASSERT_TRUE(ranged.ok());
  for (const RequestSpec& s : *ranged) {
    EXPECT_GE(s.prompt_len, 17);
    EXPECT_LE(s.prompt_len, 50);
    EXPECT_GE(s.output_len, 4);
    EXPECT_LE(s.output_len, 11);
  }

  o.range_ratio = 0;
  o.max_model_len = 20;
  auto capped = BuildDataset(o);
  ASSERT_TRUE(capped.ok());
  EXPECT_EQ((*capped)[0].prompt_len, 13);
  EXPECT_EQ((*capped)[0].output_len, 7);

  o.max_model_len = 0;
  o.text_prompts = true;
  auto text = BuildDataset(o);
  ASSERT_TRUE(text.ok());
  EXPECT_TRUE((*text)[0].use_text);
  EXPECT_EQ(std::count((*text)[0].prompt_text.begin(), (*text)[0].prompt_text.end(), ' '), 32);

  o.vocab_hi = o.vocab_lo;
  EXPECT_EQ(BuildDataset(o).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PdbenchDatasetTest, SharedPrefixesStartEveryPromptAndLeaveTheRestUnchanged) {
  DatasetOptions o;
  o.kind = DatasetKind::kChatbot;
  o.num_requests = 60;
  o.length_scale = 0.1;
  o.seed = 9;
  auto plain = BuildDataset(o);
  ASSERT_TRUE(plain.ok()) << plain.status();
  o.shared_prefix_len = 40;
  o.num_shared_prefixes = 3;
  auto shared = BuildDataset(o);
  ASSERT_TRUE(shared.ok()) << shared.status();
  std::set<std::vector<int32_t>> prefixes;
  for (size_t i = 0; i < shared->size(); ++i) {
    const RequestSpec& s = (*shared)[i];
    const RequestSpec& p = (*plain)[i];
    ASSERT_EQ(s.prompt_token_ids.size(), p.prompt_token_ids.size() + 40);
    EXPECT_EQ(s.prompt_len, p.prompt_len + 40);
    EXPECT_EQ(s.output_len, p.output_len);
    EXPECT_TRUE(std::equal(p.prompt_token_ids.begin(), p.prompt_token_ids.end(),
                           s.prompt_token_ids.begin() + 40))
        << "the request's own part is the one it had without a prefix";
    prefixes.insert({s.prompt_token_ids.begin(), s.prompt_token_ids.begin() + 40});
  }
  EXPECT_EQ(prefixes.size(), 3u) << "each of the 3 prefixes drawn in 60 requests";
  // Under a model length the request's own part is shortened, never the prefix.
  o.kind = DatasetKind::kRandom;
  o.input_len = 30;
  o.output_len = 10;
  o.max_model_len = 60;
  auto capped = BuildDataset(o);
  ASSERT_TRUE(capped.ok());
  for (const RequestSpec& s : *capped) {
    EXPECT_EQ(s.prompt_len, 50);
    EXPECT_EQ(s.output_len, 10);
  }
  o.max_model_len = 0;
  o.text_prompts = true;
  auto text = BuildDataset(o);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(std::count((*text)[0].prompt_text.begin(), (*text)[0].prompt_text.end(), ' '), 69);
  o.max_model_len = 41;
  EXPECT_EQ(BuildDataset(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.max_model_len = 0;
  o.num_shared_prefixes = 0;
  EXPECT_EQ(BuildDataset(o).status().code(), absl::StatusCode::kInvalidArgument);
}

std::string WriteTemp(const std::string& name, const std::string& content) {
  std::string path = pds::testing::ScratchDir() + "/" + name;
  std::ofstream(path) << content;
  return path;
}

TEST(PdbenchDatasetTest, ShareGpt) {
  const std::string json = R"([
    {"id": "a", "conversations": [{"from": "human", "value": "Hello there, how are you?"},
                                  {"from": "gpt", "value": "I am fine, thanks for asking!!"}]},
    {"id": "b", "conversations": [{"from": "human", "value": "only one turn"}]},
    {"id": "c", "conversations": [{"from": "human", "value": "Write a poem"},
                                  {"from": "gpt", "value": "Roses"},
                                  {"from": "human", "value": "more"}]}
  ])";
  std::string path = WriteTemp("sharegpt.json", json);
  auto specs = LoadShareGpt(path, 5, 0, 1);
  ASSERT_TRUE(specs.ok()) << specs.status();
  ASSERT_EQ(specs->size(), 5u);  // two usable conversations, cycled
  std::set<std::string> prompts;
  for (const RequestSpec& s : *specs) {
    EXPECT_TRUE(s.use_text);
    prompts.insert(s.prompt_text);
    if (s.prompt_text == "Write a poem") {
      EXPECT_EQ(s.output_len, 1);  // "Roses": 5 chars / 4
    }
    if (s.prompt_text == "Hello there, how are you?") {
      EXPECT_EQ(s.output_len, 7);  // 30 chars / 4
    }
  }
  EXPECT_EQ(prompts, (std::set<std::string>{"Write a poem", "Hello there, how are you?"}));
  auto forced = LoadShareGpt(path, 3, 64, 1);
  ASSERT_TRUE(forced.ok());
  for (const RequestSpec& s : *forced) EXPECT_EQ(s.output_len, 64);

  DatasetOptions o;
  o.kind = DatasetKind::kShareGpt;
  o.num_requests = 2;
  EXPECT_NE(BuildDataset(o).status().message().find("--dataset-path"), std::string::npos);
  o.path = path;
  EXPECT_TRUE(BuildDataset(o).ok());
}

TEST(PdbenchDatasetTest, ShareGptErrorsNameTheFileAndProblem) {
  auto missing = LoadShareGpt("/nonexistent/sharegpt.json", 1, 0, 0);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("/nonexistent/sharegpt.json"), std::string::npos);

  struct Case {
    const char* content;
    const char* message;
  };
  for (const Case& c :
       {Case{"{not json", "not valid JSON"},
        Case{R"({"conversations": []})", "expected a JSON array"},
        Case{R"([{"conversations": [{"value": "x"}]}])", "no usable"}, Case{"[]", "no usable"},
        Case{R"([{"conversations": [{"from": "human"}, {"value": "y"}]}])", "entry 0"}}) {
    SCOPED_TRACE(c.content);
    std::string path = WriteTemp("bad_sharegpt.json", c.content);
    auto r = LoadShareGpt(path, 1, 0, 0);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find(c.message), std::string::npos) << r.status();
    EXPECT_NE(r.status().message().find(path), std::string::npos) << r.status();
  }
}

TEST(PdbenchDatasetTest, Trace) {
  const std::string trace =
      "# arrival_time in seconds\n"
      "{\"arrival_time\": 0.5, \"prompt_len\": 12, \"output_len\": 4}\n"
      "\n"
      "{\"arrival_time\": 0.0, \"prompt\": \"hello world\", \"output_len\": 8}\n"
      "{\"arrival_time\": 0.25, \"prompt_token_ids\": [5, 6, 7], \"output_len\": 2}\n";
  DatasetOptions o;
  o.kind = DatasetKind::kTrace;
  o.path = WriteTemp("trace.jsonl", trace);
  o.num_requests = -1;
  auto specs = BuildDataset(o);
  ASSERT_TRUE(specs.ok()) << specs.status();
  ASSERT_EQ(specs->size(), 3u);
  EXPECT_EQ((*specs)[0].arrival_s, 0.0);
  EXPECT_TRUE((*specs)[0].use_text);
  EXPECT_EQ((*specs)[0].prompt_text, "hello world");
  EXPECT_EQ((*specs)[0].output_len, 8);
  EXPECT_EQ((*specs)[1].arrival_s, 0.25);
  EXPECT_EQ((*specs)[1].prompt_token_ids, (std::vector<int32_t>{5, 6, 7}));
  EXPECT_EQ((*specs)[2].arrival_s, 0.5);
  EXPECT_EQ((*specs)[2].prompt_token_ids.size(), 12u);
  EXPECT_EQ((*specs)[2].output_len, 4);
  o.num_requests = 2;  // the first two lines of the file
  auto two = BuildDataset(o);
  ASSERT_TRUE(two.ok());
  EXPECT_EQ(two->size(), 2u);
}

TEST(PdbenchDatasetTest, TraceErrorsNameTheLine) {
  struct Case {
    const char* content;
    const char* message;
  };
  const std::string good = "{\"arrival_time\": 0, \"prompt_len\": 3, \"output_len\": 1}\n";
  for (const Case& c : {
           Case{"{oops", "line 2: not valid JSON"},
           Case{"[1, 2]", "line 2: expected a JSON object"},
           Case{R"({"prompt_len": 3, "output_len": 1})",
                "line 2: needs a numeric \"arrival_time\""},
           Case{R"({"arrival_time": -1, "prompt_len": 3, "output_len": 1})",
                "line 2: \"arrival_time\" must"},
           Case{R"({"arrival_time": 1, "prompt_len": 3})",
                "line 2: needs an integer \"output_len\""},
           Case{R"({"arrival_time": 1, "prompt_len": 3, "prompt": "x", "output_len": 1})",
                "line 2: needs exactly one of"},
           Case{R"({"arrival_time": 1, "output_len": 1})", "line 2: needs exactly one of"},
           Case{R"({"arrival_time": 1, "prompt_len": 0, "output_len": 1})",
                "line 2: \"prompt_len\" must"},
           Case{R"({"arrival_time": 1, "prompt_token_ids": [1, "a"], "output_len": 1})",
                "line 2: \"prompt_token_ids\" must"},
       }) {
    SCOPED_TRACE(c.content);
    std::string path = WriteTemp("bad_trace.jsonl", good + c.content + "\n");
    DatasetOptions o;
    o.num_requests = -1;
    auto r = LoadTrace(path, o);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find(c.message), std::string::npos) << r.status();
    EXPECT_NE(r.status().message().find(path), std::string::npos) << r.status();
  }
  DatasetOptions o;
  EXPECT_EQ(LoadTrace("/nonexistent/trace.jsonl", o).status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(LoadTrace(WriteTemp("empty.jsonl", "\n# nothing\n"), o)
                .status()
                .message()
                .find("no requests"),
            std::string::npos);
}

TEST(PdbenchDatasetTest, Names) {
  for (const char* name : {"random", "chatbot", "code", "summarization", "sharegpt", "trace"}) {
    auto k = ParseDatasetKind(name);
    ASSERT_TRUE(k.ok());
    EXPECT_STREQ(DatasetKindName(*k), name);
  }
  EXPECT_FALSE(ParseDatasetKind("sonnet").ok());
}

}  // namespace
}  // namespace pds::client
