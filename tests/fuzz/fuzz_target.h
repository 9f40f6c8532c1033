// A fuzz target: LLVMFuzzerTestOneInput for libFuzzer (-DPDS_FUZZ=ON with clang), plus seed
// inputs for the bounded replay driver (fuzz_driver.cc) that runs in the normal test suite.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
std::vector<std::string> FuzzSeeds();
