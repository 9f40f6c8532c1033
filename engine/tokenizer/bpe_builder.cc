#include "engine/tokenizer/bpe_builder.h"

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <queue>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/unicode.h"
#include "nlohmann/json.hpp"

namespace pds::engine {
namespace {

using ::nlohmann::ordered_json;

constexpr int32_t kNumByteTokens = 256;
constexpr int32_t kMaxMerges = 8000;
constexpr size_t kCorpusBytes = 320 * 1024;
constexpr int32_t kNumPseudoWords = 9000;

// Llama 3's pre-tokenizer split pattern.
constexpr char kSplitRegex[] =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

constexpr std::array<std::string_view, 5> kNamedSpecialTokens = {
    "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
    "<|end_header_id|>"};
// Added tokens that are not special (kept in decoded text), as reasoning models have them.
constexpr std::array<std::string_view, 2> kReasoningTokens = {"<think>", "</think>"};

// Llama 3 Instruct's chat template.
constexpr char kChatTemplate[] =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% "
    "endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

// Common English words, roughly by frequency (earlier ones are drawn more often).
constexpr std::string_view kEnglishWords[] = {
    "the",      "of",       "and",      "to",       "a",       "in",       "is",       "it",
    "you",      "that",     "he",       "was",      "for",     "on",       "are",      "with",
    "as",       "I",        "his",      "they",     "be",      "at",       "one",      "have",
    "this",     "from",     "or",       "had",      "by",      "not",      "word",     "but",
    "what",     "some",     "we",       "can",      "out",     "other",    "were",     "all",
    "there",    "when",     "up",       "use",      "your",    "how",      "said",     "an",
    "each",     "she",      "which",    "do",       "their",   "time",     "if",       "will",
    "way",      "about",    "many",     "then",     "them",    "write",    "would",    "like",
    "so",       "these",    "her",      "long",     "make",    "thing",    "see",      "him",
    "two",      "has",      "look",     "more",     "day",     "could",    "go",       "come",
    "did",      "number",   "sound",    "no",       "most",    "people",   "my",       "over",
    "know",     "water",    "than",     "call",     "first",   "who",      "may",      "down",
    "side",     "been",     "now",      "find",     "any",     "new",      "work",     "part",
    "take",     "get",      "place",    "made",     "live",    "where",    "after",    "back",
    "little",   "only",     "round",    "man",      "year",    "came",     "show",     "every",
    "good",     "me",       "give",     "our",      "under",   "name",     "very",     "through",
    "just",     "form",     "sentence", "great",    "think",   "say",      "help",     "low",
    "line",     "differ",   "turn",     "cause",    "much",    "mean",     "before",   "move",
    "right",    "boy",      "old",      "too",      "same",    "tell",     "does",     "set",
    "three",    "want",     "air",      "well",     "also",    "play",     "small",    "end",
    "put",      "home",     "read",     "hand",     "port",    "large",    "spell",    "add",
    "even",     "land",     "here",     "must",     "big",     "high",     "such",     "follow",
    "act",      "why",      "ask",      "men",      "change",  "went",     "light",    "kind",
    "off",      "need",     "house",    "picture",  "try",     "us",       "again",    "animal",
    "point",    "mother",   "world",    "near",     "build",   "self",     "earth",    "father",
    "head",     "stand",    "own",      "page",     "should",  "country",  "found",    "answer",
    "school",   "grow",     "study",    "still",    "learn",   "plant",    "cover",    "food",
    "sun",      "four",     "between",  "state",    "keep",    "eye",      "never",    "last",
    "let",      "thought",  "city",     "tree",     "cross",   "farm",     "hard",     "start",
    "might",    "story",    "saw",      "far",      "sea",     "draw",     "left",     "late",
    "run",      "while",    "press",    "close",    "night",   "real",     "life",     "few",
    "north",    "open",     "seem",     "together", "next",    "white",    "children", "begin",
    "got",      "walk",     "example",  "ease",     "paper",   "group",    "always",   "music",
    "those",    "both",     "mark",     "often",    "letter",  "until",    "mile",     "river",
    "car",      "feet",     "care",     "second",   "book",    "carry",    "took",     "science",
    "eat",      "room",     "friend",   "began",    "idea",    "fish",     "mountain", "stop",
    "once",     "base",     "hear",     "horse",    "cut",     "sure",     "watch",    "color",
    "face",     "wood",     "main",     "enough",   "plain",   "girl",     "usual",    "young",
    "ready",    "above",    "ever",     "red",      "list",    "though",   "feel",     "talk",
    "bird",     "soon",     "body",     "dog",      "family",  "direct",   "pose",     "leave",
    "song",     "measure",  "door",     "product",  "black",   "short",    "numeral",  "class",
    "wind",     "question", "happen",   "complete", "ship",    "area",     "half",     "rock",
    "order",    "fire",     "south",    "problem",  "piece",   "told",     "knew",     "pass",
    "since",    "top",      "whole",    "king",     "space",   "heard",    "best",     "hour",
    "better",   "true",     "during",   "hundred",  "five",    "remember", "step",     "early",
    "hold",     "west",     "ground",   "interest", "reach",   "fast",     "verb",     "sing",
    "listen",   "six",      "table",    "travel",   "less",    "morning",  "ten",      "simple",
    "several",  "vowel",    "toward",   "war",      "lay",     "against",  "pattern",  "slow",
    "center",   "love",     "person",   "money",    "serve",   "appear",   "road",     "map",
    "rain",     "rule",     "govern",   "pull",     "cold",    "notice",   "voice",    "unit",
    "power",    "town",     "fine",     "certain",  "fly",     "fall",     "lead",     "cry",
    "dark",     "machine",  "note",     "wait",     "plan",    "figure",   "star",     "box",
    "noun",     "field",    "rest",     "correct",  "able",    "pound",    "done",     "beauty",
    "drive",    "stood",    "contain",  "front",    "teach",   "week",     "final",    "gave",
    "green",    "quick",    "develop",  "ocean",    "warm",    "free",     "minute",   "strong",
    "special",  "mind",     "behind",   "clear",    "tail",    "produce",  "fact",     "street",
    "inch",     "multiply", "nothing",  "course",   "stay",    "wheel",    "full",     "force",
    "blue",     "object",   "decide",   "surface",  "deep",    "moon",     "island",   "foot",
    "system",   "busy",     "test",     "record",   "boat",    "common",   "gold",     "possible",
    "plane",    "stead",    "dry",      "wonder",   "laugh",   "thousand", "ago",      "ran",
    "check",    "game",     "shape",    "equate",   "hot",     "miss",     "brought",  "heat",
    "snow",     "tire",     "bring",    "yes",      "distant", "fill",     "east",     "paint",
    "language", "among",    "model",    "server",   "token",   "request",  "memory",   "engine",
    "data",     "network",  "computer", "program",
};

// Contractions appended to an English word ("don't", "we're", ...).
constexpr std::string_view kContractions[] = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};

// A few non-ASCII words so that merges of multi-byte UTF-8 sequences are learned too.
constexpr std::string_view kForeignWords[] = {
    "café",   "naïve",  "résumé", "über",   "straße", "façade", "señor",  "niño",       "crème",
    "brûlée", "déjà",   "vu",     "Zürich", "São",    "Paulo",  "привет", "мир",        "спасибо",
    "данные", "日本語", "東京",   "你好",   "世界",   "模型",   "数据",   "안녕하세요", "γεια",
    "σου",    "λόγος",  "مرحبا",  "שלום",   "नमस्ते",   "€",      "£",      "°C",         "—",
    "…",      "→",      "✓",      "🙂",   "🚀"};

constexpr std::string_view kOnsets[] = {
    "",   "",   "b",  "c",  "d",  "f",  "g",  "h",  "j",  "k",  "l",   "m",  "n",  "p",  "qu",
    "r",  "s",  "t",  "v",  "w",  "y",  "z",  "bl", "br", "ch", "cl",  "cr", "dr", "fl", "fr",
    "gl", "gr", "pl", "pr", "sc", "sh", "sk", "sl", "sp", "st", "str", "th", "tr", "wh"};
constexpr std::string_view kVowels[] = {"a", "e",  "i",  "o",  "u",  "a",  "e",  "i", "o",
                                        "y", "ai", "ea", "ee", "ie", "oa", "oo", "ou"};
constexpr std::string_view kCodas[] = {"",  "",  "",   "",   "n",  "r",  "s",  "t",  "l",  "m",
                                       "d", "x", "ng", "nd", "nt", "st", "ck", "rt", "ll", "sh"};
constexpr std::string_view kSuffixes[] = {"ing", "ed",   "er",   "ly",   "tion",
                                          "s",   "ness", "ment", "able", "ist"};

// SplitMix64: a small, portable, deterministic generator (std distributions are not portable).
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n).
  uint32_t Uniform(uint32_t n) { return static_cast<uint32_t>(((Next() >> 32) * n) >> 32); }
  bool Percent(uint32_t p) { return Uniform(100) < p; }
  // In [0, n), strongly skewed towards small values (a rough Zipf stand-in).
  uint32_t Skewed(uint32_t n) {
    const double u = static_cast<double>(Next() >> 11) * 0x1.0p-53;
    return std::min(n - 1, static_cast<uint32_t>(n * u * u * u));
  }
  template <typename T, size_t N>
  const T& Pick(const T (&items)[N]) {
    return items[Uniform(N)];
  }

 private:
  uint64_t state_;
};

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 onwards.
// `unicode[b]` is byte b's UTF-8 encoded character; `id[b]` its token id (ordered by code point,
// as in GPT-2 and Llama 3, so "!" is 0 and "Ġ" (0x20) is 220).
struct ByteMap {
  std::array<std::string, 256> unicode;
  std::array<int32_t, 256> id;
};

