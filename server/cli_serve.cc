// pdserve frontend | prefill | decode | colocated | up: the serving processes and the local
// cluster launcher.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "engine/common/logging.h"
#include "engine/common/status_macros.h"
#include "engine/tokenizer/tokenizer.h"
#include "pdserve/v1/serving.grpc.pb.h"
#include "scheduler/batch_policy.h"
#include "scheduler/latency_model.h"
#include "scheduler/planner.h"
#include "server/cli_args.h"
#include "server/cli_model.h"
#include "server/commands.h"
#include "server/cpu_affinity.h"
#include "server/frontend.h"
#include "server/grpc_util.h"
#include "server/worker.h"

namespace pds::server {
namespace {

// Writes `text` to `path` atomically (readers never see a partial file).
absl::Status WriteFileAtomically(const std::string& path, const std::string& text) {
  const std::string tmp = absl::StrCat(path, ".tmp.", getpid());
  {
    std::ofstream out(tmp);
    out << text;
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", tmp));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot rename ", tmp, ": ", ec.message()));
  return absl::OkStatus();
}

std::vector<FlagSpec> EngineFlagSpecs() {
  return {
      {"kv-cache-mb", false, "KV cache size in MiB (default 256)"},
      {"num-blocks", false, "KV cache size in blocks (overrides --kv-cache-mb)"},
      {"block-size", false, "KV block size in tokens (default 16)"},
      {"max-batch-tokens", false, "token budget of one engine step (default 2048)"},
      {"max-batch-size", false, "sequences in one engine step (default 64)"},
      {"batch-policy", false, "batch formation: fcfs (default) or edf (by TTFT deadline)"},
      {"prefix-caching", false,
       "on (default) or off: start a prompt from the cached K/V of the longest prefix, in whole "
       "blocks, that an earlier request computed"},
      {"speculative-tokens", false,
       "speculative decoding by prompt lookup: drafts per sequence and step, from where the "
       "sequence's latest tokens occurred before in its prompt or reply (default 0: off)"},
      {"prompt-lookup-max", false,
       "speculative decoding: the longest suffix looked up (default 4)"},
      {"prompt-lookup-min", false,
       "speculative decoding: the shortest suffix looked up (default 2)"},
      {"speculative-drafts", false,
       "speculative decoding: which proposed drafts a step carries: paying (default: those "
       "that raise its expected tokens per second, by each sequence's kept drafts and the "
       "engine's timings of its steps) or all (every one likelier than 1 in 32)"},
  };
}

absl::StatusOr<engine::EngineOptions> EngineOptionsFromArgs(const CliArgs& args) {
  engine::EngineOptions o;
  PDS_ASSIGN_OR_RETURN(int64_t mb, args.GetInt("kv-cache-mb", 256));
  PDS_ASSIGN_OR_RETURN(int64_t bs, args.GetInt("block-size", 16));
  PDS_ASSIGN_OR_RETURN(int64_t tokens, args.GetInt("max-batch-tokens", 2048));
  PDS_ASSIGN_OR_RETURN(int64_t seqs, args.GetInt("max-batch-size", 64));
  PDS_ASSIGN_OR_RETURN(int64_t blocks, args.GetInt("num-blocks", 0));
  if (mb <= 0 || bs <= 0 || tokens <= 0 || seqs <= 0 || blocks < 0 || blocks > (1 << 30)) {
    return absl::InvalidArgumentError(
        "--kv-cache-mb, --block-size, --max-batch-tokens and --max-batch-size must be positive");
  }
  o.kv_cache_bytes = static_cast<size_t>(mb) << 20;
  o.block_size = static_cast<int32_t>(bs);
  o.max_batch_tokens = static_cast<int32_t>(tokens);
  o.max_running = static_cast<int32_t>(seqs);
  o.num_blocks = static_cast<int32_t>(blocks);
  PDS_ASSIGN_OR_RETURN(std::unique_ptr<scheduler::BatchPolicy> policy,
                       scheduler::MakeBatchPolicy(args.GetString("batch-policy", "fcfs")));
  o.batch_policy = std::move(policy);
  const std::string caching = args.GetString("prefix-caching", "on");
  if (caching != "on" && caching != "off") {
    return absl::InvalidArgumentError(
        absl::StrCat("--prefix-caching '", caching, "': expected on or off"));
  }
  o.prefix_caching = caching == "on";
  PDS_ASSIGN_OR_RETURN(int64_t drafts, args.GetInt("speculative-tokens", 0));
  PDS_ASSIGN_OR_RETURN(int64_t lookup_max, args.GetInt("prompt-lookup-max", 4));
  PDS_ASSIGN_OR_RETURN(int64_t lookup_min, args.GetInt("prompt-lookup-min", 2));
  if (drafts < 0 || drafts > 64 || lookup_min < 1 || lookup_max < lookup_min || lookup_max > 64) {
    return absl::InvalidArgumentError(
        "--speculative-tokens must be in [0, 64], and 1 <= --prompt-lookup-min <= "
        "--prompt-lookup-max <= 64");
  }
  o.speculative.num_tokens = static_cast<int32_t>(drafts);
  o.speculative.ngram_max = static_cast<int32_t>(lookup_max);
  o.speculative.ngram_min = static_cast<int32_t>(lookup_min);
  const std::string which = args.GetString("speculative-drafts", "paying");
  if (which != "paying" && which != "all") {
    return absl::InvalidArgumentError(
        absl::StrCat("--speculative-drafts '", which, "': expected paying or all"));
  }
  if (which == "all") o.speculative.choice = engine::DraftChoice::kAll;
  return o;
}

// --step-time-scale: how much slower live steps run than the profile measured them (e.g.
// `pdserve plan --calibrate`'s figure); the latency model's predictions are multiplied by it.
absl::StatusOr<double> StepTimeScale(const CliArgs& args) {
  PDS_ASSIGN_OR_RETURN(const double scale, args.GetDouble("step-time-scale", 1.0));
  if (!(scale > 0) || scale > 100) {
    return absl::InvalidArgumentError("--step-time-scale must be in (0, 100]");
  }
  return scale;
}

// --drain-timeout-s (default `fallback` seconds): how long a SIGTERM'd process finishes the
// requests it holds.
absl::StatusOr<absl::Duration> DrainTimeout(const CliArgs& args, double fallback = 30) {
  PDS_ASSIGN_OR_RETURN(const double s, args.GetDouble("drain-timeout-s", fallback));
  if (!(s >= 0) || s > 86400) {
    return absl::InvalidArgumentError("--drain-timeout-s must be in [0, 86400]");
  }
  return absl::Seconds(s);
}

// A positive number of seconds from `flag` (default `fallback`).
absl::StatusOr<absl::Duration> PositiveSeconds(const CliArgs& args, const char* flag,
                                               double fallback) {
  PDS_ASSIGN_OR_RETURN(const double s, args.GetDouble(flag, fallback));
  if (!(s > 0) || s > 1e9) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, " must be positive"));
  }
  return absl::Seconds(s);
}

