// tests/llama/check.mjs: llama.cpp itself (through the npm package node-llama-cpp 3.21.1, CPU build)
// runs a GGUF export and must predict what this library predicts (ours.json, written by
// lora_llama_reference for the same model and adapters).
//
//   node check.mjs --ours ours.json --model model.gguf [--lora adapter.gguf:SCALE]... [--tol 1e-3]
//                  [--greedy-must-match] [--min-prob 1e-4] [--kv-cache f32|f16] [--node-llama-cpp DIR]
//
// 1. The tokens of ours.json are evaluated as they are (raw ids: no BOS or other token is prepended; the
//    sequence's context is checked to hold exactly them) with the probabilities of the next token asked
//    for at every position. llama.cpp returns them as float32 softmax values over the whole vocabulary;
//    their logs are compared with ours' log-probabilities. The rule: at every position, over the tokens
//    whose probability in ours is > --min-prob (1e-4), max |log p_llama − log p_ours| <= --tol. Below that
//    a float32 softmax says little about a log-probability (and may underflow to 0), so the maximum over
//    all tokens is printed for information only.
// 2. Greedy continuation: the argmax at the last position (the lowest id on ties), then each chosen
//    token is fed alone (llama.cpp's KV cache) and the next argmax taken, as many tokens as ours.json's
//    "greedy" list. The number of leading tokens that agree is printed; with --greedy-must-match all
//    must. While they agree, each distribution a greedy token is chosen from is held to the same rule as
//    in 1 (ours.json's "greedy_logprobs"), which checks llama.cpp's one-token-at-a-time KV cache path.
//
// The context runs with flash attention off and, by default, a float32 KV cache (llama.cpp's default is
// float16, --kv-cache f16), so that what is compared is the export, not cache rounding. Things llama.cpp
// does that no option changes: its CPU GELU looks the result up in a float16 table (input and output
// rounded to float16), and it pads the context to 256 cells (a warning when that exceeds the model's
// context length; only positions below n_positions are ever used here).
//
// Prints one summary line and exits 0 when every check passes, 1 otherwise (errors included).
import {readFileSync} from "node:fs";
import path from "node:path";
import {fileURLToPath, pathToFileURL} from "node:url";

const usage = `usage: node check.mjs --ours OURS_JSON --model MODEL_GGUF [--lora ADAPTER_GGUF:SCALE]... [--tol T]
                      [--greedy-must-match] [--min-prob P] [--kv-cache f32|f16] [--node-llama-cpp DIR]
  --ours FILE            lora_llama_reference's JSON: tokens, log-probabilities, greedy continuation
  --model FILE           the GGUF model llama.cpp runs
  --lora FILE:SCALE      a GGUF LoRA adapter and its scale (repeat for several, all active at once)
  --tol T                largest |delta log p| allowed (default 1e-3)
  --min-prob P           the tolerance applies to tokens whose probability in ours is > P (default 1e-4)
  --greedy-must-match    fail unless every greedy token agrees (default: report only)
  --kv-cache f32|f16     llama.cpp's KV cache type (default f32)
  --node-llama-cpp DIR   the package (default: build/npm/node_modules/node-llama-cpp of the repository)`;

function fail(message) {
  console.error(`check.mjs: FAIL: ${message}`);
  process.exit(1);
}

