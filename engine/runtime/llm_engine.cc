#include "engine/runtime/llm_engine.h"

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <future>
#include <limits>
#include <numeric>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "engine/common/logging.h"
#include "engine/common/status_macros.h"
#include "kernels/sampling.h"
#include "kernels/threads.h"

namespace pds::engine {

absl::StatusOr<std::unique_ptr<LlmEngine>> LlmEngine::Create(Transformer& model,
                                                             const EngineOptions& options) {
  if (options.block_size <= 0) return absl::InvalidArgumentError("block_size must be positive");
  if (options.max_batch_tokens <= 0 || options.max_running <= 0) {
    return absl::InvalidArgumentError("max_batch_tokens and max_running must be positive");
  }
  const SpeculativeOptions& spec = options.speculative;
  if (spec.num_tokens < 0 || spec.num_tokens > 64 || spec.ngram_min < 1 ||
      spec.ngram_max < spec.ngram_min || spec.ngram_max > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("speculative decoding: drafts per step ", spec.num_tokens,
                     " must be in [0, 64], and ", "the looked-up n-gram's lengths ", spec.ngram_min,
                     "..", spec.ngram_max, " must satisfy 1 <= min <= max <= 64"));
  }
  int32_t num_blocks = options.num_blocks;
  if (num_blocks <= 0) {
    const KvCacheShape one = model.CacheShape(1, options.block_size);
    const size_t per_block =
        one.BlockBytes(model.backend().compute_dtype()) * 2 * static_cast<size_t>(one.num_layers);
    num_blocks =
        static_cast<int32_t>(std::min<size_t>(options.kv_cache_bytes / per_block, INT32_MAX));
    if (num_blocks <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("kv_cache_bytes ", options.kv_cache_bytes,
                                                     " is smaller than one block (", per_block,
                                                     " bytes)"));
    }
  }
  PDS_ASSIGN_OR_RETURN(
      KvCache cache,
      KvCache::Create(model.backend(), model.CacheShape(num_blocks, options.block_size)));
  if (options.prefix_caching) cache.allocator().EnablePrefixCache(options.block_size);
  auto engine = std::unique_ptr<LlmEngine>(new LlmEngine(model, options, std::move(cache)));
  engine->batch_policy_ =
      options.batch_policy != nullptr
          ? options.batch_policy
          : std::shared_ptr<const scheduler::BatchPolicy>(scheduler::MakeFcfsBatchPolicy());
  return engine;
}

absl::Status LlmEngine::ValidateRequest(GenerateRequest& request) const {
  const ModelConfig& config = model_.config();
  if (request.prompt.empty()) return absl::InvalidArgumentError("prompt is empty");
  for (int32_t id : request.prompt) {
    if (id < 0 || id >= config.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prompt token id ", id, " outside the vocabulary [0, ", config.vocab_size, ")"));
    }
  }
  PDS_RETURN_IF_ERROR(request.params.Validate(config.vocab_size, config.eos_token_ids));
  const int64_t prompt_len = static_cast<int64_t>(request.prompt.size());
  if (prompt_len >= config.max_context()) {
    return absl::InvalidArgumentError(absl::StrCat("prompt of ", prompt_len,
                                                   " tokens does not fit the model's context of ",
                                                   config.max_context()));
  }
  PDS_RETURN_IF_ERROR(CheckFitsCache(prompt_len));
  if (request.id.empty()) request.id = absl::StrCat("req-", next_order_);
  if (sequences_.count(request.id)) {
    return absl::AlreadyExistsError(absl::StrCat("request id '", request.id, "' is in use"));
  }
  return absl::OkStatus();
}

