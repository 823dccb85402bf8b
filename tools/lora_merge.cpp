// lora-merge: folds a PEFT LoRA adapter into a safetensors checkpoint, as PEFT's merge_and_unload does,
// without Python: fan_in_fan_out (GPT-2 Conv1D), rsLoRA, rank/alpha patterns, DoRA, lora_B.bias and
// modules_to_save are honoured, and adapter module names are matched to base tensor names across a
// leading prefix. The logic is lora::io::merge_checkpoint (<lora/io/merge.hpp>) and lora::io::merge_gguf
// (<lora/io/gguf_lora.hpp>); this is the CLI. After merging it prints what storing the merged weights cost
// (quant::requant_error: stored − exact merged weight, and its effect on a probe batch), and --report
// writes those figures for every merged tensor as JSON.
//
//   lora-merge --base model.safetensors --adapter my-adapter/ --out merged.safetensors [--scale 1]
//              [--dtype keep|f32|f16|bf16] [--report report.json] [--probe-rows 64] [--quiet]
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <lora/io/atomic_file.hpp>
#include <lora/io/gguf.hpp>
#include <lora/io/gguf_lora.hpp>
#include <lora/io/merge.hpp>
#include <lora/models/gpt2_gguf.hpp>
#include <lora/quant/requant_error.hpp>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli.hpp"

