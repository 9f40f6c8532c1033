// The counter-based random values of Backend::FillRandom, shared by the CPU and CUDA
// backends (host and device code) so that both fill identical values before rounding.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PDS_HOST_DEVICE __host__ __device__
#else
#define PDS_HOST_DEVICE
#endif

namespace pds::kernels {

// offset + scale * u with u uniform in [-1, 1) from a splitmix64 hash of (seed, index).
PDS_HOST_DEVICE inline float RandomFillValue(uint64_t seed, uint64_t index, float scale,
                                             float offset) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + index + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  const float u = static_cast<float>(z >> 40) * (1.0f / 8388608.0f) - 1.0f;
  return offset + scale * u;
}

}  // namespace pds::kernels
