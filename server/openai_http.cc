#include "server/openai_http.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <limits>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <variant>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "client/serving_client.h"
#include "engine/common/logging.h"
#include "engine/common/status_macros.h"
#include "engine/runtime/json_constraint.h"
#include "engine/runtime/regex.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/unicode.h"
#include "grpcpp/grpcpp.h"
#include "httplib.h"
#include "nlohmann/json.hpp"
#include "pdserve/v1/serving.grpc.pb.h"
#include "server/http_util.h"
#include "server/stop_matcher.h"  // ValidateStops

namespace pds::server {
namespace {

namespace api = ::pdserve::v1;
using Json = nlohmann::ordered_json;  // bodies keep their key order (schemas, tools)

constexpr int kMaxChoices = 128;  // prompts x n in one request
constexpr int kMaxN = 16;
constexpr int kMaxLogprobs = 20;
constexpr int kMaxBodyDepth = 64;  // arrays and objects in a request body

std::string Dump(const Json& j) { return j.dump(-1, ' ', false, Json::error_handler_t::replace); }

absl::Status BadField(absl::string_view field, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("'", field, "' ", why));
}

// The field as T when present and not null; `out` unchanged otherwise.
template <typename T>
absl::Status Get(const Json& body, const char* field, T& out) {
  auto it = body.find(field);
  if (it == body.end() || it->is_null()) return absl::OkStatus();
  if constexpr (std::is_same_v<T, bool>) {
    if (!it->is_boolean()) return BadField(field, "must be a boolean");
    out = it->get<bool>();
  } else if constexpr (std::is_integral_v<T>) {
    if (!it->is_number_integer()) return BadField(field, "must be an integer");
    const int64_t v = it->get<int64_t>();
    if (v < std::numeric_limits<T>::min() || v > std::numeric_limits<T>::max()) {
      return BadField(field, "is out of range");
    }
    out = static_cast<T>(v);
  } else if constexpr (std::is_floating_point_v<T>) {
    if (!it->is_number()) return BadField(field, "must be a number");
    out = it->get<T>();
  } else {
    if (!it->is_string()) return BadField(field, "must be a string");
    out = it->get<std::string>();
  }
  return absl::OkStatus();
}

// NOT_FOUND when the body names another model than `model` (none named is fine).
absl::Status CheckModel(const Json& j, absl::string_view model) {
  std::string name;
  PDS_RETURN_IF_ERROR(Get(j, "model", name));
  if (!name.empty() && name != model) {
    return absl::NotFoundError(
        absl::StrCat("the model '", name, "' does not exist (this server serves '", model, "')"));
  }
  return absl::OkStatus();
}

// A field pdserve does not implement: refused unless absent, null or `neutral`.
absl::Status Unsupported(const Json& body, const char* field, const Json& neutral,
                         absl::string_view what) {
  auto it = body.find(field);
  if (it == body.end() || it->is_null() || *it == neutral) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("'", field, "' is not supported (", what, ")"));
}

using Prompt = std::variant<std::string, std::vector<int32_t>>;

absl::StatusOr<std::vector<int32_t>> TokenIds(const Json& j) {
  std::vector<int32_t> ids;
  for (const Json& t : j) {
    if (!t.is_number_integer()) return BadField("prompt", "token arrays must hold integers");
    const int64_t v = t.get<int64_t>();
    if (v < 0 || v > std::numeric_limits<int32_t>::max()) {
      return BadField("prompt", absl::StrCat("holds token id ", v, ", not a vocabulary id"));
    }
    ids.push_back(static_cast<int32_t>(v));
  }
  if (ids.empty()) return BadField("prompt", "holds an empty token array");
  return ids;
}

// "text", [ids], ["text", ...] or [[ids], ...].
absl::StatusOr<std::vector<Prompt>> ParsePrompts(const Json& body) {
  auto it = body.find("prompt");
  if (it == body.end() || it->is_null()) return BadField("prompt", "is required");
  std::vector<Prompt> prompts;
  if (it->is_string()) {
    prompts.emplace_back(it->get<std::string>());
  } else if (it->is_array() && !it->empty() && it->front().is_number()) {
    PDS_ASSIGN_OR_RETURN(auto ids, TokenIds(*it));
    prompts.emplace_back(std::move(ids));
  } else if (it->is_array() && !it->empty()) {
    for (const Json& p : *it) {
      if (p.is_string()) {
        prompts.emplace_back(p.get<std::string>());
      } else if (p.is_array()) {
        PDS_ASSIGN_OR_RETURN(auto ids, TokenIds(p));
        prompts.emplace_back(std::move(ids));
      } else {
        return BadField("prompt", "must be a string, a token array, or an array of those");
      }
    }
  } else {
    return BadField("prompt", "must be a non-empty string, token array, or array of those");
  }
  for (const Prompt& p : prompts) {
    if (const auto* s = std::get_if<std::string>(&p); s != nullptr && s->empty()) {
      return BadField("prompt", "holds an empty string");
    }
  }
  return prompts;
}

// Prompts that could never fit the context are refused before they cost a call each: token
// arrays longer than it, text of more than kMaxBytesPerToken bytes per position.
constexpr int64_t kMaxBytesPerToken = 64;
absl::Status CheckPromptSizes(const std::vector<Prompt>& prompts, int32_t max_context) {
  if (max_context <= 0) return absl::OkStatus();
  for (const Prompt& p : prompts) {
    if (const auto* s = std::get_if<std::string>(&p)) {
      if (static_cast<int64_t>(s->size()) > kMaxBytesPerToken * max_context) {
        return BadField("prompt", absl::StrCat("holds ", s->size(),
                                               " bytes of text, more than "
                                               "the model's context of ",
                                               max_context, " tokens could hold"));
      }
    } else if (const auto& ids = std::get<std::vector<int32_t>>(p);
               static_cast<int64_t>(ids.size()) > max_context) {
      return BadField("prompt", absl::StrCat("holds ", ids.size(),
                                             " tokens, more than the model's "
                                             "context of ",
                                             max_context));
    }
  }
  return absl::OkStatus();
}

// HTTP status and OpenAI error type of a gRPC/absl status code.
std::pair<int, const char*> HttpError(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      return {400, "invalid_request_error"};
    case absl::StatusCode::kNotFound:
      return {404, "not_found_error"};
    case absl::StatusCode::kResourceExhausted:
      return {429, "rate_limit_error"};
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kCancelled:  // the front-end cancelled it: it is shutting down
      return {503, "service_unavailable"};
    case absl::StatusCode::kDeadlineExceeded:
      return {504, "timeout"};
    default:
      return {500, "internal_error"};
  }
}

// What a request whose client closed its connection ends with (nobody reads it).
absl::Status ClientGone() {
  return absl::CancelledError("the client closed its connection before the answer");
}

Json ErrorBody(const absl::Status& s) {
  const auto [http, type] = HttpError(s.code());
  return {{"error",
           {{"message", std::string(s.message())},
            {"type", type},
            {"param", nullptr},
            {"code", absl::StatusCodeToString(s.code())}}}};
}

void SendError(httplib::Response& res, const absl::Status& s) {
  res.status = HttpError(s.code()).first;
  res.set_content(Dump(ErrorBody(s)), "application/json");
}

int64_t UnixSeconds() { return absl::ToUnixSeconds(absl::Now()); }

// The string OpenAI's logprobs show for a token: its text, or "bytes:\xNN..." where it is not
// whole UTF-8 (a piece of a character).
std::string TokenString(const engine::Tokenizer* tokenizer, int32_t id) {
  if (tokenizer == nullptr) return absl::StrCat(id);
  const std::string text = tokenizer->Decode(std::vector<int32_t>{id});
  if (engine::IsValidUtf8(text)) return text;
  std::string out = "bytes:";
  for (unsigned char c : text) absl::StrAppendFormat(&out, "\\x%02x", c);
  return out;
}

// One choice's output as its Generate stream arrives.
struct Choice {
  std::string text;
  std::string finish_reason;  // from Done
  int32_t completion_tokens = 0;
  int32_t prompt_tokens = 0;
  int32_t cached_tokens = 0;
  bool ended = false;    // its call ended (OK with a Done, or failed)
  bool echoed = false;   // echo: the prompt (and its logprobs) went first
  Json prompt_logprobs;  // vLLM's format, from the first message (CompletionRequest's)
  absl::Status status;
  // Completions-format logprobs so far.
  Json tokens = Json::array(), token_logprobs = Json::array(), top_logprobs = Json::array(),
       text_offset = Json::array();
  Json chat_logprobs = Json::array();  // chat-format logprobs ("content" entries) so far
  // Tokens with logprobs so far (one of the two formats is kept, by the request's kind).
  size_t LogprobCount() const { return tokens.size() + chat_logprobs.size(); }
  std::optional<ToolCallScanner> scanner;     // streamed chat with tool parsing
  std::optional<ReasoningScanner> reasoning;  // streamed chat with reasoning parsing
  std::optional<ForcedCallStream> forced;     // streamed chat under a forced tool choice
};

