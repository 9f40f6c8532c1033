// Fuzzes the config.json / generation_config.json parsers: any text gives a status or a
// config that passes the engine's invariants, never a crash.
#include <cstdlib>
#include <string>

#include "engine/model/config.h"
#include "tests/fuzz/fuzz_target.h"

std::vector<std::string> FuzzSeeds() {
  return {
      R"({"architectures":["LlamaForCausalLM"],"vocab_size":300,"hidden_size":48,)"
      R"("intermediate_size":100,"num_hidden_layers":2,"num_attention_heads":4,)"
      R"("num_key_value_heads":2,"rms_norm_eps":1e-5,"rope_theta":500000.0,)"
      R"("rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,)"
      R"("high_freq_factor":4.0,"original_max_position_embeddings":8192},"eos_token_id":[1,2]})",
      R"({"architectures":["Qwen3ForCausalLM"],"vocab_size":10,"hidden_size":8,"head_dim":4,)"
      R"("intermediate_size":3,"num_hidden_layers":1,"num_attention_heads":2,"bos_token_id":1})",
      R"({"architectures":["MistralForCausalLM"],"sliding_window":4096})",
      R"([1,2,3])",
  };
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto config = pds::engine::ParseModelConfig(text, "fuzz");
  if (config.ok()) {
    if (config->num_heads % config->num_kv_heads != 0 || config->head_dim <= 0 ||
        config->vocab_size <= 0) {
      std::abort();
    }
    (void)pds::engine::RopeInvFreq(*config);
    (void)pds::engine::ApplyGenerationConfig(text, "fuzz", *config);
  }
  return 0;
}
