// A single-instance generation engine: continuous batching over a paged KV cache, with
// chunked prefill under a token budget and recompute-preemption when blocks run out. It runs
// both phases; the disaggregated workers build on the same pieces.
#pragma once

#include <algorithm>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/kv_cache/kv_cache.h"
#include "engine/model/transformer.h"
#include "engine/runtime/json_constraint.h"
#include "engine/runtime/kv_handoff.h"
#include "engine/runtime/sampling_params.h"
#include "engine/runtime/speculative.h"
#include "scheduler/batch_policy.h"

namespace pds::engine {

struct EngineOptions {
  int32_t block_size = 16;
  int32_t num_blocks = 0;                // 0: derived from kv_cache_bytes
  size_t kv_cache_bytes = 256ull << 20;  // K and V of all layers
  int32_t max_batch_tokens = 2048;       // token budget of one step (prefill chunks + decodes)
  int32_t max_running = 64;              // sequences in one step
  // Which sequences form a step and their chunks (scheduler/batch_policy.h); null: FCFS.
  std::shared_ptr<const scheduler::BatchPolicy> batch_policy;
  // Automatic prefix caching: a sequence starts from the cached K/V of the longest prefix of
  // its tokens, in whole blocks, that an earlier sequence computed (while those blocks have
  // not been reused), and computes only the rest.
  bool prefix_caching = true;
  // Speculative decoding by prompt lookup (engine/runtime/speculative.h): drafts use only the
  // token budget and the free blocks a step leaves (less one block of growth per sequence in
  // the step), never preempt, and go to decoding sequences without structured output or
  // return_logits (logprobs come from the sent tokens' rows; logits processing is applied to
  // each draft row on the host, the drafts before it counted as tokens). Of the drafts
  // proposed, a step carries those that raise its expected tokens per second, by each
  // sequence's record of kept drafts and a model of the step's time (ChooseDrafts).
  SpeculativeOptions speculative;
  // The most logits one projection of chosen rows may produce (prompt logprobs, draft rows):
  // the host and device buffers for them grow to this. At least one row's.
  int64_t max_logits_per_call = int64_t{1} << 24;
};

struct GenerateRequest {
  std::string id;
  std::vector<int32_t> prompt;
  SamplingParams params;
  bool return_logits = false;  // debugging and tests: the full logits row of every token
  // Prefill workers: when the first token is sampled and the request goes on, keep the
  // sequence and its KV blocks (TokenOutput::kv_held) for the hand-off instead of decoding.
  bool hold_kv_after_prefill = false;
  // When the first token is due (Unix seconds; from the request's TTFT target). Deadline-
  // aware batch policies (EDF) order waiting prefills by it.
  std::optional<double> ttft_deadline_s;
  // Admitted although predicted to miss its SLO: the batch policy plans it after every other
  // waiting request (scheduler::BatchCandidate::best_effort).
  bool best_effort = false;
  // Its TPOT target (seconds): speculative decoding (DraftChoice::kPaying) carries no draft
  // that would push the predicted time of a step it decodes in past it (set_draft_step_cap's
  // cap, per request).
  std::optional<double> tpot_target_s;
};

struct TokenLogprobs {
  float logprob = 0.0f;                        // of the generated token
  std::vector<std::pair<int32_t, float>> top;  // (id, logprob), highest first
  int32_t rank = 0;  // prompt logprobs: the token's rank in its row (1: the likeliest); 0: none
};

// One generated token of one request, as produced by Step().
struct TokenOutput {
  std::string request_id;
  int32_t token = -1;
  std::optional<TokenLogprobs> logprobs;
  std::vector<float> logits;                  // when return_logits
  FinishReason finish = FinishReason::kNone;  // set on the request's last token
  // hold_kv_after_prefill: the sequence and its blocks now wait for Cancel() (the hand-off).
  // Also set, with `finish`, for a sequence whose KV was handed off during the step
  // (LlmEngine::set_handoff_hook) and that ended with its first token.
  bool kv_held = false;
  // On a request's first token: how many of its prompt tokens came from the prefix cache
  // instead of being computed (the usage figure OpenAI's API calls cached_tokens).
  int32_t cached_prompt_tokens = 0;
  // On a request's first token, with params.prompt_logprobs >= 0: entry i for prompt token
  // i + 1 (the first has none), from the logits of the position before it.
  std::vector<TokenLogprobs> prompt_logprobs;
};

// A held (prefilled) sequence's KV: its blocks and how many positions they hold.
struct HeldKv {
  std::vector<int32_t> blocks;
  int32_t num_tokens = 0;
};

// Where an import's K/V go (LlmEngine::ReserveImport).
struct ImportReservation {
  // The leading blocks of the prompt (block-table order) that the cache already holds: the
  // sender need not send them.
  int32_t held_blocks = 0;
  // The blocks to write, in block-table order: the prompt's blocks from `held_blocks` on.
  std::vector<int32_t> blocks;
};

struct GenerateResult {
  std::string request_id;
  std::vector<int32_t> token_ids;
  std::vector<TokenLogprobs> logprobs;
  std::vector<std::vector<float>> logits;
  std::vector<TokenLogprobs> prompt_logprobs;  // with params.prompt_logprobs >= 0
  FinishReason finish = FinishReason::kNone;
};

class LlmEngine {
 public:
  // `model` must outlive the engine.
  static absl::StatusOr<std::unique_ptr<LlmEngine>> Create(Transformer& model,
                                                           const EngineOptions& options);

