#include "client/openai_client.h"

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "httplib.h"
#include "nlohmann/json.hpp"

namespace pds::client {

namespace api = ::pdserve::v1;
using Json = nlohmann::ordered_json;  // request bodies keep their key order (schemas)

struct OpenAiClient::Live {
  std::mutex mu;
  std::condition_variable cv;
  int count = 0;
};

namespace {

// The gRPC status pdserve would have sent for an HTTP error.
grpc::StatusCode CodeOfHttp(int status) {
  switch (status) {
    case 400:
    case 422:
      return grpc::StatusCode::INVALID_ARGUMENT;
    case 404:
      return grpc::StatusCode::NOT_FOUND;
    case 429:
      return grpc::StatusCode::RESOURCE_EXHAUSTED;
    case 503:
      return grpc::StatusCode::UNAVAILABLE;
    case 504:
      return grpc::StatusCode::DEADLINE_EXCEEDED;
    default:
      return grpc::StatusCode::INTERNAL;
  }
}

// The message of an OpenAI error object (or of a body that is not one).
std::string ErrorMessage(const std::string& body) {
  const Json j = Json::parse(body, nullptr, false);
  if (j.is_object() && j.contains("error")) {
    const Json& e = j["error"];
    if (e.is_object() && e.contains("message") && e["message"].is_string()) {
      return e["message"].get<std::string>();
    }
    if (e.is_string()) return e.get<std::string>();
  }
  if (j.is_object() && j.contains("message") && j["message"].is_string()) {
    return j["message"].get<std::string>();
  }
  return body.substr(0, 500);
}

// The request's JSON body; for chat, the prompt text is one user message (INVALID_ARGUMENT for
// token ids: a chat request has no way to send them).
absl::StatusOr<Json> Body(const api::GenerateRequest& r, const std::string& model, bool chat) {
  Json j = {{"model", model},
            {chat ? "max_completion_tokens" : "max_tokens", r.max_tokens()},
            {"stream", true},
            {"stream_options", {{"include_usage", true}}},
            {"temperature", r.has_temperature() ? r.temperature() : 0.0f}};
  if (chat) {
    if (!r.has_prompt_text()) {
      return absl::InvalidArgumentError(
          "chat completions take text prompts (pdbench: --text-prompts or a text dataset)");
    }
    j["messages"] = Json::array({{{"role", "user"}, {"content", r.prompt_text()}}});
  } else if (r.has_prompt_text()) {
    j["prompt"] = r.prompt_text();
  } else {
    j["prompt"] = std::vector<int32_t>(r.prompt_token_ids().begin(), r.prompt_token_ids().end());
  }
  if (r.has_top_p()) j["top_p"] = r.top_p();
  if (r.has_top_k() && r.top_k() > 0) j["top_k"] = r.top_k();
  if (r.has_seed()) j["seed"] = r.seed();
  if (r.ignore_eos()) j["ignore_eos"] = true;
  if (r.stop_token_ids_size() > 0) {
    j["stop_token_ids"] =
        std::vector<int32_t>(r.stop_token_ids().begin(), r.stop_token_ids().end());
  }
  if (r.has_logprobs() && r.logprobs() >= 0) {
    if (chat) {
      j["logprobs"] = true;
      j["top_logprobs"] = r.logprobs();
    } else {
      j["logprobs"] = r.logprobs();
    }
  }
  if (!r.json_schema().empty()) {
    Json schema = Json::parse(r.json_schema(), nullptr, /*allow_exceptions=*/false);
    if (schema.is_discarded()) return absl::InvalidArgumentError("json_schema is not JSON");
    j["response_format"] = {{"type", "json_schema"},
                            {"json_schema", {{"name", "pdbench"}, {"schema", std::move(schema)}}}};
  }
  if (!r.regex().empty()) j["guided_regex"] = r.regex();
  if (r.has_ttft_slo_ms()) j["ttft_slo_ms"] = r.ttft_slo_ms();
  if (r.has_tpot_slo_ms()) j["tpot_slo_ms"] = r.tpot_slo_ms();
  return j;
}

class HttpCall : public GenerateCall {
 public:
  // Also ends a read that waits for the server (a queued request sends nothing).
  void Cancel() override {
    cancelled = true;
    std::lock_guard<std::mutex> lock(mu);
    if (client != nullptr) client->stop();
  }
  // The connection of the call while it runs (under `mu`).
  void Attach(httplib::Client* c) {
    std::lock_guard<std::mutex> lock(mu);
    client = c;
    if (c != nullptr && cancelled) c->stop();
  }
  httplib::Client* client = nullptr;
  void Wait() override {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return ended; });
  }
  bool WaitFor(absl::Duration timeout) override {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, absl::ToChronoNanoseconds(timeout), [&] { return ended; });
  }
  void End() {
    std::lock_guard<std::mutex> lock(mu);
    ended = true;
    cv.notify_all();
  }
  std::atomic<bool> cancelled{false};
  std::mutex mu;
  std::condition_variable cv;
  bool ended = false;
};

