#include "engine/runtime/regex.h"

#include <algorithm>
#include <deque>
#include <limits>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "engine/common/status_macros.h"
#include "engine/tokenizer/unicode.h"

namespace pds::engine {
namespace {

constexpr uint32_t kMaxCodePoint = 0x10FFFF;
constexpr int kMaxCount = 1000;           // n and m of {n,m}
constexpr size_t kMaxNfaStates = 100000;  // before determinization
constexpr size_t kMaxDfaStates = 4096;
constexpr int kMaxGroupDepth = 256;  // nested groups (the parser recurses into each)
// Determinization's cost: NFA positions held by all DFA states, and positions times byte
// classes visited (a pattern such as (?:(?:x?){1000}){45} has few states of many positions).
constexpr size_t kMaxHeldPositions = 2'000'000;
constexpr size_t kMaxWork = 40'000'000;

using Ranges = std::vector<std::pair<uint32_t, uint32_t>>;  // code points, inclusive

// Sorted, merged, and without the surrogates (which are not characters).
Ranges Normalize(Ranges r) {
  Ranges split;
  for (auto [lo, hi] : r) {
    if (lo > hi) continue;
    if (lo < 0xD800 && hi >= 0xD800) {
      split.emplace_back(lo, 0xD7FF);
      lo = 0xE000;
    }
    if (lo >= 0xD800 && lo <= 0xDFFF) lo = 0xE000;
    if (lo <= hi) split.emplace_back(lo, std::min(hi, kMaxCodePoint));
  }
  std::sort(split.begin(), split.end());
  Ranges out;
  for (const auto& [lo, hi] : split) {
    if (!out.empty() && lo <= out.back().second + 1) {
      out.back().second = std::max(out.back().second, hi);
    } else {
      out.emplace_back(lo, hi);
    }
  }
  return out;
}

Ranges Complement(const Ranges& r) {
  Ranges out;
  uint32_t next = 0;
  for (const auto& [lo, hi] : Normalize(r)) {
    if (lo > next) out.emplace_back(next, lo - 1);
    next = hi + 1;
  }
  if (next <= kMaxCodePoint) out.emplace_back(next, kMaxCodePoint);
  return Normalize(std::move(out));
}

const Ranges& Digits() {
  static const Ranges r = {{'0', '9'}};
  return r;
}
const Ranges& Word() {
  static const Ranges r = {{'0', '9'}, {'A', 'Z'}, {'_', '_'}, {'a', 'z'}};
  return r;
}
const Ranges& Spaces() {  // ECMAScript's WhiteSpace and LineTerminator
  static const Ranges r = Normalize({{'\t', '\r'},
                                     {' ', ' '},
                                     {0xA0, 0xA0},
                                     {0x1680, 0x1680},
                                     {0x2000, 0x200A},
                                     {0x2028, 0x2029},
                                     {0x202F, 0x202F},
                                     {0x205F, 0x205F},
                                     {0x3000, 0x3000},
                                     {0xFEFF, 0xFEFF}});
  return r;
}
const Ranges& Dot() {  // all but the line terminators
  static const Ranges r = Complement({{'\n', '\n'}, {'\r', '\r'}, {0x2028, 0x2029}});
  return r;
}

// A parsed pattern.
struct Re {
  enum Kind : uint8_t { kSet, kConcat, kAlt, kRepeat };
  Kind kind = kConcat;  // an empty concatenation matches the empty text
  Ranges set;           // kSet
  std::vector<Re> subs;
  int min = 0, max = -1;  // kRepeat; max -1: no bound
};

Re Set(Ranges r) {
  Re re;
  re.kind = Re::kSet;
  re.set = Normalize(std::move(r));
  return re;
}

class Parser {
 public:
  Parser(std::vector<uint32_t> chars, ByteDfa::Mode mode) : p_(std::move(chars)), mode_(mode) {}

  absl::StatusOr<Re> Pattern() {
    PDS_ASSIGN_OR_RETURN(Re re, Alternatives(/*top=*/true));
    mark_ = i_;
    if (i_ < p_.size()) return Error("unmatched ')'");
    return re;
  }

 private:
  absl::Status Error(absl::string_view why) const {
    return absl::InvalidArgumentError(absl::StrCat("regex at character ", mark_, ": ", why));
  }
  bool At(uint32_t c) const { return i_ < p_.size() && p_[i_] == c; }

