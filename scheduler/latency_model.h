// The latency model of DistServe's form, fitted from profiles of the real engine:
//   prefill batch time = a + b * sum(l) + c * sum(l^2)        (l: prompt lengths)
//   decode step time   = a + b * sum(context) + c * batch + d * max(0, batch - knee)
// The knee term is the roofline's: a decode step reads all weights whatever the batch
// (memory-bound) until the batch's arithmetic catches up with memory (compute-bound), where
// the cost per sequence steepens. The knee is chosen among the profiled batch sizes (or none)
// by the fit; d = 0 without one, which is DistServe's form.
// Fitted by least squares on relative error (so short and long batches count alike), with
// the error on held-out samples reported. Pure logic: no engine, CUDA or gRPC types.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "nlohmann/json.hpp"

namespace pds::scheduler {

struct PrefillSample {
  std::vector<int32_t> prompt_lens;  // one batch
  double seconds = 0;
};

struct DecodeSample {
  int32_t batch = 0;
  int64_t total_context = 0;  // sum of the batch's context lengths
  double seconds = 0;
};

struct FitQuality {
  double median_rel_error = 0;  // on held-out samples
  double max_rel_error = 0;
  int32_t num_fit = 0;
  int32_t num_held_out = 0;
};

class LatencyModel {
 public:
  double PredictPrefill(absl::Span<const int32_t> prompt_lens) const;
  double PredictDecode(int32_t batch, int64_t total_context) const;

  // Fits both phases. Every fourth sample is held out to measure the error, then the
  // coefficients are refitted on all samples. INVALID_ARGUMENT with too few samples.
  static absl::StatusOr<LatencyModel> Fit(const std::vector<PrefillSample>& prefill,
                                          const std::vector<DecodeSample>& decode);

  const std::array<double, 3>& prefill_coef() const { return prefill_coef_; }
  const std::array<double, 3>& decode_coef() const { return decode_coef_; }
  int32_t decode_knee() const { return decode_knee_; }           // 0: no knee term
  double decode_knee_coef() const { return decode_knee_coef_; }  // d
  const FitQuality& prefill_quality() const { return prefill_quality_; }
  const FitQuality& decode_quality() const { return decode_quality_; }

  nlohmann::json ToJson() const;
  static absl::StatusOr<LatencyModel> FromJson(const nlohmann::json& j);

  // The same model with every predicted step time multiplied by `factor` (> 0): for
  // deployments whose live steps run slower than the profile measured them, e.g. CPU
  // instances sharing cores with the front-end and the load generator.
  LatencyModel Scaled(double factor) const;

 private:
  absl::Status FitDecodeKnee(const std::vector<DecodeSample>& decode);
  std::array<double, 3> prefill_coef_{};
  std::array<double, 3> decode_coef_{};
  int32_t decode_knee_ = 0;
  double decode_knee_coef_ = 0;
  FitQuality prefill_quality_, decode_quality_;
};

// Reads a `pdserve profile` file (its "latency_model" object). NOT_FOUND when unreadable,
// INVALID_ARGUMENT naming the file when it is not a profile.
absl::StatusOr<LatencyModel> LoadLatencyModelFile(const std::string& path);

// A step's time (seconds) as the simulator, the planner and the dispatch predictions charge it.
// Prefill chunks (k new tokens after s computed ones): a + b * (sum(k) + extra_linear_tokens)
// + c * sum((s + k)^2 - s^2), 0 for no chunk (extra_linear_tokens: tokens charged their
// per-token cost only, e.g. other prompts' chunks whose prefixes are not known).
double PrefillChunkSeconds(const LatencyModel& model,
                           const std::vector<std::pair<int32_t, int32_t>>& start_and_len,
                           int64_t extra_linear_tokens = 0);
// Decodes of `batch` sequences with `total_context` tokens in all (0 for none).
double DecodeStepSeconds(const LatencyModel& model, int32_t batch, int64_t total_context);

// Weighted least squares: minimizes sum_i w_i (x_i . beta - y_i)^2 over any number of
// features (every row the same length).
absl::StatusOr<std::vector<double>> LeastSquares(const std::vector<std::vector<double>>& x,
                                                 const std::vector<double>& y,
                                                 const std::vector<double>& w);
// The same for exactly 3 features.
absl::StatusOr<std::array<double, 3>> LeastSquares3(const std::vector<std::array<double, 3>>& x,
                                                    const std::vector<double>& y,
                                                    const std::vector<double>& w);

}  // namespace pds::scheduler
