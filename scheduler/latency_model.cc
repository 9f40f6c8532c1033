#include "scheduler/latency_model.h"

#include <algorithm>
#include <cmath>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "engine/common/status_macros.h"

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

absl::StatusOr<std::vector<double>> LeastSquares(const std::vector<std::vector<double>>& x,
                                                 const std::vector<double>& y,
                                                 const std::vector<double>& w) {
  // Normal equations with column scaling, solved by Gaussian elimination with pivoting.
  if (x.empty()) return absl::InvalidArgumentError("no samples to fit");
  const size_t n = x[0].size();
  std::vector<double> scale(n, 0.0);
  for (const auto& row : x) {
    for (size_t k = 0; k < n; ++k) scale[k] = std::max(scale[k], std::abs(row[k]));
  }
  for (double& s : scale) s = s > 0 ? s : 1.0;
  std::vector<std::vector<double>> a(n, std::vector<double>(n + 1, 0.0));
  for (size_t i = 0; i < x.size(); ++i) {
    for (size_t r = 0; r < n; ++r) {
      for (size_t c = 0; c < n; ++c) a[r][c] += w[i] * x[i][r] / scale[r] * x[i][c] / scale[c];
      a[r][n] += w[i] * x[i][r] / scale[r] * y[i];
    }
  }
  for (size_t col = 0; col < n; ++col) {
    size_t pivot = col;
    for (size_t r = col + 1; r < n; ++r) {
      if (std::abs(a[r][col]) > std::abs(a[pivot][col])) pivot = r;
    }
    if (std::abs(a[pivot][col]) < 1e-12) {
      return absl::InvalidArgumentError("samples do not determine the model (singular system)");
    }
    std::swap(a[col], a[pivot]);
    for (size_t r = 0; r < n; ++r) {
      if (r == col) continue;
      const double f = a[r][col] / a[col][col];
      for (size_t c = col; c <= n; ++c) a[r][c] -= f * a[col][c];
    }
  }
  std::vector<double> beta(n);
  for (size_t k = 0; k < n; ++k) beta[k] = a[k][n] / a[k][k] / scale[k];
  return beta;
}

absl::StatusOr<std::array<double, 3>> LeastSquares3(const std::vector<std::array<double, 3>>& x,
                                                    const std::vector<double>& y,
                                                    const std::vector<double>& w) {
  std::vector<std::vector<double>> rows;
  for (const auto& r : x) rows.push_back({r[0], r[1], r[2]});
  auto beta = LeastSquares(rows, y, w);
  if (!beta.ok()) return beta.status();
  return std::array<double, 3>{(*beta)[0], (*beta)[1], (*beta)[2]};
}

double LatencyModel::PredictPrefill(absl::Span<const int32_t> prompt_lens) const {
  return Dot(prefill_coef_, PrefillFeatures(prompt_lens));
}

double LatencyModel::PredictDecode(int32_t batch, int64_t total_context) const {
  return Dot(decode_coef_, DecodeFeatures(batch, total_context)) +
         (decode_knee_ > 0 ? decode_knee_coef_ * std::max(0, batch - decode_knee_) : 0.0);
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
  PDS_RETURN_IF_ERROR(model.FitDecodeKnee(decode));
  return model;
}

