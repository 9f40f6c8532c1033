// pdserve generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3) [sampling flags] [--json]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <tuple>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/backend/backend.h"
#include "engine/common/status_macros.h"
#include "engine/model/transformer.h"
#include "engine/runtime/llm_engine.h"
#include "engine/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"
#include "server/cli_args.h"
#include "server/cli_model.h"
#include "server/commands.h"

namespace pds::server {
namespace {

const std::vector<FlagSpec>& Specs() {
  static const std::vector<FlagSpec> specs = [] {
    std::vector<FlagSpec> own = {
        {"prompt", false, "prompt text (needs tokenizer.json in the model directory)"},
        {"prompt-ids", false, "prompt as comma-separated token ids"},
        {"max-tokens", false, "tokens to generate at most (default 16)"},
        {"temperature", false, "0 = greedy (default 0)"},
        {"top-k", false, "sample among the k most likely tokens (0 = all)"},
        {"top-p", false, "nucleus sampling mass (default 1)"},
        {"seed", false, "sampling seed (default: random)"},
        {"ignore-eos", true, "keep generating after EOS"},
        {"stop-token-ids", false, "comma-separated ids that end generation"},
        {"logprobs", false, "report the logprob of each token and the top K alternatives"},
        {"prompt-logprobs", false,
         "report each prompt token's logprob (after the first), its rank and the top K "
         "alternatives at its position (the prompt's log-likelihood)"},
        {"presence-penalty", false, "taken off the logit of every token the reply has (-2..2)"},
        {"frequency-penalty", false,
         "times a token's count in the reply, taken off its logit (-2..2)"},
        {"repetition-penalty", false,
         "divides positive (multiplies negative) logits of tokens of the prompt or reply "
         "(default 1: none)"},
        {"logit-bias", false, "comma-separated ID:BIAS added to those tokens' logits"},
        {"min-tokens", false, "EOS and stop tokens are refused before this many tokens"},
        {"min-p", false, "refuse tokens less likely than this times the likeliest (sampling)"},
        {"allowed-token-ids", false, "comma-separated ids: the only tokens the reply may have"},
        {"json-schema", false,
         "structured output: a JSON Schema file (or its text, starting with '{') the reply "
         "must be JSON of (needs tokenizer.json)"},
        {"regex", false,
         "structured output: a regular expression the whole reply matches (needs "
         "tokenizer.json)"},
        {"json", true, "print one JSON object"},
        {"block-size", false, "KV cache block size in tokens (default 16)"},
        {"speculative-tokens", false,
         "speculative decoding by prompt lookup: drafts per step (default 0: off; n-grams of "
         "2 to 4 tokens)"},
        {"help", true, "show this help"},
    };
    std::vector<FlagSpec> all = ModelFlagSpecs();
    all.insert(all.end(), own.begin(), own.end());
    return all;
  }();
  return specs;
}

absl::StatusOr<std::vector<int32_t>> ParseIds(const std::string& text, const char* flag) {
  std::vector<int32_t> ids;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    int32_t id;
    if (!absl::SimpleAtoi(part, &id)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", flag, ": '", part, "' is not a token id"));
    }
    ids.push_back(id);
  }
  return ids;
}

absl::Status Run(const CliArgs& args) {
  // --random-weights has no directory (and no tokenizer: --prompt-ids only).
  const std::string model_dir = args.GetString("model", "");
  engine::GenerateRequest request;
  request.id = "generate";
  if (args.Has("prompt") == args.Has("prompt-ids")) {
    return absl::InvalidArgumentError("give exactly one of --prompt and --prompt-ids");
  }
  // The tokenizer is optional: --prompt-ids works without one; text needs it.
  std::unique_ptr<engine::Tokenizer> tokenizer;
  const std::string tokenizer_path = model_dir + "/tokenizer.json";
  if (!model_dir.empty() && std::filesystem::exists(tokenizer_path)) {
    PDS_ASSIGN_OR_RETURN(tokenizer, engine::Tokenizer::Load(tokenizer_path));
  }
  if (args.Has("prompt")) {
    if (tokenizer == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("--prompt needs ", tokenizer_path,
                                                     ", which does not exist; use --prompt-ids"));
    }
    request.prompt = tokenizer->Encode(args.GetString("prompt"));
  } else {
    PDS_ASSIGN_OR_RETURN(request.prompt, ParseIds(args.GetString("prompt-ids"), "prompt-ids"));
  }
  engine::SamplingParams& p = request.params;
  PDS_ASSIGN_OR_RETURN(int64_t max_tokens, args.GetInt("max-tokens", 16));
  p.max_tokens = static_cast<int32_t>(max_tokens);
  PDS_ASSIGN_OR_RETURN(double temperature, args.GetDouble("temperature", 0.0));
  p.temperature = static_cast<float>(temperature);
  PDS_ASSIGN_OR_RETURN(int64_t top_k, args.GetInt("top-k", 0));
  p.top_k = static_cast<int32_t>(top_k);
  PDS_ASSIGN_OR_RETURN(double top_p, args.GetDouble("top-p", 1.0));
  p.top_p = static_cast<float>(top_p);
  if (args.Has("seed")) {
    PDS_ASSIGN_OR_RETURN(int64_t seed, args.GetInt("seed", 0));
    p.seed = static_cast<uint64_t>(seed);
  }
  p.ignore_eos = args.GetBool("ignore-eos");
  if (args.Has("stop-token-ids")) {
    PDS_ASSIGN_OR_RETURN(p.stop_token_ids,
                         ParseIds(args.GetString("stop-token-ids"), "stop-token-ids"));
  }
  PDS_ASSIGN_OR_RETURN(int64_t logprobs, args.GetInt("logprobs", -1));
  p.logprobs = static_cast<int32_t>(logprobs);
  PDS_ASSIGN_OR_RETURN(int64_t prompt_logprobs, args.GetInt("prompt-logprobs", -1));
  p.prompt_logprobs = static_cast<int32_t>(std::clamp<int64_t>(prompt_logprobs, -2, 1 << 20));
  for (const auto& [flag, field, fallback] :
       {std::tuple<const char*, float*, double>{"presence-penalty", &p.presence_penalty, 0},
        {"frequency-penalty", &p.frequency_penalty, 0},
        {"repetition-penalty", &p.repetition_penalty, 1},
        {"min-p", &p.min_p, 0}}) {
    PDS_ASSIGN_OR_RETURN(const double value, args.GetDouble(flag, fallback));
    *field = static_cast<float>(value);
  }
  PDS_ASSIGN_OR_RETURN(const int64_t min_tokens, args.GetInt("min-tokens", 0));
  p.min_tokens = static_cast<int32_t>(std::clamp<int64_t>(min_tokens, -1, 1 << 30));
  if (args.Has("logit-bias")) {
    for (absl::string_view item : absl::StrSplit(args.GetString("logit-bias"), ',')) {
      std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(item, ':');
      int32_t id = 0;
      float bias = 0;
      if (!absl::SimpleAtoi(kv.first, &id) || !absl::SimpleAtof(kv.second, &bias)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--logit-bias: '", item, "' is not ID:BIAS"));
      }
      p.logit_bias.emplace_back(id, bias);
    }
  }
  if (args.Has("allowed-token-ids")) {
    PDS_ASSIGN_OR_RETURN(p.allowed_token_ids,
                         ParseIds(args.GetString("allowed-token-ids"), "allowed-token-ids"));
  }
  if (args.Has("json-schema")) {
    p.json_schema = args.GetString("json-schema");
    if (!absl::StartsWith(p.json_schema, "{")) {
      std::ifstream in(p.json_schema);
      if (!in)
        return absl::NotFoundError(absl::StrCat("--json-schema: cannot read ", p.json_schema));
      p.json_schema.assign(std::istreambuf_iterator<char>(in), {});
    }
  }
  if (args.Has("regex")) p.regex = args.GetString("regex");