// A new tool call id: "call_" and 24 random hex digits; for `parser` mistral 9 random letters
// and digits (Mistral's chat templates refuse a tool_call_id of any other shape).
std::string NewCallId(ToolCallFormat parser) {
  thread_local std::mt19937_64 rng(std::random_device{}() ^
                                   static_cast<uint64_t>(absl::ToUnixNanos(absl::Now())));
  if (parser == ToolCallFormat::kMistral) {
    constexpr absl::string_view kAlnum =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    std::string id(9, ' ');
    for (char& c : id) c = kAlnum[rng() % kAlnum.size()];
    return id;
  }
  return absl::StrFormat("call_%016x%08x", rng(), static_cast<uint32_t>(rng()));
}

// A reply's calls as the request takes them (parallel_tool_calls: false keeps the first).
ToolCallScanner::Result KeptCalls(const CompletionRequest& request, ToolCallScanner::Result r) {
  if (!request.parallel_tool_calls && r.calls.size() > 1) r.calls.resize(1);
  return r;
}

// A tool call as a message's `tool_calls` entry, or with `index` a stream delta's; its id the
// model's, else a new one for `parser`.
Json ToolCallJson(const ToolCall& call, std::optional<int> index, ToolCallFormat parser) {
  Json j = Json::object();
  if (index) j["index"] = *index;
  j["id"] = call.id.empty() ? NewCallId(parser) : call.id;
  j["type"] = "function";
  j["function"] = {{"name", call.name}, {"arguments", call.arguments}};
  return j;
}

// What the calls of one HTTP request deliver: messages or a final status, per choice.
struct Event {
  int choice = 0;
  std::optional<api::GenerateResponse> message;
  grpc::Status status;  // when !message
};

}  // namespace

// --- parsing -------------------------------------------------------------------------------