absl::Status RunWorker(const CliArgs& args, scheduler::InstanceRole role) {
  BlockTerminationSignals();
  PDS_ASSIGN_OR_RETURN(LoadedModel loaded, LoadModelFromArgs(args));
  WorkerOptions o;
  o.role = role;
  o.id = args.GetString("id");
  o.host = args.GetString("host", "127.0.0.1");
  o.advertise_host = args.GetString("advertise-host");
  PDS_ASSIGN_OR_RETURN(int64_t port, args.GetInt("port", 0));
  PDS_ASSIGN_OR_RETURN(int64_t kv_port, args.GetInt("kv-port", 0));
  PDS_ASSIGN_OR_RETURN(const absl::Duration drain_timeout, DrainTimeout(args));
  PDS_ASSIGN_OR_RETURN(o.stall_timeout, PositiveSeconds(args, "stall-timeout-s", 60));
  PDS_ASSIGN_OR_RETURN(int64_t max_queued, args.GetInt("max-queued", 256));
  o.port = static_cast<int>(port);
  o.kv_port = static_cast<int>(kv_port);
  o.max_queued = static_cast<int>(max_queued);
  o.frontend = args.GetString("frontend");
  o.kv_transport = args.GetString("kv-transport");
  if (!o.kv_transport.empty() && o.kv_transport != "tcp" && o.kv_transport != "cuda-ipc" &&
      o.kv_transport != "nccl") {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-transport '", o.kv_transport, "': expected tcp, cuda-ipc or nccl"));
  }
  o.kv_handoff = args.GetString("kv-handoff", "layered");  // checked by Worker::Start
  o.model_name = std::filesystem::path(loaded.dir).lexically_normal().filename();
  if (o.model_name.empty()) {
    o.model_name = std::filesystem::path(loaded.dir).lexically_normal().parent_path().filename();
  }
  o.vocab_size = static_cast<int32_t>(loaded.model->config().vocab_size);
  if (const std::string tok = loaded.dir + "/tokenizer.json"; std::filesystem::exists(tok)) {
    // Structured output masks tokens by their bytes.
    PDS_ASSIGN_OR_RETURN(std::unique_ptr<engine::Tokenizer> tokenizer,
                         engine::Tokenizer::Load(tok));
    o.token_vocabulary =
        engine::TokenVocabulary::FromTokenizer(*tokenizer, loaded.model->config().eos_token_ids);
  }
  PDS_ASSIGN_OR_RETURN(o.engine, EngineOptionsFromArgs(args));
  PDS_ASSIGN_OR_RETURN(o.tpot_slo_ms, args.GetDouble("slo-tpot-ms", 0));
  if (args.Has("profile")) {
    PDS_ASSIGN_OR_RETURN(scheduler::LatencyModel model,
                         scheduler::LoadLatencyModelFile(args.GetString("profile")));
    PDS_ASSIGN_OR_RETURN(const double scale, StepTimeScale(args));
    o.latency_model = std::make_shared<scheduler::LatencyModel>(model.Scaled(scale));
  }
  PDS_ASSIGN_OR_RETURN(std::unique_ptr<Worker> worker, Worker::Start(*loaded.model, o));
  const int sig = WaitForTerminationSignal();
  auto log = pds::Logger("worker");
  log->info("{}: signal {}, draining (up to {})", worker->id(), sig,
            absl::FormatDuration(drain_timeout));
  if (!DrainUntil([&](absl::Duration slice) { return worker->Drain(slice); }, drain_timeout)) {
    log->warn("{}: not drained; requests still held fail with UNAVAILABLE", worker->id());
  }
  worker->Shutdown();
  return absl::OkStatus();
}

