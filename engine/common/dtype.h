// Element types of tensors and weight files, with scalar conversions.
#pragma once

#include <cstdint>
#include <cstring>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace pds::engine {

enum class DType : uint8_t { kF32, kF16, kBF16 };

size_t DTypeSize(DType dtype);
absl::string_view DTypeName(DType dtype);  // "F32", "F16", "BF16" (safetensors names)
absl::StatusOr<DType> ParseDType(
    absl::string_view name);  // accepts safetensors names and f32/fp16/...

inline float Bf16ToFloat(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest even; NaN stays NaN.
inline uint16_t FloatToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

float F16ToFloat(uint16_t v);
uint16_t FloatToF16(float f);

// Converts `n` elements of `src` (of type `dtype`) to float.
void ConvertToFloat(DType dtype, const void* src, float* dst, size_t n);
// Converts `n` floats to `dtype` into `dst`.
void ConvertFromFloat(DType dtype, const float* src, void* dst, size_t n);

}  // namespace pds::engine
