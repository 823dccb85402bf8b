// fashion_mnist: LoRA against full and head-only fine-tuning, measured on real data.
//
//  1. Data. Fashion-MNIST (Debian's dataset-fashion-mnist). Training images 0..49,999 pretrain the base
//     and supply the fine-tuning subsamples; images 50,000..59,999 are never trained on and supply the
//     validation splits; the 10,000 test images are only ever evaluated.
//  2. Base model. An MLP 784-256-128-10 (ReLU, softmax cross-entropy), pretrained once with a fixed
//     seed and Adam, cached as a safetensors file so that later runs skip pretraining.
//  3. Adapter. Two target domains built from the same images, "mild" (12° rotation + 2-pixel shift) and
//     "extreme" (a fixed pixel permutation). For each, starting from the same base every time: LoRA on
//     all three layers (lora::linear views of the base weights) at several ranks; full fine-tuning and
//     head-only fine-tuning (the base's own dense parameters, all or the last layer's).
//  4. Training loop. One loop for every method: minibatches, forward, loss, backward, guarded Adam step.
//  5. Evaluation. Each method's learning rate is chosen on the validation split of the first seed
//     (the test set plays no part); every further seed (adapter init, data order, fine-tuning
//     subsample, validation split) is trained at that rate. Each seed's run at the chosen rate, and no
//     other run, is evaluated once on the test set. The table shows the mean ± sample standard
//     deviation over seeds, trainable parameters, training-state bytes (parameters + gradients + Adam's
//     two moments) and seconds per epoch.
//  6. Save. The LoRA adapter with the best validation accuracy is saved as a Hugging Face PEFT folder,
//     loaded into a fresh copy of the base, and merged; its accuracies must agree.
//
// --json PATH writes the results (accuracies are fractions in [0, 1]; "std" is the sample standard
// deviation over seeds, null with one seed):
//   {"config": {"domains", "ranks", "seeds", "selection_seed", "epochs", "samples", "val_samples",
//               "batch", "alpha_over_rank", "pretrain_epochs", "lr_grid": {"lora", "full", "head"}},
//    "base": {"test_accuracy": on the unshifted test set, "domain_test_accuracy": {"mild", "extreme"}},
//    "results": [{"domain", "method": "lora" | "full" | "head", "rank": LoRA rank (0 otherwise),
//                 "lr": the chosen learning rate,
//                 "selection": [{"lr", "val_accuracy"}, ...] on the selection seed (empty: one rate given),
//                 "val_accuracy": {"mean", "std", "per_seed": [...]}, "test_accuracy": {the same},
//                 "trainable_params", "train_state_bytes", "seconds_per_epoch": of the fastest run}, ...],
//    "adapter_check": {"domain", "rank", "seed", "path", "test_accuracy": after training,
//                      "reloaded_unmerged", "reloaded_merged": test accuracies after reloading,
//                      "ok": whether all three are equal}}
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <lora/io/atomic_file.hpp>
#include <lora/io/peft.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/lora.hpp>
#include <lora/optim.hpp>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "common/dist.hpp"
#include "common/domains.hpp"
#include "common/idx.hpp"
#include "common/nn.hpp"
#include "common/progress.hpp"
#include "common/strings.hpp"

using mat = lora::matrix<float>;

// ---------------------------------------------------------------------------------------------------
// Options

struct options {
  std::string data_dir = ex::fashion_mnist_default_dir;
  std::string cache_dir = ".cache/fashion_mnist";
  std::string json_path;
  std::string adapter_out = ".cache/fashion_mnist/best_adapter";
  std::vector<std::string> domains = {"mild", "extreme"};
  std::vector<lora::index> ranks = {1, 4, 8};
  std::vector<std::uint64_t> seeds = {1, 2, 3};
  std::vector<double> lr_lora = {1e-3, 2e-3, 5e-3, 1e-2};
  std::vector<double> lr_full = {1e-3, 2e-3, 5e-3};
  std::vector<double> lr_head = {3e-3, 1e-2, 3e-2, 1e-1};
  int pretrain_epochs = 12;
  int epochs = 3;
  lora::index samples = 20000;
  lora::index val_samples = 5000;
  lora::index batch = 64;
  double alpha_over_rank = 2.0;
  bool retrain = false;
  bool quiet = false;
};

const char* usage_text =
    "usage: fashion_mnist [options]\n"
    "\n"
    "Pretrains an MLP 784-256-128-10 on Fashion-MNIST (once, cached), then fine-tunes it on two shifted\n"
    "domains with LoRA at several ranks, full fine-tuning and head-only fine-tuning. Each method's learning\n"
    "rate is chosen on a validation split carved from the training images (with the first seed); the test\n"
    "set is evaluated at the chosen rate only, for every seed, and reported as mean +- std.\n"
    "\n"
    "options:\n"
    "  --data DIR            Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)\n"
    "  --cache DIR           where the pretrained base is cached (default .cache/fashion_mnist)\n"
    "  --retrain             pretrain the base again even if a cached one exists\n"
    "  --pretrain-epochs N   epochs of pretraining (default 12)\n"
    "  --domains D1,D2       mild, extreme or both (default mild,extreme)\n"
    "  --ranks R1,R2,...     LoRA ranks (default 1,4,8)\n"
    "  --full                more ranks, 1,2,4,8,16,32,64, and LoRA rates from 5e-4\n"
    "  --quick               a small run: rank 4, 5000 samples, 2 epochs (explicit flags still apply)\n"
    "  --seeds S1,S2,...     one run per seed: adapter init, data order, subsample, validation split\n"
    "                        (default 1,2,3; the first also selects the learning rates)\n"
    "  --epochs N            fine-tuning epochs per run (default 3)\n"
    "  --samples N           fine-tuning images per run, from training images 0..49999 (default 20000)\n"
    "  --val N               validation images per seed, from training images 50000..59999 (default 5000)\n"
    "  --batch N             batch size (default 64)\n"
    "  --lr-lora X1,X2,...   Adam learning rates tried for LoRA (default 1e-3,2e-3,5e-3,1e-2;\n"
    "                        a single value is used as given, without selection)\n"
    "  --lr-full X1,X2,...   the same for full fine-tuning (default 1e-3,2e-3,5e-3)\n"
    "  --lr-head X1,X2,...   the same for head-only fine-tuning (default 3e-3,1e-2,3e-2,1e-1)\n"
    "  --alpha-over-rank X   LoRA alpha = X * rank, so the scaling alpha/r is X (default 2)\n"
    "  --json PATH           also write the results as JSON\n"
    "  --adapter-out DIR     where the best adapter is saved as a PEFT folder\n"
    "                        (default .cache/fashion_mnist/best_adapter)\n"
    "  --quiet               no progress bar\n"
    "  --help                this text\n";