ByteMap MakeByteMap() {
  ByteMap map;
  map.unicode = ByteLevelChars();
  // Ids follow the code points: printable bytes first (in byte order), then the others.
  int32_t next_id = 0;
  for (int pass = 0; pass < 2; ++pass) {
    for (int b = 0; b < 256; ++b) {
      size_t at = 0;
      const bool maps_to_itself = NextCodePoint(map.unicode[b], at) == static_cast<uint32_t>(b);
      if ((pass == 0) == maps_to_itself) map.id[b] = next_id++;
    }
  }
  return map;
}

std::string ToByteLevel(std::string_view bytes, const ByteMap& map) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char c : bytes) out += map.unicode[c];
  return out;
}

// ---------------------------------------------------------------------------------------------
// Corpus generation.

std::string MakePseudoWord(Rng& rng) {
  std::string word;
  const int syllables = 1 + rng.Uniform(3) + (rng.Percent(20) ? 1 : 0);
  for (int i = 0; i < syllables; ++i) {
    word += rng.Pick(kOnsets);
    word += rng.Pick(kVowels);
    word += rng.Pick(kCodas);
  }
  if (rng.Percent(25)) word += rng.Pick(kSuffixes);
  return word;
}

void Capitalize(std::string& word) {
  if (!word.empty() && word[0] >= 'a' && word[0] <= 'z') word[0] = word[0] - 'a' + 'A';
}