namespace {

// The fields completions and chat completions share: the model, sampling, n, stream, stop
// sequences and ids, SLOs. Fills `base` with all but the prompt, max_tokens, logprobs and seed.
// Field `name` of `j`, when there and not null: an array of token ids (non-negative 32-bit
// integers; with `non_empty` at least one), appended to `out`.
absl::Status TokenIds(const Json& j, const char* name, bool non_empty,
                      google::protobuf::RepeatedField<int32_t>& out) {
  auto it = j.find(name);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  const char* what =
      non_empty ? "must be a non-empty array of token ids" : "must be an array of token ids";
  if (!it->is_array() || (non_empty && it->empty())) return BadField(name, what);
  for (const Json& t : *it) {
    if (!t.is_number_integer() || t.get<int64_t>() < 0 ||
        t.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
      return BadField(name, what);
    }
    out.Add(static_cast<int32_t>(t.get<int64_t>()));
  }
  return absl::OkStatus();
}

absl::Status ParseCommon(const Json& j, absl::string_view model, CompletionRequest& r,
                         api::GenerateRequest& base, std::optional<uint64_t>& seed) {
  PDS_RETURN_IF_ERROR(CheckModel(j, model));
  // Logits processing (ranges checked by the front-end, as for gRPC).
  for (const auto& [field, set] :
       std::initializer_list<std::pair<const char*, void (api::GenerateRequest::*)(float)>>{
           {"presence_penalty", &api::GenerateRequest::set_presence_penalty},
           {"frequency_penalty", &api::GenerateRequest::set_frequency_penalty},
           {"repetition_penalty", &api::GenerateRequest::set_repetition_penalty},
           {"min_p", &api::GenerateRequest::set_min_p}}) {
    if (auto it = j.find(field); it != j.end() && !it->is_null()) {
      double v = 0;
      PDS_RETURN_IF_ERROR(Get(j, field, v));
      if (!(std::abs(v) <= 1e6)) return BadField(field, "is out of range");
      (base.*set)(static_cast<float>(v));
    }
  }
  int32_t min_tokens = 0;
  PDS_RETURN_IF_ERROR(Get(j, "min_tokens", min_tokens));
  base.set_min_tokens(min_tokens);
  if (auto it = j.find("logit_bias"); it != j.end() && !it->is_null()) {
    // OpenAI's form: token ids (as strings) to a bias.
    if (!it->is_object()) return BadField("logit_bias", "must be an object of token id: bias");
    for (const auto& [key, bias] : it->items()) {
      int32_t id = 0;
      if (key.empty() || key.size() > 10 ||
          !std::all_of(key.begin(), key.end(), absl::ascii_isdigit) ||
          !absl::SimpleAtoi(key, &id) || !bias.is_number() ||
          !(std::abs(bias.get<double>()) <= 1e6)) {
        return BadField("logit_bias", "must be an object of token id: bias in [-100, 100]");
      }
      if (base.logit_bias().contains(id)) return BadField("logit_bias", "names a token twice");
      (*base.mutable_logit_bias())[id] = static_cast<float>(bias.get<double>());
    }
  }
  double temperature = 1.0, top_p = 1.0;
  int32_t top_k = 0;
  bool ignore_eos = false;
  PDS_RETURN_IF_ERROR(Get(j, "temperature", temperature));
  if (!(temperature >= 0 && temperature <= 100)) return BadField("temperature", "must be >= 0");
  PDS_RETURN_IF_ERROR(Get(j, "top_p", top_p));
  if (!(top_p > 0 && top_p <= 1)) return BadField("top_p", "must be in (0, 1]");
  PDS_RETURN_IF_ERROR(Get(j, "top_k", top_k));
  if (top_k < -1) return BadField("top_k", "must be -1 or 0 (no limit) or positive");
  if (top_k < 0) top_k = 0;
  if (auto it = j.find("seed"); it != j.end() && !it->is_null()) {
    if (!it->is_number_integer()) return BadField("seed", "must be an integer");
    seed =
        it->is_number_unsigned() ? it->get<uint64_t>() : static_cast<uint64_t>(it->get<int64_t>());
  }
  PDS_RETURN_IF_ERROR(Get(j, "n", r.n));
  if (r.n < 1 || r.n > kMaxN) return BadField("n", absl::StrCat("must be in [1, ", kMaxN, "]"));
  PDS_RETURN_IF_ERROR(Get(j, "stream", r.stream));
  if (auto it = j.find("prompt_logprobs"); it != j.end() && !it->is_null()) {
    PDS_RETURN_IF_ERROR(Get(j, "prompt_logprobs", r.prompt_logprobs));
    if (r.prompt_logprobs < 0 || r.prompt_logprobs > kMaxLogprobs) {
      return BadField("prompt_logprobs", absl::StrCat("must be in [0, ", kMaxLogprobs, "]"));
    }
    if (r.stream) return BadField("prompt_logprobs", "is not available with stream");
    base.set_prompt_logprobs(r.prompt_logprobs);
  }
  if (auto it = j.find("stream_options"); it != j.end() && !it->is_null()) {
    if (!r.stream) return BadField("stream_options", "is only allowed with stream");
    if (!it->is_object()) return BadField("stream_options", "must be an object");
    PDS_RETURN_IF_ERROR(Get(*it, "include_usage", r.include_usage));
  }
  if (auto it = j.find("stop"); it != j.end() && !it->is_null()) {
    if (it->is_string()) {
      r.stop.push_back(it->get<std::string>());
    } else if (it->is_array()) {
      for (const Json& s : *it) {
        if (!s.is_string()) return BadField("stop", "must be a string or an array of strings");
        r.stop.push_back(s.get<std::string>());
      }
    } else {
      return BadField("stop", "must be a string or an array of strings");
    }
    PDS_RETURN_IF_ERROR(ValidateStops(r.stop));
  }
  PDS_RETURN_IF_ERROR(
      TokenIds(j, "stop_token_ids", /*non_empty=*/false, *base.mutable_stop_token_ids()));
  PDS_RETURN_IF_ERROR(Get(j, "ignore_eos", ignore_eos));
  PDS_RETURN_IF_ERROR(
      TokenIds(j, "allowed_token_ids", /*non_empty=*/true, *base.mutable_allowed_token_ids()));
  if (auto it = j.find("truncate_prompt_tokens"); it != j.end() && !it->is_null()) {
    int32_t keep = 0;
    PDS_RETURN_IF_ERROR(Get(j, "truncate_prompt_tokens", keep));
    if (keep < 1 && keep != -1) return BadField("truncate_prompt_tokens", "must be >= 1 or -1");
    base.set_truncate_prompt_tokens(keep);
  }
  bool include_stop = false;
  PDS_RETURN_IF_ERROR(Get(j, "include_stop_str_in_output", include_stop));
  base.set_include_stop_str_in_output(include_stop);
  if (auto it = j.find("skip_special_tokens"); it != j.end() && !it->is_null()) {
    bool skip = true;
    PDS_RETURN_IF_ERROR(Get(j, "skip_special_tokens", skip));
    base.set_skip_special_tokens(skip);
  }
  for (auto [field, setter] : {std::pair{"ttft_slo_ms", &api::GenerateRequest::set_ttft_slo_ms},
                               std::pair{"tpot_slo_ms", &api::GenerateRequest::set_tpot_slo_ms}}) {
    double v = 0;
    if (auto it = j.find(field); it != j.end() && !it->is_null()) {
      PDS_RETURN_IF_ERROR(Get(j, field, v));
      if (!(v >= 0)) return BadField(field, "must be >= 0");
      (base.*setter)(v);
    }
  }
  base.set_temperature(static_cast<float>(temperature));
  base.set_top_p(static_cast<float>(top_p));
  base.set_top_k(top_k);
  base.set_ignore_eos(ignore_eos);
  *base.mutable_stop() = {r.stop.begin(), r.stop.end()};
  return absl::OkStatus();
}

// One Generate call per prompt and choice, from `base` (prompt i's n choices are
// i*n..i*n+n-1). The n choices of a prompt differ (each its own seed) unless greedy; with a
// seed they are reproducible.
void AddChoices(CompletionRequest& r, const api::GenerateRequest& base,
                const std::vector<Prompt>& prompts, std::optional<uint64_t> seed) {
  for (const Prompt& prompt : prompts) {
    for (int c = 0; c < r.n; ++c) {
      api::GenerateRequest g = base;
      if (const auto* text = std::get_if<std::string>(&prompt)) {
        g.set_prompt_text(*text);
      } else {
        const auto& ids = std::get<std::vector<int32_t>>(prompt);
        *g.mutable_prompt_token_ids() = {ids.begin(), ids.end()};
      }
      if (seed) g.set_seed(*seed + static_cast<uint64_t>(c));
      r.choices.push_back(std::move(g));
    }
  }
}

absl::StatusOr<Json> ParseBody(absl::string_view body) {
  if (JsonTextDepth(body) > kMaxBodyDepth) {
    return absl::InvalidArgumentError(
        absl::StrCat("the body nests arrays and objects deeper than ", kMaxBodyDepth));
  }
  Json j = Json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError("the body is not valid JSON");
  if (!j.is_object()) return absl::InvalidArgumentError("the body must be a JSON object");
  return j;
}

// A chat message's content as the template sees it: a string (text parts joined by "\n").
absl::StatusOr<Json> MessageContent(const Json& content, size_t index) {
  if (content.is_null() || content.is_string()) return content;
  const std::string field = absl::StrCat("messages[", index, "].content");
  if (!content.is_array()) return BadField(field, "must be a string or an array of parts");
  std::string text;
  bool first = true;
  for (const Json& part : content) {
    const auto type = part.is_object() ? part.find("type") : part.end();
    if (!part.is_object() || type == part.end() || *type != "text" || !part.contains("text") ||
        !part["text"].is_string()) {
      return BadField(field, "may only hold text parts ({\"type\": \"text\", \"text\": ...})");
    }
    if (!first) text += "\n";
    first = false;
    text += part["text"].get<std::string>();
  }
  return Json(std::move(text));
}

// A body's `tools` (OpenAI's function tools), checked; an empty array when there are none.
absl::StatusOr<Json> CheckedTools(const Json& j) {
  Json tools = Json::array();
  if (auto it = j.find("tools"); it != j.end() && !it->is_null()) {
    if (!it->is_array()) return BadField("tools", "must be an array of tools");
    for (size_t i = 0; i < it->size(); ++i) {
      const Json& t = (*it)[i];
      const std::string field = absl::StrCat("tools[", i, "]");
      if (!t.is_object() || !t.contains("type") || t["type"] != "function" ||
          !t.contains("function") || !t["function"].is_object()) {
        return BadField(field, "must be {\"type\": \"function\", \"function\": {...}}");
      }
      const Json& f = t["function"];
      const auto name = f.find("name");
      if (name == f.end() || !name->is_string() || name->get_ref<const std::string&>().empty() ||
          name->get_ref<const std::string&>().size() > 64 ||
          name->get_ref<const std::string&>().find_first_not_of(
              "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") !=
              std::string::npos) {
        return BadField(field + ".function.name", "must be 1 to 64 of a-z, A-Z, 0-9, _ and -");
      }
      if (auto p = f.find("parameters"); p != f.end() && !p->is_null() && !p->is_object()) {
        return BadField(field + ".function.parameters", "must be a JSON schema object");
      }
      if (auto d = f.find("description"); d != f.end() && !d->is_null() && !d->is_string()) {
        return BadField(field + ".function.description", "must be a string");
      }
      tools.push_back(t);
    }
  }
  return tools;
}

// obj[key] when obj is an object that has it (and is not null there), else null.
const Json* Member(const Json& obj, const char* key) {
  if (!obj.is_object()) return nullptr;
  const auto it = obj.find(key);
  return it == obj.end() || it->is_null() ? nullptr : &*it;
}

// The structured output a body asks for, checked: `response_format` (OpenAI's json_object or
// json_schema), vLLM's `guided_json`, `guided_regex`, `guided_choice`, or its newer
// `structured_outputs` ({"json" | "regex" | "choice": ...}), as JSON Schema text in
// base.json_schema or a pattern in base.regex (a choice is a pattern of its strings). One only.
absl::Status ParseResponseFormat(const Json& j, api::GenerateRequest& base) {
  std::string schema, field, regex;
  const Json* structured = Member(j, "structured_outputs");
  if (structured != nullptr && structured->is_object()) {
    for (const auto& [key, value] : structured->items()) {
      if (key != "json" && key != "regex" && key != "choice") {
        return BadField(absl::StrCat("structured_outputs.", key),
                        "is not supported (json, regex or choice)");
      }
    }
  }
  if (structured != nullptr && !structured->is_object()) {
    return BadField("structured_outputs",
                    "must be an object ({\"json\" | \"regex\" | \"choice\": ...})");
  }
  // A member of the body, or of structured_outputs (under its short name); nothing from both.
  std::string asked;
  auto ask = [&](const char* name, const char* short_name) -> absl::StatusOr<const Json*> {
    const Json* a = Member(j, name);
    const Json* b = structured != nullptr ? Member(*structured, short_name) : nullptr;
    if (a == nullptr && b == nullptr) return nullptr;
    std::string which = a != nullptr ? name : absl::StrCat("structured_outputs.", short_name);
    if (a != nullptr && b != nullptr) {
      return BadField(name, absl::StrCat("and structured_outputs.", short_name,
                                         " both constrain the reply: one only"));
    }
    if (!asked.empty()) {
      return BadField(which, absl::StrCat("and ", asked, " both constrain the reply: one only"));
    }
    asked = which;
    return a != nullptr ? a : b;
  };
  if (const Json* format = Member(j, "response_format")) {
    field = "response_format";
    const Json* type = Member(*format, "type");
    if (type == nullptr || !type->is_string()) {
      return BadField(field, "must be {\"type\": \"text\" | \"json_object\" | \"json_schema\"}");
    }
    if (*type == "json_object") {
      schema = R"({"type":"object"})";
    } else if (*type == "json_schema") {
      const Json* spec = Member(*format, "json_schema");
      const Json* s = spec != nullptr ? Member(*spec, "schema") : nullptr;
      field = "response_format.json_schema.schema";
      if (s == nullptr || !(s->is_object() || s->is_boolean())) {
        return BadField(field, "must be a JSON Schema object");
      }
      schema = s->dump();
    } else if (*type != "text") {
      return BadField(field, "type must be text, json_object or json_schema");
    }
  }
  if (!schema.empty()) asked = field;
  PDS_ASSIGN_OR_RETURN(const Json* guided, ask("guided_json", "json"));
  if (guided != nullptr) {
    field = asked;
    if (!guided->is_object() && !guided->is_string() && !guided->is_boolean()) {
      return BadField(field, "must be a JSON Schema (an object, or its text)");
    }
    schema = guided->is_string() ? guided->get<std::string>() : guided->dump();
  }
  PDS_ASSIGN_OR_RETURN(const Json* pattern, ask("guided_regex", "regex"));
  if (pattern != nullptr) {
    if (!pattern->is_string() || pattern->get<std::string>().empty()) {
      return BadField(asked, "must be a non-empty regular expression");
    }
    regex = pattern->get<std::string>();
  }
  PDS_ASSIGN_OR_RETURN(const Json* choice, ask("guided_choice", "choice"));
  if (choice != nullptr) {
    if (!choice->is_array() || choice->empty() || choice->size() > 4096) {
      return BadField(asked, "must be a list of 1-4096 strings");
    }
    std::vector<std::string> choices;
    for (const Json& c : *choice) {
      if (!c.is_string()) return BadField(asked, "must be a list of strings");
      choices.push_back(c.get<std::string>());
    }
    regex = engine::ByteDfa::Alternation(choices);
  }
  if (!regex.empty()) {
    if (regex.size() > engine::kMaxRegexBytes) {
      return BadField(asked, absl::StrCat("is longer than ", engine::kMaxRegexBytes,
                                          " bytes as a regular expression"));
    }
    if (auto compiled = engine::JsonSchema::Regex(regex); !compiled.ok()) {
      return BadField(asked, compiled.status().message());
    }
    base.set_regex(std::move(regex));
    return absl::OkStatus();
  }
  if (schema.empty()) return absl::OkStatus();
  if (schema.size() > engine::kMaxJsonSchemaBytes) {
    return BadField(field, absl::StrCat("is longer than ", engine::kMaxJsonSchemaBytes, " bytes"));
  }
  if (auto compiled = engine::JsonSchema::Compile(schema); !compiled.ok()) {
    return BadField(field, compiled.status().message());
  }
  base.set_json_schema(std::move(schema));
  return absl::OkStatus();
}

// Prefixes every local $ref ("#...") in a schema with `base`, the JSON pointer of where the
// schema now sits inside a larger one.
void RebaseRefs(Json& schema, const std::string& base) {
  std::vector<Json*> pending = {&schema};
  while (!pending.empty()) {
    Json* j = pending.back();
    pending.pop_back();
    if (j->is_object()) {
      for (auto& [key, value] : j->items()) {
        if (key == "$ref" && value.is_string() && absl::StartsWith(value.get<std::string>(), "#")) {
          value = base + value.get<std::string>().substr(1);
        } else {
          pending.push_back(&value);
        }
      }
    } else if (j->is_array()) {
      for (Json& v : *j) pending.push_back(&v);
    }
  }
}

// `tools` for the template, and tool_choice and parallel_tool_calls into `r` (a forced choice
// also into base.json_schema).
absl::StatusOr<Json> ParseTools(const Json& j, ToolCallFormat format, CompletionRequest& r,
                                api::GenerateRequest& base) {
  PDS_ASSIGN_OR_RETURN(Json tools, CheckedTools(j));
  PDS_RETURN_IF_ERROR(Get(j, "parallel_tool_calls", r.parallel_tool_calls));
  std::string choice = tools.empty() ? "none" : "auto";
  if (auto it = j.find("tool_choice"); it != j.end() && !it->is_null()) {
    if (it->is_object()) {  // {"type": "function", "function": {"name": ...}}
      const Json* type = Member(*it, "type");
      const Json* f = Member(*it, "function");
      const Json* name = f != nullptr ? Member(*f, "name") : nullptr;
      if (type == nullptr || *type != "function" || name == nullptr || !name->is_string()) {
        return BadField("tool_choice",
                        "must be {\"type\": \"function\", \"function\": {\"name\": ...}}");
      }
      choice = "named";
      r.tool_function = name->get<std::string>();
    } else if (it->is_string() && (*it == "none" || *it == "auto" || *it == "required")) {
      choice = it->get<std::string>();
    } else {
      return BadField("tool_choice", "may be \"auto\", \"none\", \"required\" or a function");
    }
    if (tools.empty() && choice != "none") return BadField("tool_choice", "needs tools");
  }
  if (choice == "named" || choice == "required") {
    if (!base.json_schema().empty() || !base.regex().empty()) {
      return BadField("tool_choice", "forces calls: no response_format or guided_* beside it");
    }
    // A function's arguments: its parameters schema (none: no arguments), an object.
    auto parameters = [](const Json& tool) -> absl::StatusOr<Json> {
      const Json* p = Member(tool["function"], "parameters");
      if (p == nullptr) return Json{{"type", "object"}, {"properties", Json::object()}};
      Json out = *p;
      if (!out.contains("type")) out["type"] = "object";
      if (out["type"] != "object") {
        return BadField("tools", "a function's parameters must be an object schema");
      }
      return out;
    };
    Json schema;
    if (choice == "named") {
      auto tool = std::find_if(tools.begin(), tools.end(), [&](const Json& t) {
        return t["function"]["name"] == r.tool_function;
      });
      if (tool == tools.end()) {
        return BadField("tool_choice",
                        absl::StrCat("names '", r.tool_function, "', which is not in tools"));
      }
      PDS_ASSIGN_OR_RETURN(schema, parameters(*tool));
      r.tool_calls = ToolCallFormat::kArguments;
    } else {
      Json alts = Json::array();
      for (size_t i = 0; i < tools.size(); ++i) {
        const Json& t = tools[i];
        PDS_ASSIGN_OR_RETURN(Json params, parameters(t));
        // Its $refs resolve where it now sits in the combined schema.
        RebaseRefs(params, absl::StrCat("#/items/anyOf/", i, "/properties/parameters"));
        alts.push_back(
            {{"type", "object"},
             {"properties", {{"name", {{"const", t["function"]["name"]}}}, {"parameters", params}}},
             {"required", {"name", "parameters"}}});
      }
      schema = {{"type", "array"}, {"minItems", 1}, {"items", {{"anyOf", std::move(alts)}}}};
      if (!r.parallel_tool_calls) schema["maxItems"] = 1;
      r.tool_calls = ToolCallFormat::kJsonArray;
    }
    std::string text = schema.dump();
    if (auto compiled = engine::JsonSchema::Compile(text); !compiled.ok()) {
      return BadField("tools", absl::StrCat("parameters for tool_choice \"",
                                            choice == "named" ? r.tool_function : "required",
                                            "\": ", compiled.status().message()));
    }
    base.set_json_schema(std::move(text));
    return tools;
  }
  if (choice == "auto") {
    if (format == ToolCallFormat::kNone) {
      return BadField("tools",
                      "with tool_choice \"auto\" need a front-end started with "
                      "--tool-call-parser (hermes, llama3_json, pythonic or mistral) to read the "
                      "calls");
    }
    r.tool_calls = format;
    // Mistral's call markers are special tokens: the reply's text keeps them (as vLLM does).
    if (format == ToolCallFormat::kMistral) base.set_skip_special_tokens(false);
  }
  return tools;
}

// A chat body's prompt: its messages (string or text-part contents; "developer" is "system"),
// `tools`, add_generation_prompt (default true) and chat_template_kwargs rendered by the
// template, then tokenized without added special tokens (the template writes them).
absl::StatusOr<std::vector<int32_t>> ChatPrompt(const Json& j, Json tools,
                                                const engine::ChatFormat& chat,
                                                const engine::Tokenizer& tokenizer) {
  // The template's variables: messages, add_generation_prompt, chat_template_kwargs.
  auto messages = j.find("messages");
  if (messages == j.end() || !messages->is_array() || messages->empty()) {
    return BadField("messages", "must be a non-empty array of messages");
  }
  Json vars = Json::object();
  if (auto it = j.find("chat_template_kwargs"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) return BadField("chat_template_kwargs", "must be an object");
    for (const auto& [k, v] : it->items()) {
      if (k == "messages") return BadField("chat_template_kwargs", "may not set messages");
      vars[k] = v;
    }
  }
  Json list = Json::array();
  for (size_t i = 0; i < messages->size(); ++i) {
    const Json& m = (*messages)[i];
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string()) {
      return BadField(absl::StrCat("messages[", i, "]"), "must be an object with a string role");
    }
    Json message = m;
    // OpenAI's newer name for the system role, which chat templates know as "system".
    if (message["role"] == "developer") message["role"] = "system";
    if (auto c = m.find("content"); c != m.end()) {
      PDS_ASSIGN_OR_RETURN(message["content"], MessageContent(*c, i));
    }
    // An assistant turn's tool calls come back with their arguments as JSON text (OpenAI's
    // format); templates write them as objects (tool_call.arguments | tojson), as HF's
    // apply_chat_template and vLLM give them.
    if (auto calls = message.find("tool_calls");
        message["role"] == "assistant" && calls != message.end() && calls->is_array()) {
      for (size_t k = 0; k < calls->size(); ++k) {
        Json& call = (*calls)[k];
        auto function = call.is_object() ? call.find("function") : call.end();
        if (function == call.end() || !function->is_object()) continue;
        auto args = function->find("arguments");
        if (args == function->end() || !args->is_string()) continue;
        if (JsonTextDepth(args->get_ref<const std::string&>()) > kMaxBodyDepth) {
          return BadField(absl::StrCat("messages[", i, "].tool_calls[", k, "].function.arguments"),
                          absl::StrCat("nests deeper than ", kMaxBodyDepth));
        }
        Json parsed = Json::parse(args->get<std::string>(), nullptr, /*allow_exceptions=*/false);
        if (parsed.is_discarded()) {
          return BadField(absl::StrCat("messages[", i, "].tool_calls[", k, "].function.arguments"),
                          "must be JSON text");
        }
        *args = std::move(parsed);
      }
    }
    list.push_back(std::move(message));
  }
  vars["messages"] = std::move(list);
  if (!tools.empty()) vars["tools"] = std::move(tools);
  bool add_generation_prompt = true;
  PDS_RETURN_IF_ERROR(Get(j, "add_generation_prompt", add_generation_prompt));
  vars["add_generation_prompt"] = add_generation_prompt;
  absl::StatusOr<std::string> prompt = chat.Render(std::move(vars));
  if (!prompt.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the model's chat template refused the messages: ", prompt.status().message()));
  }
  std::vector<int32_t> ids = tokenizer.Encode(*prompt, /*add_special_tokens=*/false);
  if (ids.empty()) return BadField("messages", "make an empty prompt");
  return ids;
}

}  // namespace

