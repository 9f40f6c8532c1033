// Several front-ends as one GenerateClient: requests go to them in turn, and a request a
// front-end refuses before answering anything (UNAVAILABLE with no message: it is draining, or
// gone) is sent to the next one, up to once per front-end, within its deadline. The client sees
// one call either way.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "client/serving_client.h"

namespace pds::client {

class MultiClient : public GenerateClient {
 public:
  // `clients` (at least one) in the order requests go round them.
  explicit MultiClient(std::vector<std::unique_ptr<GenerateClient>> clients);

  const std::string& target() const override { return target_; }  // the targets, joined by ','
  // OK once every target answers; UNAVAILABLE naming those that do not.
  absl::Status WaitForConnected(absl::Duration timeout) override;
  // The first target's that answers.
  absl::StatusOr<pdserve::v1::ClusterStatus> GetClusterStatus(absl::Duration timeout) override;
  std::shared_ptr<GenerateCall> StartGenerate(const pdserve::v1::GenerateRequest& request,
                                              absl::Duration timeout,
                                              GenerateCallbacks callbacks) override;

  GenerateClient& client(size_t i) { return *clients_[i]; }
  size_t size() const { return clients_.size(); }
  // Requests sent again to another target after a refusal.
  int64_t failovers() const { return failovers_.load(); }

 private:
  class Call;
  std::vector<std::unique_ptr<GenerateClient>> clients_;
  std::string target_;
  std::atomic<uint64_t> next_{0};
  std::atomic<int64_t> failovers_{0};
};

}  // namespace pds::client
