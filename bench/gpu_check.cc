#include "bench/gpu_check.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"

namespace pds::bench {
namespace {

std::atomic<const char*> g_tool{"bench"};
std::atomic<const char*> g_stage{"startup"};
std::function<void()>& CleanupHook() {
  static auto* const cleanup = new std::function<void()>();
  return *cleanup;
}

[[noreturn]] void Exit(int code) {
  if (CleanupHook()) CleanupHook()();
  std::fflush(stdout);
  std::fflush(stderr);
  std::_Exit(code);
}

}  // namespace

void SetTool(const char* name) { g_tool = name; }
const char* Tool() { return g_tool.load(); }
void SetStage(const char* stage) { g_stage = stage; }
void SetCleanup(std::function<void()> cleanup) { CleanupHook() = std::move(cleanup); }

void Fail(const std::string& what) {
  std::fprintf(stderr, "%s: FAILED in stage '%s': %s\n", Tool(), g_stage.load(), what.c_str());
  Exit(1);
}

void CheckCuda(cudaError_t err, const char* expr) {
  if (err != cudaSuccess) {
    Fail(absl::StrCat("CUDA error ", cudaGetErrorName(err), " (", cudaGetErrorString(err),
                      ") from ", expr));
  }
}

void Check(const absl::Status& status, const char* expr) {
  if (!status.ok()) Fail(absl::StrCat(status.ToString(), " from ", expr));
}

Watchdog::Watchdog(double seconds) : seconds_(seconds) {
  if (seconds_ <= 0) return;
  thread_ = std::thread([this] {
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_for(lock, std::chrono::duration<double>(seconds_), [this] { return done_; })) {
      std::fprintf(stderr, "%s: FAILED: watchdog: no result after %.0f s (stage '%s')\n", Tool(),
                   seconds_, g_stage.load());
      Exit(3);
    }
  });
}

Watchdog::~Watchdog() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

}  // namespace pds::bench
