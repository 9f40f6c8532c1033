#include "server/cli_args.h"

#include <algorithm>
#include <cstdio>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace pds::server {

absl::StatusOr<CliArgs> CliArgs::Parse(int argc, char** argv, int first,
                                       const std::vector<FlagSpec>& specs) {
  CliArgs args;
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", arg, "'"));
    }
    arg = arg.substr(2);
    std::optional<std::string> value;
    if (auto eq = arg.find('='); eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    }
    const FlagSpec* spec = nullptr;
    for (const auto& s : specs) {
      if (s.name == arg) spec = &s;
    }
    if (spec == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", arg));
    }
    if (spec->is_bool) {
      if (value && *value != "true" && *value != "1" && *value != "false" && *value != "0") {
        return absl::InvalidArgumentError(
            absl::StrCat("--", arg, " takes true/1 or false/0, got '", *value, "'"));
      }
      if (value && (*value == "false" || *value == "0")) continue;
      args.values_[arg] = "true";
      continue;
    }
    if (!value) {
      if (i + 1 >= argc)
        return absl::InvalidArgumentError(absl::StrCat("--", arg, " needs a value"));
      value = argv[++i];
    }
    args.values_[arg] = *value;
  }
  return args;
}

std::string CliArgs::GetString(const std::string& name, const std::string& fallback) const {
  auto it = values_.find(name);
  return it == values_.end() ? fallback : it->second;
}

absl::StatusOr<int64_t> CliArgs::GetInt(const std::string& name, int64_t fallback) const {
  auto it = values_.find(name);
  if (it == values_.end()) return fallback;
  int64_t v;
  if (!absl::SimpleAtoi(it->second, &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " expects an integer, got '", it->second, "'"));
  }
  return v;
}

absl::StatusOr<double> CliArgs::GetDouble(const std::string& name, double fallback) const {
  auto it = values_.find(name);
  if (it == values_.end()) return fallback;
  double v;
  if (!absl::SimpleAtod(it->second, &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " expects a number, got '", it->second, "'"));
  }
  return v;
}

absl::StatusOr<std::string> CliArgs::Required(const std::string& name) const {
  auto it = values_.find(name);
  if (it == values_.end())
    return absl::InvalidArgumentError(absl::StrCat("--", name, " is required"));
  return it->second;
}

std::string FlagHelp(const std::vector<FlagSpec>& specs) {
  std::string out;
  for (const auto& s : specs) {
    std::string left = absl::StrCat("  --", s.name, s.is_bool ? "" : " V");
    if (left.size() < 24) left.resize(24, ' ');
    absl::StrAppend(&out, left, " ", s.help, "\n");
  }
  return out;
}

int SubcommandMain(int argc, char** argv, const char* name, const char* usage,
                   const std::vector<FlagSpec>& command_specs,
                   const std::function<absl::Status(const CliArgs&)>& run) {
  // Every command takes --help (the top-level usage promises it).
  std::vector<FlagSpec> specs = command_specs;
  if (std::none_of(specs.begin(), specs.end(),
                   [](const FlagSpec& s) { return s.name == "help"; })) {
    specs.push_back({"help", true, "show this help"});
  }
  auto args = CliArgs::Parse(argc, argv, 2, specs);
  if (args.ok() && args->GetBool("help")) {
    std::printf("usage: pdserve %s %s\n%s", name, usage, FlagHelp(specs).c_str());
    return 0;
  }
  absl::Status status = args.ok() ? run(*args) : args.status();
  if (!status.ok()) {
    std::fprintf(stderr, "pdserve %s: %s\n", name, status.ToString().c_str());
    return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}

}  // namespace pds::server