std::string MakeNumber(Rng& rng) {
  switch (rng.Uniform(6)) {
    case 0:
      return absl::StrCat(1900 + rng.Uniform(130));
    case 1:
      return absl::StrCat(rng.Uniform(100), ".", rng.Uniform(100));
    case 2:
      return absl::StrCat("$", 1 + rng.Uniform(1000));
    case 3:
      return absl::StrCat(rng.Uniform(101), "%");
    case 4:
      return absl::StrCat(rng.Uniform(1000000));
    default:
      return absl::StrCat(rng.Uniform(20));
  }
}

std::string MakeWord(Rng& rng, const std::vector<std::string>& lexicon) {
  const uint32_t kind = rng.Uniform(100);
  if (kind < 55) {
    std::string word(kEnglishWords[rng.Skewed(std::size(kEnglishWords))]);
    if (rng.Percent(3)) word += rng.Pick(kContractions);
    return word;
  }
  if (kind < 92) {
    std::string word = lexicon[rng.Skewed(lexicon.size())];
    if (rng.Percent(8)) Capitalize(word);  // a proper name
    return word;
  }
  if (kind < 98) return MakeNumber(rng);
  return std::string(rng.Pick(kForeignWords));
}

void AppendSentence(Rng& rng, const std::vector<std::string>& lexicon, std::string& text) {
  const int words = 3 + rng.Uniform(14);
  for (int i = 0; i < words; ++i) {
    std::string word = MakeWord(rng, lexicon);
    if (i == 0) Capitalize(word);
    if (i > 0) text += ' ';
    if (rng.Percent(2)) {
      const bool paren = rng.Percent(50);
      text += paren ? "(" : "\"";
      text += word;
      text += paren ? ")" : "\"";
    } else {
      text += word;
    }
    if (i + 1 < words && rng.Percent(8)) text += rng.Percent(85) ? "," : ";";
  }
  const uint32_t end = rng.Uniform(20);
  text += end == 0 ? "?" : end == 1 ? "!" : end == 2 ? "..." : end == 3 ? ":" : ".";
}