absl::StatusOr<CompletionRequest> ParseCompletionRequest(absl::string_view body,
                                                         absl::string_view model,
                                                         int32_t max_context) {
  PDS_ASSIGN_OR_RETURN(const Json j, ParseBody(body));
  for (const auto& [field, neutral, what] :
       std::initializer_list<std::tuple<const char*, Json, const char*>>{
           {"best_of", 1, "use n"}, {"suffix", "", "no insertion"}}) {
    PDS_RETURN_IF_ERROR(Unsupported(j, field, neutral, what));
  }
  CompletionRequest r;
  api::GenerateRequest base;
  std::optional<uint64_t> seed;
  PDS_RETURN_IF_ERROR(ParseCommon(j, model, r, base, seed));
  PDS_RETURN_IF_ERROR(ParseResponseFormat(j, base));
  PDS_ASSIGN_OR_RETURN(std::vector<Prompt> prompts, ParsePrompts(j));
  // (A prompt to be truncated is checked by the front-end, once it is.)
  if (!base.has_truncate_prompt_tokens()) {
    PDS_RETURN_IF_ERROR(CheckPromptSizes(prompts, max_context));
  }
  if (static_cast<int64_t>(prompts.size()) * r.n > kMaxChoices) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompts x n is ", prompts.size() * r.n, ", more than ", kMaxChoices));
  }
  int32_t max_tokens = 16;
  PDS_RETURN_IF_ERROR(Get(j, "max_tokens", max_tokens));
  if (max_tokens < 1) return BadField("max_tokens", "must be at least 1");
  base.set_max_tokens(max_tokens);
  if (auto it = j.find("logprobs"); it != j.end() && !it->is_null()) {
    if (!it->is_number_integer() || it->get<int64_t>() < 0 || it->get<int64_t>() > kMaxLogprobs) {
      return BadField("logprobs", absl::StrCat("must be an integer in [0, ", kMaxLogprobs, "]"));
    }
    r.logprobs = static_cast<int>(it->get<int64_t>());
    base.set_logprobs(r.logprobs);
  }
  PDS_RETURN_IF_ERROR(Get(j, "echo", r.echo));
  if (r.echo) {
    if (base.has_truncate_prompt_tokens()) {
      return BadField("echo", "is not taken with truncate_prompt_tokens");
    }
    // The prompt's logprobs come from the worker that computes the prompt.
    if (r.logprobs >= 0) base.set_prompt_logprobs(std::max(r.logprobs, r.prompt_logprobs));
  }
  AddChoices(r, base, prompts, seed);
  return r;
}

