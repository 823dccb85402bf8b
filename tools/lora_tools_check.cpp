// lora_tools_check: the test driver CTest runs around lora-merge, lora-inspect and lora-combine (not
// installed).
//
//   lora_tools_check make DIR              writes DIR/base.safetensors (a tiny GPT-2-style checkpoint),
//                                          DIR/adapter/ (a PEFT adapter for it: fan_in_fan_out, a
//                                          rank_pattern, modules_to_save, "transformer." prefixes) and
//                                          DIR/adapter2/ (a second one, rank 2 everywhere, with a module
//                                          the first lacks), for lora-combine
//   lora_tools_check verify DIR            checks DIR/merged.safetensors against W + s (B A)ᵀ computed
//                                          here element by element, and the untouched tensors byte by byte
//   lora_tools_check verify-cat DIR W1 W2  checks DIR/combined/ (lora-combine --type cat of adapter/ with
//                                          weight W1 and adapter2/ with W2): scaling 1, every module of the
//                                          new rank, and B A = Σ W_i s_i B_i A_i over the adapters having it
//   lora_tools_check expect-ok [--contains TEXT] -- CMD ARGS...
//                                          runs CMD; passes if it exits 0 (and stdout contains TEXT)
//   lora_tools_check expect-error -- CMD ARGS...
//                                          runs CMD; passes if it exits non-zero with exactly one line on
//                                          stderr
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <lora/io/peft.hpp>
#include <string>
#include <vector>

