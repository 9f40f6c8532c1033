// pdbench end to end: the pdbench binary against a real local cluster (`pdserve up`, tiny
// model, CPU) in its disaggregated and colocated shapes, reports read back from --json-out.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/local_cluster.h"
#include "tests/testing/test_util.h"

namespace pds::client {
namespace {

const std::string& TinyModel() {
  static const std::string dir = [] {
    std::string out = pds::testing::ScratchDir() + "/tiny";
    std::string cmd =
        absl::StrCat(PDSERVE_BINARY, " make-model --preset tiny --out ", out, " > /dev/null");
    EXPECT_EQ(std::system(cmd.c_str()), 0);
    return out;
  }();
  return dir;
}

// A schema file for --json-schema whose JSON cannot end within 8 tokens (a string of at least
// 1000 characters), so that structured requests still make their full output length.
const std::string& LongStringSchema() {
  static const std::string path = [] {
    std::string out = pds::testing::ScratchDir() + "/schema.json";
    std::ofstream(out) << R"({"type": "object", "properties": {"text": {"type": "string",
        "minLength": 1000}}, "required": ["text"]})";
    return out;
  }();
  return path;
}

// Runs pdbench; its exit code, and the JSON it wrote.
int Pdbench(const std::vector<std::string>& args, nlohmann::json* json) {
  const std::string out = pds::testing::ScratchDir() + "/pdbench.json";
  std::filesystem::remove(out);
  std::string cmd = absl::StrCat(PDBENCH_BINARY, " ", absl::StrJoin(args, " "),
                                 " --quiet --json-out ", out, " > /dev/null");
  int status = std::system(cmd.c_str());
  int rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(out);
  if (in) *json = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  return rc;
}

// 16 requests of 24 tokens in, 8 out, at 20 req/s with `target_args`: every one served within
// the loose SLOs; `j` the report.
void SixteenRequests(std::vector<std::string> target_args, nlohmann::json& j) {
  for (const char* a : {"--rate", "20", "--num-requests", "16", "--input-len", "24", "--output-len",
                        "8", "--goodput", "ttft:5000", "tpot:1000", "--seed", "3"}) {
    target_args.push_back(a);
  }
  ASSERT_EQ(Pdbench(target_args, &j), 0);
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j["completed"], 16);
  EXPECT_EQ(j["failed"], 0);
  EXPECT_EQ(j["model_id"], "tiny");
  EXPECT_EQ(j["total_output_tokens"], 16 * 8);
  // The server's count (the usage's): with chat, the template's tokens too.
  if (j["backend"] == "openai-chat") {
    EXPECT_GT(j["total_input_tokens"], 16 * 24);
  } else {
    EXPECT_EQ(j["total_input_tokens"], 16 * 24);
  }
  EXPECT_DOUBLE_EQ(j["slo_attainment"].get<double>(), 1.0);
  EXPECT_GT(j["mean_ttft_ms"].get<double>(), 0);
  EXPECT_GT(j["p99_e2el_ms"].get<double>(), 0);
}

TEST(PdbenchEndToEndTest, DisaggregatedCluster) {
  auto cluster = testing::LocalCluster::Start(PDSERVE_BINARY, TinyModel(),
                                              {"--prefill", "1", "--decode", "1"});
  ASSERT_NE(cluster, nullptr);
  ASSERT_FALSE(cluster->address().empty());
  nlohmann::json j;
  ASSERT_NO_FATAL_FAILURE(SixteenRequests({"--target", cluster->address()}, j));
  // Every request went through a KV transfer between the two instances.
  EXPECT_EQ(j["server_timeline"]["transfer_ms"]["count"], 16);
  // Structured output under load (the prefill worker draws the first token, the decode worker
  // goes on from it).
  ASSERT_NO_FATAL_FAILURE(
      SixteenRequests({"--target", cluster->address(), "--json-schema", LongStringSchema()}, j));
  // And a regular expression that cannot end within 8 tokens.
  ASSERT_NO_FATAL_FAILURE(
      SixteenRequests({"--target", cluster->address(), "--regex", "'[a-z ]{500,600}'"}, j));
}

