#include "engine/runtime/number_range.h"

#include <cctype>
#include <cstdlib>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/common/status_macros.h"

namespace pds::engine {
namespace {

constexpr size_t kMaxDigits = 30;  // before and after the point, in bounds and generated ints

// A decimal as digit strings: int_part without leading zeros ("0" for none), frac without
// trailing zeros; zero is never negative.
struct Decimal {
  bool negative = false;
  std::string int_part = "0";
  std::string frac;
  bool zero() const { return int_part == "0" && frac.empty(); }
};

// `what`: how messages name it ("the bound").
absl::StatusOr<Decimal> ParseDecimal(const std::string& text, absl::string_view what) {
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat(what, " ", text, " ", why));
  };
  size_t i = 0;
  Decimal d;
  if (i < text.size() && text[i] == '-') {
    d.negative = true;
    ++i;
  }
  std::string digits;
  int64_t point = -1;
  for (; i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.');
       ++i) {
    if (text[i] == '.') {
      if (point >= 0) return bad("is not a number");
      point = static_cast<int64_t>(digits.size());
    } else {
      digits.push_back(text[i]);
    }
  }
  if (digits.empty()) return bad("is not a number");
  if (point < 0) point = static_cast<int64_t>(digits.size());
  if (i < text.size()) {
    if (text[i] != 'e' && text[i] != 'E') return bad("is not a number");
    char* end = nullptr;
    const long exp = std::strtol(text.c_str() + i + 1, &end, 10);
    if (end == text.c_str() + i + 1 || *end != '\0' || exp > 400 || exp < -400) {
      return bad("is out of range (at most 30 digits before and after the point)");
    }
    point += exp;
  }
  if (point < 0) {
    digits.insert(0, static_cast<size_t>(-point), '0');
    point = 0;
  }
  if (point > static_cast<int64_t>(digits.size())) digits.append(point - digits.size(), '0');
  d.int_part = digits.substr(0, point);
  d.frac = digits.substr(point);
  d.int_part.erase(0, std::min(d.int_part.find_first_not_of('0'), d.int_part.size()));
  if (d.int_part.empty()) d.int_part = "0";
  d.frac.erase(d.frac.find_last_not_of('0') + 1);
  if (d.frac.size() > kMaxDigits) return bad("has more than 30 digits after the point");
  if (d.zero()) d.negative = false;
  return d;
}

// Digit strings plus and minus one (no leading zeros).
std::string Inc(std::string d) {
  size_t i = d.size();
  while (i > 0 && d[i - 1] == '9') d[--i] = '0';
  if (i == 0) return "1" + d;
  ++d[i - 1];
  return d;
}
std::string Dec(std::string d) {  // d > 0
  size_t i = d.size();
  while (i > 0 && d[i - 1] == '0') d[--i] = '9';
  --d[i - 1];
  if (d.size() > 1 && d[0] == '0') d.erase(0, 1);
  return d;
}

std::string Group(const std::vector<std::string>& alts) {
  return absl::StrCat("(?:", absl::StrJoin(alts, "|"), ")");
}

// The digit strings of one length n from lo to hi (lo <= hi).
std::string SameLength(const std::string& lo, const std::string& hi) {
  if (lo == hi) return lo;
  size_t p = 0;
  while (lo[p] == hi[p]) ++p;
  const std::string prefix = lo.substr(0, p);
  const std::string l = lo.substr(p), h = hi.substr(p);
  const size_t n = l.size();
  if (n == 1) return absl::StrCat(prefix, "[", l, "-", h, "]");
  const std::string rest_l = l.substr(1), rest_h = h.substr(1);
  const bool low_full = rest_l == std::string(n - 1, '0');
  const bool high_full = rest_h == std::string(n - 1, '9');
  std::vector<std::string> alts;
  const char first = low_full ? l[0] : static_cast<char>(l[0] + 1);
  const char last = high_full ? h[0] : static_cast<char>(h[0] - 1);
  if (!low_full) alts.push_back(std::string(1, l[0]) + SameLength(rest_l, std::string(n - 1, '9')));
  if (first <= last)
    alts.push_back(
        absl::StrCat("[", std::string(1, first), "-", std::string(1, last), "]\\d{", n - 1, "}"));
  if (!high_full)
    alts.push_back(std::string(1, h[0]) + SameLength(std::string(n - 1, '0'), rest_h));
  return prefix + Group(alts);
}

