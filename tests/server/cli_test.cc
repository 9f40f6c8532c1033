// The pdserve command line end to end: make-model writes a loadable directory, generate
// --json prints the documented fields, errors exit non-zero with a message.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/test_util.h"

namespace {

struct Result {
  int exit_code;
  std::string output;  // stdout
  std::string errors;  // stderr
};

Result RunCommand(const std::string& args) {
  const std::string err_file = pds::testing::ScratchDir() + "/stderr.txt";
  const std::string cmd = std::string(PDSERVE_BINARY) + " " + args + " 2>" + err_file;
  FILE* pipe = popen(cmd.c_str(), "r");
  Result r{-1, "", ""};
  if (pipe == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) r.output.append(buf, n);
  const int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream err(err_file);
  r.errors.assign(std::istreambuf_iterator<char>(err), {});
  return r;
}

class CliTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = pds::testing::ScratchDir() + "/cli_tiny";
    std::filesystem::remove_all(dir_);
    const Result r = RunCommand("make-model --preset tiny --seed 3 --dtype bf16 --out " + dir_);
    ASSERT_EQ(r.exit_code, 0) << r.output << r.errors;
  }
  static std::string dir_;
};
std::string CliTest::dir_;

TEST_F(CliTest, MakeModelWritesACompleteDirectory) {
  for (const char* f : {"config.json", "generation_config.json", "model.safetensors",
                        "tokenizer.json", "tokenizer_config.json"}) {
    EXPECT_TRUE(std::filesystem::exists(std::filesystem::path(dir_) / f)) << f;
  }
}

