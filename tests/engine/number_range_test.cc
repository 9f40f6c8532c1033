// Numbers within bounds (engine/runtime/number_range.h): the automaton accepts exactly the JSON
// numbers (no exponent) within the bounds, compared exactly in decimal, for random bounds
// (inclusive or not, integral or not, negative, zero, in exponent form) and random texts; bad
// bounds and empty ranges are refused.
#include "engine/runtime/number_range.h"

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "gtest/gtest.h"

namespace pds::engine {
namespace {

// A JSON number without exponent, at most 6 digits on each side of the point, in millionths
// (exact); false for other texts.
bool Millionths(const std::string& t, int64_t& out) {
  size_t i = 0;
  const bool neg = !t.empty() && t[0] == '-';
  if (neg) ++i;
  const size_t int_start = i;
  while (i < t.size() && std::isdigit(static_cast<unsigned char>(t[i]))) ++i;
  const std::string ip = t.substr(int_start, i - int_start);
  if (ip.empty() || ip.size() > 6 || (ip.size() > 1 && ip[0] == '0')) return false;
  std::string fp;
  if (i < t.size()) {
    if (t[i] != '.') return false;
    fp = t.substr(i + 1);
    if (fp.size() > 6 && fp.find_first_not_of('0', 6) == std::string::npos) fp.resize(6);
    if (fp.empty() || fp.size() > 6) return false;
    for (char c : fp) {
      if (!std::isdigit(static_cast<unsigned char>(c))) return false;
    }
  }
  out = std::stoll(ip) * 1000000 +
        (fp.empty() ? 0 : std::stoll(fp + std::string(6 - fp.size(), '0')));
  if (neg) out = -out;
  return true;
}

std::string RandomNumber(std::mt19937& rng, bool integer) {
  std::string t;
  if (rng() % 3 == 0) t += '-';
  const int int_digits = 1 + static_cast<int>(rng() % 4);
  for (int k = 0; k < int_digits; ++k) t += static_cast<char>('0' + rng() % 10);
  if (rng() % 4 != 0 && t.size() > 1 && t[t[0] == '-'] == '0') t.erase(t[0] == '-', 1);
  if (!integer && rng() % 2 == 0) {
    t += '.';
    const int frac = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < frac; ++k) t += static_cast<char>('0' + rng() % 10);
  }
  if (rng() % 50 == 0) t += rng() % 2 ? "." : "x";  // not numbers
  return t;
}

TEST(NumberRangeTest, AcceptsExactlyTheNumbersWithinTheBounds) {
  // Bound texts with their values in millionths.
  const std::vector<std::pair<std::string, int64_t>> bounds = {{"0", 0},
                                                               {"-0.0", 0},
                                                               {"1", 1000000},
                                                               {"-1", -1000000},
                                                               {"2.5", 2500000},
                                                               {"-2.5", -2500000},
                                                               {"0.1", 100000},
                                                               {"-0.05", -50000},
                                                               {"10", 10000000},
                                                               {"99", 99000000},
                                                               {"100", 100000000},
                                                               {"1e-3", 1000},
                                                               {"2.5e2", 250000000},
                                                               {"-1.25e1", -12500000},
                                                               {"7.0", 7000000},
                                                               {"1234.5678", 1234567800},
                                                               {"0.999", 999000},
                                                               {"-999.999", -999999000}};
  std::mt19937 rng(3);
  int inside = 0, outside = 0, empty = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const bool integer = trial % 3 == 0;
    std::optional<NumberBound> lower, upper;
    int64_t lo = INT64_MIN, hi = INT64_MAX;
    bool lo_ex = false, hi_ex = false;
    if (trial % 4 != 1) {
      const auto& [text, v] = bounds[rng() % bounds.size()];
      lo_ex = rng() % 2;
      lower = NumberBound{text, lo_ex};
      lo = v;
    }
    if (trial % 4 != 2) {
      const auto& [text, v] = bounds[rng() % bounds.size()];
      hi_ex = rng() % 2;
      upper = NumberBound{text, hi_ex};
      hi = v;
    }
    if (!lower && !upper) continue;
    auto within = [&](int64_t x) {
      return (lo_ex ? x > lo : x >= lo) && (hi_ex ? x < hi : x <= hi) &&
             (!integer || x % 1000000 == 0);
    };
    auto dfa = NumberRange(lower, upper, integer);
    // Empty exactly when no number of the texts' grid (or any number) is within.
    bool any = false;
    for (int64_t x = std::max<int64_t>(lo, -1000000000000) - 1;
         x <= std::min<int64_t>(hi, 1000000000000) + 1 && !any && x - lo < 5000000000; x += 1000) {
      any = within(x);
    }
    if (!dfa.ok()) {
      EXPECT_EQ(dfa.status().code(), absl::StatusCode::kInvalidArgument);
      EXPECT_FALSE(any) << dfa.status() << " " << (lower ? lower->text : "-") << " "
                        << (upper ? upper->text : "-");
      ++empty;
      continue;
    }
    std::vector<std::string> texts;
    for (int k = 0; k < 400; ++k) texts.push_back(RandomNumber(rng, integer && k % 2 == 0));
    for (int64_t v : {lo, hi}) {  // at the bounds: one millionth around, trailing zeros
      if (v == INT64_MIN || v == INT64_MAX) continue;
      for (int64_t x : {v - 1000000, v - 1, v, v + 1, v + 1000000}) {
        const int64_t m = x < 0 ? -x : x;
        const std::string sign = x < 0 ? "-" : "";
        texts.push_back(absl::StrCat(sign, m / 1000000));
        texts.push_back(absl::StrFormat("%s%d.%06d", sign, m / 1000000, m % 1000000));
        texts.push_back(absl::StrFormat("%s%d.%06d0", sign, m / 1000000, m % 1000000));
      }
    }
    for (const std::string& t : texts) {
      int64_t x;
      const bool number = Millionths(t, x) && (!integer || t.find('.') == std::string::npos);
      const bool want = number && within(x);
      (want ? inside : outside) += 1;
      EXPECT_EQ((*dfa)->Matches(t), want)
          << t << " in " << (lower ? absl::StrCat(lo_ex ? "(" : "[", lower->text) : "(-inf") << ", "
          << (upper ? absl::StrCat(upper->text, hi_ex ? ")" : "]") : "inf)")
          << (integer ? " integer" : "");
    }
  }
  // The trials reach both sides of the bounds, and a few ranges are empty.
  EXPECT_GT(inside, 20000);
  EXPECT_GT(outside, 20000);
  EXPECT_GT(empty, 3);
}