// Nonnegative integers from lo to hi as JSON writes them (hi empty: any up to kMaxDigits
// digits); empty when there are none.
std::string IntRange(const std::string& lo, const std::string& hi) {
  const size_t top = hi.empty() ? kMaxDigits : hi.size();
  if (lo.size() > top) return "";
  std::vector<std::string> alts;
  for (size_t n = lo.size(); n <= top; ++n) {
    const std::string from = n == lo.size() ? lo : "1" + std::string(n - 1, '0');
    const std::string to = n == top && !hi.empty() ? hi : std::string(n, '9');
    if (n > lo.size() && n < top) {  // every length between: one piece
      alts.push_back(absl::StrCat("[1-9]\\d{", n - 1, ",", top - 2, "}"));
      n = top - 1;
      continue;
    }
    alts.push_back(SameLength(from, to));
  }
  return Group(alts);
}

// Fraction digits F (at least one) with 0.F at most (below when strict) / at least (above)
// 0.b, b without trailing zeros.
void FracAtMost(const std::string& b, bool strict, std::vector<std::string>& alts) {
  for (size_t i = 0; i < b.size(); ++i) {
    if (b[i] > '0') {
      alts.push_back(absl::StrCat(b.substr(0, i), "[0-", std::string(1, b[i] - 1), "]\\d*"));
    }
  }
  for (size_t i = 0; i <= b.size(); ++i) {  // a prefix of b, then zeros: equal only when whole
    if (i == b.size() && strict) break;
    alts.push_back(i == 0 ? "0+" : b.substr(0, i) + "0*");
  }
}
void FracAtLeast(const std::string& a, bool strict, std::vector<std::string>& alts) {
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] < '9') {
      alts.push_back(absl::StrCat(a.substr(0, i), "[", std::string(1, a[i] + 1), "-9]\\d*"));
    }
  }
  if (strict) {
    alts.push_back(a + "\\d*[1-9]\\d*");
  } else {
    alts.push_back(a.empty() ? "\\d+" : a + "\\d*");
  }
}

// Nonnegative numbers at most / at least b (strictly when `strict`).
void AtMost(const Decimal& b, bool strict, bool integer, std::vector<std::string>& alts) {
  const std::string frac = integer ? "" : "(?:\\.\\d+)?";
  if (b.int_part != "0") alts.push_back(IntRange("0", Dec(b.int_part)) + frac);
  if (!b.frac.empty() || !strict) alts.push_back(b.int_part);  // the integer part alone
  if (integer) return;
  std::vector<std::string> f;
  FracAtMost(b.frac, strict, f);
  if (!f.empty()) alts.push_back(b.int_part + "\\." + Group(f));
}
void AtLeast(const Decimal& a, bool strict, bool integer, std::vector<std::string>& alts) {
  const std::string frac = integer ? "" : "(?:\\.\\d+)?";
  if (const std::string above = IntRange(Inc(a.int_part), ""); !above.empty()) {
    alts.push_back(above + frac);
  }
  if (a.frac.empty() && !strict) alts.push_back(a.int_part);
  if (integer) return;
  std::vector<std::string> f;
  FracAtLeast(a.frac, strict, f);
  alts.push_back(a.int_part + "\\." + Group(f));
}

// The pattern of the numbers on the allowed side of one bound.
std::string Side(const Decimal& bound, bool exclusive, bool upper, bool integer) {
  const std::string any = integer ? "(?:0|[1-9]\\d*)" : "(?:0|[1-9]\\d*)(?:\\.\\d+)?";
  Decimal magnitude = bound;
  magnitude.negative = false;
  std::vector<std::string> pos, neg;  // x >= 0 as written; x = -y by y
  if (upper && !bound.negative) {     // x <= b: every negative (but -0 when x < 0)
    AtMost(bound, exclusive, integer, pos);
    if (bound.zero() && exclusive) {
      AtLeast(Decimal(), /*strict=*/true, integer, neg);
    } else {
      neg.push_back(any);
    }
  } else if (upper) {  // x <= -m: y >= m
    AtLeast(magnitude, exclusive, integer, neg);
  } else if (!bound.negative) {  // x >= b (-0 is 0)
    AtLeast(bound, exclusive, integer, pos);
    if (bound.zero() && !exclusive) AtMost(Decimal(), /*strict=*/false, integer, neg);
  } else {  // x >= -m: every nonnegative, and y <= m
    pos.push_back(any);
    AtMost(magnitude, exclusive, integer, neg);
  }
  std::vector<std::string> alts = pos;
  if (!neg.empty()) alts.push_back("-" + Group(neg));
  return alts.empty() ? "[]" : Group(alts);
}

}  // namespace