namespace {

using lora_cli::usage_error;

const char* const usage =
    "usage: lora-merge --base MODEL.safetensors --adapter ADAPTER_DIR --out OUT.safetensors\n"
    "                  [--scale S] [--dtype keep|f32|f16|bf16] [--report R.json] [--probe-rows P] [--quiet]\n"
    "       lora-merge --base MODEL.gguf --adapter ADAPTER_DIR|ADAPTER.gguf --out OUT.gguf\n"
    "                  [--scale S] [--dtype keep|f32|f16|bf16|q8_0|q4_0] [--report R.json] [--probe-rows P]\n"
    "                  [--quiet]\n"
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
    "Storing the exact merged weight W* = W + s B A (computed in double from W as the base stores it) in\n"
    "fewer bits loses something; lora-merge reports it: E = stored - W*, its max |E| and RMS, and the\n"
    "relative RMS of the change X E^T of the layer's output on a fixed N(0,1) probe batch X (P rows). The\n"
    "base's own quantization error is not counted. --dtype f32 (or bf16, f16) merges into a dequantized\n"
    "copy; keep, q8_0 and q4_0 merge and re-quantize.\n"
    "\n"
    "  --base PATH     the base checkpoint (safetensors)\n"
    "  --adapter DIR   the PEFT adapter directory\n"
    "  --out PATH      the merged checkpoint to write (may be the base path)\n"
    "  --scale S       multiplies every module's scaling (default 1)\n"
    "  --dtype D       keep (default: each tensor's own dtype, untouched tensors byte-identical), or\n"
    "                  f32 | f16 | bf16 for every floating-point tensor (GGUF: every merged tensor,\n"
    "                  also q8_0 | q4_0)\n"
    "  --report PATH   write the error of every merged tensor, and overall, as JSON (atomically)\n"
    "  --probe-rows P  rows of the probe batch for the output error (default 64; 0: weight error only)\n"
    "  --quiet         no progress bar\n"
    "  --help          this text\n";

struct arguments {
  std::string base, adapter, out, report;
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
    } else if (flag == "--report") {
      a.report = value();
    } else if (flag == "--probe-rows") {
      const double p = lora_cli::parse_number(flag, value());
      if (p < 0 || p > 1e6 || p != std::floor(p)) throw usage_error{"--probe-rows needs an integer in [0, 1e6]"};
      a.options.probe_rows = static_cast<lora::index>(p);
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

/// One merged tensor's figures, whichever format it came from.
struct tensor_error {
  std::string name, module, stored_as;
  lora::quant::requant_error error;
};

/// What the report says about the whole merge.
struct error_summary {
  std::string format, mode;
  std::vector<tensor_error> tensors;
  lora::quant::requant_error worst, pooled;
};

/// "merge into a dequantized copy" (f32, bf16, f16) or "merge and re-quantize" (keep, q8_0, q4_0).
std::string merge_mode(const std::string& dtype) {
  if (dtype == "f32" || dtype == "bf16" || dtype == "f16") return "merge into a dequantized copy (" + dtype + ")";
  return "merge and re-quantize (" + (dtype == "keep" ? std::string("each tensor in its base type") : dtype) + ")";
}

/// The index of the tensor with the largest rel_rms_output (rel_rms_weight breaks ties, e.g. biases).
std::size_t worst_tensor(const std::vector<tensor_error>& tensors) {
  std::size_t k = 0;
  for (std::size_t i = 1; i < tensors.size(); ++i) {
    const auto& a = tensors[i].error;
    const auto& b = tensors[k].error;
    if (a.rel_rms_output > b.rel_rms_output ||
        (a.rel_rms_output == b.rel_rms_output && a.rel_rms_weight > b.rel_rms_weight))
      k = i;
  }
  return k;
}

void print_summary(const error_summary& s, lora::index probe_rows) {
  std::printf("%s; its error = stored - exact merged weight (the base's own quantization not counted):\n",
              s.mode.c_str());
  if (s.tensors.empty()) return;
  const tensor_error& w = s.tensors[worst_tensor(s.tensors)];
  std::printf("  worst tensor  %s (%s): relative RMS output change %.3g, max |dW| %.3g\n", w.name.c_str(),
              w.stored_as.c_str(), w.error.rel_rms_output, w.error.max_weight);
  std::printf(
      "  overall       max |dW| %.3g, RMS dW %.3g (relative %.3g), relative RMS output change %.3g on %lld "
      "probe rows\n",
      s.pooled.max_weight, s.pooled.rms_weight, s.pooled.rel_rms_weight, s.pooled.rel_rms_output,
      static_cast<long long>(probe_rows));
}

nlohmann::ordered_json to_json(const lora::quant::requant_error& e) {
  return {{"max_weight", e.max_weight},
          {"rms_weight", e.rms_weight},
          {"rel_rms_weight", e.rel_rms_weight},
          {"rms_exact_weight", e.rms_exact_weight},
          {"max_output", e.max_output},
          {"rms_output", e.rms_output},
          {"rel_rms_output", e.rel_rms_output},
          {"rms_exact_output", e.rms_exact_output},
          {"weights", e.weights},
          {"outputs", e.outputs}};
}

/// The --report file: the semantics, the overall figures (pooled and worst) and every merged tensor.
void write_report(const arguments& args, const error_summary& s) {
  using ojson = nlohmann::ordered_json;
  ojson out = {{"tool", "lora-merge"}, {"format", s.format},  {"base", args.base}, {"adapter", args.adapter},
               {"out", args.out},      {"dtype", args.dtype}, {"mode", s.mode}};
  out["semantics"] =
      "error = stored - exact, exact = W + sum s B A computed in double from the base weight W as stored (the "
      "base's own quantization error is not included), stored = what the written bytes decode to. "
      "'merge into a dequantized copy' = --dtype f32 (or bf16, f16); 'merge and re-quantize' = keep, q8_0, q4_0. "
      "Output figures: the change X error^T of the layer's output on a probe batch X (probe_rows x in, N(0,1), "
      "fixed seed); relative figures divide by the RMS of the exact weight or output. 'pooled' treats all "
      "merged tensors as one (RMS weighted by element count); 'worst' takes each figure's maximum over tensors.";
  out["probe_rows"] = args.options.probe_rows;
  out["overall"] = {{"tensors", s.tensors.size()}, {"pooled", to_json(s.pooled)}, {"worst", to_json(s.worst)}};
  if (!s.tensors.empty()) out["overall"]["worst_tensor"] = s.tensors[worst_tensor(s.tensors)].name;
  ojson tensors = ojson::array();
  for (const tensor_error& t : s.tensors) {
    ojson row = {{"name", t.name}, {"module", t.module}, {"stored_as", t.stored_as}};
    row.update(to_json(t.error));
    tensors.push_back(std::move(row));
  }
  out["tensors"] = std::move(tensors);
  lora::io::write_file_atomically(args.report, out.dump(2) + "\n");
}

void report_errors(const arguments& args, const error_summary& s) {
  print_summary(s, args.options.probe_rows);
  if (!args.report.empty()) write_report(args, s);
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
  options.probe_rows = args.options.probe_rows;
  if (args.dtype != "keep") options.out_type = io::parse_ggml_type(args.dtype);
  options.progress = [&](std::size_t done, std::size_t total, const std::string&) { bar.update(done, total); };
  const io::gguf_merge_report report = io::merge_gguf(base, modules, args.out, options);
  std::printf("merged %zu LoRA modules into %zu tensors, copied %zu unchanged: %zu tensors in %s\n", modules.size(),
              report.merged.size(), report.copied, report.merged.size() + report.copied, args.out.c_str());
  error_summary s{"gguf", merge_mode(args.dtype), {}, report.worst, report.pooled};
  for (std::size_t k = 0; k < report.merged.size(); ++k)
    s.tensors.push_back(
        {report.merged[k], report.merged[k], io::ggml_type_name(report.stored_as[k]), report.errors[k]});
  report_errors(args, s);
  return 0;
}

/// A safetensors base and a PEFT adapter.
int merge_safetensors(const arguments& args) {
  namespace io = lora::io;
  const io::merge_report report = io::merge_checkpoint(args.base, args.adapter, args.out, args.options);
  std::printf("merged %zu LoRA tensors, replaced %zu, converted %zu, copied %zu unchanged: %zu tensors in %s\n",
              report.merged.size(), report.replaced.size(), report.converted, report.copied, report.tensors,
              args.out.c_str());
  error_summary s{"safetensors", merge_mode(args.dtype), {}, report.worst, report.pooled};
  for (std::size_t k = 0; k < report.merged.size(); ++k)
    s.tensors.push_back(
        {report.merged[k].second, report.merged[k].first, io::dtype_name(report.stored_as[k]), report.errors[k]});
  report_errors(args, s);
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
    return merge_safetensors(args);
  } catch (const std::exception& e) {
    lora_cli::print_error("lora-merge", e.what());
    return 1;
  }
}
