// JS reference tokenizer for the pdserve tokenizer parity test and benchmark.
//
//   node reference.mjs encode    TOKENIZER_JSON [TOKENIZER_CONFIG_JSON] [--no-special]
//   node reference.mjs decode    TOKENIZER_JSON [TOKENIZER_CONFIG_JSON]
//   node reference.mjs bench     TOKENIZER_JSON [TOKENIZER_CONFIG_JSON] [--no-special]
//   node reference.mjs roundtrip TOKENIZER_JSON [TOKENIZER_CONFIG_JSON]   (harness helper)
//
// Same stdin/stdout contract as `pdserve tokenize`:
//   encode: each stdin line -> one JSON array of ids. The post-processor applies (BOS etc., like
//           HF encode(text) with add_special_tokens=True) unless --no-special. Special-token text
//           inside the input is always matched as that token (HF split_special_tokens=False).
//   decode: each stdin line is a JSON array of ids -> one JSON string, special tokens included
//           (skip_special_tokens=False). Ids outside the vocabulary are skipped, as HF does.
//           No clean_up_tokenization_spaces: the text is exactly what the tokenizer.json decoder
//           chain gives (HF `tokenizers` Tokenizer.decode), whatever tokenizer_config.json says.
//   bench:  stdin is a corpus; all its lines are encoded repeatedly for >= BENCH_SECONDS (default
//           2) after a warm-up pass; prints {"bytes","seconds","mb_per_s"} (MB = 1e6 bytes of
//           UTF-8 input; the one-time UTF-8 -> string conversion is not timed).
//   roundtrip: each stdin line -> the JSON string that decode(encode(line, no special)) must give
//           for a lossless tokenizer, or null where the tokenizer is not expected to be lossless.
//           Also checks the JS tokenizer itself against that expectation (count on stderr).
//
// Lines: stdin is read whole as bytes and split on '\n' (0x0A); a '\r' before it stays part of
// the line; a final empty piece (input ending in '\n', or empty input) is not a line.
//
// Invalid UTF-8: each line's bytes are converted with Buffer.toString('utf8'), which replaces
// each maximal invalid subsequence ("maximal subpart", Unicode ch. 3 / WHATWG Encoding) with one
// U+FFFD -- checked on Node 20: it gives the same result as TextDecoder (fatal: false), e.g.
//   80 -> FFFD;  E2 82 -> FFFD;  FF -> FFFD;  C0 AF -> FFFD FFFD;  E2 82 41 -> FFFD 'A';
//   ED A0 80 (surrogate) -> FFFD x3;  F4 90 80 80 (> U+10FFFF) -> FFFD x4;  F0 9F 98 -> FFFD.
// Unlike TextDecoder it does not strip a leading BOM (U+FEFF stays). The C++ side must do the
// same replacement before tokenizing; HF tokenizers never sees invalid UTF-8 (Python str).
// Splitting on 0x0A before converting gives the same result as converting first, since 0x0A
// never belongs to a multi-byte sequence.
//
// @lenml/tokenizers is resolved with require() (so NODE_PATH works) from NODE_PATH or from
// node_modules next to this script (or above it).

import fs from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);

function usage(msg) {
  if (msg) process.stderr.write(`reference.mjs: ${msg}\n`);
  process.stderr.write(
    "usage: node reference.mjs encode|decode|bench|roundtrip TOKENIZER_JSON " +
      "[TOKENIZER_CONFIG_JSON] [--no-special]\n"
  );
  process.exit(2);
}

// ---- arguments ----
const args = process.argv.slice(2);
const noSpecial = args.includes("--no-special");
const positional = args.filter((a) => !a.startsWith("--"));
const unknownFlags = args.filter((a) => a.startsWith("--") && a !== "--no-special");
if (unknownFlags.length) usage(`unknown flag ${unknownFlags[0]}`);
const [mode, tokenizerPath, configPath] = positional;
if (!["encode", "decode", "bench", "roundtrip"].includes(mode)) usage(`bad mode ${mode}`);
if (!tokenizerPath) usage("missing TOKENIZER_JSON");

// ---- load the tokenizer ----
let TokenizerLoader;
try {
  ({ TokenizerLoader } = require("@lenml/tokenizers"));
} catch (e) {
  process.stderr.write(
    `reference.mjs: cannot load @lenml/tokenizers (set NODE_PATH to a node_modules dir): ${e.message}\n`
  );
  process.exit(2);
}
const tokenizerJSON = JSON.parse(fs.readFileSync(tokenizerPath, "utf8"));
// The config only picks the tokenizer class (LlamaTokenizer, Qwen2Tokenizer, ...) and extras
// such as additional_special_tokens; for the tokenizers tested here the class makes no
// difference to encode (LlamaTokenizer with legacy=true == base class).
const tokenizerConfig = configPath ? JSON.parse(fs.readFileSync(configPath, "utf8")) : {};
const tok = TokenizerLoader.fromPreTrained({ tokenizerJSON, tokenizerConfig });

// ---- stdin as lines ----
function readLines() {
  const buf = fs.readFileSync(0);
  const lines = [];
  let start = 0;
  for (;;) {
    const nl = buf.indexOf(0x0a, start);
    if (nl < 0) break;
    lines.push(buf.subarray(start, nl));
    start = nl + 1;
  }
  if (start < buf.length) lines.push(buf.subarray(start));
  return lines;
}