  absl::StatusOr<Re> Alternatives(bool top) {
    Re alt;
    alt.kind = Re::kAlt;
    while (true) {
      PDS_ASSIGN_OR_RETURN(Re seq, Sequence(top));
      alt.subs.push_back(std::move(seq));
      if (!At('|')) break;
      ++i_;
    }
    if (alt.subs.size() == 1) return std::move(alt.subs[0]);
    return alt;
  }

  // One alternative; at the top, its anchors decide whether a search may skip text before or
  // after it.
  absl::StatusOr<Re> Sequence(bool top) {
    Re seq;
    bool anchored_start = false, anchored_end = false;
    if (top && At('^')) {
      anchored_start = true;
      ++i_;
    }
    while (i_ < p_.size() && !At('|') && !At(')')) {
      if (At('$') && top && (i_ + 1 == p_.size() || p_[i_ + 1] == '|')) {
        anchored_end = true;
        ++i_;
        break;
      }
      PDS_ASSIGN_OR_RETURN(Re atom, Quantified());
      seq.subs.push_back(std::move(atom));
    }
    if (!top || mode_ == ByteDfa::Mode::kFullMatch) return seq;
    Re any;
    any.kind = Re::kRepeat;
    any.subs.push_back(Set({{0, kMaxCodePoint}}));
    if (!anchored_start) seq.subs.insert(seq.subs.begin(), any);
    if (!anchored_end) seq.subs.push_back(std::move(any));
    return seq;
  }

  // A number of a {n,m} count; -1 when there is none.
  int Number() {
    int64_t n = -1;
    while (i_ < p_.size() && p_[i_] >= '0' && p_[i_] <= '9') {
      n = std::min<int64_t>((n < 0 ? 0 : n) * 10 + (p_[i_] - '0'), kMaxCount + 1);
      ++i_;
    }
    return static_cast<int>(n);
  }

  // {n}, {n,}, {n,m} at i_ (just past the '{'); false, with i_ back, when it is not one (then
  // the '{' is a literal, as ECMAScript reads it outside unicode mode).
  bool Count(int& min, int& max) {
    const size_t save = i_;
    min = Number();
    max = min;
    if (min >= 0 && At(',')) {
      ++i_;
      max = Number();
    }
    if (min < 0 || !At('}')) {
      i_ = save;
      return false;
    }
    ++i_;
    return true;
  }

  absl::StatusOr<Re> Quantified() {
    PDS_ASSIGN_OR_RETURN(Re atom, Atom());
    if (i_ >= p_.size()) return atom;
    mark_ = i_;
    int min = 0, max = -1;
    const uint32_t c = p_[i_];
    if (c == '*' || c == '+' || c == '?') {
      ++i_;
      min = c == '+' ? 1 : 0;
      max = c == '?' ? 1 : -1;
    } else if (c == '{') {
      ++i_;
      if (!Count(min, max)) {
        --i_;
        return atom;
      }
      if (min > kMaxCount || max > kMaxCount) return Error("a count over 1000");
      if (max >= 0 && max < min) return Error("a count {n,m} with m < n");
    } else {
      return atom;
    }
    if (At('?')) ++i_;  // lazy: the same language
    if (At('*') || At('+') || At('?') || At('{')) {
      if (!At('{')) return Error("a quantifier after a quantifier");
      int a, b;
      const size_t save = i_++;
      const bool count = Count(a, b);
      i_ = save;
      if (count) return Error("a quantifier after a quantifier");
    }
    Re rep;
    rep.kind = Re::kRepeat;
    rep.min = min;
    rep.max = max;
    rep.subs.push_back(std::move(atom));
    return rep;
  }

