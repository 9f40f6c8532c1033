#include "scheduler/latency_model.h"

#include <algorithm>
#include <random>

#include "gtest/gtest.h"

namespace pds::scheduler {
namespace {

// Samples from known coefficients with multiplicative noise of +-`noise`.
void MakeSamples(double noise, std::vector<PrefillSample>& prefill,
                 std::vector<DecodeSample>& decode) {
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<double> jitter(1.0 - noise, 1.0 + noise);
  for (int batch : {1, 2, 4}) {
    for (int len : {16, 64, 128, 256, 512, 1024}) {
      std::vector<int32_t> lens(batch, len);
      const double sum = batch * len, sum_sq = batch * double(len) * len;
      prefill.push_back({lens, (0.01 + 2e-4 * sum + 3e-8 * sum_sq) * jitter(rng)});
    }
  }
  for (int batch : {1, 2, 4, 8, 16, 32}) {
    for (int ctx : {64, 512, 2048}) {
      const int64_t total = int64_t{batch} * ctx;
      decode.push_back({batch, total, (0.005 + 1e-6 * total + 4e-4 * batch) * jitter(rng)});
    }
  }
}

TEST(LatencyModelTest, RecoversKnownCoefficients) {
  std::vector<PrefillSample> prefill;
  std::vector<DecodeSample> decode;
  MakeSamples(0.0, prefill, decode);
  auto model = LatencyModel::Fit(prefill, decode);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_NEAR(model->prefill_coef()[0], 0.01, 1e-9);
  EXPECT_NEAR(model->prefill_coef()[1], 2e-4, 1e-12);
  EXPECT_NEAR(model->prefill_coef()[2], 3e-8, 1e-15);
  EXPECT_NEAR(model->decode_coef()[0], 0.005, 1e-9);
  EXPECT_NEAR(model->decode_coef()[1], 1e-6, 1e-13);
  EXPECT_NEAR(model->decode_coef()[2], 4e-4, 1e-11);
  EXPECT_LT(model->prefill_quality().max_rel_error, 1e-9);
  EXPECT_NEAR(model->PredictDecode(8, 8 * 1000), 0.005 + 8e-3 + 3.2e-3, 1e-9);
}

TEST(LatencyModelTest, ScaledMultipliesEveryPrediction) {
  std::vector<PrefillSample> prefill;
  std::vector<DecodeSample> decode;
  MakeSamples(0.0, prefill, decode);
  auto model = LatencyModel::Fit(prefill, decode);
  ASSERT_TRUE(model.ok()) << model.status();
  const LatencyModel scaled = model->Scaled(1.25);
  for (int32_t len : {16, 300, 1024}) {
    EXPECT_NEAR(scaled.PredictPrefill({len, 7}), 1.25 * model->PredictPrefill({len, 7}), 1e-12);
  }
  for (int32_t batch : {1, 6, 40}) {
    EXPECT_NEAR(scaled.PredictDecode(batch, batch * 700),
                1.25 * model->PredictDecode(batch, batch * 700), 1e-12);
  }
  EXPECT_EQ(scaled.decode_knee(), model->decode_knee());
}

TEST(LatencyModelTest, NoisySamplesGiveErrorsOfTheNoiseSize) {
  std::vector<PrefillSample> prefill;
  std::vector<DecodeSample> decode;
  MakeSamples(0.03, prefill, decode);
  auto model = LatencyModel::Fit(prefill, decode);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_LT(model->prefill_quality().median_rel_error, 0.05);
  EXPECT_LT(model->decode_quality().median_rel_error, 0.05);
  EXPECT_GT(model->decode_quality().max_rel_error, 0.0);
  EXPECT_EQ(model->decode_quality().num_held_out + model->decode_quality().num_fit, 18);
}

// A roofline-shaped decode cost (flat per sequence until batch 4, steeper beyond): the fit
// finds the knee and predicts within the noise, which the linear form alone cannot; a linear
// truth gets no knee.
TEST(LatencyModelTest, DecodeKneeFollowsTheRoofline) {
  std::vector<PrefillSample> prefill;
  std::vector<DecodeSample> linear, roofline;
  MakeSamples(0.0, prefill, linear);
  uint64_t state = 7;
  for (int32_t batch : {1, 2, 4, 8, 16, 32}) {
    for (int64_t ctx : {64, 512, 2048}) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      const double noise = 1.0 + 0.01 * ((state >> 33) % 200 / 100.0 - 1.0);
      const double t = 0.004 + 2e-6 * batch * ctx + 3e-4 * batch + 1.2e-3 * std::max(0, batch - 4);
      roofline.push_back({batch, batch * ctx, t * noise});
    }
  }
  auto model = LatencyModel::Fit(prefill, roofline);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(model->decode_knee(), 4);
  EXPECT_NEAR(model->decode_knee_coef(), 1.2e-3, 1e-4);
  EXPECT_LT(model->decode_quality().median_rel_error, 0.02);
  auto json = LatencyModel::FromJson(model->ToJson());
  ASSERT_TRUE(json.ok()) << json.status();
  EXPECT_DOUBLE_EQ(json->PredictDecode(16, 16000), model->PredictDecode(16, 16000));

  auto plain = LatencyModel::Fit(prefill, linear);
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(plain->decode_knee(), 0);
}

TEST(LatencyModelTest, JsonRoundTripAndErrors) {
  std::vector<PrefillSample> prefill;
  std::vector<DecodeSample> decode;
  MakeSamples(0.01, prefill, decode);
  auto model = LatencyModel::Fit(prefill, decode);
  ASSERT_TRUE(model.ok());
  auto back = LatencyModel::FromJson(model->ToJson());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->prefill_coef(), model->prefill_coef());
  EXPECT_EQ(back->decode_coef(), model->decode_coef());
  EXPECT_EQ(back->decode_quality().median_rel_error, model->decode_quality().median_rel_error);
  EXPECT_EQ(LatencyModel::FromJson(nlohmann::json::parse(R"({"prefill": {"coef": [1, 2]}})"))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  // Too few samples, and non-positive times, are refused.
  prefill.resize(5);
  EXPECT_EQ(LatencyModel::Fit(prefill, decode).status().code(), absl::StatusCode::kInvalidArgument);
  MakeSamples(0.0, prefill, decode);
  decode[3].seconds = 0;
  EXPECT_EQ(LatencyModel::Fit(prefill, decode).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pds::scheduler
