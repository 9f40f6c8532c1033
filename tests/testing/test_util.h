// Shared test helpers: closeness checks, seeded random data, tiny model directories.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/common/dtype.h"
#include "engine/model/config.h"
#include "gtest/gtest.h"

namespace pds::testing {

// Checks |actual - expected| <= atol + rtol * |expected| elementwise; zero mismatches
// allowed, NaN/Inf in either always fails. Reports the worst element.
::testing::AssertionResult AllClose(const std::vector<float>& actual,
                                    const std::vector<double>& expected, double rtol, double atol);
::testing::AssertionResult AllClose(const std::vector<float>& actual,
                                    const std::vector<float>& expected, double rtol, double atol);

// Relative error of `actual` against `expected` measured against the largest magnitude of
// `expected` (max |a - e| / max |e|).
double MaxRelativeError(const std::vector<float>& actual, const std::vector<double>& expected);

// Fixed-seed uniform values in [lo, hi).
std::vector<float> RandomVector(size_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f);

// A directory private to this test process (ctest runs test cases of one binary in parallel
// processes), removed when the process exits.
const std::string& ScratchDir();

// Writes a random model with `config` into a fresh directory under the test temp dir and
// returns its path. `shard_bytes` > 0 shards the weights.
absl::StatusOr<std::string> MakeModelDir(const engine::ModelConfig& config, const std::string& name,
                                         uint64_t seed = 1,
                                         engine::DType dtype = engine::DType::kF32,
                                         int64_t shard_bytes = 0, bool tokenizer = false);

// A small Llama-style config for tests (vocab 300, hidden 48, 2 layers, 4 heads, 2 kv heads).
engine::ModelConfig SmallTestConfig();

// True when a CUDA device is usable (false in builds without CUDA).
bool HasCudaDevice();

// A port on 127.0.0.1 that was free a moment ago (bound, read back, closed); 0 if none.
int FreeLoopbackPort();

}  // namespace pds::testing
