// gpt2_finetune: LoRA on a GPT-2 language model, against full fine-tuning, LayerNorm+head fine-tuning
// and no fine-tuning, on three distribution shifts of real text. Everything runs on a CPU.
//
//  1. Data (examples/common/fortunes.hpp). Debian's fortune files: records separated by "%" lines, each
//     record assigned to train (80%) / validation (10%) / test (10%) by a stable hash of its file name
//     and index. Validation text picks learning rates; test text is only ever evaluated.
//  2. Base model. Without a download: a byte-level GPT-2 (vocab 257 = 256 bytes + <|endoftext|>; 4
//     layers, 4 heads, n_embd 128, n_positions 128; 0.84 M parameters) pretrained on the train split of
//     the English fortunes minus four held-out categories, saved once as a Hugging Face GPT-2 folder
//     (config.json + model.safetensors) under .cache/gpt2_fortunes/base and reused. Any GPT-2 folder
//     works in its place (`--model DIR`; with vocab.json + merges.txt it uses GPT-2's BPE tokenizer).
//  3. Shifts. mild: the held-out English categories (literature, riddles, startrek, zippy); larger:
//     Spanish (fortunes-es); extreme: Russian (fortunes-ru, Cyrillic: two bytes per letter that the
//     English base has barely seen).
//  4. Methods. LoRA on c_attn, c_proj and c_fc (PEFT's GPT-2 names; "c_proj" matches both the
//     attention's and the MLP's output projection, so every projection of every block is adapted), at
//     alpha = 2 r; full fine-tuning; norms_and_head (LayerNorm gains and biases and the tied LM head);
//     none (the base). AdamW with warm-up and cosine decay, gradient-norm clip 1, random windows.
//  5. Evaluation. Bits per byte on the validation and test text (definition below), trainable
//     parameters, training-state bytes (trainable values + gradients + AdamW's two moments), training
//     tokens per second and peak RSS, as mean ± sample std over seeds; learning rates chosen on
//     validation with the first seed.
//  6. Adapters. Each LoRA run saves its adapter as a PEFT folder (adapter_config.json with
//     base_model_name_or_path, target_modules, fan_in_fan_out true, task_type CAUSAL_LM; keys
//     base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight, ...), loads it back onto a fresh copy
//     of the base, and checks that the reloaded model evaluates exactly as the trained one and that
//     merging changes the logits by at most 1e-4 (relative); the program exits 1 if any check fails.
//
// The eval definition (`gpt2_finetune eval`, docs/CONVENTIONS.md §eval): the text is tokenized whole
// (n tokens) and cut into consecutive non-overlapping windows of n_positions tokens, a last partial
// window of at least 2 tokens included; in each window of m tokens, tokens 1 .. m-1 are predicted from
// the window's earlier tokens (P = Σ (m − 1) predictions). loss_nats_per_token x = mean of −ln p over
// the P predictions; bits_per_byte y = (P x / ln 2) / B, B = the UTF-8 bytes of the P predicted tokens
// (B = P for the byte tokenizer).
//
// Verbs: pretrain, finetune, generate, eval, study (the default study, or --full-study). `--help` on
// each. The study's --json (fields listed in study_json below) feeds scripts/plot_gpt2.sh.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <lora/io/atomic_file.hpp>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "common/dist.hpp"
#include "common/flags.hpp"
#include "common/fortunes.hpp"
#include "common/lm.hpp"
#include "common/progress.hpp"
#include "common/strings.hpp"

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;
using lora::models::gpt2_base_training;
using lora::models::gpt2_config;