[[noreturn]] void usage_error(const std::string& message) {
  std::fprintf(stderr, "fashion_mnist: %s (try --help)\n", message.c_str());
  std::exit(2);
}

// `text` as a number >= lo, or a usage error naming `flag`.
double parse_number(const std::string& flag, const std::string& text, double lo) {
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !(v >= lo) || !std::isfinite(v))
    usage_error(ex::cat(flag, " expects a number >= ", lo, ", got '", text, "'"));
  return v;
}

// A comma-separated list of numbers >= lo, each converted to T; at least one.
template <typename T>
std::vector<T> parse_list(const std::string& flag, const std::string& text, double lo) {
  std::vector<T> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) out.push_back(static_cast<T>(parse_number(flag, item, lo)));
  if (out.empty()) usage_error(flag + " needs at least one value");
  return out;
}

// "mild", "extreme" or both, comma-separated.
std::vector<std::string> parse_domains(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  for (std::string d; std::getline(in, d, ',');) {
    if (d != "mild" && d != "extreme") usage_error("--domains takes mild and/or extreme, got '" + d + "'");
    out.push_back(d);
  }
  if (out.empty()) usage_error("--domains needs at least one domain");
  return out;
}

// Parses argv; prints a one-line error and exits 2 on a bad flag or value. --quick and --full set
// defaults first, so that explicit flags override them wherever they stand.
options parse_options(int argc, char** argv) {
  options o;
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (std::count(args.begin(), args.end(), "--quick")) {
    o.ranks = {4};
    o.samples = 5000;
    o.epochs = 2;
  }
  if (std::count(args.begin(), args.end(), "--full")) {
    o.ranks = {1, 2, 4, 8, 16, 32, 64};
    o.lr_lora = {5e-4, 1e-3, 2e-3, 5e-3, 1e-2};  // with alpha = 2r, large ranks prefer smaller rates
  }
  // Flags without a value, and flags with one: a table from flag to what it sets.
  using flag = std::string;
  const std::map<flag, std::function<void()>> switches = {
      {"--help",
       [] {
         std::fputs(usage_text, stdout);
         std::exit(0);
       }},
      {"--quick", [] {}},  // applied above
      {"--full", [] {}},
      {"--retrain", [&] { o.retrain = true; }},
      {"--quiet", [&] { o.quiet = true; }},
  };
  const std::map<flag, std::function<void(const flag&, const std::string&)>> setters = {
      {"--data", [&](const flag&, const std::string& v) { o.data_dir = v; }},
      {"--cache", [&](const flag&, const std::string& v) { o.cache_dir = v; }},
      {"--json", [&](const flag&, const std::string& v) { o.json_path = v; }},
      {"--adapter-out", [&](const flag&, const std::string& v) { o.adapter_out = v; }},
      {"--domains", [&](const flag&, const std::string& v) { o.domains = parse_domains(v); }},
      {"--ranks", [&](const flag& f, const std::string& v) { o.ranks = parse_list<lora::index>(f, v, 1); }},
      {"--seeds", [&](const flag& f, const std::string& v) { o.seeds = parse_list<std::uint64_t>(f, v, 0); }},
      {"--lr-lora", [&](const flag& f, const std::string& v) { o.lr_lora = parse_list<double>(f, v, 0); }},
      {"--lr-full", [&](const flag& f, const std::string& v) { o.lr_full = parse_list<double>(f, v, 0); }},
      {"--lr-head", [&](const flag& f, const std::string& v) { o.lr_head = parse_list<double>(f, v, 0); }},
      {"--pretrain-epochs",
       [&](const flag& f, const std::string& v) { o.pretrain_epochs = static_cast<int>(parse_number(f, v, 1)); }},
      {"--epochs", [&](const flag& f, const std::string& v) { o.epochs = static_cast<int>(parse_number(f, v, 1)); }},
      {"--samples",
       [&](const flag& f, const std::string& v) { o.samples = static_cast<lora::index>(parse_number(f, v, 1)); }},
      {"--val",
       [&](const flag& f, const std::string& v) { o.val_samples = static_cast<lora::index>(parse_number(f, v, 1)); }},
      {"--batch",
       [&](const flag& f, const std::string& v) { o.batch = static_cast<lora::index>(parse_number(f, v, 1)); }},
      {"--alpha-over-rank", [&](const flag& f, const std::string& v) { o.alpha_over_rank = parse_number(f, v, 0); }},
  };
  for (std::size_t i = 0; i < args.size(); ++i) {
    const flag& a = args[i] == "-h" ? "--help" : args[i];
    if (const auto s = switches.find(a); s != switches.end()) {
      s->second();
    } else if (const auto set = setters.find(a); set != setters.end()) {
      if (i + 1 >= args.size()) usage_error(a + " needs a value");
      set->second(a, args[++i]);
    } else {
      usage_error("unknown option '" + a + "'");
    }
  }
  return o;
}

// ---------------------------------------------------------------------------------------------------
// 1. Data

constexpr lora::index kPretrainImages = 50000;  // training images 0..49,999; the rest are held out

/// Images (n x 784, one per row, values in [0, 1]) and their labels (n values in [0, 10)).
struct labelled {
  mat x;
  std::vector<int> y;
};

/// Fashion-MNIST cut into the three parts the protocol keeps apart.
struct fashion_mnist {
  labelled pretrain;  ///< training images 0..49,999: pretraining, and the fine-tuning subsamples
  labelled held_out;  ///< training images 50,000..59,999: never trained on; the validation splits
  labelled test;      ///< the test set: evaluated only
};