absl::StatusOr<std::shared_ptr<const ByteDfa>> NumberRange(const std::optional<NumberBound>& lower,
                                                           const std::optional<NumberBound>& upper,
                                                           bool integer) {
  std::shared_ptr<const ByteDfa> out;
  for (const auto* b : {&lower, &upper}) {
    if (!b->has_value()) continue;
    PDS_ASSIGN_OR_RETURN(Decimal d, ParseDecimal((*b)->text, "the bound"));
    if (d.int_part.size() > kMaxDigits) {                    // past what 32 characters can write
      if (b == &upper ? !d.negative : d.negative) continue;  // no bound at all, then
      return absl::InvalidArgumentError(absl::StrCat("no number of at most 32 characters is ",
                                                     b == &upper ? "below" : "above", " the bound ",
                                                     (*b)->text));
    }
    auto side =
        ByteDfa::Compile(Side(d, (*b)->exclusive, b == &upper, integer), ByteDfa::Mode::kFullMatch);
    if (!side.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("no ", integer ? "integer" : "number", " is ",
                                                     b == &upper ? "below" : "above", " the bound ",
                                                     (*b)->text));
    }
    if (out == nullptr) {
      out = *std::move(side);
      continue;
    }
    auto both = ByteDfa::Intersect(*out, **side);
    if (!both.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("no ", integer ? "integer" : "number",
                                                     " is between the bounds ", lower->text,
                                                     " and ", upper->text));
    }
    out = *std::move(both);
  }
  return out;
}

absl::StatusOr<std::shared_ptr<const ByteDfa>> MultipleOf(const std::string& text, bool integer) {
  PDS_ASSIGN_OR_RETURN(const Decimal d, ParseDecimal(text, "multipleOf"));
  if (d.negative || d.zero()) {
    return absl::InvalidArgumentError(absl::StrCat("multipleOf ", text, " is not above 0"));
  }
  // d = m / 10^e: a number is a multiple when it has at most e digits after its point and its
  // digits, as an integer scaled by 10^e, are a multiple of m.
  std::string digits = d.int_part + d.frac;
  digits.erase(0, digits.find_first_not_of('0'));
  const int32_t e = static_cast<int32_t>(d.frac.size());
  const int32_t frac_states = integer ? 0 : e + 1;
  constexpr int32_t kMaxStates = 4096;
  if (digits.size() > 4 || 3 + std::stoi(digits) * (1 + frac_states) > kMaxStates) {
    return absl::InvalidArgumentError(
        absl::StrCat("multipleOf ", text, " needs an automaton of over 4096 states"));
  }
  const int32_t m = std::stoi(digits);
  auto pow10_mod = [m](int32_t k) {
    int64_t p = 1 % m;
    for (int32_t i = 0; i < k; ++i) p = p * 10 % m;
    return p;
  };
  if (integer && pow10_mod(e) == 0) return nullptr;  // every integer is a multiple
  // States: 0 start, 1 after '-', 2 the integer part "0", 3 + r the integer part so far with
  // remainder r (mod m), 3 + m + j * m + r after j digits after the point, remainder r.
  constexpr int32_t kStart = 0, kMinus = 1, kZero = 2, kInt = 3;
  const int32_t frac0 = kInt + m;
  auto next = [&](int32_t s, uint8_t b) -> int32_t {
    const bool digit = b >= '0' && b <= '9';
    const int32_t v = b - '0';
    if (s == kStart || s == kMinus) {
      if (s == kStart && b == '-') return kMinus;
      if (b == '0') return kZero;
      return digit ? kInt + v % m : -1;
    }
    if (s < frac0) {  // kZero or an integer part
      const int32_t r = s == kZero ? 0 : s - kInt;
      if (b == '.' && frac_states > 1) return frac0 + r;
      return digit && s != kZero ? kInt + (r * 10 + v) % m : -1;
    }
    const int32_t j = (s - frac0) / m, r = (s - frac0) % m;
    return digit && j < e ? frac0 + (j + 1) * m + (r * 10 + v) % m : -1;
  };
  auto accepting = [&](int32_t s) {
    if (s == kZero) return true;
    if (s < kInt) return false;
    if (s < frac0) return (s - kInt) * pow10_mod(e) % m == 0;
    const int32_t j = (s - frac0) / m, r = (s - frac0) % m;
    return j >= 1 && r * pow10_mod(e - j) % m == 0;
  };
  return ByteDfa::FromTransitions(frac0 + m * frac_states, next, accepting);
}

}  // namespace pds::engine
