// lora-merge: folds a PEFT LoRA adapter into a safetensors checkpoint, as PEFT's merge_and_unload does,
// without Python: fan_in_fan_out (GPT-2 Conv1D), rsLoRA, rank/alpha patterns, DoRA, lora_B.bias and
// modules_to_save are honoured, and adapter module names are matched to base tensor names across a
// leading prefix. The logic is lora::io::merge_checkpoint (<lora/io/merge.hpp>); this is the CLI.
//
//   lora-merge --base model.safetensors --adapter my-adapter/ --out merged.safetensors [--scale 1]
//              [--dtype keep|f32|f16|bf16] [--quiet]
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <lora/io/gguf.hpp>
#include <lora/io/gguf_lora.hpp>
#include <lora/io/merge.hpp>
#include <lora/models/gpt2_gguf.hpp>
#include <string>
#include <vector>

#include "cli.hpp"

namespace {

using lora_cli::usage_error;

const char* const usage =
    "usage: lora-merge --base MODEL.safetensors --adapter ADAPTER_DIR --out OUT.safetensors\n"
    "                  [--scale S] [--dtype keep|f32|f16|bf16] [--quiet]\n"
    "       lora-merge --base MODEL.gguf --adapter ADAPTER_DIR|ADAPTER.gguf --out OUT.gguf\n"
    "                  [--scale S] [--dtype keep|f32|f16|bf16|q8_0|q4_0] [--quiet]\n"
    "\n"
    "Merges a Hugging Face PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) into a\n"
    "safetensors checkpoint: W += s * B A for every adapted module (transposed with fan_in_fan_out),\n"
    "DoRA magnitudes, lora_B biases, modules_to_save replacements. Other tensors and the metadata are\n"
    "copied unchanged. Adapter module names are matched to base tensors by their longest common dotted\n"
    "suffix (e.g. transformer.h.0.attn.c_attn -> h.0.attn.c_attn.weight); ambiguous or missing matches\n"
    "are errors. The output is written atomically.\n"
    "\n"
    "A GGUF base (llama.cpp's format, recognised by its magic) takes a llama.cpp LoRA adapter (.gguf) or,\n"
    "for GPT-2, a PEFT adapter; each adapted tensor is dequantized, merged in double and stored again in\n"
    "its own type (keep) or the chosen one; everything else is copied byte for byte.\n"
    "\n"
    "  --base PATH     the base checkpoint (safetensors)\n"
    "  --adapter DIR   the PEFT adapter directory\n"
    "  --out PATH      the merged checkpoint to write (may be the base path)\n"
    "  --scale S       multiplies every module's scaling (default 1)\n"
    "  --dtype D       keep (default: each tensor's own dtype, untouched tensors byte-identical), or\n"
    "                  f32 | f16 | bf16 for every floating-point tensor (GGUF: every merged tensor,\n"
    "                  also q8_0 | q4_0)\n"
    "  --quiet         no progress bar\n"
    "  --help          this text\n";

struct arguments {
  std::string base, adapter, out;
  lora::io::merge_options options;
  std::string dtype = "keep";
  bool quiet = false;
  bool help = false;
};

arguments parse(int argc, char** argv) {
  arguments a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&] { return lora_cli::flag_value(argc, argv, i); };
    if (flag == "--help" || flag == "-h") {
      a.help = true;
    } else if (flag == "--base") {
      a.base = value();
    } else if (flag == "--adapter") {
      a.adapter = value();
    } else if (flag == "--out") {
      a.out = value();
    } else if (flag == "--scale") {
      a.options.scale = lora_cli::parse_number(flag, value());
    } else if (flag == "--dtype") {
      a.dtype = value();
    } else if (flag == "--quiet") {
      a.quiet = true;
    } else {
      throw usage_error{"unknown argument '" + flag + "'"};
    }
  }
  if (a.help) return a;
  if (a.base.empty()) throw usage_error{"--base is required"};
  if (a.adapter.empty()) throw usage_error{"--adapter is required"};
  if (a.out.empty()) throw usage_error{"--out is required"};
  const bool gguf = lora::io::is_gguf_file(a.base);
  if (!gguf && lora::io::is_gguf_file(a.adapter))
    throw usage_error{"a GGUF adapter needs a GGUF base (or convert it: lora-gguf to-peft)"};
  if (a.dtype == "f32" || a.dtype == "f16" || a.dtype == "bf16") {
    a.options.out_dtype = lora::io::parse_dtype(a.dtype == "f32" ? "F32" : a.dtype == "f16" ? "F16" : "BF16");
  } else if (a.dtype != "keep" && !(gguf && (a.dtype == "q8_0" || a.dtype == "q4_0"))) {
    throw usage_error{"--dtype must be keep, f32, f16 or bf16" + std::string(gguf ? ", q8_0 or q4_0" : "") + ", got '" +
                      a.dtype + "'"};
  }
  return a;
}

/// A GGUF base: the adapter is a llama.cpp LoRA GGUF, or a PEFT adapter on GPT-2.
int merge_gguf(const arguments& args, lora_cli::tensor_bar& bar) {
  namespace io = lora::io;
  const io::gguf_file base = io::gguf_file::open(args.base);
  std::vector<io::gguf_lora_module> modules;
  if (io::is_gguf_file(args.adapter)) {
    modules = io::read_gguf_lora(io::gguf_file::open(args.adapter), &base).modules;
  } else {
    const io::peft_adapter adapter = io::peft_adapter::load(args.adapter);
    if (adapter.config.use_dora || !adapter.full_tensors.empty() || adapter.config.lora_bias)
      throw lora::config_error(
          "merging into a GGUF base takes plain LoRA factors; this adapter has DoRA magnitudes, lora_B biases or "
          "modules_to_save tensors: merge it into the safetensors checkpoint (lora-merge --base "
          "model.safetensors) and convert the result with lora-gguf model");
    modules = lora::models::gpt2_peft_to_gguf_modules(adapter, lora::models::read_gpt2_gguf_config(base));
  }
  io::gguf_merge_options options;
  options.scale = args.options.scale;
  if (args.dtype != "keep") options.out_type = io::parse_ggml_type(args.dtype);
  options.progress = [&](std::size_t done, std::size_t total, const std::string&) { bar.update(done, total); };
  const io::gguf_merge_report report = io::merge_gguf(base, modules, args.out, options);
  std::printf("merged %zu LoRA modules into %zu tensors, copied %zu unchanged: %zu tensors in %s\n", modules.size(),
              report.merged.size(), report.copied, report.merged.size() + report.copied, args.out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  arguments args;
  try {
    args = parse(argc, argv);
  } catch (const usage_error& e) {
    lora_cli::print_error("lora-merge", e.message + " (see --help)");
    return 2;
  }
  if (args.help) {
    std::fputs(usage, stdout);
    return 0;
  }
  try {
    lora_cli::tensor_bar bar(!args.quiet);
    args.options.progress = [&](std::size_t done, std::size_t total, const std::string&) { bar.update(done, total); };
    if (lora::io::is_gguf_file(args.base)) return merge_gguf(args, bar);
    const lora::io::merge_report report = lora::io::merge_checkpoint(args.base, args.adapter, args.out, args.options);
    std::printf("merged %zu LoRA tensors, replaced %zu, converted %zu, copied %zu unchanged: %zu tensors in %s\n",
                report.merged.size(), report.replaced.size(), report.converted, report.copied, report.tensors,
                args.out.c_str());
    return 0;
  } catch (const std::exception& e) {
    lora_cli::print_error("lora-merge", e.what());
    return 1;
  }
}