function parseArgs(argv) {
  const here = path.dirname(fileURLToPath(import.meta.url));
  const o = {
    ours: null,
    model: null,
    loras: [],
    tol: 1e-3,
    minProb: 1e-4,
    greedyMustMatch: false,
    kvCache: "f32",
    package: path.resolve(here, "../../build/npm/node_modules/node-llama-cpp"),
  };
  const number = (flag, text) => {
    const v = Number(text);
    if (text === undefined || text === "" || !Number.isFinite(v)) fail(`${flag} expects a number, got '${text}'`);
    return v;
  };
  for (let i = 0; i < argv.length; ++i) {
    const flag = argv[i];
    if (flag === "--help" || flag === "-h") {
      console.log(usage);
      process.exit(0);
    }
    if (flag === "--greedy-must-match") {
      o.greedyMustMatch = true;
      continue;
    }
    const value = argv[++i];
    if (value === undefined) fail(`${flag} needs a value (--help for usage)`);
    if (flag === "--ours") o.ours = value;
    else if (flag === "--model") o.model = value;
    else if (flag === "--tol") o.tol = number(flag, value);
    else if (flag === "--min-prob") o.minProb = number(flag, value);
    else if (flag === "--node-llama-cpp") o.package = path.resolve(value);
    else if (flag === "--kv-cache") {
      if (value !== "f32" && value !== "f16") fail(`--kv-cache expects f32 or f16, got '${value}'`);
      o.kvCache = value;
    } else if (flag === "--lora") {
      const colon = value.lastIndexOf(":");
      if (colon <= 0) fail(`--lora expects FILE:SCALE, got '${value}'`);
      o.loras.push({filePath: path.resolve(value.slice(0, colon)), scale: number("--lora's scale", value.slice(colon + 1))});
    } else fail(`unknown flag '${flag}' (--help for usage)`);
  }
  if (!o.ours || !o.model) fail("--ours and --model are required (--help for usage)");
  return o;
}

/// ours.json, checked: N tokens, N rows of V log-probabilities, a greedy list.
function readOurs(file) {
  let ours;
  try {
    ours = JSON.parse(readFileSync(file, "utf8"));
  } catch (e) {
    fail(`cannot read ${file}: ${e.message}`);
  }
  const {tokens, logprobs, greedy, greedy_logprobs: greedyLogprobs} = ours;
  const ids = (a) => Array.isArray(a) && a.every((t) => Number.isInteger(t) && t >= 0);
  if (!ids(tokens) || tokens.length === 0 || !ids(greedy) || !Array.isArray(logprobs) ||
      logprobs.length !== tokens.length || !Array.isArray(greedyLogprobs) ||
      greedyLogprobs.length !== Math.max(greedy.length - 1, 0))
    fail(`${file}: expected {"tokens": [N ids], "logprobs": [N rows], "greedy": [K ids], "greedy_logprobs": [K-1 rows]}`);
  const vocab = logprobs[0].length;
  const rows = logprobs.concat(greedyLogprobs);
  if (vocab < 2 || !rows.every((row) => Array.isArray(row) && row.length === vocab))
    fail(`${file}: every row of "logprobs" and "greedy_logprobs" must have the same length V >= 2`);
  return {tokens, logprobs, greedy, greedyLogprobs, vocab};
}

/// The lowest id of the largest probability.
function argmax(probabilities) {
  let best = -1, bestP = -Infinity;
  for (const [token, p] of probabilities) {
    if (p > bestP || (p === bestP && token < best)) [best, bestP] = [token, p];
  }
  return best;
}

/// Max |Δ log p| at one position: over tokens with p_ours > minProb, and over all tokens.
function comparePosition(probabilities, row, minProb, position) {
  if (!probabilities || probabilities.size !== row.length)
    fail(`position ${position}: llama.cpp gave ${probabilities ? probabilities.size : "no"} probabilities, ` +
         `expected one per token of the vocabulary (${row.length})`);
  let checked = 0, all = 0;
  for (let v = 0; v < row.length; ++v) {
    const p = probabilities.get(v);
    if (p === undefined) fail(`position ${position}: llama.cpp gave no probability for token ${v}`);
    const delta = Math.abs(Math.log(p) - row[v]);  // Infinity when p underflowed to 0
    if (Number.isNaN(delta)) fail(`position ${position}: token ${v}: llama.cpp p = ${p}, ours log p = ${row[v]}`);
    all = Math.max(all, delta);
    if (Math.exp(row[v]) > minProb) checked = Math.max(checked, delta);
  }
  return {checked, all};
}

process.on("unhandledRejection", (e) => fail(e?.message ?? String(e)));
process.on("uncaughtException", (e) => fail(e?.message ?? String(e)));

