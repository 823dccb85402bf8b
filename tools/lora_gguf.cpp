// lora-gguf: GPT-2 models and LoRA adapters between Hugging Face / PEFT folders and llama.cpp's GGUF files,
// both ways for adapters (docs/CONVENTIONS.md §gguf). The logic is <lora/models/gpt2_gguf.hpp> and
// <lora/io/gguf_lora.hpp>; this is the CLI.
//
//   lora-gguf model   HF_DIR   --out model.gguf   [--type f32|f16|bf16|q8_0|q4_0]
//   lora-gguf adapter PEFT_DIR --base HF_DIR|model.gguf --out adapter.gguf [--type f32|f16|bf16|q8_0]
//   lora-gguf to-peft adapter.gguf --base model.gguf|HF_DIR --out PEFT_DIR
//   lora-gguf to-hf   model.gguf --out HF_DIR
//   lora-gguf info FILE.gguf
#include <cstdio>
#include <exception>
#include <filesystem>
#include <lora/io/gguf.hpp>
#include <lora/io/gguf_lora.hpp>
#include <lora/io/peft.hpp>
#include <lora/models/gpt2_gguf.hpp>
#include <map>
#include <string>
#include <vector>

#include "cli.hpp"

namespace {

namespace io = lora::io;
namespace models = lora::models;
using lora_cli::usage_error;

const char* const usage =
    "usage: lora-gguf VERB ...  (lora-gguf VERB --help for one verb)\n"
    "\n"
    "  lora-gguf model   HF_DIR --out MODEL.gguf [--type f32|f16|bf16|q8_0|q4_0]\n"
    "      A Hugging Face GPT-2 folder (config.json, model.safetensors; vocab.json + merges.txt, or none for\n"
    "      the 257-token byte vocabulary) as a GGUF model llama.cpp loads, tokenizer included. Matrices are\n"
    "      stored in --type (default f32), vectors in f32.\n"
    "  lora-gguf adapter PEFT_DIR --base HF_DIR|MODEL.gguf --out ADAPTER.gguf [--type f32|f16|bf16|q8_0]\n"
    "      A PEFT LoRA adapter on GPT-2 as a llama.cpp LoRA adapter. Each module's scaling (rsLoRA, rank and\n"
    "      alpha patterns) is kept: what one adapter.lora.alpha cannot express is folded into lora_b, and\n"
    "      the modules concerned are listed. DoRA, lora_B biases and modules_to_save are refused (merge\n"
    "      those with lora-merge instead).\n"
    "  lora-gguf to-peft ADAPTER.gguf --base MODEL.gguf|HF_DIR --out PEFT_DIR\n"
    "      A llama.cpp LoRA adapter for GPT-2 as a PEFT adapter folder, checked against the base, to load,\n"
    "      train further or merge here (or in PEFT).\n"
    "  lora-gguf to-hf MODEL.gguf --out HF_DIR\n"
    "      A GPT-2 GGUF model (any of the types above, dequantized) as a Hugging Face folder: config.json,\n"
    "      model.safetensors (f32), vocab.json + merges.txt for a BPE vocabulary; gpt2_finetune trains on it.\n"
    "  lora-gguf info FILE.gguf\n"
    "      The metadata and tensors of any GGUF file.\n"
    "\n"
    "Every file is written atomically. Errors: one line on stderr, exit status 1 (2 for usage mistakes).\n";

/// Flags of every verb: the one positional argument, then --flag value pairs.
struct arguments {
  std::string verb, input, base, out, type;
  bool help = false;
};

arguments parse(int argc, char** argv) {
  arguments a;
  if (argc < 2) throw usage_error{"a verb is required: model, adapter, to-peft, to-hf or info"};
  a.verb = argv[1];
  if (a.verb == "--help" || a.verb == "-h") {
    a.help = true;
    return a;
  }
  for (int i = 2; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&] { return lora_cli::flag_value(argc, argv, i); };
    if (flag == "--help" || flag == "-h") {
      a.help = true;
    } else if (flag == "--base") {
      a.base = value();
    } else if (flag == "--out") {
      a.out = value();
    } else if (flag == "--type") {
      a.type = value();
    } else if (!flag.empty() && flag[0] == '-') {
      throw usage_error{"unknown flag '" + flag + "'"};
    } else if (a.input.empty()) {
      a.input = flag;
    } else {
      throw usage_error{"unexpected argument '" + flag + "'"};
    }
  }
  return a;
}

void require(const arguments& a, bool base, bool out) {
  if (a.input.empty()) throw usage_error{"lora-gguf " + a.verb + " needs an input"};
  if (base && a.base.empty()) throw usage_error{"lora-gguf " + a.verb + " needs --base"};
  if (out && a.out.empty()) throw usage_error{"lora-gguf " + a.verb + " needs --out"};
}

/// The usage text of one verb: its block of the whole text.
std::string verb_usage(const std::string& verb) {
  const std::string all = usage;
  const std::size_t at = all.find("  lora-gguf " + verb + " ");
  if (at == std::string::npos) return all;
  const std::size_t end = all.find("\n  lora-gguf ", at + 1);
  const std::size_t stop = end == std::string::npos ? all.find("\n\n", at) : end;
  return "usage:" + all.substr(at + 1, stop - at) + "\n";
}

int do_model(const arguments& a) {
  require(a, false, true);
  models::gpt2_gguf_options options;
  if (!a.type.empty()) options.type = io::parse_ggml_type(a.type);
  options.name = std::filesystem::path(a.input).filename().string();
  models::convert_gpt2_to_gguf(a.input, a.out, options);
  const io::gguf_file f = io::gguf_file::open(a.out);
  std::printf("wrote %s: GPT-2, %u layers, d %u, vocabulary %zu (%s), %zu tensors, matrices %s\n", a.out.c_str(),
              f.get<std::uint32_t>("gpt2.block_count"), f.get<std::uint32_t>("gpt2.embedding_length"),
              f.value("tokenizer.ggml.tokens").strings().size(), f.get_string("tokenizer.ggml.pre").c_str(),
              f.tensors().size(), io::ggml_type_name(options.type));
  return 0;
}