absl::StatusOr<CompletionRequest> ParseChatRequest(absl::string_view body, absl::string_view model,
                                                   int32_t max_context,
                                                   const engine::ChatFormat& chat,
                                                   const engine::Tokenizer& tokenizer,
                                                   ToolCallFormat tool_call_format) {
  PDS_ASSIGN_OR_RETURN(const Json j, ParseBody(body));
  for (const auto& [field, neutral, what] :
       std::initializer_list<std::tuple<const char*, Json, const char*>>{
           {"functions", Json::array(), "use tools"},
           {"function_call", "none", "no function calls"},
           {"audio", Json::object(), "text only"},
           {"modalities", Json::array({"text"}), "text only"},
           {"prediction", Json::object(), "no predicted outputs"},
           {"continue_final_message", false, "the reply is a new assistant message"},
           {"echo", false, "the prompt is not returned"}}) {
    PDS_RETURN_IF_ERROR(Unsupported(j, field, neutral, what));
  }
  CompletionRequest r;
  r.chat = true;
  api::GenerateRequest base;
  std::optional<uint64_t> seed;
  PDS_RETURN_IF_ERROR(ParseCommon(j, model, r, base, seed));
  PDS_RETURN_IF_ERROR(ParseResponseFormat(j, base));
  PDS_ASSIGN_OR_RETURN(Json tools, ParseTools(j, tool_call_format, r, base));

  PDS_ASSIGN_OR_RETURN(std::vector<int32_t> ids, ChatPrompt(j, std::move(tools), chat, tokenizer));
  if (base.has_truncate_prompt_tokens()) {  // the conversation's last tokens, kept here
    const int64_t keep = base.truncate_prompt_tokens() == -1 && max_context > 0
                             ? max_context
                             : base.truncate_prompt_tokens();
    if (keep > 0) {
      if (static_cast<int64_t>(ids.size()) > keep) ids.erase(ids.begin(), ids.end() - keep);
      base.clear_truncate_prompt_tokens();
    }
  }
  if (max_context > 0 && static_cast<int64_t>(ids.size()) >= max_context) {
    return BadField("messages", absl::StrCat("make a prompt of ", ids.size(),
                                             " tokens; the model's context is ", max_context));
  }
  // max_completion_tokens (max_tokens is its older name); by default what the context leaves.
  int32_t max_tokens = max_context > 0 ? max_context - static_cast<int32_t>(ids.size()) : 16;
  PDS_RETURN_IF_ERROR(Get(j, "max_tokens", max_tokens));
  PDS_RETURN_IF_ERROR(Get(j, "max_completion_tokens", max_tokens));
  if (max_tokens < 1) return BadField("max_completion_tokens", "must be at least 1");
  base.set_max_tokens(max_tokens);
  bool logprobs = false;
  int32_t top_logprobs = 0;
  PDS_RETURN_IF_ERROR(Get(j, "logprobs", logprobs));
  PDS_RETURN_IF_ERROR(Get(j, "top_logprobs", top_logprobs));
  if (top_logprobs < 0 || top_logprobs > kMaxLogprobs) {
    return BadField("top_logprobs", absl::StrCat("must be in [0, ", kMaxLogprobs, "]"));
  }
  if (top_logprobs > 0 && !logprobs) return BadField("top_logprobs", "needs logprobs: true");
  if (logprobs) {
    r.logprobs = top_logprobs;
    base.set_logprobs(top_logprobs);
  }
  AddChoices(r, base, {Prompt(std::move(ids))}, seed);
  // One prompt: its logprobs come from the first choice alone (the others may use the cache).
  for (size_t i = 1; i < r.choices.size(); ++i) r.choices[i].clear_prompt_logprobs();
  return r;
}

// --- the server ----------------------------------------------------------------------------

// The Generate calls of one HTTP request (pds_client's callback API: no thread per call),
// delivering Events.
class Calls {
 public:
  Calls(client::ServingClient& client, const CompletionRequest& request, absl::Duration timeout) {
    for (size_t i = 0; i < request.choices.size(); ++i) {
      const int choice = static_cast<int>(i);
      client::GenerateCallbacks cb;
      cb.on_message = [this, choice](const api::GenerateResponse& m, client::Clock::time_point) {
        Push({choice, m, {}});
      };
      cb.on_done = [this, choice](const grpc::Status& s, client::Clock::time_point) {
        Push({choice, std::nullopt, s});
      };
      calls_.push_back(client.StartGenerate(request.choices[i], timeout, std::move(cb)));
    }
  }
  ~Calls() {
    CancelAll();
    for (auto& c : calls_) c->Wait();  // no callback runs after this
  }
  void CancelAll() {
    for (auto& c : calls_) c->Cancel();
  }
  // The next event, waiting at most `wait`.
  std::optional<Event> Next(absl::Duration wait) {
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_for(lock, absl::ToChronoNanoseconds(wait), [&] { return !events_.empty(); })) {
      return std::nullopt;
    }
    Event e = std::move(events_.front());
    events_.pop_front();
    return e;
  }

 private:
  void Push(Event e) {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(std::move(e));
    cv_.notify_one();
  }
  std::vector<std::shared_ptr<client::GenerateCall>> calls_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Event> events_;
};

class OpenAiHttpServer::Impl {
 public:
  explicit Impl(OpenAiHttpOptions o) : options(std::move(o)), log(pds::Logger("http")) {}

  OpenAiHttpOptions options;
  std::shared_ptr<spdlog::logger> log;
  httplib::Server server;
  std::thread thread;
  int port = -1;
  std::unique_ptr<client::ServingClient> client;  // the front-end's own gRPC API
  std::atomic<bool> stopping{false};
  std::atomic<uint64_t> next_id{0};
  std::atomic<int> choices_in_flight{0};  // calls over all requests

  // A completion in progress: its calls and choices, and the chunk header fields.
  struct Job {
    ~Job() {
      calls.reset();  // cancelled and joined first
      if (admitted != nullptr) admitted->fetch_sub(static_cast<int>(choices.size()));
    }
    std::atomic<int>* admitted = nullptr;  // Impl::choices_in_flight, counted while it lives
    CompletionRequest request;
    std::unique_ptr<Calls> calls;
    std::vector<Choice> choices;
    std::string id;
    int64_t created = 0;
    int ended = 0;
    bool roles_sent = false;                     // chat streams: the role chunks are out
    std::optional<ClientConnection> connection;  // the HTTP client's, watched while waiting
    bool client_gone = false;                    // it closed the connection: nobody to answer
  };