TEST_F(CliTest, GenerateJsonWithLogprobs) {
  const Result r = RunCommand("generate --model " + dir_ +
                              " --prompt-ids 5,6,7 --max-tokens 5 --ignore-eos --logprobs 3 "
                              "--json --threads 1");
  ASSERT_EQ(r.exit_code, 0) << r.output << r.errors;
  const auto j = nlohmann::json::parse(r.output, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << r.output;
  ASSERT_EQ(j["token_ids"].size(), 5u);
  EXPECT_EQ(j["finish_reason"], "length");
  ASSERT_EQ(j["logprobs"].size(), 5u);
  EXPECT_EQ(j["logprobs"][0]["top_logprobs"].size(), 3u);
  EXPECT_EQ(j["logprobs"][0]["token_id"], j["token_ids"][0]);
  // Greedy is deterministic; seeded sampling too.
  const Result again = RunCommand("generate --model " + dir_ +
                                  " --prompt-ids 5,6,7 --max-tokens 5 --ignore-eos --json");
  EXPECT_EQ(nlohmann::json::parse(again.output)["token_ids"], j["token_ids"]);
  const std::string sampled = "generate --model " + dir_ +
                              " --prompt-ids 5,6,7 --max-tokens 8 --ignore-eos --json "
                              "--temperature 1 --top-p 0.9 --top-k 40 --seed 11";
  EXPECT_EQ(nlohmann::json::parse(RunCommand(sampled).output)["token_ids"],
            nlohmann::json::parse(RunCommand(sampled).output)["token_ids"]);
}

// --prompt-logprobs: null for the first prompt token, then each one's logprob, rank and top K;
// the token after the prompt (--prompt-ids 5,6,7,A with A the greedy reply to 5,6,7) has the
// logprob the reply had; the text output gives the prompt's log-likelihood; --allowed-token-ids
// holds the reply to those ids.
TEST_F(CliTest, GenerateWithPromptLogprobsAndAllowedTokens) {
  const auto run = [&](const std::string& flags) {
    const Result r = RunCommand("generate --model " + dir_ + " --max-tokens 2 --ignore-eos " +
                                "--threads 1 " + flags);
    EXPECT_EQ(r.exit_code, 0) << r.output << r.errors;
    return r;
  };
  const auto first = nlohmann::json::parse(run("--prompt-ids 5,6,7 --logprobs 0 --json").output);
  const int reply = first["token_ids"][0];
  const auto j = nlohmann::json::parse(
      run("--prompt-ids 5,6,7," + std::to_string(reply) + " --prompt-logprobs 2 --json").output);
  ASSERT_EQ(j["prompt_logprobs"].size(), 4u) << j.dump();
  EXPECT_TRUE(j["prompt_logprobs"][0].is_null());
  EXPECT_EQ(j["prompt_logprobs"][1]["token_id"], 6);
  EXPECT_EQ(j["prompt_logprobs"][3]["token_id"], reply);
  EXPECT_EQ(j["prompt_logprobs"][3]["rank"], 1);  // the greedy reply was the likeliest
  EXPECT_EQ(j["prompt_logprobs"][3]["top_logprobs"].size(), 2u);
  EXPECT_NEAR(j["prompt_logprobs"][3]["logprob"].get<double>(),
              first["logprobs"][0]["logprob"].get<double>(), 1e-4);
  const Result text = run("--prompt-ids 5,6,7 --prompt-logprobs 0");
  EXPECT_NE(text.output.find("prompt log-likelihood:"), std::string::npos) << text.output;
  EXPECT_NE(text.output.find("over 2 tokens"), std::string::npos) << text.output;
  const auto only =
      nlohmann::json::parse(run("--prompt-ids 5,6,7 --allowed-token-ids 9 --json").output);
  EXPECT_EQ(only["token_ids"], nlohmann::json({9, 9}));
  const Result refused = RunCommand("generate --model " + dir_ +
                                    " --prompt-ids 5,6,7 --prompt-logprobs 21 --threads 1");
  EXPECT_NE(refused.exit_code, 0);
  EXPECT_NE(refused.errors.find("prompt_logprobs"), std::string::npos) << refused.errors;
}

// --speculative-tokens: the same greedy tokens, and the draft counts in the JSON; a bad count
// is refused by name.
TEST_F(CliTest, GenerateWithSpeculativeDecoding) {
  std::string ids;
  for (int j = 0; j < 40; ++j) ids += (j ? "," : "") + std::to_string(5 + j % 4);
  const std::string cmd = "generate --model " + dir_ + " --prompt-ids " + ids +
                          " --max-tokens 24 --ignore-eos --json --threads 1";
  const auto plain = nlohmann::json::parse(RunCommand(cmd).output, nullptr, false);
  const auto spec =
      nlohmann::json::parse(RunCommand(cmd + " --speculative-tokens 4").output, nullptr, false);
  ASSERT_FALSE(plain.is_discarded());
  ASSERT_FALSE(spec.is_discarded());
  EXPECT_EQ(spec["token_ids"], plain["token_ids"]);
  EXPECT_FALSE(plain.contains("speculative"));
  ASSERT_TRUE(spec.contains("speculative")) << spec.dump();
  EXPECT_GT(spec["speculative"]["draft_tokens"].get<int>(), 0) << spec.dump();
  EXPECT_LE(spec["speculative"]["accepted_tokens"].get<int>(),
            spec["speculative"]["draft_tokens"].get<int>());
  EXPECT_GE(spec["speculative"]["proposed_tokens"].get<int>(),
            spec["speculative"]["draft_tokens"].get<int>());
  const Result refused = RunCommand(cmd + " --speculative-tokens 65");
  EXPECT_NE(refused.exit_code, 0);
  EXPECT_NE(refused.errors.find("--speculative-tokens"), std::string::npos) << refused.errors;
  // A worker's choice of drafts: paying or all.
  const Result bad = RunCommand("decode --model " + dir_ +
                                " --threads 1 --speculative-tokens 4 --speculative-drafts some");
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.errors.find("--speculative-drafts 'some': expected paying or all"),
            std::string::npos)
      << bad.errors;
}

