// An OpenAI-compatible HTTP door to the front-end (`pdserve frontend --http-port P`), so that
// stock clients and load generators (the openai SDKs, vLLM's and SGLang's bench_serving,
// genai-perf, curl) can drive pdserve:
//
//   POST /v1/completions        text completion, whole (JSON) or streamed (Server-Sent Events)
//   POST /v1/chat/completions   chat completion: the messages rendered by the model's chat
//                               template (engine/tokenizer/chat_template.h), whole or streamed
//   POST /tokenize, /detokenize  a prompt's or a conversation's token ids, and ids' text
//   GET  /v1/models        the served model
//   GET  /health           200 while the cluster can place a request, else 503
//
// Each choice of a completion is one Generate call on the front-end's own gRPC Serving API
// (loopback), so admission control, SLO targets, placement, timelines and metrics are exactly
// those of gRPC clients (text stop sequences too: GenerateRequest.stop). A chat request's prompt
// is tokenized here (the template writes the special tokens) and sent as token ids; tool calls
// in its replies are read here (server/tool_calls.h).
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "pdserve/v1/serving.pb.h"
#include "server/tool_calls.h"

namespace pds::engine {
class Tokenizer;
struct ChatFormat;
}  // namespace pds::engine

namespace pds::server {

struct OpenAiHttpOptions {
  std::string host = "127.0.0.1";
  int port = 0;             // 0: any free port
  std::string grpc_target;  // the front-end's Serving API (host:port)
  std::string model;        // the served model's id (requests naming another get 404)
  std::string id_tag;       // in the completions' ids it makes up (the front-end's id)
  int32_t max_context = 0;  // the model's context, reported by /v1/models
  // Token strings and text offsets of logprobs (null: token ids as strings).
  const engine::Tokenizer* tokenizer = nullptr;
  // The model's chat template (null: /v1/chat/completions answers `chat_unavailable`).
  const engine::ChatFormat* chat = nullptr;
  absl::Status chat_unavailable = absl::InvalidArgumentError("the model has no chat template");
  // How the model writes tool calls (chat requests with `tools`; kNone: tool_choice "auto" is
  // refused).
  ToolCallFormat tool_call_format = ToolCallFormat::kNone;
  // How the model marks its reasoning (chat replies then carry reasoning_content).
  ReasoningFormat reasoning_format = ReasoningFormat::kNone;
  std::function<bool()> ready;  // GET /health
  int threads = 256;            // connections served at once (each holds a thread)
  // Choices (calls) in flight over all requests: more get 429.
  int max_choices_in_flight = 1024;
  absl::Duration request_timeout = absl::Minutes(10);
};

class OpenAiHttpServer {
 public:
  static absl::StatusOr<std::unique_ptr<OpenAiHttpServer>> Start(OpenAiHttpOptions options);
  ~OpenAiHttpServer();
  OpenAiHttpServer(const OpenAiHttpServer&) = delete;
  OpenAiHttpServer& operator=(const OpenAiHttpServer&) = delete;

  int port() const;
  // Cancels the calls of requests in flight (their streams end) and stops listening.
  void Stop();

  class Impl;

 private:
  explicit OpenAiHttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// A parsed POST /v1/completions body (exposed for tests).
struct CompletionRequest {
  // One Generate call per choice, in choice-index order: prompt i's n choices are i*n..i*n+n-1.
  std::vector<pdserve::v1::GenerateRequest> choices;
  int n = 1;
  bool stream = false;
  bool include_usage = false;     // stream_options.include_usage: a last chunk with the usage
  std::vector<std::string> stop;  // text stop sequences (the front-end cuts the text there)
  int logprobs = -1;  // >= 0: logprobs with that many alternatives (completions or chat format)
  // Completions: each choice's text starts with its prompt, and with logprobs so do its
  // logprobs (the prompt's first token has none: null), as OpenAI's echo.
  bool echo = false;
  // >= 0: vLLM's prompt_logprobs (not streamed): per prompt position after the first, the
  // prompt token's and the top this many tokens' {logprob, rank, decoded_token} by token id;
  // on each choice (completions) or on the response (chat).
  int prompt_logprobs = -1;
  bool chat = false;  // a chat completion (its responses are in the chat format)
  // Chat with tools and tool_choice "auto": the replies' tool calls are parsed in this format;
  // "required" (kJsonArray) and a named function (kArguments, of `tool_function`) constrain
  // the replies to the calls with a json_schema.
  ToolCallFormat tool_calls = ToolCallFormat::kNone;
  std::string tool_function;
  bool parallel_tool_calls = true;                     // false: a reply's first call only
  ReasoningFormat reasoning = ReasoningFormat::kNone;  // chat: split off reasoning_content
};

// INVALID_ARGUMENT naming the field for what OpenAI's API rejects or pdserve does not support
// (echo, best_of, suffix, n > 16, ...), NOT_FOUND for another model.
// Unknown fields are ignored, as OpenAI's servers do. Defaults are OpenAI's: max_tokens 16,
// temperature 1; `top_k`, `ignore_eos`, `stop_token_ids` (as in vLLM), `ttft_slo_ms` and
// `tpot_slo_ms` are pdserve's extensions.
// `max_context` > 0: prompts that could never fit it are refused here.
absl::StatusOr<CompletionRequest> ParseCompletionRequest(absl::string_view body,
                                                         absl::string_view model,
                                                         int32_t max_context = 0);

// A POST /v1/chat/completions body: the messages (string or text-part contents; "developer" is
// "system") rendered with `chat` (add_generation_prompt, default true, and chat_template_kwargs
// as vLLM takes them) and tokenized without added special tokens into one prompt of token ids.
// max_completion_tokens (or max_tokens) defaults to what the context leaves; logprobs (bool)
// and top_logprobs; the completions' sampling, stop and SLO fields. `tools` (functions) go to
// the template; with tool_choice "auto" (their default) the replies' calls are parsed in
// `tool_call_format` (kNone: refused), "none" leaves them text; "required" and a named function
// constrain the reply to JSON calls (a json_schema from the tools' parameters), whatever the
// format. `response_format` (json_object, json_schema) and vLLM's `guided_json` constrain the
// reply to JSON (completions too). Non-text content is refused. The template's refusals
// (raise_exception) are INVALID_ARGUMENT.
absl::StatusOr<CompletionRequest> ParseChatRequest(
    absl::string_view body, absl::string_view model, int32_t max_context,
    const engine::ChatFormat& chat, const engine::Tokenizer& tokenizer,
    ToolCallFormat tool_call_format = ToolCallFormat::kNone);

}  // namespace pds::server
