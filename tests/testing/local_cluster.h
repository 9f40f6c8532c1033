// A `pdserve up` child process for integration tests: 127.0.0.1, ephemeral port, stopped
// (SIGTERM, then SIGKILL after 30 s) when destroyed; it also dies with the test process.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

namespace pds::testing {

class LocalCluster {
 public:
  // Starts `binary up --model MODEL --port 0 --threads 1 FLAGS...` and waits (120 s at most)
  // until it is ready. Null (with a test failure recorded) if it does not come up.
  static std::unique_ptr<LocalCluster> Start(const std::string& binary, const std::string& model,
                                             std::vector<std::string> flags);
  ~LocalCluster();
  LocalCluster(const LocalCluster&) = delete;
  LocalCluster& operator=(const LocalCluster&) = delete;

  // Stops the cluster; its exit code (-1 if it had to be killed or died by a signal).
  int Stop();
  const std::string& address() const { return address_; }
  pid_t pid() const { return pid_; }
  // The pids of the processes `pdserve up` started (front-end first).
  std::vector<pid_t> Children() const;

 private:
  LocalCluster() = default;
  pid_t pid_ = -1;
  int exit_code_ = 0;
  std::string address_;
};

}  // namespace pds::testing
