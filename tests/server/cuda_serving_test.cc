// End to end on the CUDA backend: `pdserve up --backend cuda --prefill 1 --decode 1` runs the
// two workers as separate processes on one GPU with the CUDA IPC KV transport (the default for
// the cuda backend); a dozen greedy requests give exactly the tokens of one in-process
// LlmEngine on the CUDA backend. Requests go one at a time on both sides, so every forward has
// the same shapes (bf16 GEMMs are not batch-invariant). Skips without a CUDA device.
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backend/backend.h"
#include "engine/backend/cuda_backend.h"
#include "engine/model/transformer.h"
#include "engine/runtime/llm_engine.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "pdserve/v1/serving.grpc.pb.h"
#include "tests/testing/local_cluster.h"
#include "tests/testing/test_util.h"

namespace pds {
namespace {

namespace api = ::pdserve::v1;

constexpr int kRequests = 12;

std::vector<engine::GenerateRequest> Requests() {
  std::vector<engine::GenerateRequest> out;
  for (int i = 0; i < kRequests; ++i) {
    engine::GenerateRequest r;
    r.id = absl::StrCat("g", i);
    const int len = 1 + (i * 53) % 120;  // 1..120 tokens: one to eight blocks of 16
    for (int j = 0; j < len; ++j) r.prompt.push_back(3 + (i * 131 + j * 17) % 250);
    r.params.max_tokens = 4 + (i * 7) % 20;
    r.params.ignore_eos = true;
    r.params.temperature = 0;
    out.push_back(r);
  }
  return out;
}

class CudaServingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!engine::CudaDeviceAvailable()) GTEST_SKIP() << "no CUDA device";
    // SmallTestConfig with head_dim 16 (the CUDA attention kernels take 16/32/64/128/256).
    auto config = testing::SmallTestConfig();
    config.num_heads = 3;
    config.num_kv_heads = 1;
    config.head_dim = 16;
    config.max_position_embeddings = 256;
    auto dir = testing::MakeModelDir(config, "cuda-serving", 21, engine::DType::kF32, 0,
                                     /*tokenizer=*/true);
    ASSERT_TRUE(dir.ok()) << dir.status();
    model_dir_ = *dir;
  }

  // One in-process engine on the CUDA backend, one request at a time.
  std::vector<std::vector<int32_t>> Offline(const std::vector<engine::GenerateRequest>& requests) {
    std::vector<std::vector<int32_t>> tokens;
    auto backend = engine::CreateBackend({.kind = "cuda"});
    EXPECT_TRUE(backend.ok()) << backend.status();
    if (!backend.ok()) return tokens;
    auto model = engine::Transformer::Load(model_dir_, **backend);
    EXPECT_TRUE(model.ok()) << model.status();
    if (!model.ok()) return tokens;
    auto eng = engine::LlmEngine::Create(**model, {.block_size = 16, .num_blocks = 512});
    EXPECT_TRUE(eng.ok()) << eng.status();
    if (!eng.ok()) return tokens;
    for (const auto& r : requests) {
      auto results = (*eng)->Generate({r});
      EXPECT_TRUE(results.ok()) << results.status();
      tokens.push_back(results.ok() ? (*results)[0].token_ids : std::vector<int32_t>{});
    }
    return tokens;
  }

  std::string model_dir_;
};

TEST_F(CudaServingTest, OnePrefillOneDecodeOverCudaIpcMatchesTheInProcessEngine) {
  const std::vector<engine::GenerateRequest> requests = Requests();
  const std::vector<std::vector<int32_t>> expected = Offline(requests);
  ASSERT_EQ(expected.size(), requests.size());

  auto cluster = testing::LocalCluster::Start(
      PDSERVE_BINARY, model_dir_,
      {"--backend", "cuda", "--prefill", "1", "--decode", "1", "--kv-cache-mb", "64"});
  ASSERT_NE(cluster, nullptr);
  auto stub = api::Serving::NewStub(
      grpc::CreateChannel(cluster->address(), grpc::InsecureChannelCredentials()));
  for (size_t i = 0; i < requests.size(); ++i) {
    const engine::GenerateRequest& r = requests[i];
    api::GenerateRequest a;
    a.set_request_id(r.id);
    *a.mutable_prompt_token_ids() = {r.prompt.begin(), r.prompt.end()};
    a.set_max_tokens(r.params.max_tokens);
    a.set_ignore_eos(true);
    a.set_temperature(0);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    auto reader = stub->Generate(&ctx, a);
    std::vector<int32_t> tokens;
    api::GenerateResponse response;
    while (reader->Read(&response)) {
      tokens.insert(tokens.end(), response.token_ids().begin(), response.token_ids().end());
    }
    const grpc::Status status = reader->Finish();
    ASSERT_TRUE(status.ok()) << r.id << ": " << status.error_message();
    EXPECT_EQ(tokens, expected[i])
        << "request " << r.id << " (prompt of " << r.prompt.size() << " tokens)";
  }
  EXPECT_EQ(cluster->Stop(), 0);
}

}  // namespace
}  // namespace pds
