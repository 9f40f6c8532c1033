// Fuzzes the safetensors header parser: any bytes must give a status, never a crash, and an
// accepted header must describe tensors inside the buffer.
#include <cstdlib>

#include "engine/model/safetensors.h"
#include "tests/fuzz/fuzz_target.h"

namespace {
std::string File(const std::string& header, size_t data_bytes) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return out + header + std::string(data_bytes, '\x01');
}
}  // namespace

std::vector<std::string> FuzzSeeds() {
  return {
      File(R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})", 24),
      File(
          R"({"__metadata__":{"format":"pt"},"w":{"dtype":"BF16","shape":[4],"data_offsets":[0,8]},)"
          R"("b":{"dtype":"F16","shape":[],"data_offsets":[8,10]}})",
          10),
      File(R"({"x":{"dtype":"I64","shape":[1,1,1],"data_offsets":[0,8]}})", 8),
      File("{}", 0),
      std::string("\xff\xff\xff\xff\xff\xff\xff\xff", 8),
  };
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  uint64_t data_start = 0;
  auto tensors = pds::engine::ParseSafetensorsHeader(data, size, "fuzz", &data_start);
  if (tensors.ok()) {
    for (const auto& t : *tensors) {
      if (data_start + t.end > size || t.begin > t.end) std::abort();
      if (static_cast<uint64_t>(t.numel()) * t.element_size != t.end - t.begin) std::abort();
    }
  }
  return 0;
}