absl::Status LlmEngine::CheckFitsCache(int64_t prompt_len) const {
  const int64_t blocks = (prompt_len + 1 + options_.block_size - 1) / options_.block_size;
  if (blocks > cache_.allocator().num_blocks()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "prompt of ", prompt_len, " tokens needs more KV blocks than the cache holds (",
        cache_.allocator().num_blocks(), " blocks of ", options_.block_size, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<JsonMatcher>> LlmEngine::MatcherFor(const GenerateRequest& request) {
  const SamplingParams& p = request.params;
  if (p.json_schema.empty() && p.regex.empty()) return std::unique_ptr<JsonMatcher>();
  if (vocab_ == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(p.regex.empty() ? "json_schema" : "regex",
                     " needs the model's tokenizer.json (the worker has no token vocabulary)"));
  }
  // Keyed apart: a regex's key starts with a byte no JSON text does.
  const std::string text = p.regex.empty() ? p.json_schema : absl::StrCat("\x01", p.regex);
  auto it = schemas_.find(text);
  if (it == schemas_.end()) {
    PDS_ASSIGN_OR_RETURN(
        std::shared_ptr<const JsonSchema> schema,
        p.regex.empty() ? JsonSchema::Compile(p.json_schema) : JsonSchema::Regex(p.regex));
    if (schemas_.size() >= 256) schemas_.clear();  // a bounded cache of recent schemas
    it = schemas_.emplace(text, std::move(schema)).first;
  }
  auto matcher = std::make_unique<JsonMatcher>(it->second, vocab_);
  matcher->ReasonFirst(p.reasoning_open, p.reasoning_end, p.reasoning_inside);
  return matcher;
}

bool LlmEngine::Constrain(Sequence& seq, const JsonMatcher::Bits& allowed, float* row,
                          const kernels::RowSampling& rule, int32_t& token) {
  const bool wants_row = seq.request.params.logprobs >= 0 || seq.request.return_logits;
  token =
      JsonMatcher::Draw(allowed, row, model_.config().vocab_size, rule, wants_row, draw_scratch_);
  return token >= 0 && seq.matcher->Accept(token);
}

void LlmEngine::ProcessDraftRow(Sequence& seq, float* row, std::span<const int32_t> drafts) {
  const size_t committed = seq.tokens.size();
  seq.tokens.insert(seq.tokens.end(), drafts.begin(), drafts.end());
  ProcessLogits(seq, row, nullptr, seq.num_generated + static_cast<int32_t>(drafts.size()));
  for (size_t i = committed; i < seq.counted; ++i) {
    auto it = seq.reply_counts.find(seq.tokens[i]);
    if (--it->second == 0) seq.reply_counts.erase(it);  // presence counts an entry
  }
  seq.counted = std::min(seq.counted, committed);
  seq.tokens.resize(committed);
}

void LlmEngine::ProcessLogits(Sequence& seq, float* row, const JsonMatcher::Bits* allowed,
                              int32_t generated) {
  const SamplingParams& p = seq.request.params;
  const int64_t vocab = model_.config().vocab_size;
  const size_t prompt_len = seq.request.prompt.size();
  for (; seq.counted < seq.tokens.size(); ++seq.counted) {
    const int32_t t = seq.tokens[seq.counted];
    if (seq.counted < prompt_len) {
      if (p.repetition_penalty != 1.0f) seq.prompt_tokens.insert(t);
    } else {
      ++seq.reply_counts[t];
    }
  }
  constexpr float kNever = -std::numeric_limits<float>::infinity();
  if (!p.allowed_token_ids.empty()) {  // the others refused: kept aside, the row cleared
    kept_.resize(p.allowed_token_ids.size());
    for (size_t i = 0; i < kept_.size(); ++i) kept_[i] = row[p.allowed_token_ids[i]];
    std::fill(row, row + vocab, kNever);
    for (size_t i = 0; i < kept_.size(); ++i) row[p.allowed_token_ids[i]] = kept_[i];
  }
  if (generated < p.min_tokens) {
    if (!p.ignore_eos) {  // (EOS is an ordinary token then)
      for (int32_t eos : model_.config().eos_token_ids) {
        if (eos >= 0 && eos < vocab) row[eos] = kNever;
      }
    }
    for (int32_t stop : p.stop_token_ids) row[stop] = kNever;
  }
  for (const auto& [id, bias] : p.logit_bias) row[id] += bias;
  if (p.repetition_penalty != 1.0f) {
    auto penalize = [&](int32_t t) {
      row[t] = row[t] > 0 ? row[t] / p.repetition_penalty : row[t] * p.repetition_penalty;
    };
    for (int32_t t : seq.prompt_tokens) penalize(t);
    for (const auto& [t, count] : seq.reply_counts) {
      if (!seq.prompt_tokens.contains(t)) penalize(t);
    }
  }
  if (p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f) {
    for (const auto& [t, count] : seq.reply_counts) {
      row[t] -= p.frequency_penalty * static_cast<float>(count) + p.presence_penalty;
    }
  }
  if (p.min_p > 0.0f && p.temperature > 0.0f) {
    // p / p_max = exp((logit - max) / T) >= min_p, p_max that of the likeliest token the
    // reply's constraint allows, where it has one (the mask comes first, as in vLLM).
    float max = -std::numeric_limits<float>::infinity();
    if (allowed != nullptr) {
      for (size_t w = 0; w < allowed->size(); ++w) {
        for (uint64_t bits = (*allowed)[w]; bits != 0; bits &= bits - 1) {
          const int64_t t = static_cast<int64_t>(w * 64 + std::countr_zero(bits));
          if (t < vocab && row[t] > max) max = row[t];
        }
      }
    } else {
      for (int64_t t = 0; t < vocab; ++t) max = std::max(max, row[t]);
    }
    const float floor = max + p.temperature * std::log(p.min_p);
    for (int64_t t = 0; t < vocab; ++t) {
      if (row[t] < floor) row[t] = kNever;
    }
  }
}

absl::Status LlmEngine::AddRequest(GenerateRequest request) {
  PDS_RETURN_IF_ERROR(ValidateRequest(request));
  PDS_ASSIGN_OR_RETURN(std::unique_ptr<JsonMatcher> matcher, MatcherFor(request));
  auto seq = std::make_unique<Sequence>();
  seq->matcher = std::move(matcher);
  uint64_t seed = request.params.seed.has_value() ? *request.params.seed : std::random_device{}();
  seq->sampler = std::make_unique<Sampler>(request.params, seed);
  seq->tokens = request.prompt;
  seq->order = next_order_++;
  seq->request = std::move(request);
  const std::string id = seq->request.id;
  sequences_[id] = std::move(seq);
  return absl::OkStatus();
}

absl::Status LlmEngine::Cancel(const std::string& id) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrCat("no request '", id, "'"));
  }
  absl::Status status = it->second->table.Release(cache_.allocator());
  sequences_.erase(it);
  return status;
}

void LlmEngine::ForEachWaiting(
    const std::function<void(const std::string& id, int64_t tokens)>& fn) const {
  for (const auto& [id, seq] : sequences_) {
    if (!seq->admitted && !seq->held && !seq->importing) {
      fn(id, static_cast<int64_t>(seq->tokens.size()) - seq->num_computed);
    }
  }
}

void LlmEngine::ForEachPrefilling(
    const std::function<void(const std::string& id, int64_t tokens)>& fn) const {
  for (const auto& [id, seq] : sequences_) {
    if (!seq->held && !seq->importing && seq->num_generated == 0) {
      fn(id, static_cast<int64_t>(seq->tokens.size()) - seq->num_computed);
    }
  }
}

size_t LlmEngine::num_waiting() const {
  size_t n = 0;
  ForEachWaiting([&](const std::string&, int64_t) { ++n; });
  return n;
}

size_t LlmEngine::num_running() const {
  size_t n = 0;
  for (const auto& [id, seq] : sequences_) n += seq->admitted;
  return n;
}

int64_t LlmEngine::running_context_tokens() const {
  int64_t n = 0;
  for (const auto& [id, seq] : sequences_) {
    if (seq->admitted) n += static_cast<int64_t>(seq->tokens.size());
  }
  return n;
}

size_t LlmEngine::num_held() const {
  size_t n = 0;
  for (const auto& [id, seq] : sequences_) n += seq->held || seq->importing;
  return n;
}

int64_t LlmEngine::num_waiting_tokens() const {
  int64_t n = 0;
  ForEachWaiting([&](const std::string&, int64_t tokens) { n += tokens; });
  return n;
}

bool LlmEngine::BlocksAwaitRelease() const {
  for (const auto& [id, seq] : sequences_) {
    if ((seq->held || seq->importing) && !seq->table.blocks().empty()) return true;
  }
  return false;
}

bool LlmEngine::HasRunnable() const {
  for (const auto& [id, seq] : sequences_) {
    if (!seq->held && !seq->importing) return true;
  }
  return false;
}

absl::StatusOr<HeldKv> LlmEngine::GetHeld(const std::string& id) const {
  auto it = sequences_.find(id);
  if (it == sequences_.end() || !it->second->held) {
    return absl::NotFoundError(absl::StrCat("no held request '", id, "'"));
  }
  return HeldKv{it->second->table.blocks(), it->second->num_computed};
}

