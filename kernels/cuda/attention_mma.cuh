// The mma.sync building blocks of the tensor-core attention kernels (prefill and decode):
// m16n8k16 with 16-bit inputs and fp32 accumulation, fragment loads by ldmatrix, packing and
// exp2. Not a public header.
//
// Fragment layouts (PTX m16n8k16, lane l, g = l / 4, t = l % 4): A (16 x 16, row-major) a[0] =
// (row g, k 2t and 2t + 1), a[1] = (row g + 8, k 2t..), a[2] = (row g, k 8 + 2t..), a[3] = (row
// g + 8, k 8 + 2t..); B (16 x 8, k x n) b0 = (k 2t..2t + 1, n g), b1 = (k 8 + 2t.., n g); C/D
// (16 x 8) d[0], d[1] = (row g, n 2t, 2t + 1), d[2], d[3] = (row g + 8, n 2t, 2t + 1).
#pragma once

#include "kernels/cuda/attention_internal.cuh"

namespace pds::kernels::cuda {

template <typename T>
__device__ __forceinline__ void Mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);

template <>
__device__ __forceinline__ void Mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void Mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                 uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two values rounded into one 32-bit register of 16-bit halves (the first in the low half).
template <typename T>
__device__ __forceinline__ uint32_t Pack(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t Pack<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t Pack<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// 2^x (MUFU.EX2; subnormal results flush to zero, 2^-inf = 0).
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Four 8x8 16-bit matrices from shared memory (a 32-bit shared address): matrix i has its rows
// at the addresses of lanes 8i..8i+7 (16 bytes each, 16-byte aligned); r[i] gets lane l's
// elements (row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1) of matrix i, or with .trans those
// of the transposed matrix.
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

}  // namespace pds::kernels::cuda
