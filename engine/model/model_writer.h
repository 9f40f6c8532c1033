// Writes HF-format model directories with random weights (`pdserve make-model`), and
// safetensors files in general.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "engine/common/dtype.h"
#include "engine/model/config.h"

namespace pds::engine {

// A tensor to write: `fill` produces elements [begin, begin + n) as floats.
struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  std::function<void(int64_t begin, int64_t n, float* out)> fill;
  int64_t numel() const;
};

// Writes one safetensors file with all tensors in `dtype`, streaming (bounded memory).
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorSpec>& tensors,
                              DType dtype);

struct MakeModelOptions {
  std::string out_dir;
  uint64_t seed = 0;
  DType dtype = DType::kF32;
  // Shard the weights into files of at most this many bytes (with an index); 0: one file.
  int64_t max_shard_bytes = 0;
  bool write_tokenizer = true;
};

// The tensors (names, shapes, seeded random contents) of a model with `config`. Values are
// scaled so that activations stay O(1) and generation is not degenerate.
std::vector<TensorSpec> RandomWeights(const ModelConfig& config, uint64_t seed);

// Writes config.json, generation_config.json, weights (model.safetensors or shards with
// model.safetensors.index.json) and, unless disabled, tokenizer.json and
// tokenizer_config.json whose vocabulary matches config.vocab_size (the tokenizer's special
// ids become the config's bos/eos ids).
absl::Status WriteRandomModel(ModelConfig config, const MakeModelOptions& options);

}  // namespace pds::engine