  absl::StatusOr<Re> Atom() {
    mark_ = i_;
    const uint32_t c = p_[i_++];
    switch (c) {
      case '(': {
        const size_t open = mark_;
        if (At('?')) {
          if (i_ + 1 < p_.size() && p_[i_ + 1] == ':') {
            i_ += 2;
          } else if (i_ + 1 < p_.size() && p_[i_ + 1] == '<' && i_ + 2 < p_.size() &&
                     p_[i_ + 2] != '=' && p_[i_ + 2] != '!') {
            while (i_ < p_.size() && p_[i_] != '>') ++i_;  // a named group: the name is unused
            if (i_ == p_.size()) return Error("a group name without '>'");
            ++i_;
          } else {
            return Error("lookaround and inline flags are not supported");
          }
        }
        if (++depth_ > kMaxGroupDepth) return Error("groups nested deeper than 256");
        PDS_ASSIGN_OR_RETURN(Re inner, Alternatives(/*top=*/false));
        --depth_;
        if (!At(')')) {
          mark_ = open;
          return Error("a '(' without its ')'");
        }
        ++i_;
        return inner;
      }
      case ')':
        return Error("unmatched ')'");
      case '*':
      case '+':
      case '?':
        return Error("nothing to repeat");
      case '^':
      case '$':
        return Error(
            "^ and $ only at the start and the end of the pattern (or of a top-level "
            "alternative)");
      case '.':
        return Set(Dot());
      case '[':
        return Class();
      case '\\': {
        Ranges set;
        PDS_RETURN_IF_ERROR(Escape(/*in_class=*/false, set));
        return Set(std::move(set));
      }
      default:
        return Set({{c, c}});
    }
  }

  // Hex digits at i_: exactly `n` of them (n > 0), or 1-6 up to '}' (n == 0).
  absl::StatusOr<uint32_t> Hex(int n) {
    uint32_t v = 0;
    int digits = 0;
    while (i_ < p_.size() && (n == 0 || digits < n)) {
      const int d = p_[i_] < 0x80 ? HexDigit(static_cast<char>(p_[i_])) : -1;
      if (d < 0) break;
      v = v * 16 + d;
      ++i_;
      if (++digits > 6) return Error("a \\u{...} escape past U+10FFFF");
    }
    if (digits == 0 || (n > 0 && digits < n)) return Error("an escape without its hex digits");
    return v;
  }

  // After a backslash: the characters the escape stands for.
  absl::Status Escape(bool in_class, Ranges& out) {
    if (i_ >= p_.size()) return Error("a pattern ending in a backslash");
    const uint32_t c = p_[i_++];
    auto one = [&](uint32_t v) {
      out = {{v, v}};
      return absl::OkStatus();
    };
    switch (c) {
      case 'd':
        out = Digits();
        return absl::OkStatus();
      case 'D':
        out = Complement(Digits());
        return absl::OkStatus();
      case 'w':
        out = Word();
        return absl::OkStatus();
      case 'W':
        out = Complement(Word());
        return absl::OkStatus();
      case 's':
        out = Spaces();
        return absl::OkStatus();
      case 'S':
        out = Complement(Spaces());
        return absl::OkStatus();
      case 'n':
        return one('\n');
      case 'r':
        return one('\r');
      case 't':
        return one('\t');
      case 'f':
        return one('\f');
      case 'v':
        return one('\v');
      case '0':
        if (i_ < p_.size() && p_[i_] >= '0' && p_[i_] <= '9') {
          return Error("octal escapes are not supported");
        }
        return one(0);
      case 'b':
        if (in_class) return one('\b');
        return Error("word boundaries (\\b) are not supported");
      case 'x': {
        PDS_ASSIGN_OR_RETURN(uint32_t v, Hex(2));
        return one(v);
      }
      case 'u': {
        if (At('{')) {
          ++i_;
          PDS_ASSIGN_OR_RETURN(uint32_t v, Hex(0));
          if (!At('}') || v > kMaxCodePoint) return Error("a bad \\u{...} escape");
          ++i_;
          return one(v);
        }
        PDS_ASSIGN_OR_RETURN(uint32_t v, Hex(4));
        if (v >= 0xD800 && v <= 0xDBFF && i_ + 1 < p_.size() && p_[i_] == '\\' &&
            p_[i_ + 1] == 'u') {  // a surrogate pair is one character
          const size_t save = i_;
          i_ += 2;
          auto low = Hex(4);
          if (low.ok() && *low >= 0xDC00 && *low <= 0xDFFF) {
            return one(0x10000 + ((v - 0xD800) << 10) + (*low - 0xDC00));
          }
          i_ = save;
        }
        if (v >= 0xD800 && v <= 0xDFFF) return Error("a lone surrogate escape");
        return one(v);
      }
      default:
        if (c >= '1' && c <= '9') return Error("backreferences are not supported");
        if (c < 0x80 && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))) {
          return Error(absl::StrCat("the escape \\", std::string(1, static_cast<char>(c)),
                                    " is not supported"));
        }
        return one(c);  // an identity escape: \. \\ \/ \[ ...
    }
  }

