// Writes the tokenizer parity corpus: node make_corpus.mjs OUT_FILE
//
// Raw bytes, '\n'-separated, deterministic (random parts use a fixed-seed PRNG). Covers many
// scripts, emoji sequences, source code, whitespace runs, '\r', numbers, contractions,
// special-token text inside ordinary text, empty / blank lines, invalid UTF-8, and one line
// of about 100 kB. Also exports the text pools and PRNG for bench_corpus.mjs.
//
// Deliberately left out (known JS-regex vs HF (Oniguruma) differences, which would make the
// reference disagree with HF itself): U+0085 (NEL; \s in Oniguruma, not in JS), U+FEFF
// (\s in JS, not in Oniguruma), and case-folding oddities such as "'ſ" (long s matches 's' in
// HF's case-insensitive (?i:'s|...) but not in the JS rewrite '[sS]').

import fs from "node:fs";
import { pathToFileURL } from "node:url";

// mulberry32: tiny deterministic PRNG.
export function makeRng(seed) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  next.int = (n) => Math.floor(next() * n);
  next.pick = (arr) => arr[next.int(arr.length)];
  return next;
}

// Natural-language lines, one or more per language / script.
export const PROSE = [
  // English
  "The quick brown fox jumps over the lazy dog.",
  "Hello, world! How are you doing today? I'm fine, thanks.",
  "In 1969, Apollo 11 landed on the Moon; Neil Armstrong said: \"That's one small step for [a] man.\"",
  "Tokenizers split text into sub-word units -- e.g. 'unbelievable' -> 'un', 'believ', 'able'.",
  "E-mail me at john.doe+test@example.com or visit https://example.org/path?q=1&r=two#frag.",
  "ALL CAPS SENTENCE WITH SOME PUNCTUATION!!! AND QUESTIONS???",
  "Mixed CaSe WoRdS lIkE iPhone, eBay, McDonald's and O'Neill.",
  // German
  "Größenwahn und Übermut: Fußgängerübergänge sind schön, äußerst höflich, Ärger, Öl.",
  "Die Straße heißt Königsallee; der Bär trägt eine Mütze.",
  // French
  "Ça va ? L'été dernier, les élèves ont visité le château de Versailles — où ça ?",
  "Noël, cœur, œuvre, naïve, garçon, déjà-vu, « guillemets ».",
  // Spanish / Portuguese / Polish / Turkish / Vietnamese
  "¿Dónde está el niño? ¡Qué señor tan simpático! Ação, coração, não.",
  "Zażółć gęślą jaźń. İstanbul'da ılık şırıl şırıl su. Tiếng Việt có dấu.",
  // Russian
  "Съешь же ещё этих мягких французских булок, да выпей чаю.",
  "Привет, мир! Как дела? Москва — столица России.",
  // Greek
  "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Καλημέρα κόσμε!",
  // Chinese
  "我能吞下玻璃而不伤身体。今天天气很好，我们去公园散步吧！",
  "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
  // Japanese (kana + kanji)
  "いろはにほへと ちりぬるを。私はガラスを食べられます。それは私を傷つけません。",
  "東京都渋谷区でラーメンを食べました。カタカナとひらがなと漢字。",
  // Korean
  "나는 유리를 먹을 수 있어요. 그래도 아프지 않아요. 안녕하세요!",
  // Arabic
  "أنا قادر على أكل الزجاج و هذا لا يؤلمني. مرحبا بالعالم!",
  // Hebrew
  "אני יכול לאכול זכוכית וזה לא מזיק לי. שלום עולם!",
  // Hindi / Devanagari
  "मैं काँच खा सकता हूँ और मुझे उससे कोई चोट नहीं पहुंचती. नमस्ते दुनिया!",
  // Thai
  "ฉันกินกระจกได้ แต่มันไม่ทำให้ฉันเจ็บ สวัสดีชาวโลก",
  // Others
  "Բարեւ աշխարհ. გამარჯობა სამყარო. ሰላም ልዑል. Γειά σου. Здраво свете.",
  // Mixed scripts in one line
  "English, Deutsch (Größe), русский (ёж), 中文（你好）, 日本語（こんにちは）, 한국어, عربى, עברית.",
  // Decomposed (NFD) accents: Qwen's NFC normalizer composes them
  "Cafe\u0301, nai\u0308ve, u\u0308ber, Ä vs A\u0308, e\u0301te\u0301, n\u0303.",
  // Unicode numbers / symbols / other spaces
  "Fractions ½ ¾, superscripts x² y³, roman Ⅻ, circled ①②③, full-width ＡＢＣ１２３.",
  "No-break\u00a0space, ideographic\u3000space, thin\u2009space, zero\u200bwidth, soft\u00adhyphen.",
  "Math: ∀x∈ℝ, ∑ᵢ xᵢ² ≤ ∞; α+β=γ; «quotes» “curly” ‘single’ „low“ ‹›.",
  "Currency: $5, €10, £3.50, ¥1000, ₹200, ₿0.01, 100 %",
  "SentencePiece marker \u2581 inside text\u2581and\u2581between words, and ▁▁ doubled.",
  "Byte-token look-alikes: <0x41> <0xE2><0x82><0xAC> <unk> <pad>",
];

