// pdbench's client for OpenAI-compatible HTTP servers (`pdbench --api openai`): pdserve's own
// `--http-port`, and the servers of vLLM, SGLang, TensorRT-LLM or Dynamo, driven with the same
// workloads and measured the same way.
//
// Each call is one streamed POST /v1/completions (with stream_options.include_usage) on its
// own thread and connection; with `chat`, one streamed POST /v1/chat/completions whose one user
// message is the prompt text (token-id prompts are refused, INVALID_ARGUMENT). GenerateRequest
// fields map to OpenAI's: token-id prompts as arrays, top_k, ignore_eos and stop_token_ids as
// vLLM's extensions, the SLO targets as pdserve's (sent only when set). The stream comes back as
// GenerateResponse messages with the chunks' text and, lacking token ids, a count of tokens: those
// of the chunk's logprobs when present, else 1, the last message making the total up to the usage's
// completion_tokens; it also carries a Done built from the finish reason and the usage. There is no
// server timeline and no cluster status (GetClusterStatus: UNIMPLEMENTED). HTTP errors become the
// gRPC codes pdserve would send (400 INVALID_ARGUMENT, 404 NOT_FOUND, 429 RESOURCE_EXHAUSTED, 503
// UNAVAILABLE, 504 DEADLINE_EXCEEDED, else INTERNAL) with the error's message.
#pragma once

#include <memory>
#include <string>

#include "client/serving_client.h"

namespace pds::client {

class OpenAiClient : public GenerateClient {
 public:
  // `target`: "host:port" or "http://host:port"; `model`: the requests' model field (empty:
  // the first model of GET /v1/models, looked up by WaitForConnected).
  OpenAiClient(const std::string& target, std::string model, bool chat = false);
  // Waits (at most 30 s) until every call it started has ended.
  ~OpenAiClient() override;
  OpenAiClient(const OpenAiClient&) = delete;
  OpenAiClient& operator=(const OpenAiClient&) = delete;

  const std::string& target() const override { return target_; }
  const std::string& model() const { return model_; }
  absl::Status WaitForConnected(absl::Duration timeout) override;
  absl::StatusOr<pdserve::v1::ClusterStatus> GetClusterStatus(absl::Duration timeout) override;
  std::shared_ptr<GenerateCall> StartGenerate(const pdserve::v1::GenerateRequest& request,
                                              absl::Duration timeout,
                                              GenerateCallbacks callbacks) override;

  struct Live;

 private:
  std::string target_;
  std::string host_;
  int port_ = 0;
  std::string model_;
  bool chat_ = false;
  std::shared_ptr<Live> live_;
};

}  // namespace pds::client
