#include "server/worker.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "engine/common/logging.h"
#include "engine/common/status_macros.h"
#include "engine/runtime/kv_handoff.h"
#include "engine/transfer/nccl_transport.h"
#include "engine/transfer/tcp_transport.h"
#if PDS_HAVE_CUDA
#include "engine/backend/cuda_backend.h"
#include "engine/transfer/cuda_ipc_transport.h"
#endif
#include "grpcpp/health_check_service_interface.h"
#include "pdserve/internal/control.grpc.pb.h"
#include "server/grpc_util.h"

namespace pds::server {

namespace pb = ::pdserve::internal;
using engine::FinishReason;
using scheduler::InstanceRole;

namespace {

// The health-service name whose status says the worker takes requests (readiness).
constexpr char kReadyService[] = "pdserve.internal.Worker";

// The events of one request, from the engine loop to its gRPC handler.
class Channel {
 public:
  void Push(pb::WorkEvent event) {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    events_.push_back(std::move(event));
    cv_.notify_all();
  }
  void Close(absl::Status status) {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    closed_ = true;
    status_ = std::move(status);
    cv_.notify_all();
  }
  // Takes the queued events, waiting up to `timeout` for one. False once the channel is
  // closed and drained; `final` then holds the closing status.
  bool Pop(std::vector<pb::WorkEvent>& out, absl::Duration timeout, absl::Status* final) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout),
                 [&] { return !events_.empty() || closed_; });
    while (!events_.empty()) {
      out.push_back(std::move(events_.front()));
      events_.pop_front();
    }
    if (closed_ && out.empty()) {
      *final = status_;
      return false;
    }
    return true;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<pb::WorkEvent> events_;
  bool closed_ = false;
  absl::Status status_;
};

// A fixed pool of threads for blocking jobs (KV sends).
class JobPool {
 public:
  explicit JobPool(int threads) {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Run(); });
  }
  ~JobPool() { Stop(); }
  void Submit(std::function<void()> job) {
    std::lock_guard<std::mutex> lock(mu_);
    jobs_.push_back(std::move(job));
    cv_.notify_one();
  }
  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      cv_.notify_all();
    }
    for (auto& t : threads_) {
      if (t.joinable()) t.join();
    }
  }

 private:
  void Run() {
    while (true) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
        if (jobs_.empty()) return;  // stopping and drained
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      job();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

void ToProto(const engine::TokenLogprobs& from, pb::TokenLogprobs& to) {
  to.set_logprob(from.logprob);
  to.set_rank(from.rank);
  for (const auto& [token, logprob] : from.top) {
    pb::TopLogprob* top = to.add_top();
    top->set_token_id(token);
    top->set_logprob(logprob);
  }
}

engine::GenerateRequest FromWork(const pb::WorkRequest& r) {
  engine::GenerateRequest g;
  g.id = r.request_id();
  g.prompt.assign(r.prompt_token_ids().begin(), r.prompt_token_ids().end());
  g.params.max_tokens = r.max_tokens();
  g.params.temperature = r.temperature();
  g.params.top_k = r.top_k();
  g.params.top_p = r.top_p();
  g.params.seed = r.seed();
  g.params.ignore_eos = r.ignore_eos();
  g.params.stop_token_ids.assign(r.stop_token_ids().begin(), r.stop_token_ids().end());
  g.params.logprobs = r.logprobs();
  g.params.prompt_logprobs = r.has_prompt_logprobs() ? r.prompt_logprobs() : -1;
  g.params.json_schema = r.json_schema();
  g.params.regex = r.regex();
  g.params.presence_penalty = r.presence_penalty();
  g.params.frequency_penalty = r.frequency_penalty();
  g.params.repetition_penalty = r.has_repetition_penalty() ? r.repetition_penalty() : 1.0f;
  g.params.logit_bias.assign(r.logit_bias().begin(), r.logit_bias().end());
  std::sort(g.params.logit_bias.begin(), g.params.logit_bias.end());  // (a map's order varies)
  g.params.allowed_token_ids.assign(r.allowed_token_ids().begin(), r.allowed_token_ids().end());
  g.params.min_tokens = r.min_tokens();
  g.params.min_p = r.min_p();
  if (r.has_reasoning_end()) {
    g.params.reasoning_open = r.has_reasoning_open() ? r.reasoning_open() : -1;
    g.params.reasoning_end = r.reasoning_end();
    g.params.reasoning_inside = r.reasoning_inside();
  }
  if (r.ttft_deadline_unix_us() > 0) g.ttft_deadline_s = r.ttft_deadline_unix_us() * 1e-6;
  if (r.tpot_slo_ms() > 0) g.tpot_target_s = r.tpot_slo_ms() * 1e-3;
  g.best_effort = r.best_effort();
  return g;
}

}  // namespace

class Worker::Impl : public pb::Worker::Service, public engine::KvSink {
 public:
  Impl(engine::Transformer& model, WorkerOptions options)
      : model_(model), options_(std::move(options)), log_(pds::Logger("worker")) {}