export const EMOJI = [
  "👍 👍🏻 👍🏼 👍🏽 👍🏾 👍🏿",
  "Family: 👨‍👩‍👧‍👦, couple: 👩‍❤️‍💋‍👨, technologist: 🧑🏽‍💻, rainbow flag: 🏳️‍🌈",
  "Flags: 🇩🇪 🇫🇷 🇯🇵 🇺🇸 🇬🇧 🇺🇦 🏴󠁧󠁢󠁳󠁣󠁴󠁿",
  "Hearts ❤️ 🧡 💛 💚 💙 💜 🖤, keycaps 1️⃣ #️⃣ *️⃣, variation ☺︎ ☺️",
  "I love 🍕 and 🍣!! 😂😂😂🤣 so funny 🙃",
  "🙂",
  "👩🏿‍🚀👨🏻‍🔬🧕🏽🤷‍♀️🤦🏼‍♂️",
];

export const CODE = [
  "#include <vector>",
  "int main(int argc, char** argv) {",
  "  std::vector<int32_t> ids = tokenizer->Encode(text, /*add_special_tokens=*/true);",
  "  for (size_t i = 0; i < ids.size(); ++i) { sum += ids[i] * 31 ^ (i << 2); }",
  "  return x != nullptr && y >= 0 ? *x : -1;  // TODO(someone): fix this",
  "}",
  "template <typename T> auto f(T&& t) -> decltype(std::forward<T>(t)) { return t; }",
  "def tokenize(self, text: str) -> list[int]:",
  "    \"\"\"Tokenize text.\"\"\"",
  "    if not text:",
  "        return []",
  "        for i, (a, b) in enumerate(zip(xs, ys)):",
  "            print(f\"{i:04d}: {a!r} -> {b}\")",
  "\t\tif (x) {\t// tab-indented",
  "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [\"a b\"]}, \"n\": -1.5e-3}",
  "[1, 2, 3, {\"key\": null, \"t\": true, \"f\": false, \"s\": \"x\\ny\\u00e9\"}]",
  "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son' ORDER BY id DESC;",
  "$ ls -la | grep -v '^d' > /tmp/out.txt 2>&1 && echo \"done\" || exit 1",
  "<html><body><p class=\"x\">Hello &amp; welcome</p></body></html>",
  "// ===================================================================",
  "x=1;y=2;z=x+y*3/4-5%6;a+=b;c-=d;e*=f;g/=h;i<<=2;j>>=3;k&&=l;m||=n;",
];

export const NUMBERS = [
  "1", "12", "123", "1234", "12345", "123456", "1234567", "12345678901234567890",
  "0", "007", "-1", "-42", "-1234567", "3.14159", "-0.001", "2.718281828459045", "1e10", "6.022e23",
  "1,000,000", "1.000.000,50", "10:30", "2024-01-15", "192.168.0.1", "v1.2.3", "0xDEADBEEF", "1/2",
  "Numbers in text: 1 12 123 1234 12345 and 99 bottles; pi=3.14159265358979323846.",
  "Phone +1 (555) 123-4567, ISBN 978-3-16-148410-0, 42nd street, 3rd place, 1st.",
];

