#include "server/frontend.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/common/logging.h"
#include "engine/common/status_macros.h"
#include "engine/kv_cache/block_allocator.h"
#include "engine/model/config.h"
#include "engine/runtime/json_constraint.h"
#include "engine/runtime/sampling_params.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/tokenizer.h"
#include "grpcpp/health_check_service_interface.h"
#include "pdserve/internal/control.grpc.pb.h"
#include "pdserve/v1/serving.grpc.pb.h"
#include "scheduler/dispatch_policy.h"
#include "scheduler/latency_model.h"
#include "scheduler/prefix_index.h"
#include "server/grpc_util.h"
#include "server/metrics.h"
#include "server/openai_http.h"
#include "server/stop_matcher.h"

namespace pds::server {

namespace pb = ::pdserve::internal;
namespace api = ::pdserve::v1;
using scheduler::InstanceRole;

namespace {

// The health-service name whose status says the front-end can serve requests (readiness).
constexpr char kServingService[] = "pdserve.v1.Serving";
// How many times a request refused before starting is placed again.
constexpr int kMaxRedispatches = 2;

grpc::Status Invalid(const std::string& message) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, message);
}

struct Instance {
  std::string id;
  InstanceRole role = InstanceRole::kPrefill;
  std::string address;
  std::string kv_address;
  std::shared_ptr<pb::Worker::Stub> stub;  // replaced on re-registration: copy under mu_
  bool healthy = false;
  bool draining = false;  // it said so: no new requests
  int failures = 0;
  absl::Time last_seen = absl::InfinitePast();
  pb::WorkerStatus status;
  // The front-end's own bookkeeping since dispatch (exact and immediate; see Booking).
  std::map<uint64_t, int32_t> queued_lens;  // prompts dispatched here, first token not yet back
  int32_t promised_blocks = 0;              // booked: hand-offs (or local prefills) not yet in
  int32_t decoding = 0;                     // requests decoding here
  int64_t decode_context = 0;               // their estimated context tokens
  int32_t bookings = 0;                     // live Bookings naming it: not to be forgotten
  // Prefill and colocated workers with prefix caching: block hashes of the prompts sent here.
  scheduler::PrefixIndex prefix_index;
};

// One request's share of the instances' bookkeeping: queued for prefill (and promised KV
// blocks on its decode instance), then decoding; whatever is left is removed when it ends.
// An instance is erased only when no Booking names it, so the pointers stay valid.
class Booking {
 public:
  // Called with `mu` held. `blocks` are promised to the instance that decodes the request
  // (`decode`, or `prefill` where it runs the whole request) until the hand-off is in (or the
  // first token came); colocated requests book none.
  Booking(std::mutex& mu, Instance* prefill, Instance* decode, uint64_t seq, int32_t prompt_len,
          int32_t blocks, int64_t context)
      : mu_(mu),
        prefill_(prefill),
        decode_(decode),
        promised_on_(decode != nullptr ? decode : (blocks > 0 ? prefill : nullptr)),
        seq_(seq),
        blocks_(blocks),
        context_(context) {
    prefill_->queued_lens[seq_] = prompt_len;
    ++prefill_->bookings;
    if (decode_ != nullptr) ++decode_->bookings;
    if (promised_on_ != nullptr) promised_on_->promised_blocks += blocks_;
  }
  ~Booking() {
    std::lock_guard<std::mutex> lock(mu_);
    --prefill_->bookings;
    if (decode_ != nullptr) --decode_->bookings;
    if (queued_) prefill_->queued_lens.erase(seq_);
    Unpromise();
    if (decoding_on_ != nullptr) {
      --decoding_on_->decoding;
      decoding_on_->decode_context -= context_;
    }
  }
  // The first token came back (a colocated instance now decodes it).
  void PrefillDone() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!queued_) return;
    prefill_->queued_lens.erase(seq_);
    queued_ = false;
    if (decode_ == nullptr) {
      Unpromise();
      Decoding(prefill_);
    }
  }
  // The decode instance has the KV and streams tokens.
  void DecodeStarted() {
    std::lock_guard<std::mutex> lock(mu_);
    if (decode_ == nullptr || decoding_on_ != nullptr) return;
    Unpromise();
    Decoding(decode_);
  }

 private:
  void Unpromise() {
    if (promised_on_ == nullptr) return;
    promised_on_->promised_blocks -= blocks_;
    promised_on_ = nullptr;
  }
  void Decoding(Instance* inst) {
    decoding_on_ = inst;
    ++inst->decoding;
    inst->decode_context += context_;
  }
  std::mutex& mu_;
  Instance* prefill_;
  Instance* decode_;
  Instance* promised_on_;  // null once the promise is kept (or none was made)
  uint64_t seq_;
  int32_t blocks_;
  int64_t context_;
  bool queued_ = true;
  Instance* decoding_on_ = nullptr;
};

// The worker calls of one request, so that a client's cancellation reaches them.
struct Tracked {
  std::string id;
  grpc::ServerContext* server_context = nullptr;
  std::mutex mu;
  std::vector<grpc::ClientContext*> calls;
  bool cancelled = false;

  void Add(grpc::ClientContext* ctx) {
    std::lock_guard<std::mutex> lock(mu);
    calls.push_back(ctx);
    if (cancelled) ctx->TryCancel();
  }
  void Remove(grpc::ClientContext* ctx) {
    std::lock_guard<std::mutex> lock(mu);
    std::erase(calls, ctx);
  }
  void CancelAll() {
    std::lock_guard<std::mutex> lock(mu);
    cancelled = true;
    for (grpc::ClientContext* c : calls) c->TryCancel();
  }
  bool IsCancelled() {
    std::lock_guard<std::mutex> lock(mu);
    return cancelled;
  }
};

}  // namespace

class Frontend::Impl : public api::Serving::Service, public pb::Registry::Service {
 public:
  explicit Impl(FrontendOptions options)
      : options_(std::move(options)), log_(pds::Logger("frontend")) {}

