#include "tests/server/test_worker.h"

#include "tests/testing/test_util.h"

namespace pds::server {

namespace pb = ::pdserve::internal;
using scheduler::InstanceRole;

std::unique_ptr<TestWorker> StartWorker(InstanceRole role, WorkerOptions options) {
  auto w = std::make_unique<TestWorker>();
  w->config = testing::SmallTestConfig();
  auto model = engine::Transformer::CreateRandom(w->config, w->backend, 5);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return nullptr;
  w->model = std::move(*model);
  options.role = role;
  options.kv_transport = "tcp";
  options.vocab_size = static_cast<int32_t>(w->config.vocab_size);
  options.engine.block_size = kBlockSize;
  if (options.engine.num_blocks == 0) options.engine.num_blocks = 64;
  auto worker = Worker::Start(*w->model, std::move(options));
  EXPECT_TRUE(worker.ok()) << worker.status();
  if (!worker.ok()) return nullptr;
  w->worker = std::move(*worker);
  w->stub = pb::Worker::NewStub(
      grpc::CreateChannel(w->worker->address(), grpc::InsecureChannelCredentials()));
  return w;
}

pb::WorkRequest Work(const std::string& id, int prompt_len, int max_tokens) {
  pb::WorkRequest work;
  work.set_request_id(id);
  for (int j = 0; j < prompt_len; ++j) work.add_prompt_token_ids(3 + j % 200);
  work.set_max_tokens(max_tokens);
  work.set_ignore_eos(true);
  work.set_logprobs(-1);
  work.set_top_p(1.0f);
  work.set_deadline_unix_us(absl::ToUnixMicros(absl::Now() + absl::Seconds(60)));
  return work;
}

}  // namespace pds::server
