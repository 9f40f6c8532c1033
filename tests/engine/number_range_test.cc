// Numbers within bounds (engine/runtime/number_range.h): the automaton accepts exactly the JSON
// numbers (no exponent) within the bounds, compared exactly in decimal, for random bounds
// (inclusive or not, integral or not, negative, zero, in exponent form) and random texts; bad
// bounds and empty ranges are refused. The same for multiples (multipleOf).
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

// multipleOf: the automaton accepts a text exactly when it is a multiple written with no more
// digits after the point than the divisor has (exact, in millionths), for divisors integral,
// fractional and in exponent form, alone and with bounds.
TEST(NumberRangeTest, MultipleOfAcceptsExactlyTheMultiples) {
  const std::vector<std::pair<std::string, int64_t>> divisors = {
      {"1", 1000000},     {"2", 2000000},    {"3", 3000000},    {"7", 7000000},  {"12", 12000000},
      {"0.5", 500000},    {"0.25", 250000},  {"0.01", 10000},   {"0.3", 300000}, {"1.5", 1500000},
      {"2.5e-1", 250000}, {"1e1", 10000000}, {"0.125", 125000}, {"0.001", 1000}, {"1e-4", 100}};
  std::mt19937 rng(5);
  for (const auto& [text, step] : divisors) {
    const size_t point = text.find('.');
    const int places = text == "2.5e-1"             ? 2
                       : text == "1e-4"             ? 4
                       : point == std::string::npos ? 0
                                                    : static_cast<int>(text.size() - point - 1);
    for (bool integer : {false, true}) {
      auto dfa = MultipleOf(text, integer);
      ASSERT_TRUE(dfa.ok()) << text << ": " << dfa.status();
      if (*dfa == nullptr) {
        EXPECT_TRUE(integer && 1000000 % step == 0) << text;  // every integer is a multiple
        continue;
      }
      for (int k = 0; k < 3000; ++k) {
        const std::string t = RandomNumber(rng, integer && k % 2 == 0);
        int64_t v = 0;
        const bool number = Millionths(t, v);
        const size_t dot = t.find('.');
        const int digits = dot == std::string::npos ? 0 : static_cast<int>(t.size() - dot - 1);
        const bool expected = number && v % step == 0 && digits <= (integer ? 0 : places) &&
                              (!integer || dot == std::string::npos);
        EXPECT_EQ((*dfa)->Matches(t), expected)
            << "multipleOf " << text << (integer ? " (integer) " : " ") << t;
      }
      // Multiples near zero, written the shortest way, are all there.
      for (int64_t n = -40; n <= 40; ++n) {
        const int64_t v = n * step;
        if (integer && v % 1000000 != 0) continue;
        std::string t = absl::StrFormat("%s%d", v < 0 ? "-" : "", std::abs(v) / 1000000);
        if (const int64_t frac = std::abs(v) % 1000000; frac != 0) {
          std::string f = absl::StrFormat("%06d", frac);
          f.erase(f.find_last_not_of('0') + 1);
          t += "." + f;
        }
        EXPECT_TRUE((*dfa)->Matches(t)) << "multipleOf " << text << ": " << t;
      }
    }
  }
  for (const char* bad : {"0", "-2", "x", "0.0", "99999", "4094"}) {
    EXPECT_FALSE(MultipleOf(bad, /*integer=*/true).ok()) << bad;
  }
  EXPECT_TRUE(MultipleOf("4093", /*integer=*/true).ok());        // 3 + 4093 states
  EXPECT_FALSE(MultipleOf("0.000999", /*integer=*/false).ok());  // 3 + 999 x 8 states
  EXPECT_TRUE(MultipleOf("0.000999", /*integer=*/true).ok());    // 3 + 999
}

}  // namespace
}  // namespace pds::engine