std::vector<FlagSpec> WorkerFlagSpecs() {
  std::vector<FlagSpec> specs = ModelFlagSpecs();
  for (FlagSpec s : EngineFlagSpecs()) specs.push_back(s);
  specs.push_back({"id", false, "instance id, unique in the cluster (default <role>-<port>)"});
  specs.push_back({"host", false, "address to listen on (default 127.0.0.1; 0.0.0.0: all)"});
  specs.push_back({"advertise-host", false,
                   "the address the front-end and other workers reach this worker at "
                   "(default --host; needed when --host is 0.0.0.0, e.g. the pod IP)"});
  specs.push_back({"port", false, "gRPC port (default 0: any free port)"});
  specs.push_back({"drain-timeout-s", false,
                   "on SIGTERM, finish the requests held for up to this long while refusing new "
                   "ones (default 30; a second signal stops at once)"});
  specs.push_back({"stall-timeout-s", false,
                   "report not live (gRPC health) when the engine loop has not moved for this "
                   "long (default 60)"});
  specs.push_back({"kv-port", false, "decode: KV transport port (default 0: any free port)"});
  specs.push_back({"frontend", false,
                   "front-ends to register with: host:port[,host:port...]; a name with several "
                   "addresses (a headless Service) means a front-end at each"});
  specs.push_back({"kv-transport", false,
                   "KV hand-off between prefill and decode: tcp (default for the cpu backend), "
                   "cuda-ipc (default for cuda; one host) or nccl"});
  specs.push_back({"kv-handoff", false,
                   "prefill: layered (default: each layer's KV leaves while the prefill step "
                   "goes on) or after (once the step has ended)"});
  specs.push_back({"max-queued", false, "requests queued beyond the batch (default 256)"});
  specs.push_back({"profile", false,
                   "latency-model profile (with --slo-tpot-ms: TPOT-capped "
                   "decode batches)"});
  specs.push_back({"slo-tpot-ms", false, "TPOT target the decode batch is capped for (ms)"});
  specs.push_back({"step-time-scale", false,
                   "multiply the profile's step times (live steps slower; default 1)"});
  return specs;
}

// --- pdserve up ---

struct Child {
  std::string name;
  pid_t pid = -1;
};

absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv) {
  std::vector<char*> cargv;
  for (const std::string& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGTERM);  // never outlive `up`
    if (getppid() != parent) _exit(1);
    // Its own process group: a terminal's ^C reaches `up` alone, which then stops the children
    // with one SIGTERM each (a second signal would end their drain at once).
    setpgid(0, 0);
    ResetSignalsForExec();
    // Out of the terminal's foreground group, its log writes would stop it under `stty tostop`.
    signal(SIGTTOU, SIG_IGN);
    execv("/proc/self/exe", cargv.data());
    std::perror("pdserve up: exec");
    _exit(127);
  }
  return pid;
}

std::string DescribeExit(int status) {
  if (WIFEXITED(status)) return absl::StrCat("exited with status ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return absl::StrCat("was killed by signal ", WTERMSIG(status));
  return "stopped";
}

class Cluster {
 public:
  // Children get `grace` after SIGTERM (their drain) before SIGKILL.
  explicit Cluster(absl::Duration grace) : grace_(grace) {}
  ~Cluster() { Stop(); }

  absl::Status Add(const std::string& name, const std::vector<std::string>& argv) {
    PDS_ASSIGN_OR_RETURN(pid_t pid, Spawn(argv));
    children_.push_back({name, pid});
    return absl::OkStatus();
  }

  // A child that exited since the last call, described; empty if none.
  std::string Reap() {
    for (Child& c : children_) {
      if (c.pid <= 0) continue;
      int status = 0;
      if (waitpid(c.pid, &status, WNOHANG) == c.pid) {
        std::string what = absl::StrCat(c.name, " (pid ", c.pid, ") ", DescribeExit(status));
        c.pid = -1;
        return what;
      }
    }
    return "";
  }

  // SIGTERM to workers first, then the front-end (the first child): they drain. A further
  // SIGINT/SIGTERM to `up` meanwhile is passed on as SIGINT (their second signal: stop now);
  // SIGKILL after the grace.
  void Stop() {
    Signal(SIGTERM);
    const absl::Time deadline = absl::Now() + grace_;
    sigset_t stop_now;
    sigemptyset(&stop_now);
    sigaddset(&stop_now, SIGINT);
    sigaddset(&stop_now, SIGTERM);
    const timespec poll = {0, 0};
    for (Child& c : children_) {
      while (c.pid > 0) {
        if (sigtimedwait(&stop_now, nullptr, &poll) > 0) {
          std::fprintf(stderr, "pdserve up: stopping now, without waiting for the drains\n");
          // SIGINT: a second SIGTERM still pending with the first would merge into one.
          Signal(SIGINT);
        }
        int status = 0;
        const pid_t r = waitpid(c.pid, &status, WNOHANG);
        if (r == c.pid || r < 0) {
          c.pid = -1;
        } else if (absl::Now() > deadline) {
          std::fprintf(stderr, "pdserve up: %s did not stop in %s; killing it\n", c.name.c_str(),
                       absl::FormatDuration(grace_).c_str());
          kill(c.pid, SIGKILL);
          waitpid(c.pid, &status, 0);
          c.pid = -1;
        } else {
          absl::SleepFor(absl::Milliseconds(20));
        }
      }
    }
  }

 private:
  void Signal(int sig) {
    for (auto it = children_.rbegin(); it != children_.rend(); ++it) {
      if (it->pid > 0) kill(it->pid, sig);
    }
  }

  const absl::Duration grace_;
  std::vector<Child> children_;
};

// Waits for a termination signal or a child's exit, up to `timeout`. Returns the signal
// number, or 0 on timeout or SIGCHLD.
int WaitSignalOrChild(absl::Duration timeout) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGCHLD);
  timespec ts = absl::ToTimespec(timeout);
  const int sig = sigtimedwait(&set, nullptr, &ts);
  return sig == SIGINT || sig == SIGTERM ? sig : 0;
}