// One streamed completion: its SSE events turned into GenerateResponse messages.
class Stream {
 public:
  Stream(GenerateCallbacks& callbacks) : cb_(callbacks) {}

  // Takes a piece of the body; false once an error event ended the stream.
  bool Feed(const char* data, size_t len) {
    // Events end with a blank line; CRLF and CR line ends count as LF.
    for (size_t i = 0; i < len; ++i) {
      if (data[i] == '\r') {
        cr_ = true;
        buffer_.push_back('\n');
        continue;
      }
      if (!(cr_ && data[i] == '\n')) buffer_.push_back(data[i]);
      cr_ = false;
    }
    size_t end;
    while ((end = buffer_.find("\n\n")) != std::string::npos) {
      std::string event = buffer_.substr(0, end);
      buffer_.erase(0, end + 2);
      absl::string_view rest(event);
      while (!rest.empty()) {
        const size_t nl = rest.find('\n');
        absl::string_view line = rest.substr(0, nl);
        rest = nl == absl::string_view::npos ? absl::string_view() : rest.substr(nl + 1);
        if (!absl::ConsumePrefix(&line, "data:")) continue;  // comments, other fields
        absl::ConsumePrefix(&line, " ");
        if (!Event(line)) return false;
      }
    }
    return true;
  }

  // The stream's end: the message with Done (OK) or the error.
  grpc::Status Finish() {
    if (!error_.ok()) return error_;
    if (finish_reason_.empty()) {
      return grpc::Status(grpc::StatusCode::INTERNAL, "the stream ended without a finish_reason");
    }
    api::GenerateResponse last;
    // The usage's count of tokens, where the chunks counted fewer (several tokens in a chunk).
    const int64_t missing = completion_tokens_ - counted_;
    for (int64_t i = 0; i < missing; ++i) last.add_token_ids(0);
    api::Done* done = last.mutable_done();
    done->set_finish_reason(finish_reason_);
    done->set_prompt_tokens(static_cast<int32_t>(prompt_tokens_));
    done->set_completion_tokens(
        static_cast<int32_t>(std::max<int64_t>(completion_tokens_, counted_)));
    done->set_cached_prompt_tokens(static_cast<int32_t>(cached_tokens_));
    if (cb_.on_message) cb_.on_message(last, Clock::now());
    return grpc::Status::OK;
  }

