// Vectorization helpers for CPU kernels: hot functions are compiled for AVX-512, AVX2 and a
// baseline, chosen at load time (GCC target_clones), so one binary runs everywhere and is
// fast where it can be. Loops use `#pragma omp simd` (-fopenmp-simd, no OpenMP runtime).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PDS_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PDS_SIMD_CLONES
#endif

#define PDS_ALWAYS_INLINE inline __attribute__((always_inline))
