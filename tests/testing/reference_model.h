// Independent float64 reference of the HF transformers forward pass for Llama-family decoders
// (Llama, Mistral, Qwen2, Qwen3). Reads the HF model directory itself and shares no code with
// the engine; meant only for checking the engine's numerics in tests.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace pds::testing {

class ReferenceModel {
 public:
  // Loads <dir>/config.json and weights from <dir>/model.safetensors, or from the shards listed
  // in <dir>/model.safetensors.index.json ("weight_map": tensor name -> file name).
  static absl::StatusOr<ReferenceModel> Load(const std::string& dir);

  // Full causal forward over `tokens` (positions 0..n-1, no cache). Returns logits for every
  // position: result[i] has vocab_size() doubles. Returns an empty vector if any token is
  // outside [0, vocab_size()).
  std::vector<std::vector<double>> Forward(const std::vector<int32_t>& tokens) const;

  int vocab_size() const { return vocab_size_; }

 private:
  // y = x W^T + b with W stored row-major as [out, in]; `b` is empty when there is no bias.
  struct Linear {
    int out = 0;
    int in = 0;
    std::vector<double> w;
    std::vector<double> b;
  };
  struct Layer {
    std::vector<double> input_norm;
    std::vector<double> post_attention_norm;
    Linear q, k, v, o;
    std::vector<double> q_norm;  // Qwen3 only; empty otherwise.
    std::vector<double> k_norm;
    Linear gate, up, down;
    int sliding_window = 0;  // 0: full causal attention.
  };

  static std::vector<double> Apply(const Linear& lin, const std::vector<double>& x);
  static std::vector<double> RmsNorm(const std::vector<double>& x, const std::vector<double>& w,
                                     double eps);
  void Rope(double* x, int pos) const;

  int vocab_size_ = 0;
  int hidden_ = 0;
  int num_heads_ = 0;
  int num_kv_heads_ = 0;
  int head_dim_ = 0;
  double eps_ = 1e-6;
  std::vector<double> inv_freq_;  // head_dim / 2 entries, scaling already applied.
  std::vector<double> embed_;     // [vocab, hidden]
  std::vector<Layer> layers_;
  std::vector<double> final_norm_;
  bool tied_ = false;
  Linear lm_head_;  // Unused when tied_.
};

}  // namespace pds::testing
