// The failure machinery the GPU benchmarks share: every error ends the process with a message
// that names the tool and the stage running ("<tool>: FAILED in stage '<stage>': <what>", exit
// 1), and a watchdog ends it when a stage runs past a deadline (exit 3), so that a run never
// hangs. A tool sets its name once (SetTool), names each stage as it starts (SetStage), and may
// register cleanup (SetCleanup: kill a child process, remove a scratch directory) that runs on
// both of those exit paths.
#ifndef PDS_BENCH_GPU_CHECK_H_
#define PDS_BENCH_GPU_CHECK_H_

#include <cuda_runtime_api.h>

#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace pds::bench {

// The tool's name at the head of its messages; `name` must outlive the process (a literal).
// Set it before any other thread starts.
void SetTool(const char* name);
const char* Tool();

// Names the stage running now, for error and watchdog messages; `stage` must stay valid until
// the next call (a literal, or storage that outlives the stage).
void SetStage(const char* stage);

// Runs on every failure exit (Fail and the watchdog) before the process ends. Set it before
// the watchdog starts.
void SetCleanup(std::function<void()> cleanup);

// Prints "<tool>: FAILED in stage '<stage>': <what>", runs the cleanup and exits 1.
[[noreturn]] void Fail(const std::string& what);

void CheckCuda(cudaError_t err, const char* expr);
void Check(const absl::Status& status, const char* expr);

template <typename T>
T Take(absl::StatusOr<T> value, const char* expr) {
  Check(value.status(), expr);
  return std::move(value).value();
}

// Ends the process (after the cleanup) with exit 3 when it is not destroyed within `seconds`
// (a hung kernel or a deadlock); `seconds` <= 0: never.
class Watchdog {
 public:
  explicit Watchdog(double seconds);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  double seconds_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;  // guarded by mu_
  std::thread thread_;
};

}  // namespace pds::bench

#define CUDA_CHECK(expr) ::pds::bench::CheckCuda((expr), #expr)
#define PDS_CHECK_OK(expr) ::pds::bench::Check((expr), #expr)
#define PDS_TAKE(expr) ::pds::bench::Take((expr), #expr)

#endif  // PDS_BENCH_GPU_CHECK_H_