  // Queues a request. INVALID_ARGUMENT for a bad prompt or parameters, ALREADY_EXISTS for a
  // duplicate id, RESOURCE_EXHAUSTED when the prompt can never fit in the KV cache.
  absl::Status AddRequest(GenerateRequest request);
  // Cancels a queued or running request and frees its blocks; NOT_FOUND if unknown.
  absl::Status Cancel(const std::string& id);
  bool HasWork() const { return !sequences_.empty(); }
  // Whether Step() has anything to run (held and importing sequences do not run).
  bool HasRunnable() const;
  // OK when a prompt of `prompt_len` tokens and its first decode step fit in the whole KV
  // cache; else RESOURCE_EXHAUSTED naming the sizes (no wait changes that). Reads only sizes
  // fixed at creation: callable from any thread.
  absl::Status CheckFitsCache(int64_t prompt_len) const;
  // Steps in which a running sequence could not grow because held or importing sequences
  // owned the free blocks, and waited for them (the others in the step ran).
  int64_t num_block_waits() const { return num_block_waits_; }

  // Disaggregation. A prefill worker reads a held sequence's blocks, sends them and then
  // calls Cancel() to free them. A decode worker reserves blocks for a sequence whose first
  // `num_tokens` positions arrive from elsewhere (RESOURCE_EXHAUSTED while the cache has no
  // room for them plus one block of growth per running sequence, or while a preempted
  // sequence waits to run again), has them written into
  // those blocks, then activates it with the token sampled after them, and it decodes on.
  // With prefix caching, the leading whole blocks of the prompt that the cache already holds
  // (an earlier import's, registered at its activation) are shared, never written: only the
  // blocks after them are reserved, and the transfer moves only those (at least the last
  // block, which holds the prompt's last position).
  absl::StatusOr<HeldKv> GetHeld(const std::string& id) const;
  absl::StatusOr<ImportReservation> ReserveImport(GenerateRequest request, int32_t num_tokens);
  absl::Status ActivateImport(const std::string& id, int32_t next_token);