absl::Status RunUp(const CliArgs& args) {
  // SIGCHLD is blocked too, and collected with sigtimedwait.
  BlockTerminationSignals();
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  pthread_sigmask(SIG_BLOCK, &chld, nullptr);

  PDS_ASSIGN_OR_RETURN(const std::string model, args.Required("model"));
  PDS_ASSIGN_OR_RETURN(int64_t n_prefill, args.GetInt("prefill", 0));
  PDS_ASSIGN_OR_RETURN(int64_t n_decode, args.GetInt("decode", 0));
  // A plan (pdserve plan --out) gives the instance counts, each role's engine settings,
  // the SLO targets and the profile for SLO-aware dispatch; explicit flags win.
  std::map<std::string, std::vector<std::string>> role_flags;
  std::vector<std::string> plan_fe_flags;
  if (args.Has("plan")) {
    const std::string path = args.GetString("plan");
    std::ifstream in(path);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read plan file ", path));
    nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, " is not JSON"));
    auto plan = scheduler::ParsePlanFile(j);
    if (!plan.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": ", plan.status().message()));
    }
    if (!args.Has("prefill")) n_prefill = plan->prefill_instances;
    if (!args.Has("decode")) n_decode = plan->decode_instances;
    for (const auto& [role, inst] :
         {std::pair<std::string, scheduler::SimInstanceConfig>{"prefill", plan->prefill},
          {"decode", plan->decode}}) {
      role_flags[role] = {"--max-batch-tokens", absl::StrCat(inst.max_batch_tokens),
                          "--max-batch-size",   absl::StrCat(inst.max_running),
                          "--num-blocks",       absl::StrCat(inst.kv_blocks),
                          "--block-size",       absl::StrCat(inst.block_size)};
      if (!plan->batch_policy.empty()) {
        role_flags[role].insert(role_flags[role].end(), {"--batch-policy", plan->batch_policy});
      }
      if (!plan->prefix_caching) {
        role_flags[role].insert(role_flags[role].end(), {"--prefix-caching", "off"});
      }
    }
    if (plan->local_prefill_max_tokens > 0 && !args.Has("local-prefill-max-tokens")) {
      plan_fe_flags.insert(plan_fe_flags.end(), {"--local-prefill-max-tokens",
                                                 absl::StrCat(plan->local_prefill_max_tokens)});
    }
    if (plan->ttft_slo_ms > 0 && !args.Has("slo-ttft-ms")) {
      plan_fe_flags.insert(plan_fe_flags.end(), {"--slo-ttft-ms", absl::StrCat(plan->ttft_slo_ms)});
    }
    if (plan->tpot_slo_ms > 0 && !args.Has("slo-tpot-ms")) {
      plan_fe_flags.insert(plan_fe_flags.end(), {"--slo-tpot-ms", absl::StrCat(plan->tpot_slo_ms)});
    }
    if (!plan->profile_path.empty() && !args.Has("profile")) {
      if (std::filesystem::exists(plan->profile_path)) {
        plan_fe_flags.insert(plan_fe_flags.end(), {"--profile", plan->profile_path});
        if (plan->step_time_scale != 1 && !args.Has("step-time-scale")) {
          plan_fe_flags.insert(plan_fe_flags.end(),
                               {"--step-time-scale", absl::StrCat(plan->step_time_scale)});
        }
        if (!plan->dispatch_policy.empty() && !args.Has("policy")) {
          plan_fe_flags.insert(plan_fe_flags.end(), {"--policy", plan->dispatch_policy});
        }
      } else {
        std::fprintf(stderr,
                     "pdserve up: the plan's profile %s is not here; dispatch is least-loaded\n",
                     plan->profile_path.c_str());
      }
    }
    std::printf("pdserve up: plan %s: %lld prefill + %lld decode instances\n", path.c_str(),
                static_cast<long long>(n_prefill), static_cast<long long>(n_decode));
  }
  PDS_ASSIGN_OR_RETURN(int64_t n_colocated, args.GetInt("colocated", 0));
  PDS_ASSIGN_OR_RETURN(int64_t port, args.GetInt("port", 8000));
  PDS_ASSIGN_OR_RETURN(int64_t startup_s, args.GetInt("startup-timeout", 300));
  PDS_ASSIGN_OR_RETURN(const int64_t n_frontends, args.GetInt("frontends", 1));
  if (n_frontends < 1 || n_frontends > 8) {
    return absl::InvalidArgumentError("--frontends must be in [1, 8]");
  }
  if (n_colocated > 0 && (n_prefill > 0 || n_decode > 0)) {
    return absl::InvalidArgumentError("give either --colocated K or --prefill N --decode M");
  }
  if (n_colocated == 0 && (n_prefill <= 0 || n_decode <= 0)) {
    return absl::InvalidArgumentError(
        "a disaggregated cluster needs --prefill N and --decode M (both >= 1), or use "
        "--colocated K");
  }
  if (n_prefill > 64 || n_decode > 64 || n_colocated > 64 || n_colocated < 0) {
    return absl::InvalidArgumentError("at most 64 instances of a role");
  }
  const int64_t n_workers = n_colocated > 0 ? n_colocated : n_prefill + n_decode;
  // The CPUs `up` itself may use (a taskset or a container's cpuset), not all the machine's:
  // the default thread counts divide them, and --pin-cpus hands them out.
  const std::vector<int> allowed_cpus = AllowedCpus();
  const int64_t cores = static_cast<int64_t>(allowed_cpus.size());
  PDS_ASSIGN_OR_RETURN(int64_t threads,
                       args.GetInt("threads", std::max<int64_t>(1, cores / n_workers)));
  const std::string host = "127.0.0.1";
  const std::string backend = args.GetString("backend", "cpu");

  // Front-end i writes its port to port_files[i] once it listens.
  std::vector<std::string> port_files;
  for (int64_t i = 0; i < n_frontends; ++i) {
    port_files.push_back((std::filesystem::temp_directory_path() /
                          absl::StrCat("pdserve-up-", getpid(), "-", i, ".port"))
                             .string());
    std::filesystem::remove(port_files.back());
  }
  // Every process finishes its requests for up to --drain-timeout-s once stopped.
  PDS_ASSIGN_OR_RETURN(const absl::Duration drain, DrainTimeout(args, /*fallback=*/5));
  const std::vector<std::string> drain_flag = {"--drain-timeout-s",
                                               absl::StrCat(absl::ToDoubleSeconds(drain))};
  Cluster cluster(drain + absl::Seconds(10));
  // SIGINT/SIGTERM while the cluster starts is a request to stop, as after start-up: the
  // processes started so far are stopped and `up` exits 0.
  auto stop_during_start_up = [&](int sig) {
    std::fprintf(stderr, "pdserve up: signal %d during start-up, shutting the cluster down\n", sig);
    cluster.Stop();
    std::error_code ignored;
    for (const std::string& f : port_files) std::filesystem::remove(f, ignored);
    return absl::OkStatus();
  };
  // Front-end i listens on --port + i (any free port with 0), and likewise its metrics and
  // HTTP ports.
  auto port_plus = [](int64_t base, int64_t i) { return absl::StrCat(base > 0 ? base + i : base); };
  for (int64_t i = 0; i < n_frontends; ++i) {
    std::vector<std::string> fe = {
        "pdserve",     "frontend",   "--model",          model,  "--host",
        host,          "--port",     port_plus(port, i), "--id", absl::StrCat("frontend-", i),
        "--port-file", port_files[i]};
    for (const char* pass :
         {"policy", "max-in-flight", "profile", "step-time-scale", "slo-ttft-ms", "slo-tpot-ms",
          "worker-stall-timeout-s", "metrics-port", "http-port", "local-prefill-max-tokens",
          "chat-template", "tool-call-parser", "reasoning-parser"}) {
      if (!args.Has(pass)) continue;
      fe.push_back(absl::StrCat("--", pass));
      int64_t base = 0;
      const bool shifted =
          (std::string(pass) == "metrics-port" || std::string(pass) == "http-port") &&
          absl::SimpleAtoi(args.GetString(pass), &base);
      fe.push_back(shifted ? port_plus(base, i) : args.GetString(pass));
    }
    if (args.Has("best-effort")) fe.push_back("--best-effort");
    fe.insert(fe.end(), plan_fe_flags.begin(), plan_fe_flags.end());
    fe.insert(fe.end(), drain_flag.begin(), drain_flag.end());
    PDS_RETURN_IF_ERROR(cluster.Add(absl::StrCat("frontend-", i), fe));
  }

  // Each front-end writes its port once it listens.
  const absl::Time deadline = absl::Now() + absl::Seconds(startup_s);
  std::vector<std::string> addresses;
  while (addresses.size() < port_files.size()) {
    std::ifstream in(port_files[addresses.size()]);
    std::string line;
    int bound = 0;
    if (in && std::getline(in, line) && absl::SimpleAtoi(line, &bound)) {
      addresses.push_back(JoinHostPort(host, bound));
      std::filesystem::remove(port_files[addresses.size() - 1]);
      continue;
    }
    const std::string died = cluster.Reap();
    if (!died.empty()) return absl::UnavailableError(absl::StrCat("front-end ", died));
    if (absl::Now() > deadline) return absl::DeadlineExceededError("front-end did not start");
    if (const int sig = WaitSignalOrChild(absl::Milliseconds(50)); sig != 0) {
      return stop_during_start_up(sig);
    }
  }
  const std::string address = absl::StrJoin(addresses, ",");

  // --pin-cpus: worker i takes CPUs i * threads .. (i + 1) * threads - 1 (modulo the cores),
  // in the order prefill, decode (or colocated).
  const bool pin = args.Has("pin-cpus");
  int64_t next_cpu = 0;
  auto worker_argv = [&](const std::string& role, const std::string& id) {
    std::vector<std::string> argv = {"pdserve",    role,
                                     "--model",    model,
                                     "--id",       id,
                                     "--host",     host,
                                     "--frontend", address,
                                     "--backend",  backend,
                                     "--threads",  absl::StrCat(threads)};
    argv.insert(argv.end(), drain_flag.begin(), drain_flag.end());
    if (pin) {
      std::vector<int> cpus;
      for (int64_t t = 0; t < std::max<int64_t>(1, threads); ++t) {
        cpus.push_back(allowed_cpus[next_cpu++ % cores]);
      }
      std::sort(cpus.begin(), cpus.end());
      cpus.erase(std::unique(cpus.begin(), cpus.end()), cpus.end());
      argv.insert(argv.end(), {"--cpus", FormatCpuList(cpus)});
    }
    for (const char* pass : {"kv-transport", "max-queued", "kv-handoff"}) {
      if (args.Has(pass)) argv.insert(argv.end(), {absl::StrCat("--", pass), args.GetString(pass)});
    }
    if (role != "prefill") {
      // The TPOT cap on decode batches uses the same profile and target as the front-end.
      for (const auto& [flag, value] :
           {std::pair<std::string, std::string>{"profile", args.GetString("profile")},
            {"step-time-scale", args.GetString("step-time-scale")},
            {"slo-tpot-ms", args.GetString("slo-tpot-ms")}}) {
        if (!value.empty()) argv.insert(argv.end(), {absl::StrCat("--", flag), value});
      }
      for (size_t i = 0; i + 1 < plan_fe_flags.size(); i += 2) {
        if ((plan_fe_flags[i] == "--profile" && !args.Has("profile")) ||
            (plan_fe_flags[i] == "--step-time-scale" && !args.Has("step-time-scale")) ||
            (plan_fe_flags[i] == "--slo-tpot-ms" && !args.Has("slo-tpot-ms"))) {
          argv.insert(argv.end(), {plan_fe_flags[i], plan_fe_flags[i + 1]});
        }
      }
    }
    std::vector<std::string> from_plan = role_flags[role];
    for (const FlagSpec& s : EngineFlagSpecs()) {
      const std::string flag = absl::StrCat("--", s.name);
      if (args.Has(s.name)) {
        argv.push_back(flag);
        argv.push_back(args.GetString(s.name));
        // An explicit flag overrides the plan's value.
        for (size_t i = 0; i + 1 < from_plan.size(); i += 2) {
          if (from_plan[i] == flag)
            from_plan.erase(from_plan.begin() + i, from_plan.begin() + i + 2);
        }
      }
    }
    argv.insert(argv.end(), from_plan.begin(), from_plan.end());
    return argv;
  };
  std::vector<std::pair<std::string, int64_t>> roles =
      n_colocated > 0 ? std::vector<std::pair<std::string, int64_t>>{{"colocated", n_colocated}}
                      : std::vector<std::pair<std::string, int64_t>>{{"prefill", n_prefill},
                                                                     {"decode", n_decode}};
  for (const auto& [role, count] : roles) {
    for (int64_t i = 0; i < count; ++i) {
      const std::string id = absl::StrCat(role, "-", i);
      PDS_RETURN_IF_ERROR(cluster.Add(id, worker_argv(role, id)));
    }
  }

  // Ready when every worker is registered with every front-end and healthy.
  std::vector<std::unique_ptr<::pdserve::v1::Serving::Stub>> stubs;
  for (const std::string& a : addresses)
    stubs.push_back(::pdserve::v1::Serving::NewStub(MakeChannel(a)));
  size_t ready = 0;  // front-ends that see every worker healthy
  while (true) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(1));
    ::pdserve::v1::ClusterStatus status;
    if (stubs[ready]->GetClusterStatus(&ctx, ::pdserve::v1::ClusterStatusRequest(), &status).ok()) {
      int healthy = 0;
      for (const auto& inst : status.instances()) healthy += inst.healthy();
      if (healthy == n_workers && ++ready == stubs.size()) break;
      if (healthy == n_workers) continue;
    }
    const std::string died = cluster.Reap();
    if (!died.empty()) return absl::UnavailableError(absl::StrCat("during start-up, ", died));
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("the cluster was not healthy within ", startup_s, " s"));
    }
    if (const int sig = WaitSignalOrChild(absl::Milliseconds(100)); sig != 0) {
      return stop_during_start_up(sig);
    }
  }
  std::printf("pdserve: cluster ready at %s (%s; %lld thread(s) per worker)\n", address.c_str(),
              n_colocated > 0 ? absl::StrCat(n_colocated, " colocated").c_str()
                              : absl::StrCat(n_prefill, " prefill + ", n_decode, " decode").c_str(),
              static_cast<long long>(threads));
  std::fflush(stdout);
  if (args.Has("ready-file")) {
    PDS_RETURN_IF_ERROR(WriteFileAtomically(args.GetString("ready-file"), address + "\n"));
  }
  while (true) {
    const int sig = WaitSignalOrChild(absl::Milliseconds(200));
    if (sig != 0) {
      std::fprintf(stderr, "pdserve up: signal %d, shutting the cluster down\n", sig);
      cluster.Stop();
      return absl::OkStatus();
    }
    const std::string died = cluster.Reap();
    if (!died.empty()) {
      std::fprintf(stderr, "pdserve up: %s; shutting the cluster down\n", died.c_str());
      cluster.Stop();
      return absl::AbortedError(absl::StrCat("cluster member ", died));
    }
  }
}