  // Applies one event to its choice; returns the text now ready to send (with its logprobs
  // appended to the choice), and whether the choice just ended.
  std::string Apply(Job& job, Event& e, bool* just_ended) {
    *just_ended = false;
    Choice& c = job.choices[e.choice];
    if (!e.message) {
      c.ended = true;
      *just_ended = true;
      ++job.ended;
      if (!e.status.ok()) {
        c.status = absl::Status(static_cast<absl::StatusCode>(e.status.error_code()),
                                e.status.error_message());
      } else if (c.finish_reason.empty()) {
        c.status = absl::InternalError("the front-end ended a call without its Done");
      }
      return "";
    }
    const api::GenerateResponse& m = *e.message;
    if (job.request.prompt_logprobs >= 0 && c.prompt_logprobs.is_null() &&
        m.prompt_token_ids_size() > 0) {
      c.prompt_logprobs = VllmPromptLogprobs(job.request.prompt_logprobs, m);
    }
    std::string echoed;  // the prompt, ahead of the first message's text
    if (job.request.echo && !c.echoed) {
      c.echoed = true;
      echoed = EchoPrompt(job, e.choice, m, c);
    }
    c.completion_tokens += m.token_ids_size();
    if (job.request.logprobs >= 0) {
      // Each token's offset: the text before the message plus its earlier tokens' text (a
      // token's own text may be part of a character, or held back at a stop sequence's start).
      size_t offset = c.text.size();
      const size_t end = c.text.size() + m.text().size();
      for (int i = 0; i < m.logprobs_size() && i < m.token_ids_size(); ++i) {
        const api::TokenLogprobs& lp = m.logprobs(i);
        if (job.request.chat) {  // the chat format's entries only
          Json entry = ChatLogprob(m.token_ids(i), lp.logprob());
          Json alternatives = Json::array();
          for (const api::TopLogprob& t : lp.top()) {
            alternatives.push_back(ChatLogprob(t.token_id(), t.logprob()));
          }
          entry["top_logprobs"] = std::move(alternatives);
          c.chat_logprobs.push_back(std::move(entry));
          continue;
        }
        c.tokens.push_back(TokenString(options.tokenizer, m.token_ids(i)));
        c.token_logprobs.push_back(lp.logprob());
        Json top = Json::object();
        for (const api::TopLogprob& t : lp.top()) {
          top[TokenString(options.tokenizer, t.token_id())] = t.logprob();
        }
        c.top_logprobs.push_back(std::move(top));
        c.text_offset.push_back(std::min(offset, end));
        if (options.tokenizer != nullptr) {
          offset += options.tokenizer->Decode(std::vector<int32_t>{m.token_ids(i)}).size();
        }
      }
    }
    if (m.has_done()) {
      const api::Done& d = m.done();
      c.prompt_tokens = d.prompt_tokens();
      c.cached_tokens = d.cached_prompt_tokens();
      c.finish_reason = d.finish_reason();
    }
    c.text += m.text();
    return echoed + m.text();
  }

  // vLLM's prompt_logprobs of a first message: null for the first prompt token, then per token
  // {"<id>": {"logprob", "rank", "decoded_token"}} for it and the top k at its position.
  Json VllmPromptLogprobs(int k, const api::GenerateResponse& m) const {
    const engine::Tokenizer* tok = options.tokenizer;
    auto entry = [tok](int32_t id, float logprob, int32_t rank) {
      // (JSON has no -inf: a token the logits rule out gets vLLM's floor.)
      return Json{{"logprob", std::isfinite(logprob) ? logprob : -9999.0f},
                  {"rank", rank},
                  {"decoded_token", TokenString(tok, id)}};
    };
    Json out = Json::array({nullptr});
    for (int i = 1; i < m.prompt_token_ids_size(); ++i) {
      if (i - 1 >= m.prompt_logprobs_size()) {
        out.push_back(nullptr);
        continue;
      }
      const api::TokenLogprobs& lp = m.prompt_logprobs(i - 1);
      const int32_t id = m.prompt_token_ids(i);
      Json at = Json::object();
      at[absl::StrCat(id)] = entry(id, lp.logprob(), lp.rank());
      for (int t = 0; t < lp.top_size() && t < k; ++t) {
        const std::string key = absl::StrCat(lp.top(t).token_id());
        if (!at.contains(key)) at[key] = entry(lp.top(t).token_id(), lp.top(t).logprob(), t + 1);
      }
      out.push_back(std::move(at));
    }
    return out;
  }

  // echo: choice `index`'s prompt text (its text or its decoded ids), added to its text, and
  // with logprobs the prompt's tokens (from the first message) added to its logprobs, offsets
  // counted over their texts.
  std::string EchoPrompt(const Job& job, int index, const api::GenerateResponse& m, Choice& c) {
    const api::GenerateRequest& g = job.request.choices[index];
    const engine::Tokenizer* tok = options.tokenizer;
    std::string prompt = g.has_prompt_text() ? g.prompt_text() : "";
    if (!g.has_prompt_text() && tok != nullptr) {
      prompt = tok->Decode(
          std::vector<int32_t>(g.prompt_token_ids().begin(), g.prompt_token_ids().end()));
    }
    if (job.request.logprobs >= 0) {
      size_t offset = 0;
      for (int i = 0; i < m.prompt_token_ids_size(); ++i) {
        const int32_t id = m.prompt_token_ids(i);
        c.tokens.push_back(TokenString(tok, id));
        c.text_offset.push_back(offset);
        if (tok != nullptr) offset += tok->Decode(std::vector<int32_t>{id}).size();
        if (i == 0 || i - 1 >= m.prompt_logprobs_size()) {  // the first token has none
          c.token_logprobs.push_back(nullptr);
          c.top_logprobs.push_back(nullptr);
          continue;
        }
        const api::TokenLogprobs& lp = m.prompt_logprobs(i - 1);
        c.token_logprobs.push_back(lp.logprob());
        Json top = Json::object();
        for (int t = 0; t < lp.top_size() && t < job.request.logprobs; ++t) {
          top[TokenString(tok, lp.top(t).token_id())] = lp.top(t).logprob();
        }
        c.top_logprobs.push_back(std::move(top));
      }
    }
    c.text += prompt;
    return prompt;
  }

  Json Usage(const Job& job) const {
    int64_t prompt = 0, completion = 0, cached = 0;
    for (size_t i = 0; i < job.choices.size(); ++i) {
      const Choice& c = job.choices[i];
      completion += c.completion_tokens;
      if (i % job.request.n != 0) continue;  // a prompt counts once, whatever n
      cached += c.cached_tokens;
      prompt += c.prompt_tokens;
    }
    return {{"prompt_tokens", prompt},
            {"completion_tokens", completion},
            {"total_tokens", prompt + completion},
            {"prompt_tokens_details", {{"cached_tokens", cached}}}};
  }

  // Chat logprobs' entry for a token: its text, logprob and UTF-8 bytes.
  Json ChatLogprob(int32_t id, float logprob) const {
    const std::string text = options.tokenizer != nullptr
                                 ? options.tokenizer->Decode(std::vector<int32_t>{id})
                                 : absl::StrCat(id);
    Json bytes = Json::array();
    for (unsigned char b : text) bytes.push_back(static_cast<int>(b));
    return {
        {"token", engine::SanitizeUtf8(text)}, {"logprob", logprob}, {"bytes", std::move(bytes)}};
  }

  Json Logprobs(const Job& job, const Choice& c, size_t from) const {
    if (job.request.logprobs < 0) return nullptr;
    auto slice = [from](const Json& a) {
      Json out = Json::array();
      for (size_t i = from; i < a.size(); ++i) out.push_back(a[i]);
      return out;
    };
    if (job.request.chat) return {{"content", slice(c.chat_logprobs)}};
    return {{"tokens", slice(c.tokens)},
            {"token_logprobs", slice(c.token_logprobs)},
            {"top_logprobs", slice(c.top_logprobs)},
            {"text_offset", slice(c.text_offset)}};
  }

  // Waits for an event; none when the request's time is up, the server stops or the client has
  // closed its connection (job.client_gone).
  std::optional<Event> Wait(Job& job, absl::Time deadline) {
    while (!stopping.load() && absl::Now() < deadline) {
      if (job.connection && job.connection->Gone()) {
        job.client_gone = true;
        return std::nullopt;
      }
      if (auto e = job.calls->Next(absl::Milliseconds(100))) return e;
    }
    return std::nullopt;
  }

  void Completions(const httplib::Request& req, httplib::Response& res) {
    auto parsed = ParseCompletionRequest(req.body, options.model, options.max_context);
    if (!parsed.ok()) return SendError(res, parsed.status());
    Serve(req, res, *std::move(parsed));
  }

  // POST /tokenize: {"prompt": text, "add_special_tokens": true} or a chat body's messages (with
  // tools, add_generation_prompt, chat_template_kwargs), as vLLM takes them: the token ids a
  // completion or chat request would send, {"count", "max_model_len", "tokens"}.
  void Tokenize(const httplib::Request& req, httplib::Response& res) {
    if (options.tokenizer == nullptr) {
      return SendError(res, absl::InvalidArgumentError("the model has no tokenizer.json"));
    }
    absl::StatusOr<std::vector<int32_t>> ids = TokenIds(req.body);
    if (!ids.ok()) return SendError(res, ids.status());
    const Json body = {{"count", ids->size()},
                       {"max_model_len", options.max_context},
                       {"tokens", *std::move(ids)}};
    res.set_content(Dump(body), "application/json");
  }
  absl::StatusOr<std::vector<int32_t>> TokenIds(absl::string_view text) {
    PDS_ASSIGN_OR_RETURN(const Json j, ParseBody(text));
    PDS_RETURN_IF_ERROR(CheckModel(j, options.model));
    if (j.contains("messages")) {
      if (options.chat == nullptr) return options.chat_unavailable;
      PDS_ASSIGN_OR_RETURN(Json tools, CheckedTools(j));
      return ChatPrompt(j, std::move(tools), *options.chat, *options.tokenizer);
    }
    auto prompt = j.find("prompt");
    if (prompt == j.end() || !prompt->is_string()) {
      return BadField("prompt", "(a string) or messages is required");
    }
    bool add_special_tokens = true;
    PDS_RETURN_IF_ERROR(Get(j, "add_special_tokens", add_special_tokens));
    return options.tokenizer->Encode(prompt->get<std::string>(), add_special_tokens);
  }

