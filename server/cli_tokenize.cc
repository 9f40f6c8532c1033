// pdserve tokenize --tokenizer FILE [--decode] [--no-special] [--bench]
// Encode: one UTF-8 line of stdin -> one JSON array of ids per line of stdout.
// Decode: one JSON array of ids per line -> one JSON string per line.
// Bench: encodes every line of stdin repeatedly for >= 2 s and prints MB/s as JSON.
#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>

#include "absl/strings/str_cat.h"
#include "engine/common/status_macros.h"
#include "engine/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"
#include "server/cli_args.h"
#include "server/commands.h"

namespace pds::server {
namespace {

const std::vector<FlagSpec>& Specs() {
  static const std::vector<FlagSpec> specs = {
      {"tokenizer", false, "tokenizer.json file"},
      {"decode", true, "decode JSON id arrays instead of encoding text"},
      {"no-special", true, "encode without the post-processor's special tokens (BOS...)"},
      {"skip-special", true, "decode without special tokens"},
      {"bench", true, "measure encode throughput over stdin's lines"},
      {"help", true, "show this help"},
  };
  return specs;
}

std::string Dump(const nlohmann::json& j) {
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

absl::Status Bench(const engine::Tokenizer& tok, bool add_special) {
  std::vector<std::string> lines;
  size_t bytes_per_pass = 0;
  for (std::string line; std::getline(std::cin, line);) {
    bytes_per_pass += line.size();
    lines.push_back(std::move(line));
  }
  size_t checksum = 0;
  for (const auto& l : lines) checksum += tok.Encode(l, add_special).size();  // warm-up
  const auto start = std::chrono::steady_clock::now();
  double seconds = 0;
  size_t bytes = 0;
  while (seconds < 2.0) {
    for (const auto& l : lines) checksum += tok.Encode(l, add_special).size();
    bytes += bytes_per_pass;
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  std::printf("{\"bytes\": %zu, \"seconds\": %.3f, \"mb_per_s\": %.3f, \"tokens_checksum\": %zu}\n",
              bytes, seconds, bytes / seconds / 1e6, checksum);
  return absl::OkStatus();
}

absl::Status Run(const CliArgs& args) {
  PDS_ASSIGN_OR_RETURN(std::string path, args.Required("tokenizer"));
  PDS_ASSIGN_OR_RETURN(std::unique_ptr<engine::Tokenizer> tok, engine::Tokenizer::Load(path));
  const bool add_special = !args.GetBool("no-special");
  if (args.GetBool("bench")) return Bench(*tok, add_special);
  std::string line;
  int64_t line_number = 0;
  while (std::getline(std::cin, line)) {
    ++line_number;
    if (args.GetBool("decode")) {
      nlohmann::json ids = nlohmann::json::parse(line, nullptr, false);
      if (ids.is_discarded() || !ids.is_array()) {
        return absl::InvalidArgumentError(
            absl::StrCat("line ", line_number, ": expected a JSON array of token ids"));
      }
      std::vector<int32_t> values;
      for (const auto& v : ids) {
        if (!v.is_number_integer()) {
          return absl::InvalidArgumentError(absl::StrCat("line ", line_number, ": non-integer id"));
        }
        values.push_back(v.get<int32_t>());
      }
      std::string text = tok->Decode(values, args.GetBool("skip-special"));
      std::fputs((Dump(nlohmann::json(std::move(text))) + "\n").c_str(), stdout);
    } else {
      std::fputs((Dump(nlohmann::json(tok->Encode(line, add_special))) + "\n").c_str(), stdout);
    }
  }
  return absl::OkStatus();
}

}  // namespace

int TokenizeMain(int argc, char** argv) {
  return SubcommandMain(argc, argv, "tokenize", "--tokenizer FILE [--decode] [flags]", Specs(),
                        Run);
}

}  // namespace pds::server