  absl::StatusOr<Re> Class() {
    const size_t open = mark_;
    const bool negated = At('^');
    if (negated) ++i_;
    Ranges set;
    while (true) {
      if (i_ >= p_.size()) {
        mark_ = open;
        return Error("a '[' without its ']'");
      }
      if (At(']')) {
        ++i_;
        break;
      }
      Ranges lo;
      PDS_RETURN_IF_ERROR(ClassAtom(lo));
      if (At('-') && i_ + 1 < p_.size() && p_[i_ + 1] != ']') {
        ++i_;
        Ranges hi;
        PDS_RETURN_IF_ERROR(ClassAtom(hi));
        if (lo.size() != 1 || hi.size() != 1 || lo[0].first != lo[0].second ||
            hi[0].first != hi[0].second) {  // [\w-.]: a set beside '-' makes it a literal
          set.insert(set.end(), lo.begin(), lo.end());
          set.emplace_back('-', '-');
          set.insert(set.end(), hi.begin(), hi.end());
          continue;
        }
        if (hi[0].first < lo[0].first) return Error("a class range out of order");
        set.emplace_back(lo[0].first, hi[0].first);
        continue;
      }
      set.insert(set.end(), lo.begin(), lo.end());
    }
    return Set(negated ? Complement(set) : std::move(set));
  }

  absl::Status ClassAtom(Ranges& out) {
    mark_ = i_;
    const uint32_t c = p_[i_++];
    if (c == '\\') return Escape(/*in_class=*/true, out);
    out = {{c, c}};
    return absl::OkStatus();
  }

  std::vector<uint32_t> p_;
  ByteDfa::Mode mode_;
  size_t i_ = 0;
  size_t mark_ = 0;  // where the construct being read starts (what errors name)
  int depth_ = 0;    // groups open
};

// A code point range's UTF-8 forms as sequences of byte ranges (each byte of a sequence takes
// any value in its range independently).
using ByteSeq = std::vector<std::pair<uint8_t, uint8_t>>;

int Utf8Encode(uint32_t c, uint8_t* out) {
  if (c < 0x80) {
    out[0] = static_cast<uint8_t>(c);
    return 1;
  }
  if (c < 0x800) {
    out[0] = static_cast<uint8_t>(0xC0 | (c >> 6));
    out[1] = static_cast<uint8_t>(0x80 | (c & 0x3F));
    return 2;
  }
  if (c < 0x10000) {
    out[0] = static_cast<uint8_t>(0xE0 | (c >> 12));
    out[1] = static_cast<uint8_t>(0x80 | ((c >> 6) & 0x3F));
    out[2] = static_cast<uint8_t>(0x80 | (c & 0x3F));
    return 3;
  }
  out[0] = static_cast<uint8_t>(0xF0 | (c >> 18));
  out[1] = static_cast<uint8_t>(0x80 | ((c >> 12) & 0x3F));
  out[2] = static_cast<uint8_t>(0x80 | ((c >> 6) & 0x3F));
  out[3] = static_cast<uint8_t>(0x80 | (c & 0x3F));
  return 4;
}

void Utf8Sequences(uint32_t lo, uint32_t hi, std::vector<ByteSeq>& out) {
  for (uint32_t edge : {0x7Fu, 0x7FFu, 0xFFFFu}) {  // one encoded length at a time
    if (lo <= edge && hi > edge) {
      Utf8Sequences(lo, edge, out);
      Utf8Sequences(edge + 1, hi, out);
      return;
    }
  }
  for (int k = 1; k < 4; ++k) {  // the low bytes of a sub-range span whole continuation ranges
    const uint32_t m = (1u << (6 * k)) - 1;
    if ((lo & ~m) == (hi & ~m)) continue;
    if ((lo & m) != 0) {
      Utf8Sequences(lo, lo | m, out);
      Utf8Sequences((lo | m) + 1, hi, out);
      return;
    }
    if ((hi & m) != m) {
      Utf8Sequences(lo, (hi & ~m) - 1, out);
      Utf8Sequences(hi & ~m, hi, out);
      return;
    }
  }
  uint8_t a[4], b[4];
  const int n = Utf8Encode(lo, a);
  Utf8Encode(hi, b);
  ByteSeq seq;
  for (int k = 0; k < n; ++k) seq.emplace_back(a[k], b[k]);
  out.push_back(std::move(seq));
}