  // POST /detokenize: {"tokens": [ids]} -> {"prompt": text}.
  void Detokenize(const httplib::Request& req, httplib::Response& res) {
    if (options.tokenizer == nullptr) {
      return SendError(res, absl::InvalidArgumentError("the model has no tokenizer.json"));
    }
    absl::StatusOr<Json> j = ParseBody(req.body);
    const absl::Status checked = j.ok() ? CheckModel(*j, options.model) : j.status();
    if (!checked.ok()) return SendError(res, checked);
    auto tokens = j->find("tokens");
    if (tokens == j->end() || !tokens->is_array()) {
      return SendError(res, BadField("tokens", "must be an array of token ids"));
    }
    std::vector<int32_t> ids;
    const int64_t vocab = options.tokenizer->vocab_size();
    for (size_t i = 0; i < tokens->size(); ++i) {
      const Json& t = (*tokens)[i];
      if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() >= vocab) {
        return SendError(res, BadField(absl::StrCat("tokens[", i, "]"),
                                       absl::StrCat("is not a token id in [0, ", vocab, ")")));
      }
      ids.push_back(static_cast<int32_t>(t.get<int64_t>()));
    }
    res.set_content(Dump({{"prompt", options.tokenizer->Decode(ids)}}), "application/json");
  }

  void Chat(const httplib::Request& req, httplib::Response& res) {
    if (options.chat == nullptr || options.tokenizer == nullptr) {
      return SendError(res, options.chat == nullptr
                                ? options.chat_unavailable
                                : absl::InvalidArgumentError(
                                      "the model has no tokenizer.json: no chat completions"));
    }
    auto parsed = ParseChatRequest(req.body, options.model, options.max_context, *options.chat,
                                   *options.tokenizer, options.tool_call_format);
    if (!parsed.ok()) return SendError(res, parsed.status());
    // A reasoning model's reply under response_format or guided_* reasons first, unconstrained
    // (GenerateRequest.reasoning_first), and its reasoning is split off as usual; forced tool
    // calls are constrained from the start, without reasoning.
    const bool constrained =
        !parsed->choices.empty() &&
        (!parsed->choices[0].json_schema().empty() || !parsed->choices[0].regex().empty());
    const bool forced = parsed->tool_calls == ToolCallFormat::kArguments ||
                        parsed->tool_calls == ToolCallFormat::kJsonArray;
    if (!constrained) {
      parsed->reasoning = options.reasoning_format;
    } else if (!forced && options.reasoning_format != ReasoningFormat::kNone) {
      const api::GenerateRequest& first = parsed->choices[0];
      const std::optional<ReasoningGate> gate = FindReasoningGate(
          *options.tokenizer,
          {first.prompt_token_ids().data(), static_cast<size_t>(first.prompt_token_ids().size())});
      if (gate.has_value()) {  // split as the gate decides: inside from the start, or opened
        for (api::GenerateRequest& c : parsed->choices) c.set_reasoning_first(true);
        parsed->reasoning = gate->inside ? ReasoningFormat::kDeepSeekR1 : ReasoningFormat::kQwen3;
      }
    }
    Serve(req, res, *std::move(parsed));
  }

  // Runs a parsed (chat) completion request and answers it, whole or streamed.
  void Serve(const httplib::Request& req, httplib::Response& res, CompletionRequest parsed) {
    auto job = std::make_shared<Job>();
    job->request = std::move(parsed);
    job->connection.emplace(req);
    const std::string header_id = req.get_header_value("X-Request-Id");
    if (header_id.size() > 200) {
      return SendError(res, absl::InvalidArgumentError("X-Request-Id is longer than 200 bytes"));
    }
    for (size_t i = 0; i < job->request.choices.size(); ++i) {
      job->choices.emplace_back();
      const bool forced = job->request.tool_calls == ToolCallFormat::kArguments ||
                          job->request.tool_calls == ToolCallFormat::kJsonArray;
      if (forced && job->request.stream) {
        job->choices.back().forced.emplace(job->request.tool_calls, job->request.tool_function);
      } else if (job->request.tool_calls != ToolCallFormat::kNone && job->request.stream) {
        job->choices.back().scanner.emplace(job->request.tool_calls, job->request.tool_function);
      }
      if (job->request.reasoning != ReasoningFormat::kNone && job->request.stream) {
        job->choices.back().reasoning.emplace(job->request.reasoning);
      }
      if (!header_id.empty()) {
        job->request.choices[i].set_request_id(
            job->request.choices.size() == 1 ? header_id : absl::StrCat(header_id, "-", i));
      }
    }
    const char* prefix = job->request.chat ? "chatcmpl-" : "cmpl-";
    job->id = header_id.empty()
                  ? absl::StrFormat("%s%s%x-%x", prefix,
                                    options.id_tag.empty() ? "" : options.id_tag + "-",
                                    UnixSeconds(), next_id++)
                  : absl::StrCat(prefix, header_id);
    job->created = UnixSeconds();
    const int n = static_cast<int>(job->choices.size());
    if (choices_in_flight.fetch_add(n) + n > std::max(1, options.max_choices_in_flight)) {
      choices_in_flight.fetch_sub(n);
      return SendError(res, absl::ResourceExhaustedError(
                                absl::StrCat("the HTTP API has ", options.max_choices_in_flight,
                                             " choices in flight (its limit); retry later")));
    }
    job->admitted = &choices_in_flight;
    job->calls = std::make_unique<Calls>(*client, job->request, options.request_timeout);
    const absl::Time deadline = absl::Now() + options.request_timeout;
    const int total = static_cast<int>(job->choices.size());

    if (!job->request.stream) {
      while (job->ended < total) {
        std::optional<Event> e = Wait(*job, deadline);
        if (!e) break;
        bool ended = false;
        Apply(*job, *e, &ended);
        if (ended && !job->choices[e->choice].status.ok()) break;  // the request fails
      }
      if (job->client_gone) return SendError(res, ClientGone());  // the job's end cancels it
      for (const Choice& c : job->choices) {
        if (!c.status.ok()) return SendError(res, c.status);
      }
      if (job->ended < total) {
        return SendError(res, stopping ? absl::UnavailableError("the server is stopping")
                                       : absl::DeadlineExceededError("the request timed out"));
      }
      Json choices = Json::array();
      const bool chat = job->request.chat;
      for (int i = 0; i < total; ++i) {
        const Choice& c = job->choices[i];
        Json choice = {{"index", i}};
        std::string finish = c.finish_reason;
        if (chat) {
          // Reasoning first, then the tool calls in what is left.
          ReasoningScanner::Split split = ReasoningScanner::Parse(job->request.reasoning, c.text);
          choice["message"] = {{"role", "assistant"}, {"content", split.content}};
          if (job->request.reasoning != ReasoningFormat::kNone) {
            choice["message"]["reasoning_content"] =
                split.reasoning.empty() ? Json(nullptr) : Json(split.reasoning);
          }
          ToolCallScanner::Result r =
              KeptCalls(job->request, ToolCallScanner::Parse(job->request.tool_calls, split.content,
                                                             job->request.tool_function));
          if (!r.calls.empty()) {  // the reply's tool calls, and what it wrote before them
            choice["message"]["content"] = r.content.empty() ? Json(nullptr) : Json(r.content);
            Json calls = Json::array();
            for (const ToolCall& call : r.calls) {
              calls.push_back(ToolCallJson(call, std::nullopt, options.tool_call_format));
            }
            choice["message"]["tool_calls"] = std::move(calls);
            finish = "tool_calls";
          }
        } else {
          choice["text"] = c.text;
        }
        choice["logprobs"] = Logprobs(*job, c, 0);
        choice["finish_reason"] = finish;
        if (!chat && job->request.prompt_logprobs >= 0) {
          choice["prompt_logprobs"] = c.prompt_logprobs;
        }
        choices.push_back(std::move(choice));
      }
      Json body = {{"id", job->id},
                   {"object", chat ? "chat.completion" : "text_completion"},
                   {"created", job->created},
                   {"model", options.model},
                   {"choices", std::move(choices)},
                   {"usage", Usage(*job)}};
      if (chat && job->request.prompt_logprobs >= 0) {  // one prompt: the first choice's
        body["prompt_logprobs"] = job->choices[0].prompt_logprobs;
      }
      res.set_content(Dump(body), "application/json");
      return;
    }

    // Streamed: the status is decided by the calls' first events (a refusal is an HTTP error,
    // not a broken stream), so wait until every choice has a message or has ended.
    std::deque<Event> early;
    std::vector<bool> seen(total, false);
    int pending = total;
    while (pending > 0) {
      std::optional<Event> e = Wait(*job, deadline);
      if (!e) {
        return SendError(res, job->client_gone ? ClientGone()
                              : stopping       ? absl::UnavailableError("the server is stopping")
                                         : absl::DeadlineExceededError("the request timed out"));
      }
      if (!e->message && !e->status.ok() && !seen[e->choice]) {
        return SendError(res, absl::Status(static_cast<absl::StatusCode>(e->status.error_code()),
                                           e->status.error_message()));
      }
      if (!seen[e->choice]) {
        seen[e->choice] = true;
        --pending;
      }
      early.push_back(std::move(*e));
    }
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, job, early = std::move(early), deadline](size_t, httplib::DataSink& sink) mutable {
          return Stream(*job, early, deadline, sink);
        },
        [job](bool) { job->calls->CancelAll(); });
  }

  // Writes the SSE chunks of the events as they come; false ends the response (the client went
  // away, or the server stops): the releaser then cancels the calls.
  bool Stream(Job& job, std::deque<Event>& early, absl::Time deadline, httplib::DataSink& sink) {
    const int total = static_cast<int>(job.choices.size());
    auto send = [&](const Json& j) {
      const std::string s = absl::StrCat("data: ", Dump(j), "\n\n");
      return sink.write(s.data(), s.size());
    };
    const bool chat = job.request.chat;
    const char* object = chat ? "chat.completion.chunk" : "text_completion";
    // A chunk of choice i; a chat chunk's delta is `delta` when given, else the text.
    auto chunk = [&](int i, const std::string& text, size_t logprobs_from, const Json& finish,
                     const Json* delta = nullptr) {
      Json choice = {{"index", i}};
      if (chat) {
        choice["delta"] = delta != nullptr ? *delta
                          : text.empty()   ? Json::object()
                                           : Json{{"content", text}};
      } else {
        choice["text"] = text;
      }
      choice["logprobs"] = Logprobs(job, job.choices[i], logprobs_from);
      choice["finish_reason"] = finish;
      Json j = {{"id", job.id},
                {"object", object},
                {"created", job.created},
                {"model", options.model},
                {"choices", Json::array({std::move(choice)})}};
      if (job.request.include_usage) j["usage"] = nullptr;  // as OpenAI: only the last has it
      return send(j);
    };
    if (chat && !job.roles_sent) {  // each chat choice opens with the assistant's role
      job.roles_sent = true;
      const Json delta = {{"role", "assistant"}, {"content", ""}};
      for (int i = 0; i < total; ++i) {
        if (!chunk(i, "", job.choices[i].LogprobCount(), nullptr, &delta)) return false;
      }
    }
    absl::Time last_write = absl::Now();
    bool failed = false;
    while (job.ended < total) {
      std::optional<Event> e;
      if (!early.empty()) {
        e = std::move(early.front());
        early.pop_front();
      } else {
        e = Wait(job, std::min(deadline, absl::Now() + absl::Seconds(2)));
        if (!e) {
          if (job.client_gone) return false;
          if (stopping || absl::Now() >= deadline) break;
          // Silence: an SSE comment, which also finds out whether the client is still there.
          if (absl::Now() - last_write >= absl::Seconds(2)) {
            static constexpr char kPing[] = ": ping\n\n";
            if (!sink.write(kPing, sizeof(kPing) - 1)) return false;
            last_write = absl::Now();
          }
          continue;
        }
      }
      Choice& c = job.choices[e->choice];
      size_t logprobs_from = c.LogprobCount();
      bool ended = false;
      std::string text = Apply(job, *e, &ended);
      if (ended && !c.status.ok()) {
        // Failed after its first token: an error event, then the stream ends.
        send(ErrorBody(c.status));
        failed = true;
        break;
      }
      Json finish = ended ? Json(c.finish_reason) : Json(nullptr);
      if (c.reasoning) {  // the reasoning as reasoning_content deltas; the rest goes on
        ReasoningScanner::Split split = c.reasoning->Feed(text);
        if (ended) {
          ReasoningScanner::Split rest = c.reasoning->Finish();
          split.reasoning += rest.reasoning;
          split.content += rest.content;
        }
        if (!split.reasoning.empty()) {
          const Json delta = {{"reasoning_content", split.reasoning}};
          if (!chunk(e->choice, "", logprobs_from, nullptr, &delta)) return false;
          logprobs_from = c.LogprobCount();
        }
        text = std::move(split.content);
      }
      if (c.forced) {  // a forced tool choice's calls stream as they are written
        const std::vector<ForcedCallStream::Delta> deltas = c.forced->Feed(text);
        if (ended && c.finish_reason == "stop") finish = "tool_calls";
        for (size_t k = 0; k < deltas.size(); ++k) {
          const ForcedCallStream::Delta& d = deltas[k];
          Json call = {{"index", d.index}, {"function", {{"arguments", d.arguments}}}};
          if (d.opens) {  // the call's first delta: its id and name
            call["id"] = NewCallId(options.tool_call_format);
            call["type"] = "function";
            call["function"] = {{"name", d.name}, {"arguments", d.arguments}};
          }
          const Json delta = {{"tool_calls", Json::array({std::move(call)})}};
          const Json last = k + 1 == deltas.size() ? finish : Json(nullptr);
          if (!chunk(e->choice, "", logprobs_from, last, &delta)) return false;
          logprobs_from = c.LogprobCount();
        }
        if (deltas.empty() && (ended || c.LogprobCount() > logprobs_from) &&
            !chunk(e->choice, "", logprobs_from, finish)) {
          return false;
        }
        last_write = absl::Now();
        continue;
      }
      if (c.scanner) {  // content as it is known not to start a tool call; the calls at the end
        text = c.scanner->Feed(text);
        ToolCallScanner::Result r;
        if (ended) r = KeptCalls(job.request, c.scanner->Finish());
        text += r.content;
        if (!r.calls.empty()) {
          if ((!text.empty() || c.LogprobCount() > logprobs_from) &&
              !chunk(e->choice, text, logprobs_from, nullptr)) {
            return false;
          }
          for (size_t k = 0; k < r.calls.size(); ++k) {
            const Json delta = {
                {"tool_calls", Json::array({ToolCallJson(r.calls[k], static_cast<int>(k),
                                                         options.tool_call_format)})}};
            if (!chunk(e->choice, "", c.LogprobCount(), nullptr, &delta)) return false;
          }
          text.clear();
          logprobs_from = c.LogprobCount();
          finish = "tool_calls";
        }
      }
      if (!text.empty() || ended || c.LogprobCount() > logprobs_from) {
        if (!chunk(e->choice, text, logprobs_from, finish)) return false;
        last_write = absl::Now();
      }
    }
    if (!failed && job.ended < total) {
      send(ErrorBody(stopping ? absl::UnavailableError("the server is stopping")
                              : absl::DeadlineExceededError("the request timed out")));
    } else if (!failed && job.request.include_usage) {
      send({{"id", job.id},
            {"object", object},
            {"created", job.created},
            {"model", options.model},
            {"choices", Json::array()},
            {"usage", Usage(job)}});
    }
    static constexpr char kDone[] = "data: [DONE]\n\n";
    sink.write(kDone, sizeof(kDone) - 1);
    sink.done();
    return true;
  }

  void Routes() {
    server.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
      Completions(req, res);
    });
    server.Post("/v1/chat/completions",
                [this](const httplib::Request& req, httplib::Response& res) { Chat(req, res); });
    server.Post("/tokenize", [this](const httplib::Request& req, httplib::Response& res) {
      Tokenize(req, res);
    });
    server.Post("/detokenize", [this](const httplib::Request& req, httplib::Response& res) {
      Detokenize(req, res);
    });
    server.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
      const Json body = {{"object", "list"},
                         {"data",
                          {{{"id", options.model},
                            {"object", "model"},
                            {"created", 0},
                            {"owned_by", "pdserve"},
                            {"max_model_len", options.max_context}}}}};
      res.set_content(Dump(body), "application/json");
    });
    server.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
      const bool ready = options.ready ? options.ready() : true;
      res.status = ready ? 200 : 503;
      res.set_content(ready ? "ok\n" : "not ready\n", "text/plain");
    });
    server.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
      if (res.status == 404 && res.body.empty()) {
        SendError(res, absl::NotFoundError(absl::StrCat("no route ", req.method, " ", req.path)));
      }
    });
  }
};

