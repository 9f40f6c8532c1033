// CPU kernels against naive float64 loops at awkward sizes, with sentinels around outputs.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "kernels/elementwise.h"
#include "kernels/gemm.h"
#include "kernels/norm.h"
#include "kernels/rope.h"
#include "kernels/sampling.h"
#include "kernels/threads.h"
#include "tests/testing/test_util.h"

namespace pds::kernels::cpu {
namespace {

using testing::AllClose;
using testing::RandomVector;
constexpr float kSentinel = 12345.0f;

// A buffer with `n` elements plus sentinel guards on both sides.
struct Guarded {
  explicit Guarded(size_t n) : storage(n + 32, kSentinel) {}
  float* data() { return storage.data() + 16; }
  std::vector<float> values(size_t n) { return {data(), data() + n}; }
  bool intact(size_t n) const {
    for (size_t i = 0; i < 16; ++i) {
      if (storage[i] != kSentinel || storage[16 + n + i] != kSentinel) return false;
    }
    return true;
  }
  std::vector<float> storage;
};

class GemmTest : public ::testing::TestWithParam<std::tuple<int, int, int>> {};

TEST_P(GemmTest, MatchesNaiveLoopsWithRowStride) {
  const auto [m, n, k] = GetParam();
  const int lda = k + 3;
  const auto a = RandomVector(static_cast<size_t>(m) * lda, 1);
  const auto w = RandomVector(static_cast<size_t>(n) * k, 2);
  Guarded c(static_cast<size_t>(m) * n);
  Gemm(a.data(), lda, w.data(), c.data(), n, m, n, k);
  std::vector<double> expected(static_cast<size_t>(m) * n);
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      double s = 0;
      for (int p = 0; p < k; ++p) s += static_cast<double>(a[i * lda + p]) * w[j * k + p];
      expected[i * n + j] = s;
    }
  }
  EXPECT_TRUE(AllClose(c.values(expected.size()), expected, 1e-5, 1e-5));
  EXPECT_TRUE(c.intact(expected.size()));
}

INSTANTIATE_TEST_SUITE_P(AwkwardSizes, GemmTest,
                         ::testing::Values(std::make_tuple(1, 1, 1), std::make_tuple(3, 7, 37),
                                           std::make_tuple(2, 129, 64), std::make_tuple(4, 65, 33),
                                           std::make_tuple(5, 64, 64), std::make_tuple(37, 3, 7),
                                           std::make_tuple(1, 733, 64),
                                           std::make_tuple(7, 37, 733)));

TEST(NormTest, RmsNormAddRmsNormAndHeadNorm) {
  for (int cols : {1, 3, 7, 37, 733}) {
    const int rows = 5;
    const float eps = 1e-5f;
    auto x = RandomVector(rows * cols, cols);
    const auto w = RandomVector(cols, cols + 1, 0.5f, 1.5f);
    const auto delta = RandomVector(rows * cols, cols + 2);
    auto naive = [&](const std::vector<double>& in) {
      std::vector<double> out(in.size());
      for (int r = 0; r < rows; ++r) {
        double ss = 0;
        for (int c = 0; c < cols; ++c) ss += in[r * cols + c] * in[r * cols + c];
        const double inv = 1.0 / std::sqrt(ss / cols + eps);
        for (int c = 0; c < cols; ++c) out[r * cols + c] = in[r * cols + c] * inv * w[c];
      }
      return out;
    };
    std::vector<double> xd(x.begin(), x.end());
    Guarded out(rows * cols);
    RmsNorm(x.data(), cols, w.data(), out.data(), cols, rows, cols, eps);
    EXPECT_TRUE(AllClose(out.values(rows * cols), naive(xd), 1e-5, 1e-6)) << cols;
    EXPECT_TRUE(out.intact(rows * cols));

    std::vector<double> sum(xd);
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += delta[i];
    AddRmsNorm(x.data(), delta.data(), w.data(), out.data(), rows, cols, eps);
    EXPECT_TRUE(AllClose(x, sum, 1e-6, 1e-6)) << "residual updated in place";
    EXPECT_TRUE(AllClose(out.values(rows * cols), naive(sum), 1e-5, 1e-6)) << cols;
  }
  // Head norm: rows of head_dim inside a strided token layout; the rest untouched.
  const int tokens = 3, heads = 4, hd = 8, stride = heads * hd + 5;
  auto x = RandomVector(tokens * stride, 9);
  const auto before = x;
  const auto w = RandomVector(hd, 10, 0.5f, 1.5f);
  HeadRmsNorm(x.data(), stride, w.data(), tokens, heads, hd, 1e-6f);
  for (int t = 0; t < tokens; ++t) {
    for (int h = 0; h < heads; ++h) {
      double ss = 0;
      for (int d = 0; d < hd; ++d) ss += std::pow(before[t * stride + h * hd + d], 2);
      const double inv = 1.0 / std::sqrt(ss / hd + 1e-6);
      for (int d = 0; d < hd; ++d) {
        EXPECT_NEAR(x[t * stride + h * hd + d], before[t * stride + h * hd + d] * inv * w[d], 1e-5);
      }
    }
    for (int j = heads * hd; j < stride; ++j) EXPECT_EQ(x[t * stride + j], before[t * stride + j]);
  }
}