absl::StatusOr<ImportReservation> LlmEngine::ReserveImport(GenerateRequest request,
                                                           int32_t num_tokens) {
  PDS_RETURN_IF_ERROR(ValidateRequest(request));
  if (num_tokens != static_cast<int32_t>(request.prompt.size())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "import of ", num_tokens, " positions for a prompt of ", request.prompt.size(), " tokens"));
  }
  PDS_ASSIGN_OR_RETURN(std::unique_ptr<JsonMatcher> matcher, MatcherFor(request));
  // Waiting sequences go before new imports, which would otherwise take the blocks they wait
  // for as they free up: while a preempted one whose stream already started waits, no import;
  // a request not yet started (one the front-end prefills here) keeps the blocks its prompt
  // needs, and an import may take only what is left beyond them.
  const int32_t bs = options_.block_size;
  int32_t kept = 0;
  for (const auto& [other, s] : sequences_) {
    if (s->admitted || s->held || s->importing) continue;
    if (s->num_generated > 0) {
      return absl::ResourceExhaustedError(
          "a preempted sequence waits for KV blocks; imports wait until it runs again");
    }
    kept += BlockTable::BlocksFor(static_cast<int32_t>(s->tokens.size()), bs);
  }
  const int32_t needed = BlockTable::BlocksFor(num_tokens, bs);
  const int32_t headroom = static_cast<int32_t>(num_running());
  BlockAllocator& allocator = cache_.allocator();
  auto seq = std::make_unique<Sequence>();
  seq->tokens = request.prompt;
  // The leading whole blocks of the prompt already cached are shared (taken first, so that the
  // allocation below cannot evict them), all but the last block: every transfer moves at
  // least one block.
  std::vector<int32_t> hit;
  if (allocator.prefix_cache_enabled()) {
    BlockAllocator::ExtendPrefixHashes(seq->tokens, bs, seq->block_hashes);
    hit = allocator.MatchPrefix(seq->tokens, seq->block_hashes, needed - 1);
    allocator.AcquireCached(hit);
  }
  const int32_t held = static_cast<int32_t>(hit.size());
  const int32_t to_write = needed - held;
  if (allocator.num_free() < to_write + headroom + kept) {
    const int32_t free_blocks = allocator.num_free();
    allocator.Free(hit).IgnoreError();
    return absl::ResourceExhaustedError(absl::StrCat(
        "KV cache full: ", to_write, " blocks needed (", held, " more cached), ", free_blocks,
        " free, ", headroom, " kept for growth, ", kept, " for requests waiting to start"));
  }
  absl::StatusOr<std::vector<int32_t>> allocated = allocator.Allocate(to_write);
  if (!allocated.ok()) {
    allocator.Free(hit).IgnoreError();
    return allocated.status();
  }
  ImportReservation reservation;
  reservation.held_blocks = held;
  reservation.blocks = std::move(*allocated);
  std::vector<int32_t> table = hit;
  table.insert(table.end(), reservation.blocks.begin(), reservation.blocks.end());
  seq->cached_chain = std::move(hit);
  seq->table.Adopt(std::move(table), 0);
  if (allocator.prefix_cache_enabled()) {
    prefix_query_tokens_ += num_tokens;
    prefix_hit_tokens_ += static_cast<int64_t>(held) * bs;
  }
  const uint64_t seed =
      request.params.seed.has_value() ? *request.params.seed : std::random_device{}();
  seq->sampler = std::make_unique<Sampler>(request.params, seed);
  seq->matcher = std::move(matcher);
  seq->order = next_order_++;
  seq->importing = true;
  seq->request = std::move(request);
  const std::string id = seq->request.id;
  sequences_[id] = std::move(seq);
  return reservation;
}

absl::Status LlmEngine::ActivateImport(const std::string& id, int32_t next_token) {
  auto it = sequences_.find(id);
  if (it == sequences_.end() || !it->second->importing) {
    return absl::NotFoundError(absl::StrCat("no import of request '", id, "'"));
  }
  Sequence& seq = *it->second;
  if (next_token < 0 || next_token >= model_.config().vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("token ", next_token, " outside the vocabulary"));
  }
  if (seq.matcher != nullptr && !seq.matcher->Accept(next_token)) {
    return absl::InvalidArgumentError(absl::StrCat("request '", id, "': first token ", next_token,
                                                   " cannot start its constrained reply"));
  }
  // The blocks written by the transfer are registered (so that later imports, and a recompute
  // after a preemption, find them).
  seq.num_computed = static_cast<int32_t>(seq.tokens.size());
  seq.table.set_num_tokens(seq.num_computed);
  RegisterFilledBlocks(seq, static_cast<int32_t>(seq.cached_chain.size()) * options_.block_size);
  seq.tokens.push_back(next_token);
  seq.num_generated = 1;
  seq.importing = false;
  seq.admitted = true;
  return absl::OkStatus();
}

void LlmEngine::Preempt(Sequence& seq) {
  // Recompute preemption: drop the cache; the tokens so far are prefilled again later.
  seq.table.Release(cache_.allocator()).IgnoreError();
  seq.cached_chain.clear();
  seq.num_computed = 0;
  seq.admitted = false;
  ++num_preemptions_;
}

bool LlmEngine::StartsFromCache(const Sequence& seq) const {
  // (A request for prompt logprobs computes every prompt position until it has them.)
  return cache_.allocator().prefix_cache_enabled() && !seq.admitted && !seq.held &&
         !seq.importing && seq.num_computed == 0 && seq.table.blocks().empty() &&
         (seq.request.params.prompt_logprobs < 0 || seq.num_generated > 0);
}

int32_t LlmEngine::LogitRowsPerCall() const {
  return static_cast<int32_t>(
      std::clamp<int64_t>(options_.max_logits_per_call / model_.config().vocab_size, 1, INT32_MAX));
}

int32_t LlmEngine::RowSlice() const {
  return std::clamp(LogitRowsPerCall(), 1, std::max(max_running_, 1));
}

bool LlmEngine::MaySpeculate(const Sequence& seq) const {
  return seq.num_generated > 0 && seq.handoff == nullptr && !seq.request.hold_kv_after_prefill &&
         seq.num_computed + 1 == static_cast<int32_t>(seq.tokens.size()) &&
         seq.matcher == nullptr && !seq.request.return_logits;
}

absl::Status LlmEngine::PromptLogprobs(Sequence& seq, int32_t start, int32_t chunk,
                                       int64_t first_row) {
  const int32_t prompt = static_cast<int32_t>(seq.request.prompt.size());
  const int32_t end = std::min(start + chunk, prompt - 1);  // the last row predicts the reply
  // Entry p is position p's (a recomputation after a preemption starts over from `start`).
  seq.prompt_logprobs.resize(std::min<size_t>(seq.prompt_logprobs.size(), start));
  if (end <= start || static_cast<int32_t>(seq.prompt_logprobs.size()) != start) {
    return absl::OkStatus();
  }
  const int64_t vocab = model_.config().vocab_size;
  // A slice of rows at a time (RowSlice); the rows on the CPU threads.
  const int32_t slice = RowSlice();
  const int32_t k = seq.request.params.prompt_logprobs;
  for (int32_t from = start; from < end; from += slice) {
    const int32_t n = std::min(slice, end - from);
    std::vector<int64_t> rows(static_cast<size_t>(n));
    std::iota(rows.begin(), rows.end(), first_row + (from - start));
    PDS_RETURN_IF_ERROR(model_.RowLogits(rows, prompt_rows_));
    const size_t at = seq.prompt_logprobs.size();
    seq.prompt_logprobs.resize(at + n);
    kernels::cpu::ParallelFor(n, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        TokenLogprobs& lp = seq.prompt_logprobs[at + r];
        lp.logprob = kernels::cpu::LogProbAndTop(prompt_rows_.data() + r * vocab, vocab,
                                                 seq.tokens[from + r + 1], k, lp.top, &lp.rank);
      }
    });
  }
  return absl::OkStatus();
}