fashion_mnist load_data(const std::string& dir) {
  std::printf("loading Fashion-MNIST from %s\n", dir.c_str());
  ex::image_dataset d = ex::load_fashion_mnist(dir);
  const lora::index n = d.train_x.rows();
  if (n <= kPretrainImages)
    throw lora::format_error(ex::cat("expected more than ", kPretrainImages, " training images, found ", n));
  fashion_mnist data;
  data.pretrain = {d.train_x.topRows(kPretrainImages), {d.train_y.begin(), d.train_y.begin() + kPretrainImages}};
  data.held_out = {d.train_x.bottomRows(n - kPretrainImages), {d.train_y.begin() + kPretrainImages, d.train_y.end()}};
  data.test = {std::move(d.test_x), std::move(d.test_y)};
  std::printf("  %lld images for pretraining and fine-tuning, %lld held out for validation, %lld test\n",
              static_cast<long long>(data.pretrain.x.rows()), static_cast<long long>(data.held_out.x.rows()),
              static_cast<long long>(data.test.x.rows()));
  return data;
}

/// `count` distinct rows of `from` drawn uniformly at random (partial Fisher-Yates), shifted into domain d.
labelled random_subset(const labelled& from, lora::index count, lora::rng& gen, ex::domain d) {
  const lora::index n = from.x.rows();
  if (count > n) throw lora::config_error(ex::cat("asked for ", count, " images of a set of ", n));
  std::vector<lora::index> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), lora::index{0});
  for (lora::index i = 0; i < count; ++i) std::swap(order[i], order[i + gen.below(n - i)]);
  labelled out;
  mat x;
  ex::gather_rows(from.x, order.data(), count, x);
  out.x = ex::shift_domain(x, d);
  ex::gather_labels(from.y, order.data(), count, out.y);
  return out;
}

/// One seed's data in a domain: the fine-tuning subsample and the validation split, disjoint.
struct seed_splits {
  labelled train;
  labelled val;
};

seed_splits draw_splits(const fashion_mnist& data, ex::domain d, std::uint64_t seed, const options& o) {
  lora::rng gen(seed);
  seed_splits s;
  s.train = random_subset(data.pretrain, o.samples, gen, d);
  s.val = random_subset(data.held_out, o.val_samples, gen, d);
  return s;
}

labelled shifted(const labelled& from, ex::domain d) { return {ex::shift_domain(from.x, d), from.y}; }

// ---------------------------------------------------------------------------------------------------
// 2. The base model: 784 -> 256 -> ReLU -> 128 -> ReLU -> 10 logits, weights W: out x in.

constexpr lora::index kIn = 784, kH1 = 256, kH2 = 128, kClasses = 10;
constexpr std::uint64_t kBaseSeed = 1;  // the base is the same for every seed of the experiment

/// Plain dense layers, trained whole (pretraining, full fine-tuning) or only in the head. Activations:
/// z1, a1: n x 256; z2, a2: n x 128; logits: n x 10; d1, d2: gradients of a1, a2.
struct base_mlp {
  ex::dense<float> fc1, fc2, fc3;
  /// Head-only fine-tuning: fc1 and fc2 are frozen (PyTorch: requires_grad_(False)); backward stops at fc3.
  bool body_frozen = false;

  explicit base_mlp(std::uint64_t seed) {
    lora::rng gen(seed);
    fc1 = ex::dense<float>(kIn, kH1, gen);
    fc2 = ex::dense<float>(kH1, kH2, gen);
    fc3 = ex::dense<float>(kH2, kClasses, gen);
  }

  /// What trains: every weight and bias, or fc3's alone when the body is frozen.
  lora::parameter_list<float> parameters() {
    lora::parameter_list<float> ps = fc3.parameters("fc3");
    if (body_frozen) return ps;
    for (auto& p : fc1.parameters("fc1")) ps.push_back(p);
    for (auto& p : fc2.parameters("fc2")) ps.push_back(p);
    return ps;
  }

  /// x: n x 784 -> logits: n x 10, caching what backward needs.
  const mat& forward(const mat& x) {
    fc1.forward(x, z1);
    ex::relu_forward(z1, a1);
    fc2.forward(a1, z2);
    ex::relu_forward(z2, a2);
    fc3.forward(a2, logits);
    return logits;
  }

  /// dlogits: n x 10. Accumulates dW, db of the layers that train.
  void backward(const mat& dlogits) {
    if (body_frozen) {
      fc3.backward(dlogits);
      return;
    }
    fc3.backward(dlogits, d2);
    ex::relu_backward(a2, d2, d2);
    fc2.backward(d2, d1);
    ex::relu_backward(a1, d1, d1);
    fc1.backward(d1);  // the input needs no gradient
  }

  /// Inference logits, n x 10, without caching.
  mat predict(const mat& x) const {
    mat z, h1, h2, out;
    fc1.apply(x, z);
    ex::relu_forward(z, h1);
    fc2.apply(h1, z);
    ex::relu_forward(z, h2);
    fc3.apply(h2, out);
    return out;
  }

  mat z1, a1, z2, a2, logits, d1, d2;
};

/// Writes fc{1,2,3}.{weight,bias} and `key` (the pretraining config) as metadata. safetensors_writer
/// writes atomically: the file is the old one or the complete new one.
void save_base(const base_mlp& m, const std::string& path, const std::string& key) {
  lora::io::safetensors_writer w;
  const std::pair<const char*, const ex::dense<float>*> layers[] = {{"fc1", &m.fc1}, {"fc2", &m.fc2}, {"fc3", &m.fc3}};
  for (const auto& [name, layer] : layers) {
    w.add(std::string(name) + ".weight", layer->weight);
    w.add(std::string(name) + ".bias", layer->bias);
  }
  w.set_metadata({{"config", key}});
  w.write(path);
}

