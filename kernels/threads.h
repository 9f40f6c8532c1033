// CPU thread control: one setting for OpenBLAS and for our own parallel loops, so that
// several workers can share a small machine without oversubscribing it.
#pragma once

#include <cstdint>
#include <functional>

namespace pds::kernels::cpu {

// Sets the number of threads used by CPU ops (>= 1). Call before running ops.
void SetNumThreads(int n);
int NumThreads();

// Runs fn(begin, end) over [0, n) split into contiguous chunks on the pool; blocks until
// done. Runs inline when n is small or one thread is configured.
void ParallelFor(int64_t n, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace pds::kernels::cpu
