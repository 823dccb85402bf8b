// fashion_mnist: what LoRA promises, measured on real data.
//
//  1. Data: Fashion-MNIST from Debian's dataset-fashion-mnist package.
//  2. Base: an MLP 784-256-128-10 (ReLU, softmax cross-entropy) pretrained from scratch with Adam and
//     cached as a safetensors file, so later runs skip pretraining.
//  3. Two target domains from the same images: "mild" (12° rotation + 2-pixel shift) and "extreme" (a
//     fixed pixel permutation).
//  4. For each domain, starting from the same base each time: LoRA on all three dense layers at several
//     ranks, full fine-tuning, and head-only fine-tuning; same data, epochs, batch size and optimizer
//     family (Adam). Each run reports test accuracy, trainable parameters, training-state bytes
//     (parameters + gradients + Adam's two moments), peak RSS and seconds per epoch.
//  5. The best adapter is saved as a Hugging Face PEFT folder (adapter_config.json +
//     adapter_model.safetensors), loaded into a fresh copy of the base, merged, and the merged model's
//     accuracy is checked against the unmerged one.
#include <sys/stat.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <lora/io/peft.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/lora.hpp>
#include <lora/optim.hpp>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "common/domains.hpp"
#include "common/idx.hpp"
#include "common/nn.hpp"
#include "common/progress.hpp"

namespace ex = lora::examples;
using mat = lora::matrix<float>;

// ---------------------------------------------------------------------------------------------------
// Options

struct options {
  std::string data_dir = ex::fashion_mnist_default_dir;
  std::string cache_dir = ".cache/fashion_mnist";
  std::string json_path;
  std::string adapter_out = ".cache/fashion_mnist/best_adapter";
  std::vector<lora::index> ranks = {1, 4, 8};
  std::vector<std::string> domains = {"mild", "extreme"};
  int pretrain_epochs = 12;
  int epochs = 3;
  lora::index finetune_samples = 20000;
  lora::index batch = 64;
  double lr_lora = 5e-3;
  double lr_full = 1e-3;
  double alpha_over_rank = 2.0;
  std::uint64_t seed = 1;
  bool quiet = false;
  bool retrain = false;
};

const char* usage_text =
    "usage: fashion_mnist [options]\n"
    "\n"
    "Pretrains an MLP 784-256-128-10 on Fashion-MNIST (cached), then fine-tunes it on two shifted\n"
    "domains with LoRA at several ranks, full fine-tuning and head-only fine-tuning, and prints a table.\n"
    "\n"
    "options:\n"
    "  --data DIR            Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)\n"
    "  --cache DIR           where the pretrained base is cached (default .cache/fashion_mnist)\n"
    "  --retrain             pretrain the base again even if a cached one exists\n"
    "  --pretrain-epochs N   epochs of pretraining (default 12)\n"
    "  --ranks R1,R2,...     LoRA ranks to run (default 1,4,8)\n"
    "  --full                the whole sweep: ranks 1,2,4,8,16,32,64\n"
    "  --domains D1,D2       mild, extreme or both (default mild,extreme)\n"
    "  --epochs N            fine-tuning epochs per run (default 3)\n"
    "  --samples N           fine-tuning training samples, taken from the training split (default 20000)\n"
    "  --batch N             batch size (default 64)\n"
    "  --lr-lora X           Adam learning rate for LoRA runs (default 5e-3)\n"
    "  --lr-full X           Adam learning rate for full and head-only runs (default 1e-3)\n"
    "  --alpha-over-rank X   LoRA alpha = X * rank, so the scaling alpha/r is X (default 2)\n"
    "  --seed S              seed for initialisation, shuffling and the permutation (default 1)\n"
    "  --json PATH           also write the results as JSON\n"
    "  --adapter-out DIR     where the best adapter is saved as a PEFT folder (default "
    ".cache/fashion_mnist/best_adapter)\n"
    "  --quiet               no progress bar\n"
    "  --help                this text\n";

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