TEST(RopeTest, RotateHalfMatchesFormulaAtLargePositions) {
  const int tokens = 4, heads = 3, half = 6, stride = heads * 2 * half + 2;
  const std::vector<int32_t> positions = {0, 1, 4097, 131071};
  std::vector<float> inv_freq(half);
  for (int j = 0; j < half; ++j) inv_freq[j] = std::pow(10000.0f, -2.0f * j / (2 * half));
  std::vector<float> cos(tokens * half), sin(tokens * half);
  RopeCosSin(positions.data(), inv_freq.data(), cos.data(), sin.data(), tokens, half);
  auto x = RandomVector(tokens * stride, 3);
  const auto before = x;
  ApplyRope(x.data(), stride, cos.data(), sin.data(), tokens, heads, half);
  for (int t = 0; t < tokens; ++t) {
    for (int h = 0; h < heads; ++h) {
      for (int j = 0; j < half; ++j) {
        const double angle = static_cast<double>(positions[t]) * inv_freq[j];
        const double a = before[t * stride + h * 2 * half + j];
        const double b = before[t * stride + h * 2 * half + j + half];
        EXPECT_NEAR(x[t * stride + h * 2 * half + j], a * std::cos(angle) - b * std::sin(angle),
                    1e-5);
        EXPECT_NEAR(x[t * stride + h * 2 * half + j + half],
                    b * std::cos(angle) + a * std::sin(angle), 1e-5);
      }
    }
    EXPECT_EQ(x[t * stride + stride - 1], before[t * stride + stride - 1]);
  }
}

TEST(ElementwiseTest, SiluGateEmbedGatherBias) {
  const int tokens = 7, inter = 37;
  const auto gu = RandomVector(tokens * 2 * inter, 4, -4.0f, 4.0f);
  Guarded out(tokens * inter);
  SiluGate(gu.data(), out.data(), tokens, inter);
  std::vector<double> expected(tokens * inter);
  for (int t = 0; t < tokens; ++t) {
    for (int i = 0; i < inter; ++i) {
      const double g = gu[t * 2 * inter + i], u = gu[t * 2 * inter + inter + i];
      expected[t * inter + i] = g / (1.0 + std::exp(-g)) * u;
    }
  }
  EXPECT_TRUE(AllClose(out.values(expected.size()), expected, 1e-5, 1e-6));
  EXPECT_TRUE(out.intact(expected.size()));

  const auto table = RandomVector(11 * 5, 5);
  const std::vector<int32_t> ids = {10, 0, 3, 3};
  std::vector<float> emb(4 * 5);
  Embed(table.data(), ids.data(), emb.data(), 4, 5);
  for (int t = 0; t < 4; ++t) {
    for (int c = 0; c < 5; ++c) EXPECT_EQ(emb[t * 5 + c], table[ids[t] * 5 + c]);
  }
  const std::vector<int32_t> rows = {3, 0};
  std::vector<float> gathered(2 * 5);
  GatherRows(emb.data(), rows.data(), gathered.data(), 2, 5);
  EXPECT_EQ(gathered[0], emb[15]);
  EXPECT_EQ(gathered[5], emb[0]);
  std::vector<float> x(2 * 7, 1.0f);
  const std::vector<float> bias = {1, 2, 3};
  AddBias(x.data(), 7, bias.data(), 2, 3);
  EXPECT_EQ(x[2], 4.0f);
  EXPECT_EQ(x[7 + 1], 3.0f);
  EXPECT_EQ(x[3], 1.0f) << "columns past the bias are untouched";
}