  // Layer-by-layer hand-off (prefill workers). With a hook set, Step() calls it after planning
  // a batch and before the batch's forward, with a KvHandoff for each hold_kv_after_prefill
  // sequence whose prompt completes in the step and that may go on past its first token (not
  // limited to one token by max_tokens, the context or the cache): the forward then reports
  // each layer's K/V to it, and the step's end resolves its next token, or an error when the
  // sequence ended with its first token or the step failed. Such a sequence keeps its blocks
  // until Cancel() (its output has kv_held set, whether or not it ended; after a failed step it
  // is held too, never run again), so the transfer reading them can finish first. The hook
  // runs on Step's thread and must not call into the engine.
  using HandoffHook = std::function<void(std::vector<std::shared_ptr<KvHandoff>>)>;
  void set_handoff_hook(HandoffHook hook) { handoff_hook_ = std::move(hook); }
  // The model's tokens as bytes, which requests with a json_schema need (without it they are
  // refused); TokenVocabulary::FromTokenizer with the model's EOS ids as stops.
  void set_token_vocabulary(std::shared_ptr<const TokenVocabulary> vocab) {
    vocab_ = std::move(vocab);
  }

  // (request id, new tokens computed) of the sequences in the last Step's batch.
  const std::vector<std::pair<std::string, int32_t>>& last_batch() const { return last_batch_; }
  // When the last step's forward (with its prompt logprobs and structured-output masks) ended,
  // before its tokens were drawn again and handed on (a hand-off's first token may reach the
  // decode side before Step returns).
  absl::Time last_forward_end() const { return last_forward_end_; }
  // Runs one forward step over the next batch and returns the tokens it produced.
  absl::StatusOr<std::vector<TokenOutput>> Step();
  // Adds the requests, runs until all are done, returns results in request order.
  absl::StatusOr<std::vector<GenerateResult>> Generate(std::vector<GenerateRequest> requests);

  const KvCache& cache() const { return cache_; }
  int32_t num_free_blocks() const { return cache_.allocator().num_free(); }
  size_t num_waiting() const;              // queued, not yet started (or preempted)
  size_t num_running() const;              // in the running batch
  size_t num_held() const;                 // held after prefill or reserved for an import
  int64_t running_context_tokens() const;  // tokens of the sequences in the running batch
  // Caps the sequences of one step below EngineOptions::max_running (>= 1), e.g. so that the
  // predicted decode step stays within a TPOT target.
  void set_max_running(int32_t n) { max_running_ = std::max(1, std::min(n, options_.max_running)); }
  int32_t max_running() const { return max_running_; }
  int64_t num_waiting_tokens() const;  // prompt tokens still to compute of waiting sequences
  // Calls `fn` with each waiting sequence's id and prompt tokens still to compute (those
  // num_waiting and num_waiting_tokens count).
  void ForEachWaiting(const std::function<void(const std::string& id, int64_t tokens)>& fn) const;
  // The same for every sequence whose first token is not computed yet: waiting, or in its
  // prefill (chunks of it computed).
  void ForEachPrefilling(
      const std::function<void(const std::string& id, int64_t tokens)>& fn) const;
  int64_t num_preemptions() const { return num_preemptions_; }
  // Prefix caching: tokens of sequences started (or restarted after a preemption) and how many
  // of them came from the cache instead of being computed.
  int64_t num_prefix_query_tokens() const { return prefix_query_tokens_; }
  int64_t num_prefix_hit_tokens() const { return prefix_hit_tokens_; }
  // Speculative decoding: drafts proposed by the lookup, drafts computed (those the steps
  // carried: DraftChoice), and how many of them were kept.
  int64_t num_proposed_draft_tokens() const { return proposed_draft_tokens_; }
  int64_t num_draft_tokens() const { return draft_tokens_; }
  int64_t num_accepted_draft_tokens() const { return accepted_draft_tokens_; }
  // Speculative decoding (DraftChoice::kPaying): no draft that would push a step's predicted
  // time past `seconds` (0: no cap), e.g. a TPOT target; it applies once the cost of a row is
  // known (given, or measured).
  void set_draft_step_cap(double seconds) { draft_step_cap_ = std::max(0.0, seconds); }
  // The engine's own model of its decode steps' time (SpeculativeOptions::step_cost unset).
  const StepTimeModel& step_time_model() const { return step_model_; }