// Logits processing from the command line: a +100 bias holds every token; bad values are
// refused by name.
TEST_F(CliTest, GenerateWithPenaltiesAndLogitBias) {
  const Result r = RunCommand("generate --model " + dir_ +
                              " --prompt-ids 5,6,7 --max-tokens 4 --ignore-eos --json "
                              "--logit-bias 42:100,7:-5 --repetition-penalty 1.2 "
                              "--frequency-penalty 0.5 --presence-penalty 0.5 --threads 1");
  ASSERT_EQ(r.exit_code, 0) << r.output << r.errors;
  EXPECT_EQ(nlohmann::json::parse(r.output)["token_ids"], nlohmann::json({42, 42, 42, 42}));
  for (const char* bad : {"--logit-bias 42", "--logit-bias 42:x", "--min-p 2",
                          "--presence-penalty 3", "--min-tokens 9"}) {
    const Result refused = RunCommand("generate --model " + dir_ +
                                      " --prompt-ids 5,6,7 --max-tokens 4 --threads 1 " + bad);
    EXPECT_NE(refused.exit_code, 0) << bad;
    EXPECT_FALSE(refused.errors.empty()) << bad;
  }
}

TEST_F(CliTest, RandomWeightsPresetWithoutAModelDirectory) {
  // A preset shape made on the backend (what GPU benchmarks use for real model sizes).
  const std::string cmd =
      "generate --random-weights tiny --prompt-ids 5,6,7 --max-tokens 4 --ignore-eos --json "
      "--threads 1";
  const Result r = RunCommand(cmd);
  ASSERT_EQ(r.exit_code, 0) << r.output << r.errors;
  const auto j = nlohmann::json::parse(r.output, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << r.output;
  EXPECT_EQ(j["token_ids"].size(), 4u);
  EXPECT_EQ(nlohmann::json::parse(RunCommand(cmd).output)["token_ids"], j["token_ids"]);
  Result bad = RunCommand("generate --random-weights tiny --model " + dir_ + " --prompt-ids 1");
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.errors.find("exactly one of --model and --random-weights"), std::string::npos)
      << bad.errors;
  bad = RunCommand("generate --random-weights tiny --prompt hello");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.errors.find("--prompt-ids"), std::string::npos) << bad.errors;
}

