// tests/llama/ours.cpp: what this library predicts for a GPT-2 folder (and PEFT adapters on it), for
// check.mjs to compare with llama.cpp running the GGUF export of the same files.
//
//   lora_llama_reference --model HF_DIR|MODEL.gguf [--tokenizer DIR] [--adapter PEFT_DIR [--scale S]]...
//                        --tokens-from TEXTFILE --count N [--greedy K] --out ours.json [--double]
//
// The model is a Hugging Face folder, or a GGUF file whose weights are dequantized (models/gpt2_gguf.hpp):
// then the comparison with llama.cpp running the same file sees only how the two compute, not how the
// weights were rounded. The text file is tokenized with the tokenizer of the --tokenizer folder (default:
// the model folder; tokenizer::from_folder: the byte tokenizer for a vocabulary of 257, where token k is
// byte k; GPT-2's BPE when the folder holds vocab.json and merges.txt; a GGUF model without --tokenizer
// takes the byte tokenizer) and its first N tokens t_0 .. t_{N-1} are the prompt. The program writes
//   {"tokens": [t_0 ..], "logprobs": [[log p(v | t_0..t_i) for v in 0..V-1] for i in 0..N-1],
//    "greedy": [g_0 .. g_{K-1}],
//    "greedy_logprobs": [[log p(v | t_0..t_{N-1} g_0..g_{j-1}) for v in 0..V-1] for j in 1..K-1]}
// where log p is the log-softmax of the logits over the whole vocabulary (computed in double from the
// model's logits), and g is the greedy continuation: g_0 = argmax at position N-1, then each g_j is fed
// alone through the KV cache to give g_{j+1} (argmax, the lowest id on ties); greedy_logprobs are the
// distributions g_1 .. g_{K-1} were chosen from. The model runs in float, or in double with --double.
//
// Adapters: every --adapter is attached to the model under its own name, all active at once; --scale S
// (after its --adapter, default 1) multiplies that adapter's ΔW = (alpha / r) B A by S, done by scaling
// lora_B by S when loading (llama.cpp's adapter scale means the same: y = W x + S (alpha / r) B A x).
//
// Exit status: 0 on success, 2 on a usage or input error (one line on stderr).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <lora/io/peft.hpp>
#include <lora/models/gpt2.hpp>
#include <lora/models/gpt2_gguf.hpp>
#include <lora/models/gpt2_infer.hpp>
#include <lora/models/gpt2_io.hpp>
#include <lora/models/tokenizer.hpp>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace {

const char* const kUsage =
    "usage: lora_llama_reference --model HF_DIR|MODEL.gguf [--tokenizer DIR] [--adapter PEFT_DIR [--scale S]]...\n"
    "                            --tokens-from TEXTFILE --count N [--greedy K] --out OURS_JSON [--double]\n"
    "\n"
    "Writes what this library predicts for the first N tokens of TEXTFILE (tokenized with the model folder's\n"
    "tokenizer) as JSON: {\"tokens\": [N ids], \"logprobs\": [N rows of V log-probabilities of the next token],\n"
    "\"greedy\": [K ids of the greedy continuation, argmax with the lowest id on ties, through the KV cache],\n"
    "\"greedy_logprobs\": [K-1 rows: the distributions greedy tokens 1..K-1 were chosen from]}.\n"
    "\n"
    "  --model HF_DIR|FILE   Hugging Face GPT-2 folder (config.json, model.safetensors), or a GGUF file\n"
    "                        (its weights dequantized)\n"
    "  --tokenizer DIR       the folder whose tokenizer encodes the text (default: the model folder; for a\n"
    "                        GGUF model, the byte tokenizer)\n"
    "  --adapter PEFT_DIR    PEFT LoRA adapter folder; repeat for several adapters, all active at once\n"
    "  --scale S             multiplies the preceding adapter's delta W by S (default 1)\n"
    "  --tokens-from FILE    text whose first N tokens are the prompt\n"
    "  --count N             prompt length (N >= 1; N + K - 1 <= n_positions)\n"
    "  --greedy K            greedy tokens after the prompt (default 32)\n"
    "  --out FILE            the JSON written\n"
    "  --double              run the model in double (default float)\n"
    "  --help                this text\n";