  absl::Status Init() {
    const std::string nonce =
        absl::StrFormat("%08x", static_cast<uint32_t>(std::random_device{}()));
    tag_ = options_.id.empty() ? nonce : absl::StrCat(options_.id, ".", nonce);
    if (options_.id.empty()) {
      options_.id = nonce;
    } else if (options_.id.size() > 64 ||
               !std::all_of(options_.id.begin(), options_.id.end(), [](char c) {
                 return absl::ascii_isalnum(c) || c == '.' || c == '_' || c == '-';
               })) {
      return absl::InvalidArgumentError(absl::StrCat(
          "front-end id '", options_.id, "': expected at most 64 letters, digits, '.', '_', '-'"));
    }
    PDS_ASSIGN_OR_RETURN(config_, engine::LoadModelConfig(options_.model_dir));
    const std::string tok_path = options_.model_dir + "/tokenizer.json";
    if (std::filesystem::exists(tok_path)) {
      PDS_ASSIGN_OR_RETURN(tokenizer_, engine::Tokenizer::Load(tok_path));
    } else {
      log_->warn("{} has no tokenizer.json: text prompts are refused, no text is streamed",
                 options_.model_dir);
    }
    model_name_ = std::filesystem::path(options_.model_dir).lexically_normal().filename();
    if (model_name_.empty()) {
      model_name_ =
          std::filesystem::path(options_.model_dir).lexically_normal().parent_path().filename();
    }
    if (!options_.profile_path.empty()) {
      PDS_ASSIGN_OR_RETURN(scheduler::LatencyModel model,
                           scheduler::LoadLatencyModelFile(options_.profile_path));
      latency_model_ =
          std::make_unique<scheduler::LatencyModel>(model.Scaled(options_.step_time_scale));
    }
    scheduler::SloPolicyOptions slo;
    slo.default_ttft_slo_ms = options_.default_ttft_slo_ms;
    slo.default_tpot_slo_ms = options_.default_tpot_slo_ms;
    slo.best_effort = options_.best_effort;
    PDS_ASSIGN_OR_RETURN(policy_,
                         scheduler::MakeDispatchPolicy(options_.policy, latency_model_.get(), slo));
    PDS_ASSIGN_OR_RETURN(server_, StartGrpcServer(options_.host, options_.port,
                                                  {static_cast<api::Serving::Service*>(this),
                                                   static_cast<pb::Registry::Service*>(this)},
                                                  &port_));
    if (auto* health = server_->GetHealthCheckService()) {
      health->SetServingStatus(kServingService, false);  // until workers are in
    }
    if (options_.metrics_port >= 0) {
      PDS_ASSIGN_OR_RETURN(metrics_server_,
                           MetricsServer::Start(options_.host, options_.metrics_port,
                                                [this] { return metrics_.Render(Gauges()); }));
    }
    if (options_.http_port >= 0) {
      OpenAiHttpOptions http;
      http.host = options_.host;
      http.port = options_.http_port;
      // Its calls come back over loopback where the front-end listens on every address.
      http.grpc_target =
          JoinHostPort(IsWildcardHost(options_.host) ? "127.0.0.1" : options_.host, port_);
      http.model = model_name_;
      http.id_tag = options_.id;
      http.max_context = static_cast<int32_t>(config_.max_context());
      http.tokenizer = tokenizer_.get();
      PDS_ASSIGN_OR_RETURN(http.tool_call_format, ParseToolCallFormat(options_.tool_call_parser));
      PDS_ASSIGN_OR_RETURN(http.reasoning_format, ParseReasoningFormat(options_.reasoning_parser));
      absl::StatusOr<engine::ChatFormat> chat =
          engine::LoadChatFormat(options_.model_dir, options_.chat_template);
      if (chat.ok()) {
        chat_ = std::make_unique<engine::ChatFormat>(*std::move(chat));
        http.chat = chat_.get();
      } else if (!options_.chat_template.empty() || !absl::IsNotFound(chat.status())) {
        return chat.status();  // a template that is there must load
      } else {
        log_->warn("no chat template ({}): /v1/chat/completions is refused",
                   std::string(chat.status().message()));
        http.chat_unavailable = absl::InvalidArgumentError(absl::StrCat(
            "the model has no chat template (", chat.status().message(),
            "); use /v1/completions, or start the front-end with --chat-template FILE"));
      }
      http.ready = [this] {
        std::lock_guard<std::mutex> lock(mu_);
        return Ready();
      };
      http.threads = std::clamp(options_.max_in_flight, 16, 512);
      http.max_choices_in_flight = std::max(1, options_.max_in_flight);
      http.request_timeout = options_.request_timeout;
      PDS_ASSIGN_OR_RETURN(http_server_, OpenAiHttpServer::Start(std::move(http)));
    }
    health_ = std::thread([this] { HealthLoop(); });
    monitor_ = std::thread([this] { MonitorLoop(); });
    log_->info("front-end {} for {} serving on {} (policy {})", options_.id, model_name_, address(),
               policy_->name());
    return absl::OkStatus();
  }

  std::string address() const { return absl::StrCat(options_.host, ":", port_); }
  int port() const { return port_; }
  int metrics_port() const { return metrics_server_ ? metrics_server_->port() : -1; }
  int http_port() const { return http_server_ ? http_server_->port() : -1; }