// Paged attention against dense float64 attention, with shuffled block tables, ragged query
// lengths (decode, prefill, and prefill extending a cached prefix), GQA ratios 1/4/8, and
// NaN in every cache slot that no sequence owns (a read past kv_len would show up).
class PagedAttentionTest : public ::testing::TestWithParam<std::tuple<int, int, int>> {};

TEST_P(PagedAttentionTest, MatchesDenseReference) {
  const auto [group, block_size, threads] = GetParam();
  SetNumThreads(threads);
  const int kv_heads = 2, heads = kv_heads * group, hd = 16;
  // (kv_len, q_len) per sequence.
  const std::vector<std::pair<int, int>> seqs = {{1, 1},   {37, 1},  {7, 7},
                                                 {50, 13}, {16, 16}, {3, 2}};
  std::mt19937_64 rng(77);
  int total_blocks = 0;
  for (auto [kv, q] : seqs) total_blocks += (kv + block_size - 1) / block_size;
  total_blocks += 3;  // unused blocks
  std::vector<int32_t> block_ids(total_blocks);
  std::iota(block_ids.begin(), block_ids.end(), 0);
  std::shuffle(block_ids.begin(), block_ids.end(), rng);
  const size_t cache_elems = static_cast<size_t>(total_blocks) * kv_heads * block_size * hd;
  std::vector<float> k_cache(cache_elems, NAN), v_cache(cache_elems, NAN);

  int max_blocks = 0;
  for (auto [kv, q] : seqs) max_blocks = std::max(max_blocks, (kv + block_size - 1) / block_size);
  std::vector<int32_t> tables(seqs.size() * max_blocks, -1);
  std::vector<int32_t> cu_q = {0}, kv_lens;
  std::vector<std::vector<float>> dense_k, dense_v;  // per seq [kv_len, kv_heads, hd]
  int next = 0;
  int total_q = 0;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const auto [kv, q] = seqs[s];
    const int nb = (kv + block_size - 1) / block_size;
    for (int b = 0; b < nb; ++b) tables[s * max_blocks + b] = block_ids[next++];
    dense_k.push_back(RandomVector(static_cast<size_t>(kv) * kv_heads * hd, 100 + s));
    dense_v.push_back(RandomVector(static_cast<size_t>(kv) * kv_heads * hd, 200 + s));
    // Write every position through WriteKv (slots from the table).
    std::vector<int32_t> slots(kv);
    for (int p = 0; p < kv; ++p)
      slots[p] = tables[s * max_blocks + p / block_size] * block_size + p % block_size;
    WriteKv(dense_k[s].data(), dense_v[s].data(), kv_heads * hd, slots.data(), kv, k_cache.data(),
            v_cache.data(), kv_heads, block_size, hd);
    total_q += q;
    cu_q.push_back(total_q);
    kv_lens.push_back(kv);
  }
  const int q_stride = heads * hd + 8;
  const auto q = RandomVector(static_cast<size_t>(total_q) * q_stride, 5);
  Guarded out(static_cast<size_t>(total_q) * heads * hd);
  PagedBatch batch{static_cast<int32_t>(seqs.size()),
                   cu_q.data(),
                   kv_lens.data(),
                   tables.data(),
                   max_blocks,
                   block_size};
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  PagedAttention(q.data(), q_stride, k_cache.data(), v_cache.data(), batch, out.data(), heads,
                 kv_heads, hd, scale);

  std::vector<double> expected(static_cast<size_t>(total_q) * heads * hd);
  for (size_t s = 0; s < seqs.size(); ++s) {
    const auto [kv, qn] = seqs[s];
    for (int i = 0; i < qn; ++i) {
      const int row = cu_q[s] + i;
      const int pos = kv - qn + i;
      for (int h = 0; h < heads; ++h) {
        const int kvh = h / group;
        std::vector<double> scores(pos + 1);
        double mx = -INFINITY;
        for (int p = 0; p <= pos; ++p) {
          double dot = 0;
          for (int d = 0; d < hd; ++d) {
            dot += static_cast<double>(q[row * q_stride + h * hd + d]) *
                   dense_k[s][(p * kv_heads + kvh) * hd + d];
          }
          scores[p] = dot * scale;
          mx = std::max(mx, scores[p]);
        }
        double denom = 0;
        for (double& sc : scores) denom += (sc = std::exp(sc - mx));
        for (int d = 0; d < hd; ++d) {
          double acc = 0;
          for (int p = 0; p <= pos; ++p)
            acc += scores[p] / denom * dense_v[s][(p * kv_heads + kvh) * hd + d];
          expected[(static_cast<size_t>(row) * heads + h) * hd + d] = acc;
        }
      }
    }
  }
  EXPECT_TRUE(AllClose(out.values(expected.size()), expected, 1e-5, 1e-6));
  EXPECT_TRUE(out.intact(expected.size()));
  SetNumThreads(1);
}

