#include "scheduler/latency_model.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace pds::scheduler {
namespace {

std::array<double, 3> PrefillFeatures(absl::Span<const int32_t> lens) {
  double sum = 0, sum_sq = 0;
  for (int32_t l : lens) {
    sum += l;
    sum_sq += static_cast<double>(l) * l;
  }
  return {1.0, sum, sum_sq};
}

std::array<double, 3> DecodeFeatures(int32_t batch, int64_t total_context) {
  return {1.0, static_cast<double>(total_context), static_cast<double>(batch)};
}

double Dot(const std::array<double, 3>& a, const std::array<double, 3>& b) {
  return a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
}

// Fits on the samples not held out (index % 4 != 3), measures the held-out relative error,
// then refits on everything.
absl::StatusOr<std::array<double, 3>> FitPhase(const std::vector<std::array<double, 3>>& x,
                                               const std::vector<double>& y, const char* phase,
                                               FitQuality& quality) {
  if (x.size() < 8) {
    return absl::InvalidArgumentError(
        absl::StrCat(phase, ": at least 8 samples are needed to fit, got ", x.size()));
  }
  for (double v : y) {
    if (!(v > 0) || !std::isfinite(v)) {
      return absl::InvalidArgumentError(absl::StrCat(phase, ": sample times must be positive"));
    }
  }
  auto weights = [&](const std::vector<double>& ys) {
    std::vector<double> w;
    for (double v : ys) w.push_back(1.0 / (v * v));  // relative error
    return w;
  };
  std::vector<std::array<double, 3>> fit_x, held_x;
  std::vector<double> fit_y, held_y;
  for (size_t i = 0; i < x.size(); ++i) {
    (i % 4 == 3 ? held_x : fit_x).push_back(x[i]);
    (i % 4 == 3 ? held_y : fit_y).push_back(y[i]);
  }
  auto partial = LeastSquares3(fit_x, fit_y, weights(fit_y));
  if (!partial.ok()) return partial.status();
  std::vector<double> errors;
  for (size_t i = 0; i < held_x.size(); ++i) {
    errors.push_back(std::abs(Dot(*partial, held_x[i]) - held_y[i]) / held_y[i]);
  }
  std::sort(errors.begin(), errors.end());
  quality.num_fit = static_cast<int32_t>(fit_x.size());
  quality.num_held_out = static_cast<int32_t>(held_x.size());
  quality.median_rel_error = errors[errors.size() / 2];
  quality.max_rel_error = errors.back();
  return LeastSquares3(x, y, weights(y));
}

}  // namespace

absl::StatusOr<std::array<double, 3>> LeastSquares3(const std::vector<std::array<double, 3>>& x,
                                                    const std::vector<double>& y,
                                                    const std::vector<double>& w) {
  // Normal equations with column scaling, solved by Gaussian elimination with pivoting.
  std::array<double, 3> scale{};
  for (const auto& row : x) {
    for (int k = 0; k < 3; ++k) scale[k] = std::max(scale[k], std::abs(row[k]));
  }
  for (double& s : scale) s = s > 0 ? s : 1.0;
  double a[3][4] = {};
  for (size_t i = 0; i < x.size(); ++i) {
    for (int r = 0; r < 3; ++r) {
      for (int c = 0; c < 3; ++c) a[r][c] += w[i] * x[i][r] / scale[r] * x[i][c] / scale[c];
      a[r][3] += w[i] * x[i][r] / scale[r] * y[i];
    }
  }
  for (int col = 0; col < 3; ++col) {
    int pivot = col;
    for (int r = col + 1; r < 3; ++r) {
      if (std::abs(a[r][col]) > std::abs(a[pivot][col])) pivot = r;
    }
    if (std::abs(a[pivot][col]) < 1e-300) {
      return absl::InvalidArgumentError("samples do not determine the model (singular system)");
    }
    std::swap(a[col], a[pivot]);
    for (int r = 0; r < 3; ++r) {
      if (r == col) continue;
      const double f = a[r][col] / a[col][col];
      for (int c = col; c < 4; ++c) a[r][c] -= f * a[col][c];
    }
  }
  std::array<double, 3> beta;
  for (int k = 0; k < 3; ++k) beta[k] = a[k][3] / a[k][k] / scale[k];
  return beta;
}