struct Nfa {
  struct State {
    std::vector<std::pair<std::pair<uint8_t, uint8_t>, int32_t>> moves;  // byte range -> state
    std::vector<int32_t> eps;
  };
  std::vector<State> states;

  int32_t Add() {
    states.emplace_back();
    return static_cast<int32_t>(states.size()) - 1;
  }
};

class NfaBuilder {
 public:
  explicit NfaBuilder(Nfa& nfa) : nfa_(nfa) {}

  // Builds `re` from state `from`; the state where it ends.
  absl::StatusOr<int32_t> Build(const Re& re, int32_t from) {
    if (nfa_.states.size() > kMaxNfaStates) {
      return absl::InvalidArgumentError("regex: the pattern needs over 100000 automaton states");
    }
    switch (re.kind) {
      case Re::kSet: {
        const int32_t to = nfa_.Add();
        std::vector<ByteSeq> seqs;
        for (const auto& [lo, hi] : re.set) Utf8Sequences(lo, hi, seqs);
        for (const ByteSeq& seq : seqs) {
          int32_t at = from;
          for (size_t k = 0; k < seq.size(); ++k) {
            const int32_t next = k + 1 == seq.size() ? to : nfa_.Add();
            nfa_.states[at].moves.push_back({seq[k], next});
            at = next;
          }
        }
        return to;
      }
      case Re::kConcat: {
        int32_t at = from;
        for (const Re& sub : re.subs) {
          PDS_ASSIGN_OR_RETURN(at, Build(sub, at));
        }
        return at;
      }
      case Re::kAlt: {
        const int32_t to = nfa_.Add();
        for (const Re& sub : re.subs) {
          const int32_t start = nfa_.Add();
          nfa_.states[from].eps.push_back(start);
          PDS_ASSIGN_OR_RETURN(int32_t end, Build(sub, start));
          nfa_.states[end].eps.push_back(to);
        }
        return to;
      }
      case Re::kRepeat: {
        int32_t at = from;
        for (int k = 0; k < re.min; ++k) {
          PDS_ASSIGN_OR_RETURN(at, Build(re.subs[0], at));
        }
        if (re.max < 0) {  // a loop: from `loop`, the item again or out
          const int32_t loop = nfa_.Add();
          nfa_.states[at].eps.push_back(loop);
          PDS_ASSIGN_OR_RETURN(int32_t end, Build(re.subs[0], loop));
          nfa_.states[end].eps.push_back(loop);
          return loop;
        }
        const int32_t to = nfa_.Add();
        for (int k = re.min; k < re.max; ++k) {  // each optional copy may end the run
          nfa_.states[at].eps.push_back(to);
          PDS_ASSIGN_OR_RETURN(at, Build(re.subs[0], at));
        }
        nfa_.states[at].eps.push_back(to);
        return to;
      }
    }
    return from;
  }

 private:
  Nfa& nfa_;
};

}  // namespace