  bool Drain(absl::Duration timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    if (!draining_) {
      draining_ = true;
      log_->info("draining: {} requests in flight", in_flight_.size());
      SetReady(false);
    }
    return in_flight_cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout),
                                  [&] { return in_flight_.empty(); });
  }

  void Shutdown() {
    if (shut_down_.exchange(true)) return;
    {
      std::lock_guard<std::mutex> lock(stop_mu_);
      stopping_ = true;
      stop_cv_.notify_all();
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [id, t] : in_flight_) t->CancelAll();
    }
    if (http_server_) http_server_->Stop();  // its calls end as theirs were cancelled
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    if (metrics_server_) metrics_server_->Stop();
    if (health_.joinable()) health_.join();
    if (monitor_.joinable()) monitor_.join();
  }

  // --- Registry ---

  grpc::Status Register(grpc::ServerContext*, const pb::RegisterRequest* request,
                        pb::RegisterResponse* response) override {
    auto role = scheduler::ParseInstanceRole(request->role());
    if (!role.ok()) return ToGrpc(role.status());
    if (request->id().empty() || request->address().empty()) {
      return Invalid("registration needs an id and an address");
    }
    if (*role == InstanceRole::kDecode && request->kv_address().empty()) {
      return Invalid("a decode worker registers with its KV address");
    }
    if (request->vocab_size() != config_.vocab_size ||
        (!request->model().empty() && request->model() != model_name_)) {
      response->set_accepted(false);
      response->set_message(absl::StrCat("worker serves '", request->model(), "' (vocabulary ",
                                         request->vocab_size(), "); this front-end serves '",
                                         model_name_, "' (vocabulary ", config_.vocab_size, ")"));
      return grpc::Status::OK;
    }
    std::lock_guard<std::mutex> lock(mu_);
    auto& slot = instances_[request->id()];
    if (slot != nullptr && request->draining() && !slot->draining) {
      log_->info("{} is draining", request->id());
    }
    if (slot == nullptr || slot->address != request->address() ||
        slot->kv_address != request->kv_address() || slot->role != *role) {
      const bool replaced = slot != nullptr;
      auto inst = std::make_unique<Instance>();
      inst->id = request->id();
      inst->role = *role;
      inst->address = request->address();
      inst->kv_address = request->kv_address();
      inst->stub = pb::Worker::NewStub(MakeChannel(inst->address));
      // A re-registration (new address) replaces the connection in place: requests in flight
      // keep pointers to this Instance and their bookkeeping stays.
      if (replaced) {
        slot->role = inst->role;
        slot->address = inst->address;
        slot->kv_address = inst->kv_address;
        slot->stub = std::move(inst->stub);
        slot->healthy = false;
        slot->failures = 0;
        slot->prefix_index.Clear();  // another process: its cache starts empty
      } else {
        slot = std::move(inst);
      }
      log_->info("{} {} ({} at {})", replaced ? "re-registered" : "registered", request->id(),
                 request->role(), request->address());
    }
    slot->draining = request->draining();
    slot->last_seen = absl::Now();
    response->set_accepted(true);
    return grpc::Status::OK;
  }

  // --- Serving ---

  grpc::Status GetClusterStatus(grpc::ServerContext*, const api::ClusterStatusRequest*,
                                api::ClusterStatus* status) override {
    std::lock_guard<std::mutex> lock(mu_);
    status->set_model(model_name_);
    status->set_policy(policy_->name());
    const absl::Time now = absl::Now();
    for (const auto& [id, inst] : instances_) {
      api::InstanceStatus* s = status->add_instances();
      s->set_id(id);
      s->set_role(std::string(scheduler::InstanceRoleName(inst->role)));
      s->set_address(inst->address);
      s->set_healthy(inst->healthy);
      s->set_queued_requests(inst->status.queued_requests());
      s->set_queued_prompt_tokens(inst->status.queued_prompt_tokens());
      s->set_running_requests(inst->status.running_requests());
      s->set_kv_blocks_total(inst->status.kv_blocks_total());
      s->set_kv_blocks_used(inst->status.kv_blocks_used());
      s->set_kv_blocks_free(inst->status.kv_blocks_free());
      s->set_last_seen_ms_ago(inst->last_seen == absl::InfinitePast()
                                  ? -1
                                  : absl::ToInt64Milliseconds(now - inst->last_seen));
      s->set_requests_served(inst->status.requests_served());
      s->set_kv_handoffs_deferred(inst->status.kv_handoffs_deferred());
      s->set_engine_steps(inst->status.engine_steps());
      s->set_engine_busy_s(inst->status.engine_busy_s());
      s->set_engine_step_tokens(inst->status.engine_step_tokens());
      s->set_max_batch_size(inst->status.max_batch_size());
      s->set_draining(inst->draining);
      s->set_prefix_cache_query_tokens(inst->status.prefix_cache_query_tokens());
      s->set_prefix_cache_hit_tokens(inst->status.prefix_cache_hit_tokens());
      s->set_kv_blocks_cached(inst->status.kv_blocks_cached());
      s->set_kv_bytes_sent(inst->status.kv_bytes_sent());
      s->set_kv_bytes_held(inst->status.kv_bytes_held());
      s->set_kv_bytes_received(inst->status.kv_bytes_received());
      s->set_kv_blocks_booked(inst->promised_blocks);
      s->set_spec_draft_tokens(inst->status.spec_draft_tokens());
      s->set_spec_accepted_tokens(inst->status.spec_accepted_tokens());
      s->set_spec_proposed_tokens(inst->status.spec_proposed_tokens());
    }
    status->set_requests_in_flight(static_cast<int32_t>(in_flight_.size()));
    status->set_requests_finished(finished_);
    status->set_requests_rejected(rejected_);
    status->set_requests_cancelled(cancelled_);
    status->set_requests_failed(failed_);
    status->set_requests_refused_slo(refused_slo_);
    status->set_requests_best_effort(best_effort_);
    status->set_requests_redispatched(redispatched_);
    status->set_requests_local_prefill(local_prefills_);
    status->set_ready(Ready());
    return grpc::Status::OK;
  }

  grpc::Status Generate(grpc::ServerContext* ctx, const api::GenerateRequest* request,
                        grpc::ServerWriter<api::GenerateResponse>* writer) override {
    RequestOutcome outcome;
    const grpc::Status status = Serve(ctx, request, writer, &outcome);
    outcome.code = absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code()));
    metrics_.Record(outcome);
    return status;
  }

  // Generate's work; `outcome` gets the figures of a request that was relayed.
  grpc::Status Serve(grpc::ServerContext* ctx, const api::GenerateRequest* request,
                     grpc::ServerWriter<api::GenerateResponse>* writer, RequestOutcome* outcome) {
    const int64_t arrival_us = NowUs();
    pb::WorkRequest work;
    grpc::Status valid = Validate(*request, work);
    if (!valid.ok()) {
      Count(valid);
      return valid;
    }
    auto tracked = std::make_shared<Tracked>();
    tracked->server_context = ctx;
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (work.request_id().empty()) {
        // Not one a client chose for a request still in flight.
        std::string id;
        do {
          id = absl::StrCat("req-", options_.id, "-", next_id_++);
        } while (in_flight_.count(id));
        work.set_request_id(std::move(id));
      }
      // A client that cancelled a call and sends the same id again may be ahead of the old
      // call's handler, which ends within its poll: wait for it (bounded), as for a call that
      // has ended.
      if (auto it = in_flight_.find(work.request_id());
          it != in_flight_.end() &&
          (it->second->IsCancelled() || it->second->server_context->IsCancelled())) {
        in_flight_cv_.wait_for(lock, std::chrono::seconds(2),
                               [&] { return in_flight_.count(work.request_id()) == 0; });
      }
      if (in_flight_.count(work.request_id())) {
        ++rejected_;
        return Invalid(absl::StrCat("request id '", work.request_id(), "' is already in flight"));
      }
      if (draining_) {
        ++rejected_;
        return grpc::Status(
            grpc::StatusCode::UNAVAILABLE,
            "the front-end is shutting down; send the request to another front-end");
      }
      if (static_cast<int>(in_flight_.size()) >= options_.max_in_flight) {
        ++rejected_;
        return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                            absl::StrCat("the cluster has ", in_flight_.size(),
                                         " requests in flight (the limit); retry later"));
      }
      tracked->id = work.request_id();
      in_flight_[work.request_id()] = tracked;
      // The workers get an id of this call alone: a client may reuse its id as soon as a call
      // has ended here, while a worker may still hold the earlier call's state for a moment
      // (a cancelled KV transfer breaking off), which would refuse the reused id.
      work.set_request_id(CallId(tracked->id));
    }
    const absl::Time deadline =
        ctx->deadline() == std::chrono::system_clock::time_point::max()
            ? absl::Now() + options_.request_timeout
            : std::min(absl::FromChrono(ctx->deadline()), absl::Now() + options_.request_timeout);
    work.set_deadline_unix_us(absl::ToUnixMicros(deadline));
    const double ttft_slo =
        request->has_ttft_slo_ms() ? request->ttft_slo_ms() : options_.default_ttft_slo_ms;
    if (ttft_slo > 0) {
      work.set_ttft_deadline_unix_us(arrival_us + static_cast<int64_t>(ttft_slo * 1e3));
    }
    const double tpot_slo =
        request->has_tpot_slo_ms() ? request->tpot_slo_ms() : options_.default_tpot_slo_ms;
    if (tpot_slo > 0) work.set_tpot_slo_ms(tpot_slo);

    Relay relay(*this, *request, work, writer, *tracked);
    relay.timeline.set_arrival_us(arrival_us);
    grpc::Status status = Run(relay);
    *outcome = OutcomeOf(relay, ttft_slo, tpot_slo);
    {
      std::lock_guard<std::mutex> lock(mu_);
      in_flight_.erase(tracked->id);
      in_flight_cv_.notify_all();
    }
    Count(status);
    return status;
  }

 private:
  // One request on its way through the cluster: what the client has been sent so far.
  struct Relay {
    Relay(Impl& impl, const api::GenerateRequest& request, pb::WorkRequest& work,
          grpc::ServerWriter<api::GenerateResponse>* writer, Tracked& tracked)
        : request(request), work(work), writer(writer), tracked(tracked) {
      // The text leaves special tokens (EOS, BOS, chat markers) out unless asked to keep them,
      // as HF's and vLLM's defaults do; their ids are in token_ids.
      if (impl.tokenizer_) {
        decoder = std::make_unique<engine::StreamDecoder>(
            *impl.tokenizer_,
            /*skip_special_tokens=*/!request.has_skip_special_tokens() ||
                request.skip_special_tokens());
      }
      if (request.stop_size() > 0) {
        stop = std::make_unique<StopMatcher>(
            std::vector<std::string>(request.stop().begin(), request.stop().end()),
            request.include_stop_str_in_output());
      }
    }
    const api::GenerateRequest& request;
    pb::WorkRequest& work;  // dispatch adds its decisions (best_effort)
    grpc::ServerWriter<api::GenerateResponse>* writer;
    Tracked& tracked;
    std::unique_ptr<engine::StreamDecoder> decoder;
    std::unique_ptr<StopMatcher> stop;  // the request's text stop sequences, if any
    // A stop sequence ended it (its worker calls are then cancelled).
    bool stopped() const { return stop && stop->stopped(); }
    api::Timeline timeline;
    int32_t completion_tokens = 0;
    std::vector<int32_t> output_ids;  // the tokens relayed (the decoding worker caches them)
    std::string finish_reason;
    // The prefill worker's KV hand-off, offered to confirmed, on its own clock (the timeline's
    // end is the decode worker's, another host's clock).
    std::pair<int64_t, int64_t> kv_sent_us = {0, 0};
    int32_t cached_prompt_tokens = 0;  // from the prefill (or colocated) worker
    bool local_prefill = false;        // placed whole on a decode worker (counted once)
  };

  grpc::Status Validate(const api::GenerateRequest& r, pb::WorkRequest& work) {
    if (r.has_prompt_text() == (r.prompt_token_ids_size() > 0)) {
      return Invalid(r.has_prompt_text()
                         ? "give the prompt as prompt_text or prompt_token_ids, not both"
                         : "the prompt is empty (give prompt_text or prompt_token_ids)");
    }
    if (r.request_id().size() > 256) return Invalid("request_id is longer than 256 bytes");
    std::vector<int32_t> ids;
    if (r.has_prompt_text()) {
      if (r.prompt_text().empty()) return Invalid("prompt_text is empty");
      if (!tokenizer_) {
        return Invalid(
            absl::StrCat("model ", model_name_, " has no tokenizer.json; send prompt_token_ids"));
      }
      ids = tokenizer_->Encode(r.prompt_text());
      if (ids.empty()) return Invalid("prompt_text encodes to no tokens");
    } else {
      ids.assign(r.prompt_token_ids().begin(), r.prompt_token_ids().end());
    }
    if (r.has_truncate_prompt_tokens()) {
      const int64_t keep =
          r.truncate_prompt_tokens() == -1 ? config_.max_context() : r.truncate_prompt_tokens();
      if (keep < 1) {
        return Invalid(absl::StrCat("truncate_prompt_tokens must be at least 1 or -1 (got ",
                                    r.truncate_prompt_tokens(), ")"));
      }
      if (static_cast<int64_t>(ids.size()) > keep) ids.erase(ids.begin(), ids.end() - keep);
    }
    for (int32_t id : ids) {
      if (id < 0 || id >= config_.vocab_size) {
        return Invalid(absl::StrCat("prompt token id ", id, " is outside the vocabulary [0, ",
                                    config_.vocab_size, ")"));
      }
    }
    if (r.max_tokens() <= 0) {
      return Invalid(absl::StrCat("max_tokens must be at least 1 (got ", r.max_tokens(), ")"));
    }
    const int64_t total = static_cast<int64_t>(ids.size()) + r.max_tokens();
    if (total > config_.max_context()) {
      return Invalid(absl::StrCat("prompt of ", ids.size(), " tokens + max_tokens ", r.max_tokens(),
                                  " exceeds the model's context of ", config_.max_context()));
    }
    // The sampling parameters are checked by the engine's own rule, as the workers will.
    engine::SamplingParams params;
    params.temperature = r.has_temperature() ? r.temperature() : 0.0f;
    params.top_k = r.has_top_k() ? r.top_k() : 0;
    params.top_p = r.has_top_p() ? r.top_p() : 1.0f;
    params.max_tokens = r.max_tokens();
    params.logprobs = r.has_logprobs() ? r.logprobs() : -1;
    params.prompt_logprobs = r.has_prompt_logprobs() ? r.prompt_logprobs() : -1;
    params.stop_token_ids.assign(r.stop_token_ids().begin(), r.stop_token_ids().end());
    params.json_schema = r.json_schema();
    params.regex = r.regex();
    params.presence_penalty = r.presence_penalty();
    params.frequency_penalty = r.frequency_penalty();
    params.repetition_penalty = r.has_repetition_penalty() ? r.repetition_penalty() : 1.0f;
    params.logit_bias.assign(r.logit_bias().begin(), r.logit_bias().end());
    params.min_tokens = r.min_tokens();
    params.min_p = r.min_p();
    params.allowed_token_ids.assign(r.allowed_token_ids().begin(), r.allowed_token_ids().end());
    params.ignore_eos = r.ignore_eos();
    if (absl::Status valid = params.Validate(config_.vocab_size, config_.eos_token_ids);
        !valid.ok()) {
      return ToGrpc(valid);
    }
    for (double slo : {r.ttft_slo_ms(), r.tpot_slo_ms()}) {
      if (!std::isfinite(slo) || slo < 0) return Invalid("SLO targets must be finite and >= 0");
    }
    if (r.stop_size() > 0) {
      if (!tokenizer_) {
        return Invalid(absl::StrCat(
            "model ", model_name_, " has no tokenizer.json: no text to stop (use stop_token_ids)"));
      }
      if (absl::Status s = ValidateStops({r.stop().begin(), r.stop().end()}); !s.ok()) {
        return ToGrpc(s);
      }
    }
    if (!r.json_schema().empty()) {  // compiled here too, so that a bad one fails at once
      if (!tokenizer_) {
        return Invalid(absl::StrCat("model ", model_name_,
                                    " has no tokenizer.json: no structured output (json_schema)"));
      }
      if (r.json_schema().size() > engine::kMaxJsonSchemaBytes) {
        return Invalid(
            absl::StrCat("json_schema is longer than ", engine::kMaxJsonSchemaBytes, " bytes"));
      }
      if (auto schema = engine::JsonSchema::Compile(r.json_schema()); !schema.ok()) {
        return ToGrpc(schema.status());
      }
    }
    if (!r.regex().empty()) {
      if (!r.json_schema().empty()) return Invalid("json_schema and regex: one only");
      if (!tokenizer_) {
        return Invalid(absl::StrCat("model ", model_name_,
                                    " has no tokenizer.json: no structured output (regex)"));
      }
      if (r.regex().size() > engine::kMaxRegexBytes) {
        return Invalid(absl::StrCat("regex is longer than ", engine::kMaxRegexBytes, " bytes"));
      }
      if (auto dfa = engine::JsonSchema::Regex(r.regex()); !dfa.ok()) return ToGrpc(dfa.status());
    }
    work.set_request_id(r.request_id());
    work.set_frontend_id(tag_);
    *work.mutable_prompt_token_ids() = {ids.begin(), ids.end()};
    work.set_max_tokens(r.max_tokens());
    work.set_temperature(params.temperature);
    work.set_top_k(params.top_k);
    work.set_top_p(params.top_p);
    work.set_seed(r.has_seed() ? r.seed() : std::random_device{}() * 0x9E3779B97F4A7C15ull);
    work.set_ignore_eos(r.ignore_eos());
    *work.mutable_stop_token_ids() = r.stop_token_ids();
    work.set_logprobs(params.logprobs);
    if (params.prompt_logprobs >= 0) work.set_prompt_logprobs(params.prompt_logprobs);
    work.set_json_schema(r.json_schema());
    work.set_regex(r.regex());
    work.set_presence_penalty(params.presence_penalty);
    work.set_frequency_penalty(params.frequency_penalty);
    if (params.repetition_penalty != 1.0f) work.set_repetition_penalty(params.repetition_penalty);
    *work.mutable_logit_bias() = r.logit_bias();
    work.set_min_tokens(params.min_tokens);
    work.set_min_p(params.min_p);
    *work.mutable_allowed_token_ids() = r.allowed_token_ids();
    if (r.reasoning_first() && (!r.json_schema().empty() || !r.regex().empty()) && tokenizer_) {
      if (std::optional<ReasoningGate> gate = FindReasoningGate(*tokenizer_, ids)) {
        if (gate->open >= 0) work.set_reasoning_open(gate->open);
        work.set_reasoning_end(gate->end);
        work.set_reasoning_inside(gate->inside);
      }
    }
    return grpc::Status::OK;
  }

  // A relayed request's figures for the metrics (times from its timeline).
  static RequestOutcome OutcomeOf(const Relay& relay, double ttft_slo_ms, double tpot_slo_ms) {
    const api::Timeline& t = relay.timeline;
    auto span = [](int64_t from_us, int64_t to_us) {
      return from_us > 0 && to_us >= from_us ? (to_us - from_us) * 1e-6 : -1.0;
    };
    RequestOutcome o;
    o.ttft_s = span(t.arrival_us(), t.first_token_us());
    o.e2e_s = span(t.arrival_us(), t.finish_us());
    o.queue_s = span(t.queued_us(), t.prefill_start_us());
    o.kv_transfer_s = span(relay.kv_sent_us.first, relay.kv_sent_us.second);
    if (relay.completion_tokens > 1 && span(t.first_token_us(), t.finish_us()) >= 0) {
      o.tpot_s = span(t.first_token_us(), t.finish_us()) / (relay.completion_tokens - 1);
    }
    o.prompt_tokens = relay.work.prompt_token_ids_size();
    o.completion_tokens = relay.completion_tokens;
    o.ttft_slo_s = std::max(0.0, ttft_slo_ms) * 1e-3;
    o.tpot_slo_s = std::max(0.0, tpot_slo_ms) * 1e-3;
    return o;
  }

  // The cluster's gauges at a scrape (the metrics server's thread).
  std::string Gauges() {
    std::string out;
    std::lock_guard<std::mutex> lock(mu_);
    PromType(out, "pdserve_requests_in_flight", "gauge", "Requests admitted and not ended.");
    absl::StrAppend(&out, "pdserve_requests_in_flight ", in_flight_.size(), "\n");
    PromType(out, "pdserve_requests_redispatched_total", "counter",
             "Re-dispatches: a request placed again after a worker refused it before starting.");
    absl::StrAppend(&out, "pdserve_requests_redispatched_total ", redispatched_, "\n");
    PromType(out, "pdserve_requests_local_prefill_total", "counter",
             "Requests prefilled on their decode worker (conditional disaggregation).");
    absl::StrAppend(&out, "pdserve_requests_local_prefill_total ", local_prefills_, "\n");
    PromType(out, "pdserve_requests_refused_slo_total", "counter",
             "Requests refused by SLO admission control.");
    absl::StrAppend(&out, "pdserve_requests_refused_slo_total ", refused_slo_, "\n");
    PromType(out, "pdserve_ready", "gauge", "1 when a request can be placed (readiness).");
    absl::StrAppend(&out, "pdserve_ready ", Ready() ? 1 : 0, "\n");
    struct Series {
      const char* name;
      const char* type;
      const char* help;
      std::function<double(const Instance&)> value;
      bool from_status = true;  // the worker's own figures: shown only while it answers
    };
    const Series series[] = {
        {"pdserve_instance_healthy", "gauge", "1 while the worker answers and its loop moves.",
         [](const Instance& i) { return i.healthy ? 1.0 : 0.0; }, false},
        {"pdserve_instance_draining", "gauge", "1 while the worker drains.",
         [](const Instance& i) { return i.draining ? 1.0 : 0.0; }, false},
        {"pdserve_instance_queued_requests", "gauge", "Requests waiting for their prefill.",
         [](const Instance& i) { return i.status.queued_requests(); }},
        {"pdserve_instance_running_requests", "gauge", "Requests in the running batch.",
         [](const Instance& i) { return i.status.running_requests(); }},
        {"pdserve_instance_kv_blocks_used", "gauge", "KV cache blocks in use.",
         [](const Instance& i) { return i.status.kv_blocks_used(); }},
        {"pdserve_instance_kv_blocks_total", "gauge", "KV cache blocks.",
         [](const Instance& i) { return i.status.kv_blocks_total(); }},
        {"pdserve_instance_kv_blocks_booked", "gauge",
         "KV cache blocks the front-end promised to requests placed here, not yet in use.",
         [](const Instance& i) { return i.promised_blocks; }, false},
        {"pdserve_instance_kv_blocks_cached", "gauge",
         "KV cache blocks holding reusable prefix K/V (in use or free).",
         [](const Instance& i) { return i.status.kv_blocks_cached(); }},
        {"pdserve_instance_prefix_cache_query_tokens_total", "counter",
         "Prompt tokens of sequences started (prefix cache lookups).",
         [](const Instance& i) { return i.status.prefix_cache_query_tokens(); }},
        {"pdserve_instance_prefix_cache_hit_tokens_total", "counter",
         "Prompt tokens taken from the prefix cache instead of computed.",
         [](const Instance& i) { return i.status.prefix_cache_hit_tokens(); }},
        {"pdserve_instance_spec_draft_tokens_total", "counter",
         "Speculative draft tokens computed.",
         [](const Instance& i) { return i.status.spec_draft_tokens(); }},
        {"pdserve_instance_spec_accepted_tokens_total", "counter",
         "Speculative draft tokens kept (the draw at their position agreed).",
         [](const Instance& i) { return i.status.spec_accepted_tokens(); }},
        {"pdserve_instance_spec_proposed_tokens_total", "counter",
         "Speculative draft tokens the prompt lookup proposed (the steps carry those that pay).",
         [](const Instance& i) { return i.status.spec_proposed_tokens(); }},
        {"pdserve_instance_engine_steps_total", "counter", "Forward passes run.",
         [](const Instance& i) { return i.status.engine_steps(); }},
        {"pdserve_instance_engine_busy_seconds_total", "counter", "Wall time inside steps.",
         [](const Instance& i) { return i.status.engine_busy_s(); }},
        {"pdserve_instance_requests_served_total", "counter", "Requests the worker finished.",
         [](const Instance& i) { return i.status.requests_served(); }},
        {"pdserve_instance_kv_bytes_sent_total", "counter", "KV bytes handed off (prefill).",
         [](const Instance& i) { return i.status.kv_bytes_sent(); }},
        {"pdserve_instance_kv_bytes_held_total", "counter",
         "KV bytes not handed off: the decode worker held those blocks (prefill).",
         [](const Instance& i) { return i.status.kv_bytes_held(); }},
    };
    // (Label `worker`: Prometheus gives `instance` to the scrape target, the front-end.) A
    // worker that has never answered a poll, or is unhealthy now, shows only its health and
    // drain: its figures would be zeros or stale.
    for (const Series& m : series) {
      PromType(out, m.name, m.type, m.help);
      for (const auto& [id, inst] : instances_) {
        if (m.from_status && !inst->healthy) continue;
        absl::StrAppend(&out, m.name, "{worker=", PromLabel(id),
                        ",role=", PromLabel(scheduler::InstanceRoleName(inst->role)), "} ",
                        absl::StrFormat("%.9g", m.value(*inst)), "\n");
      }
    }
    return out;
  }

  void Count(const grpc::Status& status) {
    std::lock_guard<std::mutex> lock(mu_);
    switch (status.error_code()) {
      case grpc::StatusCode::OK:
        ++finished_;
        break;
      case grpc::StatusCode::CANCELLED:
      case grpc::StatusCode::DEADLINE_EXCEEDED:
        ++cancelled_;
        break;
      case grpc::StatusCode::INVALID_ARGUMENT:
      case grpc::StatusCode::RESOURCE_EXHAUSTED:
        ++rejected_;
        break;
      default:
        ++failed_;
    }
  }

  // Places the request and relays it; undoes the bookkeeping however it ends.
  // A worker that refuses a request before starting it (draining, gone: UNAVAILABLE with no
  // event) has done nothing the client saw: the request is placed again, elsewhere (the
  // refusing worker counts as unhealthy until its next health check), a bounded number of times.
  grpc::Status Run(Relay& relay) {
    for (int attempt = 0;; ++attempt) {
      std::string refused_by;
      grpc::Status s = RunOnce(relay, &refused_by);
      if (refused_by.empty() || attempt == kMaxRedispatches || relay.tracked.IsCancelled() ||
          relay.tracked.server_context->IsCancelled()) {
        if (relay.local_prefill) {  // counted once, as finally placed
          std::lock_guard<std::mutex> lock(mu_);
          ++local_prefills_;
        }
        return s;
      }
      std::lock_guard<std::mutex> lock(mu_);
      ++redispatched_;
      if (relay.work.best_effort()) --best_effort_;  // counted again if placed so again
      // The workers see a new call id: the refusing side may still hold the old one a moment.
      relay.work.set_request_id(CallId(relay.tracked.id));
      log_->info("{} refused {} before starting it ({}); placing it again", refused_by,
                 relay.tracked.id, s.error_message());
    }
  }

  // The id the workers see for a call of request `id` (mu_ held): unique among this
  // process's calls, and, by tag_, among those of the other front-ends sharing the workers
  // and of an earlier process with the same id (a restarted container).
  std::string CallId(const std::string& id) {
    return absl::StrCat(id, "#", tag_, ".", next_call_++);
  }

  grpc::Status RunOnce(Relay& relay, std::string* refused_by) {
    relay.local_prefill = false;
    const int32_t prompt_len = relay.work.prompt_token_ids_size();
    const std::span<const int32_t> prompt(relay.work.prompt_token_ids().data(), prompt_len);
    // The prompt's block hashes for each block size in use (prefix-cache affinity).
    std::map<int32_t, std::vector<uint64_t>> hashes;
    auto hashes_for = [&](int32_t block_size) -> const std::vector<uint64_t>& {
      std::vector<uint64_t>& h = hashes[block_size];
      if (h.empty()) engine::BlockAllocator::ExtendPrefixHashes(prompt, block_size, h);
      return h;
    };
    scheduler::Placement placement;
    Instance* prefill = nullptr;
    Instance* decode = nullptr;
    std::string decode_kv_address;
    std::optional<Booking> booking;
    {
      std::lock_guard<std::mutex> lock(mu_);
      std::vector<scheduler::InstanceLoad> loads;
      for (const auto& [id, inst] : instances_) {
        scheduler::InstanceLoad l;
        l.id = id;
        l.role = inst->role;
        l.healthy = inst->healthy && !inst->draining;
        for (const auto& [seq, len] : inst->queued_lens) {
          l.queued_prompt_lens.push_back(len);
          l.queued_prompt_tokens += len;
        }
        l.queued_requests = static_cast<int32_t>(inst->queued_lens.size());
        l.running_requests = std::max(inst->decoding, inst->status.running_requests());
        l.kv_blocks_total = inst->status.kv_blocks_total();
        // Less this front-end's bookings and the hand-offs other front-ends' requests will
        // bring (accepted there, not reserved yet).
        l.kv_blocks_free = inst->status.kv_blocks_free() - inst->promised_blocks;
        // What other front-ends queued there and promised (as of the last poll; this one's is
        // booked above).
        for (const pb::FrontendQueue& q : inst->status.queued_by_frontend()) {
          if (q.frontend_id() == tag_) continue;
          l.kv_blocks_free -= std::max(0, q.kv_blocks_promised());
          if (q.requests() <= 0) continue;
          const int32_t n = std::min(q.requests(), 4096);  // (a sane worker has max_queued)
          const int64_t tokens = std::max<int64_t>(0, q.prompt_tokens());
          l.queued_requests += n;
          l.queued_prompt_tokens += tokens;
          for (int32_t k = 0; k < n; ++k) {  // as requests of the average length
            l.queued_prompt_lens.push_back(
                static_cast<int32_t>(tokens * (k + 1) / n - tokens * k / n));
          }
        }
        l.block_size = std::max(1, inst->status.block_size());
        l.decode_context_tokens = inst->decode_context;
        if (inst->status.max_batch_tokens() > 0) {
          l.max_batch_tokens = inst->status.max_batch_tokens();
        }
        // (A request for prompt logprobs computes its whole prompt: no prefix to count.)
        if (inst->status.prefix_caching() && !relay.work.has_prompt_logprobs()) {
          l.cached_prefix_tokens =
              inst->prefix_index.Match(hashes_for(l.block_size)) * l.block_size;
        }
        loads.push_back(l);
      }
      scheduler::DispatchRequest dr;
      dr.prompt_tokens = prompt_len;
      dr.max_tokens = relay.work.max_tokens();
      if (relay.request.has_ttft_slo_ms()) dr.ttft_slo_ms = relay.request.ttft_slo_ms();
      if (relay.request.has_tpot_slo_ms()) dr.tpot_slo_ms = relay.request.tpot_slo_ms();
      // The policy's placement, then conditional disaggregation.
      auto placed =
          scheduler::PlaceWithLocalPrefill(*policy_, dr, loads, options_.local_prefill_max_tokens,
                                           {.default_ttft_slo_ms = options_.default_ttft_slo_ms,
                                            .default_tpot_slo_ms = options_.default_tpot_slo_ms},
                                           latency_model_.get());
      if (!placed.ok()) {
        if (absl::IsResourceExhausted(placed.status())) ++refused_slo_;
        return ToGrpc(placed.status());
      }
      placement = *placed;
      if (placement.best_effort) ++best_effort_;
      relay.local_prefill = placement.local_prefill;
      prefill = instances_.at(placement.prefill).get();
      // What the prefill side computes (all of the prompt but its cached prefix there).
      const auto placed_load = std::find_if(
          loads.begin(), loads.end(), [&](const auto& l) { return l.id == placement.prefill; });
      const int32_t prefill_tokens = placed_load == loads.end()
                                         ? prompt_len
                                         : scheduler::UncachedPromptTokens(dr, *placed_load);
      // Both sides will hold the prompt's blocks in their caches afterwards.
      const auto remember_prompt = [&](Instance& inst) {
        if (!inst.status.prefix_caching()) return;
        inst.prefix_index.set_capacity(
            static_cast<size_t>(std::max(0, inst.status.kv_blocks_total())));
        inst.prefix_index.Insert(hashes_for(std::max(1, inst.status.block_size())));
      };
      remember_prompt(*prefill);
      int32_t blocks = 0;
      if (!placement.decode.empty()) {
        decode = instances_.at(placement.decode).get();
        decode_kv_address = decode->kv_address;  // as placed (a re-registration may change it)
        // The blocks it reserves: the prompt's and one to grow. Those of a prefix it holds are
        // booked too: its reported free blocks count them already when no sequence uses them
        // (cached blocks are evictable), and which is the case is not known here.
        blocks =
            engine::BlockTable::BlocksFor(prompt_len + 1, std::max(1, decode->status.block_size()));
        remember_prompt(*decode);
      } else if (placement.local_prefill) {
        // It decodes where it is prefilled: the same blocks, booked there.
        blocks = engine::BlockTable::BlocksFor(prompt_len + 1,
                                               std::max(1, prefill->status.block_size()));
      }
      booking.emplace(mu_, prefill, decode, next_queue_seq_++, prefill_tokens, blocks,
                      prompt_len + relay.work.max_tokens() / 2);
    }
    auto prefill_done = [&] { booking->PrefillDone(); };
    auto decode_started = [&] { booking->DecodeStarted(); };
    relay.timeline.set_prefill_instance(placement.prefill);
    relay.timeline.set_decode_instance(placement.decode);
    relay.timeline.set_scheduler_note(placement.note);
    relay.timeline.set_predicted_ttft_ms(std::max(0.0, placement.predicted_ttft_ms));
    relay.timeline.set_predicted_tpot_ms(std::max(0.0, placement.predicted_tpot_ms));
    relay.timeline.set_best_effort(placement.best_effort);
    relay.work.set_best_effort(placement.best_effort);  // workers plan it after the others
    relay.timeline.set_queued_us(NowUs());
    Instance* refused = nullptr;
    grpc::Status s = decode == nullptr
                         ? RunColocated(relay, *prefill, prefill_done, &refused)
                         : RunDisaggregated(relay, *prefill, *decode, decode_kv_address,
                                            prefill_done, decode_started, &refused);
    if (refused != nullptr) {  // (its booking, still alive, keeps it from being forgotten)
      std::lock_guard<std::mutex> lock(mu_);
      refused->healthy = false;
      *refused_by = refused->id;
    }
    if (s.ok() && !relay.output_ids.empty()) {
      // The decoding worker (decode or colocated) now also caches the answer's blocks: a
      // conversation's next turn, which starts with this prompt and answer, finds them there.
      // (The prompt's hashes were made at dispatch; the answer's blocks extend them.)
      Instance& decoder = decode != nullptr ? *decode : *prefill;
      std::vector<int32_t> context(prompt.begin(), prompt.end());
      context.insert(context.end(), relay.output_ids.begin(), relay.output_ids.end());
      context.pop_back();  // the last token's K/V was never computed
      std::lock_guard<std::mutex> lock(mu_);
      if (decoder.status.prefix_caching()) {
        const int32_t bs = std::max(1, decoder.status.block_size());
        std::vector<uint64_t> context_hashes = hashes_for(bs);
        engine::BlockAllocator::ExtendPrefixHashes(context, bs, context_hashes);
        decoder.prefix_index.Insert(context_hashes);
      }
    }
    return s;
  }

  static void ToApi(const pb::TokenLogprobs& from, api::TokenLogprobs& to) {
    to.set_logprob(from.logprob());
    to.set_rank(from.rank());
    for (const pb::TopLogprob& t : from.top()) {
      api::TopLogprob* top = to.add_top();
      top->set_token_id(t.token_id());
      top->set_logprob(t.logprob());
    }
  }

  // Whether token `id` ends request `r` ("stop"): an EOS of the model (unless ignore_eos) or
  // one of its stop_token_ids.
  bool StoppedBy(const api::GenerateRequest& r, int32_t id) const {
    const auto& eos = config_.eos_token_ids;
    return (!r.ignore_eos() && std::find(eos.begin(), eos.end(), id) != eos.end()) ||
           std::find(r.stop_token_ids().begin(), r.stop_token_ids().end(), id) !=
               r.stop_token_ids().end();
  }

  // Whether a worker call that ended with `s` before any event was refused without being
  // started (a draining or unreachable worker): the request may go elsewhere.
  static bool RefusedBeforeStart(const grpc::Status& s) {
    return s.error_code() == grpc::StatusCode::UNAVAILABLE;
  }

  // Sends tokens of a worker event to the client; `done` when the request ended.
  bool Forward(Relay& relay, const pb::WorkEvent& event, bool* done) {
    api::GenerateResponse response;
    response.set_request_id(relay.tracked.id);
    std::string text;
    *done = !event.finish_reason().empty();
    for (int i = 0; i < event.token_ids_size(); ++i) {
      const int32_t id = event.token_ids(i);
      response.add_token_ids(id);
      relay.output_ids.push_back(id);
      // The EOS or stop token that ended the reply is not text (as in vLLM), unless the
      // request includes what stopped it (a reply its constraint completed ends on its text).
      if (!relay.decoder) continue;
      const bool ended_by = *done && i + 1 == event.token_ids_size() &&
                            event.finish_reason() == "stop" && StoppedBy(relay.request, id);
      if (!ended_by || relay.request.include_stop_str_in_output()) {
        text += relay.decoder->Add(id);
      }
    }
    for (const pb::TokenLogprobs& lp : event.logprobs()) ToApi(lp, *response.add_logprobs());
    if (relay.request.has_prompt_logprobs() && relay.request.prompt_logprobs() >= 0 &&
        relay.completion_tokens == 0 && event.token_ids_size() > 0) {  // the first token's
      *response.mutable_prompt_token_ids() = relay.work.prompt_token_ids();
      for (const pb::TokenLogprobs& lp : event.prompt_logprobs()) {
        ToApi(lp, *response.add_prompt_logprobs());
      }
    }
    relay.completion_tokens += event.token_ids_size();
    if (relay.timeline.first_token_us() == 0) relay.timeline.set_first_token_us(NowUs());
    if (*done && relay.decoder) text += relay.decoder->Finish();
    // Stop sequences count from min_tokens tokens on (as vLLM's): the text before passes.
    if (relay.stop && relay.completion_tokens > relay.work.min_tokens()) {
      // Text that may start a stop sequence waits for the next tokens; one that appears ends
      // the request there (its tokens are sent, the text stops before it).
      std::string out = relay.stop->Add(text);
      if (relay.stop->stopped()) {
        *done = true;
      } else if (*done) {
        out += relay.stop->Finish();
      }
      text = std::move(out);
    }
    *response.mutable_text() = std::move(text);
    if (*done) {
      relay.finish_reason = relay.stopped() ? "stop" : event.finish_reason();
      relay.timeline.set_finish_us(NowUs());
      api::Done* d = response.mutable_done();
      d->set_finish_reason(relay.finish_reason);
      d->set_prompt_tokens(relay.work.prompt_token_ids_size());
      d->set_cached_prompt_tokens(relay.cached_prompt_tokens);
      d->set_completion_tokens(relay.completion_tokens);
      d->set_seed(relay.work.seed());
      *d->mutable_timeline() = relay.timeline;
    }
    return relay.writer->Write(response);
  }

  // What a worker's event adds to the request's timeline and usage.
  static void MergeEvent(Relay& relay, const pb::WorkEvent& e) {
    api::Timeline& t = relay.timeline;
    if (e.cached_prompt_tokens()) relay.cached_prompt_tokens = e.cached_prompt_tokens();
    if (e.queued_us()) t.set_queued_us(e.queued_us());
    if (e.prefill_start_us()) t.set_prefill_start_us(e.prefill_start_us());
    if (e.prefill_end_us()) t.set_prefill_end_us(e.prefill_end_us());
    if (e.kv_transfer_start_us() && !t.kv_transfer_start_us()) {
      t.set_kv_transfer_start_us(e.kv_transfer_start_us());
    }
    if (e.kv_transfer_end_us()) t.set_kv_transfer_end_us(e.kv_transfer_end_us());
    if (e.decode_start_us()) t.set_decode_start_us(e.decode_start_us());
  }

  // A worker call registered for cancellation for as long as it lives.
  struct Call {
    Call(Tracked& tracked, int64_t deadline_us) : tracked(tracked) {
      SetDeadlineUs(context, deadline_us);
      tracked.Add(&context);
    }
    ~Call() { tracked.Remove(&context); }
    Tracked& tracked;
    grpc::ClientContext context;
  };

  grpc::Status WorkerError(const Instance& inst, const grpc::Status& s, Relay& relay) {
    if (relay.tracked.IsCancelled() || relay.tracked.server_context->IsCancelled()) {
      return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client");
    }
    if (s.ok()) {
      return grpc::Status(grpc::StatusCode::INTERNAL,
                          absl::StrCat(inst.id, " ended the request without finishing it"));
    }
    // Worker-side rejections keep their code; the message names the instance.
    return grpc::Status(s.error_code(), absl::StrCat(inst.id, ": ", s.error_message()));
  }

  std::shared_ptr<pb::Worker::Stub> StubOf(const Instance& inst) {
    std::lock_guard<std::mutex> lock(mu_);
    return inst.stub;
  }

  grpc::Status ClientGone() {
    return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
  }

  // `refused` is set to the instance that refused the request before starting it.
  template <typename F>
  grpc::Status RunColocated(Relay& relay, Instance& inst, F&& prefill_done, Instance** refused) {
    Call call(relay.tracked, relay.work.deadline_unix_us());
    auto stream = StubOf(inst)->Generate(&call.context, relay.work);
    pb::WorkEvent event;
    bool done = false;
    bool any = false;
    while (!done && stream->Read(&event)) {
      any = true;
      MergeEvent(relay, event);
      prefill_done();
      if (!Forward(relay, event, &done)) {
        call.context.TryCancel();
        stream->Finish().ok();
        return ClientGone();
      }
    }
    if (relay.stopped()) call.context.TryCancel();  // it would decode on past the stop sequence
    grpc::Status s = stream->Finish();
    if (done) return grpc::Status::OK;
    if (!any && RefusedBeforeStart(s)) *refused = &inst;
    return WorkerError(inst, s, relay);
  }

  template <typename F, typename G>
  grpc::Status RunDisaggregated(Relay& relay, Instance& prefill, Instance& decode,
                                const std::string& decode_kv_address, F&& prefill_done,
                                G&& decode_started, Instance** refused) {
    // The decode worker first takes the request (it answers ACCEPTED without waiting for its
    // engine step; the registration runs on its loop before any KV offer), so the KV hand-off
    // finds it.
    Call dcall(relay.tracked, relay.work.deadline_unix_us());
    auto dstream = StubOf(decode)->Decode(&dcall.context, relay.work);
    pb::WorkEvent event;
    if (!dstream->Read(&event)) {
      grpc::Status ds = dstream->Finish();
      if (RefusedBeforeStart(ds)) *refused = &decode;
      return WorkerError(decode, ds, relay);
    }
    if (event.kind() != pb::WorkEvent::ACCEPTED)
      return WorkerError(decode, dstream->Finish(), relay);
    pb::WorkRequest work = relay.work;
    work.set_decode_instance(decode.id);
    work.set_decode_kv_address(decode_kv_address);
    bool done = false;
    {
      Call pcall(relay.tracked, relay.work.deadline_unix_us());
      auto pstream = StubOf(prefill)->Prefill(&pcall.context, work);
      bool sent = false;
      bool any = false;
      while (pstream->Read(&event)) {
        any = true;
        MergeEvent(relay, event);
        if (event.kind() == pb::WorkEvent::KV_SENT) {
          sent = true;
          relay.kv_sent_us = {event.kv_transfer_start_us(), event.kv_transfer_end_us()};
          continue;
        }
        prefill_done();
        if (!Forward(relay, event, &done)) {
          pcall.context.TryCancel();
          dcall.context.TryCancel();
          pstream->Finish().ok();
          dstream->Finish().ok();
          return ClientGone();
        }
      }
      grpc::Status ps = pstream->Finish();
      if (!done && !(ps.ok() && sent)) {
        dcall.context.TryCancel();
        grpc::Status ds = dstream->Finish();
        // The decode worker answers ACCEPTED at once and registers the request on its loop
        // afterwards; should that registration have failed (it refuses a full queue or an id
        // in use before ACCEPTED), the KV offer fails too and the decode side's status is
        // the cause to report.
        if (!ds.ok() && ds.error_code() != grpc::StatusCode::CANCELLED) {
          return WorkerError(decode, ds, relay);
        }
        if (!any && RefusedBeforeStart(ps)) *refused = &prefill;
        return WorkerError(prefill, ps, relay);
      }
    }
    if (done) {  // finished with its first token: the decode side never gets it
      dcall.context.TryCancel();
      dstream->Finish().ok();
      return grpc::Status::OK;
    }
    while (!done && dstream->Read(&event)) {
      MergeEvent(relay, event);
      decode_started();
      if (!Forward(relay, event, &done)) {
        dcall.context.TryCancel();
        dstream->Finish().ok();
        return ClientGone();
      }
    }
    if (relay.stopped()) dcall.context.TryCancel();  // it would decode on past the stop sequence
    grpc::Status ds = dstream->Finish();
    if (done) return grpc::Status::OK;
    return WorkerError(decode, ds, relay);
  }

  // One health poll of a worker (HealthLoop polls them all at once).
  struct Poll {
    std::string id;
    std::shared_ptr<pb::Worker::Stub> stub;
    grpc::ClientContext ctx;
    pb::WorkerStatusRequest request;
    pb::WorkerStatus status;
    grpc::Status result;
  };

  // Polls every instance's status at once (an unreachable one costs the round its deadline,
  // not its deadline per instance); returns when every call has ended.
  std::vector<std::unique_ptr<Poll>> PollAll() {
    std::vector<std::unique_ptr<Poll>> polls;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [id, inst] : instances_) {
        polls.push_back(std::make_unique<Poll>());
        polls.back()->id = id;
        polls.back()->stub = inst->stub;
      }
    }
    std::mutex done_mu;
    std::condition_variable done_cv;
    size_t done = 0;
    for (auto& p : polls) {
      p->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
      p->stub->async()->GetStatus(&p->ctx, &p->request, &p->status,
                                  [&, poll = p.get()](grpc::Status s) {
                                    poll->result = std::move(s);
                                    std::lock_guard<std::mutex> lock(done_mu);
                                    ++done;
                                    done_cv.notify_all();
                                  });
    }
    std::unique_lock<std::mutex> lock(done_mu);
    if (!done_cv.wait_for(lock, std::chrono::seconds(2), [&] { return done == polls.size(); })) {
      for (auto& p : polls) p->ctx.TryCancel();  // every callback still comes, at once
      done_cv.wait(lock, [&] { return done == polls.size(); });
    }
    return polls;
  }

  void HealthLoop() {
    while (true) {
      for (auto& poll : PollAll()) {
        const std::string& id = poll->id;
        pb::WorkerStatus& status = poll->status;
        grpc::Status s = poll->result;
        std::lock_guard<std::mutex> lock(mu_);
        auto it = instances_.find(id);
        if (it == instances_.end() || it->second->stub != poll->stub) continue;
        Instance& inst = *it->second;
        // Another process at the address (a pod that took a departed one's IP) is no answer.
        if (s.ok() &&
            (status.id() != id || status.role() != scheduler::InstanceRoleName(inst.role))) {
          s = grpc::Status(
              grpc::StatusCode::UNAVAILABLE,
              absl::StrCat(inst.address, " is now ", status.role(), " worker '", status.id(), "'"));
          // A definite answer: unhealthy at once.
          inst.failures = std::max(inst.failures, options_.unhealthy_after_failures - 1);
        }
        // Its counters went back: a new process at the same address, with an empty cache.
        if (s.ok() && status.engine_steps() < inst.status.engine_steps()) {
          inst.prefix_index.Clear();
        }
        // It answers, but from figures its engine loop has not refreshed for too long.
        const absl::Duration stalled = absl::Microseconds(status.loop_heartbeat_age_us());
        if (s.ok() && stalled > options_.worker_stall_timeout) {
          if (inst.healthy) {
            log_->warn("{} is unhealthy: its engine loop has not moved for {}", id,
                       absl::FormatDuration(absl::Trunc(stalled, absl::Milliseconds(1))));
          }
          inst.healthy = false;
          inst.last_seen = absl::Now();
          inst.status = std::move(status);
        } else if (s.ok()) {
          if (!inst.healthy) log_->info("{} is healthy", id);
          inst.healthy = true;
          inst.failures = 0;
          inst.last_seen = absl::Now();
          // Only set here: a reply sent before a drain began must not clear what the draining
          // registration said (registrations, in order, are what clear it).
          if (status.draining()) inst.draining = true;
          inst.status = std::move(status);
        } else if (++inst.failures >= options_.unhealthy_after_failures && inst.healthy) {
          inst.healthy = false;
          log_->warn("{} is unhealthy: {}", id, s.error_message());
        }
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        ForgetGoneWorkers();
        SetReady(Ready());
      }
      std::unique_lock<std::mutex> lock(stop_mu_);
      if (stop_cv_.wait_for(lock, absl::ToChronoNanoseconds(options_.health_period),
                            [&] { return stopping_; })) {
        return;
      }
    }
  }

  // Drops workers unreachable for options_.forget_worker_after with no booking (mu_ held).
  void ForgetGoneWorkers() {
    const absl::Time now = absl::Now();
    for (auto it = instances_.begin(); it != instances_.end();) {
      const Instance& inst = *it->second;
      if (!inst.healthy && inst.bookings == 0 &&
          now - inst.last_seen > options_.forget_worker_after) {
        log_->info("{} forgotten: unreachable since {} ago", inst.id,
                   absl::FormatDuration(absl::Trunc(now - inst.last_seen, absl::Milliseconds(1))));
        it = instances_.erase(it);
      } else {
        ++it;
      }
    }
  }

  // Readiness: not draining, and a request could be placed now: a healthy colocated worker, or
  // a healthy prefill and a healthy decode worker, none draining (mu_ held).
  bool Ready() const {
    if (draining_) return false;
    bool prefill = false, decode = false;
    for (const auto& [id, inst] : instances_) {
      if (!inst->healthy || inst->draining) continue;
      if (inst->role == InstanceRole::kColocated) return true;
      (inst->role == InstanceRole::kPrefill ? prefill : decode) = true;
    }
    return prefill && decode;
  }

  // The readiness status (mu_ held, so that a drain's NOT_SERVING is never overwritten).
  void SetReady(bool ready) {
    if (auto* health = server_->GetHealthCheckService()) {
      health->SetServingStatus(kServingService, ready);
    }
  }

  // Propagates client cancellations to the worker calls of their requests.
  void MonitorLoop() {
    while (true) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        for (auto& [id, t] : in_flight_) {
          if (!t->IsCancelled() && t->server_context->IsCancelled()) t->CancelAll();
        }
      }
      std::unique_lock<std::mutex> lock(stop_mu_);
      if (stop_cv_.wait_for(lock, std::chrono::milliseconds(20), [&] { return stopping_; })) {
        return;
      }
    }
  }

  FrontendOptions options_;
  std::shared_ptr<spdlog::logger> log_;
  engine::ModelConfig config_;
  std::unique_ptr<engine::Tokenizer> tokenizer_;
  std::string model_name_;
  std::unique_ptr<scheduler::LatencyModel> latency_model_;  // before the policy using it
  std::unique_ptr<scheduler::DispatchPolicy> policy_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  FrontendMetrics metrics_;
  std::unique_ptr<MetricsServer> metrics_server_;  // --metrics-port
  std::unique_ptr<engine::ChatFormat> chat_;       // the chat template of the HTTP API
  std::unique_ptr<OpenAiHttpServer> http_server_;  // --http-port

  std::mutex mu_;                         // instances, bookkeeping, in-flight requests, counters
  std::condition_variable in_flight_cv_;  // an in-flight request ended
  std::map<std::string, std::unique_ptr<Instance>> instances_;
  std::map<std::string, std::shared_ptr<Tracked>> in_flight_;
  uint64_t next_id_ = 0;
  uint64_t next_call_ = 0;  // suffixes of the ids the workers see
  // This process among the front-ends (WorkRequest.frontend_id, in worker-call ids): the id
  // and a random nonce.
  std::string tag_;
  int64_t finished_ = 0, rejected_ = 0, cancelled_ = 0, failed_ = 0;
  int64_t refused_slo_ = 0, best_effort_ = 0, redispatched_ = 0, local_prefills_ = 0;
  bool draining_ = false;  // Drain was called: new requests are refused
  uint64_t next_queue_seq_ = 0;

  std::mutex stop_mu_;
  std::condition_variable stop_cv_;
  bool stopping_ = false;
  std::thread health_, monitor_;
  std::atomic<bool> shut_down_{false};
};

Frontend::Frontend(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Frontend::~Frontend() { Shutdown(); }

absl::StatusOr<std::unique_ptr<Frontend>> Frontend::Start(FrontendOptions options) {
  auto impl = std::make_unique<Impl>(std::move(options));
  absl::Status started = impl->Init();
  if (!started.ok()) {
    impl->Shutdown();
    return started;
  }
  return std::unique_ptr<Frontend>(new Frontend(std::move(impl)));
}

std::string Frontend::address() const { return impl_->address(); }
int Frontend::port() const { return impl_->port(); }
int Frontend::metrics_port() const { return impl_->metrics_port(); }
int Frontend::http_port() const { return impl_->http_port(); }
bool Frontend::Drain(absl::Duration timeout) { return impl_->Drain(timeout); }
void Frontend::Shutdown() {
  if (impl_) impl_->Shutdown();
}

}  // namespace pds::server