// Two front-ends sharing the workers (`up --frontends 2`): the cluster's address lists both,
// pdbench sends to each in turn, and each serves on its own.
TEST(PdbenchEndToEndTest, TwoFrontendsShareTheWorkers) {
  auto cluster = testing::LocalCluster::Start(
      PDSERVE_BINARY, TinyModel(), {"--prefill", "1", "--decode", "1", "--frontends", "2"});
  ASSERT_NE(cluster, nullptr);
  const std::vector<std::string> addresses = absl::StrSplit(cluster->address(), ',');
  ASSERT_EQ(addresses.size(), 2u) << cluster->address();
  nlohmann::json j;
  ASSERT_NO_FATAL_FAILURE(SixteenRequests({"--target", cluster->address()}, j));
  EXPECT_EQ(j["failovers"], 0);
  EXPECT_EQ(j["server_timeline"]["transfer_ms"]["count"], 16);
  ASSERT_NO_FATAL_FAILURE(SixteenRequests({"--target", addresses[1]}, j));
  EXPECT_FALSE(j.contains("failovers"));
}

// The same load through the front-end's OpenAI-compatible HTTP port (`up --http-port`), its
// completions and chat endpoints: the same counts, tokens made up from the usage, no server
// timeline.
TEST(PdbenchEndToEndTest, OpenAiApiOfTheSameCluster) {
  const int port = testing::FreeLoopbackPort();
  ASSERT_GT(port, 0);
  auto cluster = testing::LocalCluster::Start(
      PDSERVE_BINARY, TinyModel(),
      {"--prefill", "1", "--decode", "1", "--http-port", absl::StrCat(port)});
  ASSERT_NE(cluster, nullptr);
  nlohmann::json j;
  ASSERT_NO_FATAL_FAILURE(
      SixteenRequests({"--api", "openai", "--target", absl::StrCat("http://127.0.0.1:", port)}, j));
  EXPECT_EQ(j["backend"], "openai");
  EXPECT_FALSE(j.contains("server_timeline") && j["server_timeline"]["transfer_ms"]["count"] > 0);
  // And its chat endpoint: text prompts as user messages, through the model's chat template.
  ASSERT_NO_FATAL_FAILURE(SixteenRequests(
      {"--api", "openai-chat", "--target", absl::StrCat("http://127.0.0.1:", port)}, j));
  EXPECT_EQ(j["backend"], "openai-chat");
  // And structured output through response_format.
  ASSERT_NO_FATAL_FAILURE(
      SixteenRequests({"--api", "openai", "--target", absl::StrCat("http://127.0.0.1:", port),
                       "--json-schema", LongStringSchema()},
                      j));
  // And guided_regex.
  ASSERT_NO_FATAL_FAILURE(
      SixteenRequests({"--api", "openai", "--target", absl::StrCat("http://127.0.0.1:", port),
                       "--regex", "'[a-z ]{500,600}'"},
                      j));
}

TEST(PdbenchEndToEndTest, ColocatedClusterClosedLoopAndSearch) {
  auto cluster = testing::LocalCluster::Start(PDSERVE_BINARY, TinyModel(), {"--colocated", "1"});
  ASSERT_NE(cluster, nullptr);
  ASSERT_FALSE(cluster->address().empty());
  nlohmann::json j;
  ASSERT_EQ(Pdbench({"--target", cluster->address(), "--concurrency", "4", "--num-requests", "12",
                     "--dataset", "code", "--length-scale", "0.1", "--output-len", "6"},
                    &j),
            0);
  EXPECT_EQ(j["completed"], 12);
  EXPECT_EQ(j["total_output_tokens"], 12 * 6);
  EXPECT_EQ(j["server_timeline"]["transfer_ms"]["count"], 0);

  ASSERT_EQ(Pdbench({"--target", cluster->address(),  "--search",  "--search-min-rate",
                     "5",        "--search-max-rate", "10",        "--search-steps",
                     "2",        "--search-bisect",   "0",         "--num-requests",
                     "8",        "--output-len",      "4",         "--input-len",
                     "16",       "--goodput",         "ttft:5000", "tpot:1000"},
                    &j),
            0);
  EXPECT_TRUE(j["found"].get<bool>());
  EXPECT_EQ(j["points"].size(), 2u);
}

TEST(PdbenchEndToEndTest, NothingListening) {
  nlohmann::json j;
  EXPECT_EQ(Pdbench({"--target", "127.0.0.1:1", "--connect-timeout", "0.5"}, &j), 1);
}

}  // namespace
}  // namespace pds::client