struct adapter_option {
  std::string dir;
  double scale = 1.0;
};

struct options {
  std::string model_dir, tokenizer_dir, text_path, out_path;
  std::vector<adapter_option> adapters;
  long count = 0;
  long greedy = 32;
  bool use_double = false;
};

[[noreturn]] void usage_error(const std::string& message) {
  std::cerr << "lora_llama_reference: " << message << " (--help for usage)\n";
  std::exit(2);
}

double parse_number(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || end != text.c_str() + text.size() || !std::isfinite(v))
    usage_error(flag + " expects a finite number, got '" + text + "'");
  return v;
}

long parse_count(const std::string& flag, const std::string& text, long min) {
  char* end = nullptr;
  const long v = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || end != text.c_str() + text.size() || v < min)
    usage_error(flag + " expects an integer >= " + std::to_string(min) + ", got '" + text + "'");
  return v;
}

options parse_options(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (flag == "--double") {
      o.use_double = true;
      continue;
    }
    if (i + 1 >= argc)
      usage_error(flag == "--model" || flag == "--tokenizer" || flag == "--adapter" || flag == "--scale" ||
                          flag == "--tokens-from" || flag == "--count" || flag == "--greedy" || flag == "--out"
                      ? flag + " needs a value"
                      : "unknown flag '" + flag + "'");
    const std::string value = argv[++i];
    if (flag == "--model") {
      o.model_dir = value;
    } else if (flag == "--tokenizer") {
      o.tokenizer_dir = value;
    } else if (flag == "--adapter") {
      o.adapters.push_back({value, 1.0});
    } else if (flag == "--scale") {
      if (o.adapters.empty()) usage_error("--scale must follow an --adapter");
      o.adapters.back().scale = parse_number(flag, value);
    } else if (flag == "--tokens-from") {
      o.text_path = value;
    } else if (flag == "--count") {
      o.count = parse_count(flag, value, 1);
    } else if (flag == "--greedy") {
      o.greedy = parse_count(flag, value, 0);
    } else if (flag == "--out") {
      o.out_path = value;
    } else {
      usage_error("unknown flag '" + flag + "'");
    }
  }
  if (o.model_dir.empty() || o.text_path.empty() || o.out_path.empty() || o.count == 0)
    usage_error("--model, --tokens-from, --count and --out are required");
  return o;
}

/// Attaches every adapter (B scaled by its --scale) as "adapter<i>" and makes all of them active on
/// every projection that has any of them.
template <typename Scalar>
void attach_adapters(lora::models::gpt2<Scalar>& model, const std::vector<adapter_option>& adapters) {
  std::vector<std::string> names;
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    lora::io::peft_adapter a = lora::io::peft_adapter::load(adapters[i].dir);
    for (lora::io::peft_module& m : a.modules) m.b *= adapters[i].scale;
    names.push_back("adapter" + std::to_string(i));
    lora::io::attach(a, model.named_layers(), names.back());
  }
  for (auto& [path, layer] : model.named_layers()) {
    std::vector<std::string> active;
    std::copy_if(names.begin(), names.end(), std::back_inserter(active),
                 [&](const std::string& n) { return layer->has_adapter(n); });
    if (!active.empty()) layer->set_active(active);
  }
  model.train(false);
}

/// log-softmax of one column of logits, in double: x − max − log Σ exp(x − max).
template <typename Column>
std::vector<double> log_softmax(const Column& logits) {
  const Eigen::VectorXd x = logits.template cast<double>();
  const double max = x.maxCoeff();
  const double log_z = max + std::log((x.array() - max).exp().sum());
  std::vector<double> out(static_cast<std::size_t>(x.size()));
  Eigen::VectorXd::Map(out.data(), x.size()) = x.array() - log_z;
  return out;
}