INSTANTIATE_TEST_SUITE_P(GqaBlockThreads, PagedAttentionTest,
                         ::testing::Combine(::testing::Values(1, 4, 8), ::testing::Values(1, 7, 16),
                                            ::testing::Values(1, 2)));

TEST(WriteKvTest, NegativeSlotsAreSkipped) {
  const int kv_heads = 1, hd = 4, bs = 2;
  std::vector<float> k = {1, 2, 3, 4, 5, 6, 7, 8}, v = k;
  std::vector<float> kc(2 * bs * hd, -1.0f), vc = kc;
  const std::vector<int32_t> slots = {3, -1};
  WriteKv(k.data(), v.data(), hd, slots.data(), 2, kc.data(), vc.data(), kv_heads, bs, hd);
  EXPECT_EQ(kc[3 * hd], 1.0f);
  EXPECT_EQ(std::count(kc.begin(), kc.end(), -1.0f), 3 * hd);
}

// The sampling rule as first written: sort every candidate, then walk. SampleLogits now
// selects instead of sorting; it must draw the same token.
int32_t SortedRule(const float* logits, int64_t n, float temperature, int32_t top_k, float top_p,
                   double u) {
  std::vector<std::pair<float, int32_t>> c;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isnan(logits[i])) c.emplace_back(logits[i], static_cast<int32_t>(i));
  }
  if (c.empty()) return 0;
  std::sort(c.begin(), c.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  size_t keep = c.size();
  if (top_k > 0 && static_cast<size_t>(top_k) < keep) keep = top_k;
  if (std::isinf(c[0].first)) return c[0].second;
  std::vector<double> p(keep);
  double total = 0;
  for (size_t i = 0; i < keep; ++i)
    total += p[i] = std::exp((c[i].first - c[0].first) / temperature);
  if (top_p < 1.0f) {
    double cumulative = 0;
    for (size_t i = 0; i < keep; ++i) {
      cumulative += p[i] / total;
      if (cumulative >= top_p) {
        keep = i + 1;
        break;
      }
    }
    total = 0;
    for (size_t i = 0; i < keep; ++i) total += p[i];
  }
  double target = u * total;
  for (size_t i = 0; i < keep; ++i) {
    target -= p[i];
    if (target < 0) return c[i].second;
  }
  return c[keep - 1].second;
}