void AppendParagraph(Rng& rng, const std::vector<std::string>& lexicon, std::string& text) {
  const uint32_t kind = rng.Uniform(10);
  if (kind == 0) {  // a bullet or numbered list
    const int items = 2 + rng.Uniform(4);
    for (int i = 0; i < items; ++i) {
      text += rng.Percent(50) ? "- " : absl::StrCat(i + 1, ". ");
      AppendSentence(rng, lexicon, text);
      text += '\n';
    }
  } else if (kind == 1) {  // indented code-like lines
    const int lines = 1 + rng.Uniform(4);
    for (int i = 0; i < lines; ++i) {
      text.append(2 * (1 + rng.Uniform(4)), ' ');
      text += absl::StrCat(lexicon[rng.Skewed(lexicon.size())], "(",
                           std::string(kEnglishWords[rng.Skewed(std::size(kEnglishWords))]), ", ",
                           rng.Uniform(100), ");\n");
    }
  } else {
    const int sentences = 1 + rng.Uniform(6);
    for (int i = 0; i < sentences; ++i) {
      if (i > 0) text += ' ';
      AppendSentence(rng, lexicon, text);
    }
    text += '\n';
  }
  text += '\n';
}

std::string GenerateCorpus(uint64_t seed) {
  Rng rng(seed ^ 0x5EEDC0FFEE123457ull);
  std::vector<std::string> lexicon;
  lexicon.reserve(kNumPseudoWords);
  for (int i = 0; i < kNumPseudoWords; ++i) lexicon.push_back(MakePseudoWord(rng));
  std::string text;
  text.reserve(kCorpusBytes + 4096);
  // Every pseudo-word once, so that there are always enough distinct words for kMaxMerges.
  for (const std::string& word : lexicon) {
    text += ' ';
    text += word;
  }
  text += "\n\n";
  while (text.size() < kCorpusBytes) AppendParagraph(rng, lexicon, text);
  return text;
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenization for training: an ASCII approximation of Llama 3's split regex (all bytes
// >= 0x80 count as letters).

bool IsLetter(unsigned char c) { return c >= 0x80 || ((c | 0x20) >= 'a' && (c | 0x20) <= 'z'); }
bool IsDigit(unsigned char c) { return c >= '0' && c <= '9'; }
bool IsSpace(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }
bool IsNewline(unsigned char c) { return c == '\n' || c == '\r'; }
bool IsPunct(unsigned char c) { return !IsSpace(c) && !IsLetter(c) && !IsDigit(c); }

// Length of a contraction ('s, 't, 're, 've, 'm, 'll, 'd; any case) at s[i], or 0.
size_t ContractionLength(std::string_view s, size_t i) {
  if (s[i] != '\'' || i + 1 >= s.size()) return 0;
  const char a = static_cast<char>(s[i + 1] | 0x20);
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
  if (i + 2 >= s.size()) return 0;
  const char b = static_cast<char>(s[i + 2] | 0x20);
  if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  return 0;
}

absl::flat_hash_map<std::string, int64_t> CountPreTokens(std::string_view s) {
  absl::flat_hash_map<std::string, int64_t> counts;
  const size_t n = s.size();
  auto at = [&](size_t i) { return static_cast<unsigned char>(s[i]); };
  size_t i = 0;
  while (i < n) {
    const unsigned char c = at(i);
    size_t j = i;
    if (const size_t contraction = ContractionLength(s, i); contraction > 0) {
      j = i + contraction;
    } else if (IsLetter(c) || (!IsNewline(c) && !IsDigit(c) && i + 1 < n && IsLetter(at(i + 1)))) {
      j = i + 1;
      while (j < n && IsLetter(at(j))) ++j;
    } else if (IsDigit(c)) {
      while (j < n && j - i < 3 && IsDigit(at(j))) ++j;
    } else if (IsPunct(c) || (c == ' ' && i + 1 < n && IsPunct(at(i + 1)))) {
      if (c == ' ') ++j;
      while (j < n && IsPunct(at(j))) ++j;
      while (j < n && IsNewline(at(j))) ++j;
    } else {  // whitespace
      size_t k = i;
      size_t last_newline = n;
      for (; k < n && IsSpace(at(k)); ++k) {
        if (IsNewline(at(k))) last_newline = k;
      }
      if (last_newline != n) {
        j = last_newline + 1;
      } else if (k < n && k - i > 1) {
        j = k - 1;  // leave the last space to prefix the next word
      } else {
        j = k;
      }
    }
    ++counts[std::string(s.substr(i, j - i))];
    i = j;
  }
  return counts;
}

// ---------------------------------------------------------------------------------------------
// BPE training over word-type counts with incrementally maintained pair counts.

struct TrainedBpe {
  std::vector<std::string> tokens;                  // raw bytes of each token, by id
  std::vector<std::pair<int32_t, int32_t>> merges;  // in rank order
};

uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

struct HeapEntry {
  int64_t count;
  int32_t left;
  int32_t right;
  // Max-heap order: highest count first, ties to the smallest (left, right) ids.
  bool operator<(const HeapEntry& o) const {
    if (count != o.count) return count < o.count;
    if (left != o.left) return left > o.left;
    return right > o.right;
  }
};

TrainedBpe TrainBpe(std::string_view corpus, int32_t target_tokens, const ByteMap& byte_map) {
  TrainedBpe result;
  result.tokens.resize(kNumByteTokens);
  absl::flat_hash_map<std::string, int32_t> token_ids;
  for (int b = 0; b < 256; ++b) {
    result.tokens[byte_map.id[b]] = std::string(1, static_cast<char>(b));
  }
  for (int32_t id = 0; id < kNumByteTokens; ++id) token_ids[result.tokens[id]] = id;

  // Word types in sorted order so that nothing depends on hash-map iteration order.
  std::vector<std::pair<std::string, int64_t>> types;
  {
    auto counts = CountPreTokens(corpus);
    types.assign(counts.begin(), counts.end());
  }
  std::sort(types.begin(), types.end());
  std::vector<std::vector<int32_t>> words(types.size());
  std::vector<int64_t> freqs(types.size());
  absl::flat_hash_map<uint64_t, int64_t> pair_counts;
  absl::flat_hash_map<uint64_t, std::vector<int32_t>> pair_words;  // may hold stale entries
  for (size_t w = 0; w < types.size(); ++w) {
    freqs[w] = types[w].second;
    for (unsigned char c : types[w].first) words[w].push_back(byte_map.id[c]);
    for (size_t k = 0; k + 1 < words[w].size(); ++k) {
      const uint64_t key = PairKey(words[w][k], words[w][k + 1]);
      pair_counts[key] += freqs[w];
      pair_words[key].push_back(static_cast<int32_t>(w));
    }
  }
  std::priority_queue<HeapEntry> heap;
  for (const auto& [key, count] : pair_counts) {
    heap.push({count, static_cast<int32_t>(key >> 32), static_cast<int32_t>(key & 0xFFFFFFFF)});
  }

  std::vector<uint64_t> new_pairs;
  while (static_cast<int32_t>(result.tokens.size()) < target_tokens && !heap.empty()) {
    const HeapEntry top = heap.top();
    heap.pop();
    const uint64_t key = PairKey(top.left, top.right);
    auto count_it = pair_counts.find(key);
    const int64_t count = count_it == pair_counts.end() ? 0 : count_it->second;
    if (count != top.count) {  // stale entry
      if (count > 0) heap.push({count, top.left, top.right});
      continue;
    }
    // A merge can recreate an existing token's string; it then reuses that id (as HF does).
    std::string merged = result.tokens[top.left] + result.tokens[top.right];
    auto [tok_it, inserted] =
        token_ids.try_emplace(std::move(merged), static_cast<int32_t>(result.tokens.size()));
    const int32_t new_id = tok_it->second;
    if (inserted) result.tokens.push_back(tok_it->first);
    result.merges.emplace_back(top.left, top.right);

    std::vector<int32_t> affected = std::move(pair_words[key]);
    pair_words.erase(key);
    std::sort(affected.begin(), affected.end());
    affected.erase(std::unique(affected.begin(), affected.end()), affected.end());
    new_pairs.clear();
    for (int32_t w : affected) {
      std::vector<int32_t>& sym = words[w];
      bool present = false;
      for (size_t k = 0; k + 1 < sym.size() && !present; ++k) {
        present = sym[k] == top.left && sym[k + 1] == top.right;
      }
      if (!present) continue;
      const int64_t f = freqs[w];
      for (size_t k = 0; k + 1 < sym.size(); ++k) pair_counts[PairKey(sym[k], sym[k + 1])] -= f;
      // Merge left to right, non-overlapping.
      size_t out = 0;
      for (size_t k = 0; k < sym.size(); ++k) {
        if (k + 1 < sym.size() && sym[k] == top.left && sym[k + 1] == top.right) {
          sym[out++] = new_id;
          ++k;
        } else {
          sym[out++] = sym[k];
        }
      }
      sym.resize(out);
      for (size_t k = 0; k + 1 < sym.size(); ++k) {
        const uint64_t p = PairKey(sym[k], sym[k + 1]);
        pair_counts[p] += f;
        if (sym[k] == new_id || sym[k + 1] == new_id) {
          pair_words[p].push_back(w);
          new_pairs.push_back(p);
        }
      }
    }
    pair_counts.erase(key);
    // Only pairs with the new token can have gained count; the others are fixed lazily.
    std::sort(new_pairs.begin(), new_pairs.end());
    new_pairs.erase(std::unique(new_pairs.begin(), new_pairs.end()), new_pairs.end());
    for (uint64_t p : new_pairs) {
      const int64_t c = pair_counts[p];
      if (c > 0)
        heap.push({c, static_cast<int32_t>(p >> 32), static_cast<int32_t>(p & 0xFFFFFFFF)});
    }
  }
  return result;
}

// ---------------------------------------------------------------------------------------------
// JSON output.

ordered_json AddedToken(int32_t id, const std::string& content, bool special) {
  ordered_json t;
  t["id"] = id;
  t["content"] = content;
  t["single_word"] = false;
  t["lstrip"] = false;
  t["rstrip"] = false;
  t["normalized"] = false;
  t["special"] = special;
  return t;
}

ordered_json TemplatePiece(std::string_view kind, std::string_view id, int type_id) {
  ordered_json inner;
  inner["id"] = id;
  inner["type_id"] = type_id;
  ordered_json piece;
  piece[std::string(kind)] = std::move(inner);
  return piece;
}

ordered_json ByteLevelJson(bool add_prefix_space, bool trim_offsets, bool use_regex) {
  ordered_json j;
  j["type"] = "ByteLevel";
  j["add_prefix_space"] = add_prefix_space;
  j["trim_offsets"] = trim_offsets;
  j["use_regex"] = use_regex;
  return j;
}

}  // namespace

