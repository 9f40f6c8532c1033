#include "scheduler/simulator.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <queue>
#include <span>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/common/status_macros.h"
#include "engine/kv_cache/block_allocator.h"
#include "scheduler/batch_policy.h"
#include "scheduler/prefix_index.h"

namespace pds::scheduler {

namespace {

constexpr double kTimelineOffsetS = 1.0;

int32_t BlocksFor(int64_t tokens, int32_t block_size) {
  return static_cast<int32_t>((tokens + block_size - 1) / block_size);
}

int64_t TimelineUs(double t) { return std::llround((t + kTimelineOffsetS) * 1e6); }

// splitmix64: a counter-based generator whose outputs depend only on the seed and the index,
// identical on every platform (std::normal_distribution is not).
uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// A standard normal draw for (seed, index), by Box-Muller over two uniforms in (0, 1).
double NormalDraw(uint64_t seed, uint64_t index) {
  const uint64_t a = SplitMix64(seed ^ SplitMix64(2 * index));
  const uint64_t b = SplitMix64(seed ^ SplitMix64(2 * index + 1));
  const double u1 = (static_cast<double>(a >> 11) + 0.5) * 0x1.0p-53;
  const double u2 = (static_cast<double>(b >> 11) + 0.5) * 0x1.0p-53;
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

// The token at position `pos` of request `i`'s stream (prompt, then output): synthetic ids
// that make the engine's block hashes say what the workload shares. Positions inside its
// group's shared prefix are the group's; the rest are its stream's (a conversation's turns
// share one stream: each turn's prompt is the previous prompt, its answer and a new message),
// or its own.
int32_t SimToken(const SimRequest& r, int64_t i, int64_t pos) {
  uint64_t owner = (uint64_t{1} << 63) | static_cast<uint64_t>(i);
  if (r.prefix_group >= 0 && pos < r.prefix_len) {
    owner = static_cast<uint64_t>(r.prefix_group);
  } else if (r.stream >= 0) {
    owner = (uint64_t{1} << 62) | static_cast<uint64_t>(r.stream);
  }
  return static_cast<int32_t>(SplitMix64(SplitMix64(owner) + static_cast<uint64_t>(pos)) >> 34);
}

std::vector<int32_t> SimTokens(const SimRequest& r, int64_t i, int64_t n) {
  std::vector<int32_t> tokens(static_cast<size_t>(n));
  for (int64_t p = 0; p < n; ++p) tokens[p] = SimToken(r, i, p);
  return tokens;
}

// One sequence of an instance's engine (LlmEngine::Sequence with synthetic tokens and no K/V).
struct Seq {
  int64_t req = 0;
  const SimRequest* spec = nullptr;
  uint64_t order = 0;
  std::vector<int32_t> tokens;  // prompt + generated
  std::vector<uint64_t> block_hashes;
  std::vector<int32_t> cached_chain;  // as LlmEngine's
  engine::BlockTable table;
  int32_t num_computed = 0;
  int32_t num_generated = 0;
  int32_t max_tokens = 1;
  bool admitted = false;
  bool held = false;
  bool importing = false;
  bool hold_after_prefill = false;
  bool in_batch = false;
  std::optional<double> deadline_s;
  bool best_effort = false;
  int32_t prompt_cached = 0;  // prompt tokens its prefill took from the cache
  int32_t len() const { return static_cast<int32_t>(tokens.size()); }
};

struct StepItem {
  Seq* seq;
  int32_t chunk;
};

// LlmEngine's block accounting and batch selection without the forward pass: the same
// BlockAllocator (prefix cache included) and the same selection rules.
class Engine {
 public:
  Engine(const SimInstanceConfig& config, const BatchPolicy& policy, bool prefix_caching)
      : config_(config), policy_(policy), allocator_(config.kv_blocks) {
    if (prefix_caching) allocator_.EnablePrefixCache(config.block_size);
  }

  // AddRequest's cache check: the prompt and one generated token must fit.
  bool Fits(int32_t prompt_len) const {
    return BlocksFor(int64_t{prompt_len} + 1, config_.block_size) <= config_.kv_blocks;
  }
  int32_t free_blocks() const { return allocator_.num_free(); }
  int32_t num_running() const {
    int32_t n = 0;
    for (const auto& [order, seq] : seqs_) n += seq.admitted;
    return n;
  }
  int64_t preemptions() const { return preemptions_; }
  size_t num_sequences() const { return seqs_.size(); }

  // `prompt`: SimTokens of the prompt.
  Seq& Add(int64_t req, const SimRequest& spec, std::vector<int32_t> prompt, bool hold,
           std::optional<double> deadline_s) {
    Seq& seq = Insert(req, spec, std::move(prompt));
    seq.max_tokens = spec.output_len;
    seq.hold_after_prefill = hold;
    seq.deadline_s = deadline_s;
    return seq;
  }

  // LlmEngine::ReserveImport: room for the prompt plus one block per running sequence, less
  // the leading blocks of the prompt that are cached (all but its last block), which it shares
  // and the transfer does not move. The held blocks, or -1: no room.
  int32_t ReserveImport(int64_t req, const SimRequest& spec, const std::vector<int32_t>& prompt) {
    // A preempted sequence whose stream started goes first; requests waiting to start keep
    // the blocks their prompts need.
    const int32_t bs = config_.block_size;
    int32_t kept = 0;
    for (const auto& [o, seq] : seqs_) {
      if (seq.admitted || seq.held || seq.importing) continue;
      if (seq.num_generated > 0) return -1;
      kept += BlocksFor(seq.len(), bs);
    }
    const int32_t needed = BlocksFor(spec.prompt_len, bs);
    std::vector<int32_t> tokens = prompt;
    std::vector<uint64_t> hashes;
    std::vector<int32_t> hit;
    if (allocator_.prefix_cache_enabled()) {
      engine::BlockAllocator::ExtendPrefixHashes(tokens, bs, hashes);
      hit = allocator_.MatchPrefix(tokens, hashes, needed - 1);
      allocator_.AcquireCached(hit);
    }
    const int32_t held = static_cast<int32_t>(hit.size());
    if (allocator_.num_free() < needed - held + num_running() + kept) {
      allocator_.Free(hit).IgnoreError();
      return -1;
    }
    absl::StatusOr<std::vector<int32_t>> blocks = allocator_.Allocate(needed - held);
    if (!blocks.ok()) {  // (cannot happen: num_free() was checked)
      allocator_.Free(hit).IgnoreError();
      return -1;
    }
    Seq& seq = Insert(req, spec, std::move(tokens));
    seq.block_hashes = std::move(hashes);
    seq.max_tokens = spec.output_len;
    seq.importing = true;
    std::vector<int32_t> table = hit;
    table.insert(table.end(), blocks->begin(), blocks->end());
    seq.cached_chain = std::move(hit);
    seq.table.Adopt(std::move(table), 0);
    return held;
  }

  // LlmEngine::ActivateImport: the prompt's K/V are in (its blocks registered), the first
  // token is known.
  void ActivateImport(int64_t req) {
    Seq& seq = Find(req);
    seq.num_computed = seq.len();
    seq.table.set_num_tokens(seq.num_computed);
    RegisterFilledBlocks(seq, static_cast<int32_t>(seq.cached_chain.size()) * config_.block_size);
    AppendToken(seq);
    seq.num_generated = 1;
    seq.importing = false;
    seq.admitted = true;
  }

  // After a step computed `chunk` more of `seq` (LlmEngine::Step): its filled blocks are
  // registered in the prefix cache.
  void Computed(Seq& seq, int32_t chunk) {
    const int32_t before = seq.num_computed;
    seq.num_computed += chunk;
    seq.table.set_num_tokens(seq.num_computed);
    RegisterFilledBlocks(seq, before);
  }

  // The sampled token joins the sequence.
  void AppendToken(Seq& seq) { seq.tokens.push_back(SimToken(*seq.spec, seq.req, seq.len())); }

  // LlmEngine::Cancel: frees the blocks and forgets the sequence.
  void Release(int64_t req) {
    auto it = by_req_.find(req);
    if (it == by_req_.end()) return;
    auto seq = seqs_.find(it->second);
    seq->second.table.Release(allocator_).IgnoreError();
    seqs_.erase(seq);
    by_req_.erase(it);
  }

  // The selection part of LlmEngine::Step, line for line.
  absl::StatusOr<std::vector<StepItem>> FormBatch() {
    std::vector<Seq*> order;
    for (auto& [o, seq] : seqs_) {
      if (!seq.held && !seq.importing) order.push_back(&seq);
    }
    std::vector<StepItem> plan;
    int32_t budget = config_.max_batch_tokens;
    const int32_t bs = config_.block_size;
    std::vector<Seq*> rest = order;
    bool waiting_blocked = false;  // as LlmEngine: later waiting ones wait, running ones run
    bool replan = true;
    absl::Status error;
    while (replan) {
      replan = false;
      std::vector<BatchCandidate> candidates;
      candidates.reserve(rest.size());
      for (Seq* seq : rest) {
        BatchCandidate c;
        c.pending_tokens = seq->len() - seq->num_computed;
        if (StartsFromCache(*seq)) {
          c.pending_tokens -= static_cast<int32_t>(CachedPrefix(*seq).size()) * bs;
        }
        if (waiting_blocked && !seq->admitted) c.pending_tokens = 0;  // skipped
        c.running = seq->admitted;
        if (seq->num_generated == 0) c.deadline_s = seq->deadline_s;  // as LlmEngine
        c.best_effort = seq->best_effort;
        candidates.push_back(c);
      }
      const BatchBudget left{budget, config_.max_running - static_cast<int32_t>(plan.size())};
      bool full = false;
      for (const PlannedChunk& proposed : policy_.Plan(candidates, left)) {
        Seq* seq = rest[proposed.index];
        if (waiting_blocked && !seq->admitted) continue;
        int32_t chunk = proposed.chunk;
        const bool from_cache = StartsFromCache(*seq);
        if (from_cache) {
          std::vector<int32_t> hit = CachedPrefix(*seq);
          const int32_t hit_tokens = static_cast<int32_t>(hit.size()) * bs;
          allocator_.AcquireCached(hit);
          seq->cached_chain = hit;
          seq->table.Adopt(std::move(hit), hit_tokens);
          seq->num_computed = hit_tokens;
          chunk = std::min(chunk, seq->len() - hit_tokens);
        }
        bool preempted = false;
        bool reserved = Reserve(*seq, seq->num_computed + chunk);
        while (!reserved && seq->admitted) {
          Seq* victim = nullptr;
          for (auto it = order.rbegin(); it != order.rend(); ++it) {
            Seq* s = *it;
            if (s == seq || !s->admitted || s->table.blocks().empty() || s->in_batch) continue;
            victim = s;
            break;
          }
          if (victim == nullptr) break;
          Preempt(*victim);
          preempted = true;
          reserved = Reserve(*seq, seq->num_computed + chunk);
        }
        if (!reserved) {
          if (seq->admitted && BlocksAwaitRelease()) {
            continue;  // waits for blocks a transfer holds; the others planned run
          }
          if (from_cache) {  // waiting sequences hold no blocks
            seq->table.Release(allocator_).IgnoreError();
            seq->num_computed = 0;
            seq->cached_chain.clear();
          }
          if (seq->admitted && plan.empty()) {
            error = absl::InternalError(
                absl::StrCat("simulated request ", seq->req, " cannot get KV blocks"));
          }
          if (!seq->admitted) {
            waiting_blocked = true;
            replan = true;
            break;
          }
          full = true;
          break;
        }
        if (from_cache && seq->num_generated == 0) seq->prompt_cached = seq->num_computed;
        seq->admitted = true;
        seq->in_batch = true;
        plan.push_back({seq, chunk});
        budget -= chunk;
        if (preempted) {
          replan = true;
          break;
        }
      }
      if (full) break;
      if (replan) std::erase_if(rest, [](const Seq* s) { return s->in_batch; });
    }
    for (const StepItem& item : plan) item.seq->in_batch = false;
    if (!error.ok()) return error;
    return plan;
  }

 private:
  bool StartsFromCache(const Seq& s) const {
    return allocator_.prefix_cache_enabled() && !s.admitted && !s.held && !s.importing &&
           s.num_computed == 0 && s.table.blocks().empty();
  }
  // LlmEngine::CachedPrefix: the cached blocks `s` starts from (at least one token left).
  std::vector<int32_t> CachedPrefix(Seq& s) {
    const int32_t bs = config_.block_size;
    engine::BlockAllocator::ExtendPrefixHashes(s.tokens, bs, s.block_hashes);
    return allocator_.MatchPrefix(s.tokens, s.block_hashes, (s.len() - 1) / bs);
  }
  // LlmEngine::RegisterFilledBlocks.
  void RegisterFilledBlocks(Seq& seq, int32_t from) {
    allocator_.RegisterComputed(seq.table.blocks(),
                                std::span<const int32_t>(seq.tokens.data(), seq.num_computed), from,
                                seq.block_hashes, seq.cached_chain);
  }

  // LlmEngine::BlocksAwaitRelease: held or importing sequences own blocks that come back when
  // their transfers end.
  bool BlocksAwaitRelease() const {
    for (const auto& [o, seq] : seqs_) {
      if ((seq.held || seq.importing) && !seq.table.blocks().empty()) return true;
    }
    return false;
  }

  Seq& Insert(int64_t req, const SimRequest& spec, std::vector<int32_t> tokens) {
    const uint64_t order = next_order_++;
    by_req_[req] = order;
    Seq& seq = seqs_[order];
    seq.req = req;
    seq.spec = &spec;
    seq.order = order;
    seq.tokens = std::move(tokens);
    return seq;
  }
  Seq& Find(int64_t req) { return seqs_.at(by_req_.at(req)); }

  bool Reserve(Seq& seq, int64_t tokens) {
    return seq.table.Reserve(static_cast<int32_t>(tokens), config_.block_size, allocator_).ok();
  }
  void Preempt(Seq& seq) {
    seq.table.Release(allocator_).IgnoreError();
    seq.cached_chain.clear();
    seq.num_computed = 0;
    seq.admitted = false;
    ++preemptions_;
  }

  SimInstanceConfig config_;
  const BatchPolicy& policy_;
  engine::BlockAllocator allocator_;
  uint64_t next_order_ = 0;
  int64_t preemptions_ = 0;
  std::map<uint64_t, Seq> seqs_;  // by admission order
  std::map<int64_t, uint64_t> by_req_;
};

struct Instance {
  std::string id;
  InstanceRole role = InstanceRole::kPrefill;
  SimInstanceConfig config;
  std::unique_ptr<Engine> engine;
  bool busy = false;
  std::vector<StepItem> batch;
  double step_s = 0;
  // The front-end's bookkeeping of this instance (server/frontend.cc's Instance).
  int64_t pending_prompt_tokens = 0;
  int32_t pending_requests = 0;
  int32_t promised_blocks = 0;
  int32_t decoding = 0;
  std::map<uint64_t, int32_t> queued_lens;
  int64_t decode_context = 0;
  PrefixIndex prefix_index;  // the front-end's view of its prefix cache
  // Decode: hand-offs refused for lack of room, in offer order.
  std::deque<int64_t> offers;
  SimInstanceStats stats;
};

struct Request {
  SimRequest spec;
  int prefill = -1;
  int decode = -1;
  uint64_t queue_seq = 0;
  int32_t promised = 0;  // KV blocks the front-end booked on instance promised_on
  int promised_on = -1;  // until the hand-off is in (or, prefilled there, the first token)
  int64_t context_estimate = 0;
  bool prefill_pending = false;
  bool done = false;
  bool offered = false;
  bool skipped = false;         // an earlier turn of its conversation failed: never sent
  bool best_effort = false;     // the dispatch policy's verdict, for the engine
  int32_t prefill_tokens = 0;   // the front-end's count of what its prefill computes
  std::vector<int32_t> prompt;  // SimTokens of the prompt (from its arrival)
  // The front-end's block hashes of the prompt for prefill (or colocated) and decode instances.
  std::vector<uint64_t> prompt_hashes, decode_prompt_hashes;
  client::RequestRecord record;
};

enum class EventType { kArrival, kEnqueue, kStepEnd, kTransferEnd };

struct Event {
  double t;
  uint64_t seq;
  EventType type;
  int64_t who;  // request (arrival, transfer end) or instance (step end)
  bool operator>(const Event& o) const { return t != o.t ? t > o.t : seq > o.seq; }
};

class Cluster {
 public:
  Cluster(const SimConfig& config, const LatencyModel& model, const BatchPolicy& batch_policy,
          DispatchPolicy& dispatch)
      : config_(config), model_(model), dispatch_(dispatch) {
    auto add = [&](InstanceRole role, const SimInstanceConfig& c, int n) {
      for (int i = 0; i < n; ++i) {
        Instance inst;
        inst.id = absl::StrCat(InstanceRoleName(role), "-", i);
        inst.role = role;
        inst.config = c;
        inst.engine = std::make_unique<Engine>(c, batch_policy, config.prefix_caching);
        if (config.prefix_caching) inst.prefix_index.set_capacity(static_cast<size_t>(c.kv_blocks));
        inst.stats.id = inst.id;
        index_[inst.id] = static_cast<int>(instances_.size());
        instances_.push_back(std::move(inst));
      }
    };
    if (config.num_colocated > 0) {
      add(InstanceRole::kColocated, config.colocated, config.num_colocated);
    } else {
      add(InstanceRole::kPrefill, config.prefill, config.num_prefill);
      add(InstanceRole::kDecode, config.decode, config.num_decode);
    }
  }

  absl::StatusOr<SimResult> Run(const std::vector<SimRequest>& requests) {
    requests_.resize(requests.size());
    followers_.assign(requests.size(), {});
    for (size_t i = 0; i < requests.size(); ++i) {
      requests_[i].spec = requests[i];
      requests_[i].record.index = static_cast<int64_t>(i);
      if (requests[i].stream >= 0) {  // pdbench's (conversation, turn)
        requests_[i].record.conversation = requests[i].stream;
        requests_[i].record.turn =
            requests[i].after >= 0 ? requests_[requests[i].after].record.turn + 1 : 0;
      }
      if (requests[i].after >= 0) {
        followers_[requests[i].after].push_back(static_cast<int64_t>(i));
      } else {
        Push(requests[i].arrival_s, EventType::kArrival, static_cast<int64_t>(i));
      }
    }
    while (!events_.empty()) {
      const Event e = events_.top();
      events_.pop();
      now_ = e.t;
      switch (e.type) {
        case EventType::kArrival:
          PDS_RETURN_IF_ERROR(Arrive(e.who));
          break;
        case EventType::kEnqueue:
          PDS_RETURN_IF_ERROR(Enqueue(e.who));
          break;
        case EventType::kStepEnd:
          PDS_RETURN_IF_ERROR(EndStep(static_cast<int>(e.who)));
          break;
        case EventType::kTransferEnd:
          PDS_RETURN_IF_ERROR(EndTransfer(e.who));
          break;
      }
    }
    // Every request ended: each block must be free again (cached prefixes count as free), and
    // the front-end's bookkeeping back to nothing.
    if (std::all_of(requests_.begin(), requests_.end(), [](const Request& r) { return r.done; })) {
      for (const Instance& inst : instances_) {
        if (inst.engine->num_sequences() != 0 ||
            inst.engine->free_blocks() != inst.config.kv_blocks) {
          return absl::InternalError(absl::StrCat("simulator: ", inst.id, " ends with ",
                                                  inst.engine->num_sequences(), " sequences and ",
                                                  inst.engine->free_blocks(), " of ",
                                                  inst.config.kv_blocks, " blocks free"));
        }
        if (inst.promised_blocks != 0 || inst.decoding != 0 || inst.decode_context != 0 ||
            inst.pending_requests != 0 || inst.pending_prompt_tokens != 0 ||
            !inst.queued_lens.empty()) {
          return absl::InternalError(absl::StrCat(
              "simulator: ", inst.id, " ends with front-end bookings left: ", inst.promised_blocks,
              " blocks promised, ", inst.decoding, " decoding, ", inst.pending_requests,
              " queued"));
        }
      }
    }
    SimResult result;
    for (Request& r : requests_) {
      if (!r.done) {  // (its later turns too: each fails the same way)
        Fail(r, "INTERNAL", "the simulation ended before the request did",
             /*end_conversation=*/false);
      }
      if (r.skipped) {
        ++result.requests_not_sent;
        continue;
      }
      result.duration_s = std::max(result.duration_s, r.record.end_s);
      result.records.push_back(std::move(r.record));
    }
    for (Instance& inst : instances_) {
      inst.stats.preemptions = inst.engine->preemptions();
      result.instances.push_back(inst.stats);
    }
    result.offers_refused = offers_refused_;
    result.metrics = client::ComputeMetrics(result.records, result.duration_s, config_.slo);
    return result;
  }

 private:
  void Push(double t, EventType type, int64_t who) { events_.push({t, next_event_++, type, who}); }

  // A failed turn ends its conversation (`end_conversation`): its later turns are not sent.
  void Fail(Request& r, const std::string& code, const std::string& message,
            bool end_conversation = true) {
    r.record.ok = false;
    r.record.error_code = code;
    r.record.error_message = message;
    r.record.end_s = now_;
    r.done = true;
    ForgetTokens(r);
    if (end_conversation) Skip(r.record.index);
  }
  // An ended request's tokens and hashes are not needed again (a long run keeps only those of
  // the requests in flight).
  static void ForgetTokens(Request& r) {
    std::vector<int32_t>().swap(r.prompt);
    std::vector<uint64_t>().swap(r.prompt_hashes);
    std::vector<uint64_t>().swap(r.decode_prompt_hashes);
  }
  // A failed turn ends its conversation: the later turns are never sent (no records).
  void Skip(int64_t i) {
    for (int64_t f : followers_[i]) {
      requests_[f].done = requests_[f].skipped = true;
      Skip(f);
    }
  }

  // `hashes`: the prompt's block hashes for prefill or colocated instances and for decode ones
  // (by their block sizes).
  std::vector<InstanceLoad> Loads(const std::vector<uint64_t>& hashes = {},
                                  const std::vector<uint64_t>& decode_hashes = {}) const {
    std::vector<InstanceLoad> loads;
    loads.reserve(instances_.size());
    for (const Instance& inst : instances_) {
      InstanceLoad l;
      l.id = inst.id;
      l.role = inst.role;
      l.healthy = true;
      l.queued_prompt_tokens = inst.pending_prompt_tokens;
      l.queued_requests = inst.pending_requests;
      l.running_requests = std::max(inst.decoding, inst.engine->num_running());
      l.kv_blocks_total = inst.config.kv_blocks;
      l.kv_blocks_free = inst.engine->free_blocks() - inst.promised_blocks;
      l.block_size = inst.config.block_size;
      for (const auto& [seq, len] : inst.queued_lens) l.queued_prompt_lens.push_back(len);
      l.decode_context_tokens = inst.decode_context;
      l.max_batch_tokens = inst.config.max_batch_tokens;
      l.cached_prefix_tokens =
          inst.prefix_index.Match(inst.role == InstanceRole::kDecode ? decode_hashes : hashes) *
          l.block_size;
      loads.push_back(std::move(l));
    }
    return loads;
  }

  absl::Status Arrive(int64_t i) {
    Request& r = requests_[i];
    client::RequestRecord& rec = r.record;
    rec.index = i;
    rec.prompt_tokens = r.spec.prompt_len;
    rec.expected_output_tokens = r.spec.output_len;
    rec.scheduled_s = rec.send_s = now_;
    rec.has_timeline = true;
    rec.timeline.arrival_us = rec.timeline.queued_us = TimelineUs(now_);

    DispatchRequest dr;
    dr.prompt_tokens = r.spec.prompt_len;
    dr.max_tokens = r.spec.output_len;
    if (config_.send_slo && config_.slo.ttft_ms >= 0) dr.ttft_slo_ms = config_.slo.ttft_ms;
    if (config_.send_slo && config_.slo.tpot_ms >= 0) dr.tpot_slo_ms = config_.slo.tpot_ms;
    // The prompt's tokens, and the front-end's block hashes of them for prefill (or colocated)
    // and decode instances (instances of one role share a block size).
    r.prompt = SimTokens(r.spec, i, r.spec.prompt_len);
    std::vector<uint64_t>& hashes = r.prompt_hashes;
    std::vector<uint64_t>& decode_hashes = r.decode_prompt_hashes;
    if (config_.prefix_caching) {
      const int32_t bs =
          (config_.num_colocated > 0 ? config_.colocated : config_.prefill).block_size;
      engine::BlockAllocator::ExtendPrefixHashes(r.prompt, bs, hashes);
      if (config_.num_colocated == 0) {
        if (config_.decode.block_size == bs) {
          decode_hashes = hashes;
        } else {
          engine::BlockAllocator::ExtendPrefixHashes(r.prompt, config_.decode.block_size,
                                                     decode_hashes);
        }
      }
    }
    const std::vector<InstanceLoad> loads = Loads(hashes, decode_hashes);
    // As the front-end: the policy, then conditional disaggregation.
    absl::StatusOr<Placement> placed = PlaceWithLocalPrefill(
        dispatch_, dr, loads, config_.local_prefill_max_tokens, config_.dispatch_slo, &model_);
    if (!placed.ok()) {
      Fail(r, absl::StatusCodeToString(placed.status().code()),
           std::string(placed.status().message()));
      return absl::OkStatus();
    }
    auto find = [&](const std::string& id) -> int {
      auto it = index_.find(id);
      return it == index_.end() ? -1 : it->second;
    };
    r.prefill = find(placed->prefill);
    r.decode = placed->decode.empty() ? -1 : find(placed->decode);
    if (r.prefill < 0 || (!placed->decode.empty() && r.decode < 0)) {
      return absl::InternalError(absl::StrCat("dispatch policy '", dispatch_.name(),
                                              "' placed a request on an unknown instance"));
    }
    Instance& p = instances_[r.prefill];
    rec.timeline.prefill_instance = p.id;
    if (r.decode >= 0) rec.timeline.decode_instance = instances_[r.decode].id;
    if (!p.engine->Fits(r.spec.prompt_len) ||
        (r.decode >= 0 && !instances_[r.decode].engine->Fits(r.spec.prompt_len))) {
      Fail(r, "RESOURCE_EXHAUSTED",
           absl::StrCat("prompt of ", r.spec.prompt_len, " tokens needs more KV blocks than ",
                        "an instance holds"));
      return absl::OkStatus();
    }
    r.prefill_tokens = UncachedPromptTokens(dr, loads[r.prefill]);
    p.prefix_index.Insert(p.role == InstanceRole::kDecode ? decode_hashes : hashes);
    p.pending_prompt_tokens += r.prefill_tokens;
    ++p.pending_requests;
    r.queue_seq = next_queue_seq_++;
    p.queued_lens[r.queue_seq] = r.prefill_tokens;
    r.prefill_pending = true;
    r.context_estimate = r.spec.prompt_len + r.spec.output_len / 2;
    // The front-end's booking on the instance that decodes it: the prompt's blocks and one to
    // grow (a held prefix too), until the hand-off is in or, prefilled there, its first token.
    if (r.decode >= 0 || placed->local_prefill) {
      r.promised_on = r.decode >= 0 ? r.decode : r.prefill;
      Instance& d = instances_[r.promised_on];
      r.promised = BlocksFor(int64_t{r.spec.prompt_len} + 1, d.config.block_size);
      d.promised_blocks += r.promised;
      if (r.decode >= 0) d.prefix_index.Insert(decode_hashes);
    }
    r.best_effort = placed->best_effort;
    if (config_.dispatch_latency_s > 0) {
      Push(now_ + config_.dispatch_latency_s, EventType::kEnqueue, i);
      return absl::OkStatus();
    }
    return Enqueue(i);
  }

  // The request reaches its prefill (or colocated) instance's queue: dispatch_latency_s
  // after its arrival, when the front-end booked it.
  absl::Status Enqueue(int64_t i) {
    Request& r = requests_[i];
    r.record.timeline.queued_us = TimelineUs(now_);
    std::optional<double> deadline;
    if (config_.slo.ttft_ms >= 0) deadline = r.spec.arrival_s + config_.slo.ttft_ms / 1000.0;
    instances_[r.prefill].engine->Add(i, r.spec, r.prompt, r.decode >= 0, deadline).best_effort =
        r.best_effort;
    return Kick(r.prefill);
  }

  // Starts the instance's next step if it is idle and has a batch to run.
  absl::Status Kick(int k) {
    Instance& inst = instances_[k];
    if (inst.busy) return absl::OkStatus();
    PDS_ASSIGN_OR_RETURN(inst.batch, inst.engine->FormBatch());
    if (inst.batch.empty()) return absl::OkStatus();
    std::vector<std::pair<int32_t, int32_t>> prefill;
    int32_t decodes = 0;
    int64_t context = 0;
    for (const StepItem& item : inst.batch) {
      const Seq& s = *item.seq;
      if (item.chunk == 1 && s.num_generated > 0 && s.num_computed + 1 == s.len()) {
        ++decodes;
        context += s.num_computed + 1;
      } else {
        prefill.emplace_back(s.num_computed, item.chunk);
      }
      ServerTimelineStart(s);
    }
    inst.step_s =
        PrefillChunkSeconds(model_, prefill) + DecodeStepSeconds(model_, decodes, context);
    if (config_.step_time_sigma > 0) {
      inst.step_s *= std::exp(config_.step_time_sigma * NormalDraw(config_.noise_seed, steps_++));
    }
    inst.busy = true;
    inst.stats.max_running = std::max(inst.stats.max_running, inst.engine->num_running());
    Push(now_ + inst.step_s, EventType::kStepEnd, k);
    return absl::OkStatus();
  }

  void ServerTimelineStart(const Seq& s) {
    client::ServerTimeline& t = requests_[s.req].record.timeline;
    if (t.prefill_start_us == 0) t.prefill_start_us = TimelineUs(now_);
  }

  absl::Status EndStep(int k) {
    Instance& inst = instances_[k];
    inst.busy = false;
    ++inst.stats.steps;
    inst.stats.busy_s += inst.step_s;
    std::vector<int64_t> finished, handoffs;
    for (const StepItem& item : inst.batch) {
      Seq& s = *item.seq;
      inst.engine->Computed(s, item.chunk);
      if (s.num_computed < s.len()) continue;  // mid-prefill
      inst.engine->AppendToken(s);
      s.num_generated += 1;
      if (s.num_generated == 1) requests_[s.req].record.cached_prompt_tokens = s.prompt_cached;
      Token(s.req);
      const bool finish = s.num_generated >= s.max_tokens ||
                          BlocksFor(s.len(), inst.config.block_size) > inst.config.kv_blocks;
      if (finish) {
        finished.push_back(s.req);
      } else if (s.hold_after_prefill) {
        s.held = true;
        s.admitted = false;
        handoffs.push_back(s.req);
      }
    }
    inst.batch.clear();
    for (int64_t req : finished) {
      inst.engine->Release(req);
      Finish(requests_[req]);
    }
    for (int64_t req : handoffs) PDS_RETURN_IF_ERROR(Offer(req, inst.step_s));
    PDS_RETURN_IF_ERROR(Kick(k));
    if (inst.role != InstanceRole::kPrefill) PDS_RETURN_IF_ERROR(RetryOffers(k));
    return absl::OkStatus();
  }

  // A token reaches the client now.
  void Token(int64_t req) {
    Request& r = requests_[req];
    client::RequestRecord& rec = r.record;
    const bool first = rec.chunk_times_s.empty();
    rec.chunk_times_s.push_back(now_ + config_.relay_latency_s);
    rec.chunk_tokens.push_back(1);
    if (!first) return;
    rec.timeline.prefill_end_us = TimelineUs(now_);
    rec.timeline.first_token_us = TimelineUs(now_ + config_.relay_latency_s);
    // The front-end's prefill_done.
    Instance& p = instances_[r.prefill];
    if (r.prefill_pending) {
      p.pending_prompt_tokens -= r.prefill_tokens;
      --p.pending_requests;
      p.queued_lens.erase(r.queue_seq);
      r.prefill_pending = false;
      if (r.decode < 0) {
        Unpromise(r);
        ++p.decoding;
        p.decode_context += r.context_estimate;
        rec.timeline.decode_start_us = TimelineUs(now_);
      }
    }
  }

  void Finish(Request& r) {
    r.record.ok = true;
    r.record.end_s = now_ + config_.relay_latency_s;
    r.record.timeline.finish_us = TimelineUs(now_);
    r.done = true;
    const int64_t i = r.record.index;
    if (config_.prefix_caching) {
      // The front-end: the decoding instance now also caches the answer it relayed (all but
      // its last token), which a conversation's next turn starts with.
      Instance& decoder = instances_[r.decode >= 0 ? r.decode : r.prefill];
      const int64_t answer = static_cast<int64_t>(r.record.chunk_tokens.size());
      std::vector<int32_t> context = r.prompt;
      for (int64_t p = r.spec.prompt_len; p < r.spec.prompt_len + answer - 1; ++p) {
        context.push_back(SimToken(r.spec, i, p));
      }
      std::vector<uint64_t> hashes =
          decoder.role == InstanceRole::kDecode ? r.decode_prompt_hashes : r.prompt_hashes;
      if (answer > 0) {
        engine::BlockAllocator::ExtendPrefixHashes(context, decoder.config.block_size, hashes);
      }
      decoder.prefix_index.Insert(hashes);
    }
    ForgetTokens(r);
    // The conversation's next turn is due after the think time.
    for (int64_t f : followers_[i]) {
      requests_[f].spec.arrival_s = r.record.end_s + requests_[f].spec.think_s;
      Push(requests_[f].spec.arrival_s, EventType::kArrival, f);
    }
    if (r.decode < 0) {
      Instance& p = instances_[r.prefill];
      --p.decoding;
      p.decode_context -= r.context_estimate;
      return;
    }
    Instance& d = instances_[r.decode];
    if (r.promised_on >= 0) {
      Unpromise(r);
    } else {
      --d.decoding;
      d.decode_context -= r.context_estimate;
    }
  }
  void Unpromise(Request& r) {
    if (r.promised_on < 0) return;
    instances_[r.promised_on].promised_blocks -= r.promised;
    r.promised_on = -1;
  }

  // At the end of the prefill step (of `step_s` seconds) that completed the prompt.
  absl::Status Offer(int64_t req, double step_s) {
    Request& r = requests_[req];
    const double overlap_s = config_.layered_handoff ? step_s : 0;
    if (!r.offered) {
      r.offered = true;
      r.record.timeline.kv_transfer_start_us = TimelineUs(now_ - overlap_s);
    }
    Instance& d = instances_[r.decode];
    if (TryImport(req, overlap_s)) return absl::OkStatus();
    ++offers_refused_;
    d.offers.push_back(req);
    return absl::OkStatus();
  }

  // `overlap_s`: how long the layers have been moving already (layer by layer during the
  // prefill step); 0 after a wait for room.
  bool TryImport(int64_t req, double overlap_s = 0) {
    Request& r = requests_[req];
    Instance& d = instances_[r.decode];
    const int32_t held = d.engine->ReserveImport(req, r.spec, r.prompt);
    if (held < 0) return false;
    // The decode instance's cached blocks are not moved.
    const double bytes = static_cast<double>(config_.kv_shape.BytesPerToken()) *
                         (r.spec.prompt_len - int64_t{held} * d.config.block_size);
    const double move_s = bytes / config_.transfer_bandwidth;
    const double left_s =
        overlap_s > 0
            ? std::max(move_s / std::max(1, config_.kv_shape.num_layers), move_s - overlap_s)
            : move_s;
    Push(now_ + config_.transfer_latency_s + left_s, EventType::kTransferEnd, req);
    return true;
  }

  absl::Status RetryOffers(int k) {
    Instance& d = instances_[k];
    for (auto it = d.offers.begin(); it != d.offers.end();) {
      if (TryImport(*it)) {
        it = d.offers.erase(it);
      } else {
        ++it;
      }
    }
    return absl::OkStatus();
  }

  absl::Status EndTransfer(int64_t req) {
    Request& r = requests_[req];
    r.record.timeline.kv_transfer_end_us = r.record.timeline.decode_start_us = TimelineUs(now_);
    instances_[r.prefill].engine->Release(req);
    Instance& d = instances_[r.decode];
    d.engine->ActivateImport(req);
    // The front-end's decode_started.
    Unpromise(r);
    ++d.decoding;
    d.decode_context += r.context_estimate;
    PDS_RETURN_IF_ERROR(Kick(r.prefill));
    return Kick(r.decode);
  }

  const SimConfig& config_;
  const LatencyModel& model_;
  DispatchPolicy& dispatch_;
  std::vector<Instance> instances_;
  std::map<std::string, int> index_;
  std::vector<Request> requests_;
  std::vector<std::vector<int64_t>> followers_;  // by request: the turns due after it ends
  std::priority_queue<Event, std::vector<Event>, std::greater<Event>> events_;
  uint64_t next_event_ = 0;
  uint64_t next_queue_seq_ = 0;
  uint64_t steps_ = 0;  // steps started, the index of each step's noise draw
  int64_t offers_refused_ = 0;
  double now_ = 0;
};

absl::Status ValidateInstance(const SimInstanceConfig& c, absl::string_view role) {
  if (c.max_batch_tokens <= 0 || c.max_running <= 0 || c.kv_blocks <= 0 || c.block_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "simulator: ", role,
        " instances need positive max_batch_tokens, max_running, kv_blocks and block_size"));
  }
  return absl::OkStatus();
}

absl::Status ValidateConfig(const SimConfig& c) {
  if (!(c.step_time_sigma >= 0 && c.step_time_sigma <= 2)) {
    return absl::InvalidArgumentError("simulator: step_time_sigma must be in [0, 2]");
  }
  if (!(c.dispatch_latency_s >= 0 && c.dispatch_latency_s < 3600) ||
      !(c.relay_latency_s >= 0 && c.relay_latency_s < 3600)) {
    return absl::InvalidArgumentError(
        "simulator: dispatch_latency_s and relay_latency_s must be in [0, 3600)");
  }
  if (c.num_colocated < 0) {
    return absl::InvalidArgumentError("simulator: num_colocated must be >= 0");
  }
  if (c.local_prefill_max_tokens < 0) {
    return absl::InvalidArgumentError("simulator: local_prefill_max_tokens must be >= 0");
  }
  if (c.num_colocated > 0) return ValidateInstance(c.colocated, "colocated");
  if (c.num_prefill < 1 || c.num_decode < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "simulator: a disaggregated cluster needs at least one prefill and one decode instance "
        "(got ",
        c.num_prefill, " and ", c.num_decode, ")"));
  }
  PDS_RETURN_IF_ERROR(ValidateInstance(c.prefill, "prefill"));
  PDS_RETURN_IF_ERROR(ValidateInstance(c.decode, "decode"));
  if (!(c.transfer_bandwidth > 0) || c.transfer_latency_s < 0) {
    return absl::InvalidArgumentError(
        "simulator: transfer_bandwidth must be positive and transfer_latency_s >= 0");
  }
  if (c.kv_shape.BytesPerToken() <= 0) {
    return absl::InvalidArgumentError("simulator: the KV shape must give positive bytes/token");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<SimRequest>> MakeSimLengths(const client::DatasetOptions& dataset) {
  PDS_ASSIGN_OR_RETURN(std::vector<client::RequestSpec> specs, client::BuildDataset(dataset));
  std::vector<SimRequest> out;
  out.reserve(specs.size());
  for (const client::RequestSpec& s : specs) {
    SimRequest r;
    r.arrival_s = std::max(0.0, s.arrival_s);
    r.prompt_len = static_cast<int32_t>(std::max<int64_t>(1, s.prompt_len));
    r.output_len = static_cast<int32_t>(std::max<int64_t>(1, s.output_len));
    if (s.prefix_group >= 0) {
      r.prefix_group = s.prefix_group;
      r.prefix_len = static_cast<int32_t>(dataset.shared_prefix_len);
    }
    out.push_back(r);
  }
  return out;
}

std::vector<SimRequest> TileWorkload(const std::vector<SimRequest>& lengths,
                                     const std::vector<double>& start_times, int32_t repeat) {
  const int64_t per = static_cast<int64_t>(lengths.size());
  int64_t streams = 0;
  for (const SimRequest& r : lengths) streams = std::max(streams, r.stream + 1);
  std::vector<SimRequest> out;
  out.reserve(static_cast<size_t>(per * std::max(0, repeat)));
  size_t next = 0;
  for (int32_t k = 0; k < repeat; ++k) {
    for (const SimRequest& r : lengths) {
      SimRequest copy = r;
      if (copy.stream >= 0) copy.stream += k * streams;
      if (r.after >= 0) {
        copy.after += k * per;
      } else if (next < start_times.size()) {
        copy.arrival_s = start_times[next++];
      } else {
        return out;  // no start time left
      }
      out.push_back(copy);
    }
  }
  return out;
}

absl::StatusOr<std::vector<SimRequest>> MakeSimConversations(const client::DatasetOptions& dataset,
                                                             int32_t turns, double think_s) {
  if (dataset.kind == client::DatasetKind::kShareGpt ||
      dataset.kind == client::DatasetKind::kTrace || dataset.text_prompts ||
      dataset.max_model_len <= 0 || turns < 2 || turns > 1000 ||
      !(think_s >= 0 && think_s <= 3600)) {
    return absl::InvalidArgumentError(
        "conversations need a generated dataset sent as token ids, a max_model_len, 2..1000 "
        "turns and a think time in [0, 3600] s");
  }
  if (dataset.num_requests < 1 || dataset.num_requests > kMaxConversationTurns / turns) {
    return absl::InvalidArgumentError(absl::StrCat("conversations x turns must be in [1, ",
                                                   kMaxConversationTurns, "], got ",
                                                   dataset.num_requests, " x ", turns));
  }
  client::DatasetOptions d = dataset;
  d.num_requests = dataset.num_requests * turns;
  PDS_ASSIGN_OR_RETURN(std::vector<SimRequest> draws, MakeSimLengths(d));
  std::vector<SimRequest> out;
  const int64_t skip = std::max<int64_t>(0, dataset.shared_prefix_len);
  for (int64_t c = 0; c < dataset.num_requests; ++c) {
    int64_t previous = -1;  // the index in `out` of the conversation's last turn
    for (int32_t t = 0; t < turns; ++t) {
      const SimRequest& draw = draws[static_cast<size_t>(c * turns + t)];
      SimRequest r = draw;
      r.arrival_s = 0;
      r.stream = c;
      if (t > 0) {
        const SimRequest& last = out[static_cast<size_t>(previous)];
        const int64_t prompt = int64_t{last.prompt_len} + last.output_len + draw.prompt_len -
                               std::min<int64_t>(draw.prompt_len, skip);
        if (prompt > INT32_MAX / 2) break;
        r.prompt_len = static_cast<int32_t>(prompt);
        r.prefix_group = last.prefix_group;
        r.prefix_len = last.prefix_len;
        r.after = previous;
        r.think_s = think_s;
      }
      if (int64_t{r.prompt_len} + r.output_len > dataset.max_model_len) break;
      previous = static_cast<int64_t>(out.size());
      out.push_back(r);
    }
  }
  return out;
}

absl::StatusOr<std::vector<SimRequest>> MakeSimWorkload(const client::DatasetOptions& dataset,
                                                        const client::ArrivalOptions& arrivals) {
  if (dataset.kind == client::DatasetKind::kTrace) return MakeSimLengths(dataset);
  // As pdbench: the arrivals first (count = num_requests), then that many length draws.
  PDS_ASSIGN_OR_RETURN(std::vector<double> times,
                       client::ArrivalTimes(arrivals, dataset.num_requests));
  client::DatasetOptions d = dataset;
  d.num_requests = static_cast<int64_t>(times.size());
  PDS_ASSIGN_OR_RETURN(std::vector<SimRequest> out, MakeSimLengths(d));
  for (size_t i = 0; i < out.size() && i < times.size(); ++i) out[i].arrival_s = times[i];
  return out;
}

absl::StatusOr<SimResult> Simulate(const SimConfig& config, const LatencyModel& model,
                                   const std::vector<SimRequest>& requests,
                                   DispatchPolicy* policy) {
  PDS_RETURN_IF_ERROR(ValidateConfig(config));
  for (size_t i = 0; i < requests.size(); ++i) {
    const SimRequest& r = requests[i];
    if (r.prompt_len < 1 || r.output_len < 1 || !(r.arrival_s >= 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "simulator: request ", i, " needs prompt_len >= 1, output_len >= 1, arrival_s >= 0"));
    }
    if (r.after < -1 || r.after >= static_cast<int64_t>(i) ||
        !(r.think_s >= 0 && r.think_s < 1e6)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "simulator: request ", i, " must follow an earlier request (after = ", r.after,
          ") with a think time in [0, 1e6) s"));
    }
  }
  PDS_ASSIGN_OR_RETURN(std::unique_ptr<BatchPolicy> batch, MakeBatchPolicy(config.batch_policy));
  std::unique_ptr<DispatchPolicy> owned;
  if (policy == nullptr) {
    PDS_ASSIGN_OR_RETURN(owned,
                         MakeDispatchPolicy(config.dispatch_policy, &model, config.dispatch_slo));
    policy = owned.get();
  }
  Cluster cluster(config, model, *batch, *policy);
  return cluster.Run(requests);
}

}  // namespace pds::scheduler