TEST(SamplingTest, SelectionDrawsWhatTheSortedRuleDraws) {
  std::mt19937 rng(17);
  int trials = 0;
  for (int trial = 0; trial < 6000; ++trial) {
    const int64_t n = 1 + rng() % (trial % 10 == 0 ? 40000 : 700);
    std::vector<float> row(n);
    std::normal_distribution<float> normal(0.0f, 1.0f + rng() % 6);
    for (float& v : row) v = normal(rng);
    switch (trial % 6) {
      case 1:  // ties
        for (float& v : row) v = std::round(v);
        break;
      case 2:  // masked
        for (float& v : row) {
          if (rng() % 3 == 0) v = -INFINITY;
        }
        break;
      case 3:  // NaN here and there, one peak
        row[rng() % n] = NAN;
        row[rng() % n] += 30.0f;
        break;
      default:
        break;
    }
    const float temperature = std::vector<float>{0.05f, 0.3f, 0.7f, 1.0f, 1.6f}[rng() % 5];
    const int32_t top_k = rng() % 3 == 0 ? static_cast<int32_t>(1 + rng() % (n + 3)) : 0;
    const float top_p = rng() % 2 ? 1.0f : std::vector<float>{0.1f, 0.5f, 0.9f, 0.99f}[rng() % 4];
    const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
    EXPECT_EQ(SampleLogits(row.data(), n, temperature, top_k, top_p, u),
              SortedRule(row.data(), n, temperature, top_k, top_p, u))
        << "trial " << trial << " n " << n << " T " << temperature << " k " << top_k << " p "
        << top_p << " u " << u;
    ++trials;
  }
  EXPECT_EQ(trials, 6000);
}

TEST(SamplingTest, ArgmaxSkipsNanAndTakesTheFirstOfTies) {
  const std::vector<float> logits = {1.0f, NAN, 3.0f, 3.0f, -1.0f};
  EXPECT_EQ(Argmax(logits.data(), logits.size()), 2);
}

TEST(SamplingTest, SampleFrequenciesFollowSoftmaxAndFiltersRestrictSupport) {
  const std::vector<float> logits = {0.0f, std::log(2.0f), std::log(3.0f), std::log(4.0f)};
  std::vector<int> counts(4, 0);
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    counts[SampleLogits(logits.data(), 4, 1.0f, 0, 1.0f, (i + 0.5) / n)]++;
  }
  for (int t = 0; t < 4; ++t) EXPECT_NEAR(counts[t] / double(n), (t + 1) / 10.0, 0.002) << t;
  // top_k = 2 keeps ids 3 and 2 in the ratio 4:3.
  std::fill(counts.begin(), counts.end(), 0);
  for (int i = 0; i < n; ++i) {
    counts[SampleLogits(logits.data(), 4, 1.0f, 2, 1.0f, (i + 0.5) / n)]++;
  }
  EXPECT_EQ(counts[0] + counts[1], 0);
  EXPECT_NEAR(counts[3] / double(n), 4.0 / 7.0, 0.002);
  // top_p = 0.5: the smallest prefix reaching 0.5 is {3 (0.4), 2 (0.3)}.
  std::fill(counts.begin(), counts.end(), 0);
  for (int i = 0; i < n; ++i) {
    counts[SampleLogits(logits.data(), 4, 1.0f, 0, 0.5f, (i + 0.5) / n)]++;
  }
  EXPECT_EQ(counts[0] + counts[1], 0);
  EXPECT_GT(counts[2], 0);
  // Low temperature concentrates on the argmax.
  std::fill(counts.begin(), counts.end(), 0);
  for (int i = 0; i < n; ++i) {
    counts[SampleLogits(logits.data(), 4, 0.01f, 0, 1.0f, (i + 0.5) / n)]++;
  }
  EXPECT_EQ(counts[3], n);
}

TEST(SamplingTest, LogProbsAreNormalized) {
  const auto logits = RandomVector(733, 8, -5.0f, 5.0f);
  double mass = 0;
  for (int i = 0; i < 733; ++i) mass += std::exp(LogProb(logits.data(), 733, i));
  EXPECT_NEAR(mass, 1.0, 1e-5);
  const auto top = TopLogProbs(logits.data(), 733, 3);
  ASSERT_EQ(top.size(), 3u);
  EXPECT_EQ(top[0].first, Argmax(logits.data(), 733));
  EXPECT_GE(top[0].second, top[1].second);
  EXPECT_GE(top[1].second, top[2].second);
  EXPECT_FLOAT_EQ(top[0].second, LogProb(logits.data(), 733, top[0].first));
}

