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
#include <lora/io/merge.hpp>
#include <string>

namespace {

const char* const usage =
    "usage: lora-merge --base MODEL.safetensors --adapter ADAPTER_DIR --out OUT.safetensors\n"
    "                  [--scale S] [--dtype keep|f32|f16|bf16] [--quiet]\n"
    "\n"
    "Merges a Hugging Face PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) into a\n"
    "safetensors checkpoint: W += s * B A for every adapted module (transposed with fan_in_fan_out),\n"
    "DoRA magnitudes, lora_B biases, modules_to_save replacements. Other tensors and the metadata are\n"
    "copied unchanged. Adapter module names are matched to base tensors by their longest common dotted\n"
    "suffix (e.g. transformer.h.0.attn.c_attn -> h.0.attn.c_attn.weight); ambiguous or missing matches\n"
    "are errors. The output is written atomically.\n"
    "\n"
    "  --base PATH     the base checkpoint (safetensors)\n"
    "  --adapter DIR   the PEFT adapter directory\n"
    "  --out PATH      the merged checkpoint to write (may be the base path)\n"
    "  --scale S       multiplies every module's scaling (default 1)\n"
    "  --dtype D       keep (default: each tensor's own dtype, untouched tensors byte-identical), or\n"
    "                  f32 | f16 | bf16 for every floating-point tensor\n"
    "  --quiet         no progress bar\n"
    "  --help          this text\n";

/// A usage mistake: reported with a hint to --help, exit status 2.
struct usage_error {
  std::string message;
};

struct arguments {
  std::string base, adapter, out;
  lora::io::merge_options options;
  bool quiet = false;
  bool help = false;
};

arguments parse(int argc, char** argv) {
  arguments a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw usage_error{flag + " needs a value"};
      return argv[++i];
    };
    if (flag == "--help" || flag == "-h") {
      a.help = true;
    } else if (flag == "--base") {
      a.base = value();
    } else if (flag == "--adapter") {
      a.adapter = value();
    } else if (flag == "--out") {
      a.out = value();
    } else if (flag == "--scale") {
      const std::string text = value();
      char* end = nullptr;
      const double s = std::strtod(text.c_str(), &end);
      if (text.empty() || *end != '\0' || !std::isfinite(s))
        throw usage_error{"--scale needs a finite number, got '" + text + "'"};
      a.options.scale = s;
    } else if (flag == "--dtype") {
      const std::string d = value();
      if (d == "keep") {
        a.options.out_dtype.reset();
      } else if (d == "f32") {
        a.options.out_dtype = lora::io::dtype::f32;
      } else if (d == "f16") {
        a.options.out_dtype = lora::io::dtype::f16;
      } else if (d == "bf16") {
        a.options.out_dtype = lora::io::dtype::bf16;
      } else {
        throw usage_error{"--dtype must be keep, f32, f16 or bf16, got '" + d + "'"};
      }
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
  return a;
}

/// "[#########...........] 12/148 tensors", redrawn in place on a terminal, at most every 1%.
class tensor_bar {
 public:
  explicit tensor_bar(bool enabled) : m_enabled(enabled && ::isatty(STDERR_FILENO) == 1) {}
  ~tensor_bar() {
    if (m_open) std::fputc('\n', stderr);
  }
  void update(std::size_t done, std::size_t total) {
    if (!m_enabled || total == 0) return;
    const int percent = static_cast<int>(100 * done / total);
    if (percent == m_last && done != total) return;
    m_last = percent;
    constexpr int width = 30;
    const int filled =
        static_cast<int>(static_cast<double>(width) * static_cast<double>(done) / static_cast<double>(total));
    std::fprintf(stderr, "\r[%s%s] %zu/%zu tensors", std::string(static_cast<std::size_t>(filled), '#').c_str(),
                 std::string(static_cast<std::size_t>(width - filled), '.').c_str(), done, total);
    std::fflush(stderr);
    m_open = done != total;
    if (done == total) std::fputc('\n', stderr);
  }

 private:
  bool m_enabled;
  bool m_open = false;
  int m_last = -1;
};

/// Prints one line: newlines inside the message become spaces.
void print_error(const std::string& message) {
  std::string line = message;
  for (char& c : line) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  std::fprintf(stderr, "lora-merge: error: %s\n", line.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  arguments args;
  try {
    args = parse(argc, argv);
  } catch (const usage_error& e) {
    print_error(e.message + " (see --help)");
    return 2;
  }
  if (args.help) {
    std::fputs(usage, stdout);
    return 0;
  }
  try {
    tensor_bar bar(!args.quiet);
    args.options.progress = [&](std::size_t done, std::size_t total, const std::string&) { bar.update(done, total); };
    const lora::io::merge_report report = lora::io::merge_checkpoint(args.base, args.adapter, args.out, args.options);
    std::printf("merged %zu LoRA tensors, replaced %zu, converted %zu, copied %zu unchanged: %zu tensors in %s\n",
                report.merged.size(), report.replaced.size(), report.converted, report.copied, report.tensors,
                args.out.c_str());
    return 0;
  } catch (const std::exception& e) {
    print_error(e.what());
    return 1;
  }
}