std::vector<int32_t> LlmEngine::CachedPrefix(Sequence& seq) {
  const int32_t bs = options_.block_size;
  BlockAllocator::ExtendPrefixHashes(seq.tokens, bs, seq.block_hashes);
  const int32_t max_blocks = (static_cast<int32_t>(seq.tokens.size()) - 1) / bs;
  return cache_.allocator().MatchPrefix(seq.tokens, seq.block_hashes, max_blocks);
}

void LlmEngine::RegisterFilledBlocks(Sequence& seq, int32_t from) {
  cache_.allocator().RegisterComputed(seq.table.blocks(),
                                      std::span<const int32_t>(seq.tokens.data(), seq.num_computed),
                                      from, seq.block_hashes, seq.cached_chain);
}

FinishReason LlmEngine::CheckFinish(const Sequence& seq, int32_t token) const {
  const SamplingParams& p = seq.request.params;
  if (!p.ignore_eos) {
    for (int32_t eos : model_.config().eos_token_ids) {
      if (token == eos) return FinishReason::kStop;
    }
  }
  for (int32_t stop : p.stop_token_ids) {
    if (token == stop) return FinishReason::kStop;
  }
  return LengthLimit(seq, seq.num_generated, static_cast<int64_t>(seq.tokens.size()));
}

FinishReason LlmEngine::LengthLimit(const Sequence& seq, int32_t num_generated,
                                    int64_t num_tokens) const {
  if (num_generated >= seq.request.params.max_tokens) return FinishReason::kLength;
  if (num_tokens >= model_.config().max_context()) return FinishReason::kLength;
  // The next step must fit in the cache on its own.
  if (BlockTable::BlocksFor(static_cast<int32_t>(num_tokens), options_.block_size) >
      cache_.allocator().num_blocks()) {
    return FinishReason::kLength;
  }
  return FinishReason::kNone;
}

std::shared_ptr<LayerProgress> LlmEngine::StartHandoffs(const std::vector<Sequence*>& completing) {
  std::shared_ptr<LayerProgress> progress;
  std::vector<std::shared_ptr<KvHandoff>> handoffs;
  for (Sequence* seq : completing) {
    const int32_t prompt = static_cast<int32_t>(seq->tokens.size());
    if (!seq->request.hold_kv_after_prefill || seq->num_generated > 0 ||
        LengthLimit(*seq, 1, prompt + 1) != FinishReason::kNone) {
      continue;  // no hand-off, or it certainly ends with its first token
    }
    if (progress == nullptr) progress = std::make_shared<LayerProgress>(model_.config().num_layers);
    seq->handoff =
        std::make_shared<KvHandoff>(seq->request.id, seq->table.blocks(), prompt, progress);
    handoffs.push_back(seq->handoff);
  }
  if (!handoffs.empty()) handoff_hook_(std::move(handoffs));
  return progress;
}