TEST(NumberRangeTest, EdgesAndRefusals) {
  auto dfa = NumberRange(NumberBound{"0", true}, NumberBound{"1", true}, /*integer=*/true);
  ASSERT_FALSE(dfa.ok());  // no integer in (0, 1)
  EXPECT_TRUE(absl::StrContains(dfa.status().message(), "no integer")) << dfa.status();
  dfa = NumberRange(NumberBound{"0", true}, NumberBound{"1", true}, /*integer=*/false);
  ASSERT_TRUE(dfa.ok());
  EXPECT_TRUE((*dfa)->Matches("0.5"));
  EXPECT_TRUE((*dfa)->Matches("0.999999999"));
  EXPECT_FALSE((*dfa)->Matches("0.0"));
  EXPECT_FALSE((*dfa)->Matches("1.000"));
  EXPECT_FALSE((*dfa)->Matches("-0"));
  dfa = NumberRange(NumberBound{"0", false}, std::nullopt, /*integer=*/true);
  ASSERT_TRUE(dfa.ok());
  EXPECT_TRUE((*dfa)->Matches("-0"));  // -0 is 0
  EXPECT_TRUE((*dfa)->Matches(std::string(30, '9')));
  EXPECT_FALSE((*dfa)->Matches("-1"));
  EXPECT_FALSE((*dfa)->Matches("01"));
  for (const char* bad : {"1e400", "x", "1.2.3", "1e-40", "1234567890123456789012345678901"}) {
    auto r = NumberRange(NumberBound{bad, false}, std::nullopt, false);
    EXPECT_FALSE(r.ok()) << bad;
  }
}

}  // namespace
}  // namespace pds::engine