/// Loads weights saved by save_base with the same `key`; false (m untouched) when the file is
/// missing, unreadable, from another config or of other shapes.
bool load_base(base_mlp& m, const std::string& path, const std::string& key) {
  if (!std::filesystem::exists(path)) return false;
  try {
    const auto file = lora::io::safetensors_file::open(path);
    const auto& meta = file.metadata();
    if (!meta.count("config") || meta.at("config") != key) return false;
    base_mlp loaded = m;
    const std::pair<const char*, ex::dense<float>*> layers[] = {
        {"fc1", &loaded.fc1}, {"fc2", &loaded.fc2}, {"fc3", &loaded.fc3}};
    for (const auto& [name, layer] : layers) {
      const mat w = file.read_matrix<float>(std::string(name) + ".weight");
      const lora::vector<float> b = file.read_vector<float>(std::string(name) + ".bias");
      if (w.rows() != layer->weight.rows() || w.cols() != layer->weight.cols() || b.size() != layer->bias.size())
        return false;
      layer->weight = w;
      layer->bias = b;
    }
    m = loaded;
    return true;
  } catch (const lora::error& e) {
    std::printf("cannot use the cached base (%s); pretraining again\n", e.what());
    return false;
  }
}

// ---------------------------------------------------------------------------------------------------
// 3. The adapter: the same three layers as lora::linear views of a base_mlp's weights (frozen, never
// copied), each carrying adapter "default": fc(x) = x Wᵀ + b + s (x Aᵀ) Bᵀ, A: r x in, B: out x r.

class lora_mlp {
 public:
  /// Views base's weights (base must outlive this model; merge() writes into them) and copies its
  /// biases. No adapter yet: the model computes the base.
  explicit lora_mlp(base_mlp& base)
      : m_fc1(lora::view, base.fc1.weight, "fc1"),
        m_fc2(lora::view, base.fc2.weight, "fc2"),
        m_fc3(lora::view, base.fc3.weight, "fc3") {
    m_fc1.set_bias(base.fc1.bias);
    m_fc2.set_bias(base.fc2.bias);
    m_fc3.set_bias(base.fc3.bias);
  }
  lora_mlp(const lora_mlp&) = delete;
  lora_mlp& operator=(const lora_mlp&) = delete;

  /// Adds adapter "default" of `rank` to every layer: A kaiming-uniform, B = 0, so the model starts
  /// as the base; scaling s = alpha / rank.
  void add_adapter(lora::index rank, double alpha, std::uint64_t seed) {
    std::uint64_t layer_seed = 1000 * seed;
    for (lora::linear<float>* layer : {&m_fc1, &m_fc2, &m_fc3}) {
      lora::adapter_config c;
      c.rank = rank;
      c.alpha = alpha;
      c.seed = layer_seed++;
      layer->add_adapter("default", c);
    }
  }

  /// The adapters' A and B (what trains); W and b stay frozen.
  lora::parameter_list<float> parameters() { return lora::collect_parameters<float>(m_fc1, m_fc2, m_fc3); }

  /// x: n x 784 -> logits: n x 10. Each layer caches a view of its input: x must live until backward.
  const mat& forward(const mat& x) {
    m_z1 = m_fc1.forward(x);
    ex::relu_forward(m_z1, m_a1);
    m_z2 = m_fc2.forward(m_a1);
    ex::relu_forward(m_z2, m_a2);
    m_logits = m_fc3.forward(m_a2);
    return m_logits;
  }

  /// dlogits: n x 10. Accumulates dA, dB of every layer.
  void backward(const mat& dlogits) {
    m_d2 = m_fc3.backward(dlogits);
    ex::relu_backward(m_a2, m_d2, m_d2);
    m_d1 = m_fc2.backward(m_d2);
    ex::relu_backward(m_a1, m_d1, m_d1);
    m_fc1.backward_params_only(m_d1);  // the input needs no gradient
  }

  /// Inference logits, n x 10 (the adapters merged or not).
  mat predict(const mat& x) const {
    mat h1, h2;
    ex::relu_forward(m_fc1.infer(x), h1);
    ex::relu_forward(m_fc2.infer(h1), h2);
    return m_fc3.infer(h2);
  }

  /// W += s B A in every layer (the base's memory).
  void merge() {
    for (lora::linear<float>* layer : {&m_fc1, &m_fc2, &m_fc3}) layer->merge();
  }

  /// The layers keyed by module path, as PEFT names them.
  std::vector<std::pair<std::string, lora::linear<float>*>> named_layers() {
    return {{"fc1", &m_fc1}, {"fc2", &m_fc2}, {"fc3", &m_fc3}};
  }

  lora::parameter_report report() const { return lora::summarize(m_fc1, m_fc2, m_fc3); }

 private:
  lora::linear<float> m_fc1, m_fc2, m_fc3;
  mat m_z1, m_a1, m_z2, m_a2, m_logits, m_d1, m_d2;  // as in base_mlp
};

// ---------------------------------------------------------------------------------------------------
// 4. The training loop, the same for every model (anything with parameters, forward and backward).

struct train_config {
  int epochs = 1;
  lora::index batch = 64;
  double lr = 1e-3;
  std::uint64_t seed = 0;  ///< the minibatch order
  std::string label;       ///< for the progress bar
  bool quiet = false;
};

/// What a training run cost.
struct train_stats {
  double seconds_per_epoch = 0;
  std::int64_t trainable_params = 0;
  std::int64_t train_state_bytes = 0;  ///< parameters + gradients + Adam's exp_avg and exp_avg_sq
  ex::comm_report comm;                ///< the gradient reduction's cost (data parallel over MPI only)
};

/// One minibatch's step. In a single process: forward, backward and the guarded step on all `count` rows.
/// Data parallel over MPI (docs/CONVENTIONS.md §dist): this rank's shard of the rows, weighted by its share of
/// the minibatch, one gradient reduction, the guarded step on every rank alike. Returns the minibatch's
/// mean loss (over all its rows, on every rank).
template <typename Model>
class minibatch_stepper {
 public:
  minibatch_stepper(Model& model, lora::optim::step_guard<float>& guard) : m_model(model), m_guard(guard) {
#ifdef LORA_WITH_MPI
    // The model's backward is one call over all its layers: every parameter is marked ready at the end.
    if (ex::dist_context() != nullptr)
      m_dp = std::make_unique<lora::dist::data_parallel<float>>(*ex::dist_context(), guard);
#endif
  }

