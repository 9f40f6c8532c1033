#include "engine/runtime/kv_handoff.h"

#include <algorithm>
#include <chrono>
#include <span>
#include <thread>

#include "absl/strings/str_cat.h"
#include "engine/common/status_macros.h"

namespace pds::engine {
namespace {

// Waits on `cv` until `done()` holds, in slices so that `cancelled` and the deadline are seen.
template <typename Done>
absl::Status WaitUntil(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                       absl::Time deadline, const std::function<bool()>& cancelled, Done done,
                       const char* what) {
  while (!done()) {
    if (cancelled && cancelled()) return absl::CancelledError(absl::StrCat("cancelled ", what));
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      return absl::DeadlineExceededError(absl::StrCat("deadline exceeded ", what));
    }
    cv.wait_for(lock, absl::ToChronoMicroseconds(std::min(left, absl::Milliseconds(5))));
  }
  return absl::OkStatus();
}

}  // namespace

void LayerProgress::Issued(int32_t layer, std::shared_ptr<Backend::Mark> mark) {
  std::lock_guard<std::mutex> lock(mu_);
  if (layer != issued_ || layer >= num_layers()) return;  // out of order: ignored (a bug)
  marks_[static_cast<size_t>(layer)] = std::move(mark);
  ++issued_;
  cv_.notify_all();
}

void LayerProgress::End(absl::Status status) {
  std::lock_guard<std::mutex> lock(mu_);
  if (ended_.has_value()) return;
  ended_ = std::move(status);
  cv_.notify_all();
}

absl::StatusOr<bool> LayerProgress::Ready(int32_t layer) {
  std::shared_ptr<Backend::Mark> mark;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (layer < 0 || layer >= num_layers()) {
      return absl::OutOfRangeError(absl::StrCat("layer ", layer, " of ", num_layers()));
    }
    if (ended_.has_value()) {
      if (!ended_->ok()) return *ended_;
      return true;
    }
    if (layer >= issued_) return false;
    mark = marks_[static_cast<size_t>(layer)];
  }
  if (mark == nullptr) return true;
  return mark->Reached();
}

absl::Status LayerProgress::Wait(int32_t layer, absl::Time deadline,
                                 const std::function<bool()>& cancelled) {
  const std::string what = absl::StrCat("waiting for layer ", layer, " of ", num_layers());
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (layer < 0 || layer >= num_layers()) return absl::OutOfRangeError(what);
    absl::Status issued = WaitUntil(
        lock, cv_, deadline, cancelled, [&] { return layer < issued_ || ended_.has_value(); },
        what.c_str());
    if (!issued.ok()) return issued;
  }
  // Issued: poll its mark (a device's writes finish within the layer's time), yielding first,
  // then with short naps.
  absl::Duration nap = absl::Microseconds(10);
  const absl::Time spin_until = absl::Now() + absl::Microseconds(200);
  while (true) {
    absl::StatusOr<bool> ready = Ready(layer);
    if (!ready.ok()) return ready.status();
    if (*ready) return absl::OkStatus();
    if (cancelled && cancelled()) return absl::CancelledError(absl::StrCat("cancelled ", what));
    const absl::Time now = absl::Now();
    if (now >= deadline)
      return absl::DeadlineExceededError(absl::StrCat("deadline exceeded ", what));
    if (now < spin_until) {
      std::this_thread::yield();
    } else {
      absl::SleepFor(std::min(nap, deadline - now));
      nap = std::min(nap * 2, absl::Microseconds(100));
    }
  }
}

void KvHandoff::Resolve(absl::StatusOr<int32_t> next_token) {
  std::lock_guard<std::mutex> lock(mu_);
  if (next_token_.has_value()) return;
  next_token_ = std::move(next_token);
  cv_.notify_all();
}

absl::StatusOr<int32_t> KvHandoff::WaitNextToken(absl::Time deadline,
                                                 const std::function<bool()>& cancelled) {
  std::unique_lock<std::mutex> lock(mu_);
  absl::Status waited = WaitUntil(
      lock, cv_, deadline, cancelled, [&] { return next_token_.has_value(); },
      "waiting for the token after the prompt");
  if (!waited.ok()) return waited;
  return *next_token_;
}

KvTransferHeader KvHeaderFor(const KvCache& cache, DType dtype, const std::string& request_id,
                             int32_t num_tokens, int32_t num_blocks, int32_t next_token) {
  const KvCacheShape& shape = cache.shape();
  KvTransferHeader h;
  h.request_id = request_id;
  h.num_tokens = num_tokens;
  h.num_layers = shape.num_layers;
  h.num_blocks = num_blocks;
  h.kv_heads = shape.kv_heads;
  h.block_size = shape.block_size;
  h.head_dim = shape.head_dim;
  h.dtype = dtype;
  h.next_token = next_token;
  return h;
}

absl::Status CacheKvSource::WaitLayer(int32_t layer) {
  if (handoff_ == nullptr) return absl::OkStatus();
  return handoff_->layers().Wait(layer, deadline_, cancelled_);
}

bool CacheKvSource::LayerReady(int32_t layer) {
  if (handoff_ == nullptr) return true;
  absl::StatusOr<bool> ready = handoff_->layers().Ready(layer);
  return !ready.ok() || *ready;  // an error: WaitLayer reports it at once
}

absl::StatusOr<int32_t> CacheKvSource::NextToken() {
  if (handoff_ == nullptr) return KvSource::NextToken();
  return handoff_->WaitNextToken(deadline_, cancelled_);
}

absl::Status CacheKvSource::ReadLayer(int32_t layer, int32_t first_block, uint8_t* dst,
                                      size_t bytes) {
  PDS_RETURN_IF_ERROR(WaitLayer(layer));
  const size_t block_bytes = cache_.shape().BlockBytes(backend_.compute_dtype());
  if (first_block < 0 || first_block >= static_cast<int32_t>(blocks_.size())) {
    return absl::InternalError(
        absl::StrCat("reading from block ", first_block, " of ", blocks_.size()));
  }
  const std::span<const int32_t> moved = std::span<const int32_t>(blocks_).subspan(first_block);
  if (bytes != 2 * moved.size() * block_bytes) {
    return absl::InternalError(absl::StrCat("layer buffer of ", bytes, " bytes, expected ",
                                            2 * moved.size() * block_bytes));
  }
  for (int kv = 0; kv < 2; ++kv) {
    const auto* pool = static_cast<const uint8_t*>(kv == 0 ? cache_.k(layer) : cache_.v(layer));
    for (int32_t block : moved) {
      PDS_RETURN_IF_ERROR(backend_.CopyToHost(dst, pool + block * block_bytes, block_bytes));
      dst += block_bytes;
    }
  }
  return absl::OkStatus();
}

}  // namespace pds::engine