class DfaBuilder {
 public:
  static absl::StatusOr<std::shared_ptr<const ByteDfa>> Build(const Nfa& nfa, int32_t start,
                                                              int32_t accept, size_t* work_left) {
    const size_t max_work = work_left != nullptr ? std::min(kMaxWork, *work_left) : kMaxWork;
    std::shared_ptr<ByteDfa> dfa(new ByteDfa());
    // Byte classes: bytes no transition tells apart share a column; continuation bytes never
    // share one with others (CharsToAccept counts characters by their lead bytes).
    std::vector<uint8_t> edge(257, 0);
    edge[0] = edge[0x80] = edge[0xC0] = 1;
    for (const Nfa::State& s : nfa.states) {
      for (const auto& [range, to] : s.moves) edge[range.first] = edge[range.second + 1] = 1;
    }
    int32_t cls = -1;
    std::vector<uint8_t> rep;  // a byte of each class
    for (int b = 0; b < 256; ++b) {
      if (edge[b]) {
        ++cls;
        rep.push_back(static_cast<uint8_t>(b));
      }
      dfa->class_of_[b] = static_cast<uint8_t>(cls);
    }
    dfa->classes_ = cls + 1;

    std::vector<uint32_t> mark(nfa.states.size(), 0);
    uint32_t epoch = 0;
    auto closure = [&](std::vector<int32_t> set) {
      ++epoch;
      std::vector<int32_t> stack = set, out;
      for (int32_t s : set) mark[s] = epoch;
      while (!stack.empty()) {
        const int32_t s = stack.back();
        stack.pop_back();
        out.push_back(s);
        for (int32_t t : nfa.states[s].eps) {
          if (mark[t] != epoch) {
            mark[t] = epoch;
            stack.push_back(t);
          }
        }
      }
      std::sort(out.begin(), out.end());
      return out;
    };
    std::vector<std::vector<int32_t>> sets;
    absl::flat_hash_map<std::vector<int32_t>, int32_t> ids;
    size_t held = 0, work = 0;
    auto id_of = [&](std::vector<int32_t> set) -> int32_t {
      if (set.empty()) return -1;
      work += set.size();
      auto [it, added] = ids.try_emplace(set, static_cast<int32_t>(sets.size()));
      if (added) {
        held += 2 * set.size();  // the key and the list
        sets.push_back(std::move(set));
      }
      return it->second;
    };
    id_of(closure({start}));
    std::vector<int32_t> next;
    for (size_t d = 0; d < sets.size(); ++d) {
      if (sets.size() > kMaxDfaStates) {
        return absl::InvalidArgumentError("regex: the pattern needs over 4096 automaton states");
      }
      if (held > kMaxHeldPositions || work > max_work) {
        return absl::InvalidArgumentError(
            "regex: the pattern is too costly to compile (its automaton's states hold too many "
            "positions)");
      }
      work += sets[d].size() * static_cast<size_t>(dfa->classes_);
      for (int32_t c = 0; c < dfa->classes_; ++c) {
        std::vector<int32_t> to;
        for (int32_t s : sets[d]) {
          for (const auto& [range, t] : nfa.states[s].moves) {
            if (rep[c] >= range.first && rep[c] <= range.second) to.push_back(t);
          }
        }
        std::sort(to.begin(), to.end());
        to.erase(std::unique(to.begin(), to.end()), to.end());
        next.push_back(to.empty() ? -1 : id_of(closure(std::move(to))));
      }
    }
    if (work_left != nullptr) *work_left -= std::min(work, *work_left);
    std::vector<uint8_t> accepting(sets.size());
    for (size_t d = 0; d < sets.size(); ++d) {
      accepting[d] = std::binary_search(sets[d].begin(), sets[d].end(), accept);
    }
    return Finish(std::move(dfa), next, accepting, rep);
  }

  // Texts both accept: the product of their states reachable from their starts.
  static absl::StatusOr<std::shared_ptr<const ByteDfa>> Intersect(const ByteDfa& a,
                                                                  const ByteDfa& b) {
    std::shared_ptr<ByteDfa> dfa(new ByteDfa());
    absl::flat_hash_map<std::pair<uint8_t, uint8_t>, uint8_t> classes;
    std::vector<uint8_t> rep;
    for (int byte = 0; byte < 256; ++byte) {
      auto [it, added] = classes.try_emplace({a.class_of_[byte], b.class_of_[byte]}, rep.size());
      if (added) rep.push_back(static_cast<uint8_t>(byte));
      dfa->class_of_[byte] = it->second;
    }
    dfa->classes_ = static_cast<int32_t>(rep.size());
    std::vector<std::pair<int32_t, int32_t>> pairs = {{a.start_, b.start_}};
    absl::flat_hash_map<std::pair<int32_t, int32_t>, int32_t> ids = {{pairs[0], 0}};
    std::vector<int32_t> next;
    std::vector<uint8_t> accepting;
    for (size_t d = 0; d < pairs.size(); ++d) {
      if (pairs.size() > kMaxDfaStates) {
        return absl::InvalidArgumentError("regex: the intersection needs over 4096 states");
      }
      const auto [x, y] = pairs[d];
      accepting.push_back(a.Accepting(x) && b.Accepting(y));
      for (uint8_t r : rep) {
        const std::pair<int32_t, int32_t> to = {a.Next(x, r), b.Next(y, r)};
        if (to.first < 0 || to.second < 0) {
          next.push_back(-1);
          continue;
        }
        auto [it, added] = ids.try_emplace(to, static_cast<int32_t>(pairs.size()));
        if (added) pairs.push_back(to);
        next.push_back(it->second);
      }
    }
    return Finish(std::move(dfa), next, accepting, rep);
  }