  absl::Status Init() {
    if (!options_.frontend.empty()) {
      PDS_ASSIGN_OR_RETURN(frontends_, ParseFrontendList(options_.frontend));
    }
    if (options_.advertise_host.empty()) {
      if (IsWildcardHost(options_.host) && !options_.frontend.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "listening on '", options_.host,
            "' (every address) needs an advertise host: the address the front-end and the "
            "other workers reach this worker at"));
      }
      options_.advertise_host = options_.host;
    }
    PDS_ASSIGN_OR_RETURN(engine_, engine::LlmEngine::Create(model_, options_.engine));
    engine_->set_token_vocabulary(options_.token_vocabulary);
    // Drafts never make a step slower than the TPOT target lets one be.
    if (options_.tpot_slo_ms > 0) engine_->set_draft_step_cap(options_.tpot_slo_ms / 1e3);
    if (options_.role == InstanceRole::kPrefill && options_.kv_handoff == "layered") {
      engine_->set_handoff_hook([this](std::vector<std::shared_ptr<engine::KvHandoff>> handoffs) {
        HandOff(std::move(handoffs));
      });
    } else if (options_.kv_handoff != "layered" && options_.kv_handoff != "after") {
      return absl::InvalidArgumentError(
          absl::StrCat("kv_handoff '", options_.kv_handoff, "': expected layered or after"));
    }
    // Figures (and a heartbeat) from the start: a worker whose very first step hangs must not
    // look like one that has not reported yet.
    UpdateStatus();
    loop_ = std::thread([this] { Loop(); });
    PDS_ASSIGN_OR_RETURN(server_,
                         StartGrpcServer(options_.host, options_.port, {this}, &bound_port_));
    if (options_.id.empty()) {
      options_.id = absl::StrCat(scheduler::InstanceRoleName(options_.role), "-", bound_port_);
    }
    PDS_RETURN_IF_ERROR(StartKvTransport());
    grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
    if (health != nullptr) health->SetServingStatus(kReadyService, false);
    if (!frontends_.empty()) StartResolver();
    registration_ = std::thread([this] { HeartbeatLoop(); });
    log_->info("{} ({}) serving on {}{}", options_.id,
               std::string(scheduler::InstanceRoleName(options_.role)), address(),
               receiver_ ? absl::StrCat(", ", kv_transport_, " KV receiver on ", kv_address())
               : sender_ ? absl::StrCat(", ", kv_transport_, " KV sender")
                         : "");
    return absl::OkStatus();
  }

  // The KV receiver (decode) or sender (prefill) of options_.kv_transport.
  absl::Status StartKvTransport() {
    const bool decode = options_.role == InstanceRole::kDecode;
    const bool prefill = options_.role == InstanceRole::kPrefill;
    if (!decode && !prefill) return absl::OkStatus();
    const int device = CudaDevice();
    std::string transport = options_.kv_transport;
    if (transport.empty()) transport = device >= 0 ? "cuda-ipc" : "tcp";
    if (prefill) transfers_ = std::make_unique<JobPool>(options_.transfer_threads);
    if (transport == "tcp") {
      if (decode) {
        PDS_ASSIGN_OR_RETURN(receiver_,
                             engine::StartTcpKvReceiver(options_.host, options_.kv_port, this));
      } else {
        sender_ = engine::CreateTcpKvSender();
      }
      kv_transport_ = transport;
      return absl::OkStatus();
    }
    if (transport != "cuda-ipc" && transport != "nccl") {
      return absl::InvalidArgumentError(absl::StrCat(options_.id, ": unknown KV transport '",
                                                     transport, "' (tcp, cuda-ipc or nccl)"));
    }
    if (device < 0) {
      return absl::FailedPreconditionError(
          absl::StrCat(options_.id, ": the ", transport, " KV transport needs the cuda backend"));
    }
    const engine::KvCache& cache = engine_->cache();
    engine::KvPoolLayout pool;
    pool.data = cache.data();
    pool.bytes = cache.bytes();
    pool.pool_bytes = cache.pool_bytes();
    pool.block_bytes = cache.shape().BlockBytes(model_.backend().compute_dtype());
    pool.num_layers = cache.shape().num_layers;
    pool.num_blocks = cache.shape().num_blocks;
    pool.device = device;
    if (transport == "cuda-ipc") {
#if PDS_HAVE_CUDA
      if (decode) {
        PDS_ASSIGN_OR_RETURN(
            receiver_, engine::StartCudaIpcKvReceiver(options_.host, options_.kv_port, this, pool));
      } else {
        PDS_ASSIGN_OR_RETURN(sender_, engine::CreateCudaIpcKvSender(pool));
      }
#endif
    } else {
#if PDS_HAVE_NCCL
      PDS_ASSIGN_OR_RETURN(std::shared_ptr<engine::CommDevice> comm,
                           engine::CreateNcclCommDevice(device));
      if (decode) {
        PDS_ASSIGN_OR_RETURN(receiver_, engine::StartNcclKvReceiver(options_.host, options_.kv_port,
                                                                    this, comm, pool));
      } else {
        sender_ = engine::CreateNcclKvSender(comm, pool);
      }
#else
      return absl::UnimplementedError(
          absl::StrCat(options_.id, ": this build has no NCCL (the nccl KV transport)"));
#endif
    }
    kv_transport_ = transport;
    return absl::OkStatus();
  }

  // The CUDA device of the model's backend, or -1 when it is not the CUDA backend.
  int CudaDevice() const {
#if PDS_HAVE_CUDA
    if (auto* cuda = dynamic_cast<const engine::CudaBackend*>(&model_.backend())) {
      return cuda->device();
    }
#endif
    return -1;
  }

  const std::string& id() const { return options_.id; }
  std::string address() const { return JoinHostPort(options_.advertise_host, bound_port_); }
  // The receiver's port at the advertised host.
  std::string kv_address() const {
    if (!receiver_) return "";
    const std::string listening = receiver_->address();
    int port = 0;
    if (!absl::SimpleAtoi(listening.substr(listening.rfind(':') + 1), &port)) return listening;
    return JoinHostPort(options_.advertise_host, port);
  }

  bool Drain(absl::Duration timeout) {
    bool first;
    {
      std::lock_guard<std::mutex> lock(admitted_mu_);
      first = !draining_.exchange(true);
      if (first) log_->info("{} draining: {} requests to finish", options_.id, admitted_.size());
    }
    if (first) {
      std::lock_guard<std::mutex> lock(reg_mu_);
      reg_wake_ = true;  // tell the front-end now, not at the next heartbeat
      reg_cv_.notify_all();
    }
    std::unique_lock<std::mutex> lock(admitted_mu_);
    return admitted_cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout),
                                 [&] { return admitted_.empty(); });
  }

  void Shutdown() {
    if (shut_down_.exchange(true)) return;
    {
      std::lock_guard<std::mutex> lock(reg_mu_);
      stopping_ = true;
      reg_cv_.notify_all();
    }
    if (registration_.joinable()) registration_.join();
    if (resolved_ != nullptr) {
      std::lock_guard<std::mutex> lock(resolved_->mu);
      resolved_->stop = true;
      resolved_->cv.notify_all();
    }
    // Fail every request; transfers see their cancel flags.
    if (loop_.joinable()) {
      RunOnLoop([this] {
        for (auto& [id, live] : live_) {
          live.cancelled->store(true);
          live.channel->Close(
              absl::UnavailableError(absl::StrCat(options_.id, " is shutting down")));
        }
        return absl::OkStatus();
      }).IgnoreError();
    }
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    if (receiver_) receiver_->Shutdown();
    if (transfers_) transfers_->Stop();
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_loop_ = true;
      cv_.notify_all();
    }
    if (loop_.joinable()) loop_.join();
  }

  // --- gRPC handlers ---

  grpc::Status Prefill(grpc::ServerContext* ctx, const pb::WorkRequest* request,
                       grpc::ServerWriter<pb::WorkEvent>* writer) override {
    if (options_.role != InstanceRole::kPrefill) return WrongRole("Prefill");
    if (request->decode_kv_address().empty()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "decode_kv_address is empty");
    }
    return Serve(ctx, *request, writer, Live::kPrefill);
  }

  grpc::Status Decode(grpc::ServerContext* ctx, const pb::WorkRequest* request,
                      grpc::ServerWriter<pb::WorkEvent>* writer) override {
    if (options_.role != InstanceRole::kDecode) return WrongRole("Decode");
    return Serve(ctx, *request, writer, Live::kDecode);
  }

  grpc::Status Generate(grpc::ServerContext* ctx, const pb::WorkRequest* request,
                        grpc::ServerWriter<pb::WorkEvent>* writer) override {
    // Decode workers also run whole the requests the front-end prefills there (conditional
    // disaggregation: all but a few of their prompt tokens are in its prefix cache).
    if (options_.role == InstanceRole::kPrefill) return WrongRole("Generate");
    return Serve(ctx, *request, writer, Live::kColocated);
  }

  grpc::Status GetStatus(grpc::ServerContext*, const pb::WorkerStatusRequest*,
                         pb::WorkerStatus* status) override {
    std::lock_guard<std::mutex> lock(status_mu_);
    *status = status_;
    status->set_loop_heartbeat_age_us(std::chrono::duration_cast<std::chrono::microseconds>(
                                          std::chrono::steady_clock::now() - loop_heartbeat_)
                                          .count());
    status->set_id(options_.id);
    status->set_role(std::string(scheduler::InstanceRoleName(options_.role)));
    status->set_kv_bytes_received(receiver_ ? receiver_->bytes_received() : 0);
    status->set_draining(draining_);
    return grpc::Status::OK;
  }

  // --- KvSink (decode role; transport threads) ---

  absl::StatusOr<int32_t> Reserve(const engine::KvTransferHeader& header) override {
    int32_t held = 0;  // written on the loop; the call returns only after the task ran or never
    absl::Status reserved = RunOnLoop([&]() -> absl::Status {
      auto it = live_.find(header.request_id);
      if (it == live_.end() || it->second.load_cancelled()) {
        return absl::NotFoundError(
            absl::StrCat(options_.id, " has no request '", header.request_id, "' awaiting KV"));
      }
      Live& live = it->second;
      if (live.in_engine) {
        return absl::AlreadyExistsError(
            absl::StrCat("request '", header.request_id, "' already has its KV"));
      }
      const engine::KvCacheShape& shape = engine_->cache().shape();
      if (header.num_layers != shape.num_layers || header.kv_heads != shape.kv_heads ||
          header.head_dim != shape.head_dim || header.block_size != shape.block_size ||
          header.dtype != model_.backend().compute_dtype()) {
        absl::Status bad = absl::FailedPreconditionError(absl::StrCat(
            "KV layout mismatch for '", header.request_id, "': sender has ", header.num_layers,
            " layers x ", header.kv_heads, " heads x ", header.head_dim, " dims, blocks of ",
            header.block_size, "; ", options_.id, " has ", shape.num_layers, " x ", shape.kv_heads,
            " x ", shape.head_dim, ", blocks of ", shape.block_size));
        Finish(header.request_id, bad);
        return bad;
      }
      auto reserved = engine_->ReserveImport(live.request, header.num_tokens);
      if (!reserved.ok()) {
        if (absl::IsResourceExhausted(reserved.status())) {
          ++handoffs_deferred_;
        } else {
          Finish(header.request_id, reserved.status());
        }
        return reserved.status();
      }
      // This worker's prefix cache may hold the first blocks already: only the rest move.
      const int32_t needed = reserved->held_blocks + static_cast<int32_t>(reserved->blocks.size());
      if (needed != header.num_blocks) {
        engine_->Cancel(header.request_id).IgnoreError();
        absl::Status bad = absl::FailedPreconditionError(
            absl::StrCat("'", header.request_id, "': sender has ", header.num_blocks,
                         " blocks for ", header.num_tokens, " tokens, receiver needs ", needed));
        Finish(header.request_id, bad);
        return bad;
      }
      live.in_engine = true;
      live.transfer_active = true;
      live.kv_start_us = NowUs();
      std::lock_guard<std::mutex> lock(import_mu_);
      imports_[header.request_id] = std::move(reserved->blocks);
      held = reserved->held_blocks;
      return absl::OkStatus();
    });
    if (!reserved.ok()) return reserved;
    return held;
  }

  absl::StatusOr<std::vector<int32_t>> ReservedBlocks(const std::string& request_id) override {
    std::lock_guard<std::mutex> lock(import_mu_);
    auto it = imports_.find(request_id);
    if (it == imports_.end()) {
      return absl::NotFoundError(
          absl::StrCat(options_.id, " has no reservation for '", request_id, "'"));
    }
    return it->second;
  }

  absl::Status WriteLayer(const std::string& request_id, int32_t layer, const uint8_t* data,
                          size_t bytes) override {
    std::vector<int32_t> blocks;
    {
      std::lock_guard<std::mutex> lock(import_mu_);
      auto it = imports_.find(request_id);
      if (it == imports_.end()) {
        return absl::NotFoundError(absl::StrCat("no reservation for '", request_id, "'"));
      }
      blocks = it->second;
    }
    const engine::KvCache& cache = engine_->cache();
    const size_t block_bytes = cache.shape().BlockBytes(model_.backend().compute_dtype());
    if (layer < 0 || layer >= cache.shape().num_layers ||
        bytes != 2 * blocks.size() * block_bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer ", layer, " of ", bytes, " bytes does not match the reservation"));
    }
    for (int kv = 0; kv < 2; ++kv) {
      auto* pool = static_cast<uint8_t*>(kv == 0 ? cache.k(layer) : cache.v(layer));
      for (int32_t block : blocks) {
        PDS_RETURN_IF_ERROR(
            model_.backend().CopyFromHost(pool + block * block_bytes, data, block_bytes));
        data += block_bytes;
      }
    }
    return absl::OkStatus();
  }

  void Complete(const std::string& request_id, absl::Status status, int32_t next_token) override {
    {
      std::lock_guard<std::mutex> lock(import_mu_);
      imports_.erase(request_id);
    }
    Post([this, request_id, status, next_token] {
      auto it = live_.find(request_id);
      if (it == live_.end()) {
        engine_->Cancel(request_id).IgnoreError();
        return;
      }
      Live& live = it->second;
      live.transfer_active = false;
      if (live.load_cancelled()) {
        Finish(request_id, absl::CancelledError("cancelled"));
        return;
      }
      if (!status.ok()) {
        Finish(request_id, absl::UnavailableError(absl::StrCat("KV transfer into ", options_.id,
                                                               " failed: ", status.message())));
        return;
      }
      live.kv_end_us = NowUs();
      absl::Status activated = engine_->ActivateImport(request_id, next_token);
      if (!activated.ok()) Finish(request_id, activated);
    });
  }

 private:
  struct Live {
    enum Kind { kPrefill, kDecode, kColocated };
    Kind kind = kColocated;
    std::shared_ptr<Channel> channel;
    std::shared_ptr<std::atomic<bool>> cancelled = std::make_shared<std::atomic<bool>>(false);
    // Prefill: its first token is in the channel (a finished transfer may then end the stream
    // from its own thread).
    std::shared_ptr<std::atomic<bool>> token_out = std::make_shared<std::atomic<bool>>(false);
    engine::GenerateRequest request;  // decode: until the import is reserved
    bool in_engine = false;
    bool transfer_active = false;  // a KV transfer uses this request's blocks
    bool produced = false;         // a token event went out
    bool finished = false;         // prefill: ended with its first token while its KV was leaving
    int64_t queued_us = 0, prefill_start_us = 0, prefill_end_us = 0, kv_start_us = 0, kv_end_us = 0,
            decode_start_us = 0;
    std::string kv_address;
    std::string frontend;  // WorkRequest.frontend_id
    int64_t deadline_us = 0;
    bool load_cancelled() const { return cancelled->load(); }
  };

  grpc::Status WrongRole(const char* rpc) {
    return grpc::Status(
        grpc::StatusCode::FAILED_PRECONDITION,
        absl::StrCat(options_.id, " is a ", scheduler::InstanceRoleName(options_.role),
                     " worker; it does not serve ", rpc));
  }

  // Accepts the request on the loop, then streams its events until it ends, the client goes
  // away or its deadline passes.
  grpc::Status Serve(grpc::ServerContext* ctx, const pb::WorkRequest& request,
                     grpc::ServerWriter<pb::WorkEvent>* writer, Live::Kind kind) {
    if (request.request_id().empty()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "request_id is empty");
    }
    const std::string id = request.request_id();
    if (kind == Live::kDecode) {
      // Its KV must fit this worker's cache (the prefill worker's may be larger): refused now,
      // not after the prefill, when its offers would wait for room that never comes.
      if (absl::Status fits = engine_->CheckFitsCache(request.prompt_token_ids_size());
          !fits.ok()) {
        return ToGrpc(fits);
      }
    }
    auto channel = std::make_shared<Channel>();
    // Queued from the moment the worker has the request, not from when its loop takes it
    // (after the step in flight): the wait for that step is part of the queueing delay.
    const int64_t received_us = NowUs();
    // Admission (a free slot, an unused id) is decided here, on the caller's thread, so that a
    // decode registration, which runs on the loop after ACCEPTED went out, cannot be refused.
    {
      std::lock_guard<std::mutex> lock(admitted_mu_);
      if (draining_) {
        return ToGrpc(absl::UnavailableError("draining (shutting down): no new requests"));
      }
      if (admitted_.count(id)) {
        return ToGrpc(absl::AlreadyExistsError(
            absl::StrCat("request id '", id, "' is in use on ", options_.id)));
      }
      if (static_cast<int>(admitted_.size()) >= options_.max_queued + options_.engine.max_running) {
        return ToGrpc(absl::ResourceExhaustedError(
            absl::StrCat(options_.id, " has ", admitted_.size(), " requests; its queue is full")));
      }
      admitted_.insert(id);
    }
    auto accept = [this, id, channel, kind, received_us,
                   request = std::make_shared<const pb::WorkRequest>(request)]() -> absl::Status {
      Live live;
      live.kind = kind;
      live.channel = channel;
      live.request = FromWork(*request);
      live.kv_address = request->decode_kv_address();
      live.frontend = request->frontend_id();
      live.deadline_us = request->deadline_unix_us();
      live.queued_us = received_us;
      if (kind != Live::kDecode) {
        engine::GenerateRequest g = live.request;
        g.hold_kv_after_prefill = kind == Live::kPrefill;
        if (absl::Status added = engine_->AddRequest(std::move(g)); !added.ok()) {
          Unadmit(id);
          return added;
        }
        live.in_engine = true;
      }
      live_.emplace(id, std::move(live));
      cv_.notify_all();
      return absl::OkStatus();
    };
    if (kind == Live::kDecode) {
      // A decode registration only has to precede the KV offer for it, which the loop runs
      // after this task (tasks run in order): accept at once instead of waiting for the step
      // in flight, which would put up to one decode step on every request's TTFT (the
      // front-end starts the prefill when it has ACCEPTED). ACCEPTED goes into the channel
      // first but leaves on the wire only from the loop below on this thread, after the task
      // is posted. The registration cannot be refused (admission was decided above); should
      // it fail anyway, the stream ends with its status.
      pb::WorkEvent event;
      event.set_kind(pb::WorkEvent::ACCEPTED);
      channel->Push(std::move(event));
      Post([accept, channel] {
        absl::Status registered = accept();
        if (!registered.ok()) channel->Close(registered);
      });
    } else {
      bool ran = true;
      absl::Status accepted = RunOnLoop(accept, &ran);
      if (!ran) Unadmit(id);  // (a refused accept unadmits itself)
      if (!accepted.ok()) return ToGrpc(accepted);
    }

    const int64_t deadline_us = request.deadline_unix_us();
    while (true) {
      std::vector<pb::WorkEvent> events;
      absl::Status final;
      const bool open = channel->Pop(events, absl::Milliseconds(20), &final);
      for (pb::WorkEvent& event : events) {
        if (!writer->Write(event)) {
          CancelRequest(id, channel);
          return grpc::Status(grpc::StatusCode::CANCELLED, "the caller went away");
        }
      }
      if (!open) return ToGrpc(final);
      if (ctx->IsCancelled()) {
        CancelRequest(id, channel);
        return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the caller");
      }
      if (deadline_us > 0 && NowUs() > deadline_us) {
        CancelRequest(id, channel);
        return grpc::Status(
            grpc::StatusCode::DEADLINE_EXCEEDED,
            absl::StrCat("request '", id, "' passed its deadline on ", options_.id));
      }
    }
  }

  // Cancels the request `channel` serves (not another call's under the same id, e.g. one
  // whose registration this call's duplicate lost).
  void CancelRequest(const std::string& id, const std::shared_ptr<Channel>& channel) {
    Post([this, id, channel] {
      auto it = live_.find(id);
      if (it == live_.end() || it->second.channel != channel) return;
      Abort(id, absl::CancelledError("cancelled"));
    });
  }

  // Ends a request with `status` (loop thread) and tells its transfer, if one is running, to
  // stop: the stream ends now, but blocks a transfer is reading or writing stay with the
  // request until that transfer has ended (TransferDone, Complete), never reused under it.
  void Abort(const std::string& id, absl::Status status) {
    auto it = live_.find(id);
    if (it == live_.end()) return;
    it->second.cancelled->store(true);
    if (!it->second.transfer_active) {
      Finish(id, std::move(status));
      return;
    }
    it->second.channel->Close(std::move(status));
  }

  // Ends a request (loop thread): frees its engine state, closes its channel.
  void Finish(const std::string& id, absl::Status status) {
    auto it = live_.find(id);
    if (it == live_.end()) return;
    if (it->second.in_engine) engine_->Cancel(id).IgnoreError();
    it->second.channel->Close(std::move(status));
    live_.erase(it);
    Unadmit(id);
  }

  void Unadmit(const std::string& id) {
    std::lock_guard<std::mutex> lock(admitted_mu_);
    admitted_.erase(id);
    if (admitted_.empty()) admitted_cv_.notify_all();
  }

  // --- the engine loop ---

  void Post(std::function<void()> task) {
    std::lock_guard<std::mutex> lock(mu_);
    tasks_.push_back(std::move(task));
    cv_.notify_all();
  }

  // Runs `fn` on the loop and waits (bounded by options_.loop_wait) for its status. A task not
  // started by then never runs (`fn` may refer to the caller's stack): RESOURCE_EXHAUSTED (an
  // overloaded worker, not the caller's deadline), and *ran (if given) false. One that has
  // started is waited for (it is running on the loop).
  absl::Status RunOnLoop(std::function<absl::Status()> fn, bool* ran = nullptr) {
    struct Shared {
      std::mutex mu;
      bool started = false, abandoned = false;
      std::promise<absl::Status> promise;
    };
    auto shared = std::make_shared<Shared>();
    std::future<absl::Status> future = shared->promise.get_future();
    if (ran != nullptr) *ran = false;
    {
      // The loop runs every task posted before it was told to stop.
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_loop_) return absl::UnavailableError(absl::StrCat(options_.id, " is stopping"));
      tasks_.push_back([fn = std::move(fn), shared] {
        {
          std::lock_guard<std::mutex> lock(shared->mu);
          if (shared->abandoned) return;
          shared->started = true;
        }
        shared->promise.set_value(fn());
      });
      cv_.notify_all();
    }
    if (ran != nullptr) *ran = true;
    if (future.wait_for(absl::ToChronoNanoseconds(options_.loop_wait)) !=
        std::future_status::ready) {
      std::lock_guard<std::mutex> lock(shared->mu);
      if (!shared->started) {
        shared->abandoned = true;
        if (ran != nullptr) *ran = false;
        return absl::ResourceExhaustedError(absl::StrCat(options_.id, ": engine loop busy for ",
                                                         absl::FormatDuration(options_.loop_wait),
                                                         "; try again"));
      }
    }
    return future.get();
  }

  void Loop() {
    bool stalled = false;  // the last step found runnable work but could not schedule any
    while (true) {
      std::deque<std::function<void()>> tasks;
      {
        std::unique_lock<std::mutex> lock(mu_);
        if (tasks_.empty() && (stalled || !engine_->HasRunnable()) && !stop_loop_) {
          // Idle, or waiting for blocks that only a task (a transfer's end, a cancel) frees:
          // sleep until a task arrives instead of spinning.
          cv_.wait_for(lock, std::chrono::milliseconds(stalled ? 5 : 50));
        }
        tasks.swap(tasks_);
        if (stop_loop_ && tasks.empty()) break;
      }
      for (auto& task : tasks) task();
      CapBatchForTpot();
      stalled = engine_->HasRunnable() && !StepOnce();
      UpdateStatus();
    }
    // Whatever is left (tasks posted after the stop) is dropped with its requests.
    for (auto& [id, live] : live_) live.channel->Close(absl::UnavailableError("worker stopped"));
    live_.clear();
    std::lock_guard<std::mutex> lock(admitted_mu_);
    admitted_.clear();
  }

  void CapBatchForTpot() {
    if (!options_.latency_model || options_.tpot_slo_ms <= 0 ||
        options_.role == InstanceRole::kPrefill) {
      return;
    }
    const int64_t running = static_cast<int64_t>(engine_->num_running());
    const int64_t mean_context = running > 0 ? engine_->running_context_tokens() / running : 256;
    engine_->set_max_running(scheduler::MaxBatchForTpot(
        *options_.latency_model, mean_context, options_.tpot_slo_ms, options_.engine.max_running));
  }

  // Runs one engine step and delivers its outputs; false when it scheduled nothing.
  bool StepOnce() {
    const int64_t t0 = NowUs();
    auto step = engine_->Step();
    const int64_t t1 = NowUs();
    if (!engine_->last_batch().empty()) {
      ++steps_;
      busy_us_ += t1 - t0;
      for (const auto& [id, tokens] : engine_->last_batch()) step_tokens_ += tokens;
    }
    if (!step.ok()) {
      log_->error("{}: engine step failed: {}", options_.id, step.status().ToString());
      std::vector<std::string> ids;
      for (const auto& [id, live] : live_) ids.push_back(id);
      for (const std::string& id : ids) {
        Abort(id, absl::InternalError(absl::StrCat(options_.id, ": ", step.status().message())));
      }
      return true;
    }
    for (const auto& [id, tokens] : engine_->last_batch()) {
      auto it = live_.find(id);
      if (it == live_.end()) continue;
      Live& live = it->second;
      if (live.kind == Live::kDecode) {
        if (live.decode_start_us == 0) live.decode_start_us = t0;
      } else if (live.prefill_start_us == 0) {
        live.prefill_start_us = t0;
      }
    }
    for (engine::TokenOutput& out : *step) {
      auto it = live_.find(out.request_id);
      if (it == live_.end()) continue;
      Live& live = it->second;
      pb::WorkEvent event;
      event.set_kind(pb::WorkEvent::TOKENS);
      event.add_token_ids(out.token);
      if (out.logprobs) ToProto(*out.logprobs, *event.add_logprobs());
      for (const engine::TokenLogprobs& lp : out.prompt_logprobs) {
        ToProto(lp, *event.add_prompt_logprobs());
      }
      if (!live.produced) {
        live.produced = true;
        if (live.kind == Live::kDecode) {
          event.set_kv_transfer_start_us(live.kv_start_us);
          event.set_kv_transfer_end_us(live.kv_end_us);
          event.set_decode_start_us(live.decode_start_us);
        } else {
          // The step's forward end: its first token may already be at the decode worker,
          // which stamps the transfer's end, by the time Step returns.
          const absl::Time forward_end = engine_->last_forward_end();
          live.prefill_end_us = forward_end == absl::InfinitePast()
                                    ? t1
                                    : std::min(t1, absl::ToUnixMicros(forward_end));
          event.set_cached_prompt_tokens(out.cached_prompt_tokens);
          event.set_queued_us(live.queued_us);
          event.set_prefill_start_us(live.prefill_start_us);
          event.set_prefill_end_us(live.prefill_end_us);
          if (live.kind == Live::kColocated) event.set_decode_start_us(t1);
        }
      }
      if (out.finish != FinishReason::kNone) {
        event.set_finish_reason(std::string(engine::FinishReasonName(out.finish)));
        live.channel->Push(std::move(event));
        ++served_;
        if (live.transfer_active) {
          // Its KV was leaving during the step (the transfer now breaks off: no token to
          // decode from); the engine keeps the blocks until that transfer has ended.
          live.finished = true;
          continue;
        }
        live.in_engine = false;  // the engine freed it
        Finish(out.request_id, absl::OkStatus());
        continue;
      }
      live.channel->Push(std::move(event));
      if (live.kind == Live::kPrefill) live.token_out->store(true);
      // Layer-by-layer hand-offs started before the step (HandOff).
      if (out.kv_held && !live.transfer_active) StartTransfer(out.request_id, live, out.token);
    }
    return !engine_->last_batch().empty();
  }

  // The engine's hand-off hook (loop thread, inside a step, before its forward): sends each
  // sequence's KV layer by layer as the step computes it, with the token at the end.
  void HandOff(std::vector<std::shared_ptr<engine::KvHandoff>> handoffs) {
    for (std::shared_ptr<engine::KvHandoff>& handoff : handoffs) {
      auto it = live_.find(handoff->request_id());
      if (it == live_.end()) continue;  // cannot happen: the engine runs live requests only
      Live& live = it->second;
      const absl::Time deadline = TransferDeadline(live);
      auto source = std::make_shared<engine::CacheKvSource>(
          model_.backend(), engine_->cache(), handoff, deadline,
          [cancelled = live.cancelled] { return cancelled->load(); });
      SubmitTransfer(
          handoff->request_id(), live,
          Header(handoff->request_id(), handoff->num_tokens(),
                 static_cast<int32_t>(handoff->blocks().size()), engine::kNextTokenAtEnd),
          std::move(source), deadline);
    }
  }

  engine::KvTransferHeader Header(const std::string& id, int32_t num_tokens, int32_t num_blocks,
                                  int32_t next_token) const {
    return engine::KvHeaderFor(engine_->cache(), model_.backend().compute_dtype(), id, num_tokens,
                               num_blocks, next_token);
  }

  absl::Time TransferDeadline(const Live& live) const {
    absl::Time deadline = absl::Now() + options_.kv_transfer_timeout;
    if (live.deadline_us > 0) deadline = std::min(deadline, absl::FromUnixMicros(live.deadline_us));
    return deadline;
  }

  // After the step: sends a held sequence's KV with its first token.
  void StartTransfer(const std::string& id, Live& live, int32_t next_token) {
    auto held = engine_->GetHeld(id);
    if (!held.ok()) {
      Finish(id, held.status());
      return;
    }
    const engine::KvTransferHeader header =
        Header(id, held->num_tokens, static_cast<int32_t>(held->blocks.size()), next_token);
    SubmitTransfer(
        id, live, header,
        std::make_shared<engine::CacheKvSource>(model_.backend(), engine_->cache(), held->blocks),
        TransferDeadline(live));
  }

  void SubmitTransfer(const std::string& id, Live& live, const engine::KvTransferHeader& header,
                      std::shared_ptr<engine::KvSource> source, absl::Time deadline) {
    live.transfer_active = true;
    live.kv_start_us = NowUs();
    transfers_->Submit([this, id, header, source, deadline, address = live.kv_address,
                        cancelled = live.cancelled, token_out = live.token_out,
                        channel = live.channel] {
      auto sent = sender_->Send(address, header, *source, deadline,
                                [cancelled] { return cancelled->load(); });
      if (sent.ok() && token_out->load() && !cancelled->load()) {
        // The stream ends now, not when the loop gets to TransferDone after the step it may
        // be running: the front-end reads the decode worker's tokens only after this stream
        // has ended. The loop frees the blocks then (TransferDone's own KV_SENT and close are
        // no-ops on the closed channel).
        channel->Push(KvSentEvent(*sent));
        channel->Close(absl::OkStatus());
      }
      Post([this, id, sent] { TransferDone(id, sent); });
    });
  }

  static pb::WorkEvent KvSentEvent(const engine::KvSendStats& sent) {
    pb::WorkEvent event;
    event.set_kind(pb::WorkEvent::KV_SENT);
    event.set_kv_transfer_start_us(absl::ToUnixMicros(sent.offered));
    event.set_kv_transfer_end_us(absl::ToUnixMicros(sent.finished));
    return event;
  }

  void TransferDone(const std::string& id, const absl::StatusOr<engine::KvSendStats>& sent) {
    auto it = live_.find(id);
    if (it == live_.end()) {
      engine_->Cancel(id).IgnoreError();
      return;
    }
    Live& live = it->second;
    live.transfer_active = false;
    if (live.finished) {  // ended with its first token: its stream has everything
      Finish(id, absl::OkStatus());
      return;
    }
    if (live.load_cancelled()) {
      Finish(id, absl::CancelledError("cancelled"));
      return;
    }
    if (!sent.ok()) {
      Finish(id, absl::Status(sent.status().code(),
                              absl::StrCat("KV transfer from ", options_.id, " to ",
                                           live.kv_address, ": ", sent.status().message())));
      return;
    }
    kv_bytes_sent_ += static_cast<int64_t>(sent->bytes);
    kv_bytes_held_ += static_cast<int64_t>(sent->held_bytes);
    live.channel->Push(KvSentEvent(*sent));
    ++served_;
    Finish(id, absl::OkStatus());
  }

  void UpdateStatus() {
    pb::WorkerStatus s;
    s.set_queued_requests(static_cast<int32_t>(engine_->num_waiting()));
    s.set_queued_prompt_tokens(engine_->num_waiting_tokens());
    std::map<std::string, pb::FrontendQueue> by_frontend;
    engine_->ForEachPrefilling([&](const std::string& id, int64_t tokens) {
      auto it = live_.find(id);
      if (it == live_.end()) return;
      pb::FrontendQueue& q = by_frontend[it->second.frontend];
      q.set_requests(q.requests() + 1);
      q.set_prompt_tokens(q.prompt_tokens() + tokens);
    });
    for (const auto& [id, live] : live_) {
      if (live.kind != Live::kDecode || live.in_engine) continue;
      pb::FrontendQueue& q = by_frontend[live.frontend];
      q.set_kv_blocks_promised(
          q.kv_blocks_promised() +
          engine::BlockTable::BlocksFor(static_cast<int32_t>(live.request.prompt.size()) + 1,
                                        engine_->cache().shape().block_size));
    }
    for (auto& [frontend, q] : by_frontend) {
      q.set_frontend_id(frontend);
      *s.add_queued_by_frontend() = std::move(q);
    }
    s.set_running_requests(static_cast<int32_t>(engine_->num_running()));
    s.set_held_requests(static_cast<int32_t>(engine_->num_held()));
    const engine::BlockAllocator& alloc = engine_->cache().allocator();
    s.set_kv_blocks_total(alloc.num_blocks());
    s.set_kv_blocks_used(alloc.num_used());
    s.set_kv_blocks_free(alloc.num_free());
    s.set_block_size(engine_->cache().block_size());
    s.set_requests_served(served_);
    s.set_kv_bytes_sent(kv_bytes_sent_);
    s.set_kv_bytes_held(kv_bytes_held_);
    s.set_kv_handoffs_deferred(handoffs_deferred_);
    s.set_max_batch_tokens(options_.engine.max_batch_tokens);
    s.set_max_batch_size(engine_->max_running());
    s.set_engine_steps(steps_);
    s.set_engine_busy_s(busy_us_ * 1e-6);
    s.set_engine_step_tokens(step_tokens_);
    s.set_prefix_cache_query_tokens(engine_->num_prefix_query_tokens());
    s.set_prefix_cache_hit_tokens(engine_->num_prefix_hit_tokens());
    s.set_kv_blocks_cached(alloc.num_cached());
    s.set_prefix_caching(alloc.prefix_cache_enabled());
    s.set_spec_draft_tokens(engine_->num_draft_tokens());
    s.set_spec_accepted_tokens(engine_->num_accepted_draft_tokens());
    s.set_spec_proposed_tokens(engine_->num_proposed_draft_tokens());
    std::lock_guard<std::mutex> lock(status_mu_);
    status_ = std::move(s);
    loop_heartbeat_ = std::chrono::steady_clock::now();
  }

  // One front-end this worker registers with (HeartbeatLoop only).
  struct Registration {
    std::unique_ptr<pb::Registry::Stub> stub;
    bool registered = false;  // the last registration succeeded
  };

  // The addresses options_.frontend's entries stand for, kept current by a resolver thread of
  // its own (a lookup may block for the resolver's timeouts: it is detached, and holds only
  // this, so stopping never waits for it).
  struct Resolved {
    std::mutex mu;
    std::condition_variable cv;
    bool stop = false;
    std::map<std::string, std::vector<std::string>> addresses;  // by entry
  };

  void StartResolver() {
    resolved_ = std::make_shared<Resolved>();
    std::vector<std::string> names;
    for (const std::string& entry : frontends_) {
      if (IsAddressEntry(entry)) {
        resolved_->addresses[entry] = {entry};  // no lookup
      } else {
        names.push_back(entry);
      }
    }
    if (names.empty()) return;
    std::thread([state = resolved_, names, log = log_, id = options_.id] {
      while (true) {
        for (const std::string& name : names) {
          std::vector<std::string> now = ResolveFrontend(name);
          std::lock_guard<std::mutex> lock(state->mu);
          auto& known = state->addresses[name];
          if (now.empty() && known.empty()) {
            log->warn("{}: front-end name {} does not resolve (yet)", id, name);
          }
          if (!now.empty()) known = std::move(now);  // else the last ones found
        }
        std::unique_lock<std::mutex> lock(state->mu);
        if (state->cv.wait_for(lock, std::chrono::seconds(5), [&] { return state->stop; })) return;
      }
    }).detach();
  }

  // Keeps the health statuses current and registers with every front-end (again every second:
  // its heartbeat; at once when draining starts), following the front-ends the resolver finds
  // behind options_.frontend's names.
  void HeartbeatLoop() {
    std::map<std::string, Registration> registrations;  // by address
    while (true) {
      if (resolved_ != nullptr) Follow(registrations);
      RegisterAll(registrations);
      bool registered = frontends_.empty();
      for (const auto& [address, r] : registrations) registered = registered || r.registered;
      UpdateHealth(registered);
      std::unique_lock<std::mutex> lock(reg_mu_);
      reg_cv_.wait_for(
          lock, registered ? std::chrono::milliseconds(1000) : std::chrono::milliseconds(200),
          [&] { return stopping_ || reg_wake_; });
      reg_wake_ = false;
      if (stopping_) return;
    }
  }

  // Brings `registrations` to the front-ends the resolver knows now.
  void Follow(std::map<std::string, Registration>& registrations) {
    std::set<std::string> now;
    {
      std::lock_guard<std::mutex> lock(resolved_->mu);
      for (const auto& [entry, addresses] : resolved_->addresses) {
        now.insert(addresses.begin(), addresses.end());
      }
    }
    for (auto it = registrations.begin(); it != registrations.end();) {
      if (now.count(it->first)) {
        ++it;
        continue;
      }
      log_->info("{}: front-end {} is no longer in {}", options_.id, it->first, options_.frontend);
      it = registrations.erase(it);
    }
    for (const std::string& address : now) {
      if (registrations.count(address)) continue;
      registrations[address].stub = pb::Registry::NewStub(MakeChannel(address));
    }
  }

  // One registration with each front-end, all at once (1 s deadline).
  void RegisterAll(std::map<std::string, Registration>& registrations) {
    if (registrations.empty()) return;
    pb::RegisterRequest request;
    request.set_id(options_.id);
    request.set_role(std::string(scheduler::InstanceRoleName(options_.role)));
    request.set_address(address());
    request.set_kv_address(kv_address());
    request.set_model(options_.model_name);
    request.set_vocab_size(options_.vocab_size);
    request.set_draining(draining_);
    struct Call {
      grpc::ClientContext ctx;
      pb::RegisterResponse response;
      grpc::Status status;
    };
    std::map<std::string, Call> calls;
    std::mutex done_mu;
    std::condition_variable done_cv;
    size_t done = 0;
    for (auto& [address, r] : registrations) {
      Call& call = calls[address];
      call.ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(1));
      r.stub->async()->Register(&call.ctx, &request, &call.response,
                                [&, c = &call](grpc::Status s) {
                                  c->status = std::move(s);
                                  std::lock_guard<std::mutex> lock(done_mu);
                                  ++done;
                                  done_cv.notify_all();
                                });
    }
    {
      std::unique_lock<std::mutex> lock(done_mu);
      if (!done_cv.wait_for(lock, std::chrono::seconds(2), [&] { return done == calls.size(); })) {
        for (auto& [address, call] : calls) call.ctx.TryCancel();  // every callback comes, at once
        done_cv.wait(lock, [&] { return done == calls.size(); });
      }
    }
    for (auto& [address, r] : registrations) {
      const Call& call = calls[address];
      const bool ok = call.status.ok() && call.response.accepted();
      if (call.status.ok() && !ok) {
        log_->error("{}: the front-end at {} refused registration: {}", options_.id, address,
                    call.response.message());
      } else if (ok && !r.registered) {
        log_->info("{} registered with the front-end at {} as {}", options_.id, address,
                   this->address());
      } else if (!ok && r.registered) {
        log_->warn("{}: front-end {} unreachable: {}", options_.id, address,
                   call.status.error_message());
      }
      r.registered = ok;
    }
  }

  void UpdateHealth(bool registered) {
    grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
    if (health == nullptr) return;
    std::chrono::steady_clock::duration stalled;
    {
      std::lock_guard<std::mutex> lock(status_mu_);
      stalled = std::chrono::steady_clock::now() - loop_heartbeat_;
    }
    const bool live = stalled < absl::ToChronoNanoseconds(options_.stall_timeout);
    if (!live && reported_live_) {
      log_->error("{}: the engine loop has not moved for {} s: reporting not live", options_.id,
                  std::chrono::duration_cast<std::chrono::seconds>(stalled).count());
    }
    reported_live_ = live;
    // ("" alone: the one-argument form sets every service, readiness included, for a moment.)
    health->SetServingStatus("", live);
    health->SetServingStatus(kReadyService, live && registered && !draining_);
  }

  engine::Transformer& model_;
  WorkerOptions options_;
  std::shared_ptr<spdlog::logger> log_;
  std::unique_ptr<engine::LlmEngine> engine_;

  // The loop's inbox.
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  bool stop_loop_ = false;
  std::thread loop_;
  std::map<std::string, Live> live_;  // loop thread only
  // Ids of the requests this worker holds, from admission on a caller's thread until Finish.
  std::mutex admitted_mu_;
  std::set<std::string> admitted_;
  int64_t served_ = 0;                                 // loop thread only
  int64_t kv_bytes_sent_ = 0;                          // loop thread only
  int64_t kv_bytes_held_ = 0;                          // loop thread only
  int64_t handoffs_deferred_ = 0;                      // loop thread only
  int64_t steps_ = 0, busy_us_ = 0, step_tokens_ = 0;  // loop thread only

  std::mutex status_mu_;
  pb::WorkerStatus status_;
  std::chrono::steady_clock::time_point loop_heartbeat_;  // when the loop last set status_

  std::mutex import_mu_;
  std::map<std::string, std::vector<int32_t>> imports_;  // decode: reserved blocks

  std::unique_ptr<grpc::Server> server_;
  int bound_port_ = 0;
  std::unique_ptr<engine::KvReceiver> receiver_;
  std::unique_ptr<engine::KvSender> sender_;
  std::string kv_transport_;  // the one in use
  std::unique_ptr<JobPool> transfers_;

  std::vector<std::string> frontends_;  // options_.frontend's entries
  std::shared_ptr<Resolved> resolved_;  // null without front-ends
  std::mutex reg_mu_;
  std::condition_variable reg_cv_;
  bool stopping_ = false;
  bool reg_wake_ = false;      // register now (draining started)
  std::thread registration_;   // HeartbeatLoop
  bool reported_live_ = true;  // HeartbeatLoop only: the last overall health status
  // Set (under admitted_mu_) by Drain: new requests are refused.
  std::atomic<bool> draining_{false};
  std::condition_variable admitted_cv_;  // with admitted_mu_: admitted_ became empty
  std::atomic<bool> shut_down_{false};
};

Worker::Worker(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Worker::~Worker() { Shutdown(); }

absl::StatusOr<std::unique_ptr<Worker>> Worker::Start(engine::Transformer& model,
                                                      WorkerOptions options) {
  auto impl = std::make_unique<Impl>(model, std::move(options));
  absl::Status started = impl->Init();
  if (!started.ok()) {
    impl->Shutdown();
    return started;
  }
  return std::unique_ptr<Worker>(new Worker(std::move(impl)));
}

const std::string& Worker::id() const { return impl_->id(); }
std::string Worker::address() const { return impl_->address(); }
std::string Worker::kv_address() const { return impl_->kv_address(); }
bool Worker::Drain(absl::Duration timeout) { return impl_->Drain(timeout); }
void Worker::Shutdown() {
  if (impl_) impl_->Shutdown();
}

}  // namespace pds::server