  double step(const labelled& data, const lora::index* rows, lora::index count) {
    lora::index first = 0, local = count;
#ifdef LORA_WITH_MPI
    if (m_dp) {
      const auto shard =
          lora::dist::shard(static_cast<std::size_t>(count), ex::dist_context()->rank(), ex::dist_context()->size());
      m_dp->begin_micro_batch(shard);
      first = static_cast<lora::index>(shard.begin);
      local = static_cast<lora::index>(shard.size());
    }
#endif
    double loss = 0;
    m_guard.wrapped().zero_grad();
    if (local > 0) {  // an empty shard still makes every call of the reduction, with weight 0
      ex::gather_rows(data.x, rows + first, local, m_xb);
      ex::gather_labels(data.y, rows + first, local, m_yb);
      loss = ex::softmax_cross_entropy_forward(m_model.forward(m_xb), m_yb, m_probs);
      ex::softmax_cross_entropy_backward(m_probs, m_yb, m_dlogits);
      m_model.backward(m_dlogits);
    }
#ifdef LORA_WITH_MPI
    if (m_dp) {
      m_dp->accumulate(loss);
      return m_dp->last_loss();
    }
#endif
    m_guard.step(loss);
    return loss;
  }

  /// The reduction's cost so far (ranks 1 in a single process).
  ex::comm_report comm(double train_seconds) const {
#ifdef LORA_WITH_MPI
    if (m_dp) return ex::report_of(*m_dp, train_seconds);
#endif
    ex::comm_report c;
    c.train_seconds = train_seconds;
    return c;
  }

 private:
  Model& m_model;
  lora::optim::step_guard<float>& m_guard;
  mat m_xb, m_probs, m_dlogits;
  std::vector<int> m_yb;
#ifdef LORA_WITH_MPI
  std::unique_ptr<lora::dist::data_parallel<float>> m_dp;
#endif
};

/// Adam on softmax cross-entropy over (data.x, data.y), c.epochs epochs of shuffled minibatches.
template <typename Model>
train_stats train(Model& model, const labelled& data, const train_config& c) {
  const lora::parameter_list<float> params = model.parameters();
  lora::optim::adam_options adam;
  adam.lr = c.lr;
  lora::optim::adam<float> opt(params, adam);
  lora::optim::step_guard<float> guard(opt);       // a non-finite loss or gradient stops the run, not the model
  minibatch_stepper<Model> stepper(model, guard);  // over MPI: broadcasts rank 0's parameters
  ex::minibatches batches(data.x.rows(), c.batch, c.seed);
  ex::progress_bar bar(c.quiet || !ex::is_root());
  const auto start = std::chrono::steady_clock::now();
  for (int epoch = 1; epoch <= c.epochs; ++epoch) {
    batches.shuffle();
    bar.begin(ex::cat(c.label, " epoch ", epoch, "/", c.epochs), batches.count());
    for (lora::index k = 0; k < batches.count(); ++k) {
      const double loss = stepper.step(data, batches.rows(k), batches.size(k));
      bar.step(batches.size(k), loss);
    }
    bar.finish();
  }
  train_stats s;
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  s.seconds_per_epoch = seconds / c.epochs;
  s.comm = stepper.comm(seconds);
  if (s.comm.ranks > 1) std::printf("  %s: %s\n", c.label.c_str(), s.comm.describe().c_str());
  for (const auto& p : params) s.trainable_params += p.size();
  s.train_state_bytes =
      2 * s.trainable_params * static_cast<std::int64_t>(sizeof(float)) + static_cast<std::int64_t>(opt.state_bytes());
  return s;
}

/// The fraction of `data` whose largest logit is at the label.
template <typename Model>
double accuracy(const Model& model, const labelled& data) {
  return ex::accuracy(model.predict(data.x), data.y);
}

/// The loop's first use: the base model of section 2, pretrained on the pretraining images (Adam, lr 1e-3, batch 128),
/// loaded from the cache when it holds one of the same config.
base_mlp pretrained_base(const fashion_mnist& data, const options& o) {
  ex::on_root("making the cache folder", [&] { std::filesystem::create_directories(o.cache_dir); });
  const std::string path = ex::cat(o.cache_dir, "/base_mlp_", o.pretrain_epochs, "epochs.safetensors");
  const std::string key =
      ex::cat("seed=", kBaseSeed, ";epochs=", o.pretrain_epochs, ";images=", kPretrainImages, ";lr=1e-3;batch=128");
  base_mlp base(kBaseSeed);
  if (ex::all_ranks(!o.retrain && load_base(base, path, key), "the agreement on the cached base")) {
    std::printf("using the cached base model %s\n", path.c_str());
  } else {
    std::printf("pretraining the base MLP 784-256-128-10 for %d epochs (cached afterwards)\n", o.pretrain_epochs);
    train(base, data.pretrain, {o.pretrain_epochs, 128, 1e-3, kBaseSeed, "pretrain", o.quiet});
    ex::on_root("saving the base", [&] { save_base(base, path, key); });
  }
  return base;
}

// ---------------------------------------------------------------------------------------------------
// 5. Evaluation: choose the learning rate on validation, then train every seed at it. A seed s seeds
// its own streams: the splits lora::rng(s), the adapters' init 1000 s + layer, the data order 1000 s + 7.

enum class method { lora, full, head };

const char* to_string(method m) { return m == method::lora ? "lora" : m == method::full ? "full" : "head"; }

/// A fine-tuning method; rank is the LoRA rank, 0 for the others.
struct run_spec {
  method m = method::lora;
  lora::index rank = 0;
  std::string label() const { return m == method::lora ? ex::cat("lora r=", rank) : to_string(m); }
};

/// One fine-tuning run's inputs.
struct run_setup {
  double lr;
  std::uint64_t seed;
  const seed_splits& data;
  std::string label;
};