/// The lowest id of the largest logit.
template <typename Column>
std::int32_t argmax(const Column& logits) {
  Eigen::Index best = 0;
  for (Eigen::Index v = 1; v < logits.size(); ++v)
    if (logits(v) > logits(best)) best = v;
  return static_cast<std::int32_t>(best);
}

template <typename Scalar>
nlohmann::json predict(const options& o) {
  const bool gguf = std::filesystem::is_regular_file(o.model_dir);
  auto checkpoint =
      gguf ? lora::models::load_gpt2_gguf<Scalar>(o.model_dir) : lora::models::load_gpt2<Scalar>(o.model_dir);
  const std::string tokenizer_dir = !o.tokenizer_dir.empty() ? o.tokenizer_dir : gguf ? std::string() : o.model_dir;
  const lora::models::tokenizer tok =
      tokenizer_dir.empty() ? lora::models::tokenizer(lora::models::byte_tokenizer{})
                            : lora::models::tokenizer::from_folder(tokenizer_dir, checkpoint.config.vocab_size);
  if (tok.vocab_size() > checkpoint.config.vocab_size)
    throw lora::config_error("the tokenizer has " + std::to_string(tok.vocab_size()) + " tokens, the model only " +
                             std::to_string(checkpoint.config.vocab_size));
  std::ifstream in(o.text_path, std::ios::binary);
  if (!in) throw lora::io_error("cannot read '" + o.text_path + "'");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::int32_t> ids = tok.encode(text);
  if (static_cast<long>(ids.size()) < o.count)
    throw lora::config_error("'" + o.text_path + "' has " + std::to_string(ids.size()) +
                             " tokens, fewer than --count " + std::to_string(o.count));
  ids.resize(static_cast<std::size_t>(o.count));
  const long positions = static_cast<long>(checkpoint.config.n_positions);
  if (o.count + std::max(o.greedy - 1, 0L) > positions)
    throw lora::config_error("--count " + std::to_string(o.count) + " + --greedy " + std::to_string(o.greedy) +
                             " - 1 exceeds the model's n_positions " + std::to_string(positions));

  lora::models::gpt2<Scalar> model(std::move(checkpoint.weights));
  attach_adapters(model, o.adapters);
  auto cache = model.make_cache();
  lora::matrix<Scalar> logits;
  model.infer(ids, cache, &logits);  // V x N
  nlohmann::json rows = nlohmann::json::array();
  for (Eigen::Index i = 0; i < logits.cols(); ++i) rows.push_back(log_softmax(logits.col(i)));
  std::vector<std::int32_t> greedy;
  nlohmann::json greedy_rows = nlohmann::json::array();
  for (long j = 0; j < o.greedy; ++j) {
    if (j > 0) {
      model.infer({greedy.back()}, cache, &logits);  // V x 1
      greedy_rows.push_back(log_softmax(logits.col(0)));
    }
    greedy.push_back(argmax(logits.col(logits.cols() - 1)));
  }
  return {{"tokens", ids}, {"logprobs", std::move(rows)}, {"greedy", greedy}, {"greedy_logprobs", greedy_rows}};
}

}  // namespace

int main(int argc, char** argv) {
  const options o = parse_options(argc, argv);
  try {
    const nlohmann::json result = o.use_double ? predict<double>(o) : predict<float>(o);
    std::ofstream out(o.out_path, std::ios::binary | std::ios::trunc);
    out << result.dump() << '\n';
    out.close();
    if (!out) throw lora::io_error("cannot write '" + o.out_path + "'");
  } catch (const std::exception& e) {  // lora::error and the rest (nlohmann::json, allocation)
    std::cerr << "lora_llama_reference: " << e.what() << '\n';
    return 2;
  }
  return 0;
}