TEST_F(CliTest, TextPromptAndTokenizeRoundTrip) {
  const Result r = RunCommand("generate --model " + dir_ +
                              " --prompt 'Hello there' --max-tokens 4 --ignore-eos --json");
  ASSERT_EQ(r.exit_code, 0) << r.output << r.errors;
  const auto j = nlohmann::json::parse(r.output, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << r.output;
  EXPECT_TRUE(j.contains("text"));
  EXPECT_EQ(j["token_ids"].size(), 4u);
  const std::string input = pds::testing::ScratchDir() + "/lines.txt";
  {
    std::ofstream out(input);
    out << "Hello, world!\n\nnaïve café 日本語 👍\n";
  }
  const Result ids = RunCommand("tokenize --tokenizer " + dir_ + "/tokenizer.json < " + input);
  ASSERT_EQ(ids.exit_code, 0) << ids.errors;
  const std::string ids_file = pds::testing::ScratchDir() + "/ids.txt";
  {
    std::ofstream out(ids_file);
    out << ids.output;
  }
  const Result text = RunCommand("tokenize --decode --skip-special --tokenizer " + dir_ +
                                 "/tokenizer.json < " + ids_file);
  ASSERT_EQ(text.exit_code, 0) << text.errors;
  EXPECT_EQ(text.output, "\"Hello, world!\"\n\"\"\n\"naïve café 日本語 👍\"\n");
}

TEST_F(CliTest, ProfileWritesAFittedLatencyModel) {
  const std::string out = pds::testing::ScratchDir() + "/profile.json";
  const Result r =
      RunCommand("profile --quick --reps 1 --threads 1 --model " + dir_ + " --out " + out);
  ASSERT_EQ(r.exit_code, 0) << r.output << r.errors;
  std::ifstream in(out);
  const auto j = nlohmann::json::parse(in, nullptr, false);
  ASSERT_FALSE(j.is_discarded());
  EXPECT_GE(j["samples"]["prefill"].size(), 8u);
  EXPECT_GE(j["samples"]["decode"].size(), 8u);
  EXPECT_EQ(j["latency_model"]["prefill"]["coef"].size(), 3u);
  EXPECT_EQ(j["latency_model"]["decode"]["coef"].size(), 3u);
  EXPECT_TRUE(j["latency_model"]["decode"]["fit"]["median_rel_error"].is_number());
  EXPECT_EQ(j["model"]["architecture"], "LlamaForCausalLM");
  // The KV shape the planner needs for hand-off sizes (tiny: 2 kv heads of 16).
  EXPECT_EQ(j["model"]["num_kv_heads"], 2);
  EXPECT_EQ(j["model"]["head_dim"], 16);
  for (const auto& s : j["samples"]["prefill"]) EXPECT_GT(s["seconds"].get<double>(), 0.0);
}

TEST_F(CliTest, ProfileUnderANeighbourPinned) {
  // Both on CPU 0 (any machine has it): the neighbour copy runs the other phase meanwhile.
  const std::string out = pds::testing::ScratchDir() + "/profile_neighbor.json";
  Result r = RunCommand(
      "profile --quick --reps 1 --rounds 1 --threads 1 --cpus 0 "
      "--neighbor-cpus 0 --model " +
      dir_ + " --out " + out);
  ASSERT_EQ(r.exit_code, 0) << r.output << r.errors;
  std::ifstream in(out);
  const auto j = nlohmann::json::parse(in, nullptr, false);
  ASSERT_FALSE(j.is_discarded());
  EXPECT_EQ(j["machine"]["cpus"], "0");
  EXPECT_EQ(j["machine"]["neighbor_cpus"], "0");
  EXPECT_EQ(j["latency_model"]["prefill"]["coef"].size(), 3u);
  r = RunCommand("profile --quick --cpus 0-x --model " + dir_ + " --out " + out);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.errors.find("bad CPU list '0-x'"), std::string::npos) << r.errors;
  r = RunCommand("profile --quick --threads 1 --neighbor-cpus 1000 --model " + dir_ + " --out " +
                 out);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.errors.find("the neighbour load: --cpus 1000"), std::string::npos) << r.errors;
}