/// A finished fine-tuning run: its validation accuracy and cost, and the trained model, kept alive by
/// the two functions so that the test set is evaluated later, and only if the run is chosen.
struct trained_run {
  double val_acc = 0;
  train_stats stats;
  std::function<double(const labelled&)> accuracy_on;  ///< the trained model's accuracy on a set
  std::function<lora::io::peft_adapter()> adapter;     ///< LoRA only: the trained adapter, PEFT-style
};

template <typename Model>
trained_run train_and_validate(const std::shared_ptr<Model>& model, const run_setup& s, const options& o) {
  trained_run run;
  run.stats = train(*model, s.data.train, {o.epochs, o.batch, s.lr, 1000 * s.seed + 7, s.label, o.quiet});
  run.val_acc = accuracy(*model, s.data.val);
  run.accuracy_on = [model](const labelled& d) { return accuracy(*model, d); };
  return run;
}

/// Fine-tunes from `base` with one method. LoRA views base's weights (training never writes them);
/// full and head-only fine-tuning change weights, so they start from a copy.
trained_run fine_tune(base_mlp& base, const run_spec& spec, const run_setup& s, const options& o) {
  if (spec.m == method::lora) {
    auto model = std::make_shared<lora_mlp>(base);
    model->add_adapter(spec.rank, o.alpha_over_rank * static_cast<double>(spec.rank), s.seed);
    trained_run run = train_and_validate(model, s, o);
    run.adapter = [model] {
      lora::io::peft_config config;
      config.base_model_name_or_path = "fashion_mnist base_mlp 784-256-128-10";
      return lora::io::peft_adapter::from_layers(model->named_layers(), "default", config);
    };
    return run;
  }
  auto model = std::make_shared<base_mlp>(base);
  model->body_frozen = spec.m == method::head;
  return train_and_validate(model, s, o);
}

/// One row of the results: a method in a domain at its chosen learning rate, over every seed.
struct result {
  ex::domain domain;
  run_spec spec;
  std::vector<std::pair<double, double>> selection;  ///< (lr, validation accuracy) on the first seed
  double lr = 0;                                     ///< the chosen rate
  bool lr_at_edge = false;                           ///< chosen at the end of a grid of 3 or more
  std::vector<double> val_acc, test_acc;             ///< per seed, at lr
  train_stats stats;                                 ///< of the fastest run, selection runs included
};

/// Keeps the stats of the faster run. Sizes do not depend on the seed or the rate; time does, on a shared
/// machine, and the fastest run is the one least slowed down by other processes.
void keep_fastest(train_stats& kept, const train_stats& run) {
  if (kept.seconds_per_epoch == 0 || run.seconds_per_epoch < kept.seconds_per_epoch) kept = run;
}

/// Trains one run per rate of `grid` on the first seed's splits and chooses the rate with the best
/// validation accuracy (ties: the smaller rate); records the runs in r.selection (not for a grid of
/// one, taken as given). Returns the chosen run: it is also the first seed's run at that rate.
trained_run select_lr(base_mlp& base, const std::vector<double>& grid, const seed_splits& data, std::uint64_t seed,
                      const options& o, result& r) {
  const std::string label = ex::cat(ex::to_string(r.domain), " ", r.spec.label(), " seed ", seed);
  std::vector<double> rates = grid;
  std::sort(rates.begin(), rates.end());
  trained_run chosen;
  for (std::size_t k = 0; k < rates.size(); ++k) {
    trained_run run = fine_tune(base, r.spec, {rates[k], seed, data, ex::cat(label, " lr ", rates[k])}, o);
    keep_fastest(r.stats, run.stats);
    if (rates.size() > 1) r.selection.emplace_back(rates[k], run.val_acc);
    if (k == 0 || run.val_acc > chosen.val_acc) {
      chosen = std::move(run);
      r.lr = rates[k];
      r.lr_at_edge = rates.size() >= 3 && (k == 0 || k + 1 == rates.size());
    }
  }
  return chosen;
}

/// The LoRA run kept for saving: the best validation accuracy over every domain, rank and seed.
struct best_adapter {
  double val_acc = -1;
  double test_acc = 0;
  ex::domain domain = ex::domain::mild;
  lora::index rank = 0;
  std::uint64_t seed = 0;
  trained_run run;
};

/// Mean and sample standard deviation (n - 1); the deviation is NaN for fewer than two values.
std::pair<double, double> mean_std(const std::vector<double>& v) {
  const double n = static_cast<double>(v.size());
  const double mean = std::accumulate(v.begin(), v.end(), 0.0) / n;
  double ss = 0;
  for (double x : v) ss += (x - mean) * (x - mean);
  return {mean, v.size() > 1 ? std::sqrt(ss / (n - 1)) : std::nan("")};
}

/// "84.12 ± 0.31" (percent), or "84.12" for one value.
std::string percent_pm(const std::vector<double>& v) {
  const auto [mean, sd] = mean_std(v);
  char buf[48];
  if (std::isnan(sd))
    std::snprintf(buf, sizeof buf, "%6.2f", 100 * mean);
  else
    std::snprintf(buf, sizeof buf, "%6.2f ± %4.2f", 100 * mean, 100 * sd);
  return buf;
}

/// "  lora r=4    val acc by lr: 0.001 82.10  0.002 84.14  0.005* 84.74  0.01 83.98", then the test accuracy.
void print_progress(const result& r) {
  std::string tried;
  for (const auto& [lr, val] : r.selection) {
    char buf[48];
    std::snprintf(buf, sizeof buf, "  %g%s %.2f", lr, lr == r.lr ? "*" : "", 100 * val);
    tried += buf;
  }
  std::printf("  %-10s  val acc by lr:%s\n  %-10s  lr %g: test acc %s%%\n", r.spec.label().c_str(),
              tried.empty() ? " (one rate given, no selection)" : tried.c_str(), "", r.lr,
              percent_pm(r.test_acc).c_str());
}

/// Every result of the run, and the adapter kept for saving.
struct experiment {
  double base_test_acc = 0;                                    ///< the base on the unshifted test set
  std::vector<std::pair<ex::domain, double>> base_domain_acc;  ///< the base on each shifted test set
  std::vector<result> rows;
  best_adapter best;
};