absl::Status RunFrontend(const CliArgs& args) {
  BlockTerminationSignals();
  FrontendOptions o;
  PDS_ASSIGN_OR_RETURN(o.model_dir, args.Required("model"));
  o.host = args.GetString("host", "127.0.0.1");
  PDS_ASSIGN_OR_RETURN(int64_t port, args.GetInt("port", 8000));
  PDS_ASSIGN_OR_RETURN(int64_t max_in_flight, args.GetInt("max-in-flight", 1024));
  o.port = static_cast<int>(port);
  o.max_in_flight = static_cast<int>(max_in_flight);
  o.id = args.GetString("id");
  o.policy = args.GetString("policy", "least-loaded");
  o.profile_path = args.GetString("profile");
  if (!o.profile_path.empty() && !args.Has("policy")) o.policy = "slo-aware";
  PDS_ASSIGN_OR_RETURN(o.step_time_scale, StepTimeScale(args));
  PDS_ASSIGN_OR_RETURN(o.default_ttft_slo_ms, args.GetDouble("slo-ttft-ms", 0));
  PDS_ASSIGN_OR_RETURN(o.default_tpot_slo_ms, args.GetDouble("slo-tpot-ms", 0));
  o.best_effort = args.GetBool("best-effort");
  PDS_ASSIGN_OR_RETURN(const int64_t local_prefill, args.GetInt("local-prefill-max-tokens", 0));
  if (local_prefill < 0 || local_prefill > scheduler::kMaxLocalPrefillTokens) {
    return absl::InvalidArgumentError(absl::StrCat("--local-prefill-max-tokens must be in [0, ",
                                                   scheduler::kMaxLocalPrefillTokens, "]"));
  }
  o.local_prefill_max_tokens = static_cast<int32_t>(local_prefill);
  PDS_ASSIGN_OR_RETURN(o.worker_stall_timeout, PositiveSeconds(args, "worker-stall-timeout-s", 60));
  PDS_ASSIGN_OR_RETURN(o.forget_worker_after, PositiveSeconds(args, "forget-worker-after-s", 300));
  PDS_ASSIGN_OR_RETURN(const absl::Duration drain_timeout, DrainTimeout(args));
  PDS_ASSIGN_OR_RETURN(const int64_t metrics_port, args.GetInt("metrics-port", -1));
  if (metrics_port < -1 || metrics_port > 65535) {
    return absl::InvalidArgumentError("--metrics-port must be a port, 0 (any) or -1 (off)");
  }
  o.metrics_port = static_cast<int>(metrics_port);
  PDS_ASSIGN_OR_RETURN(const int64_t http_port, args.GetInt("http-port", -1));
  if (http_port < -1 || http_port > 65535) {
    return absl::InvalidArgumentError("--http-port must be a port, 0 (any) or -1 (off)");
  }
  o.http_port = static_cast<int>(http_port);
  o.chat_template = args.GetString("chat-template");
  o.tool_call_parser = args.GetString("tool-call-parser");
  o.reasoning_parser = args.GetString("reasoning-parser");
  PDS_ASSIGN_OR_RETURN(std::unique_ptr<Frontend> frontend, Frontend::Start(o));
  if (args.Has("port-file")) {
    PDS_RETURN_IF_ERROR(
        WriteFileAtomically(args.GetString("port-file"), absl::StrCat(frontend->port(), "\n")));
  }
  if (args.Has("http-port-file")) {
    PDS_RETURN_IF_ERROR(WriteFileAtomically(args.GetString("http-port-file"),
                                            absl::StrCat(frontend->http_port(), "\n")));
  }
  if (frontend->metrics_port() > 0) {
    pds::Logger("frontend")
        ->info("Prometheus metrics at http://{}:{}/metrics", o.host, frontend->metrics_port());
  }
  const int sig = WaitForTerminationSignal();
  auto log = pds::Logger("frontend");
  log->info("signal {}, draining (up to {})", sig, absl::FormatDuration(drain_timeout));
  if (!DrainUntil([&](absl::Duration slice) { return frontend->Drain(slice); }, drain_timeout)) {
    log->warn("not drained; requests still in flight are cancelled");
  }
  frontend->Shutdown();
  return absl::OkStatus();
}

}  // namespace