absl::Status LatencyModel::FitDecodeKnee(const std::vector<DecodeSample>& decode) {
  // Candidate knees: each profiled batch size with at least two larger sizes beyond it. The
  // knee is chosen on the fit samples only (index % 4 != 3); the held-out error is then
  // measured with it and, like the linear form, the coefficients are refitted on all.
  std::vector<int32_t> batches;
  for (const auto& s : decode) batches.push_back(s.batch);
  std::sort(batches.begin(), batches.end());
  batches.erase(std::unique(batches.begin(), batches.end()), batches.end());
  auto rows_of = [](const std::vector<DecodeSample>& samples, int32_t knee,
                    std::vector<std::vector<double>>& x, std::vector<double>& y,
                    std::vector<double>& w) {
    for (const auto& s : samples) {
      x.push_back({1.0, static_cast<double>(s.total_context), static_cast<double>(s.batch),
                   static_cast<double>(std::max(0, s.batch - knee))});
      y.push_back(s.seconds);
      w.push_back(1.0 / (s.seconds * s.seconds));
    }
  };
  std::vector<DecodeSample> fit, held;
  for (size_t i = 0; i < decode.size(); ++i) (i % 4 == 3 ? held : fit).push_back(decode[i]);
  auto rel_errors = [](const std::vector<DecodeSample>& samples, const std::vector<double>& beta,
                       int32_t knee) {
    std::vector<double> e;
    for (const auto& s : samples) {
      const double p = beta[0] + beta[1] * s.total_context + beta[2] * s.batch +
                       beta[3] * std::max(0, s.batch - knee);
      e.push_back(std::abs(p - s.seconds) / s.seconds);
    }
    std::sort(e.begin(), e.end());
    return e;
  };
  double best_cost = 0;
  {
    std::vector<std::vector<double>> x;
    std::vector<double> y, w;
    rows_of(fit, 0, x, y, w);
    for (auto& row : x) row.pop_back();  // the linear form alone
    PDS_ASSIGN_OR_RETURN(std::vector<double> linear, LeastSquares(x, y, w));
    linear.push_back(0.0);
    for (double e : rel_errors(fit, linear, 0)) best_cost += e * e;
  }
  int32_t best_knee = 0;
  for (size_t b = 0; b + 2 < batches.size(); ++b) {
    const int32_t knee = batches[b];
    std::vector<std::vector<double>> x;
    std::vector<double> y, w;
    rows_of(fit, knee, x, y, w);
    auto beta = LeastSquares(x, y, w);
    if (!beta.ok()) continue;
    double cost = 0;
    for (double e : rel_errors(fit, *beta, knee)) cost += e * e;
    // A knee must earn its parameter: at least a quarter less squared error.
    if (cost < 0.75 * best_cost) {
      best_cost = cost;
      best_knee = knee;
    }
  }
  if (best_knee == 0 || held.empty()) return absl::OkStatus();
  std::vector<std::vector<double>> x;
  std::vector<double> y, w;
  rows_of(fit, best_knee, x, y, w);
  PDS_ASSIGN_OR_RETURN(std::vector<double> partial, LeastSquares(x, y, w));
  const std::vector<double> errors = rel_errors(held, partial, best_knee);
  decode_quality_.median_rel_error = errors[errors.size() / 2];
  decode_quality_.max_rel_error = errors.back();
  x.clear();
  y.clear();
  w.clear();
  rows_of(decode, best_knee, x, y, w);
  PDS_ASSIGN_OR_RETURN(std::vector<double> beta, LeastSquares(x, y, w));
  decode_coef_ = {beta[0], beta[1], beta[2]};
  decode_knee_ = best_knee;
  decode_knee_coef_ = beta[3];
  return absl::OkStatus();
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
           {{"form", "a + b * sum(context) + c * batch + d * max(0, batch - knee)"},
            {"coef", decode_coef_},
            {"knee", decode_knee_},
            {"knee_coef", decode_knee_coef_},
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
  const auto& d = j["decode"];
  if (d.contains("knee")) {
    if (!d["knee"].is_number_integer() || d["knee"].get<int64_t>() < 0 ||
        !d.contains("knee_coef") || !d["knee_coef"].is_number()) {
      return absl::InvalidArgumentError(
          "latency model: decode.knee must be an integer >= 0 with a numeric decode.knee_coef");
    }
    model.decode_knee_ = d["knee"].get<int32_t>();
    model.decode_knee_coef_ = d["knee_coef"].get<double>();
  }
  return model;
}

absl::StatusOr<LatencyModel> LoadLatencyModelFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || !j.contains("latency_model")) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, " is not a pdserve profile (no latency_model object)"));
  }
  auto model = LatencyModel::FromJson(j["latency_model"]);
  if (!model.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", model.status().message()));
  }
  return model;
}

LatencyModel LatencyModel::Scaled(double factor) const {
  LatencyModel m = *this;
  for (double& c : m.prefill_coef_) c *= factor;
  for (double& c : m.decode_coef_) c *= factor;
  m.decode_knee_coef_ *= factor;
  return m;
}

double PrefillChunkSeconds(const LatencyModel& model,
                           const std::vector<std::pair<int32_t, int32_t>>& start_and_len,
                           int64_t extra_linear_tokens) {
  if (start_and_len.empty()) return 0;
  const auto& c = model.prefill_coef();
  double sum = static_cast<double>(extra_linear_tokens), sum_sq = 0;
  for (const auto& [start, len] : start_and_len) {
    const double s = start, k = len;
    sum += k;
    sum_sq += (s + k) * (s + k) - s * s;
  }
  return std::max(0.0, c[0] + c[1] * sum + c[2] * sum_sq);
}

double DecodeStepSeconds(const LatencyModel& model, int32_t batch, int64_t total_context) {
  if (batch <= 0) return 0;
  return std::max(0.0, model.PredictDecode(batch, total_context));
}

}  // namespace pds::scheduler