/// Every method in domain d: selection on the first seed, then one run per further seed at the chosen
/// rate; every seed's run at the chosen rate is evaluated on the test set.
void run_domain(base_mlp& base, const fashion_mnist& data, ex::domain d, const options& o, experiment& e) {
  const labelled test = shifted(data.test, d);
  std::vector<seed_splits> splits;
  for (std::uint64_t seed : o.seeds) splits.push_back(draw_splits(data, d, seed, o));
  e.base_domain_acc.emplace_back(d, accuracy(base, test));
  std::printf("domain %s: the base model's test accuracy is %.2f%% before fine-tuning\n", ex::to_string(d),
              100 * e.base_domain_acc.back().second);

  std::vector<run_spec> specs;
  for (lora::index r : o.ranks) specs.push_back({method::lora, r});
  specs.push_back({method::full, 0});
  specs.push_back({method::head, 0});
  for (const run_spec& spec : specs) {
    result r;
    r.domain = d;
    r.spec = spec;
    const auto& grid = spec.m == method::lora ? o.lr_lora : spec.m == method::full ? o.lr_full : o.lr_head;
    trained_run run = select_lr(base, grid, splits.front(), o.seeds.front(), o, r);
    for (std::size_t k = 0; k < o.seeds.size(); ++k) {
      if (k > 0) {
        const std::string label = ex::cat(ex::to_string(d), " ", spec.label(), " seed ", o.seeds[k]);
        run = fine_tune(base, spec, {r.lr, o.seeds[k], splits[k], label}, o);
        keep_fastest(r.stats, run.stats);
      }
      r.val_acc.push_back(run.val_acc);
      r.test_acc.push_back(run.accuracy_on(test));  // the only place the test set is evaluated
      if (spec.m == method::lora && run.val_acc > e.best.val_acc) {
        e.best.val_acc = run.val_acc;
        e.best.test_acc = r.test_acc.back();
        e.best.domain = d;
        e.best.rank = spec.rank;
        e.best.seed = o.seeds[k];
        e.best.run = std::move(run);
      }
    }
    print_progress(r);
    e.rows.push_back(std::move(r));
  }
  std::printf("\n");
}

/// Every domain, after the base's accuracy on the unshifted test set.
experiment run_experiment(base_mlp& base, const fashion_mnist& data, const options& o) {
  experiment e;
  e.base_test_acc = accuracy(base, data.test);
  std::printf("base model test accuracy: %.2f%%\n\n", 100 * e.base_test_acc);
  for (const std::string& name : o.domains) run_domain(base, data, ex::parse_domain(name), o, e);
  return e;
}

// ---------------------------------------------------------------------------------------------------
// The table and the JSON

std::string human_bytes(std::int64_t b) {
  char buf[32];
  if (b >= (1 << 20))
    std::snprintf(buf, sizeof buf, "%.2f MiB", static_cast<double>(b) / (1 << 20));
  else
    std::snprintf(buf, sizeof buf, "%.1f KiB", static_cast<double>(b) / 1024);
  return buf;
}

/// rank-r LoRA (r = 4 if run, else the largest rank) against full fine-tuning, per domain.
void print_summary(const experiment& e, const options& o) {
  const lora::index rank =
      std::count(o.ranks.begin(), o.ranks.end(), 4) ? 4 : *std::max_element(o.ranks.begin(), o.ranks.end());
  for (const auto& [d, before] : e.base_domain_acc) {
    const result *lora_row = nullptr, *full_row = nullptr;
    for (const result& r : e.rows) {
      if (r.domain != d) continue;
      if (r.spec.m == method::lora && r.spec.rank == rank) lora_row = &r;
      if (r.spec.m == method::full) full_row = &r;
    }
    if (!lora_row || !full_row) continue;
    const double lora_acc = 100 * mean_std(lora_row->test_acc).first,
                 full_acc = 100 * mean_std(full_row->test_acc).first;
    std::printf(
        "%s (base %.2f%%): rank-%lld LoRA %.2f%% vs full fine-tuning %.2f%% (%+.2f points) with %.0fx less "
        "training state (%s vs %s)\n",
        ex::to_string(d), 100 * before, static_cast<long long>(rank), lora_acc, full_acc, lora_acc - full_acc,
        static_cast<double>(full_row->stats.train_state_bytes) / static_cast<double>(lora_row->stats.train_state_bytes),
        human_bytes(lora_row->stats.train_state_bytes).c_str(), human_bytes(full_row->stats.train_state_bytes).c_str());
  }
}

void print_table(const experiment& e, const options& o) {
  std::printf("%-8s %-6s %4s %8s %8s %16s %10s %12s %8s\n", "domain", "method", "rank", "lr", "val acc", "test acc",
              "trainable", "train state", "s/epoch");
  bool edge = false;
  for (const result& r : e.rows) {
    char lr[16];
    std::snprintf(lr, sizeof lr, "%g%s", r.lr, r.lr_at_edge ? "*" : "");
    edge = edge || r.lr_at_edge;
    std::printf("%-8s %-6s %4s %8s %7.2f%% %15s%% %10lld %12s %8.2f\n", ex::to_string(r.domain), to_string(r.spec.m),
                r.spec.m == method::lora ? std::to_string(r.spec.rank).c_str() : "-", lr,
                100 * mean_std(r.val_acc).first, percent_pm(r.test_acc).c_str(),
                static_cast<long long>(r.stats.trainable_params), human_bytes(r.stats.train_state_bytes).c_str(),
                r.stats.seconds_per_epoch);
  }
  std::string seeds;
  for (std::uint64_t seed : o.seeds) seeds += ex::cat(seeds.empty() ? "" : ",", seed);
  std::printf("val acc, test acc: mean over seeds %s, test ± sample std; s/epoch: the fastest run's\n", seeds.c_str());
  std::printf(
      "lr: chosen on the validation split (%lld held-out images) of seed %llu after %d epochs on %lld images; "
      "the test set is evaluated at the chosen lr only\n",
      static_cast<long long>(o.val_samples), static_cast<unsigned long long>(o.seeds.front()), o.epochs,
      static_cast<long long>(o.samples));
  if (edge) std::printf("* the chosen rate is at the edge of its grid: a wider grid might do better\n");
  print_summary(e, o);
}

