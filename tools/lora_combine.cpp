// lora-combine: PEFT's add_weighted_adapter on adapter directories, without Python or a base model: every
// combination type (linear, cat, svd, ties, dare_*, magnitude_prune, and their _svd forms) with PEFT's
// weights, scalings, ranks and config rules. The logic is lora::io::combine_peft_dirs
// (<lora/io/peft_combine.hpp>, maths in <lora/combine.hpp>); this is the CLI.
//
//   lora-combine --adapter a/ --weight 0.7 --adapter b/ --weight 0.3 --type svd --out mix/
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <lora/io/peft_combine.hpp>
#include <string>
#include <vector>

#include "cli.hpp"

namespace {

using lora_cli::usage_error;

const char* const usage =
    "usage: lora-combine --adapter DIR --weight W [--adapter DIR --weight W ...] --type TYPE --out DIR\n"
    "                    [--density D] [--majority-sign total|frequency] [--svd-rank R] [--svd-clamp Q]\n"
    "                    [--seed S]\n"
    "\n"
    "Combines Hugging Face PEFT LoRA adapters into a new one, as PEFT's add_weighted_adapter does. With\n"
    "c = W * s for each adapter (s its scaling alpha/r), the new adapter (r = lora_alpha = its rank, so\n"
    "scaling 1) holds, per module:\n"
    "  cat                 A = [c1 A1; c2 A2; ...], B = [B1, B2, ...]: exactly sum c B A; rank = sum of ranks\n"
    "  linear, ties, dare_linear, dare_ties, magnitude_prune\n"
    "                      A and B merged separately with weights sign(c) sqrt|c| and sqrt|c| (cross terms\n"
    "                      B_i A_j remain); equal ranks needed\n"
    "  svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd\n"
    "                      the deltas s B A merged with weights c (s enters squared, as in PEFT), then a\n"
    "                      truncated SVD; rank = --svd-rank or the largest rank\n"
    "ties/magnitude_prune keep the top D fraction of entries by magnitude, dare_* keep each entry with\n"
    "probability D (rescaled by 1/D; masks from --seed, not torch's), ties/dare_ties then elect a sign per\n"
    "entry and average the agreeing ones. One adapter is always combined linearly. Modules missing from\n"
    "some adapters are combined from the others. DoRA and lora_B-bias adapters are refused; whole tensors\n"
    "(modules_to_save) are not carried over. Both output files are written atomically.\n"
    "\n"
    "  --adapter DIR        a PEFT adapter directory (repeat; each followed by its --weight)\n"
    "  --weight W           the weight of the preceding --adapter (any sign)\n"
    "  --type TYPE          the combination type (above)\n"
    "  --density D          fraction kept by the pruning types (required by them; >= 1 prunes nothing)\n"
    "  --majority-sign M    total (default: sign of the sum) or frequency (sign of the count)\n"
    "  --svd-rank R         rank of an svd-type result\n"
    "  --svd-clamp Q        clamp an svd-type result's factors to the Q quantile of their entries (0..1)\n"
    "  --seed S             seed of DARE's random masks (default 0)\n"
    "  --out DIR            the new adapter directory (created if needed)\n"
    "  --help               this text\n";

struct arguments {
  std::vector<std::string> adapters;
  std::vector<double> weights;
  std::string out, type;
  lora::combine_options options;
  bool help = false;
};

/// A non-negative integer flag value (--svd-rank, --seed).
std::uint64_t parse_count(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(text.c_str(), &end, 10);
  if (text.empty() || text[0] == '-' || *end != '\0' || errno == ERANGE)
    throw usage_error{flag + " needs a non-negative integer, got '" + text + "'"};
  return v;
}

void parse_flag(arguments& a, const std::string& flag, const std::string& value) {
  if (flag == "--adapter") {
    if (a.weights.size() != a.adapters.size()) throw usage_error{"--adapter " + a.adapters.back() + " has no --weight"};
    a.adapters.push_back(value);
  } else if (flag == "--weight") {
    if (a.weights.size() + 1 != a.adapters.size()) throw usage_error{"each --weight must follow its own --adapter"};
    a.weights.push_back(lora_cli::parse_number(flag, value));
  } else if (flag == "--type") {
    a.type = value;
  } else if (flag == "--density") {
    a.options.density = lora_cli::parse_number(flag, value);
  } else if (flag == "--majority-sign") {
    a.options.sign_method = lora::parse_majority_sign(value);
  } else if (flag == "--svd-rank") {
    a.options.svd_rank = static_cast<lora::index>(parse_count(flag, value));
  } else if (flag == "--svd-clamp") {
    a.options.svd_clamp = lora_cli::parse_number(flag, value);
  } else if (flag == "--seed") {
    a.options.seed = parse_count(flag, value);
  } else if (flag == "--out") {
    a.out = value;
  } else {
    throw usage_error{"unknown argument '" + flag + "'"};
  }
}

arguments parse(int argc, char** argv) {
  arguments a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      a.help = true;
    } else if (flag.rfind("--", 0) == 0) {
      parse_flag(a, flag, lora_cli::flag_value(argc, argv, i));
    } else {
      throw usage_error{"unknown argument '" + flag + "'"};
    }
  }
  if (a.help) return a;
  if (a.adapters.empty()) throw usage_error{"at least one --adapter DIR --weight W is required"};
  if (a.weights.size() != a.adapters.size()) throw usage_error{"--adapter " + a.adapters.back() + " has no --weight"};
  if (a.type.empty()) throw usage_error{"--type is required"};
  if (a.out.empty()) throw usage_error{"--out is required"};
  a.options.type = lora::parse_combination(a.type);
  return a;
}

int combine(const arguments& args) {
  const lora::io::peft_combine_result r =
      lora::io::combine_peft_dirs(args.adapters, args.weights, args.out, args.options);
  std::printf("combined %zu modules from %zu adapters (type %s, rank %lld = lora_alpha) into %s\n",
              r.adapter.modules.size(), args.adapters.size(), lora::combination_name(r.type),
              static_cast<long long>(r.rank), args.out.c_str());
  for (const std::string& note : r.notes) std::printf("note: %s\n", note.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  arguments args;
  try {
    args = parse(argc, argv);
  } catch (const usage_error& e) {
    lora_cli::print_error("lora-combine", e.message + " (see --help)");
    return 2;
  } catch (const std::exception& e) {  // an unknown --type or --majority-sign
    lora_cli::print_error("lora-combine", std::string(e.what()) + " (see --help)");
    return 2;
  }
  if (args.help) {
    std::fputs(usage, stdout);
    return 0;
  }
  try {
    return combine(args);
  } catch (const std::exception& e) {
    lora_cli::print_error("lora-combine", e.what());
    return 1;
  }
}