/// The config of a base given as a HF folder or a GGUF model.
models::gpt2_config base_config(const std::string& base) {
  if (io::is_gguf_file(base)) return models::read_gpt2_gguf_config(io::gguf_file::open(base));
  return models::read_gpt2_config(base + "/config.json");
}

int do_adapter(const arguments& a) {
  require(a, true, true);
  const io::peft_adapter adapter = io::peft_adapter::load(a.input);
  const auto modules = models::gpt2_peft_to_gguf_modules(adapter, base_config(a.base));
  const io::ggml_type type = a.type.empty() ? io::ggml_type::f32 : io::parse_ggml_type(a.type);
  if (type == io::ggml_type::q4_0)  // as llama.cpp's own converter: 4-bit factors lose too much
    throw usage_error{"lora-gguf adapter --type must be f32, f16, bf16 or q8_0, got 'q4_0'"};
  const io::gguf_lora_write_report r = io::write_gguf_lora(a.out, "gpt2", modules, type, a.input);
  std::printf("wrote %s: %zu LoRA modules (%zu tensors, %s), adapter.lora.alpha %g\n", a.out.c_str(), modules.size(),
              r.tensors, io::ggml_type_name(type), r.alpha);
  if (!r.folded.empty()) {
    std::printf("folded into lora_b (llama.cpp applies one alpha / r; these modules' scaling differs):");
    for (const auto& m : r.folded) std::printf(" %s", m.c_str());
    std::printf("\n");
  }
  return 0;
}

int do_to_peft(const arguments& a) {
  require(a, true, true);
  const io::gguf_file file = io::gguf_file::open(a.input);
  io::gguf_lora_adapter lora;
  io::peft_adapter peft;
  if (io::is_gguf_file(a.base)) {
    const io::gguf_file base = io::gguf_file::open(a.base);
    lora = io::read_gguf_lora(file, &base);
    peft = models::gpt2_gguf_lora_to_peft(lora, a.base);
  } else {
    lora = io::read_gguf_lora(file, nullptr);
    peft = models::gpt2_gguf_lora_to_peft(lora, a.base);
    (void)models::gpt2_peft_to_gguf_modules(peft, base_config(a.base));  // checks every shape against the base
  }
  peft.save(a.out);
  std::printf("wrote %s: %zu LoRA modules, r %lld, lora_alpha %g%s\n", a.out.c_str(), peft.modules.size(),
              static_cast<long long>(peft.config.r), peft.config.lora_alpha,
              peft.config.rank_pattern.empty() && peft.config.alpha_pattern.empty() ? "" : " (with patterns)");
  for (const auto& t : lora.ignored) std::printf("ignored %s (llama.cpp ignores LoRA on norms)\n", t.c_str());
  return 0;
}

int do_to_hf(const arguments& a) {
  require(a, false, true);
  models::convert_gguf_to_gpt2(a.input, a.out);
  const models::gpt2_config c = models::read_gpt2_config(a.out + "/config.json");
  std::printf("wrote %s: GPT-2, %lld layers, d %lld, vocabulary %lld\n", a.out.c_str(),
              static_cast<long long>(c.n_layer), static_cast<long long>(c.n_embd),
              static_cast<long long>(c.vocab_size));
  return 0;
}

int do_info(const arguments& a) {
  require(a, false, false);
  const io::gguf_file f = io::gguf_file::open(a.input);
  std::printf("%s: GGUF v%u, %zu metadata keys, %zu tensors, alignment %u, data at byte %llu\n", a.input.c_str(),
              f.version(), f.metadata().size(), f.tensors().size(), f.alignment(),
              static_cast<unsigned long long>(f.data_offset()));
  for (const auto& [key, value] : f.metadata())
    std::printf("  %-40s %s\n", key.c_str(), value.to_display_string().c_str());
  std::map<std::string, std::uint64_t> bytes_by_type;
  for (const auto& t : f.tensors()) {
    std::printf("  %-40s %-5s %s\n", t.name.c_str(), io::ggml_type_name(t.type),
                io::detail::shape_to_string(t.shape()).c_str());
    bytes_by_type[io::ggml_type_name(t.type)] += t.byte_size;
  }
  for (const auto& [type, bytes] : bytes_by_type)
    std::printf("%s: %llu bytes\n", type.c_str(), static_cast<unsigned long long>(bytes));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  arguments args;
  try {
    args = parse(argc, argv);
  } catch (const usage_error& e) {
    lora_cli::print_error("lora-gguf", e.message + " (see --help)");
    return 2;
  }
  if (args.help) {
    std::fputs(args.verb == "--help" || args.verb == "-h" ? usage : verb_usage(args.verb).c_str(), stdout);
    return 0;
  }
  try {
    if (args.verb == "model") return do_model(args);
    if (args.verb == "adapter") return do_adapter(args);
    if (args.verb == "to-peft") return do_to_peft(args);
    if (args.verb == "to-hf") return do_to_hf(args);
    if (args.verb == "info") return do_info(args);
    lora_cli::print_error("lora-gguf",
                          "unknown verb '" + args.verb + "' (expected model, adapter, to-peft, to-hf or info)");
    return 2;
  } catch (const usage_error& e) {
    lora_cli::print_error("lora-gguf", e.message + " (see --help)");
    return 2;
  } catch (const std::exception& e) {
    lora_cli::print_error("lora-gguf", e.what());
    return 1;
  }
}