nlohmann::ordered_json accuracy_json(const std::vector<double>& v) {
  const auto [mean, sd] = mean_std(v);
  return {
      {"mean", mean}, {"std", std::isnan(sd) ? nlohmann::ordered_json() : nlohmann::ordered_json(sd)}, {"per_seed", v}};
}

nlohmann::ordered_json results_json(const options& o, const experiment& e,
                                    const nlohmann::ordered_json& adapter_check) {
  nlohmann::ordered_json j;
  j["config"] = {{"domains", o.domains},
                 {"ranks", o.ranks},
                 {"seeds", o.seeds},
                 {"selection_seed", o.seeds.front()},
                 {"epochs", o.epochs},
                 {"samples", o.samples},
                 {"val_samples", o.val_samples},
                 {"batch", o.batch},
                 {"alpha_over_rank", o.alpha_over_rank},
                 {"pretrain_epochs", o.pretrain_epochs},
                 {"lr_grid", {{"lora", o.lr_lora}, {"full", o.lr_full}, {"head", o.lr_head}}}};
  j["base"]["test_accuracy"] = e.base_test_acc;
  for (const auto& [d, acc] : e.base_domain_acc) j["base"]["domain_test_accuracy"][ex::to_string(d)] = acc;
  j["results"] = nlohmann::ordered_json::array();
  for (const result& r : e.rows) {
    nlohmann::ordered_json selection = nlohmann::ordered_json::array();
    for (const auto& [lr, val] : r.selection) selection.push_back({{"lr", lr}, {"val_accuracy", val}});
    j["results"].push_back({{"domain", ex::to_string(r.domain)},
                            {"method", to_string(r.spec.m)},
                            {"rank", r.spec.rank},
                            {"lr", r.lr},
                            {"selection", selection},
                            {"val_accuracy", accuracy_json(r.val_acc)},
                            {"test_accuracy", accuracy_json(r.test_acc)},
                            {"trainable_params", r.stats.trainable_params},
                            {"train_state_bytes", r.stats.train_state_bytes},
                            {"seconds_per_epoch", r.stats.seconds_per_epoch}});
    if (r.stats.comm.ranks > 1) j["results"].back()["data_parallel"] = ex::comm_json(r.stats.comm);
  }
  j["adapter_check"] = adapter_check;
  return j;
}

// ---------------------------------------------------------------------------------------------------
// 6. Save the best adapter, load it into a fresh copy of the base, merge it.

/// Saves best.adapter as a PEFT folder, attaches the reloaded adapter to a fresh copy of the base and
/// evaluates it unmerged and merged. Returns the figures for the JSON; "ok" is true when the reloaded
/// model's accuracy equals the trained one's and merging changed no prediction.
nlohmann::ordered_json check_saved_adapter(const base_mlp& base, const fashion_mnist& data, const best_adapter& best,
                                           const options& o) {
  ex::on_root("saving the adapter", [&] { best.run.adapter().save(o.adapter_out); });  // then every rank reloads it
  const lora::io::peft_adapter loaded = lora::io::peft_adapter::load(o.adapter_out);
  base_mlp weights = base;  // merging writes into these
  lora_mlp fresh(weights);
  lora::io::attach(loaded, fresh.named_layers(), "default");
  const labelled test = shifted(data.test, best.domain);
  const double unmerged = accuracy(fresh, test);
  const std::string report = fresh.report().to_string();  // before merging: PEFT's trainable-parameter line
  fresh.merge();
  const double merged = accuracy(fresh, test);
  const bool ok = unmerged == best.test_acc && merged == unmerged;
  std::printf("\nbest adapter by validation accuracy: %s, rank %lld, seed %llu; saved as a PEFT adapter in %s\n",
              ex::to_string(best.domain), static_cast<long long>(best.rank), static_cast<unsigned long long>(best.seed),
              o.adapter_out.c_str());
  std::printf("reloaded into a fresh copy of the base: %s\n", report.c_str());
  std::printf("test accuracy %.2f%% after training, %.2f%% reloaded, %.2f%% merged (%s)\n", 100 * best.test_acc,
              100 * unmerged, 100 * merged, ok ? "equal" : "DIFFERENT");
  return {{"domain", ex::to_string(best.domain)},
          {"rank", best.rank},
          {"seed", best.seed},
          {"path", o.adapter_out},
          {"test_accuracy", best.test_acc},
          {"reloaded_unmerged", unmerged},
          {"reloaded_merged", merged},
          {"ok", ok}};
}

// ---------------------------------------------------------------------------------------------------

int main(int argc, char** argv) {
  ex::start_dist(&argc,
                 &argv);  // under mpirun with several ranks only: data-parallel training (docs/CONVENTIONS.md §dist)
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each line as it comes, through pipes too
  const options o = parse_options(argc, argv);
  try {
    const auto start = std::chrono::steady_clock::now();
    const fashion_mnist data = load_data(o.data_dir);    // 1. data
    base_mlp base = pretrained_base(data, o);            // 2. base model
    const experiment e = run_experiment(base, data, o);  // 3.-5. adapters, training, evaluation
    print_table(e, o);
    const auto check = check_saved_adapter(base, data, e.best, o);  // 6. save, reload, merge
    if (!o.json_path.empty()) {
      ex::on_root("writing the results",
                  [&] { lora::io::write_file_atomically(o.json_path, results_json(o, e, check).dump(2) + "\n"); });
      std::printf("results written to %s\n", o.json_path.c_str());
    }
    std::printf("total %.0f s, peak RSS %s\n",
                std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(),
                human_bytes(static_cast<std::int64_t>(ex::peak_rss_bytes())).c_str());
    return check["ok"].get<bool>() ? 0 : 1;
  } catch (const std::exception& e) {
    return ex::fail_job(ex::cat("fashion_mnist: ", e.what()), 1);
  }
}