TEST_F(CliTest, PlanPrintsThePlanFile) {
  const std::string profile = pds::testing::ScratchDir() + "/plan_profile.json";
  {
    std::ofstream out(profile);
    out << R"({"model": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "BF16"},
               "latency_model": {"prefill": {"coef": [0.005, 2e-4, 1e-8]},
                                 "decode": {"coef": [0.003, 1e-6, 5e-4]}}})";
  }
  const std::string plan_file = pds::testing::ScratchDir() + "/plan.json";
  const std::string common = "plan --profile " + profile +
                             " --workload code --num-requests 60 --max-instances 2 --seed 1 ";
  Result r = RunCommand(common + "--slo-ttft 0.5s --slo-tpot 100ms --json --out " + plan_file);
  ASSERT_EQ(r.exit_code, 0) << r.output << r.errors;
  const auto j = nlohmann::json::parse(r.output, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << r.output;
  EXPECT_EQ(j["prefill_instances"], 1);
  EXPECT_EQ(j["decode_instances"], 1);
  EXPECT_GT(j["goodput_per_gpu"].get<double>(), 0.0);
  EXPECT_GT(j["colocated_goodput_per_gpu"].get<double>(), 0.0);
  EXPECT_GE(j["predicted_attainment"].get<double>(), 0.9);
  EXPECT_EQ(j["slo"]["ttft_ms"], 500.0);
  EXPECT_EQ(j["kv_transfer"]["bytes_per_token"], 2 * 2 * 2 * 16 * 2);
  std::ifstream written(plan_file);
  EXPECT_EQ(nlohmann::json::parse(written, nullptr, false), j);

  // Predictions at given rates, and slower steps (a measured live/profiled ratio) lower them.
  r = RunCommand(common + "--slo-ttft 0.5s --slo-tpot 100ms --json --at-rates 1,2");
  ASSERT_EQ(r.exit_code, 0) << r.errors;
  const auto at = nlohmann::json::parse(r.output, nullptr, false);
  ASSERT_EQ(at["at_rates"].size(), 2u) << r.output;
  EXPECT_EQ(at["at_rates"][1]["rate"], 2.0);
  r = RunCommand(common + "--slo-ttft 0.5s --slo-tpot 100ms --json --step-time-scale 2");
  ASSERT_EQ(r.exit_code, 0) << r.errors;
  const auto slower = nlohmann::json::parse(r.output, nullptr, false);
  EXPECT_LT(slower["goodput_per_gpu"].get<double>(), j["goodput_per_gpu"].get<double>());

  // Calibration from a live run's CSV: 30 single-prompt steps, each 1.5x the model's time
  // (prefill 0.005 + 2e-4 * 40 + 1e-8 * 1600 = 13.016 ms), dispatch 2 ms, relay 0.5 ms.
  const std::string csv = pds::testing::ScratchDir() + "/run.csv";
  {
    std::ofstream out(csv);
    out << "index,ok,send_s,prompt_tokens,queue_ms,prefill_ms,dispatch_ms,relay_ms\n";
    for (int i = 0; i < 30; ++i) {
      out << i << ",1," << i * 0.5 << ",40,0.1," << 1.5 * 13.016 << ",2.0,0.5\n";
    }
  }
  r = RunCommand(common + "--slo-ttft 0.5s --slo-tpot 100ms --json --calibrate " + csv);
  ASSERT_EQ(r.exit_code, 0) << r.errors;
  const auto calibrated = nlohmann::json::parse(r.output, nullptr, false);
  ASSERT_TRUE(calibrated.contains("live")) << r.output;
  EXPECT_NEAR(calibrated["live"]["step_time_scale"].get<double>(), 1.5, 1e-6);
  EXPECT_NEAR(calibrated["live"]["dispatch_latency_s"].get<double>(), 0.002, 1e-9);
  EXPECT_NEAR(calibrated["live"]["relay_latency_s"].get<double>(), 0.0005, 1e-9);
  EXPECT_EQ(calibrated["live"]["calibration"]["steps"], 30);
  EXPECT_LT(calibrated["goodput_per_gpu"].get<double>(), j["goodput_per_gpu"].get<double>());
  // An explicit flag overrides its calibrated figure.
  r = RunCommand(common + "--slo-ttft 500 --json --calibrate " + csv + " --step-time-scale 1.2");
  ASSERT_EQ(r.exit_code, 0) << r.errors;
  EXPECT_NEAR(nlohmann::json::parse(r.output)["live"]["step_time_scale"].get<double>(), 1.2, 1e-9);
  r = RunCommand(common + "--slo-ttft 500 --calibrate " + profile);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.errors.find("not a pdbench per-request CSV"), std::string::npos) << r.errors;

  // A shared-prefix workload: the simulated prefix cache serves more (the plan records it, and
  // `up --plan` gives the workers the same setting); --prefix-caching off plans without it.
  const std::string shared = common +
                             "--slo-ttft 0.3s --slo-tpot 100ms --json --shared-prefix-len 256 "
                             "--num-shared-prefixes 2 ";
  r = RunCommand(shared);
  ASSERT_EQ(r.exit_code, 0) << r.errors;
  const auto cached = nlohmann::json::parse(r.output, nullptr, false);
  EXPECT_EQ(cached["policies"]["prefix_caching"], true);
  EXPECT_EQ(cached["workload"]["shared_prefix_len"], 256);
  r = RunCommand(shared + "--prefix-caching off");
  ASSERT_EQ(r.exit_code, 0) << r.errors;
  const auto uncached = nlohmann::json::parse(r.output, nullptr, false);
  EXPECT_EQ(uncached["policies"]["prefix_caching"], false);
  EXPECT_GT(cached["goodput_per_gpu"].get<double>(), uncached["goodput_per_gpu"].get<double>());
  r = RunCommand(common + "--slo-ttft 500 --prefix-caching maybe");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.errors.find("--prefix-caching 'maybe': expected on or off"), std::string::npos)
      << r.errors;

  // Conversations: rates count conversations, and the simulated turns reuse their history.
  const std::string chat = common +
                           "--slo-ttft 0.3s --slo-tpot 100ms --json --turns 3 --think-time 0.2 "
                           "--max-model-len 1024 --at-rates 0.5 ";
  r = RunCommand(chat);
  ASSERT_EQ(r.exit_code, 0) << r.errors;
  const auto turns = nlohmann::json::parse(r.output, nullptr, false);
  ASSERT_FALSE(turns.is_discarded()) << r.output;
  EXPECT_EQ(turns["rate_unit"], "conversations/s");
  EXPECT_EQ(turns["workload"]["turns"], 3);
  EXPECT_DOUBLE_EQ(turns["workload"]["think_time"].get<double>(), 0.2);
  r = RunCommand(chat + "--prefix-caching off");
  ASSERT_EQ(r.exit_code, 0) << r.errors;
  const auto turns_uncached = nlohmann::json::parse(r.output, nullptr, false);
  ASSERT_FALSE(turns_uncached.is_discarded()) << r.output;
  EXPECT_LT(turns["at_rates"][0]["mean_ttft_ms"].get<double>(),
            turns_uncached["at_rates"][0]["mean_ttft_ms"].get<double>());
  r = RunCommand(common + "--slo-ttft 500 --turns 3");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.errors.find("--turns needs"), std::string::npos) << r.errors;
  r = RunCommand(common + "--slo-ttft 500 --turns 3 --max-model-len 1024 --think-time -1");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.errors.find("--think-time"), std::string::npos) << r.errors;

  r = RunCommand(common + "--slo-ttft 500 --at-rates 1,x");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.errors.find("--at-rates: 'x'"), std::string::npos) << r.errors;

  r = RunCommand(common + "--slo-ttft 500 --slo-tpot 100 --rate 100000 --gpus 2");
  ASSERT_EQ(r.exit_code, 0) << r.errors;
  EXPECT_NE(r.output.find("NOT FEASIBLE: cannot serve"), std::string::npos) << r.output;

  r = RunCommand(common + "--slo-ttft fast");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.errors.find("--slo-ttft expects"), std::string::npos) << r.errors;
  r = RunCommand("plan --profile /nonexistent.json --slo-ttft 1");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.errors.find("/nonexistent.json"), std::string::npos) << r.errors;
}

