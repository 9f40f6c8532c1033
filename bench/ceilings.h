// Hardware ceilings measured in the same run as the benchmarks that are compared to them.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace pds::bench {

// Sustained read bandwidth of main memory in bytes/s (sum over a buffer far larger than the
// caches, all configured threads), measured once and cached.
double MeasuredReadBandwidth();
// Sustained fp32 GEMM rate in FLOP/s (OpenBLAS, 1024^3, configured threads), measured once.
double MeasuredGemmRate();

// The main of every benchmark program: sets the CPU threads from PDS_THREADS (default 2),
// records the ceilings and `context` (name -> value) in the output, runs the benchmarks.
int RunBenchmarks(int argc, char** argv,
                  const std::vector<std::pair<std::string, std::string>>& context = {});

}  // namespace pds::bench