// Parses argv; prints a one-line error and exits 2 on a bad flag or value.
options parse_options(int argc, char** argv) {
  options o;
  auto fail = [](const std::string& msg) {
    std::fprintf(stderr, "fashion_mnist: %s (try --help)\n", msg.c_str());
    std::exit(2);
  };
  auto number = [&](const std::string& flag, const char* text, double lo) {
    char* end = nullptr;
    const double v = std::strtod(text, &end);
    if (end == text || *end != '\0' || !(v >= lo))
      fail(flag + " expects a number >= " + std::to_string(lo) + ", got '" + text + "'");
    return v;
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) fail(a + " needs a value");
      return argv[++i];
    };
    if (a == "--help" || a == "-h") {
      std::fputs(usage_text, stdout);
      std::exit(0);
    } else if (a == "--data")
      o.data_dir = value();
    else if (a == "--cache")
      o.cache_dir = value();
    else if (a == "--retrain")
      o.retrain = true;
    else if (a == "--pretrain-epochs")
      o.pretrain_epochs = static_cast<int>(number(a, value(), 1));
    else if (a == "--epochs")
      o.epochs = static_cast<int>(number(a, value(), 1));
    else if (a == "--samples")
      o.finetune_samples = static_cast<lora::index>(number(a, value(), 1));
    else if (a == "--batch")
      o.batch = static_cast<lora::index>(number(a, value(), 1));
    else if (a == "--lr-lora")
      o.lr_lora = number(a, value(), 0);
    else if (a == "--lr-full")
      o.lr_full = number(a, value(), 0);
    else if (a == "--alpha-over-rank")
      o.alpha_over_rank = number(a, value(), 0);
    else if (a == "--seed")
      o.seed = static_cast<std::uint64_t>(number(a, value(), 0));
    else if (a == "--json")
      o.json_path = value();
    else if (a == "--adapter-out")
      o.adapter_out = value();
    else if (a == "--quiet")
      o.quiet = true;
    else if (a == "--full")
      o.ranks = {1, 2, 4, 8, 16, 32, 64};
    else if (a == "--ranks") {
      o.ranks.clear();
      for (const auto& r : split_commas(value()))
        o.ranks.push_back(static_cast<lora::index>(number("--ranks", r.c_str(), 1)));
    } else if (a == "--domains") {
      o.domains = split_commas(value());
      for (const auto& d : o.domains)
        if (d != "mild" && d != "extreme") fail("--domains takes mild and/or extreme, got '" + d + "'");
    } else {
      fail("unknown option '" + a + "'");
    }
  }
  return o;
}

// ---------------------------------------------------------------------------------------------------
// The model: three dense layers. In LoRA mode each dense weight is viewed (not copied) by a
// lora::linear that carries the adapter; the dense weights stay frozen.

constexpr lora::index kIn = 784, kH1 = 256, kH2 = 128, kClasses = 10;

enum class method { full, head, lora };

const char* to_string(method m) { return m == method::full ? "full" : m == method::head ? "head" : "lora"; }

class mlp {
 public:
  explicit mlp(std::uint64_t seed) {
    lora::rng gen(seed);
    m_fc[0] = ex::dense<float>(kIn, kH1, gen);
    m_fc[1] = ex::dense<float>(kH1, kH2, gen);
    m_fc[2] = ex::dense<float>(kH2, kClasses, gen);
  }

  // Copies take the weights only: LoRA layers view their own object's weights, so a copy starts without them.
  mlp(const mlp& other) {
    for (int i = 0; i < 3; ++i) m_fc[i] = other.m_fc[i];
  }
  mlp& operator=(const mlp& other) {
    if (this != &other) {
      m_lora.clear();
      m_method = method::full;
      for (int i = 0; i < 3; ++i) m_fc[i] = other.m_fc[i];
    }
    return *this;
  }

  ex::dense<float>& fc(int i) { return m_fc[i]; }

  /// Prepares a fine-tuning method: LoRA wraps every dense weight with an adapter of `rank`.
  void prepare(method m, lora::index rank, double alpha, std::uint64_t seed) {
    m_method = m;
    m_lora.clear();
    if (m != method::lora) return;
    const char* names[3] = {"fc1", "fc2", "fc3"};
    for (int i = 0; i < 3; ++i) {
      m_lora.emplace_back(std::make_unique<lora::linear<float>>(lora::view, m_fc[i].weight, names[i]));
      m_lora.back()->set_bias(m_fc[i].bias);
      lora::adapter_config c;
      c.rank = rank;
      c.alpha = alpha;
      c.seed = seed + static_cast<std::uint64_t>(i);
      m_lora.back()->add_adapter("default", c);
    }
  }

  lora::linear<float>& lora_layer(int i) { return *m_lora[static_cast<std::size_t>(i)]; }

  /// Frozen layers viewing the dense weights, without adapters (for attaching a loaded one).
  void prepare_frozen() {
    prepare(method::lora, 1, 1.0, 0);
    for (auto& l : m_lora) {
      l->remove_adapter("default");
    }
  }

