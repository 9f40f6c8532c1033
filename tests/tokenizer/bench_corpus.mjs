// Writes the tokenizer throughput corpus: node bench_corpus.mjs OUT_FILE [MEGABYTES=4]
//
// About 4 MB of '\n'-separated, valid UTF-8 lines mixing the same kinds of text as the parity
// corpus (prose in many scripts, code, numbers, emoji, special-token text), built
// deterministically from a fixed-seed PRNG. Lines range from short to a few kB, roughly like
// prompts and documents.

import fs from "node:fs";
import { makeRng, randomLine, PROSE, CODE } from "./make_corpus.mjs";

const out = process.argv[2];
if (!out) {
  process.stderr.write("usage: node bench_corpus.mjs OUT_FILE [MEGABYTES]\n");
  process.exit(2);
}
const target = Number(process.argv[3] || 4) * 1e6;

const rng = makeRng(777);
const parts = [];
let size = 0;
while (size < target) {
  let line;
  const kind = rng();
  if (kind < 0.5) {
    // Paragraph: several random sentences.
    const n = 1 + rng.int(12);
    const s = [];
    for (let i = 0; i < n; i++) s.push(randomLine(rng, 3));
    line = s.join(" ");
  } else if (kind < 0.7) {
    // Code block flattened to one line with indentation runs.
    const n = 3 + rng.int(20);
    const s = [];
    for (let i = 0; i < n; i++) s.push(" ".repeat(4 * rng.int(4)) + rng.pick(CODE));
    line = s.join("\t");
  } else if (kind < 0.85) {
    // Single-language paragraph.
    const p = rng.pick(PROSE);
    line = Array.from({ length: 1 + rng.int(30) }, () => p).join(" ");
  } else {
    line = randomLine(rng, 8);
  }
  const b = Buffer.from(line + "\n", "utf8");
  parts.push(b);
  size += b.length;
}
fs.writeFileSync(out, Buffer.concat(parts));
process.stderr.write(`bench_corpus: ${parts.length} lines, ${size} bytes -> ${out}\n`);