absl::StatusOr<std::vector<TokenOutput>> LlmEngine::Step() {
  const auto step_start = std::chrono::steady_clock::now();
  std::vector<Sequence*> order;
  for (auto& [id, seq] : sequences_) {
    if (!seq->held && !seq->importing) order.push_back(seq.get());
  }
  std::sort(order.begin(), order.end(),
            [](const Sequence* a, const Sequence* b) { return a->order < b->order; });

  struct Planned {
    Sequence* seq;
    int32_t chunk;
    std::vector<int32_t> drafts;  // speculative tokens after its next one (part of the chunk)
    int32_t blocks = 0;           // with drafts: the blocks it held before their own
    // After the forward, with drafts: how many are kept, the token drawn after them, and the
    // logprobs of those kept and that token (params.logprobs >= 0).
    size_t kept = 0;
    int32_t next = -1;
    std::vector<TokenLogprobs> logprobs;
    bool may_draft = false;  // a decode that could have had drafts (its acceptance record fades)
  };
  // The batch policy proposes the order and the chunks; here each sequence in turn gets its
  // blocks (a running one may preempt the youngest other admitted sequence not in the batch)
  // and the batch ends at the first that cannot. After a preemption, the pending tokens of
  // the victim changed, so the rest is planned again with what is left of the budget.
  std::vector<Planned> plan;
  int32_t budget = options_.max_batch_tokens;
  const int32_t bs = options_.block_size;
  const scheduler::BatchPolicy& policy = *batch_policy_;
  std::vector<Sequence*> rest = order;
  // A waiting sequence could not get its blocks: the waiting ones after it wait too (first come,
  // first served), but running ones still run (they would otherwise never free the blocks it
  // waits for: a preempted sequence is older than the imports admitted since).
  bool waiting_blocked = false;
  bool block_wait = false;  // a running sequence waits for blocks a transfer holds
  bool replan = true;
  while (replan) {
    replan = false;
    std::vector<scheduler::BatchCandidate> candidates;
    candidates.reserve(rest.size());
    for (Sequence* seq : rest) {
      scheduler::BatchCandidate c;
      c.pending_tokens = static_cast<int32_t>(seq->tokens.size()) - seq->num_computed;
      if (StartsFromCache(*seq)) {
        c.pending_tokens -= static_cast<int32_t>(CachedPrefix(*seq).size()) * bs;
      }
      if (waiting_blocked && !seq->admitted) c.pending_tokens = 0;  // not planned (skipped)
      c.running = seq->admitted;
      if (seq->num_generated == 0) c.deadline_s = seq->request.ttft_deadline_s;
      c.best_effort = seq->request.best_effort;
      candidates.push_back(c);
    }
    const scheduler::BatchBudget left{budget, max_running_ - static_cast<int32_t>(plan.size())};
    bool full = false;
    for (const scheduler::PlannedChunk& proposed : policy.Plan(candidates, left)) {
      Sequence* seq = rest[proposed.index];
      if (waiting_blocked && !seq->admitted) continue;
      int32_t chunk = proposed.chunk;
      const bool from_cache = StartsFromCache(*seq);
      if (from_cache) {
        // Start from the cached prefix (an earlier reservation in this step may have evicted
        // part of what the plan counted on: then the chunk computes less of the prompt).
        std::vector<int32_t> hit = CachedPrefix(*seq);
        const int32_t hit_tokens = static_cast<int32_t>(hit.size()) * bs;
        cache_.allocator().AcquireCached(hit);
        seq->cached_chain = hit;
        seq->table.Adopt(std::move(hit), hit_tokens);
        seq->num_computed = hit_tokens;
        chunk = std::min(chunk, static_cast<int32_t>(seq->tokens.size()) - hit_tokens);
      }
      bool preempted = false;
      absl::Status reserved = seq->table.Reserve(seq->num_computed + chunk, bs, cache_.allocator());
      while (!reserved.ok() && seq->admitted) {
        Sequence* victim = nullptr;
        for (auto it = order.rbegin(); it != order.rend(); ++it) {
          Sequence* s = *it;
          if (s == seq || !s->admitted || s->table.blocks().empty()) continue;
          if (std::any_of(plan.begin(), plan.end(), [&](const Planned& p) { return p.seq == s; })) {
            continue;
          }
          victim = s;
          break;
        }
        if (victim == nullptr) break;
        Preempt(*victim);
        preempted = true;
        reserved = seq->table.Reserve(seq->num_computed + chunk, bs, cache_.allocator());
      }
      if (!reserved.ok()) {
        if (seq->admitted && BlocksAwaitRelease()) {
          // Held or importing sequences own the blocks it needs: they come back when their
          // transfer (or its cancel) ends. It waits; the others planned so far run.
          block_wait = true;
          continue;
        }
        if (from_cache) {  // waiting sequences hold no blocks
          seq->table.Release(cache_.allocator()).IgnoreError();
          seq->num_computed = 0;
          seq->cached_chain.clear();
        }
        if (seq->admitted && plan.empty()) {
          // Cannot happen while CheckFinish bounds sequences by the cache; keep it loud.
          return absl::InternalError(absl::StrCat("request '", seq->request.id,
                                                  "' cannot get KV blocks: ", reserved.message()));
        }
        if (!seq->admitted) {
          // Later waiting requests wait until blocks free up; the running ones are planned
          // again with the budget and places it would have taken.
          waiting_blocked = true;
          replan = true;
          break;
        }
        full = true;
        break;
      }
      if (from_cache) {
        prefix_query_tokens_ += static_cast<int64_t>(seq->tokens.size());
        prefix_hit_tokens_ += seq->num_computed;
        if (seq->num_generated == 0) seq->prompt_cached = seq->num_computed;
      }
      seq->admitted = true;
      plan.push_back({seq, chunk, {}, 0, 0, -1, {}, false});
      budget -= chunk;
      if (preempted) {
        replan = true;
        break;
      }
    }
    if (full) break;
    if (replan) {
      std::erase_if(rest, [&](const Sequence* s) {
        return std::any_of(plan.begin(), plan.end(), [&](const Planned& p) { return p.seq == s; });
      });
    }
  }
  if (block_wait) ++num_block_waits_;  // once per step, however often it was replanned
  // Speculative drafts, from what the step leaves of the budget and of the free blocks, less
  // one block of growth per planned sequence (free blocks that cache nothing go first; the
  // step gives back those its drafts did not fill): they go after the sequence's last token in
  // its chunk (and in its tokens until the forward is done). Of those proposed, the step
  // carries the ones that raise its expected tokens per second (ChooseDrafts).
  const int32_t max_drafts = options_.speculative.num_tokens;
  StepShape decodes;   // the step's decodes (with their drafts, once chosen)
  DraftLimits limits;  // limits.others: the step's other rows (prefill chunks)
  double step_cap = draft_step_cap_;
  for (const Planned& p : plan) {
    // (a sequence recomputing its last token after a preemption is not one: it sends none)
    const bool decode = p.seq->num_generated > 0 && p.chunk == 1 &&
                        p.seq->num_computed + 1 == static_cast<int32_t>(p.seq->tokens.size());
    StepShape& part = decode ? decodes : limits.others;
    part.rows += p.chunk;
    part.kv += p.seq->num_computed + p.chunk;  // the positions its rows read
    // The tightest TPOT target of the step's decodes caps its drafts, with the engine's.
    const std::optional<double>& target = p.seq->request.tpot_target_s;
    if (decode && target && *target > 0) {
      step_cap = step_cap > 0 ? std::min(step_cap, *target) : *target;
    }
  }
  if (max_drafts > 0) {
    const int32_t spare_blocks = cache_.allocator().num_free() - static_cast<int32_t>(plan.size());
    std::vector<size_t> proposer;  // plan entry of each candidate
    std::vector<std::vector<int32_t>> proposed;
    std::vector<DraftCandidate> candidates;
    for (size_t i = 0; i < plan.size(); ++i) {
      Planned& p = plan[i];
      Sequence& seq = *p.seq;
      if (p.chunk != 1 || !MaySpeculate(seq)) continue;
      p.may_draft = true;
      const int64_t len = static_cast<int64_t>(seq.tokens.size());
      // No draft past max_tokens, the model's context or the blocks at hand: their tokens
      // could not be kept.
      const int64_t room = std::min<int64_t>(
          {seq.request.params.max_tokens - seq.num_generated - 1,
           model_.config().max_context() - len,
           static_cast<int64_t>(seq.table.blocks().size() + std::max(0, spare_blocks)) * bs - len});
      const int32_t k = static_cast<int32_t>(std::min<int64_t>({max_drafts, budget, room}));
      if (k <= 0) continue;
      seq.ngrams.Extend(seq.tokens);
      std::vector<int32_t> drafts = seq.ngrams.Propose(seq.tokens, options_.speculative.ngram_min,
                                                       options_.speculative.ngram_max, k);
      if (drafts.empty()) continue;
      candidates.push_back({static_cast<int32_t>(drafts.size()), seq.acceptance.estimate()});
      proposed_draft_tokens_ += static_cast<int64_t>(drafts.size());
      proposer.push_back(i);
      proposed.push_back(std::move(drafts));
    }
    std::vector<int32_t> chosen;
    if (!candidates.empty()) {
      limits.rows = budget;
      limits.max_seconds = step_cap;
      const double tokens = decodes.rows;  // each decode sends one token
      const bool paying = options_.speculative.choice == DraftChoice::kPaying;
      if (paying && options_.speculative.step_cost) {
        chosen = ChooseDrafts(options_.speculative.step_cost, decodes, tokens, candidates, limits);
      } else if (paying && step_model_.Predict(decodes)) {
        const StepCostFn model = [this](const StepShape& s) { return *step_model_.Predict(s); };
        chosen = ChooseDrafts(model, decodes, tokens, candidates, limits);
        // Now and then a step of the kind the model lacks (with drafts, or without), so that
        // their difference stays measured: only steps that are timed (decodes alone), and
        // with drafts no more than the cap lets in (priced by the model).
        const std::optional<bool> lacks = step_model_.Lacks();
        if (++explore_clock_ % kExploreEvery == 0 && lacks && limits.others.rows == 0) {
          if (*lacks) {
            limits.cap_cost = model;
            chosen = ChooseDrafts(FreeRows(), decodes, tokens, candidates, limits);
          } else {
            std::fill(chosen.begin(), chosen.end(), 0);
          }
        }
      } else {  // kAll, or the cost of a row is not known yet: rows count as free
        chosen = ChooseDrafts(FreeRows(), decodes, tokens, candidates, {.rows = budget});
      }
    }
    int32_t draft_blocks = 0;  // taken so far
    for (size_t n = 0; n < candidates.size(); ++n) {
      Planned& p = plan[proposer[n]];
      Sequence& seq = *p.seq;
      const int64_t len = static_cast<int64_t>(seq.tokens.size());
      const int32_t held = static_cast<int32_t>(seq.table.blocks().size());
      const int32_t count = static_cast<int32_t>(std::min<int64_t>(
          {chosen[n], budget,
           static_cast<int64_t>(held + std::max(0, spare_blocks - draft_blocks)) * bs - len}));
      if (count <= 0) continue;
      std::vector<int32_t>& drafts = proposed[n];
      drafts.resize(static_cast<size_t>(count));
      if (!seq.table.Reserve(seq.num_computed + 1 + count, bs, cache_.allocator()).ok()) continue;
      draft_blocks += static_cast<int32_t>(seq.table.blocks().size()) - held;
      p.blocks = held;
      p.chunk += count;
      budget -= count;
      decodes.rows += count;
      decodes.kv += count;
      decodes.drafts = true;
      seq.tokens.insert(seq.tokens.end(), drafts.begin(), drafts.end());
      p.drafts = std::move(drafts);
    }
  }
  std::vector<TokenOutput> outputs;
  last_batch_.clear();
  for (const Planned& p : plan) last_batch_.emplace_back(p.seq->request.id, p.chunk);
  if (plan.empty()) return outputs;

  std::vector<SequenceInput> inputs;
  inputs.reserve(plan.size());
  for (const Planned& p : plan) {
    SequenceInput in;
    in.tokens = std::span<const int32_t>(p.seq->tokens.data() + p.seq->num_computed, p.chunk);
    in.start_pos = p.seq->num_computed;
    in.table = &p.seq->table;
    inputs.push_back(in);
  }
  // The backend picks every token where the logits are; only sequences that want logprobs or
  // logits get their row on the host (mid-prefill sequences sample nothing that is used).
  sampling_.resize(plan.size());
  host_rows_.assign(plan.size(), 0);
  std::vector<size_t> constrained;  // rows drawn under a json_schema
  // Each row's rule; the backend draws by it, except for rows drawn again on the host (masked
  // or processed), for which its draw would be wasted: greedy (cheapest) there.
  rules_.resize(plan.size());
  for (size_t i = 0; i < plan.size(); ++i) {
    const Sequence& seq = *plan[i].seq;
    // A sequence with drafts draws its last row's token after them.
    rules_[i] = sampling_[i] =
        seq.sampler->RowParams(seq.num_generated + static_cast<int64_t>(plan[i].drafts.size()));
    const bool samples =
        seq.num_computed + plan[i].chunk >= static_cast<int32_t>(seq.tokens.size());
    // A reasoning model's reply before its constraint applies is drawn as any other.
    const bool masked = seq.matcher != nullptr && !seq.matcher->Free();
    const bool processed = seq.request.params.ProcessesLogits();
    // A drafted sequence's logprobs come from its rows after the forward.
    if (samples && plan[i].drafts.empty() &&
        (seq.request.params.logprobs >= 0 || seq.request.return_logits || masked || processed)) {
      host_rows_[i] = 1;
    }
    if (samples && (masked || processed)) sampling_[i] = kernels::RowSampling();
    if (samples && masked) constrained.push_back(i);
  }
  // Structured output: the masks depend only on the tokens so far, so they are computed on
  // helper threads while the model runs (joined before the rows are drawn, or when this
  // returns).
  allowed_.resize(plan.size());
  std::vector<std::future<void>> masks;
  if (!constrained.empty()) {
    const size_t tasks = std::min<size_t>(
        constrained.size(), std::max<unsigned>(1, std::thread::hardware_concurrency() / 4));
    for (size_t t = 0; t < tasks; ++t) {
      masks.push_back(std::async(std::launch::async, [this, &plan, &constrained, t, tasks] {
        for (size_t k = t; k < constrained.size(); k += tasks) {
          const size_t i = constrained[k];
          plan[i].seq->matcher->ComputeAllowed(allowed_[i]);
        }
      }));
    }
  }
  std::shared_ptr<LayerProgress> progress;
  if (handoff_hook_) {  // prefill workers only: nothing on other engines' steps
    std::vector<Sequence*> completing;
    for (const Planned& p : plan) {
      if (p.seq->num_computed + p.chunk >= static_cast<int32_t>(p.seq->tokens.size())) {
        completing.push_back(p.seq);
      }
    }
    progress = StartHandoffs(completing);
  }
  Transformer::KvLayerHook on_kv_layer;
  if (progress != nullptr) {
    on_kv_layer = [this, &progress](int32_t layer) -> absl::Status {
      PDS_ASSIGN_OR_RETURN(std::shared_ptr<Backend::Mark> mark, model_.backend().MarkIssued());
      progress->Issued(layer, std::move(mark));
      return absl::OkStatus();
    };
  }
  // The draft rows drawn on the device: row j of a sequence's chunk for its j-th draft (rows
  // drawn again after logits processing are drawn on the host below).
  std::vector<int64_t> device_rows;
  std::vector<kernels::RowSampling> rules;
  int64_t row = 0;  // the first of the sequence's rows
  for (const Planned& p : plan) {
    const size_t drafts = p.seq->request.params.ProcessesLogits() ? 0 : p.drafts.size();
    for (size_t j = 0; j < drafts; ++j) {
      device_rows.push_back(row + static_cast<int64_t>(j));
      rules.push_back(p.seq->sampler->RowParams(p.seq->num_generated + static_cast<int64_t>(j)));
    }
    row += p.chunk;
  }
  // Drawn with the sequences' last rows, in the same pass over the lm_head, where that many
  // rows fit in one projection (LogitRowsPerCall); else after the forward, a slice at a time.
  const bool together = !device_rows.empty() &&
                        plan.size() + device_rows.size() <= static_cast<size_t>(LogitRowsPerCall());
  absl::Status forwarded = together ? model_.Forward(inputs, cache_, logits_, sampling_, host_rows_,
                                                     tokens_, on_kv_layer, device_rows, rules)
                                    : model_.Forward(inputs, cache_, logits_, sampling_, host_rows_,
                                                     tokens_, on_kv_layer);
  // Each draft position's token (drawn[d] for the batch's d-th draft row drawn on the device,
  // in plan order); the drafts leave the sequences' tokens, whatever happened.
  std::vector<int32_t> drawn;
  if (forwarded.ok() && together) {
    drawn.assign(tokens_.begin() + static_cast<std::ptrdiff_t>(plan.size()), tokens_.end());
    tokens_.resize(plan.size());
  } else if (forwarded.ok()) {
    const size_t slice = static_cast<size_t>(LogitRowsPerCall());
    std::vector<int32_t> part;
    for (size_t at = 0; at < device_rows.size() && forwarded.ok(); at += slice) {
      const size_t n = std::min(slice, device_rows.size() - at);
      forwarded = model_.SampleRows(
          std::span<const int64_t>(device_rows).subspan(at, n),
          std::vector<kernels::RowSampling>(rules.begin() + at, rules.begin() + at + n),
          draft_rows_, part);
      drawn.insert(drawn.end(), part.begin(), part.end());
    }
  }
  for (Planned& p : plan) {
    p.seq->tokens.resize(p.seq->tokens.size() - p.drafts.size());
  }
  // Each drafted sequence's kept drafts and its next token, and the logprobs of what it sends
  // (from those tokens' rows, all such sequences' rows at once), before any sequence moves on.
  // A sequence with logits processing has its rows brought to the host one round at a time
  // (row j only while drafts 0..j-1 were kept), each processed as if the drafts before it were
  // its tokens and drawn there by its rule.
  if (forwarded.ok()) {
    const int64_t vocab = model_.config().vocab_size;
    const size_t slice = static_cast<size_t>(LogitRowsPerCall());
    // Projects `rows` (owner[r]: the plan entry of rows[r]) in slices, handing each row's
    // logits to `use`.
    auto for_rows = [&](const std::vector<int64_t>& rows, const std::vector<size_t>& owner,
                        const std::function<void(Planned&, float*)>& use) {
      for (size_t from = 0; from < rows.size() && forwarded.ok(); from += slice) {
        const size_t n = std::min(slice, rows.size() - from);
        forwarded = model_.RowLogits(std::span<const int64_t>(rows).subspan(from, n), spec_logits_);
        for (size_t r = 0; r < n && forwarded.ok(); ++r) {
          use(plan[owner[from + r]], spec_logits_.data() + r * vocab);
        }
      }
    };
    std::vector<int64_t> first_rows(plan.size());
    std::vector<int64_t> rows;
    std::vector<size_t> owner;
    std::vector<size_t> processed;  // plan entries drawn on the host, not settled yet
    size_t at = 0;                  // of `drawn`
    int64_t first_row = 0;
    for (size_t i = 0; i < plan.size(); first_row += plan[i].chunk, ++i) {
      first_rows[i] = first_row;
      Planned& p = plan[i];
      if (p.drafts.empty()) continue;
      if (p.seq->request.params.ProcessesLogits()) {
        processed.push_back(i);
        continue;
      }
      while (p.kept < p.drafts.size() && drawn[at + p.kept] == p.drafts[p.kept]) ++p.kept;
      p.next = p.kept < p.drafts.size() ? drawn[at + p.kept] : tokens_[i];
      at += p.drafts.size();
      if (p.seq->request.params.logprobs < 0) continue;
      for (size_t j = 0; j <= p.kept; ++j) {
        rows.push_back(first_row + static_cast<int64_t>(j));
        owner.push_back(i);
      }
    }
    for_rows(rows, owner, [&](Planned& p, float* row) {
      const size_t j = p.logprobs.size();
      TokenLogprobs& lp = p.logprobs.emplace_back();
      lp.logprob = kernels::cpu::LogProbAndTop(row, vocab, j < p.kept ? p.drafts[j] : p.next,
                                               p.seq->request.params.logprobs, lp.top);
    });
    while (!processed.empty() && forwarded.ok()) {
      rows.clear();
      for (size_t i : processed) rows.push_back(first_rows[i] + static_cast<int64_t>(plan[i].kept));
      for_rows(rows, processed, [&](Planned& p, float* row) {
        Sequence& seq = *p.seq;
        const size_t j = p.kept;  // every draft before this row was kept
        ProcessDraftRow(seq, row, std::span<const int32_t>(p.drafts).first(j));
        const int32_t token = kernels::cpu::DrawToken(
            row, vocab, seq.sampler->RowParams(seq.num_generated + static_cast<int64_t>(j)));
        if (seq.request.params.logprobs >= 0) {
          TokenLogprobs& lp = p.logprobs.emplace_back();
          lp.logprob =
              kernels::cpu::LogProbAndTop(row, vocab, token, seq.request.params.logprobs, lp.top);
          std::erase_if(lp.top,
                        [](const std::pair<int32_t, float>& t) { return std::isinf(t.second); });
        }
        if (j < p.drafts.size() && token == p.drafts[j]) {
          ++p.kept;
        } else {
          p.next = token;
        }
      });
      std::erase_if(processed, [&](size_t i) { return plan[i].next >= 0; });
    }
  }
  // Prompt logprobs, from every row of the chunks that ask for them (before any sequence moves
  // on: a failure is the step's).
  int64_t first_row = 0;  // of plan[i]'s rows in the batch
  for (size_t i = 0; i < plan.size() && forwarded.ok(); ++i) {
    Sequence& seq = *plan[i].seq;
    if (seq.request.params.prompt_logprobs >= 0 && seq.num_generated == 0) {
      forwarded = PromptLogprobs(seq, seq.num_computed, plan[i].chunk, first_row);
    }
    first_row += plan[i].chunk;
  }
  for (std::future<void>& m : masks) m.get();
  last_forward_end_ = absl::Now();
  if (progress != nullptr) progress->End(forwarded);
  if (!forwarded.ok()) {
    // A sequence whose KV was leaving during the step is held, not runnable: its transfer may
    // still read the blocks (they stay until Cancel()), and prefilling it again would only
    // feed a hand-off that has already failed.
    for (const Planned& p : plan) {
      if (p.seq->handoff == nullptr) continue;
      p.seq->handoff->Resolve(forwarded);
      p.seq->handoff.reset();
      p.seq->held = true;
      p.seq->admitted = false;
    }
    return forwarded;
  }

  const int64_t vocab = model_.config().vocab_size;
  std::vector<std::string> finished;
  for (size_t i = 0; i < plan.size(); ++i) {
    Sequence& seq = *plan[i].seq;
    const int32_t before = seq.num_computed;
    if (const std::vector<int32_t>& drafts = plan[i].drafts; !drafts.empty()) {
      // The drafts up to the first whose position drew another token, then the token drawn
      // there (after the last draft: the last row's). Their K/V stay; the rest is overwritten.
      const size_t kept = plan[i].kept;
      draft_tokens_ += static_cast<int64_t>(drafts.size());
      seq.acceptance.Update(static_cast<int32_t>(drafts.size()), static_cast<int32_t>(kept));
      for (size_t j = 0; j <= kept; ++j) {
        TokenOutput out;
        out.request_id = seq.request.id;
        out.token = j < kept ? drafts[j] : plan[i].next;
        if (j < plan[i].logprobs.size()) out.logprobs = std::move(plan[i].logprobs[j]);
        seq.tokens.push_back(out.token);
        ++seq.num_generated;
        out.finish = CheckFinish(seq, out.token);
        const bool done = out.finish != FinishReason::kNone;
        outputs.push_back(std::move(out));
        if (j < kept) ++accepted_draft_tokens_;  // kept and sent
        if (done) {
          finished.push_back(seq.request.id);
          break;
        }
      }
      seq.num_computed = static_cast<int32_t>(seq.tokens.size()) - 1;
      seq.table.set_num_tokens(seq.num_computed);
      RegisterFilledBlocks(seq, before);
      // The blocks only rejected drafts reached go back at once (Free fails only for blocks not
      // in use, which these are).
      const absl::Status shrunk =
          seq.table.Shrink(std::max(plan[i].blocks, BlockTable::BlocksFor(seq.num_computed, bs)),
                           cache_.allocator());
      if (!shrunk.ok()) {
        Logger("engine")->error("request '{}': {}", seq.request.id, shrunk.ToString());
      }
      continue;
    }
    if (plan[i].may_draft) seq.acceptance.Update(0, 0);
    seq.num_computed += plan[i].chunk;
    seq.table.set_num_tokens(seq.num_computed);
    RegisterFilledBlocks(seq, before);
    if (seq.num_computed < static_cast<int32_t>(seq.tokens.size())) continue;  // mid-prefill
    float* row = logits_.data() + i * vocab;
    TokenOutput out;
    out.request_id = seq.request.id;
    out.token = tokens_[i];
    bool constrained_end = false;  // the reply's JSON is complete (or a stop token ended it)
    if (seq.request.params.ProcessesLogits()) {
      // Drawn again, by the same rule, from the processed row (the matcher's draw below, when
      // the reply is constrained).
      const bool masked = seq.matcher != nullptr && !seq.matcher->Free();
      ProcessLogits(seq, row, masked ? &allowed_[i] : nullptr, seq.num_generated);
      out.token = kernels::cpu::DrawToken(row, vocab, rules_[i]);
    }
    if (seq.matcher != nullptr && seq.matcher->Free()) {
      // Watched for the reasoning's end. A token that would end the reply (or that the
      // vocabulary lacks) closes the reasoning instead: the constrained part must follow.
      const std::vector<int32_t>& stops = seq.request.params.stop_token_ids;
      if (std::find(stops.begin(), stops.end(), out.token) != stops.end() ||
          !seq.matcher->Accept(out.token)) {
        out.token = seq.matcher->reasoning_end();
        seq.matcher->Accept(out.token);
      }
    } else if (seq.matcher != nullptr) {
      // Drawn again from the masked row: the logprobs are then those of what was drawn from.
      int32_t drawn = -1;
      if (Constrain(seq, allowed_[i], row, rules_[i], drawn)) {
        out.token = drawn;
        constrained_end = seq.matcher->Done() || vocab_->IsStop(out.token);
      } else {  // cannot happen for a schema that compiled; the unconstrained token ends it
        out.finish = FinishReason::kError;
        Logger("engine")->warn("request '{}': no token continues its JSON after {} tokens",
                               seq.request.id, seq.num_generated);
      }
    }
    if (seq.request.params.logprobs >= 0) {
      TokenLogprobs lp;
      lp.logprob =
          kernels::cpu::LogProbAndTop(row, vocab, out.token, seq.request.params.logprobs, lp.top);
      // A masked row has fewer candidates than asked for: no -inf alternatives.
      std::erase_if(lp.top,
                    [](const std::pair<int32_t, float>& t) { return std::isinf(t.second); });
      out.logprobs = std::move(lp);
    }
    if (seq.request.return_logits) out.logits.assign(row, row + vocab);
    seq.tokens.push_back(out.token);
    ++seq.num_generated;
    if (seq.num_generated == 1) {
      out.cached_prompt_tokens = seq.prompt_cached;
      out.prompt_logprobs = std::move(seq.prompt_logprobs);
      seq.prompt_logprobs.clear();
    }
    if (out.finish == FinishReason::kNone) out.finish = CheckFinish(seq, out.token);
    // A complete JSON reply ends as "stop", even on its max_tokens-th token.
    if (constrained_end && out.finish == FinishReason::kLength) out.finish = FinishReason::kStop;
    if (constrained_end && out.finish == FinishReason::kNone) out.finish = FinishReason::kStop;
    if (seq.handoff != nullptr) {
      // Its transfer may be reading the blocks: they stay until Cancel(), even if it ended.
      seq.handoff->Resolve(out.finish == FinishReason::kNone
                               ? absl::StatusOr<int32_t>(out.token)
                               : absl::CancelledError(absl::StrCat(
                                     "request '", seq.request.id, "' ended with its first token (",
                                     FinishReasonName(out.finish), ")")));
      seq.handoff.reset();
      seq.held = true;
      seq.admitted = false;
      out.kv_held = true;
    } else if (out.finish != FinishReason::kNone) {
      finished.push_back(seq.request.id);
    } else if (seq.request.hold_kv_after_prefill) {
      seq.held = true;
      seq.admitted = false;
      out.kv_held = true;
    }
    outputs.push_back(std::move(out));
  }
  for (const std::string& id : finished) PDS_RETURN_IF_ERROR(Cancel(id));
  if (max_drafts > 0 && limits.others.rows == 0) {  // a step made only of decodes
    const std::chrono::duration<double> took = std::chrono::steady_clock::now() - step_start;
    step_model_.Observe(decodes, took.count());
  }
  return outputs;
}

