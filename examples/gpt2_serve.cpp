// gpt2_serve: one GPT-2 base, several LoRA adapters, and a batch of requests that each name their adapter
// (or the base alone), served three ways (examples/common/serve.hpp): all requests in one mixed batch
// (every projection runs once over all rows, each row through its own adapter), one adapter at a time,
// and one request at a time. Prints each request's continuation, whether the mixed batch produced exactly
// what the request produces alone with its adapter, and the tokens per second of each way. Exits 1 when
// any request differs.
//
//   gpt2_serve --model DIR --adapter es=DIR --adapter ru=DIR --request es="El perro "
//              --request ru="Кот " --request __base__="The dog " [--length 64]
#include <cstdio>
#include <fstream>
#include <lora/detail/parallel.hpp>
#include <lora/io/atomic_file.hpp>
#include <lora/lora.hpp>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "common/flags.hpp"
#include "common/lm.hpp"
#include "common/progress.hpp"
#include "common/serve.hpp"
#include "common/strings.hpp"

namespace {

constexpr const char* kProgram = "gpt2_serve";

constexpr const char* kUsage =
    "usage: gpt2_serve --model DIR --adapter NAME=DIR [--adapter NAME=DIR ...]\n"
    "                  (--request NAME=PROMPT ... | --requests FILE) [options]\n"
    "\n"
    "Serves a batch of requests on one base, each request through the adapter it names (__base__: the\n"
    "base alone), three ways: one mixed batch (the projections run once over every request's rows, each\n"
    "row through its own adapter), one adapter at a time (a batch per adapter), and one request at a time.\n"
    "Prints each continuation, whether the mixed batch equals the request run alone, and tokens/s.\n"
    "Exits 1 if any request's tokens differ between the mixed batch and its run alone.\n"
    "\n"
    "options:\n"
    "  --model DIR          Hugging Face GPT-2 folder, or a GPT-2 GGUF file\n"
    "  --adapter NAME=DIR   a PEFT LoRA adapter folder, served under NAME (repeatable)\n"
    "  --request NAME=TEXT  a request: adapter NAME (or __base__) and its prompt (repeatable)\n"
    "  --requests FILE      requests, one a line: NAME<TAB>PROMPT (\\n in PROMPT = a newline)\n"
    "  --repeat N           serve the requests N times over (a larger batch; default 1)\n"
    "  --length N           tokens to generate per request (default 64; a request stops earlier at\n"
    "                       <|endoftext|> or when its context is full)\n"
    "  --temperature T      0 (greedy, default) or the sampling temperature (request k seeds with S + k)\n"
    "  --top-k K            sample among the K most likely tokens only\n"
    "  --seed S             sampling seed (default 0)\n"
    "  --base-dtype D       store the projections as f32 (default), bf16, f16, int8, nf4, nf4_dq, q8_0, q4_0\n"
    "  --json FILE          the figures and every continuation as JSON\n"
    "  --quiet              no progress bar\n";

struct options {
  std::string model, requests_file, json_path;
  std::vector<std::pair<std::string, std::string>> adapters, requests;  // name, folder / prompt
  std::size_t repeat = 1;
  ex::generate_options gen = [] {
    ex::generate_options g;
    g.length = 64;
    return g;
  }();
  lora::quant::qtype base = lora::quant::qtype::f32;
  bool quiet = false;
};

std::pair<std::string, std::string> split_pair(const ex::flag_table& f, const std::string& flag, const std::string& v) {
  const auto eq = v.find('=');
  if (eq == std::string::npos || eq == 0) f.fail(flag + " expects NAME=VALUE, got '" + v + "'");
  return {v.substr(0, eq), v.substr(eq + 1)};
}

/// NAME<TAB>PROMPT lines; "\n" in a prompt stands for a newline.
std::vector<std::pair<std::string, std::string>> read_requests(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw lora::io_error("cannot open the requests file '" + path + "'");
  std::vector<std::pair<std::string, std::string>> out;
  std::size_t line_no = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_no;
    if (line.empty()) continue;
    const auto tab = line.find('\t');
    if (tab == std::string::npos || tab == 0)
      throw lora::format_error(ex::cat(path, ":", line_no, ": expected NAME<TAB>PROMPT, got '", line, "'"));
    std::string prompt = line.substr(tab + 1);
    for (std::size_t p = prompt.find("\\n"); p != std::string::npos; p = prompt.find("\\n", p + 1))
      prompt.replace(p, 2, "\n");
    out.emplace_back(line.substr(0, tab), prompt);
  }
  return out;
}

