// UTF-8 and Unicode helpers for the tokenizer.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace pds::engine {

// Replaces every maximal invalid subsequence of `text` with U+FFFD (the Unicode / WHATWG
// "maximal subpart" rule, as Node's TextDecoder and Rust's from_utf8_lossy do).
std::string SanitizeUtf8(absl::string_view text);
bool IsValidUtf8(absl::string_view text);

// Appends the UTF-8 encoding of code point `cp`.
void AppendUtf8(uint32_t cp, std::string& out);

// The value of hex digit c (either case); -1 for other characters.
int HexDigit(char c);

// One escape of a Python string literal (as Jinja's and pythonic tool calls' strings are):
// text[pos] is the character after the backslash. Appends what it stands for and moves pos
// past it: \n \t \r \b \f \v \a \\ \' \", a backslash-newline (nothing), octal \ooo,
// \xhh, \uhhhh, \Uhhhhhhhh (a surrogate becomes U+FFFD); an unknown escape stays as written,
// backslash and all. False (nothing appended) for a cut-off or malformed hex escape or one
// past U+10FFFF.
bool AppendPythonEscape(absl::string_view text, size_t& pos, std::string& out);

// Unicode NFC normalization (ICU). `text` must be valid UTF-8.
absl::StatusOr<std::string> NormalizeNfc(absl::string_view text);

// UTF-8 to UTF-16 and back, for ICU calls (invalid sequences become U+FFFD).
std::u16string ToUtf16(absl::string_view text);
std::string FromUtf16(std::u16string_view text);

// GPT-2's byte-level alphabet: byte b is shown as the UTF-8 string ByteLevelChars()[b];
// printable Latin-1 bytes map to themselves, the others to U+0100 and up.
const std::array<std::string, 256>& ByteLevelChars();
// The inverse: a code point of the alphabet to its byte, -1 for others.
int ByteLevelByte(uint32_t cp);

// Decodes one UTF-8 character at text[i] (valid input); advances i.
uint32_t NextCodePoint(absl::string_view text, size_t& i);

}  // namespace pds::engine