absl::StatusOr<std::vector<GenerateResult>> LlmEngine::Generate(
    std::vector<GenerateRequest> requests) {
  std::vector<GenerateResult> results(requests.size());
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < requests.size(); ++i) {
    if (requests[i].id.empty()) requests[i].id = absl::StrCat("gen-", next_order_ + i);
    results[i].request_id = requests[i].id;
    index[requests[i].id] = i;
  }
  // On any error, the requests added here are cancelled so that no blocks stay held.
  std::vector<std::string> added_ids;
  auto cancel_all = [&](absl::Status status) {
    for (const std::string& id : added_ids) Cancel(id).IgnoreError();
    return status;
  };
  for (auto& r : requests) {
    const std::string id = r.id;
    absl::Status added = AddRequest(std::move(r));
    if (!added.ok()) return cancel_all(added);
    added_ids.push_back(id);
  }
  while (HasWork()) {
    auto step = Step();
    if (!step.ok()) return cancel_all(step.status());
    std::vector<TokenOutput> outputs = std::move(*step);
    for (TokenOutput& out : outputs) {
      auto it = index.find(out.request_id);
      if (it == index.end()) continue;
      GenerateResult& r = results[it->second];
      r.token_ids.push_back(out.token);
      if (out.logprobs) r.logprobs.push_back(std::move(*out.logprobs));
      if (!out.prompt_logprobs.empty()) r.prompt_logprobs = std::move(out.prompt_logprobs);
      if (!out.logits.empty()) r.logits.push_back(std::move(out.logits));
      if (out.finish != FinishReason::kNone) r.finish = out.finish;
    }
  }
  return results;
}

}  // namespace pds::engine