options parse(const std::vector<std::string>& args) {
  options o;
  ex::flag_table f(kProgram, kUsage);
  f.bind("--model", o.model);
  f.on("--adapter",
       ex::flag_table::setter([&](const std::string& v) { o.adapters.push_back(split_pair(f, "--adapter", v)); }));
  f.on("--request",
       ex::flag_table::setter([&](const std::string& v) { o.requests.push_back(split_pair(f, "--request", v)); }));
  f.bind("--requests", o.requests_file);
  f.bind("--repeat", o.repeat, 1);
  f.bind("--length", o.gen.length, 1);
  f.bind("--temperature", o.gen.temperature, 0);
  f.bind("--top-k", o.gen.top_k, 0);
  f.bind("--seed", o.gen.seed, 0);
  f.on("--base-dtype", ex::flag_table::setter([&](const std::string& v) {
         try {
           o.base = lora::quant::parse_qtype(v);
         } catch (const lora::config_error& e) {
           f.fail(ex::cat("--base-dtype: ", e.what()));
         }
       }));
  f.bind("--json", o.json_path);
  f.bind("--quiet", o.quiet);
  f.parse(args);
  if (o.model.empty()) f.fail("--model DIR is required");
  if (!o.requests_file.empty()) {
    const auto more = read_requests(o.requests_file);
    o.requests.insert(o.requests.end(), more.begin(), more.end());
  }
  if (o.requests.empty()) f.fail("at least one --request NAME=PROMPT (or --requests FILE) is required");
  for (const auto& [name, dir] : o.adapters)
    if (lora::adapter_routing::is_base(name)) f.fail("--adapter: '" + name + "' is reserved for the base alone");
  return o;
}

nlohmann::json run_json(const ex::serve_run& r) {
  return {{"seconds", r.seconds},
          {"prompt_tokens", r.prompt_tokens},
          {"generated_tokens", r.generated_tokens},
          {"tokens_per_second", r.tokens_per_second()}};
}

int serve(const options& o) {
  ex::base_model base = ex::load_base_model(o.model);
  const auto model = ex::make_base_lm(base);
  model->set_base_storage(o.base);
  for (const auto& [name, dir] : o.adapters) ex::attach_adapter(*model, dir, name);
  model->train(false);
  std::vector<ex::serve_request> reqs;
  for (std::size_t rep = 0; rep < o.repeat; ++rep)
    for (const auto& [name, prompt] : o.requests) reqs.push_back({name, base.tok.encode(prompt)});

  ex::progress_bar bar(o.quiet);
  bar.begin(ex::cat("mixed batch of ", reqs.size()), static_cast<lora::index>(o.gen.length));
  const ex::serve_run mixed = ex::serve_mixed(*model, reqs, o.gen, base.tok, &bar);
  bar.finish();
  const ex::serve_run grouped = ex::serve_by_adapter(*model, reqs, o.gen, base.tok);
  const ex::serve_run alone = ex::serve_one_by_one(*model, reqs, o.gen, base.tok);

  std::size_t same = 0;
  nlohmann::json outputs = nlohmann::json::array();
  for (std::size_t k = 0; k < reqs.size(); ++k) {
    const bool equal = mixed.outputs[k] == alone.outputs[k] && grouped.outputs[k] == alone.outputs[k];
    same += equal ? 1 : 0;
    const std::string prompt = o.requests[k % o.requests.size()].second;
    const std::string text = ex::printable(base.tok.decode(mixed.outputs[k]));
    if (k < o.requests.size())
      std::printf("[%zu] %s | %s%s\n     %s\n", k, reqs[k].adapter.c_str(), ex::printable(prompt).c_str(), text.c_str(),
                  equal ? "same tokens as the request alone" : "DIFFERS from the request alone");
    outputs.push_back({{"adapter", reqs[k].adapter}, {"prompt", prompt}, {"output", text}, {"equal_alone", equal}});
  }
  std::printf(
      "%zu requests over %zu adapters: mixed batch %.1f tokens/s, one adapter at a time %.1f (%.2fx), one request "
      "at a time %.1f (%.2fx); %zu/%zu requests identical to their runs alone\n",
      reqs.size(), o.adapters.size(), mixed.tokens_per_second(), grouped.tokens_per_second(),
      mixed.tokens_per_second() / grouped.tokens_per_second(), alone.tokens_per_second(),
      mixed.tokens_per_second() / alone.tokens_per_second(), same, reqs.size());
  if (!o.json_path.empty()) {
    const nlohmann::json j = {{"requests", reqs.size()},
                              {"adapters", o.adapters.size()},
                              {"length", o.gen.length},
                              {"base_dtype", lora::quant::qtype_name(o.base)},
                              {"threads", lora::num_threads()},
                              {"mixed", run_json(mixed)},
                              {"by_adapter", run_json(grouped)},
                              {"one_by_one", run_json(alone)},
                              {"identical", same},
                              {"outputs", outputs}};
    lora::io::write_file_atomically(o.json_path, j.dump(2) + "\n");
  }
  return same == reqs.size() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  try {
    return serve(parse(args));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", kProgram, e.what());
    return 1;
  }
}