absl::StatusOr<GeneratedTokenizer> BuildByteLevelBpeTokenizer(int32_t vocab_size, uint64_t seed) {
  if (vocab_size < kMinGeneratedVocabSize || vocab_size > kMaxGeneratedVocabSize) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer vocab_size ", vocab_size,
                                                   " is out of range [", kMinGeneratedVocabSize,
                                                   ", ", kMaxGeneratedVocabSize, "]"));
  }
  const ByteMap byte_map = MakeByteMap();
  const int32_t min_special = kMinGeneratedVocabSize - kNumByteTokens;
  const int32_t target_tokens = std::min(vocab_size - min_special, kNumByteTokens + kMaxMerges);
  const TrainedBpe bpe = TrainBpe(GenerateCorpus(seed), target_tokens, byte_map);
  const int32_t num_regular = static_cast<int32_t>(bpe.tokens.size());

  std::vector<std::string> specials;
  specials.reserve(vocab_size - num_regular);
  for (std::string_view name : kNamedSpecialTokens) specials.emplace_back(name);
  for (std::string_view name : kReasoningTokens) specials.emplace_back(name);
  for (int32_t k = 0; num_regular + static_cast<int32_t>(specials.size()) < vocab_size; ++k) {
    specials.push_back(absl::StrCat("<|reserved_special_token_", k, "|>"));
  }

  GeneratedTokenizer out;
  out.bos_id = num_regular;
  out.eos_id = num_regular + 1;
  out.eot_id = num_regular + 2;
  const std::string& bos = specials[0];

  ordered_json tok;
  tok["version"] = "1.0";
  tok["truncation"] = nullptr;
  tok["padding"] = nullptr;
  ordered_json added = ordered_json::array();
  for (size_t i = 0; i < specials.size(); ++i) {
    const bool reasoning =
        i >= kNamedSpecialTokens.size() && i < kNamedSpecialTokens.size() + kReasoningTokens.size();
    added.push_back(AddedToken(num_regular + static_cast<int32_t>(i), specials[i], !reasoning));
  }
  tok["added_tokens"] = std::move(added);
  tok["normalizer"] = nullptr;

  ordered_json split;
  split["type"] = "Split";
  split["pattern"]["Regex"] = kSplitRegex;
  split["behavior"] = "Isolated";
  split["invert"] = false;
  ordered_json pre;
  pre["type"] = "Sequence";
  pre["pretokenizers"] = {split, ByteLevelJson(false, true, false)};
  tok["pre_tokenizer"] = std::move(pre);

  ordered_json post;
  post["type"] = "TemplateProcessing";
  post["single"] = {TemplatePiece("SpecialToken", bos, 0), TemplatePiece("Sequence", "A", 0)};
  post["pair"] = {TemplatePiece("SpecialToken", bos, 0), TemplatePiece("Sequence", "A", 0),
                  TemplatePiece("SpecialToken", bos, 1), TemplatePiece("Sequence", "B", 1)};
  ordered_json bos_entry;
  bos_entry["id"] = bos;
  bos_entry["ids"] = {out.bos_id};
  bos_entry["tokens"] = {bos};
  post["special_tokens"][bos] = std::move(bos_entry);
  tok["post_processor"] = std::move(post);
  tok["decoder"] = ByteLevelJson(true, true, true);

  ordered_json model;
  model["type"] = "BPE";
  model["dropout"] = nullptr;
  model["unk_token"] = nullptr;
  model["continuing_subword_prefix"] = nullptr;
  model["end_of_word_suffix"] = nullptr;
  model["fuse_unk"] = false;
  model["byte_fallback"] = false;
  model["ignore_merges"] = true;
  // ordered_json objects look keys up linearly on insert, so build the map in one go.
  std::vector<std::string> token_strings;
  token_strings.reserve(bpe.tokens.size());
  for (const std::string& t : bpe.tokens) token_strings.push_back(ToByteLevel(t, byte_map));
  ordered_json vocab = ordered_json::object();
  auto& vocab_map = vocab.get_ref<ordered_json::object_t&>();
  vocab_map.reserve(token_strings.size());
  for (int32_t id = 0; id < num_regular; ++id) {
    vocab_map.emplace_back(token_strings[id], id);  // token strings are unique
  }
  model["vocab"] = std::move(vocab);
  ordered_json merges = ordered_json::array();
  for (const auto& [left, right] : bpe.merges) {
    merges.push_back(absl::StrCat(token_strings[left], " ", token_strings[right]));
  }
  model["merges"] = std::move(merges);
  tok["model"] = std::move(model);
  out.tokenizer_json = tok.dump(2);

  ordered_json config;
  config["add_bos_token"] = true;
  config["add_eos_token"] = false;
  config["bos_token"] = bos;
  config["eos_token"] = specials[1];
  config["chat_template"] = kChatTemplate;
  config["clean_up_tokenization_spaces"] = false;
  config["model_input_names"] = {"input_ids", "attention_mask"};
  config["model_max_length"] = 131072;
  config["tokenizer_class"] = "PreTrainedTokenizerFast";
  out.tokenizer_config_json = config.dump(2);
  return out;
}

}  // namespace pds::engine