  static absl::StatusOr<std::shared_ptr<const ByteDfa>> FromTransitions(
      int32_t states, const std::function<int32_t(int32_t, uint8_t)>& next_of,
      const std::function<bool(int32_t)>& accepting_of) {
    if (states < 1 || states > kMaxDfaStates) {
      return absl::InvalidArgumentError(
          absl::StrCat("regex: an automaton of ", states, " states (1 to 4096)"));
    }
    std::shared_ptr<ByteDfa> dfa(new ByteDfa());
    // Bytes with the same transitions from every state share a class.
    std::vector<std::vector<int32_t>> columns;
    absl::flat_hash_map<std::vector<int32_t>, uint8_t> classes;
    std::vector<uint8_t> rep;
    for (int byte = 0; byte < 256; ++byte) {
      std::vector<int32_t> column(states);
      for (int32_t s = 0; s < states; ++s) {
        const int32_t t = next_of(s, static_cast<uint8_t>(byte));
        column[s] = t >= 0 && t < states ? t : -1;
      }
      auto [it, added] = classes.try_emplace(column, static_cast<uint8_t>(rep.size()));
      if (added) {
        rep.push_back(static_cast<uint8_t>(byte));
        columns.push_back(std::move(column));
      }
      dfa->class_of_[byte] = it->second;
    }
    dfa->classes_ = static_cast<int32_t>(rep.size());
    std::vector<int32_t> next(static_cast<size_t>(states) * dfa->classes_);
    std::vector<uint8_t> accepting(states);
    for (int32_t s = 0; s < states; ++s) {
      for (int32_t c = 0; c < dfa->classes_; ++c) next[s * dfa->classes_ + c] = columns[c][s];
      accepting[s] = accepting_of(s);
    }
    return Finish(std::move(dfa), next, accepting, rep);
  }

 private:
  // From the transitions (`next`, by state and class, -1 for none) of states numbered from the
  // start (0): the automaton of the live ones, with their distances to a match.
  static absl::StatusOr<std::shared_ptr<const ByteDfa>> Finish(
      std::shared_ptr<ByteDfa> dfa, const std::vector<int32_t>& next,
      const std::vector<uint8_t>& accepting, const std::vector<uint8_t>& rep) {
    const size_t n = accepting.size();
    // Fewest characters to an accepting state, backwards from them (0-1 breadth first: a
    // continuation byte is no new character); unreachable states are dead.
    std::vector<std::vector<std::pair<int32_t, int32_t>>> back(n);  // (from, class)
    for (size_t d = 0; d < n; ++d) {
      for (int32_t c = 0; c < dfa->classes_; ++c) {
        const int32_t t = next[d * dfa->classes_ + c];
        if (t >= 0) back[t].emplace_back(static_cast<int32_t>(d), c);
      }
    }
    constexpr int32_t kFar = std::numeric_limits<int32_t>::max();
    std::vector<int32_t> dist(n, kFar);
    std::deque<int32_t> queue;
    for (size_t d = 0; d < n; ++d) {
      if (accepting[d]) {
        dist[d] = 0;
        queue.push_back(static_cast<int32_t>(d));
      }
    }
    while (!queue.empty()) {
      const int32_t t = queue.front();
      queue.pop_front();
      for (const auto& [from, c] : back[t]) {
        const bool cont = rep[c] >= 0x80 && rep[c] < 0xC0;
        const int32_t d = dist[t] + (cont ? 0 : 1);
        if (d >= dist[from]) continue;
        dist[from] = d;
        if (cont) {
          queue.push_front(from);
        } else {
          queue.push_back(from);
        }
      }
    }
    // Keep the live states only, renumbered in order.
    std::vector<int32_t> renum(n, -1);
    int32_t live = 0;
    for (size_t d = 0; d < n; ++d) {
      if (dist[d] != kFar) renum[d] = live++;
    }
    if (renum[0] < 0) return absl::InvalidArgumentError("regex: the pattern matches nothing");
    dfa->start_ = renum[0];
    dfa->next_.assign(static_cast<size_t>(live) * dfa->classes_, -1);
    dfa->accepting_.assign(live, 0);
    dfa->final_.assign(live, 0);
    dfa->chars_to_accept_.assign(live, 0);
    for (size_t d = 0; d < n; ++d) {
      const int32_t r = renum[d];
      if (r < 0) continue;
      bool out = false;
      for (int32_t c = 0; c < dfa->classes_; ++c) {
        const int32_t t = next[d * dfa->classes_ + c];
        const int32_t to = t < 0 ? -1 : renum[t];
        dfa->next_[static_cast<size_t>(r) * dfa->classes_ + c] = to;
        out = out || to >= 0;
      }
      dfa->accepting_[r] = accepting[d];
      dfa->final_[r] = accepting[d] && !out;
      dfa->chars_to_accept_[r] = dist[d];
    }
    return std::shared_ptr<const ByteDfa>(std::move(dfa));
  }
};

