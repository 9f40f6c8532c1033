// Regular expressions as byte automata, for constrained generation: a reply (or a JSON string's
// content) held to a pattern, one byte at a time.
//
// The syntax is ECMAScript's (what JSON Schema's `pattern` uses) without what needs more than
// a finite automaton or changes matching: literals and identity escapes, `.` (any character
// but line terminators), classes `[...]` and `[^...]` with ranges, \d \D \w \W \s \S, \n \r \t
// \f \v \0 \xHH \uHHHH (surrogate pairs joined) \u{H...}, groups `(...)`, `(?:...)`,
// `(?<name>...)`, alternation, and the quantifiers * + ? {n} {n,} {n,m} (lazy forms mean the
// same here). `^` and `$` only at the start and end of the pattern or of one of its top-level
// alternatives. Refused with INVALID_ARGUMENT naming the place: backreferences, lookaround,
// word boundaries, flags, Unicode property escapes, counts over 1000, groups nested over 256
// deep, and patterns whose automaton needs more than 4096 states (or 100000 before
// determinization, or whose states hold over 2M NFA positions in all: compilation is bounded in
// time and memory). As ECMAScript outside unicode mode, a '-' beside a class escape in a class
// ([\w-.]) is a literal.
//
// Characters are Unicode scalar values written as UTF-8: the automaton never takes a surrogate
// or a broken character.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace pds::engine {

class ByteDfa {
 public:
  enum class Mode {
    kFullMatch,  // the whole text matches (vLLM's guided_regex, SGLang's regex)
    kSearch,     // the text contains a match (JSON Schema's pattern): unanchored ends
  };
  // `work_left`: a budget shared by several compilations (one schema's patterns), lowered by
  // what this one costs; null: this one's own limit only.
  static absl::StatusOr<std::shared_ptr<const ByteDfa>> Compile(absl::string_view pattern,
                                                                Mode mode,
                                                                size_t* work_left = nullptr);
  // The texts both accept (at most 4096 states).
  static absl::StatusOr<std::shared_ptr<const ByteDfa>> Intersect(const ByteDfa& a,
                                                                  const ByteDfa& b);
  // The automaton of states 0..states-1 (0 the start) that `next(state, byte)` (-1: none)
  // and `accepting(state)` describe; states that reach no accepting one are dropped. At most
  // 4096 states.
  static absl::StatusOr<std::shared_ptr<const ByteDfa>> FromTransitions(
      int32_t states, const std::function<int32_t(int32_t, uint8_t)>& next,
      const std::function<bool(int32_t)>& accepting);
  // A full-match pattern accepting exactly `choices` (each escaped).
  static std::string Alternation(const std::vector<std::string>& choices);

  int32_t start() const { return start_; }
  int32_t size() const { return static_cast<int32_t>(accepting_.size()); }
  // The state after `byte`; -1 when no text of the language continues so (every state kept
  // can still reach an accepting one).
  int32_t Next(int32_t state, uint8_t byte) const {
    return next_[static_cast<size_t>(state) * classes_ + class_of_[byte]];
  }
  bool Accepting(int32_t state) const { return accepting_[state] != 0; }
  // Accepting, with nothing that may follow: the text is over.
  bool Final(int32_t state) const { return final_[state] != 0; }
  // Whether the automaton accepts the whole of `text`.
  bool Matches(absl::string_view text) const;
  // The fewest characters (UTF-8 lead bytes) that take `state` to an accepting one.
  int32_t CharsToAccept(int32_t state) const { return chars_to_accept_[state]; }
  // Whether some character in [lo, hi] (code points; surrogates are none) takes `state` to one
  // at most `room` characters from accepting (what an escape's first digits may still become).
  bool TakesSome(int32_t state, uint32_t lo, uint32_t hi, int64_t room) const;

 private:
  friend class DfaBuilder;
  ByteDfa() = default;
  int32_t start_ = 0;
  int32_t classes_ = 1;
  uint8_t class_of_[256] = {};
  std::vector<int32_t> next_;  // [state * classes_ + class]
  std::vector<uint8_t> accepting_, final_;
  std::vector<int32_t> chars_to_accept_;
};

}  // namespace pds::engine