  /// The LoRA layers keyed by module path, as PEFT names them.
  std::vector<std::pair<std::string, lora::linear<float>*>> named_layers() {
    std::vector<std::pair<std::string, lora::linear<float>*>> out;
    for (auto& l : m_lora) out.emplace_back(l->name(), l.get());
    return out;
  }

  /// What the optimizer trains in the current method.
  lora::parameter_list<float> parameters() {
    lora::parameter_list<float> ps;
    auto add = [&](lora::parameter_list<float> more) { ps.insert(ps.end(), more.begin(), more.end()); };
    switch (m_method) {
      case method::full:
        for (int i = 0; i < 3; ++i) add(m_fc[i].parameters("fc" + std::to_string(i + 1)));
        break;
      case method::head:
        add(m_fc[2].parameters("fc3"));
        break;
      case method::lora:
        for (auto& l : m_lora) add(l->parameters());
        break;
    }
    return ps;
  }

  /// Training forward to logits (n x 10), caching what backward needs.
  const mat& forward(const mat& x) {
    if (m_method == method::lora) {
      m_z1 = m_lora[0]->forward(x);
      ex::relu_forward(m_z1, m_a1);
      m_z2 = m_lora[1]->forward(m_a1);
      ex::relu_forward(m_z2, m_a2);
      m_logits = m_lora[2]->forward(m_a2);
    } else {
      // Full: every layer caches its input. Head-only: the frozen body runs without caching.
      if (m_method == method::full)
        m_fc[0].forward(x, m_z1);
      else
        m_fc[0].apply(x, m_z1);
      ex::relu_forward(m_z1, m_a1);
      if (m_method == method::full)
        m_fc[1].forward(m_a1, m_z2);
      else
        m_fc[1].apply(m_a1, m_z2);
      ex::relu_forward(m_z2, m_a2);
      m_fc[2].forward(m_a2, m_logits);
    }
    return m_logits;
  }

  /// Backward from dL/dlogits; accumulates the gradients of the trained parameters only.
  void backward(const mat& dlogits) {
    if (m_method == method::lora) {
      m_d2 = m_lora[2]->backward(dlogits);
      ex::relu_backward(m_a2, m_d2, m_d2);
      m_d1 = m_lora[1]->backward(m_d2);
      ex::relu_backward(m_a1, m_d1, m_d1);
      m_lora[0]->backward_params_only(m_d1);  // the input needs no gradient
    } else if (m_method == method::full) {
      m_fc[2].backward(dlogits, m_d2);
      ex::relu_backward(m_a2, m_d2, m_d2);
      m_fc[1].backward(m_d2, m_d1);
      ex::relu_backward(m_a1, m_d1, m_d1);
      m_fc[0].backward(m_d1);
    } else {
      m_fc[2].backward(dlogits);
    }
  }

  /// Inference logits (const path: LoRA layers use infer, whatever is merged or not).
  void predict(const mat& x, mat& logits) {
    mat z1, a1, z2, a2;
    if (m_method == method::lora) {
      z1 = m_lora[0]->infer(x);
      ex::relu_forward(z1, a1);
      z2 = m_lora[1]->infer(a1);
      ex::relu_forward(z2, a2);
      logits = m_lora[2]->infer(a2);
    } else {
      m_fc[0].apply(x, z1);
      ex::relu_forward(z1, a1);
      m_fc[1].apply(a1, z2);
      ex::relu_forward(z2, a2);
      m_fc[2].apply(a2, logits);
    }
  }

  /// Accuracy over a data set, in chunks of 1000 rows.
  double accuracy(const mat& x, const std::vector<int>& y) {
    lora::index correct = 0;
    mat logits;
    for (lora::index r = 0; r < x.rows(); r += 1000) {
      const lora::index n = std::min<lora::index>(1000, x.rows() - r);
      predict(x.middleRows(r, n), logits);
      std::vector<int> labels(y.begin() + r, y.begin() + r + n);
      correct += ex::count_correct(logits, labels);
    }
    return static_cast<double>(correct) / static_cast<double>(x.rows());
  }

  /// The base model's weights as a safetensors file (atomic write).
  void save(const std::string& path, const std::map<std::string, std::string>& meta) const {
    lora::io::safetensors_writer w;
    for (int i = 0; i < 3; ++i) {
      const std::string p = "fc" + std::to_string(i + 1);
      w.add(p + ".weight", m_fc[i].weight);
      w.add(p + ".bias", m_fc[i].bias);
    }
    w.set_metadata(meta);
    w.write(path);
  }