// TopLogProbs (a heap of k) equals a full sort of the row by logit, ties by the lower id; and
// LogProbAndTop gives both at once.
TEST(SamplingTest, TopLogProbsIsTheSortedRowsHead) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 300);
    std::vector<float> row(n);
    for (float& v : row) v = static_cast<float>(rng() % 17) * 0.5f - 4;  // many ties
    if (trial % 5 == 0) row[rng() % n] = NAN;
    std::vector<int32_t> order;
    for (int i = 0; i < n; ++i) {
      if (!std::isnan(row[i])) order.push_back(i);
    }
    std::sort(order.begin(), order.end(),
              [&](int a, int b) { return row[a] != row[b] ? row[a] > row[b] : a < b; });
    const int k = static_cast<int>(rng() % 25);
    const auto top = TopLogProbs(row.data(), n, k);
    ASSERT_EQ(top.size(), std::min<size_t>(k, order.size()));
    for (size_t i = 0; i < top.size(); ++i) {
      EXPECT_EQ(top[i].first, order[i]) << "trial " << trial;
      EXPECT_FLOAT_EQ(top[i].second, LogProb(row.data(), n, order[i]));
    }
    std::vector<std::pair<int32_t, float>> both;
    const int32_t id = order.empty() ? 0 : order.back();
    int32_t rank = 0;
    EXPECT_FLOAT_EQ(LogProbAndTop(row.data(), n, id, k, both, &rank), LogProb(row.data(), n, id));
    EXPECT_EQ(both, top);
    EXPECT_EQ(rank,
              1 + std::count_if(row.begin(), row.end(), [&](float v) { return v > row[id]; }));
  }
}

TEST(SamplingTest, InfiniteAndNanLogits) {
  // +inf takes all the mass: it is drawn whatever the draw and parameters (the first +inf in
  // the order when several), with log-probability log(1 / count).
  const std::vector<float> inf = {1.0f, INFINITY, 0.0f, INFINITY, NAN};
  for (double u : {0.0, 0.3, 0.99}) {
    for (float top_p : {1.0f, 0.5f}) {
      EXPECT_EQ(SampleLogits(inf.data(), 5, 1.0f, 0, top_p, u), 1) << u << " " << top_p;
      EXPECT_EQ(SampleLogits(inf.data(), 5, 0.7f, 3, top_p, u), 1) << u << " " << top_p;
    }
  }
  EXPECT_EQ(Argmax(inf.data(), 5), 1);
  EXPECT_FLOAT_EQ(LogProb(inf.data(), 5, 1), -std::log(2.0f));
  EXPECT_EQ(LogProb(inf.data(), 5, 0), -INFINITY);
  // A row of -inf (and NaN): the first -inf, as Argmax.
  const std::vector<float> none = {NAN, -INFINITY, -INFINITY};
  EXPECT_EQ(SampleLogits(none.data(), 3, 1.0f, 0, 1.0f, 0.7), 1);
  EXPECT_EQ(Argmax(none.data(), 3), 1);
  // A NaN logit is left out of the log-probabilities instead of making them all NaN.
  const std::vector<float> with_nan = {1.0f, NAN, 3.0f, 2.0f};
  const auto top = TopLogProbs(with_nan.data(), 4, 2);
  ASSERT_EQ(top.size(), 2u);
  EXPECT_EQ(top[0].first, 2);
  EXPECT_EQ(top[1].first, 3);
  double mass = 0;
  for (int i : {0, 2, 3}) mass += std::exp(LogProb(with_nan.data(), 4, i));
  EXPECT_NEAR(mass, 1.0, 1e-6);
  EXPECT_TRUE(std::isfinite(top[0].second));
}

}  // namespace
}  // namespace pds::kernels::cpu
