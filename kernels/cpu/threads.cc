#include "kernels/threads.h"

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace pds::kernels::cpu {
namespace {

// A fixed pool that runs one ParallelFor at a time; the calling thread takes a share too.
class Pool {
 public:
  void Resize(int n) {
    std::unique_lock<std::mutex> run_lock(run_mu_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      ++generation_;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = false;
    num_threads_ = std::max(1, n);
    const uint64_t start = generation_;  // workers wait for the first Run after this
    for (int i = 1; i < num_threads_; ++i) {
      workers_.emplace_back([this, i, start] { Loop(i, start); });
    }
  }

  int num_threads() const { return num_threads_; }

  void Run(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    if (num_threads_ <= 1 || n <= 1) {
      fn(0, n);
      return;
    }
    std::unique_lock<std::mutex> run_lock(run_mu_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      n_ = n;
      pending_ = num_threads_ - 1;
      ++generation_;
    }
    cv_.notify_all();
    Chunk(0, fn);
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [this] { return pending_ == 0; });
    fn_ = nullptr;
  }

 private:
  void Chunk(int index, const std::function<void(int64_t, int64_t)>& fn) {
    const int64_t per = (n_ + num_threads_ - 1) / num_threads_;
    const int64_t begin = std::min<int64_t>(n_, index * per);
    const int64_t end = std::min<int64_t>(n_, begin + per);
    if (begin < end) fn(begin, end);
  }

  void Loop(int index, uint64_t seen) {
    while (true) {
      const std::function<void(int64_t, int64_t)>* fn;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (stop_) return;
        fn = fn_;
      }
      Chunk(index, *fn);
      std::lock_guard<std::mutex> lock(mu_);
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }

  std::mutex run_mu_;  // one Run or Resize at a time
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  int num_threads_ = 1;
};

Pool& GetPool() {
  static Pool* pool = new Pool();  // never destroyed: workers may outlive static teardown
  return *pool;
}

}  // namespace

void SetNumThreads(int n) {
  n = std::max(1, n);
  openblas_set_num_threads(1);  // Gemm splits work over our pool instead
  if (GetPool().num_threads() != n) GetPool().Resize(n);
}

int NumThreads() { return GetPool().num_threads(); }

void ParallelFor(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  GetPool().Run(n, fn);
}

}  // namespace pds::kernels::cpu