  /// Loads weights saved by save(); throws lora::error on a missing, malformed or mismatched file.
  std::map<std::string, std::string> load(const std::string& path) {
    const auto f = lora::io::safetensors_file::open(path);
    ex::dense<float> fc[3] = {m_fc[0], m_fc[1], m_fc[2]};  // all-or-nothing: fill copies first
    for (int i = 0; i < 3; ++i) {
      const std::string p = "fc" + std::to_string(i + 1);
      const mat w = f.read_matrix<float>(p + ".weight");
      const mat b = f.read_matrix<float>(p + ".bias");
      if (w.rows() != fc[i].weight.rows() || w.cols() != fc[i].weight.cols() || b.size() != fc[i].bias.size())
        throw lora::shape_error(lora::detail::cat("cached base '", path, "': ", p, " has shape ",
                                                  lora::detail::shape_str(w.rows(), w.cols()), ", expected ",
                                                  lora::detail::shape_str(fc[i].weight.rows(), fc[i].weight.cols())));
      fc[i].weight = w;
      fc[i].bias = b.col(0);
    }
    for (int i = 0; i < 3; ++i) m_fc[i] = fc[i];
    return f.metadata();
  }

 private:
  ex::dense<float> m_fc[3];
  method m_method = method::full;
  std::vector<std::unique_ptr<lora::linear<float>>> m_lora;
  mat m_z1, m_a1, m_z2, m_a2, m_logits, m_d1, m_d2;
};

// ---------------------------------------------------------------------------------------------------
// Training

struct train_result {
  double seconds_per_epoch = 0;
  std::int64_t train_state_bytes = 0;
  std::int64_t trainable_params = 0;
};

// Resets the kernel's peak-RSS counter (VmHWM) so the next reading covers one run (Linux >= 4.0).
void reset_peak_rss() {
  std::ofstream clear("/proc/self/clear_refs");
  if (clear) clear << "5";
}

// Trains the model's current method with Adam on (x, y) for `epochs` epochs.
train_result train(mlp& model, const mat& x, const std::vector<int>& y, int epochs, lora::index batch, double lr,
                   std::uint64_t seed, const std::string& label, bool quiet) {
  lora::parameter_list<float> params = model.parameters();
  lora::optim::adam_options opts;
  opts.lr = lr;
  lora::optim::adam<float> opt(params, opts);
  lora::optim::step_guard<float> guard(opt);  // a non-finite loss or gradient stops the run, not the model
  ex::minibatches batches(x.rows(), batch, seed);
  ex::progress_bar bar(quiet);
  mat xb, probs, dlogits;
  std::vector<int> yb;
  const auto start = std::chrono::steady_clock::now();
  for (int e = 0; e < epochs; ++e) {
    batches.shuffle();
    bar.begin(label + " epoch " + std::to_string(e + 1) + "/" + std::to_string(epochs), batches.count());
    for (lora::index k = 0; k < batches.count(); ++k) {
      ex::gather_rows(x, batches.rows(k), batches.size(k), xb);
      ex::gather_labels(y, batches.rows(k), batches.size(k), yb);
      const double loss = ex::softmax_cross_entropy_forward(model.forward(xb), yb, probs);
      ex::softmax_cross_entropy_backward(probs, yb, dlogits);
      opt.zero_grad();
      model.backward(dlogits);
      guard.step(loss);
      bar.step(batches.size(k), loss);
    }
    bar.finish();
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  train_result r;
  r.seconds_per_epoch = seconds / epochs;
  for (const auto& p : params) r.trainable_params += p.size();
  // Parameters + gradients + optimizer state (Adam: exp_avg and exp_avg_sq).
  r.train_state_bytes =
      2 * r.trainable_params * static_cast<std::int64_t>(sizeof(float)) + static_cast<std::int64_t>(opt.state_bytes());
  return r;
}

// ---------------------------------------------------------------------------------------------------
// Results

struct run_record {
  std::string domain;
  method m;
  lora::index rank;
  double accuracy;
  std::int64_t trainable_params, train_state_bytes, peak_rss_bytes;
  double seconds_per_epoch;
};

void write_json(const std::string& path, double base_accuracy, const std::map<std::string, double>& base_on_domain,
                const std::vector<run_record>& runs) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    if (!out) throw lora::io_error("cannot write '" + tmp + "'");
    out << "{\n  \"base_test_accuracy\": " << base_accuracy << ",\n  \"base_domain_accuracy\": {";
    bool first = true;
    for (const auto& [d, a] : base_on_domain) {
      out << (first ? "" : ", ") << "\"" << d << "\": " << a;
      first = false;
    }
    out << "},\n  \"runs\": [\n";
    for (std::size_t i = 0; i < runs.size(); ++i) {
      const auto& r = runs[i];
      out << "    {\"domain\": \"" << r.domain << "\", \"method\": \"" << to_string(r.m) << "\", \"rank\": " << r.rank
          << ", \"accuracy\": " << r.accuracy << ", \"trainable_params\": " << r.trainable_params
          << ", \"train_state_bytes\": " << r.train_state_bytes << ", \"peak_rss_bytes\": " << r.peak_rss_bytes
          << ", \"seconds_per_epoch\": " << r.seconds_per_epoch << "}" << (i + 1 < runs.size() ? "," : "") << "\n";
    }
    out << "  ]\n}\n";
    if (!out.flush()) throw lora::io_error("cannot write '" + tmp + "'");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0)
    throw lora::io_error("cannot rename '" + tmp + "' to '" + path + "'");
}