// Writes output synchronously in chunks (safe for large outputs into pipes).
function writeLines(out) {
  const CHUNK = 4096;
  for (let i = 0; i < out.length; i += CHUNK) {
    fs.writeSync(1, out.slice(i, i + CHUNK).join("\n") + "\n");
  }
}

const encode = (text, special) => tok.encode(text, { add_special_tokens: special });

function decode(ids) {
  // HF skips ids it cannot map to a token; the JS port would map them to unk/null instead.
  const known = ids.filter((id) => Number.isInteger(id) && tok.model.vocab[id] !== undefined);
  if (known.length === 0) return ""; // the JS port throws on an empty id list
  return tok.decode(known, { skip_special_tokens: false, clean_up_tokenization_spaces: false });
}

// What decode(encode(text, no special)) gives for a lossless tokenizer, or null where the
// tokenizer is not expected to round-trip this text.
function roundtripExpectation() {
  const normalizers = [];
  const walk = (n) => {
    if (!n) return;
    if (n.type === "Sequence") (n.normalizers || []).forEach(walk);
    else normalizers.push(n);
  };
  walk(tokenizerJSON.normalizer);
  const preTokenizers = [];
  const walkPre = (p) => {
    if (!p) return;
    if (p.type === "Sequence") (p.pretokenizers || []).forEach(walkPre);
    else preTokenizers.push(p);
  };
  walkPre(tokenizerJSON.pre_tokenizer);

  const unicodeForms = [];
  let sentencePiece = preTokenizers.some((p) => p.type === "Metaspace");
  let lossless = true;
  for (const n of normalizers) {
    if (["NFC", "NFD", "NFKC", "NFKD"].includes(n.type)) unicodeForms.push(n.type);
    else if (n.type === "Prepend" && n.prepend === "\u2581") sentencePiece = true;
    else if (n.type === "Replace" && n.pattern?.String === " " && n.content === "\u2581") {
      // SentencePiece space marker; handled below.
    } else lossless = false; // lowercase, strip, ... : not expected to round-trip
  }
  if (preTokenizers.some((p) => p.type === "ByteLevel" && p.add_prefix_space)) lossless = false;
  const addedTexts = tokenizerJSON.added_tokens.map((t) => t.content);

  return (text) => {
    if (!lossless) return null;
    let expected = text;
    for (const form of unicodeForms) expected = expected.normalize(form);
    if (sentencePiece) {
      // The normalizer prepends U+2581 to each piece between added tokens, and the decoder
      // turns every U+2581 into ' ' and strips one leading space: lossless except for
      // literal U+2581 (comes back as ' ') and text after an added token (gains a space).
      if (addedTexts.some((t) => text.includes(t))) return null;
      expected = expected.replaceAll("\u2581", " ");
    }
    return expected;
  };
}

// ---- modes ----
const lines = readLines();

if (mode === "encode") {
  let failed = 0;
  const out = lines.map((line, i) => {
    try {
      return JSON.stringify(encode(line.toString("utf8"), !noSpecial));
    } catch (e) {
      failed++;
      process.stderr.write(`reference.mjs: line ${i + 1}: encode failed: ${e.message}\n`);
      return "null";
    }
  });
  writeLines(out);
  process.exit(failed ? 3 : 0);
}

if (mode === "decode") {
  let failed = 0;
  const out = lines.map((line, i) => {
    try {
      const ids = JSON.parse(line.toString("utf8"));
      if (!Array.isArray(ids)) throw new Error("not a JSON array");
      return JSON.stringify(decode(ids));
    } catch (e) {
      failed++;
      process.stderr.write(`reference.mjs: line ${i + 1}: decode failed: ${e.message}\n`);
      return "null";
    }
  });
  writeLines(out);
  process.exit(failed ? 3 : 0);
}

if (mode === "roundtrip") {
  const expect = roundtripExpectation();
  let jsMismatches = 0;
  const out = lines.map((line, i) => {
    const text = line.toString("utf8");
    const expected = expect(text);
    if (expected !== null && decode(encode(text, false)) !== expected) {
      jsMismatches++;
      if (jsMismatches <= 5)
        process.stderr.write(`reference.mjs: JS itself does not round-trip line ${i + 1}\n`);
    }
    return JSON.stringify(expected);
  });
  writeLines(out);
  if (jsMismatches)
    process.stderr.write(`reference.mjs: JS decode(encode(x)) != expected on ${jsMismatches} lines\n`);
  process.exit(0);
}

if (mode === "bench") {
  const texts = lines.map((l) => l.toString("utf8"));
  const passBytes = lines.reduce((n, l) => n + l.length, 0);
  const minSeconds = Number(process.env.BENCH_SECONDS || 2);
  const now = () => Number(process.hrtime.bigint()) / 1e9;
  const pass = () => {
    let n = 0;
    for (const t of texts) n += encode(t, !noSpecial).length;
    return n;
  };
  // Warm-up: JIT and the BPE word cache (HF has an equivalent cache).
  const w0 = now();
  do pass();
  while (now() - w0 < 0.5);
  let bytes = 0;
  const t0 = now();
  let elapsed = 0;
  do {
    pass();
    bytes += passBytes;
    elapsed = now() - t0;
  } while (elapsed < minSeconds);
  process.stdout.write(
    JSON.stringify({ bytes, seconds: +elapsed.toFixed(4), mb_per_s: +(bytes / 1e6 / elapsed).toFixed(3) }) + "\n"
  );
}