absl::StatusOr<std::unique_ptr<OpenAiHttpServer>> OpenAiHttpServer::Start(
    OpenAiHttpOptions options) {
  auto impl = std::make_unique<Impl>(std::move(options));
  const OpenAiHttpOptions& o = impl->options;
  impl->client = std::make_unique<client::ServingClient>(o.grpc_target);
  impl->Routes();
  const int threads = std::max(1, o.threads);
  impl->server.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  impl->server.set_tcp_nodelay(true);  // every chunk leaves at once (no Nagle delay)
  impl->server.set_keep_alive_max_count(1000);
  impl->server.set_keep_alive_timeout(2);  // an idle kept-alive connection holds Stop that long
  impl->server.set_read_timeout(10, 0);
  impl->server.set_write_timeout(30, 0);
  // Bodies up to a few prompts of the whole context (at most 64 bytes a position), 1-64 MiB.
  impl->server.set_payload_max_length(static_cast<size_t>(std::clamp<int64_t>(
      int64_t{o.max_context} * kMaxBytesPerToken * 4, int64_t{1} << 20, int64_t{64} << 20)));
  absl::StatusOr<int> bound =
      ListenInBackground(impl->server, o.host, o.port, impl->thread, "http");
  if (absl::IsInternal(bound.status())) (void)impl.release();  // its thread may use it
  if (!bound.ok()) return bound.status();
  impl->port = *bound;
  impl->log->info("OpenAI-compatible API at http://{}:{}/v1 (model {})", o.host, *bound, o.model);
  return std::unique_ptr<OpenAiHttpServer>(new OpenAiHttpServer(std::move(impl)));
}

OpenAiHttpServer::OpenAiHttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

OpenAiHttpServer::~OpenAiHttpServer() { Stop(); }

int OpenAiHttpServer::port() const { return impl_->port; }

void OpenAiHttpServer::Stop() {
  if (!impl_ || impl_->stopping.exchange(true)) return;
  impl_->server.stop();
  if (impl_->thread.joinable()) impl_->thread.join();
}

}  // namespace pds::server
