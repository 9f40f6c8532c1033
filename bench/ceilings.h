// Hardware ceilings measured in the same run as the benchmarks that are compared to them.
#pragma once

namespace pds::bench {

// Sustained read bandwidth of main memory in bytes/s (sum over a buffer far larger than the
// caches, all configured threads), measured once and cached.
double MeasuredReadBandwidth();
// Sustained fp32 GEMM rate in FLOP/s (OpenBLAS, 1024^3, configured threads), measured once.
double MeasuredGemmRate();

}  // namespace pds::bench
