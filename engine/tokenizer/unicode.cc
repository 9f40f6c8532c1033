#include "engine/tokenizer/unicode.h"

#include <unicode/unorm2.h>
#include <unicode/ustring.h>

#include <vector>

#include "absl/strings/str_cat.h"

namespace pds::engine {
namespace {

constexpr char kReplacement[] = "\xEF\xBF\xBD";

// Length of the valid UTF-8 sequence at text[i], or 0 with `consumed` set to the length of
// the maximal invalid subpart to replace.
size_t ValidSequence(absl::string_view text, size_t i, size_t& consumed) {
  const auto byte = [&](size_t k) { return static_cast<uint8_t>(text[k]); };
  const uint8_t b0 = byte(i);
  consumed = 1;
  if (b0 < 0x80) return 1;
  size_t len;
  uint8_t lo = 0x80, hi = 0xBF;  // bounds of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    len = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    len = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  for (size_t k = 1; k < len; ++k) {
    if (i + k >= text.size()) {
      consumed = k;
      return 0;
    }
    const uint8_t b = byte(i + k);
    const bool ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) {
      consumed = k;
      return 0;
    }
  }
  return len;
}

}  // namespace

std::string SanitizeUtf8(absl::string_view text) {
  std::string out;
  out.reserve(text.size());
  size_t i = 0;
  while (i < text.size()) {
    size_t consumed;
    const size_t len = ValidSequence(text, i, consumed);
    if (len > 0) {
      out.append(text.data() + i, len);
      i += len;
    } else {
      out.append(kReplacement);
      i += consumed;
    }
  }
  return out;
}

bool IsValidUtf8(absl::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    if (static_cast<uint8_t>(text[i]) < 0x80) {
      ++i;
      continue;
    }
    size_t consumed;
    const size_t len = ValidSequence(text, i, consumed);
    if (len == 0) return false;
    i += len;
  }
  return true;
}

int HexDigit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f') return (c | 0x20) - 'a' + 10;
  return -1;
}

bool AppendPythonEscape(absl::string_view text, size_t& pos, std::string& out) {
  if (pos >= text.size()) return false;
  const char e = text[pos++];
  switch (e) {
    case '\n':  // a continued line
      return true;
    case '\\':
    case '\'':
    case '"':
      out.push_back(e);
      return true;
    case 'n':
      out.push_back('\n');
      return true;
    case 't':
      out.push_back('\t');
      return true;
    case 'r':
      out.push_back('\r');
      return true;
    case 'b':
      out.push_back('\b');
      return true;
    case 'f':
      out.push_back('\f');
      return true;
    case 'v':
      out.push_back('\v');
      return true;
    case 'a':
      out.push_back('\a');
      return true;
    case 'x':
    case 'u':
    case 'U': {
      const size_t len = e == 'x' ? 2 : e == 'u' ? 4 : 8;
      if (pos + len > text.size()) return false;
      uint32_t cp = 0;
      for (size_t k = 0; k < len; ++k) {
        const int digit = HexDigit(text[pos + k]);
        if (digit < 0) return false;
        cp = cp * 16 + static_cast<uint32_t>(digit);
      }
      if (cp > 0x10FFFF) return false;
      pos += len;
      AppendUtf8(cp >= 0xD800 && cp < 0xE000 ? 0xFFFD : cp, out);
      return true;
    }
    default:
      if (e >= '0' && e <= '7') {  // up to three octal digits
        uint32_t cp = static_cast<uint32_t>(e - '0');
        for (int k = 0; k < 2 && pos < text.size() && text[pos] >= '0' && text[pos] <= '7'; ++k) {
          cp = cp * 8 + static_cast<uint32_t>(text[pos++] - '0');
        }
        AppendUtf8(cp, out);
      } else {  // Python keeps an unknown escape as written
        out.push_back('\\');
        out.push_back(e);
      }
      return true;
  }
}

void AppendUtf8(uint32_t cp, std::string& out) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

uint32_t NextCodePoint(absl::string_view text, size_t& i) {
  const uint8_t b0 = static_cast<uint8_t>(text[i]);
  if (b0 < 0x80) {
    ++i;
    return b0;
  }
  int len = b0 >= 0xF0 ? 4 : b0 >= 0xE0 ? 3 : 2;
  uint32_t cp = b0 & (0x7F >> len);
  for (int k = 1; k < len && i + k < text.size(); ++k) {
    cp = (cp << 6) | (static_cast<uint8_t>(text[i + k]) & 0x3F);
  }
  i += len;
  return cp;
}

absl::StatusOr<std::string> NormalizeNfc(absl::string_view text) {
  UErrorCode err = U_ZERO_ERROR;
  const UNormalizer2* nfc = unorm2_getNFCInstance(&err);
  if (U_FAILURE(err)) return absl::InternalError("ICU NFC normalizer unavailable");
  if (!IsValidUtf8(text)) return absl::InvalidArgumentError("text is not valid UTF-8");
  const std::u16string utf16 = ToUtf16(text);
  const int32_t len16 = static_cast<int32_t>(utf16.size());
  if (unorm2_isNormalized(nfc, utf16.data(), len16, &err) && U_SUCCESS(err)) {
    return std::string(text);
  }
  err = U_ZERO_ERROR;
  std::u16string normalized(static_cast<size_t>(len16) * 3 + 16, u'\0');
  const int32_t nlen = unorm2_normalize(nfc, utf16.data(), len16, normalized.data(),
                                        static_cast<int32_t>(normalized.size()), &err);
  if (U_FAILURE(err)) return absl::InternalError(absl::StrCat("NFC failed: ", u_errorName(err)));
  normalized.resize(static_cast<size_t>(nlen));
  return FromUtf16(normalized);
}

std::u16string ToUtf16(absl::string_view text) {
  UErrorCode err = U_ZERO_ERROR;
  int32_t len = 0;
  u_strFromUTF8WithSub(nullptr, 0, &len, text.data(), static_cast<int32_t>(text.size()), 0xFFFD,
                       nullptr, &err);
  std::u16string out(static_cast<size_t>(len), u'\0');
  err = U_ZERO_ERROR;
  u_strFromUTF8WithSub(out.data(), len, nullptr, text.data(), static_cast<int32_t>(text.size()),
                       0xFFFD, nullptr, &err);
  return out;
}

std::string FromUtf16(std::u16string_view text) {
  UErrorCode err = U_ZERO_ERROR;
  int32_t len = 0;
  u_strToUTF8WithSub(nullptr, 0, &len, text.data(), static_cast<int32_t>(text.size()), 0xFFFD,
                     nullptr, &err);
  std::string out(static_cast<size_t>(len), '\0');
  err = U_ZERO_ERROR;
  u_strToUTF8WithSub(out.data(), len, nullptr, text.data(), static_cast<int32_t>(text.size()),
                     0xFFFD, nullptr, &err);
  return out;
}

const std::array<std::string, 256>& ByteLevelChars() {
  static const std::array<std::string, 256> table = [] {
    std::array<std::string, 256> t;
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      AppendUtf8(printable ? static_cast<uint32_t>(b) : next++, t[b]);
    }
    return t;
  }();
  return table;
}

int ByteLevelByte(uint32_t cp) {
  static const std::vector<int> inverse = [] {
    std::vector<int> inv(512, -1);
    const auto& chars = ByteLevelChars();
    for (int b = 0; b < 256; ++b) {
      size_t i = 0;
      inv[NextCodePoint(chars[b], i)] = b;
    }
    return inv;
  }();
  return cp < inverse.size() ? inverse[cp] : -1;
}

}  // namespace pds::engine