export const CONTRACTIONS = [
  "I'M here, you're there, he's gone, she'd go, we'll see, they've been, it's fine.",
  "I'm, YOU'RE, HE'S, SHE'D, WE'LL, THEY'VE, IT'S, DON'T, can't, won't, shouldn't've.",
  "don't Don't DON'T dOn'T 'S 's 'T 't 'RE 're 'VE 've 'M 'm 'LL 'll 'D 'd",
  "rock 'n' roll, 'quoted', ''double'', the '90s, y'all, o'clock",
  "WE'LL", "don't", "I'M",
];

export const SPECIAL_TEXT = [
  "<|begin_of_text|>Hello<|end_of_text|>",
  "text before <|begin_of_text|> text after",
  "<|im_start|>user\\nWhat is 2+2?<|im_end|>",
  "<|im_start|>system You are helpful.<|im_end|><|im_start|>assistant",
  "<s>",
  "</s>",
  "<s>[INST] Hello [/INST]</s>",
  "a<s>b</s>c <s> d </s> e",
  "<|endoftext|>",
  "end of doc<|endoftext|>start of next",
  "<|eot_id|><|start_header_id|>assistant<|end_header_id|>",
  "<|reserved_special_token_0|><|reserved_special_token_250|>",
  "<think>reasoning</think> answer <tool_call>{}</tool_call>",
  "nearly special: <|begin_of_text| <|im_start <s < /s> <|endoftext|",
  "<unk> <pad> [CLS] [SEP] [MASK]",
];

export const WHITESPACE = [
  "", " ", "  ", "   ", "    ", "     ", "        ", " ".repeat(16), " ".repeat(31), " ".repeat(64),
  "\t", "\t\t", "\t\t\t\t", " \t \t ", "\t    \t", "word" + " ".repeat(40) + "word",
  "   leading spaces", "trailing spaces   ", "  both  ", "multiple   inner    spaces     here",
  "tab\tseparated\tvalues\t1\t2\t3", "\u000b vertical tab \u000c form feed",
  "\u2028line separator\u2029paragraph separator",
];

// Lines that end with (or contain) '\r'; built separately so they are easy to find.
export const CR_LINES = [
  "windows line ending\r", "\r", " \r", "\r\r", "middle\rcarriage return", "trailing space \r",
  "numbers 123\r", "你好\r", "emoji 👍\r", "  indented\r", "\t\r",
];

// Invalid UTF-8: lone continuation bytes, truncated sequences, 0xFF, overlong, surrogates,
// out-of-range code points; alone and inside text.
const INVALID = [
  [0x80], [0xe2, 0x82], [0xff], [0xc0, 0xaf], [0xfe], [0xc2], [0xe0, 0x80, 0x80],
  [0xed, 0xa0, 0x80], [0xf4, 0x90, 0x80, 0x80], [0xf0, 0x9f, 0x98], [0x80, 0x80, 0x80, 0xbf],
];

function invalidLines() {
  const out = [];
  const enc = (s) => Buffer.from(s, "utf8");
  for (const bytes of INVALID) {
    const b = Buffer.from(bytes);
    out.push(b);
    out.push(Buffer.concat([enc("abc"), b, enc("def")]));
    out.push(Buffer.concat([enc("Hello "), b, enc(" world "), b]));
  }
  out.push(Buffer.concat([enc("euro "), Buffer.from([0xe2, 0x82, 0xac]), enc(" truncated "),
    Buffer.from([0xe2, 0x82]), enc(" done")]));
  out.push(Buffer.concat([enc("中文"), Buffer.from([0xe4, 0xb8]), enc("文"), Buffer.from([0xff, 0xfe])]));
  out.push(Buffer.concat([enc("emoji "), Buffer.from([0xf0, 0x9f]), enc("👍"), Buffer.from([0x9f, 0x98, 0x80])]));
  out.push(Buffer.concat([Buffer.from([0xc0, 0xaf, 0xc1, 0xbf]), enc(" overlong slash")]));
  out.push(Buffer.concat([enc("ends truncated "), Buffer.from([0xf0, 0x9f, 0x98])]));
  out.push(Buffer.concat([enc("cr after invalid "), Buffer.from([0xe2, 0x82]), enc("\r")]));
  out.push(Buffer.concat([enc("<s>"), Buffer.from([0x80]), enc("<|endoftext|>"), Buffer.from([0xff])]));
  return out;
}