int FrontendMain(int argc, char** argv) {
  return SubcommandMain(
      argc, argv, "frontend",
      "--model DIR [--port P] [--host H]\n"
      "The public gRPC API (pdserve.v1.Serving) and the workers' registry.",
      {{"model", false, "model directory (config and tokenizer are read)"},
       {"id", false,
        "this front-end's name among several sharing the workers (in request and call ids; "
        "default: 8 random hex digits)"},
       {"host", false, "address to listen on (default 127.0.0.1; 0.0.0.0: all)"},
       {"port", false, "port (default 8000; 0: any free port)"},
       {"drain-timeout-s", false,
        "on SIGTERM, finish the requests in flight for up to this long while refusing new "
        "ones (default 30; a second signal stops at once)"},
       {"metrics-port", false,
        "serve Prometheus metrics at http://HOST:PORT/metrics (default -1: off; 0: any port)"},
       {"http-port", false,
        "serve the OpenAI-compatible API (POST /v1/completions, GET /v1/models, GET /health) "
        "at http://HOST:PORT (default -1: off; 0: any port)"},
       {"http-port-file", false, "write the bound HTTP port to this file"},
       {"chat-template", false,
        "Jinja chat template file for /v1/chat/completions (default: the model's)"},
       {"tool-call-parser", false,
        "how the model writes tool calls, read back as the chat API's tool_calls: hermes "
        "(<tool_call>{...}</tool_call>: Qwen 2.5/3, Hermes), llama3_json (Llama 3.x JSON) or "
        "pythonic ([f(x=1), ...]: Llama 3.2/3.3/4) or mistral ([TOOL_CALLS]...: Mistral, "
        "Nemo, Small 3, Magistral); "
        "default none (requests with tools and tool_choice auto are refused)"},
       {"reasoning-parser", false,
        "how the model marks its reasoning, returned as the chat API's reasoning_content: "
        "deepseek_r1 (the reply starts inside <think>, ends it with </think>) or qwen3 (a reply "
        "that starts with <think>); default none"},
       {"forget-worker-after-s", false,
        "drop a worker from the cluster once it has been unreachable and idle this long "
        "(default 300)"},
       {"port-file", false, "write the bound port to this file"},
       {"policy", false,
        "dispatch policy: least-loaded (default) or slo-aware (default "
        "with --profile)"},
       {"profile", false, "latency-model profile from pdserve profile"},
       {"step-time-scale", false,
        "multiply the profile's step times (live steps slower; default 1)"},
       {"slo-ttft-ms", false, "default TTFT target of requests (ms)"},
       {"slo-tpot-ms", false, "default TPOT target of requests (ms)"},
       {"best-effort", true, "serve requests predicted to miss their TTFT instead of refusing"},
       {"local-prefill-max-tokens", false,
        "conditional disaggregation: a request with at most this many prompt tokens its decode "
        "worker does not hold (a conversation's next turn) is prefilled there too, with no "
        "hand-off, while at most this many such tokens wait there (default 0: off)"},
       {"max-in-flight", false, "requests in flight before RESOURCE_EXHAUSTED"},
       {"worker-stall-timeout-s", false,
        "a worker whose engine loop has not moved for this long gets no new requests "
        "(default 60)"}},
      RunFrontend);
}