double LatencyModel::PredictPrefill(absl::Span<const int32_t> prompt_lens) const {
  return Dot(prefill_coef_, PrefillFeatures(prompt_lens));
}

double LatencyModel::PredictDecode(int32_t batch, int64_t total_context) const {
  return Dot(decode_coef_, DecodeFeatures(batch, total_context));
}

absl::StatusOr<LatencyModel> LatencyModel::Fit(const std::vector<PrefillSample>& prefill,
                                               const std::vector<DecodeSample>& decode) {
  LatencyModel model;
  std::vector<std::array<double, 3>> x;
  std::vector<double> y;
  for (const auto& s : prefill) {
    x.push_back(PrefillFeatures(s.prompt_lens));
    y.push_back(s.seconds);
  }
  auto p = FitPhase(x, y, "prefill", model.prefill_quality_);
  if (!p.ok()) return p.status();
  model.prefill_coef_ = *p;
  x.clear();
  y.clear();
  for (const auto& s : decode) {
    x.push_back(DecodeFeatures(s.batch, s.total_context));
    y.push_back(s.seconds);
  }
  auto d = FitPhase(x, y, "decode", model.decode_quality_);
  if (!d.ok()) return d.status();
  model.decode_coef_ = *d;
  return model;
}

nlohmann::json LatencyModel::ToJson() const {
  auto quality = [](const FitQuality& q) {
    return nlohmann::json{{"median_rel_error", q.median_rel_error},
                          {"max_rel_error", q.max_rel_error},
                          {"num_fit", q.num_fit},
                          {"num_held_out", q.num_held_out}};
  };
  return {{"prefill",
           {{"form", "a + b * sum(l) + c * sum(l^2)"},
            {"coef", prefill_coef_},
            {"fit", quality(prefill_quality_)}}},
          {"decode",
           {{"form", "a + b * sum(context) + c * batch"},
            {"coef", decode_coef_},
            {"fit", quality(decode_quality_)}}}};
}

absl::StatusOr<LatencyModel> LatencyModel::FromJson(const nlohmann::json& j) {
  LatencyModel model;
  auto read = [&](const char* phase, std::array<double, 3>& coef,
                  FitQuality& quality) -> absl::Status {
    if (!j.is_object() || !j.contains(phase) || !j[phase].is_object() ||
        !j[phase].contains("coef") || !j[phase]["coef"].is_array() ||
        j[phase]["coef"].size() != 3) {
      return absl::InvalidArgumentError(
          absl::StrCat("latency model: '", phase, ".coef' must be a list of 3 numbers"));
    }
    for (int k = 0; k < 3; ++k) {
      if (!j[phase]["coef"][k].is_number()) {
        return absl::InvalidArgumentError(
            absl::StrCat("latency model: ", phase, ".coef[", k, "] is not a number"));
      }
      coef[k] = j[phase]["coef"][k].get<double>();
    }
    if (j[phase].contains("fit") && j[phase]["fit"].is_object()) {
      const auto& f = j[phase]["fit"];
      quality.median_rel_error = f.value("median_rel_error", 0.0);
      quality.max_rel_error = f.value("max_rel_error", 0.0);
      quality.num_fit = f.value("num_fit", 0);
      quality.num_held_out = f.value("num_held_out", 0);
    }
    return absl::OkStatus();
  };
  absl::Status s = read("prefill", model.prefill_coef_, model.prefill_quality_);
  if (s.ok()) s = read("decode", model.decode_coef_, model.decode_quality_);
  if (!s.ok()) return s;
  return model;
}

}  // namespace pds::scheduler
