// lora-inspect: what a PEFT LoRA adapter directory holds, without Python: its config, every adapted
// module with its effective rank, alpha and scaling (after rank_pattern / alpha_pattern), the whole
// tensors it replaces, trainable parameters, dtypes and size on disk. A table, or JSON with --json.
//
//   lora-inspect my-adapter/ [--json]
#include <cstdio>
#include <exception>
#include <filesystem>
#include <lora/io/peft.hpp>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

namespace {

namespace io = lora::io;
using ojson = nlohmann::ordered_json;

const char* const usage =
    "usage: lora-inspect ADAPTER_DIR [--json]\n"
    "\n"
    "Describes a Hugging Face PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors):\n"
    "config, target modules, every module's effective rank, alpha and scaling, trainable parameters,\n"
    "dtypes and size on disk. Reads tensor headers only.\n"
    "\n"
    "  --json   one JSON object on stdout instead of the table\n"
    "  --help   this text\n";

/// One adapted module, as shown.
struct module_row {
  std::string path;
  const char* kind;
  lora::index in, out, rank;
  double alpha, scaling;
  std::int64_t params;
  std::string dtypes;
};

std::string human_bytes(std::uintmax_t n) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", v, units[u]);
  return buf;
}

std::string join(const std::vector<std::string>& items, const char* sep = ", ") {
  std::string out;
  for (const auto& s : items) out += (out.empty() ? "" : sep) + s;
  return out.empty() ? "-" : out;
}

void print_error(const std::string& message) {
  std::string line = message;
  for (char& c : line) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  std::fprintf(stderr, "lora-inspect: error: %s\n", line.c_str());
}

