// A small command-line parser for pdserve's subcommands: --name value, --name=value and
// boolean --name; unknown flags are errors.
#pragma once

#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace pds::server {

struct FlagSpec {
  std::string name;  // without the leading dashes
  bool is_bool = false;
  std::string help;
};

class CliArgs {
 public:
  // Parses argv[first..argc). INVALID_ARGUMENT names an unknown flag or a missing value.
  static absl::StatusOr<CliArgs> Parse(int argc, char** argv, int first,
                                       const std::vector<FlagSpec>& specs);

  bool Has(const std::string& name) const { return values_.count(name) > 0; }
  std::string GetString(const std::string& name, const std::string& fallback = "") const;
  absl::StatusOr<int64_t> GetInt(const std::string& name, int64_t fallback) const;
  absl::StatusOr<double> GetDouble(const std::string& name, double fallback) const;
  absl::StatusOr<std::string> Required(const std::string& name) const;
  bool GetBool(const std::string& name) const { return Has(name); }

 private:
  std::map<std::string, std::string> values_;
};

// "Usage" text for a subcommand's flags.
std::string FlagHelp(const std::vector<FlagSpec>& specs);

// The main of a subcommand: parses flags (argv[2..]), prints `usage` and the flags for
// --help, runs `run`, and turns its status into a message on stderr and an exit code
// (0 ok, 2 bad arguments, 1 other errors).
int SubcommandMain(int argc, char** argv, const char* name, const char* usage,
                   const std::vector<FlagSpec>& specs,
                   const std::function<absl::Status(const CliArgs&)>& run);

}  // namespace pds::server