namespace {

constexpr const char* kProgram = "gpt2_finetune";
constexpr const char* kDefaultCache = ".cache/gpt2_fortunes";

const char* kUsage =
    "usage: gpt2_finetune VERB [options]     (gpt2_finetune VERB --help for a verb's options)\n"
    "\n"
    "LoRA on a GPT-2 language model against full, LayerNorm+head and no fine-tuning, on CPU.\n"
    "\n"
    "verbs:\n"
    "  study      the experiment: pretrains the built-in byte-level base once (cached), fine-tunes it on\n"
    "             three shifts (mild: held-out English categories; larger: Spanish; extreme: Russian)\n"
    "             and prints a table of bits per byte, parameters, memory and speed (--full-study for\n"
    "             every rank 1..64, 3 seeds and learning rates chosen on validation)\n"
    "  pretrain   pretrains the built-in base on the English fortunes; saves a Hugging Face GPT-2 folder\n"
    "  finetune   fine-tunes a model folder on text files (LoRA, full or norms_and_head); saves a PEFT\n"
    "             adapter folder or a model folder\n"
    "  generate   continues a prompt (greedy or sampled), with or without an adapter\n"
    "  eval       bits per byte of a text file:\n"
    "               gpt2_finetune eval --model DIR [--adapter DIR] --text FILE --json\n"
    "             prints {\"tokens\": N, \"predicted\": P, \"loss_nats_per_token\": x, \"bits_per_byte\": y}:\n"
    "             the file is tokenized whole and cut into consecutive non-overlapping windows of\n"
    "             n_positions tokens (a last partial window of at least 2 tokens included); x is the\n"
    "             mean next-token cross-entropy over all P predicted positions (m - 1 per window of m\n"
    "             tokens); y = (P x / ln 2) / B with B the UTF-8 bytes of the predicted tokens (B = P\n"
    "             for the byte tokenizer)\n"
    "\n"
    "Files: the built-in base is cached in .cache/gpt2_fortunes/base (config.json, model.safetensors,\n"
    "pretrain.json); the study writes its splits, adapters and results under .cache/gpt2_fortunes/study.\n";

// ---------------------------------------------------------------------------------------------------
// Shared option groups

/// The shape and recipe of the built-in base.
struct pretrain_options {
  std::string fortunes = ex::fortunes_default_dir;
  std::string out = std::string(kDefaultCache) + "/base";
  std::vector<std::string> text_files;  ///< instead of the fortunes: pretrain on these files
  std::string val_text;                 ///< with text_files: the validation text (optional)
  gpt2_config config = [] {
    gpt2_config c;
    c.n_layer = 4;
    c.n_head = 4;
    c.n_embd = 128;
    c.n_positions = 128;
    c.vocab_size = 257;
    return c;
  }();
  ex::train_setup train = [] {
    ex::train_setup t;
    t.steps = 1000;
    t.batch = 8;
    t.context = 128;
    t.lr = 2e-3;
    t.warmup = 40;
    t.weight_decay = 0.01;
    t.seed = 1;
    t.curve_every = 20;
    t.label = "pretrain";
    return t;
  }();
  std::uint64_t init_seed = 1;
  std::size_t val_bytes = 32 * 1024;
  bool force = false;
};

/// The fine-tuning method of one run.
enum class method { lora, full, norms_and_head, none };

const char* to_string(method m) {
  switch (m) {
    case method::lora:
      return "lora";
    case method::full:
      return "full";
    case method::norms_and_head:
      return "norms_and_head";
    default:
      return "none";
  }
}

method parse_method(const ex::flag_table& flags, const std::string& s) {
  for (method m : {method::lora, method::full, method::norms_and_head, method::none})
    if (s == to_string(m)) return m;
  if (s == "head") return method::norms_and_head;
  flags.fail("--method takes lora, full, norms_and_head or none, got '" + s + "'");
}

ex::schedule_kind parse_schedule(const ex::flag_table& flags, const std::string& s) {
  for (auto k : {ex::schedule_kind::constant, ex::schedule_kind::linear, ex::schedule_kind::cosine})
    if (s == ex::to_string(k)) return k;
  flags.fail("--schedule takes constant, linear or cosine, got '" + s + "'");
}

/// Flags of the training loop, shared by pretrain, finetune and study.
void bind_train_flags(ex::flag_table& f, ex::train_setup& t) {
  f.bind("--steps", t.steps, 1);
  f.bind("--batch", t.batch, 1);
  f.bind("--context", t.context, 2);
  f.bind("--accum", t.accum, 1);
  f.bind("--warmup", t.warmup, 0);
  f.bind("--weight-decay", t.weight_decay, 0);
  f.bind("--clip", t.clip, 0);
  f.on("--schedule", ex::flag_table::setter([&f, &t](const std::string& v) { t.schedule = parse_schedule(f, v); }));
  f.bind("--quiet", t.quiet);
}

const char* kTrainFlagsHelp =
    "  --steps N            optimizer steps\n"
    "  --batch N            sequences per micro-batch\n"
    "  --context N          tokens per sequence (at most the model's n_positions)\n"
    "  --accum K            micro-batches per optimizer step (gradient accumulation; the loss of each is\n"
    "                       scaled by 1/K, so the step sees the mean gradient of K*batch sequences)\n"
    "  --schedule S         constant, linear or cosine (after linear warm-up; cosine ends at 0.1 lr)\n"
    "  --warmup N           warm-up steps\n"
    "  --weight-decay X     AdamW's decoupled weight decay\n"
    "  --clip X             clip the global gradient norm to X (0: off; default 1)\n"
    "  --quiet              no progress bar\n";

std::string human_bytes(double b) {
  if (b >= 1024.0 * 1024.0) return ex::cat(std::round(b / 1024.0 / 1024.0 * 100) / 100, " MiB");
  return ex::cat(std::round(b / 1024.0 * 10) / 10, " KiB");
}

std::vector<std::string> args_from(int argc, char** argv, int first) { return {argv + first, argv + argc}; }

/// Absolute form of a folder, for base_model_name_or_path.
std::string absolute_dir(const std::string& dir) {
  std::error_code ec;
  const fs::path p = fs::weakly_canonical(fs::absolute(dir), ec);
  return ec ? dir : p.string();
}

/// Prints the reduction's cost (nothing in a single process; stdout is rank 0's alone).
void print_comm(const ex::comm_report& c) {
  if (c.ranks > 1) std::printf("%s\n", c.describe().c_str());
}

// ---------------------------------------------------------------------------------------------------
// pretrain

const char* kPretrainUsage =
    "usage: gpt2_finetune pretrain [options]\n"
    "\n"
    "Pretrains the built-in byte-level GPT-2 (vocab 257) on the train split of the English fortunes\n"
    "(without the mild shift's held-out categories) and saves it as a Hugging Face GPT-2 folder:\n"
    "config.json, model.safetensors, and pretrain.json (the recipe, the data and the validation bits per\n"
    "byte). An existing folder made with the same recipe is reused unless --force.\n"
    "\n"
    "options:\n"
    "  --out DIR            model folder (default .cache/gpt2_fortunes/base)\n"
    "  --fortunes DIR       Debian's fortune files (default /usr/share/games/fortunes)\n"
    "  --force              pretrain even if DIR holds a model of the same recipe\n"
    "  --layers N           n_layer (default 4)\n"
    "  --heads N            n_head (default 4)\n"
    "  --embd N             n_embd (default 128)\n"
    "  --positions N        n_positions, the context length (default 128)\n"
    "  --lr X               peak learning rate (default 2e-3)\n"
    "  --seed S             initialisation and data-order seed (default 1)\n"
    "  --val-bytes N        validation text evaluated at the end, in bytes (default 32768)\n"
    "  --text FILES         pretrain on these text files (comma-separated) instead of the fortunes\n"
    "  --val-text FILE      with --text: the validation text\n"
    "training (defaults: 1000 steps of 8 x 128 tokens, cosine after 40 warm-up steps, weight decay 0.01):\n";

void parse_pretrain(const std::vector<std::string>& args, pretrain_options& o) {
  const std::string usage = std::string(kPretrainUsage) + kTrainFlagsHelp;
  ex::flag_table f("gpt2_finetune pretrain", usage);
  f.bind("--out", o.out);
  f.bind("--fortunes", o.fortunes);
  f.bind("--force", o.force);
  f.bind("--layers", o.config.n_layer, 1);
  f.bind("--heads", o.config.n_head, 1);
  f.bind("--embd", o.config.n_embd, 1);
  f.bind("--positions", o.config.n_positions, 2);
  f.bind("--lr", o.train.lr, 0);
  f.on("--seed", ex::flag_table::setter([&](const std::string& v) {
         o.init_seed = static_cast<std::uint64_t>(f.number("--seed", v, 0));
         o.train.seed = o.init_seed;
       }));
  f.bind("--val-bytes", o.val_bytes, 2);
  f.on("--text", ex::flag_table::setter([&](const std::string& v) {
         for (auto& w : f.words("--text", v)) o.text_files.push_back(w);
       }));
  f.bind("--val-text", o.val_text);
  bind_train_flags(f, o.train);
  f.parse(args);
  if (!o.val_text.empty() && o.text_files.empty()) f.fail("--val-text goes with --text");
  try {
    o.config.validate("the model shape");
  } catch (const lora::error& e) {
    f.fail(e.what());
  }
  o.train.context = std::min(o.train.context, o.config.n_positions);
}

/// Everything that decides the pretrained weights, as one string.
/// Everything that decides the pretrained weights, as one string (`data_hash`: of the text).
std::string pretrain_recipe(const pretrain_options& o, std::uint64_t data_hash) {
  const auto& c = o.config;
  const auto& t = o.train;
  return ex::cat("gpt2 byte-level L", c.n_layer, " H", c.n_head, " d", c.n_embd, " ctx", c.n_positions, " V",
                 c.vocab_size, "; adamw lr ", t.lr, " ", ex::to_string(t.schedule), " warmup ", t.warmup, " wd ",
                 t.weight_decay, " clip ", t.clip, "; ", t.steps, " steps x ", t.accum, " x ", t.batch, " x ",
                 t.context, " tokens; seed ", o.init_seed, "; data hash ", data_hash);
}

/// The pretraining text: the English fortunes' train and (capped) validation splits, or --text files.
struct pretrain_text {
  std::string description, train, validation;
  std::vector<std::string> files;
  std::uint64_t hash = 0;  ///< of the file names and contents, for the recipe
};

pretrain_text read_pretrain_text(const pretrain_options& o) {
  pretrain_text p;
  if (o.text_files.empty()) {
    const ex::corpus_spec english = ex::fortune_corpus(o.fortunes, "english");
    const std::size_t caps[3] = {0, o.val_bytes, 0};
    ex::corpus_splits text = ex::read_corpus(o.fortunes, english, caps);
    p.description = english.description + ", train split";
    p.files = english.files;
    p.train = std::move(text.train);
    p.validation = std::move(text.validation);
  } else {
    p.description = "text files";
    p.files = o.text_files;
    for (std::size_t i = 0; i < o.text_files.size(); ++i)
      p.train += (i > 0 ? "\n%\n" : "") + ex::read_text_file(o.text_files[i]);
    if (!o.val_text.empty()) p.validation = ex::read_text_file(o.val_text);
  }
  p.hash = ex::fnv1a64(p.train) ^ (ex::fnv1a64(p.validation) * 31);
  for (const auto& f : p.files) p.hash = p.hash * 1099511628211ull ^ ex::fnv1a64(f);
  return p;
}

/// The pretrained base in o.out: reused when its pretrain.json has the same recipe and it loads,
/// else trained and saved. Returns the folder's pretrain.json.
json ensure_base(const pretrain_options& o, bool quiet) {
  const pretrain_text text = read_pretrain_text(o);
  const std::string recipe = pretrain_recipe(o, text.hash);
  const fs::path info_path = fs::path(o.out) / "pretrain.json";
  if (!o.force && fs::exists(info_path)) {
    try {
      const json info = json::parse(ex::read_text_file(info_path.string()));
      if (info.value("recipe", "") == recipe) {
        ex::load_base_model(o.out);  // it must load, too
        std::printf("using the pretrained base in %s (validation %.3f bits/byte)\n", o.out.c_str(),
                    info.value("val_bits_per_byte", 0.0));
        return info;
      }
      std::printf("the base in %s was made by another recipe; pretraining again\n", o.out.c_str());
    } catch (const std::exception& e) {
      std::printf("cannot reuse the base in %s (%s); pretraining again\n", o.out.c_str(), e.what());
    }
  }
  const lora::models::byte_tokenizer tok;
  const ex::token_list train_ids = tok.encode(text.train), val_ids = tok.encode(text.validation);
  std::printf("pretraining the base: %s, %lld parameters, on %zu bytes (%s)\n",
              ex::cat("GPT-2 L", o.config.n_layer, " H", o.config.n_head, " d", o.config.n_embd, " ctx",
                      o.config.n_positions, " vocab ", o.config.vocab_size)
                  .c_str(),
              static_cast<long long>(o.config.num_parameters()), text.train.size(), text.description.c_str());
  ex::lm model(ex::lm_weights::random(o.config, o.init_seed));
  model.set_base_training(gpt2_base_training::full);
  ex::train_setup t = o.train;
  t.quiet = quiet;
  const ex::train_outcome run = ex::train_lm(model, train_ids, t);
  const ex::eval_result val = ex::evaluate(model, lora::models::tokenizer(tok), val_ids);
  std::printf("pretrained in %.0f s (%.0f tokens/s); validation %.4f bits/byte\n", run.seconds, run.tokens_per_second(),
              val.bits_per_byte());
  json info = {{"recipe", recipe},
               {"config",
                {{"n_layer", o.config.n_layer},
                 {"n_head", o.config.n_head},
                 {"n_embd", o.config.n_embd},
                 {"n_positions", o.config.n_positions},
                 {"vocab_size", o.config.vocab_size}}},
               {"parameters", o.config.num_parameters()},
               {"data",
                {{"corpus", text.description},
                 {"files", text.files},
                 {"train_bytes", text.train.size()},
                 {"val_bytes", text.validation.size()}}},
               {"steps", t.steps},
               {"tokens", run.tokens},
               {"seconds", run.seconds},
               {"cpu_seconds", run.cpu_seconds},
               {"tokens_per_second", run.tokens_per_second()},
               {"val_bits_per_byte", val.bits_per_byte()},
               {"val_bytes", val.bytes},
               {"curve", run.curve}};
  ex::on_root("saving the base", [&] {
    lora::models::save_gpt2(o.out, model.weights());
    lora::io::write_file_atomically(info_path.string(), info.dump(2) + "\n");
  });
  std::printf("saved the base as a Hugging Face GPT-2 folder in %s\n", o.out.c_str());
  print_comm(run.comm);
  return info;
}

int run_pretrain(const std::vector<std::string>& args) {
  pretrain_options o;
  parse_pretrain(args, o);
  ensure_base(o, o.train.quiet);
  return 0;
}

// ---------------------------------------------------------------------------------------------------
// A fine-tuning run on a loaded base (shared by finetune and study)

struct finetune_spec {
  method m = method::lora;
  lora::index rank = 8;
  double alpha = 0;  ///< 0: 2 * rank
  double dropout = 0;
  bool rslora = false;
  std::vector<std::string> targets = {"c_attn", "c_proj", "c_fc"};
  std::uint64_t seed = 0;                             ///< adapter initialisation; the data order is train.seed
  lora::quant::qtype base = lora::quant::qtype::f32;  ///< how the projections' frozen weights are stored
};

/// Sets up `model` for spec.m: the adapter added (LoRA), or the base tensors that train.
void add_method(ex::lm& model, const finetune_spec& spec) {
  if (spec.m == method::lora) {
    lora::adapter_config c;
    c.rank = spec.rank;
    c.alpha = spec.alpha > 0 ? spec.alpha : 2.0 * static_cast<double>(spec.rank);
    c.dropout = spec.dropout;
    c.use_rslora = spec.rslora;
    c.seed = 1000 * spec.seed + 1;
    model.add_adapter("default", c, spec.targets);
  } else if (spec.m == method::full) {
    model.set_base_training(gpt2_base_training::full);
  } else if (spec.m == method::norms_and_head) {
    model.set_base_training(gpt2_base_training::norms_and_head);
  }
}

/// A model on `weights` (a copy of the base, or the base itself), set up for `spec`: the projections stored
/// as spec.base (their float tensors released), the adapter added, the base tensors that train.
std::unique_ptr<ex::lm> make_model(ex::lm_weights weights, const finetune_spec& spec) {
  auto model = std::make_unique<ex::lm>(std::move(weights));
  model->set_base_storage(spec.base);
  add_method(*model, spec);
  return model;
}

/// The PEFT adapter of a LoRA model, with the config PEFT needs to load it onto `base_dir`.
lora::io::peft_adapter adapter_of(ex::lm& model, const std::string& base_dir) {
  lora::io::peft_config base;
  base.fan_in_fan_out = true;  // GPT-2's Conv1D stores W as in x out
  base.task_type = "CAUSAL_LM";
  base.base_model_name_or_path = absolute_dir(base_dir);
  return lora::io::peft_adapter::from_layers(model.named_layers(), "default", base);
}

/// Concatenation of text files, each checked as read_model_text does, joined with "\n%\n".
ex::token_list read_token_files(const std::vector<std::string>& files, const lora::models::tokenizer& tok) {
  std::string all;
  for (std::size_t i = 0; i < files.size(); ++i) {
    if (i > 0) all += "\n%\n";
    all += ex::read_model_text(files[i], tok);
  }
  return tok.encode(all);
}

// ---------------------------------------------------------------------------------------------------
// finetune

/// A --base-dtype value; the flag's error lists the names.
lora::quant::qtype parse_base_dtype(const ex::flag_table& f, const std::string& v) {
  try {
    return lora::quant::parse_qtype(v);
  } catch (const lora::config_error& e) {
    f.fail(ex::cat("--base-dtype: ", e.what()));
  }
}

/// finetune's, eval's and generate's --base-dtype: a storage, or "keep" (true: the projections as a GGUF
/// base stores them; float32 for a Hugging Face folder).
bool parse_base_dtype_or_keep(const ex::flag_table& f, const std::string& v, lora::quant::qtype& type) {
  if (v == "keep") return true;
  try {
    type = lora::quant::parse_qtype(v);
  } catch (const lora::config_error& e) {
    f.fail(ex::cat("--base-dtype: ", e.what(), ", or keep (a GGUF base's own types)"));
  }
  return false;
}

struct finetune_options {
  std::string model_dir, out, val_file;
  std::string init_adapter;  ///< continue training this PEFT adapter (its rank, alpha, targets)
  std::vector<std::string> train_files;
  finetune_spec spec;
  bool keep_base = false;  ///< --base-dtype keep
  ex::train_setup train = [] {
    ex::train_setup t;
    t.steps = 100;
    t.batch = 8;
    t.context = 128;
    t.lr = 3e-3;
    t.warmup = 10;
    t.label = "finetune";
    return t;
  }();
  bool json_out = false;
};

const char* kFinetuneUsage =
    "usage: gpt2_finetune finetune --model DIR --train FILE[,FILE...] --out DIR [options]\n"
    "\n"
    "Fine-tunes the Hugging Face GPT-2 folder DIR on the text files (joined with \"\\n%\\n\"; random\n"
    "windows of --context tokens). LoRA saves a PEFT adapter folder in --out (loadable by PEFT onto DIR);\n"
    "full and norms_and_head save a whole model folder there.\n"
    "\n"
    "options:\n"
    "  --model DIR          the base model folder (config.json, model.safetensors [, vocab.json, merges.txt]),\n"
    "                       or a GPT-2 GGUF file (llama.cpp's; its vocabulary is the tokenizer)\n"
    "  --train FILES        training text files, comma-separated (or --train repeated)\n"
    "  --val FILE           validation text: its bits per byte are printed before and after\n"
    "  --out DIR            where the adapter (or model) is written\n"
    "  --method M           lora (default), full, norms_and_head\n"
    "  --rank R             LoRA rank (default 8)\n"
    "  --alpha X            LoRA alpha (default 2 * rank)\n"
    "  --targets T1,T2      modules to adapt (default c_attn,c_proj,c_fc: every projection; c_proj is both\n"
    "                       attn.c_proj and mlp.c_proj, use attn.c_proj or mlp.c_proj for one)\n"
    "  --dropout P          LoRA dropout (default 0)\n"
    "  --rslora             scaling alpha / sqrt(r)\n"
    "  --base-dtype D       store the frozen projections as f32 (default), bf16, f16, int8 (per row),\n"
    "                       nf4, nf4_dq (QLoRA's NF4, double-quantized), q8_0 or q4_0 (ggml's): the\n"
    "                       adapters train over the quantized base (--method lora); keep: a GGUF\n"
    "                       base's own types (F16, BF16, Q8_0, Q4_0 blocks used as they are; f32 for a folder)\n"
    "  --adapter DIR        continue training this PEFT adapter (e.g. one converted from llama.cpp with\n"
    "                       lora-gguf to-peft): its rank, alpha, targets and rsLoRA come from the folder,\n"
    "                       so --rank, --alpha, --targets, --rslora and --dropout are refused with it\n"
    "  --lr X               peak learning rate (default 3e-3)\n"
    "  --seed S             adapter initialisation and data order (default 0)\n"
    "  --checkpoint FILE    save a training checkpoint (parameters, AdamW state, data RNG) here\n"
    "  --checkpoint-every N ... every N steps, and at the end\n"
    "  --resume FILE        continue from a checkpoint written by the same run (same flags)\n"
    "  --stop-after N       stop after step N (with --checkpoint: an interrupted run, to --resume)\n"
    "  --json               print the result as JSON\n"
    "training (defaults: 100 steps of 8 x 128 tokens, cosine after 10 warm-up steps, no weight decay):\n";

void parse_finetune(const std::vector<std::string>& args, finetune_options& o) {
  ex::flag_table f("gpt2_finetune finetune", std::string(kFinetuneUsage) + kTrainFlagsHelp);
  f.bind("--model", o.model_dir);
  f.bind("--out", o.out);
  f.bind("--val", o.val_file);
  f.on("--train", ex::flag_table::setter([&](const std::string& v) {
         for (auto& w : f.words("--train", v)) o.train_files.push_back(w);
       }));
  f.on("--method", ex::flag_table::setter([&](const std::string& v) { o.spec.m = parse_method(f, v); }));
  f.bind("--rank", o.spec.rank, 1);
  f.bind("--alpha", o.spec.alpha, 0);
  f.on("--targets", ex::flag_table::setter([&](const std::string& v) { o.spec.targets = f.words("--targets", v); }));
  f.bind("--dropout", o.spec.dropout, 0);
  f.bind("--rslora", o.spec.rslora);
  f.bind("--adapter", o.init_adapter);
  f.on("--base-dtype", ex::flag_table::setter(
                           [&](const std::string& v) { o.keep_base = parse_base_dtype_or_keep(f, v, o.spec.base); }));
  f.bind("--lr", o.train.lr, 0);
  f.on("--seed", ex::flag_table::setter([&](const std::string& v) {
         o.spec.seed = static_cast<std::uint64_t>(f.number("--seed", v, 0));
         o.train.seed = 1000 * o.spec.seed + 7;
       }));
  f.bind("--checkpoint", o.train.checkpoint);
  f.bind("--checkpoint-every", o.train.checkpoint_every, 1);
  f.bind("--resume", o.train.resume);
  f.bind("--stop-after", o.train.stop_after, 1);
  f.bind("--json", o.json_out);
  bind_train_flags(f, o.train);
  f.parse(args);
  if (o.model_dir.empty()) f.fail("--model DIR is required");
  if (o.train_files.empty()) f.fail("--train FILE is required");
  if (o.out.empty()) f.fail("--out DIR is required");
  if (o.spec.m == method::none) f.fail("--method none trains nothing");
  if (o.spec.dropout >= 1) f.fail("--dropout must be below 1");
  // full and norms_and_head save a whole model folder, which needs the projections in float.
  if (o.spec.base != lora::quant::qtype::f32 && o.spec.m != method::lora)
    f.fail(ex::cat("--base-dtype ", lora::quant::qtype_name(o.spec.base),
                   " keeps the projections frozen in fewer bits: it needs --method lora"));
  if (o.keep_base && o.spec.m != method::lora && lora::io::is_gguf_file(o.model_dir))
    f.fail("--base-dtype keep keeps the projections frozen in the file's types: it needs --method lora");
  if (!o.init_adapter.empty()) {
    if (o.spec.m != method::lora) f.fail("--adapter continues a LoRA adapter: it needs --method lora");
    for (const char* flag : {"--rank", "--alpha", "--targets", "--rslora", "--dropout"})
      if (std::find(args.begin(), args.end(), flag) != args.end())
        f.fail(ex::cat(flag, " cannot be combined with --adapter (the adapter folder sets it)"));
  }
}

/// The flags that must agree between a run and the checkpoint it resumes.
std::string run_key(const finetune_options& o) {
  const auto& s = o.spec;
  const auto& t = o.train;
  std::string targets;
  for (const auto& x : s.targets) targets += x + ",";
  return ex::cat("model ", absolute_dir(o.model_dir), "; method ", to_string(s.m), " rank ", s.rank, " alpha ", s.alpha,
                 " targets ", targets, " adapter ", o.init_adapter.empty() ? "" : absolute_dir(o.init_adapter),
                 " seed ", s.seed, "; lr ", t.lr, " ", ex::to_string(t.schedule), " warmup ", t.warmup, " steps ",
                 t.steps, " batch ", t.batch, " x ", t.accum, " context ", t.context);
}

int run_finetune(const std::vector<std::string>& args) {
  finetune_options o;
  parse_finetune(args, o);
  ex::base_model base = ex::load_base_model(o.model_dir, o.keep_base);
  if (o.train.context > base.weights.config().n_positions)
    throw lora::config_error(
        ex::cat("--context ", o.train.context, " exceeds the model's n_positions ", base.weights.config().n_positions));
  const ex::token_list train_ids = read_token_files(o.train_files, base.tok);
  ex::token_list val_ids;
  if (!o.val_file.empty()) val_ids = base.tok.encode(ex::read_model_text(o.val_file, base.tok));
  std::unique_ptr<ex::lm> model = ex::make_base_lm(base);  // the base itself: no second copy
  if (o.keep_base)
    o.spec.base = model->base_storage();  // the file's own (a GGUF's blocks as they are)
  else
    model->set_base_storage(o.spec.base);
  if (o.init_adapter.empty()) {
    add_method(*model, o.spec);
  } else {
    ex::attach_adapter(*model, o.init_adapter);  // trainable, active, named "default"
  }
  json out = {{"model", o.model_dir},
              {"method", to_string(o.spec.m)},
              {"base_dtype", lora::quant::qtype_name(o.spec.base)},
              {"weight_bytes", ex::weight_bytes(*model)}};
  if (!val_ids.empty()) {
    const auto before = ex::evaluate(*model, base.tok, val_ids);
    if (ex::is_root()) std::fprintf(stderr, "validation before: %.4f bits/byte\n", before.bits_per_byte());
    out["val_bits_per_byte_before"] = before.bits_per_byte();
  }
  o.train.run_key = run_key(o);
  ex::reset_peak_rss();
  const ex::train_outcome run = ex::train_lm(*model, train_ids, o.train);
  out["trainable_params"] = run.trainable_params;
  out["train_state_bytes"] = run.train_state_bytes;
  out["tokens_per_second"] = run.tokens_per_second();
  out["peak_rss_bytes"] = ex::peak_rss_bytes();
  out["final_train_loss"] = run.curve.empty() ? 0.0 : run.curve.back().second;
  if (!val_ids.empty()) {
    const auto after = ex::evaluate(*model, base.tok, val_ids);
    if (ex::is_root()) std::fprintf(stderr, "validation after: %.4f bits/byte\n", after.bits_per_byte());
    out["val_bits_per_byte"] = after.bits_per_byte();
  }
  ex::on_root("saving the fine-tuned weights", [&] {
    if (o.spec.m == method::lora) {
      adapter_of(*model, o.model_dir).save(o.out);
      std::fprintf(stderr, "saved the LoRA adapter (PEFT folder) in %s\n", o.out.c_str());
    } else {
      lora::models::save_gpt2(o.out, model->weights());
      ex::save_base_tokenizer(o.model_dir, o.out);  // the tokenizer goes with the model
      std::fprintf(stderr, "saved the fine-tuned model (Hugging Face GPT-2 folder) in %s\n", o.out.c_str());
    }
  });
  out["out"] = o.out;
  if (run.comm.ranks > 1) out["data_parallel"] = ex::comm_json(run.comm, run.tokens_per_second());
  if (o.json_out) std::printf("%s\n", out.dump(2).c_str());
  if (ex::is_root() && run.comm.ranks > 1) std::fprintf(stderr, "%s\n", run.comm.describe().c_str());
  return 0;
}

// ---------------------------------------------------------------------------------------------------
// eval and generate

struct model_options {
  std::string model_dir, adapter_dir;
  bool merge = false;
  lora::quant::qtype base = lora::quant::qtype::f32;
  bool keep_base = false;  ///< --base-dtype keep
};

/// The flags eval and generate share.
void bind_model_flags(ex::flag_table& f, model_options& mo) {
  f.bind("--model", mo.model_dir);
  f.bind("--adapter", mo.adapter_dir);
  f.bind("--merge", mo.merge);
  f.on("--base-dtype",
       ex::flag_table::setter([&](const std::string& v) { mo.keep_base = parse_base_dtype_or_keep(f, v, mo.base); }));
}

constexpr const char* kModelFlagsHelp =
    "  --model DIR        Hugging Face GPT-2 folder, or a GPT-2 GGUF file\n"
    "  --adapter DIR      PEFT LoRA adapter folder to apply\n"
    "  --merge            merge the adapter into the weights first (into a quantized base: re-quantized,\n"
    "                     and the error it introduces is printed)\n"
    "  --base-dtype D     store the projections as f32 (default), bf16, f16, int8, nf4, nf4_dq, q8_0, q4_0,\n"
    "                     or keep: a GGUF base's own types (its blocks used as they are)\n";

/// A base folder and the model built on it: --adapter attached (merged into the weights with --merge).
struct opened_model {
  ex::base_model base;
  std::unique_ptr<ex::lm> model;
};

opened_model open_model(const model_options& o) {
  opened_model m{ex::load_base_model(o.model_dir, o.keep_base), nullptr};
  m.model = ex::make_base_lm(m.base);  // m.base keeps the tokenizer
  if (!o.keep_base) m.model->set_base_storage(o.base);
  if (!o.adapter_dir.empty()) {
    ex::attach_adapter(*m.model, o.adapter_dir);
    if (o.merge) m.model->merge();
  }
  if (o.merge && m.model->base_storage() != lora::quant::qtype::f32) {
    lora::quant::requant_error worst;
    for (const auto& [path, layer] : m.model->named_layers()) worst.absorb(layer->merge_error());
    std::fprintf(stderr,
                 "merged into a %s base by re-quantizing W + s B A: max |dW| %.3g, RMS dW %.3g (%.3g of RMS W), "
                 "output change on a probe batch %.3g of its RMS (worst layer)\n",
                 lora::quant::qtype_name(m.model->base_storage()), worst.max_weight, worst.rms_weight,
                 worst.rel_rms_weight, worst.rel_rms_output);
  }
  m.model->train(false);
  return m;
}

const char* kEvalUsage =
    "usage: gpt2_finetune eval --model DIR [--adapter DIR] --text FILE [--json]\n"
    "\n"
    "Bits per byte of FILE: the file is tokenized whole and cut into consecutive non-overlapping windows\n"
    "of n_positions tokens (a last partial window of at least 2 tokens included); x is the mean\n"
    "next-token cross-entropy in nats over all P predicted positions (m - 1 per window of m tokens) and\n"
    "y = (P x / ln 2) / B, B the UTF-8 bytes of the predicted tokens (B = P for the byte tokenizer).\n"
    "--json prints {\"tokens\": N, \"predicted\": P, \"loss_nats_per_token\": x, \"bits_per_byte\": y}.\n"
    "\n"
    "options:\n"
    "  --text FILE        the text (any bytes: both tokenizers are byte-level)\n"
    "  --json             JSON on stdout instead of a sentence\n";

int run_eval(const std::vector<std::string>& args) {
  model_options mo;
  std::string text_file;
  bool as_json = false;
  ex::flag_table f("gpt2_finetune eval", std::string(kEvalUsage) + kModelFlagsHelp);
  bind_model_flags(f, mo);
  f.bind("--text", text_file);
  f.bind("--json", as_json);
  f.parse(args);
  if (mo.model_dir.empty()) f.fail("--model DIR is required");
  if (text_file.empty()) f.fail("--text FILE is required");
  const opened_model m = open_model(mo);
  const auto& tok = m.base.tok;
  const ex::eval_result r = ex::evaluate(*m.model, tok, tok.encode(ex::read_model_text(text_file, tok)));
  if (as_json) {
    const json j = {{"tokens", r.tokens},
                    {"predicted", r.predicted},
                    {"loss_nats_per_token", r.loss()},
                    {"bits_per_byte", r.bits_per_byte()}};
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("%s: %lld tokens, %lld predicted (%lld bytes): %.6f nats/token, %.6f bits/byte\n", text_file.c_str(),
                static_cast<long long>(r.tokens), static_cast<long long>(r.predicted), static_cast<long long>(r.bytes),
                r.loss(), r.bits_per_byte());
  }
  return 0;
}

const char* kGenerateUsage =
    "usage: gpt2_finetune generate --model DIR [--adapter DIR] [--prompt TEXT] [options]\n"
    "\n"
    "Continues the prompt and prints the prompt and its continuation. Greedy (argmax) by default;\n"
    "--temperature T > 0 samples from softmax(logits / T), reproducibly for a given --seed.\n"
    "\n"
    "options:\n"
    "  --prompt TEXT      the start of the text (default: empty, i.e. <|endoftext|>)\n"
    "  --length N         tokens to generate (default 200)\n"
    "  --temperature T    0 (greedy, default) or the sampling temperature\n"
    "  --top-k K          sample among the K most likely tokens only (default: all)\n"
    "  --seed S           sampling seed (default 0)\n";

int run_generate(const std::vector<std::string>& args) {
  model_options mo;
  std::string prompt;
  ex::generate_options g;
  ex::flag_table f("gpt2_finetune generate", std::string(kGenerateUsage) + kModelFlagsHelp);
  bind_model_flags(f, mo);
  f.bind("--prompt", prompt);
  f.bind("--length", g.length, 1);
  f.bind("--temperature", g.temperature, 0);
  f.bind("--top-k", g.top_k, 0);
  f.bind("--seed", g.seed, 0);
  f.parse(args);
  if (mo.model_dir.empty()) f.fail("--model DIR is required");
  const opened_model m = open_model(mo);
  const ex::token_list ids = ex::generate(*m.model, m.base.tok.encode(prompt), g, m.base.tok);
  std::printf("%s%s\n", prompt.c_str(), ex::printable(m.base.tok.decode(ids)).c_str());
  return 0;
}

// ---------------------------------------------------------------------------------------------------
// study: the experiment

struct study_options {
  pretrain_options base;
  std::string out = std::string(kDefaultCache) + "/study";
  std::string json_path;
  std::vector<std::string> shifts = {"mild", "larger", "extreme"};
  std::vector<lora::index> ranks = {4, 16};
  std::vector<lora::quant::qtype> base_dtypes = {lora::quant::qtype::f32};  ///< LoRA runs over each
  std::vector<method> others = {method::full, method::none};
  std::vector<std::uint64_t> seeds = {0};
  std::vector<double> lr_lora = {1e-2}, lr_full = {2e-3}, lr_head = {3e-3};
  ex::train_setup train = [] {
    ex::train_setup t;
    t.steps = 100;
    t.batch = 8;
    t.context = 128;
    t.warmup = 10;
    t.curve_every = 10;
    return t;
  }();
  std::size_t eval_bytes = 16 * 1024;  ///< cap of the validation and of the test text, per shift
  std::size_t sample_length = 100;
  bool full_study = false;
  bool quiet = false;
};

const char* kStudyUsage =
    "usage: gpt2_finetune study [options]\n"
    "\n"
    "The experiment. Pretrains the built-in base once (see `pretrain --help`; cached), then for each\n"
    "shift (mild: the English categories literature, riddles, startrek, zippy, held out of pretraining;\n"
    "larger: Spanish; extreme: Russian) fine-tunes a fresh copy of the base with LoRA on c_attn, c_proj\n"
    "and c_fc (every projection of every block; alpha = 2 r) at each rank, with full fine-tuning and with\n"
    "LayerNorm+head fine-tuning, and evaluates the base as it is (none). Each method's learning rate is\n"
    "chosen on the validation text with the first seed (when a grid of several is given); every seed is\n"
    "trained at it and evaluated on the test text. Prints bits per byte (validation and test, mean +-\n"
    "sample std over seeds), trainable parameters, training-state bytes, training tokens/s and peak RSS;\n"
    "samples before and after; saves every LoRA adapter as a PEFT folder, reloads it and checks it\n"
    "(exit 1 if a check fails). Writes the splits to OUT/data/SHIFT/{train,val,test}.txt, so that\n"
    "`gpt2_finetune eval --text` reproduces the figures.\n"
    "\n"
    "default study: ranks 4,16, full, none; one seed; fixed learning rates (LoRA 1e-2, full 2e-3)\n"
    "--full-study:  ranks 1,2,4,8,16,32,64, full, norms_and_head, none; seeds 0,1,2; learning rates\n"
    "               chosen from LoRA {3e-3,1e-2,3e-2}, full {3e-4,1e-3,3e-3}, norms_and_head\n"
    "               {1e-3,3e-3,1e-2}\n"
    "\n"
    "options (after --full-study, which sets defaults, they override):\n"
    "  --full-study         the whole study (about 40 min on 2 cores)\n"
    "  --shifts S1,S2       mild, larger, extreme (default all three)\n"
    "  --ranks R1,R2        LoRA ranks\n"
    "  --base-dtypes D1,D2  LoRA at each rank over the base stored as each of f32 (default), bf16, f16,\n"
    "                       int8, nf4, nf4_dq, q8_0, q4_0 (QLoRA's question: what does a 4-bit base cost?)\n"
    "  --methods M1,M2      besides LoRA: full, norms_and_head, none\n"
    "  --seeds S1,S2        seeds (adapter initialisation and data order; the first selects the lr)\n"
    "  --lr-lora X1,X2      learning rates tried for LoRA (one value: used as given)\n"
    "  --lr-full X1,X2      the same for full fine-tuning\n"
    "  --lr-head X1,X2      the same for norms_and_head\n"
    "  --eval-bytes N       cap of each shift's validation and test text in bytes (default 16384)\n"
    "  --sample-length N    tokens per generated sample (default 100)\n"
    "  --out DIR            splits, adapters, results (default .cache/gpt2_fortunes/study)\n"
    "  --cache DIR          where the base is cached (default .cache/gpt2_fortunes; the base is DIR/base)\n"
    "  --fortunes DIR       Debian's fortune files (default /usr/share/games/fortunes)\n"
    "  --pretrain-steps N   steps of pretraining (default 1000)\n"
    "  --tiny               a tiny base (2 layers, n_embd 32, n_positions 64), for smoke tests\n"
    "  --json PATH          also write the results as JSON\n"
    "fine-tuning (defaults: 100 steps of 8 x 128 tokens, cosine after 10 warm-up steps):\n";

std::vector<method> parse_methods(const ex::flag_table& f, const std::string& v) {
  std::vector<method> out;
  for (const auto& w : f.words("--methods", v)) {
    const method m = parse_method(f, w);
    if (m == method::lora) f.fail("--methods lists the methods besides LoRA (use --ranks for LoRA)");
    out.push_back(m);
  }
  return out;
}

void parse_study(const std::vector<std::string>& args, study_options& o) {
  if (std::count(args.begin(), args.end(), "--full-study")) {
    o.full_study = true;
    o.ranks = {1, 2, 4, 8, 16, 32, 64};
    o.others = {method::full, method::norms_and_head, method::none};
    o.seeds = {0, 1, 2};
    o.lr_lora = {3e-3, 1e-2, 3e-2};
    o.lr_full = {3e-4, 1e-3, 3e-3};
    o.lr_head = {1e-3, 3e-3, 1e-2};
  }
  ex::flag_table f("gpt2_finetune study", std::string(kStudyUsage) + kTrainFlagsHelp);
  f.on("--full-study", [] {});
  f.on("--tiny", [&] {
    o.base.config.n_layer = 2;
    o.base.config.n_head = 2;
    o.base.config.n_embd = 32;
    o.base.config.n_positions = 64;
    o.train.context = 64;
    o.base.train.context = 64;
  });
  f.on("--shifts", ex::flag_table::setter([&](const std::string& v) {
         o.shifts = f.words("--shifts", v);
         for (const auto& s : o.shifts)
           if (s != "mild" && s != "larger" && s != "extreme")
             f.fail("--shifts takes mild, larger, extreme; got '" + s + "'");
       }));
  f.bind_list("--ranks", o.ranks, 1);
  f.on("--base-dtypes", ex::flag_table::setter([&](const std::string& v) {
         o.base_dtypes.clear();
         for (const auto& w : f.words("--base-dtypes", v)) o.base_dtypes.push_back(parse_base_dtype(f, w));
       }));
  f.on("--methods", ex::flag_table::setter([&](const std::string& v) { o.others = parse_methods(f, v); }));
  f.bind_list("--seeds", o.seeds, 0);
  f.bind_list("--lr-lora", o.lr_lora, 0);
  f.bind_list("--lr-full", o.lr_full, 0);
  f.bind_list("--lr-head", o.lr_head, 0);
  f.bind("--eval-bytes", o.eval_bytes, 64);
  f.bind("--sample-length", o.sample_length, 1);
  f.bind("--out", o.out);
  f.on("--cache", ex::flag_table::setter([&](const std::string& v) { o.base.out = v + "/base"; }));
  f.bind("--fortunes", o.base.fortunes);
  f.bind("--pretrain-steps", o.base.train.steps, 1);
  f.bind("--json", o.json_path);
  bind_train_flags(f, o.train);
  f.parse(args);
  o.quiet = o.train.quiet;
  o.base.fortunes = o.base.fortunes;
  o.train.context = std::min(o.train.context, o.base.config.n_positions);
}

/// One shift's text: splits as written to OUT/data/SHIFT, and their tokens.
struct shift_data {
  ex::corpus_spec spec;
  ex::corpus_splits text;
  ex::token_list train, val, test;
  std::string dir;
};

shift_data load_shift(const study_options& o, const std::string& name, const lora::models::tokenizer& tok) {
  shift_data d;
  d.spec = ex::fortune_corpus(o.base.fortunes, name);
  const std::size_t caps[3] = {0, o.eval_bytes, o.eval_bytes};
  d.text = ex::read_corpus(o.base.fortunes, d.spec, caps);
  d.dir = (fs::path(o.out) / "data" / name).string();
  ex::on_root("writing a shift's splits", [&] {
    fs::create_directories(d.dir);
    lora::io::write_file_atomically(d.dir + "/train.txt", d.text.train);
    lora::io::write_file_atomically(d.dir + "/val.txt", d.text.validation);
    lora::io::write_file_atomically(d.dir + "/test.txt", d.text.test);
  });
  d.train = tok.encode(d.text.train);
  d.val = tok.encode(d.text.validation);
  d.test = tok.encode(d.text.test);
  std::printf("shift %s: %s; %zu files; train %zu bytes (%zu records), validation %zu bytes, test %zu bytes%s\n",
              name.c_str(), d.spec.description.c_str(), d.spec.files.size(), d.text.train.size(), d.text.records[0],
              d.text.validation.size(), d.text.test.size(),
              d.text.bytes_before_cap[1] > o.eval_bytes
                  ? ex::cat(" (validation and test capped at ", o.eval_bytes, " bytes)").c_str()
                  : "");
  return d;
}

/// A method of the study: LoRA at a rank, or one of the others.
struct method_spec {
  method m = method::lora;
  lora::index rank = 0;
  lora::quant::qtype base = lora::quant::qtype::f32;  ///< LoRA: the frozen projections' storage
  std::string label() const {
    if (m != method::lora) return to_string(m);
    return base == lora::quant::qtype::f32 ? ex::cat("lora r=", rank)
                                           : ex::cat("lora r=", rank, " ", lora::quant::qtype_name(base));
  }
};

/// One method on one shift, over every seed.
struct study_row {
  std::string shift;
  method_spec spec;
  double lr = 0;
  bool lr_at_edge = false;
  std::vector<std::pair<double, double>> selection;  ///< (lr, validation bits/byte), first seed
  std::vector<double> val, test;                     ///< per seed
  std::int64_t trainable_params = 0, train_state_bytes = 0;
  std::int64_t weight_bytes = 0;                       ///< the frozen weights as stored (ex::weight_bytes)
  double tokens_per_second = 0;                        ///< of the fastest run
  double seconds = 0;                                  ///< training seconds of the fastest run
  double cpu_seconds = 0;                              ///< its process CPU time
  std::uint64_t peak_rss = 0;                          ///< the largest of the runs
  std::vector<std::pair<std::int64_t, double>> curve;  ///< first seed, chosen lr
  std::vector<json> checks;                            ///< LoRA: one per seed
};

/// A trained model and its figures.
struct trained {
  std::unique_ptr<ex::lm> model;
  ex::train_outcome outcome;
  std::int64_t weight_bytes = 0;
  double val = 0;
  std::uint64_t peak_rss = 0;
};

trained train_run(const ex::base_model& base, const method_spec& ms, double lr, std::uint64_t seed, const shift_data& d,
                  const study_options& o, const std::string& label) {
  finetune_spec spec;
  spec.m = ms.m;
  spec.rank = ms.rank;
  spec.seed = seed;
  spec.base = ms.base;
  ex::train_setup t = o.train;
  t.lr = lr;
  t.seed = 1000 * seed + 7;
  t.label = label;
  t.quiet = o.quiet;
  ex::reset_peak_rss();
  trained r;
  r.model = make_model(ex::clone_weights(base.weights), spec);
  r.weight_bytes = ex::weight_bytes(*r.model);
  r.outcome = ex::train_lm(*r.model, d.train, t);
  r.val = ex::evaluate(*r.model, base.tok, d.val).bits_per_byte();
  r.peak_rss = ex::peak_rss_bytes();
  return r;
}

/// Saves the adapter of `run` as a PEFT folder in `dir`, loads it onto a fresh copy of the base (stored
/// as the run's base was), and checks: the reloaded model's nats on the first test windows equal the
/// trained model's, and merging moves the logits of the first window by at most 1e-4 of their largest
/// magnitude. Over a quantized base a merge re-quantizes and cannot meet that: there the check is that
/// unmerging gives the reloaded nats back exactly, and the merge's error is reported.
json check_adapter(const trained& run, const ex::base_model& base, const shift_data& d, const std::string& dir) {
  ex::on_root("saving an adapter", [&] { adapter_of(*run.model, base.dir).save(dir); });  // then all reload it
  auto fresh = std::make_unique<ex::lm>(ex::clone_weights(base.weights));
  const lora::quant::qtype storage = run.model->base_storage();
  fresh->set_base_storage(storage);
  const lora::io::peft_adapter loaded = ex::attach_adapter(*fresh, dir);
  fresh->train(false);
  constexpr std::size_t windows = 4;
  const double trained_nats = ex::evaluate(*run.model, base.tok, d.test, windows).nats;
  const double reloaded_nats = ex::evaluate(*fresh, base.tok, d.test, windows).nats;
  const lora::matrix<float> unmerged = ex::first_window_logits(*fresh, d.test);
  fresh->merge();
  const double merged_nats = ex::evaluate(*fresh, base.tok, d.test, windows).nats;
  const lora::matrix<float> merged = ex::first_window_logits(*fresh, d.test);
  const double logit_rel = static_cast<double>((merged - unmerged).cwiseAbs().maxCoeff()) /
                           std::max(1e-30, static_cast<double>(unmerged.cwiseAbs().maxCoeff()));
  json out = {{"path", dir},
              {"modules", loaded.modules.size()},
              {"trained_nats", trained_nats},
              {"reloaded_nats", reloaded_nats},
              {"merged_nats", merged_nats},
              {"merged_logit_max_rel_diff", logit_rel}};
  if (storage != lora::quant::qtype::f32) {
    lora::quant::requant_error worst;
    for (const auto& [path, layer] : fresh->named_layers()) worst.absorb(layer->merge_error());
    fresh->unmerge();
    const double unmerged_nats = ex::evaluate(*fresh, base.tok, d.test, windows).nats;
    out["merge_rel_rms_output_worst_layer"] = worst.rel_rms_output;
    out["unmerged_nats"] = unmerged_nats;
    out["ok"] = reloaded_nats == trained_nats && unmerged_nats == reloaded_nats;
    return out;
  }
  out["ok"] = reloaded_nats == trained_nats && logit_rel <= 1e-4 &&
              std::abs(merged_nats - reloaded_nats) <= 1e-4 * std::abs(reloaded_nats);
  return out;
}

/// Mean and sample standard deviation (NaN for fewer than two values).
std::pair<double, double> mean_std(const std::vector<double>& v) {
  if (v.empty()) return {std::nan(""), std::nan("")};
  const double n = static_cast<double>(v.size());
  const double mean = std::accumulate(v.begin(), v.end(), 0.0) / n;
  double ss = 0;
  for (double x : v) ss += (x - mean) * (x - mean);
  return {mean, v.size() > 1 ? std::sqrt(ss / (n - 1)) : std::nan("")};
}

std::string pm(const std::vector<double>& v) {
  const auto [m, s] = mean_std(v);
  char buf[48];
  if (std::isnan(s))
    std::snprintf(buf, sizeof buf, "%.4f", m);
  else
    std::snprintf(buf, sizeof buf, "%.4f ± %.4f", m, s);
  return buf;
}

/// Everything the study produced.
struct study_state {
  std::vector<study_row> rows;
  json samples = json::array();
  json shifts = json::array();
  bool checks_ok = true;
};

/// Samples from `model` for the shift's prompts: greedy and sampled (temperature 0.8, top-k 40, seed 1).
void add_samples(study_state& st, const std::string& shift, const std::string& who, const ex::lm& model,
                 const lora::models::tokenizer& tok, const study_options& o) {
  static const std::map<std::string, std::vector<std::string>> prompts = {{"mild", {"Kirk: ", "Q: What do you get"}},
                                                                          {"larger", {"El amor es ", "La vida "}},
                                                                          {"extreme", {"Любовь — это ", "Жизнь "}}};
  for (const auto& prompt : prompts.at(shift)) {
    for (const bool greedy : {true, false}) {
      ex::generate_options g;
      g.length = o.sample_length;
      g.temperature = greedy ? 0.0 : 0.8;
      g.top_k = greedy ? 0 : 40;
      g.seed = 1;
      const std::string text = ex::printable(tok.decode(ex::generate(model, tok.encode(prompt), g, tok)));
      st.samples.push_back({{"shift", shift},
                            {"model", who},
                            {"prompt", prompt},
                            {"mode", greedy ? "greedy" : "sampled"},
                            {"temperature", g.temperature},
                            {"top_k", g.top_k},
                            {"seed", g.seed},
                            {"text", text}});
    }
  }
}

/// Trains one method on one shift: the rate chosen on the first seed, then every further seed; samples
/// the first seed's model. `plain` is the base model (method none). Each model is dropped after its
/// run, so a run's peak RSS is its own (plus the base and the data).
study_row run_method(const ex::base_model& base, const method_spec& ms, const shift_data& d, const std::string& shift,
                     const study_options& o, study_state& st, const ex::lm& plain) {
  study_row row;
  row.shift = shift;
  row.spec = ms;
  if (ms.m == method::none) {
    ex::reset_peak_rss();
    row.val.assign(1, ex::evaluate(plain, base.tok, d.val).bits_per_byte());  // no seed: one value
    row.test.assign(1, ex::evaluate(plain, base.tok, d.test).bits_per_byte());
    row.peak_rss = ex::peak_rss_bytes();
    return row;
  }
  std::vector<double> grid = ms.m == method::lora ? o.lr_lora : ms.m == method::full ? o.lr_full : o.lr_head;
  std::sort(grid.begin(), grid.end());
  const auto note = [&](const trained& r) {
    row.trainable_params = r.outcome.trainable_params;
    row.weight_bytes = r.weight_bytes;
    row.train_state_bytes = r.outcome.train_state_bytes;
    if (row.tokens_per_second < r.outcome.tokens_per_second()) {
      row.tokens_per_second = r.outcome.tokens_per_second();
      row.seconds = r.outcome.seconds;
      row.cpu_seconds = r.outcome.cpu_seconds;
    }
    row.peak_rss = std::max(row.peak_rss, r.peak_rss);
  };
  trained chosen;
  for (std::size_t k = 0; k < grid.size(); ++k) {
    trained r = train_run(base, ms, grid[k], o.seeds[0], d, o, ex::cat(shift, " ", ms.label(), " lr ", grid[k]));
    note(r);
    if (grid.size() > 1) row.selection.emplace_back(grid[k], r.val);
    if (k == 0 || r.val < chosen.val) {
      chosen = std::move(r);
      row.lr = grid[k];
      row.lr_at_edge = grid.size() >= 3 && (k == 0 || k + 1 == grid.size());
    }
  }
  for (std::size_t s = 0; s < o.seeds.size(); ++s) {
    trained r =
        s == 0 ? std::move(chosen)
               : train_run(base, ms, row.lr, o.seeds[s], d, o, ex::cat(shift, " ", ms.label(), " seed ", o.seeds[s]));
    if (s > 0) note(r);
    row.val.push_back(r.val);
    row.test.push_back(ex::evaluate(*r.model, base.tok, d.test).bits_per_byte());
    if (s == 0) row.curve = r.outcome.curve;
    if (ms.m == method::lora) {
      const std::string dir =
          (fs::path(o.out) / "adapters" / shift /
           ex::cat("lora_r", ms.rank,
                   ms.base == lora::quant::qtype::f32 ? "" : ex::cat("_", lora::quant::qtype_name(ms.base)), "_seed",
                   o.seeds[s]))
              .string();
      json c = check_adapter(r, base, d, dir);
      c["seed"] = o.seeds[s];
      st.checks_ok = st.checks_ok && c["ok"].get<bool>();
      row.checks.push_back(std::move(c));
    }
    if (s == 0) add_samples(st, shift, ms.label(), *r.model, base.tok, o);
  }
  return row;
}

void print_row(const study_row& r) {
  std::string tried;
  for (const auto& [lr, val] : r.selection)
    tried += ex::cat("  ", lr, lr == r.lr ? "*" : "", " ", std::round(val * 1e4) / 1e4);
  std::printf("  %-16s val %s  test %s bits/byte%s%s\n", r.spec.label().c_str(), pm(r.val).c_str(), pm(r.test).c_str(),
              r.spec.m == method::none ? "" : ex::cat("  (lr ", r.lr, ")").c_str(),
              tried.empty() ? "" : ("  val by lr:" + tried).c_str());
  for (const auto& c : r.checks)
    if (!c["ok"].get<bool>()) std::printf("  ADAPTER CHECK FAILED: %s\n", c.dump().c_str());
}

/// All methods on one shift, then samples of the base, the best LoRA (by validation) and full.
void run_shift(const ex::base_model& base, const std::string& name, const study_options& o, study_state& st) {
  const shift_data d = load_shift(o, name, base.tok);
  st.shifts.push_back({{"name", name},
                       {"description", d.spec.description},
                       {"files", d.spec.files.size()},
                       {"records", {d.text.records[0], d.text.records[1], d.text.records[2]}},
                       {"bytes", {d.text.train.size(), d.text.validation.size(), d.text.test.size()}},
                       {"split_files", {d.dir + "/train.txt", d.dir + "/val.txt", d.dir + "/test.txt"}}});
  std::vector<method_spec> specs;
  for (lora::index r : o.ranks)
    for (lora::quant::qtype t : o.base_dtypes) specs.push_back({method::lora, r, t});
  for (method m : o.others) specs.push_back({m, 0});
  auto plain = std::make_unique<ex::lm>(ex::clone_weights(base.weights));
  plain->train(false);
  add_samples(st, name, "base", *plain, base.tok, o);
  std::string best_lora;
  double best_val = 1e300;
  for (const auto& ms : specs) {
    study_row row = run_method(base, ms, d, name, o, st, *plain);
    print_row(row);
    if (ms.m == method::lora && mean_std(row.val).first < best_val) {
      best_val = mean_std(row.val).first;
      best_lora = ms.label();
    }
    st.rows.push_back(std::move(row));
  }
  std::printf("  samples (greedy; sampled at temperature 0.8, top-k 40, seed 1; '|' is a newline):\n");
  for (const auto& sample : st.samples) {
    const std::string who = sample["model"].get<std::string>();
    if (sample["shift"] != name || (who != "base" && who != best_lora && who != "full")) continue;
    std::string shown = sample["prompt"].get<std::string>() + sample["text"].get<std::string>();
    std::replace(shown.begin(), shown.end(), '\n', '|');
    std::printf("    %-14s %-7s %s\n", who.c_str(), sample["mode"].get<std::string>().c_str(), shown.c_str());
  }
  std::printf("\n");
}

void print_table(const study_state& st, const study_options& o) {
  std::printf("%-8s %-16s %7s %9s %18s %10s %11s %9s %9s %9s\n", "shift", "method", "lr", "val bpb", "test bpb",
              "trainable", "train state", "weights", "tokens/s", "peak RSS");
  bool edge = false;
  for (const auto& r : st.rows) {
    edge = edge || r.lr_at_edge;
    const std::string lr = r.spec.m == method::none ? "-" : ex::cat(r.lr, r.lr_at_edge ? "*" : "");
    std::printf("%-8s %-16s %7s %9.4f %18s %10lld %11s %9s %9.0f %9s\n", r.shift.c_str(), r.spec.label().c_str(),
                lr.c_str(), mean_std(r.val).first, pm(r.test).c_str(), static_cast<long long>(r.trainable_params),
                human_bytes(static_cast<double>(r.train_state_bytes)).c_str(),
                r.weight_bytes > 0 ? human_bytes(static_cast<double>(r.weight_bytes)).c_str() : "-",
                r.tokens_per_second, human_bytes(static_cast<double>(r.peak_rss)).c_str());
  }
  std::string seeds;
  for (auto s : o.seeds) seeds += ex::cat(seeds.empty() ? "" : ",", s);
  std::printf(
      "bits per byte (bpb) on each shift's validation and test text; test: mean%s over seeds %s. lr: %s.\n"
      "fine-tuning: %lld steps of %lld x %lld tokens, AdamW, %s schedule; weights: the frozen weights as stored;\n"
      "tokens/s: training, fastest run; peak RSS:\n"
      "the process's high-water mark during the run (base and data included).\n",
      o.seeds.size() > 1 ? " ± sample std" : "", seeds.c_str(),
      (o.lr_lora.size() > 1 || o.lr_full.size() > 1 || o.lr_head.size() > 1)
          ? ex::cat("chosen on validation with seed ", o.seeds[0]).c_str()
          : "fixed (no selection: one rate per method)",
      static_cast<long long>(o.train.steps), static_cast<long long>(o.train.batch * o.train.accum),
      static_cast<long long>(o.train.context), ex::to_string(o.train.schedule));
  if (edge) std::printf("* the chosen rate is at the edge of its grid\n");
}

std::vector<std::string> dtype_names(const std::vector<lora::quant::qtype>& types) {
  std::vector<std::string> out;
  for (auto t : types) out.emplace_back(lora::quant::qtype_name(t));
  return out;
}

json series_json(const std::vector<double>& v) {
  const auto [m, s] = mean_std(v);
  return {{"mean", m}, {"std", std::isnan(s) ? json() : json(s)}, {"per_seed", v}};
}

/// The JSON of --json:
///   {"config": {...}, "base": pretrain.json of the base, "shifts": [{"name", "description", "files",
///    "records": [train, val, test], "bytes": [...], "split_files": [...]}],
///    "results": [{"shift", "method", "rank", "lr", "lr_at_edge", "selection": [{"lr",
///      "val_bits_per_byte"}], "val_bits_per_byte": {"mean", "std" (null for one seed), "per_seed"},
///      "test_bits_per_byte": {...}, "trainable_params", "train_state_bytes", "tokens_per_second",
///      "train_seconds", "train_cpu_seconds", "peak_rss_bytes",
///      "curve": [[step, training loss in nats/token], ...], "adapter_checks": [...]}],
///    "samples": [{"shift", "model", "prompt", "mode", "temperature", "top_k", "seed", "text"}],
///    "checks_ok", "seconds"}
json study_json(const study_state& st, const study_options& o, const json& base_info, double seconds) {
  json cfg = {{"shifts", o.shifts},
              {"ranks", o.ranks},
              {"base_dtypes", dtype_names(o.base_dtypes)},
              {"seeds", o.seeds},
              {"lr_grid", {{"lora", o.lr_lora}, {"full", o.lr_full}, {"norms_and_head", o.lr_head}}},
              {"steps", o.train.steps},
              {"batch", o.train.batch},
              {"accum", o.train.accum},
              {"context", o.train.context},
              {"schedule", ex::to_string(o.train.schedule)},
              {"warmup", o.train.warmup},
              {"alpha_over_rank", 2.0},
              {"targets", {"c_attn", "c_proj", "c_fc"}},
              {"eval_bytes_cap", o.eval_bytes},
              {"full_study", o.full_study}};
  json results = json::array();
  for (const auto& r : st.rows) {
    json sel = json::array();
    for (const auto& [lr, v] : r.selection) sel.push_back({{"lr", lr}, {"val_bits_per_byte", v}});
    results.push_back({{"shift", r.shift},
                       {"method", to_string(r.spec.m)},
                       {"rank", r.spec.rank},
                       {"base_dtype", lora::quant::qtype_name(r.spec.base)},
                       {"weight_bytes", r.weight_bytes},
                       {"lr", r.lr},
                       {"lr_at_edge", r.lr_at_edge},
                       {"selection", sel},
                       {"val_bits_per_byte", series_json(r.val)},
                       {"test_bits_per_byte", series_json(r.test)},
                       {"trainable_params", r.trainable_params},
                       {"train_state_bytes", r.train_state_bytes},
                       {"tokens_per_second", r.tokens_per_second},
                       {"train_seconds", r.seconds},
                       {"train_cpu_seconds", r.cpu_seconds},
                       {"peak_rss_bytes", r.peak_rss},
                       {"curve", r.curve},
                       {"adapter_checks", r.checks}});
  }
  return {{"config", cfg},         {"base", base_info},         {"shifts", st.shifts}, {"results", results},
          {"samples", st.samples}, {"checks_ok", st.checks_ok}, {"seconds", seconds}};
}

int run_study(const std::vector<std::string>& args) {
  study_options o;
  parse_study(args, o);
  const auto start = std::chrono::steady_clock::now();
  const json base_info = ensure_base(o.base, o.quiet);
  const ex::base_model base = ex::load_base_model(o.base.out);
  std::printf("\n%s study: LoRA ranks", o.full_study ? "full" : "default");
  for (auto r : o.ranks) std::printf(" %lld", static_cast<long long>(r));
  for (auto m : o.others) std::printf(", %s", to_string(m));
  std::printf("; %zu seed(s)\n\n", o.seeds.size());
  study_state st;
  for (const auto& s : o.shifts) run_shift(base, s, o, st);
  print_table(st, o);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!o.json_path.empty()) {
    ex::on_root("writing the results", [&] {
      lora::io::write_file_atomically(o.json_path, study_json(st, o, base_info, seconds).dump(2) + "\n");
    });
    std::printf("results written to %s\n", o.json_path.c_str());
  }
  std::printf("adapters saved under %s/adapters: reloaded and merged checks %s\n", o.out.c_str(),
              st.checks_ok ? "all passed" : "FAILED");
  std::printf("total %s (%s of CPU time)\n", ex::format_duration(seconds).c_str(),
              ex::format_duration(static_cast<double>(std::clock()) / CLOCKS_PER_SEC).c_str());
  return st.checks_ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  // Under mpirun with several ranks only: data-parallel training (docs/CONVENTIONS.md §dist).
  ex::start_dist(&argc, &argv);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  if (argc < 2) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  const std::string verb = argv[1];
  if (verb == "--help" || verb == "-h" || verb == "help") {
    std::fputs(kUsage, stdout);
    return 0;
  }
  const std::vector<std::string> args = args_from(argc, argv, 2);
  try {
    if (verb == "pretrain") return run_pretrain(args);
    if (verb == "finetune") return run_finetune(args);
    if (verb == "eval") return run_eval(args);
    if (verb == "generate") return run_generate(args);
    if (verb == "study") return run_study(args);
  } catch (const std::exception& e) {
    return ex::fail_job(ex::cat(kProgram, " ", verb, ": ", e.what()), 1);
  }
  std::fprintf(stderr, "%s: unknown verb '%s' (try --help)\n", kProgram, verb.c_str());
  return 2;
}
