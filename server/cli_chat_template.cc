// pdserve chat-template (--model DIR | --config tokenizer_config.json | --template FILE)
// Renders a chat template for each line of stdin, a JSON object of the template's variables
// ({"messages": [...], "add_generation_prompt": true, ...}), as the front-end's
// /v1/chat/completions does: one JSON line per case on stdout, {"text": "..."} or
// {"error": "..."} (with --tokenize and a model's tokenizer.json, also "ids"). With --model or
// --config, the config's special tokens (bos_token, eos_token, ...) are variables too.
// --bench-seconds S times each case instead (tests/chat_template/run_bench.sh).
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/common/status_macros.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"
#include "server/cli_args.h"
#include "server/commands.h"
#include "server/http_util.h"

namespace pds::server {
namespace {

const std::vector<FlagSpec>& Specs() {
  static const std::vector<FlagSpec> specs = {
      {"model", false, "model directory (chat_template.jinja or tokenizer_config.json)"},
      {"config", false, "a tokenizer_config.json (its template unless --template is given)"},
      {"template", false, "a Jinja template file (replaces the model's or config's)"},
      {"tokenize", true, "also print the prompt's token ids (--model with tokenizer.json)"},
      {"bench-seconds", false,
       "render each case repeatedly this long (after one render) and print "
       "{\"renders\", \"us_per_render\", \"bytes\"} instead"},
      {"help", true, "show this help"},
  };
  return specs;
}

std::string Dump(const nlohmann::ordered_json& j) {
  return j.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

absl::Status Run(const CliArgs& args) {
  const std::string model = args.GetString("model");
  const std::string config = args.GetString("config");
  const std::string tmpl = args.GetString("template");
  if (!model.empty() && !config.empty()) {
    return absl::InvalidArgumentError("give --model or --config, not both");
  }
  absl::StatusOr<engine::ChatFormat> format =
      !model.empty() ? engine::LoadChatFormat(model, tmpl)
      : (!config.empty() || !tmpl.empty())
          ? engine::LoadChatFormatFiles(config, tmpl)
          : absl::InvalidArgumentError("give --model DIR, --config FILE or --template FILE");
  PDS_RETURN_IF_ERROR(format.status());
  std::unique_ptr<engine::Tokenizer> tokenizer;
  if (args.GetBool("tokenize")) {
    if (model.empty()) return absl::InvalidArgumentError("--tokenize needs --model");
    PDS_ASSIGN_OR_RETURN(tokenizer, engine::Tokenizer::Load(model + "/tokenizer.json"));
  }
  PDS_ASSIGN_OR_RETURN(const double bench_seconds, args.GetDouble("bench-seconds", 0));
  std::ios::sync_with_stdio(false);  // getline through stdio is slow on large cases
  std::string line;
  int64_t line_number = 0;
  while (std::getline(std::cin, line)) {
    ++line_number;
    if (line.empty()) continue;
    if (JsonTextDepth(line) > 64) {
      return absl::InvalidArgumentError(
          absl::StrCat("stdin line ", line_number, ": nested deeper than 64 levels"));
    }
    nlohmann::ordered_json vars = nlohmann::ordered_json::parse(line, nullptr, false);
    if (vars.is_discarded() || !vars.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat("stdin line ", line_number, ": expected a JSON object of variables"));
    }
    nlohmann::ordered_json out;
    absl::StatusOr<std::string> text = format->Render(vars);
    if (text.ok() && bench_seconds > 0) {
      int64_t renders = 0;
      const absl::Time start = absl::Now();
      absl::Duration elapsed;
      do {
        if (!format->Render(vars).ok()) break;
        ++renders;
        elapsed = absl::Now() - start;
      } while (elapsed < absl::Seconds(bench_seconds));
      out["renders"] = renders;
      out["us_per_render"] = absl::ToDoubleMicroseconds(elapsed) / std::max<int64_t>(renders, 1);
      out["bytes"] = text->size();
    } else if (text.ok()) {
      out["text"] = *text;
      if (tokenizer) out["ids"] = tokenizer->Encode(*text, /*add_special_tokens=*/false);
    } else {
      out["error"] = std::string(text.status().message());
    }
    std::fputs((Dump(out) + "\n").c_str(), stdout);
  }
  return absl::OkStatus();
}

}  // namespace

int ChatTemplateMain(int argc, char** argv) {
  return SubcommandMain(argc, argv, "chat-template",
                        "(--model DIR | --config FILE | --template FILE) < variables.jsonl",
                        Specs(), Run);
}

}  // namespace pds::server
