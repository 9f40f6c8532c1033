#include "tests/testing/local_cluster.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/testing/test_util.h"

namespace pds::testing {

std::unique_ptr<LocalCluster> LocalCluster::Start(const std::string& binary,
                                                  const std::string& model,
                                                  std::vector<std::string> flags) {
  auto cluster = std::unique_ptr<LocalCluster>(new LocalCluster());
  static int counter = 0;
  const std::string ready = absl::StrCat(ScratchDir(), "/ready-", getpid(), "-", counter++);
  std::filesystem::remove(ready);
  std::vector<std::string> argv = {binary, "up",           "--model", model,       "--port",
                                   "0",    "--ready-file", ready,     "--threads", "1"};
  for (std::string& f : flags) argv.push_back(std::move(f));
  std::vector<char*> cargv;
  for (std::string& a : argv) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  cluster->pid_ = fork();
  if (cluster->pid_ == 0) {
    prctl(PR_SET_PDEATHSIG, SIGTERM);  // never outlive the test
    execv(binary.c_str(), cargv.data());
    _exit(127);
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(120);
  while (absl::Now() < deadline) {
    std::ifstream in(ready);
    std::string line;
    if (in && std::getline(in, line) && !line.empty()) {
      cluster->address_ = line;
      return cluster;
    }
    int status;
    if (waitpid(cluster->pid_, &status, WNOHANG) == cluster->pid_) {
      cluster->pid_ = -1;
      ADD_FAILURE() << "pdserve up exited during start-up";
      return nullptr;
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  ADD_FAILURE() << "cluster not ready within 120 s";
  return nullptr;
}

LocalCluster::~LocalCluster() { EXPECT_EQ(Stop(), 0) << "pdserve up did not exit cleanly"; }

std::vector<pid_t> LocalCluster::Children() const {
  std::vector<pid_t> pids;
  std::ifstream in(absl::StrCat("/proc/", pid_, "/task/", pid_, "/children"));
  pid_t pid;
  while (in >> pid) pids.push_back(pid);
  return pids;
}

int LocalCluster::Stop() {
  if (pid_ <= 0) return exit_code_;
  kill(pid_, SIGTERM);
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  int status = 0;
  while (waitpid(pid_, &status, WNOHANG) == 0) {
    if (absl::Now() > deadline) {
      kill(pid_, SIGKILL);
      waitpid(pid_, &status, 0);
      pid_ = -1;
      return exit_code_ = -1;
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  pid_ = -1;
  return exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace pds::testing