 private:
  bool Event(absl::string_view data) {
    if (data == "[DONE]") return true;
    const Json j = Json::parse(data.begin(), data.end(), nullptr, false);
    if (!j.is_object()) return true;  // not ours to judge
    if (j.contains("error")) {
      error_ = grpc::Status(grpc::StatusCode::INTERNAL, ErrorMessage(std::string(data)));
      // pdserve's HTTP errors name the gRPC code ("RESOURCE_EXHAUSTED", ...).
      const Json& e = j["error"];
      if (e.is_object() && e.contains("code") && e["code"].is_string()) {
        for (int code = 0; code <= 16; ++code) {
          if (absl::StatusCodeToString(static_cast<absl::StatusCode>(code)) ==
              e["code"].get<std::string>()) {
            error_ = grpc::Status(static_cast<grpc::StatusCode>(code), error_.error_message());
          }
        }
      }
      return false;
    }
    if (j.contains("usage") && j["usage"].is_object()) {
      const Json& u = j["usage"];
      prompt_tokens_ = Count(u, "prompt_tokens");
      completion_tokens_ = Count(u, "completion_tokens");
      if (u.contains("prompt_tokens_details") && u["prompt_tokens_details"].is_object()) {
        cached_tokens_ = Count(u["prompt_tokens_details"], "cached_tokens");
      }
    }
    if (!j.contains("choices") || !j["choices"].is_array() || j["choices"].empty()) return true;
    const Json& c = j["choices"][0];
    api::GenerateResponse m;
    // A completion chunk's text, or a chat chunk's delta content (a role-only delta has none).
    if (c.contains("text") && c["text"].is_string()) m.set_text(c["text"].get<std::string>());
    if (auto d = c.find("delta");
        d != c.end() && d->is_object() && d->contains("content") && (*d)["content"].is_string()) {
      m.set_text((*d)["content"].get<std::string>());
    }
    int64_t tokens = m.text().empty() ? 0 : 1;
    if (auto lp = c.find("logprobs"); lp != c.end() && lp->is_object()) {
      for (const char* list : {"tokens", "content"}) {  // completions' or chat's
        if (lp->contains(list) && (*lp)[list].is_array()) {
          tokens = static_cast<int64_t>((*lp)[list].size());
        }
      }
    }
    for (int64_t i = 0; i < tokens; ++i) m.add_token_ids(0);
    counted_ += tokens;
    if (c.contains("finish_reason") && c["finish_reason"].is_string()) {
      finish_reason_ = c["finish_reason"].get<std::string>();
    }
    if (tokens > 0 && cb_.on_message) cb_.on_message(m, Clock::now());
    return true;
  }

  // A count field of a usage object (0 where absent, null or not a count).
  static int64_t Count(const Json& j, const char* field) {
    auto it = j.find(field);
    return it != j.end() && it->is_number_integer() ? it->get<int64_t>() : 0;
  }

  GenerateCallbacks& cb_;
  std::string buffer_;
  bool cr_ = false;  // the last byte fed was a CR
  grpc::Status error_;
  std::string finish_reason_;
  int64_t counted_ = 0, prompt_tokens_ = 0, completion_tokens_ = 0, cached_tokens_ = 0;
};

}  // namespace

OpenAiClient::OpenAiClient(const std::string& target, std::string model, bool chat)
    : target_(target), model_(std::move(model)), chat_(chat), live_(std::make_shared<Live>()) {
  absl::string_view hp(target);
  absl::ConsumePrefix(&hp, "http://");
  absl::ConsumeSuffix(&hp, "/");
  const size_t colon = hp.rfind(':');
  int port = 0;
  if (colon != absl::string_view::npos && absl::SimpleAtoi(hp.substr(colon + 1), &port)) {
    host_ = std::string(hp.substr(0, colon));
    port_ = port;
  }
  if (absl::StartsWith(host_, "[") && absl::EndsWith(host_, "]")) {
    host_ = host_.substr(1, host_.size() - 2);
  }
}

OpenAiClient::~OpenAiClient() {
  std::unique_lock<std::mutex> lock(live_->mu);
  live_->cv.wait_for(lock, std::chrono::seconds(30), [&] { return live_->count == 0; });
}

absl::Status OpenAiClient::WaitForConnected(absl::Duration timeout) {
  if (host_.empty() || port_ <= 0 || port_ > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--target ", target_, ": expected HOST:PORT or http://HOST:PORT"));
  }
  const absl::Time end = absl::Now() + timeout;
  std::string last = "no answer";
  while (true) {
    httplib::Client http(host_, port_);
    http.set_connection_timeout(2);
    http.set_read_timeout(5);
    if (auto res = http.Get("/v1/models")) {
      if (res->status == 200) {
        const Json j = Json::parse(res->body, nullptr, false);
        if (model_.empty() && j.is_object() && j.contains("data") && j["data"].is_array() &&
            !j["data"].empty() && j["data"][0].contains("id") && j["data"][0]["id"].is_string()) {
          model_ = j["data"][0]["id"].get<std::string>();
        }
        if (model_.empty()) {
          return absl::FailedPreconditionError(
              absl::StrCat(target_, " lists no model at /v1/models: name the model with --model"));
        }
        return absl::OkStatus();
      }
      last = absl::StrCat("GET /v1/models: HTTP ", res->status);
    } else {
      last = httplib::to_string(res.error());
    }
    if (absl::Now() >= end) {
      return absl::UnavailableError(absl::StrCat(target_, " did not answer (", last, ")"));
    }
    absl::SleepFor(absl::Milliseconds(200));
  }
}

