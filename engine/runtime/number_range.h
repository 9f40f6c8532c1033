// JSON numbers within bounds as a byte automaton: what JSON Schema's minimum, maximum,
// exclusiveMinimum and exclusiveMaximum allow a reply to write. Exact in decimal (no rounding
// through binary floating point): each side is a regular expression over the digits, built
// from the bound's decimal text, and the two sides are intersected.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "engine/runtime/regex.h"

namespace pds::engine {

struct NumberBound {
  std::string text;        // the bound as JSON number text ("1.5", "-3", "1e-07", ...)
  bool exclusive = false;  // exclusiveMinimum / exclusiveMaximum
};

// The JSON numbers (integers only when `integer`) between `lower` and `upper` (at least one
// given), written without an exponent; null when the bounds bound nothing a number of 32
// characters can write (1e308 as a maximum). INVALID_ARGUMENT when a bound is not a number or
// needs more than 30 digits after its point, or when no number is between them.
absl::StatusOr<std::shared_ptr<const ByteDfa>> NumberRange(const std::optional<NumberBound>& lower,
                                                           const std::optional<NumberBound>& upper,
                                                           bool integer);

// The JSON numbers (integers only when `integer`) that are multiples of `text` (JSON Schema's
// multipleOf, a JSON number text above 0), written without an exponent and with no more
// digits after the point than `text` has; null when every integer is one (`integer`, and 1,
// 0.5, ...). Exact in decimal. INVALID_ARGUMENT when it is not above 0 or needs over 4096
// automaton states (its digits as an integer, times its digits after the point plus one).
absl::StatusOr<std::shared_ptr<const ByteDfa>> MultipleOf(const std::string& text, bool integer);

}  // namespace pds::engine