TEST_F(CliTest, ErrorsAreClearAndNonZero) {
  Result r = RunCommand("generate --model /nonexistent --prompt-ids 1");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.errors.find("config.json"), std::string::npos) << r.errors;
  r = RunCommand("generate --model " + dir_ + " --prompt-ids 1,x");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.errors.find("not a token id"), std::string::npos) << r.errors;
  r = RunCommand("generate --model " + dir_ + " --prompt-ids 99999");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.errors.find("vocabulary"), std::string::npos) << r.errors;
  r = RunCommand("make-model --preset huge --out /tmp/x");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.errors.find("unknown preset"), std::string::npos) << r.errors;
  r = RunCommand("generate --bogus 1");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.errors.find("unknown flag --bogus"), std::string::npos) << r.errors;
  // A boolean flag's value is true/1 or false/0; anything else is an error, not "off".
  r = RunCommand("generate --model " + dir_ + " --prompt-ids 1 --json=yes");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.errors.find("--json takes true/1 or false/0"), std::string::npos) << r.errors;
  r = RunCommand("generate --model " + dir_ + " --prompt-ids 1 --max-tokens 2 --json=false");
  EXPECT_EQ(r.exit_code, 0) << r.errors;
  // A stall timeout that would take every worker (or none) for stalled is refused at start.
  for (const char* bad : {"0", "-5", "nan"}) {
    r = RunCommand("frontend --model " + dir_ + " --port 0 --worker-stall-timeout-s " + bad);
    EXPECT_EQ(r.exit_code, 2) << bad << ": " << r.errors;
    EXPECT_NE(r.errors.find("--worker-stall-timeout-s must be positive"), std::string::npos)
        << r.errors;
  }
}