 private:
  struct Sequence {
    GenerateRequest request;
    std::vector<int32_t> tokens;  // prompt + generated
    int32_t num_generated = 0;
    int32_t num_computed = 0;  // tokens whose K/V are in the cache
    BlockTable table;
    std::unique_ptr<Sampler> sampler;
    uint64_t order = 0;  // admission order, for FCFS and preemption
    bool admitted = false;
    bool held = false;                   // hold_kv_after_prefill, prefilled, waiting for Release
    bool importing = false;              // blocks reserved, K/V arriving from elsewhere
    std::shared_ptr<KvHandoff> handoff;  // its KV leaves during the step completing its prompt
    std::vector<uint64_t> block_hashes;  // prefix caching: of its whole blocks of tokens
    // Per computed whole block, the cached block holding the same tokens (its own or an equal
    // one another sequence registered first; -1 past a break), the next one's parent.
    std::vector<int32_t> cached_chain;
    int32_t prompt_cached = 0;             // prompt tokens its prefill took from the cache
    std::unique_ptr<JsonMatcher> matcher;  // a json_schema's place in the reply
    // Logits processing (SamplingParams::ProcessesLogits): the prompt's distinct tokens, and
    // the reply's tokens with their counts, of tokens[0, counted).
    absl::flat_hash_set<int32_t> prompt_tokens;
    absl::flat_hash_map<int32_t, int32_t> reply_counts;
    std::vector<TokenLogprobs> prompt_logprobs;  // computed so far (params.prompt_logprobs)
    // Speculative decoding: how often its drafts were kept (ChooseDrafts weighs them by it).
    DraftAcceptance acceptance;
    NgramIndex ngrams;  // of its tokens (drafts never: they leave before the next step)
    size_t counted = 0;
  };
  // Applies the request's logits processing to its row (SamplingParams' order); `allowed`:
  // the reply's constraint, where it has one (min_p counts from its likeliest allowed token).
  // `generated`: the tokens of the reply before the row's (min_tokens).
  void ProcessLogits(Sequence& seq, float* row, const JsonMatcher::Bits* allowed,
                     int32_t generated);
  // Speculative decoding: ProcessLogits on a draft row, with `drafts` (the chunk's drafts
  // before the row) counted as reply tokens, then uncounted again.
  void ProcessDraftRow(Sequence& seq, float* row, std::span<const int32_t> drafts);
  // After the step's forward: the prompt logprobs of the positions [start, start + chunk) of
  // `seq` that precede a prompt token, from the batch's rows from `first_row` on.
  absl::Status PromptLogprobs(Sequence& seq, int32_t start, int32_t chunk, int64_t first_row);
  absl::Status ValidateRequest(GenerateRequest& request) const;
  // The matcher of a request's json_schema (null without one); the schema compiled once.
  absl::StatusOr<std::unique_ptr<JsonMatcher>> MatcherFor(const GenerateRequest& request);
  // A constrained row: masks the logits to the `allowed` tokens (JsonMatcher::ComputeAllowed),
  // draws again from them by the row's rule, and moves the matcher past the token. False when
  // no token may follow.
  bool Constrain(Sequence& seq, const JsonMatcher::Bits& allowed, float* row,
                 const kernels::RowSampling& rule, int32_t& token);
  // Rows of logits to ask of the model in one call (EngineOptions::max_logits_per_call).
  int32_t LogitRowsPerCall() const;
  // The same, and no more than a step samples (the backend's logits buffers already hold that
  // many): prompt logprobs, whose rows may be many.
  int32_t RowSlice() const;
  // Whether `seq`, planned to decode one token, may add drafts to it.
  bool MaySpeculate(const Sequence& seq) const;
  // Whether a held or importing sequence owns blocks (they come back when its transfer ends).
  bool BlocksAwaitRelease() const;

