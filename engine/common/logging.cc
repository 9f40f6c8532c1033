#include "engine/common/logging.h"

#include <mutex>
#include <string>

#include "spdlog/sinks/stdout_color_sinks.h"

namespace pds {
namespace {
std::mutex& LoggerMutex() {
  static std::mutex mu;
  return mu;
}
spdlog::level::level_enum& DefaultLevel() {
  static spdlog::level::level_enum level = spdlog::level::info;
  return level;
}
}  // namespace

std::shared_ptr<spdlog::logger> Logger(absl::string_view component) {
  std::lock_guard<std::mutex> lock(LoggerMutex());
  const std::string name(component);
  if (auto existing = spdlog::get(name)) return existing;
  auto logger = spdlog::stderr_color_mt(name);
  logger->set_pattern("[%H:%M:%S.%e] [%n] [%^%l%$] %v");
  logger->set_level(DefaultLevel());
  return logger;
}

void SetLogLevel(absl::string_view level) {
  std::lock_guard<std::mutex> lock(LoggerMutex());
  DefaultLevel() = spdlog::level::from_str(std::string(level));
  spdlog::apply_all([](const std::shared_ptr<spdlog::logger>& l) { l->set_level(DefaultLevel()); });
}

}  // namespace pds