int inspect(const std::string& dir, bool json) {
  const io::peft_adapter_file file = io::peft_adapter_file::open(dir);
  const io::peft_config& c = file.config();
  const io::safetensors_file& st = file.tensors();

  std::vector<module_row> rows;
  std::int64_t lora_params = 0, full_params = 0;
  std::set<std::string> all_dtypes;
  for (const io::peft_module_info& m : file.modules()) {
    std::int64_t params = 0;
    std::set<std::string> dtypes;
    for (const std::string* key : {&m.a_key, &m.b_key, &m.bias_key, &m.magnitude_key}) {
      if (key->empty()) continue;
      params += st.info(*key).numel();
      dtypes.insert(io::dtype_name(st.info(*key).type));
    }
    lora_params += params;
    all_dtypes.insert(dtypes.begin(), dtypes.end());
    const char* kind = m.embedding ? "embedding" : !m.magnitude_key.empty() ? "dora" : "linear";
    rows.push_back(module_row{m.path, kind, m.in, m.out, m.rank, c.alpha_for(m.path), c.scaling_for(m.path), params,
                              join(std::vector<std::string>(dtypes.begin(), dtypes.end()), "+")});
  }
  for (const io::tensor_info& t : file.full_tensors()) {
    full_params += t.numel();
    all_dtypes.insert(io::dtype_name(t.type));
  }
  namespace fs = std::filesystem;
  const std::uintmax_t weights_bytes = fs::file_size(fs::path(dir) / std::string(io::peft_weights_file));
  const std::uintmax_t config_bytes = fs::file_size(fs::path(dir) / std::string(io::peft_config_file));
  const std::vector<std::string> targets =
      std::holds_alternative<std::string>(c.target_modules)
          ? std::vector<std::string>{"regex " + std::get<std::string>(c.target_modules)}
          : std::get<std::vector<std::string>>(c.target_modules);

  if (json) {
    ojson out = ojson::object();
    out["adapter"] = dir;
    out["config"] = ojson::parse(c.to_json());
    ojson modules = ojson::array();
    for (const module_row& r : rows) {
      modules.push_back(ojson{{"path", r.path},
                              {"kind", r.kind},
                              {"in_features", r.in},
                              {"out_features", r.out},
                              {"rank", r.rank},
                              {"alpha", r.alpha},
                              {"scaling", r.scaling},
                              {"parameters", r.params},
                              {"dtype", r.dtypes}});
    }
    out["modules"] = std::move(modules);
    ojson full = ojson::array();
    for (const io::tensor_info& t : file.full_tensors()) {
      full.push_back(ojson{{"path", t.name.substr(io::peft_key_prefix.size())},
                           {"dtype", io::dtype_name(t.type)},
                           {"shape", t.shape},
                           {"parameters", t.numel()}});
    }
    out["whole_tensors"] = std::move(full);
    out["trainable_parameters"] = lora_params + full_params;
    out["lora_parameters"] = lora_params;
    out["whole_tensor_parameters"] = full_params;
    out["dtypes"] = std::vector<std::string>(all_dtypes.begin(), all_dtypes.end());
    out["size_bytes"] = ojson{{std::string(io::peft_weights_file), weights_bytes},
                              {std::string(io::peft_config_file), config_bytes},
                              {"total", weights_bytes + config_bytes}};
    out["warnings"] = c.warnings;
    std::puts(out.dump(2, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    return 0;
  }

  std::printf("adapter          %s\n", dir.c_str());
  std::printf("peft_type        %s   task_type %s   base model %s\n", c.peft_type.c_str(),
              c.task_type ? c.task_type->c_str() : "-",
              c.base_model_name_or_path ? c.base_model_name_or_path->c_str() : "-");
  std::printf("r / lora_alpha   %lld / %g   (scaling %s)   lora_dropout %g\n", static_cast<long long>(c.r),
              c.lora_alpha, c.use_rslora ? "alpha / sqrt(r), rsLoRA" : "alpha / r", c.lora_dropout);
  std::printf("options          fan_in_fan_out %s, use_dora %s, bias %s, lora_bias %s, init %s\n",
              c.fan_in_fan_out ? "yes" : "no", c.use_dora ? "yes" : "no", c.bias.c_str(), c.lora_bias ? "yes" : "no",
              std::holds_alternative<bool>(c.init_lora_weights)
                  ? (std::get<bool>(c.init_lora_weights) ? "default" : "none")
                  : std::get<std::string>(c.init_lora_weights).c_str());
  std::printf("target_modules   %s\n", join(targets).c_str());
  std::vector<std::string> patterns;
  for (const auto& [p, r] : c.rank_pattern) patterns.push_back(p + " -> r " + std::to_string(r));
  for (const auto& [p, a] : c.alpha_pattern) {
    char buf[64];
    std::snprintf(buf, sizeof buf, " -> alpha %g", a);
    patterns.push_back(p + buf);
  }
  std::printf("patterns         %s\n", join(patterns).c_str());
  std::printf("modules_to_save  %s\n", join(c.modules_to_save).c_str());

  std::size_t width = 6;
  for (const module_row& r : rows) width = std::max(width, r.path.size());
  std::printf("\n%zu adapted modules\n  %-*s %-9s %7s %7s %5s %8s %9s %10s  %s\n", rows.size(), static_cast<int>(width),
              "module", "kind", "in", "out", "rank", "alpha", "scaling", "params", "dtype");
  for (const module_row& r : rows) {
    std::printf("  %-*s %-9s %7lld %7lld %5lld %8g %9.4g %10lld  %s\n", static_cast<int>(width), r.path.c_str(), r.kind,
                static_cast<long long>(r.in), static_cast<long long>(r.out), static_cast<long long>(r.rank), r.alpha,
                r.scaling, static_cast<long long>(r.params), r.dtypes.c_str());
  }
  if (!file.full_tensors().empty()) {
    std::printf("\n%zu whole tensors (replace the base model's)\n", file.full_tensors().size());
    for (const io::tensor_info& t : file.full_tensors()) {
      std::printf("  %-*s %-5s %s\n", static_cast<int>(width), t.name.substr(io::peft_key_prefix.size()).c_str(),
                  io::dtype_name(t.type), io::detail::shape_to_string(t.shape).c_str());
    }
  }
  std::printf("\ntrainable        %lld parameters (LoRA %lld, whole tensors %lld)\n",
              static_cast<long long>(lora_params + full_params), static_cast<long long>(lora_params),
              static_cast<long long>(full_params));
  std::printf("dtypes           %s\n", join(std::vector<std::string>(all_dtypes.begin(), all_dtypes.end())).c_str());
  std::printf("size on disk     %s (%s %s, %s %s)\n", human_bytes(weights_bytes + config_bytes).c_str(),
              std::string(io::peft_weights_file).c_str(), human_bytes(weights_bytes).c_str(),
              std::string(io::peft_config_file).c_str(), human_bytes(config_bytes).c_str());
  for (const std::string& w : c.warnings) std::printf("warning          %s\n", w.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir;
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(usage, stdout);
      return 0;
    }
    if (a == "--json") {
      json = true;
    } else if (!a.empty() && a[0] == '-') {
      print_error("unknown argument '" + a + "' (see --help)");
      return 2;
    } else if (dir.empty()) {
      dir = a;
    } else {
      print_error("one adapter directory at a time, got '" + dir + "' and '" + a + "' (see --help)");
      return 2;
    }
  }
  if (dir.empty()) {
    print_error("an adapter directory is required (see --help)");
    return 2;
  }
  try {
    return inspect(dir, json);
  } catch (const std::exception& e) {
    print_error(e.what());
    return 1;
  }
}