absl::StatusOr<api::ClusterStatus> OpenAiClient::GetClusterStatus(absl::Duration) {
  return absl::UnimplementedError("an OpenAI-compatible server has no cluster status");
}

std::shared_ptr<GenerateCall> OpenAiClient::StartGenerate(const api::GenerateRequest& request,
                                                          absl::Duration timeout,
                                                          GenerateCallbacks callbacks) {
  auto call = std::make_shared<HttpCall>();
  {
    std::lock_guard<std::mutex> lock(live_->mu);
    ++live_->count;
  }
  const auto deadline = timeout > absl::ZeroDuration()
                            ? Clock::now() + absl::ToChronoNanoseconds(timeout)
                            : Clock::time_point::max();
  absl::StatusOr<Json> json = Body(request, model_, chat_);
  std::thread([call, live = live_, host = host_, port = port_, id = request.request_id(),
               body = json.ok() ? json->dump() : "", refused = json.status(),
               path = chat_ ? "/v1/chat/completions" : "/v1/completions", deadline,
               cb = std::move(callbacks)]() mutable {
    auto finish = [&](const grpc::Status& status) {
      if (cb.on_done) cb.on_done(status, Clock::now());
      call->End();
      std::lock_guard<std::mutex> lock(live->mu);
      if (--live->count == 0) live->cv.notify_all();
    };
    if (!refused.ok()) {  // ended on this thread too: no callback runs inside StartGenerate
      return finish(
          grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, std::string(refused.message())));
    }
    Stream stream(cb);
    int http_status = 0;
    std::string error_body;
    bool timed_out = false;
    httplib::Client http(host, port);
    call->Attach(&http);
    http.set_tcp_nodelay(true);
    http.set_connection_timeout(10);
    http.set_write_timeout(30);
    const auto left = deadline - Clock::now();
    const auto read_s = std::chrono::duration_cast<std::chrono::seconds>(left).count() + 1;
    http.set_read_timeout(static_cast<time_t>(std::clamp<int64_t>(read_s, 1, 3600)), 0);
    httplib::Request req;
    req.method = "POST";
    req.path = path;
    req.body = std::move(body);
    req.set_header("Content-Type", "application/json");
    req.set_header("Accept", "text/event-stream");
    if (!id.empty()) req.set_header("X-Request-Id", id);
    req.response_handler = [&](const httplib::Response& r) {
      http_status = r.status;
      return true;
    };
    bool stream_ok = true;
    req.content_receiver = [&](const char* data, size_t len, uint64_t, uint64_t) {
      if (call->cancelled) return false;
      if (Clock::now() > deadline) {
        timed_out = true;
        return false;
      }
      if (http_status != 200) {
        if (error_body.size() < 65536) error_body.append(data, len);
        return true;
      }
      stream_ok = stream.Feed(data, len);
      return stream_ok;
    };
    auto res = http.send(req);
    call->Attach(nullptr);
    grpc::Status status;
    if (call->cancelled) {
      status = grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client");
    } else if (timed_out) {
      status = grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "the request's deadline passed");
    } else if (http_status != 0 && http_status != 200) {
      status = grpc::Status(CodeOfHttp(http_status),
                            absl::StrCat("HTTP ", http_status, ": ", ErrorMessage(error_body)));
    } else if (!stream_ok) {
      status = stream.Finish();  // the error event's status
    } else if (!res) {
      status = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                            absl::StrCat(host, ":", port, ": ", httplib::to_string(res.error())));
    } else {
      status = stream.Finish();
    }
    finish(status);
  }).detach();
  return call;
}

}  // namespace pds::client
