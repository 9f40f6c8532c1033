// Token selection from one row of logits (fp32). Pure functions of their inputs: the random
// draw comes in as `u`, so the same seed gives the same token whatever the batch.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace pds::kernels {

// How one row of logits becomes a token (what SampleLogits takes, plus greedy): temperature
// 0 or top_k 1 is argmax.
struct RowSampling {
  float temperature = 0.0f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  double u = 0.0;  // the row's uniform draw in [0, 1)
  bool greedy() const { return temperature == 0.0f || top_k == 1; }
};

}  // namespace pds::kernels

namespace pds::kernels::cpu {

// Index of the largest logit (lowest index on ties); NaN logits are never chosen.
int32_t Argmax(const float* logits, int64_t n);

// Samples from softmax(logits / temperature) restricted to the top_k largest logits
// (top_k <= 0: all) and then to the smallest prefix whose probability reaches top_p
// (top_p >= 1: all). u in [0, 1). temperature must be > 0. The rule orders candidates by logit
// (then lower id first) and walks their running mass to u times the total; it is computed by
// selection (expected linear time, tokens more than 69 T below the top left out: they have no
// mass), not by sorting the row.
int32_t SampleLogits(const float* logits, int64_t n, float temperature, int32_t top_k, float top_p,
                     double u);

// A row's token by its rule: Argmax when greedy, else SampleLogits.
int32_t DrawToken(const float* logits, int64_t n, const RowSampling& rule);

// log_softmax(logits)[id].
float LogProb(const float* logits, int64_t n, int32_t id);

// The k largest entries of log_softmax(logits) as (id, logprob), highest first (ties: the
// lower id first).
std::vector<std::pair<int32_t, float>> TopLogProbs(const float* logits, int64_t n, int32_t k);

// Both at once (one log-softmax): returns LogProb(id) and sets `top` to TopLogProbs(k), and
// `rank` (when given) to id's rank in the row: 1 + how many logits are larger.
float LogProbAndTop(const float* logits, int64_t n, int32_t id, int32_t k,
                    std::vector<std::pair<int32_t, float>>& top, int32_t* rank = nullptr);

}  // namespace pds::kernels::cpu