// SIGTERM while `pdserve up` is still starting its cluster (the front-end is up, the workers
// are not healthy yet) stops what it started and exits 0, as it does once the cluster is ready.
TEST_F(CliTest, SignalDuringUpStartUpStopsTheClusterAndExitsZero) {
  const std::string self = std::to_string(getpid());
  if (!std::filesystem::exists("/proc/" + self + "/task/" + self + "/children")) {
    GTEST_SKIP() << "no /proc/PID/task/TID/children here (CONFIG_PROC_CHILDREN)";
  }
  const std::string ready = pds::testing::ScratchDir() + "/up_signal.ready";
  const std::string err = pds::testing::ScratchDir() + "/up_signal.stderr";
  std::filesystem::remove(ready);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    const int fd = open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) dup2(fd, 2);
    const int null = open("/dev/null", O_WRONLY);
    if (null >= 0) dup2(null, 1);
    execl(PDSERVE_BINARY, "pdserve", "up", "--model", dir_.c_str(), "--prefill", "1", "--decode",
          "1", "--port", "0", "--threads", "1", "--ready-file", ready.c_str(),
          static_cast<char*>(nullptr));
    _exit(127);
  }
  // Its first child (the front-end) exists once `up` has blocked the signals and started.
  std::vector<pid_t> children;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (children.empty() && std::chrono::steady_clock::now() < deadline) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/task/" + std::to_string(pid) + "/children");
    for (pid_t c; in >> c;) children.push_back(c);
    if (children.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  ASSERT_FALSE(children.empty()) << "pdserve up started no process";
  const bool was_ready = std::filesystem::exists(ready);
  ASSERT_EQ(kill(pid, SIGTERM), 0);
  int status = 0;
  pid_t r = 0;
  while ((r = waitpid(pid, &status, WNOHANG)) == 0 &&
         std::chrono::steady_clock::now() < deadline + std::chrono::seconds(30)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (r == 0) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    FAIL() << "pdserve up did not exit after SIGTERM";
  }
  std::ifstream in(err);
  const std::string errors((std::istreambuf_iterator<char>(in)), {});
  ASSERT_TRUE(WIFEXITED(status)) << errors;
  EXPECT_EQ(WEXITSTATUS(status), 0) << errors;
  if (!was_ready && !std::filesystem::exists(ready)) {
    EXPECT_NE(errors.find("during start-up, shutting the cluster down"), std::string::npos)
        << errors;
  }
  for (pid_t c : children) {  // stopped and reaped by `up`
    EXPECT_TRUE(kill(c, 0) == -1 && errno == ESRCH) << "process " << c << " outlived up";
  }
}

// Every command answers --help (the top-level usage promises it) with its usage and flags.
TEST_F(CliTest, EveryCommandHasHelp) {
  for (const char* command : {"make-model", "generate", "tokenize", "chat-template", "profile",
                              "plan", "up", "frontend", "prefill", "decode", "colocated"}) {
    const Result r = RunCommand(std::string(command) + " --help");
    EXPECT_EQ(r.exit_code, 0) << command << ": " << r.errors;
    EXPECT_EQ(r.output.rfind(std::string("usage: pdserve ") + command + " ", 0), 0u)
        << command << ": " << r.output;
    EXPECT_NE(r.output.find("  --help "), std::string::npos) << command << ": " << r.output;
  }
  EXPECT_NE(RunCommand("prefill --help").output.find("--kv-handoff"), std::string::npos);
  EXPECT_NE(RunCommand("up --help").output.find("--kv-handoff"), std::string::npos);
}

}  // namespace