  LlmEngine(Transformer& model, const EngineOptions& options, KvCache cache)
      : model_(model),
        options_(options),
        cache_(std::move(cache)),
        max_running_(options.max_running) {}
  void Preempt(Sequence& seq);
  // Prefix caching. Whether `seq` would start from the cache (it holds no blocks and has
  // computed nothing), and the cached blocks it would start from (always leaving at least one
  // token to compute, whose logits give the next token).
  bool StartsFromCache(const Sequence& seq) const;
  std::vector<int32_t> CachedPrefix(Sequence& seq);
  // Registers the blocks that the sequence's positions from `from` to num_computed filled.
  void RegisterFilledBlocks(Sequence& seq, int32_t from);
  absl::Status Finish(Sequence& seq);
  FinishReason CheckFinish(const Sequence& seq, int32_t token) const;
  // kLength when a sequence that has generated `num_generated` tokens and holds `num_tokens`
  // in all has to stop there whatever its tokens are.
  FinishReason LengthLimit(const Sequence& seq, int32_t num_generated, int64_t num_tokens) const;
  // Hands off (set_handoff_hook) those of `completing` (sequences whose prompts complete in
  // the step) that may go on; returns the step's layer progress, or null when there are none.
  std::shared_ptr<LayerProgress> StartHandoffs(const std::vector<Sequence*>& completing);

  Transformer& model_;
  EngineOptions options_;
  KvCache cache_;
  std::shared_ptr<const scheduler::BatchPolicy> batch_policy_;
  std::map<std::string, std::unique_ptr<Sequence>> sequences_;
  uint64_t next_order_ = 0;
  int64_t num_preemptions_ = 0;
  int64_t num_block_waits_ = 0;
  int64_t prefix_query_tokens_ = 0;
  int64_t prefix_hit_tokens_ = 0;
  int64_t proposed_draft_tokens_ = 0;
  int64_t draft_tokens_ = 0;
  int64_t accepted_draft_tokens_ = 0;
  double draft_step_cap_ = 0;
  StepTimeModel step_model_;  // fed every step made only of decodes
  // Decode steps with drafts chosen by step_model_; every kExploreEvery-th, a step of the kind
  // it lacks (StepTimeModel::Lacks).
  static constexpr int64_t kExploreEvery = 32;
  int64_t explore_clock_ = 0;
  std::vector<float> logits_;
  // Per planned sequence of a step: how its token is chosen, whether its logits go to the
  // host, the token.
  std::vector<kernels::RowSampling> sampling_;
  // Each row's own rule (sampling_ has greedy for the rows the host draws again).
  std::vector<kernels::RowSampling> rules_;
  std::vector<uint8_t> host_rows_;
  std::vector<int32_t> tokens_;
  std::vector<std::pair<std::string, int32_t>> last_batch_;
  int32_t max_running_ = 0;  // set from options_ at creation
  HandoffHook handoff_hook_;
  std::shared_ptr<const TokenVocabulary> vocab_;
  absl::flat_hash_map<std::string, std::shared_ptr<const JsonSchema>> schemas_;
  std::vector<JsonMatcher::Bits> allowed_;  // per planned row: its mask's allowed tokens
  JsonMatcher::DrawScratch draw_scratch_;
  std::vector<float> kept_;  // ProcessLogits: the allowed tokens' logits while the row is cleared
  std::vector<float> prompt_rows_;  // PromptLogprobs: a slice of prompt rows' logits
  std::vector<float> draft_rows_;   // Transformer::SampleRows' host scratch
  std::vector<float> spec_logits_;  // logits of drafted sequences' sent tokens (logprobs)
  absl::Time last_forward_end_ = absl::InfinitePast();
};

}  // namespace pds::engine