namespace {

namespace io = lora::io;
using mat = lora::matrix<double>;

mat filled(lora::index rows, lora::index cols, double seed) {
  mat m(rows, cols);
  for (lora::index i = 0; i < rows; ++i) {
    for (lora::index j = 0; j < cols; ++j)
      m(i, j) = std::cos(seed + 0.3 * static_cast<double>(i) + 0.9 * static_cast<double>(j));
  }
  return m;
}

// The fixture: two GPT-2 blocks' c_attn (in 4, out 6, stored in x out), a classification head.
io::peft_adapter fixture_adapter() {
  io::peft_adapter a;
  a.config.r = 2;
  a.config.lora_alpha = 8;
  a.config.fan_in_fan_out = true;
  a.config.target_modules = std::vector<std::string>{"c_attn"};
  a.config.rank_pattern = {{"h\\.1\\.attn\\.c_attn", 1}};
  a.config.modules_to_save = {"score"};
  a.config.task_type = "SEQ_CLS";
  a.config.base_model_name_or_path = "gpt2-tiny";
  for (int layer = 0; layer < 2; ++layer) {
    io::peft_module m;
    m.path = "transformer.h." + std::to_string(layer) + ".attn.c_attn";
    const lora::index r = layer == 0 ? 2 : 1;
    m.a = filled(r, 4, 1.0 + layer);
    m.b = filled(6, r, 5.0 + layer);
    a.modules.push_back(m);
  }
  a.full_tensors.push_back(io::peft_full_tensor::from_matrix("score.weight", filled(2, 6, 9.0)));
  return a;
}

// The second adapter: r = 2, lora_alpha = 2 (s = 1) on both c_attn and on an MLP module the first lacks.
io::peft_adapter second_adapter() {
  io::peft_adapter a;
  a.config.r = 2;
  a.config.lora_alpha = 2;
  a.config.fan_in_fan_out = true;
  a.config.target_modules = std::vector<std::string>{"c_attn", "c_proj"};
  for (const char* path :
       {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_proj"}) {
    io::peft_module m;
    m.path = path;
    const double seed = static_cast<double>(a.modules.size());
    m.a = filled(2, 4, 11.0 + seed);
    m.b = filled(6, 2, 15.0 + seed);
    a.modules.push_back(m);
  }
  return a;
}

int make(const std::string& dir) {
  io::safetensors_writer base;
  for (int layer = 0; layer < 2; ++layer) {
    base.add("h." + std::to_string(layer) + ".attn.c_attn.weight", filled(4, 6, 20.0 + layer), io::dtype::f32);
  }
  base.add("score.weight", filled(2, 6, 30.0), io::dtype::f32);
  base.add("wte.weight", filled(8, 6, 40.0), io::dtype::f16);
  base.set_metadata({{"format", "pt"}});
  base.write(dir + "/base.safetensors");
  fixture_adapter().save(dir + "/adapter");
  second_adapter().save(dir + "/adapter2");
  return 0;
}

int verify(const std::string& dir) {
  const io::safetensors_file base = io::safetensors_file::open(dir + "/base.safetensors");
  const io::safetensors_file merged = io::safetensors_file::open(dir + "/merged.safetensors");
  const io::peft_adapter a = fixture_adapter();
  int failures = 0;
  for (int layer = 0; layer < 2; ++layer) {
    const io::peft_module& m = a.modules[static_cast<std::size_t>(layer)];
    const double s = a.config.scaling_for(m.path);
    const std::string name = "h." + std::to_string(layer) + ".attn.c_attn.weight";
    const mat w = base.read_matrix<double>(name), got = merged.read_matrix<double>(name);
    for (lora::index i = 0; i < w.rows(); ++i) {    // in
      for (lora::index j = 0; j < w.cols(); ++j) {  // out
        double delta = 0;
        for (lora::index k = 0; k < m.a.rows(); ++k) delta += m.b(j, k) * m.a(k, i);
        // The adapter file holds A and B in F32, the merged weight is F32: agree to float precision.
        const double want = w(i, j) + s * delta;
        if (!(std::fabs(got(i, j) - want) <= 1e-5 * std::max(1.0, std::fabs(want)))) {
          std::fprintf(stderr, "verify: %s(%lld, %lld) is %.9g, want %.9g\n", name.c_str(), static_cast<long long>(i),
                       static_cast<long long>(j), got(i, j), want);
          ++failures;
        }
      }
    }
  }
  if (merged.read_matrix<double>("score.weight") != a.full_tensors[0].values<double>().reshaped(6, 2).transpose()) {
    std::fprintf(stderr, "verify: score.weight was not replaced\n");
    ++failures;
  }
  const io::tensor_bytes x = base.raw("wte.weight"), y = merged.raw("wte.weight");
  if (x.size() != y.size() || std::memcmp(x.data(), y.data(), x.size()) != 0 || merged.metadata() != base.metadata()) {
    std::fprintf(stderr, "verify: wte.weight or the metadata changed\n");
    ++failures;
  }
  std::printf("verify: %s\n", failures == 0 ? "ok" : "FAILED");
  return failures == 0 ? 0 : 1;
}

/// Counts, and prints, the entries of got that differ from want by more than 1e-12 relative.
int compare(const std::string& what, const mat& got, const mat& want) {
  if (got.rows() != want.rows() || got.cols() != want.cols()) {
    std::fprintf(stderr, "verify-cat: %s is %lldx%lld, want %lldx%lld\n", what.c_str(),
                 static_cast<long long>(got.rows()), static_cast<long long>(got.cols()),
                 static_cast<long long>(want.rows()), static_cast<long long>(want.cols()));
    return 1;
  }
  int failures = 0;
  for (lora::index i = 0; i < got.rows(); ++i) {
    for (lora::index j = 0; j < got.cols(); ++j) {
      if (std::fabs(got(i, j) - want(i, j)) <= 1e-12 * std::max(1.0, std::fabs(want(i, j)))) continue;
      std::fprintf(stderr, "verify-cat: %s(%lld, %lld) is %.17g, want %.17g\n", what.c_str(), static_cast<long long>(i),
                   static_cast<long long>(j), got(i, j), want(i, j));
      ++failures;
    }
  }
  return failures;
}

// cat with power-of-two c_i: c_i A_i is exact in F32, so B A must equal Σ c_i B_i A_i to double rounding.
int verify_cat(const std::string& dir, double w1, double w2) {
  const io::peft_adapter inputs[] = {io::peft_adapter::load(dir + "/adapter"),
                                     io::peft_adapter::load(dir + "/adapter2")};
  const double weights[] = {w1, w2};
  const io::peft_adapter out = io::peft_adapter::load(dir + "/combined");
  int failures = 0;
  const lora::index rank = inputs[0].config.r + inputs[1].config.r;  // both adapters' largest rank is r
  if (out.config.r != rank || out.config.lora_alpha != static_cast<double>(rank) || out.config.use_rslora) {
    std::fprintf(stderr, "verify-cat: config r = %lld, lora_alpha = %g, use_rslora = %d; want r = lora_alpha = %lld\n",
                 static_cast<long long>(out.config.r), out.config.lora_alpha, out.config.use_rslora ? 1 : 0,
                 static_cast<long long>(rank));
    ++failures;
  }
  if (out.modules.size() != 3) {
    std::fprintf(stderr, "verify-cat: %zu modules, want 3 (the union)\n", out.modules.size());
    ++failures;
  }
  for (const io::peft_module& m : out.modules) {
    mat want = mat::Zero(m.b.rows(), m.a.cols());
    for (int k = 0; k < 2; ++k) {
      if (const io::peft_module* src = inputs[k].find(m.path))
        want += weights[k] * inputs[k].config.scaling_for(m.path) * (src->b * src->a);
    }
    if (m.rank() != rank) {
      std::fprintf(stderr, "verify-cat: module %s has rank %lld\n", m.path.c_str(), static_cast<long long>(m.rank()));
      ++failures;
    }
    failures += compare(m.path, out.config.scaling_for(m.path) * (m.b * m.a), want);
  }
  std::printf("verify-cat: %s\n", failures == 0 ? "ok" : "FAILED");
  return failures == 0 ? 0 : 1;
}

struct run_result {
  int status = -1;
  std::string out, err;
};

/// Runs argv (no shell), capturing stdout and stderr.
run_result run(const std::vector<std::string>& args) {
  int out_pipe[2], err_pipe[2];
  if (::pipe(out_pipe) != 0 || ::pipe(err_pipe) != 0) throw std::runtime_error("pipe failed");
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    ::dup2(out_pipe[1], STDOUT_FILENO);
    ::dup2(err_pipe[1], STDERR_FILENO);
    ::close(out_pipe[0]);
    ::close(err_pipe[0]);
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    std::perror("execv");
    ::_exit(127);
  }
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  run_result r;
  // Drain both pipes (small outputs: read stderr after stdout reaches end of file).
  for (auto [fd, text] : {std::pair<int, std::string*>{out_pipe[0], &r.out}, {err_pipe[0], &r.err}}) {
    char buf[4096];
    for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;) text->append(buf, static_cast<std::size_t>(n));
    ::close(fd);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

int expect(bool ok_wanted, const std::string& contains, const std::vector<std::string>& cmd) {
  const run_result r = run(cmd);
  std::fputs(r.out.c_str(), stdout);
  std::fputs(r.err.c_str(), stdout);
  if (ok_wanted) {
    if (r.status != 0) {
      std::printf("expect-ok: exit status %d\n", r.status);
      return 1;
    }
    if (!contains.empty() && r.out.find(contains) == std::string::npos) {
      std::printf("expect-ok: stdout lacks '%s'\n", contains.c_str());
      return 1;
    }
    return 0;
  }
  const auto lines = std::count(r.err.begin(), r.err.end(), '\n');
  if (r.status == 0 || lines != 1 || r.err.back() != '\n') {
    std::printf("expect-error: exit status %d, %lld stderr lines (want non-zero and 1)\n", r.status,
                static_cast<long long>(lines));
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::vector<std::string> args(argv + 1, argv + argc);
    if (args.size() == 2 && args[0] == "make") return make(args[1]);
    if (args.size() == 2 && args[0] == "verify") return verify(args[1]);
    if (args.size() == 4 && args[0] == "verify-cat") return verify_cat(args[1], std::stod(args[2]), std::stod(args[3]));
    if (!args.empty() && (args[0] == "expect-ok" || args[0] == "expect-error")) {
      std::size_t k = 1;
      std::string contains;
      if (k + 1 < args.size() && args[k] == "--contains") {
        contains = args[k + 1];
        k += 2;
      }
      if (k < args.size() && args[k] == "--") ++k;
      if (k >= args.size()) throw std::runtime_error("no command given");
      return expect(args[0] == "expect-ok", contains,
                    std::vector<std::string>(args.begin() + static_cast<std::ptrdiff_t>(k), args.end()));
    }
    std::fputs(
        "usage: lora_tools_check make DIR | verify DIR | verify-cat DIR W1 W2 | expect-ok [--contains TEXT] -- "
        "CMD... | expect-error -- CMD...\n",
        stderr);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lora_tools_check: %s\n", e.what());
    return 1;
  }
}