// Random line from the pools, joined by assorted separators (fixed seed => deterministic).
export function randomLine(rng, maxParts = 6) {
  const pools = [PROSE, PROSE, PROSE, EMOJI, CODE, NUMBERS, CONTRACTIONS, SPECIAL_TEXT];
  const seps = [" ", " ", " ", "", "  ", "\t", ", ", " - ", "   ", "\u3000", "\u00a0", "/"];
  const parts = [];
  const n = 1 + rng.int(maxParts);
  for (let i = 0; i < n; i++) {
    let p = rng.pick(rng.pick(pools));
    // Sometimes cut a fragment at a random code point to create unusual word boundaries.
    if (rng() < 0.3) {
      const cps = Array.from(p);
      p = cps.slice(rng.int(cps.length), cps.length).join("");
    }
    parts.push(p);
    if (i + 1 < n) parts.push(rng.pick(seps));
  }
  return parts.join("");
}

export function makeCorpus() {
  const lines = []; // Buffers
  const add = (s) => lines.push(Buffer.isBuffer(s) ? s : Buffer.from(s, "utf8"));
  for (const pool of [PROSE, EMOJI, CODE, NUMBERS, CONTRACTIONS, SPECIAL_TEXT, WHITESPACE, CR_LINES]) {
    pool.forEach(add);
  }
  // Numbers of every length 1..40 digits, with and without sign / decimals.
  const digits = "31415926535897932384626433832795028841971";
  for (let n = 1; n <= 40; n++) add(digits.slice(0, n));
  for (let n = 1; n <= 12; n++) add(`-${digits.slice(0, n)}.${digits.slice(n, 2 * n)} and x${digits.slice(0, n)}y`);
  // Runs of the same character (BPE on long repeated symbols).
  for (const c of [" ", "a", "=", "-", "!", "\t", "好", "👍", "\u00e9", "0"]) {
    for (const n of [2, 3, 7, 17, 100]) add(c.repeat(n));
  }
  // Spaces before words/punctuation/newline-like chars: the `\s+(?!\S)` pre-tokenizer rule.
  for (let n = 1; n <= 6; n++) {
    add(`a${" ".repeat(n)}b${" ".repeat(n)}!${" ".repeat(n)}1${" ".repeat(n)}`);
    add(`${" ".repeat(n)}\t${" ".repeat(n)}x\r`);
  }
  invalidLines().forEach(add);
  // Seeded random mixes.
  const rng = makeRng(20240607);
  for (let i = 0; i < 400; i++) add(randomLine(rng));
  // One line of about 100 kB: mixed text repeated.
  const chunk = [PROSE[0], PROSE[7], PROSE[13], PROSE[16], PROSE[18], EMOJI[1], CODE[2], NUMBERS[27],
    CONTRACTIONS[1], SPECIAL_TEXT[1], "    ", PROSE[22]].join(" ");
  let big = "";
  while (Buffer.byteLength(big) < 100000) big += chunk + " ";
  add(big);
  // A few more empty / space-only lines at the end, and a last line without special meaning.
  add("");
  add("  ");
  add("");
  add("last line");
  return lines;
}

// Main: write the corpus ('\n' after every line, including the last).
if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  const out = process.argv[2];
  if (!out) {
    process.stderr.write("usage: node make_corpus.mjs OUT_FILE\n");
    process.exit(2);
  }
  const lines = makeCorpus();
  for (const l of lines) if (l.includes(0x0a)) throw new Error("corpus line contains '\\n'");
  const parts = [];
  for (const l of lines) parts.push(l, Buffer.from("\n"));
  fs.writeFileSync(out, Buffer.concat(parts));
  process.stderr.write(`make_corpus: ${lines.length} lines, ${fs.statSync(out).size} bytes -> ${out}\n`);
}