absl::StatusOr<std::shared_ptr<const ByteDfa>> ByteDfa::Compile(absl::string_view pattern,
                                                                Mode mode, size_t* work_left) {
  if (!IsValidUtf8(pattern)) return absl::InvalidArgumentError("regex: not valid UTF-8");
  std::vector<uint32_t> chars;
  for (size_t i = 0; i < pattern.size();) chars.push_back(NextCodePoint(pattern, i));
  Parser parser(std::move(chars), mode);
  PDS_ASSIGN_OR_RETURN(Re re, parser.Pattern());
  Nfa nfa;
  const int32_t start = nfa.Add();
  NfaBuilder builder(nfa);
  PDS_ASSIGN_OR_RETURN(int32_t accept, builder.Build(re, start));
  return DfaBuilder::Build(nfa, start, accept, work_left);
}

absl::StatusOr<std::shared_ptr<const ByteDfa>> ByteDfa::Intersect(const ByteDfa& a,
                                                                  const ByteDfa& b) {
  return DfaBuilder::Intersect(a, b);
}

absl::StatusOr<std::shared_ptr<const ByteDfa>> ByteDfa::FromTransitions(
    int32_t states, const std::function<int32_t(int32_t, uint8_t)>& next,
    const std::function<bool(int32_t)>& accepting) {
  return DfaBuilder::FromTransitions(states, next, accepting);
}

bool ByteDfa::Matches(absl::string_view text) const {
  int32_t s = start_;
  for (char c : text) {
    s = Next(s, static_cast<uint8_t>(c));
    if (s < 0) return false;
  }
  return Accepting(s);
}

bool ByteDfa::TakesSome(int32_t state, uint32_t lo, uint32_t hi, int64_t room) const {
  std::vector<ByteSeq> seqs;
  for (const auto& [a, b] : Normalize({{lo, hi}})) Utf8Sequences(a, b, seqs);
  std::vector<int32_t> at, next;
  for (const ByteSeq& seq : seqs) {
    at = {state};
    for (const auto& [first, last] : seq) {  // the states some bytes of the ranges so far reach
      next.clear();
      for (int32_t s : at) {
        for (int b = first; b <= last; ++b) {
          const int32_t t = Next(s, static_cast<uint8_t>(b));
          if (t >= 0) next.push_back(t);
        }
      }
      std::sort(next.begin(), next.end());
      next.erase(std::unique(next.begin(), next.end()), next.end());
      at.swap(next);
      if (at.empty()) break;
    }
    for (int32_t s : at) {
      if (CharsToAccept(s) <= room) return true;
    }
  }
  return false;
}

std::string ByteDfa::Alternation(const std::vector<std::string>& choices) {
  std::string out;
  for (size_t k = 0; k < choices.size(); ++k) {
    if (k > 0) out += '|';
    out += "(?:";
    for (char c : choices[k]) {
      if (std::string_view("\\^$.|?*+()[]{}/-").find(c) != std::string_view::npos) out += '\\';
      out += c;
    }
    out += ')';
  }
  return out;
}

}  // namespace pds::engine