const o = parseArgs(process.argv.slice(2));
const ours = readOurs(o.ours);
const {getLlama, LlamaLogLevel} = await import(pathToFileURL(path.join(o.package, "dist/index.js")).href).catch(
    (e) => fail(`cannot load node-llama-cpp from ${o.package}: ${e.message}`));

// One thread: the models are tiny, and llama.cpp's threads spin while they wait, which on a loaded
// machine (ctest -j) made a check take 10 s instead of 1.
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error, progressLogs: false, maxThreads: 1});
const model = await llama.loadModel({modelPath: path.resolve(o.model)});
const n = ours.tokens.length, k = ours.greedy.length;
const kv = o.kvCache === "f32" ? "F32" : "F16";
const context = await model.createContext({
  contextSize: n + k + 1,
  sequences: 1,
  threads: 1,
  flashAttention: false,
  experimentalKvCacheKeyType: kv,
  experimentalKvCacheValueType: kv,
  lora: o.loras.length > 0 ? {adapters: o.loras} : undefined,
});
const sequence = context.getSequence();

// 1. Every position of the prompt.
const asked = ours.tokens.map((t) => [t, {generateNext: {probabilities: true}}]);
const results = await sequence.controlledEvaluate(asked);
const held = sequence.contextTokens;
if (held.length !== n || held.some((t, i) => t !== ours.tokens[i]))
  fail(`the context holds ${held.length} tokens [${held.slice(0, 8)}...], expected exactly ours' ${n} ` +
       `[${ours.tokens.slice(0, 8)}...] (nothing prepended)`);
let maxChecked = 0, maxAll = 0, worst = 0;
for (let i = 0; i < n; ++i) {
  const {checked, all} = comparePosition(results[i]?.next?.probabilities, ours.logprobs[i], o.minProb, i);
  if (checked > maxChecked) [maxChecked, worst] = [checked, i];
  maxAll = Math.max(maxAll, all);
}

// 2. Greedy continuation through llama.cpp's KV cache, one token at a time. While both continuations
// agree, the distribution each next token is chosen from is compared as well.
const greedy = [];
let probabilities = results[n - 1].next.probabilities;
let agree = 0, maxGreedy = 0, maxGreedyAll = 0;
for (let j = 0; j < k; ++j) {
  if (j > 0) {
    const [r] = await sequence.controlledEvaluate([[greedy[j - 1], {generateNext: {probabilities: true}}]]);
    probabilities = r?.next?.probabilities;
    if (agree === j) {
      const {checked, all} = comparePosition(probabilities, ours.greedyLogprobs[j - 1], o.minProb, `greedy ${j}`);
      [maxGreedy, maxGreedyAll] = [Math.max(maxGreedy, checked), Math.max(maxGreedyAll, all)];
    }
  }
  greedy.push(argmax(probabilities));
  if (agree === j && greedy[j] === ours.greedy[j]) ++agree;
}
await model.dispose();

const adapters = o.loras.map((a) => `${path.basename(a.filePath)}:${a.scale}`).join(" + ");
const e = (x) => (Number.isFinite(x) ? x.toExponential(2) : "inf (a probability underflowed to 0)");
const lossy = maxChecked > o.tol || maxGreedy > o.tol;
const greedyFails = o.greedyMustMatch && agree < k;
const differs = agree < k ? `, first difference at ${agree}: llama ${greedy[agree]}, ours ${ours.greedy[agree]}` : "";
console.log(
    `check.mjs: ${lossy || greedyFails ? "FAIL" : "PASS"}: ${path.basename(o.model)}${adapters ? " + " + adapters : ""}: ` +
    `max |delta log p| ${e(maxChecked)} over ${n} positions (worst ${worst}) and ${e(maxGreedy)} over the ` +
    `${Math.max(agree - 1, 0)} greedy steps that agree, ${ours.vocab} tokens, those with p > ${o.minProb} in ours ` +
    `(tol ${o.tol}; over all tokens ${e(Math.max(maxAll, maxGreedyAll))}); greedy ${agree}/${k} agree` +
    `${o.greedyMustMatch ? " (must all)" : ""}${differs}`);
process.exit(lossy || greedyFails ? 1 : 0);