int WorkerMain(int argc, char** argv, const char* role) {
  const auto parsed = scheduler::ParseInstanceRole(role);
  const std::string usage =
      absl::StrCat("--model DIR --frontend HOST:PORT [flags]\nA ", role, " worker.");
  return SubcommandMain(argc, argv, role, usage.c_str(), WorkerFlagSpecs(),
                        [&](const CliArgs& args) { return RunWorker(args, *parsed); });
}

int UpMain(int argc, char** argv) {
  std::vector<FlagSpec> specs = {
      {"model", false, "model directory"},
      {"plan", false, "a plan file from pdserve plan --out (instances, settings, SLOs)"},
      {"prefill", false, "prefill instances"},
      {"decode", false, "decode instances"},
      {"colocated", false, "colocated instances (instead of prefill/decode)"},
      {"port", false, "front-end port on 127.0.0.1 (default 8000; 0: any free port)"},
      {"frontends", false,
       "front-ends sharing the workers (default 1; at most 8): front-end i listens on --port + i "
       "(--metrics-port, --http-port likewise); the ready file and the banner list them all, "
       "comma-separated (pdbench --target takes the list)"},
      {"backend", false, "cpu (default) or cuda"},
      {"kv-transport", false, "tcp, cuda-ipc or nccl (default: tcp on cpu, cuda-ipc on cuda)"},
      {"kv-handoff", false,
       "layered (default: KV leaves layer by layer during the prefill step) or after"},
      {"threads", false, "CPU threads per worker (default: cores / workers)"},
      {"pin-cpus", true, "pin each worker to its own CPUs (worker i: CPUs i*threads onwards)"},
      {"ready-file", false, "write the front-end address here once the cluster is healthy"},
      {"startup-timeout", false, "seconds to wait for a healthy cluster (default 300)"},
      {"policy", false, "dispatch policy: least-loaded or slo-aware"},
      {"profile", false, "latency-model profile (enables the slo-aware policy)"},
      {"step-time-scale", false,
       "multiply the profile's step times in the front-end's and workers' predictions "
       "(default 1, or the plan's calibrated figure)"},
      {"slo-ttft-ms", false, "default TTFT target (ms)"},
      {"slo-tpot-ms", false, "default TPOT target (ms)"},
      {"best-effort", true, "serve requests predicted to miss their TTFT instead of refusing"},
      {"local-prefill-max-tokens", false,
       "front-end: prefill a request on its decode worker when at most this many of its prompt "
       "tokens are uncached there (default 0: off, or the plan's)"},
      {"max-in-flight", false, "front-end in-flight limit"},
      {"worker-stall-timeout-s", false,
       "front-end: a worker whose engine loop has not moved for this long gets no new "
       "requests (default 60)"},
      {"max-queued", false, "each worker: requests queued beyond its batch (default 256)"},
      {"drain-timeout-s", false,
       "on SIGINT/SIGTERM, every process finishes its requests for up to this long (default 5)"},
      {"metrics-port", false, "front-end: Prometheus metrics on this port (default off)"},
      {"http-port", false, "front-end: the OpenAI-compatible HTTP API on this port (default off)"},
      {"chat-template", false, "front-end: chat template file (default: the model's)"},
      {"tool-call-parser", false,
       "front-end: hermes, llama3_json, pythonic or mistral (default none)"},
      {"reasoning-parser", false, "front-end: deepseek_r1 or qwen3 (default none)"},
  };
  for (FlagSpec s : EngineFlagSpecs()) specs.push_back(s);
  return SubcommandMain(argc, argv, "up",
                        "--model DIR (--prefill N --decode M | --colocated K) "
                        "[--port P]\nStarts a local cluster on 127.0.0.1 as child processes; "
                        "SIGINT/SIGTERM stops it.",
                        specs, RunUp);
}

}  // namespace pds::server