  const auto t0 = std::chrono::steady_clock::now();
  PDS_ASSIGN_OR_RETURN(LoadedModel loaded, LoadModelFromArgs(args));
  engine::Transformer* model = loaded.model.get();
  engine::EngineOptions engine_options;
  PDS_ASSIGN_OR_RETURN(int64_t block_size, args.GetInt("block-size", 16));
  engine_options.block_size = static_cast<int32_t>(block_size);
  PDS_ASSIGN_OR_RETURN(int64_t drafts, args.GetInt("speculative-tokens", 0));
  if (drafts < 0 || drafts > 64) {
    return absl::InvalidArgumentError("--speculative-tokens must be in [0, 64]");
  }
  engine_options.speculative.num_tokens = static_cast<int32_t>(drafts);
  // Enough cache for this one request (drafts never go past max_tokens).
  const int64_t total = static_cast<int64_t>(request.prompt.size()) + p.max_tokens;
  engine_options.num_blocks = static_cast<int32_t>(
      std::max<int64_t>(1, (std::min(total, model->config().max_context()) + block_size - 1) /
                               std::max<int64_t>(block_size, 1)) +
      1);
  PDS_ASSIGN_OR_RETURN(std::unique_ptr<engine::LlmEngine> llm,
                       engine::LlmEngine::Create(*model, engine_options));
  if (tokenizer && (!p.json_schema.empty() || !p.regex.empty())) {
    llm->set_token_vocabulary(
        engine::TokenVocabulary::FromTokenizer(*tokenizer, model->config().eos_token_ids));
  }
  const auto t1 = std::chrono::steady_clock::now();
  PDS_RETURN_IF_ERROR(llm->AddRequest(request));
  engine::GenerateResult result;
  std::string text;
  std::optional<engine::StreamDecoder> detokenizer;
  if (tokenizer) detokenizer.emplace(*tokenizer, /*skip_special_tokens=*/true);
  const bool json_output = args.GetBool("json");
  double first_token_ms = 0;
  while (llm->HasWork()) {
    PDS_ASSIGN_OR_RETURN(std::vector<engine::TokenOutput> outputs, llm->Step());
    for (auto& out : outputs) {
      if (result.token_ids.empty()) {
        first_token_ms =
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t1)
                .count();
      }
      result.token_ids.push_back(out.token);
      if (detokenizer) {
        std::string piece = detokenizer->Add(out.token);
        if (out.finish != engine::FinishReason::kNone) piece += detokenizer->Finish();
        if (!json_output) {
          std::fputs(piece.c_str(), stdout);  // stream the text as it is generated
          std::fflush(stdout);
        }
        text += piece;
      }
      if (out.logprobs) result.logprobs.push_back(*out.logprobs);
      if (!out.prompt_logprobs.empty()) result.prompt_logprobs = std::move(out.prompt_logprobs);
      result.finish = out.finish;
    }
  }
  const double total_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t1).count();
  const double load_ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
  const double decode_tps = result.token_ids.size() > 1 ? (result.token_ids.size() - 1) /
                                                              ((total_ms - first_token_ms) / 1e3)
                                                        : 0.0;

  if (json_output) {
    nlohmann::ordered_json j;
    j["token_ids"] = result.token_ids;
    if (tokenizer) j["text"] = text;
    j["finish_reason"] = std::string(engine::FinishReasonName(result.finish));
    j["prompt_tokens"] = request.prompt.size();
    j["completion_tokens"] = result.token_ids.size();
    // A token's entry: its id, logprob (and rank, for prompt tokens) and alternatives.
    auto entry = [](int32_t token, const engine::TokenLogprobs& lp) {
      nlohmann::ordered_json e;
      e["token_id"] = token;
      e["logprob"] = lp.logprob;
      if (lp.rank > 0) e["rank"] = lp.rank;
      nlohmann::ordered_json top = nlohmann::ordered_json::array();
      for (const auto& [id, logprob] : lp.top)
        top.push_back({{"token_id", id}, {"logprob", logprob}});
      e["top_logprobs"] = top;
      return e;
    };
    if (p.logprobs >= 0) {
      nlohmann::ordered_json list = nlohmann::ordered_json::array();
      for (size_t i = 0; i < result.logprobs.size(); ++i) {
        list.push_back(entry(result.token_ids[i], result.logprobs[i]));
      }
      j["logprobs"] = list;
    }
    if (p.prompt_logprobs >= 0) {  // null for the first prompt token
      nlohmann::ordered_json list = nlohmann::ordered_json::array({nullptr});
      for (size_t i = 0; i < result.prompt_logprobs.size(); ++i) {
        list.push_back(entry(request.prompt[i + 1], result.prompt_logprobs[i]));
      }
      j["prompt_logprobs"] = list;
    }
    j["timing_ms"] = {{"load", load_ms}, {"first_token", first_token_ms}, {"total", total_ms}};
    if (drafts > 0) {
      j["speculative"] = {{"proposed_tokens", llm->num_proposed_draft_tokens()},
                          {"draft_tokens", llm->num_draft_tokens()},
                          {"accepted_tokens", llm->num_accepted_draft_tokens()}};
    }
    std::printf("%s\n",
                j.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace).c_str());
  } else {
    std::string ids;
    for (int32_t id : result.token_ids) absl::StrAppend(&ids, ids.empty() ? "" : ",", id);
    std::printf("%stoken_ids: %s\nfinish_reason: %s\n", tokenizer ? "\n" : "", ids.c_str(),
                std::string(engine::FinishReasonName(result.finish)).c_str());
    if (p.prompt_logprobs >= 0) {
      double sum = 0;
      for (const engine::TokenLogprobs& lp : result.prompt_logprobs) sum += lp.logprob;
      const size_t n = result.prompt_logprobs.size();
      std::printf("prompt log-likelihood: %.4f over %zu tokens (perplexity %.3f)\n", sum, n,
                  n > 0 ? std::exp(-sum / static_cast<double>(n)) : 1.0);
    }
    std::printf("load %.0f ms, first token %.1f ms, decode %.1f tokens/s\n", load_ms,
                first_token_ms, decode_tps);
    if (drafts > 0) {
      std::printf("speculative: %lld draft tokens proposed, %lld computed, %lld kept\n",
                  static_cast<long long>(llm->num_proposed_draft_tokens()),
                  static_cast<long long>(llm->num_draft_tokens()),
                  static_cast<long long>(llm->num_accepted_draft_tokens()));
    }
  }
  return absl::OkStatus();
}

}  // namespace

int GenerateMain(int argc, char** argv) {
  return SubcommandMain(argc, argv, "generate",
                        "--model DIR (--prompt TEXT | --prompt-ids IDS) [flags]", Specs(), Run);
}

}  // namespace pds::server