void make_dirs(const std::string& path) {
  std::string partial;
  for (const auto& part : split_commas([&] {
         std::string s = path;
         std::replace(s.begin(), s.end(), '/', ',');
         return s;
       }())) {
    partial += (partial.empty() && path[0] != '/' ? "" : "/") + part;
    ::mkdir(partial.c_str(), 0755);
  }
}

std::string human_bytes(std::int64_t b) {
  char buf[32];
  if (b >= (1 << 20))
    std::snprintf(buf, sizeof buf, "%.2f MiB", static_cast<double>(b) / (1 << 20));
  else
    std::snprintf(buf, sizeof buf, "%.1f KiB", static_cast<double>(b) / 1024);
  return buf;
}

// ---------------------------------------------------------------------------------------------------

int run(const options& o) {
  // 1. Data.
  std::printf("loading Fashion-MNIST from %s\n", o.data_dir.c_str());
  const ex::image_dataset data = ex::load_fashion_mnist(o.data_dir);
  std::printf("  %lld training and %lld test images\n", static_cast<long long>(data.train_x.rows()),
              static_cast<long long>(data.test_x.rows()));

  // 2. The base model, pretrained once and cached.
  make_dirs(o.cache_dir);
  const std::string base_path = o.cache_dir + "/base_mlp.safetensors";
  const std::string base_key = "seed=" + std::to_string(o.seed) + ";epochs=" + std::to_string(o.pretrain_epochs);
  mlp base(o.seed);
  bool cached = false;
  if (!o.retrain) {
    try {
      const auto meta = base.load(base_path);
      cached = meta.count("config") && meta.at("config") == base_key;
      if (cached) std::printf("using the cached base model %s\n", base_path.c_str());
    } catch (const lora::error&) {
      cached = false;  // missing or unreadable: pretrain below
    }
  }
  if (!cached) {
    base = mlp(o.seed);
    std::printf("pretraining the base MLP 784-256-128-10 for %d epochs (cached afterwards)\n", o.pretrain_epochs);
    base.prepare(method::full, 0, 0, 0);
    train(base, data.train_x, data.train_y, o.pretrain_epochs, 128, 1e-3, o.seed, "pretrain", o.quiet);
  }
  base.prepare(method::full, 0, 0, 0);
  const double base_accuracy = base.accuracy(data.test_x, data.test_y);
  if (!cached) base.save(base_path, {{"config", base_key}, {"test_accuracy", std::to_string(base_accuracy)}});
  std::printf("base model test accuracy: %.4f\n\n", base_accuracy);

  // 3.-4. Domains and runs.
  const lora::index n_ft = std::min<lora::index>(o.finetune_samples, data.train_x.rows());
  std::vector<int> y_ft(data.train_y.begin(), data.train_y.begin() + n_ft);
  std::vector<run_record> runs;
  std::map<std::string, double> base_on_domain;
  struct best_adapter {
    double accuracy = -1;
    lora::index rank = 0;
    std::string domain;
    lora::io::peft_adapter adapter;
  } best;
  for (const auto& dname : o.domains) {
    const ex::domain d = ex::parse_domain(dname);
    const mat x_ft = ex::shift_domain(data.train_x.topRows(n_ft), d);
    const mat x_test = ex::shift_domain(data.test_x, d);
    base.prepare(method::full, 0, 0, 0);
    base_on_domain[dname] = base.accuracy(x_test, data.test_y);
    std::printf("domain %-7s: base model accuracy %.4f\n", dname.c_str(), base_on_domain[dname]);

    struct plan {
      method m;
      lora::index rank;
    };
    std::vector<plan> plans;
    for (lora::index r : o.ranks) plans.push_back({method::lora, r});
    plans.push_back({method::full, 0});
    plans.push_back({method::head, 0});
    for (const auto& p : plans) {
      mlp model = base;  // a fresh copy of the base for every run
      const double alpha = o.alpha_over_rank * static_cast<double>(p.rank);
      model.prepare(p.m, p.rank, alpha, o.seed + 100);
      const std::string label =
          dname + " " + to_string(p.m) + (p.m == method::lora ? " r=" + std::to_string(p.rank) : std::string());
      reset_peak_rss();
      const train_result tr = train(model, x_ft, y_ft, o.epochs, o.batch, p.m == method::lora ? o.lr_lora : o.lr_full,
                                    o.seed + 7, label, o.quiet);
      run_record rec{dname,
                     p.m,
                     p.rank,
                     model.accuracy(x_test, data.test_y),
                     tr.trainable_params,
                     tr.train_state_bytes,
                     static_cast<std::int64_t>(ex::peak_rss_bytes()),
                     tr.seconds_per_epoch};
      runs.push_back(rec);
      std::printf("  %-16s accuracy %.4f  trainable %8lld  train state %10s  %.2f s/epoch\n", label.c_str(),
                  rec.accuracy, static_cast<long long>(rec.trainable_params),
                  human_bytes(rec.train_state_bytes).c_str(), rec.seconds_per_epoch);
      if (p.m == method::lora && rec.accuracy > best.accuracy) {
        best.accuracy = rec.accuracy;
        best.rank = p.rank;
        best.domain = dname;
        lora::io::peft_config base_config;
        base_config.base_model_name_or_path = base_path;
        best.adapter = lora::io::peft_adapter::from_layers(model.named_layers(), "default", base_config);
      }
    }
    std::printf("\n");
  }

  // The table.
  std::printf("%-8s %-6s %5s %9s %12s %14s %14s %9s\n", "domain", "method", "rank", "accuracy", "trainable",
              "train state", "peak RSS", "s/epoch");
  for (const auto& r : runs) {
    std::printf("%-8s %-6s %5lld %9.4f %12lld %14s %14s %9.2f\n", r.domain.c_str(), to_string(r.m),
                static_cast<long long>(r.rank), r.accuracy, static_cast<long long>(r.trainable_params),
                human_bytes(r.train_state_bytes).c_str(), human_bytes(r.peak_rss_bytes).c_str(), r.seconds_per_epoch);
  }
  if (!o.json_path.empty()) {
    write_json(o.json_path, base_accuracy, base_on_domain, runs);
    std::printf("\nresults written to %s\n", o.json_path.c_str());
  }

  // 5. Save the best adapter, load it into a fresh copy of the base, and merge it.
  if (best.accuracy >= 0) {
    best.adapter.save(o.adapter_out);
    const auto loaded = lora::io::peft_adapter::load(o.adapter_out);
    mlp fresh = base;
    fresh.prepare_frozen();
    lora::io::attach(loaded, fresh.named_layers(), "default");
    const ex::domain d = ex::parse_domain(best.domain);
    const mat x_test = ex::shift_domain(data.test_x, d);
    const double unmerged = fresh.accuracy(x_test, data.test_y);
    for (int i = 0; i < 3; ++i) fresh.lora_layer(i).merge();
    const double merged = fresh.accuracy(x_test, data.test_y);
    std::printf("\nbest adapter: %s domain, rank %lld, saved as a PEFT adapter in %s\n", best.domain.c_str(),
                static_cast<long long>(best.rank), o.adapter_out.c_str());
    std::printf("reloaded into a fresh model: unmerged accuracy %.4f, merged accuracy %.4f (%s)\n", unmerged, merged,
                merged == unmerged ? "equal" : "DIFFERENT");
    if (merged != unmerged) return 1;
  }
  return 0;
}

int main(int argc, char** argv) {
  const options o = parse_options(argc, argv);
  try {
    return run(o);
  } catch (const lora::error& e) {
    std::fprintf(stderr, "fashion_mnist: %s\n", e.what());
    return 1;
  }
}
