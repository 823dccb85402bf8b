// examples/common/lm.hpp: what gpt2_finetune does with a language model, in one place: load a Hugging
// Face folder or a GPT-2 GGUF file (and a PEFT adapter onto it), evaluate bits per byte, generate, and the training
// loop.
//
// Evaluation (the definition `gpt2_finetune eval` prints, kept exactly so that others can reproduce it):
// the text is tokenized whole into n tokens t_0 .. t_{n-1} and cut into consecutive, non-overlapping
// windows of n_positions tokens; a last partial window is kept when it has at least 2 tokens. In a
// window of m tokens, positions 1 .. m-1 are predicted from the window's own earlier tokens, so the
// predicted count is P = Σ (m - 1). Then
//   loss_nats_per_token x = (1 / P) Σ −ln p(t_i | window prefix)
//   bits_per_byte       y = (P x / ln 2) / B,  B = Σ over the predicted tokens of their UTF-8 bytes
// (for the byte tokenizer every token is one byte and B = P).
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <lora/io/checkpoint.hpp>
#include <lora/io/peft.hpp>
#include <lora/lora.hpp>
#include <lora/models/gpt2.hpp>
#include <lora/models/gpt2_gguf.hpp>
#include <lora/models/gpt2_io.hpp>
#include <lora/models/tokenizer.hpp>
#include <lora/optim.hpp>
#include <memory>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "dist.hpp"
#include "fortunes.hpp"
#include "progress.hpp"
#include "strings.hpp"

namespace ex {

using token_list = std::vector<std::int32_t>;
using lm = lora::models::gpt2<float>;
using lm_weights = lora::models::gpt2_weights<float>;

// ---------------------------------------------------------------------------------------------------
// Models, adapters, tokenizers

/// An owned copy of `w` (gpt2_weights' copy is deep, into new storage).
inline lm_weights clone_weights(const lm_weights& w) { return w; }

/// A base model: config, weights and the tokenizer that goes with it, from a Hugging Face GPT-2 folder or
/// a GPT-2 GGUF file (llama.cpp's; its vocabulary is the tokenizer).
struct base_model {
  std::string dir;  ///< the folder, or the GGUF file
  lm_weights weights;
  lora::models::tokenizer tok;
  /// A GGUF base loaded with its file's types kept: the 4 L projections in the file's blocks (their float
  /// tensors released from `weights`); empty otherwise. make_base_lm builds the model on both.
  std::vector<lora::quant::quantized_matrix> projections;
};

/// The tokenizer of a GPT-2 GGUF's vocabulary: the byte tokenizer for the 257-token byte vocabulary (no
/// merges), GPT-2's BPE otherwise (the vocabulary written as vocab.json + merges.txt to a private temporary
/// folder and read back, with every check of tokenizer::from_folder).
inline lora::models::tokenizer gguf_tokenizer(const lora::io::gguf_file& file, lora::index vocab_size) {
  const lora::models::gguf_vocab vocab = lora::models::read_gguf_vocab(file);
  if (!vocab.bpe) {
    if (vocab.tokens.size() != static_cast<std::size_t>(lora::models::byte_tokenizer::vocab_size()) ||
        vocab_size != lora::models::byte_tokenizer::vocab_size())
      throw lora::format_error(cat("GGUF file '", file.path(), "' has no merges and ", vocab.tokens.size(),
                                   " tokens (model vocab_size ", vocab_size, "): neither GPT-2's BPE nor the byte ",
                                   "vocabulary of ", lora::models::byte_tokenizer::vocab_size()));
    return lora::models::tokenizer(lora::models::byte_tokenizer{});
  }
  std::string dir = (std::filesystem::temp_directory_path() / "lora-gguf-vocab-XXXXXX").string();
  if (::mkdtemp(dir.data()) == nullptr)
    throw lora::io_error(cat("cannot make a temporary folder for the vocabulary of '", file.path(), "'"));
  struct remover {
    std::string path;
    ~remover() {
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  } cleanup{dir};
  lora::models::save_gguf_vocab(dir, vocab);
  return lora::models::tokenizer::from_folder(dir, vocab_size);
}

/// Loads `path`: a Hugging Face GPT-2 folder, or a GPT-2 GGUF file (io::is_gguf_file), dequantized to float,
/// or with `keep_file_types` its projections kept in the file's blocks (F16, BF16, Q8_0, Q4_0, F32) so that
/// LoRA trains over the base as it is stored. For a folder `keep_file_types` changes nothing (float32).
inline base_model load_base_model(const std::string& path, bool keep_file_types = false) {
  if (!lora::io::is_gguf_file(path)) {
    auto loaded = lora::models::load_gpt2<float>(path);
    auto tok = lora::models::tokenizer::from_folder(path, loaded.config.vocab_size);
    return {path, std::move(loaded.weights), std::move(tok), {}};
  }
  const lora::models::gpt2_config config = lora::models::read_gpt2_gguf_config(lora::io::gguf_file::open(path));
  auto tok = gguf_tokenizer(lora::io::gguf_file::open(path), config.vocab_size);  // refused before the weights
  if (!keep_file_types) return {path, lora::models::load_gpt2_gguf<float>(path).weights, std::move(tok), {}};
  auto kept = lora::models::load_gpt2_gguf_quantized<float>(path);
  return {path, std::move(kept.weights), std::move(tok), std::move(kept.projections)};
}

/// The model on a loaded base (its weights, and its projections when they were kept quantized), taking them.
inline std::unique_ptr<lm> make_base_lm(base_model& base) {
  if (base.projections.empty()) return std::make_unique<lm>(std::move(base.weights));
  return std::make_unique<lm>(std::move(base.weights), std::move(base.projections));
}

/// Writes the tokenizer of the base at `model_path` next to a model saved in `out`: vocab.json and
/// merges.txt copied from a folder, or a GGUF's BPE vocabulary written as those files (nothing for the byte
/// vocabulary, which tokenizer::from_folder picks by itself).
inline void save_base_tokenizer(const std::string& model_path, const std::string& out) {
  if (lora::io::is_gguf_file(model_path)) {
    lora::models::save_gguf_vocab(out, lora::models::read_gguf_vocab(lora::io::gguf_file::open(model_path)));
    return;
  }
  for (const char* file : {"vocab.json", "merges.txt"}) {
    const std::filesystem::path from = std::filesystem::path(model_path) / file;
    if (std::filesystem::exists(from))
      std::filesystem::copy_file(from, std::filesystem::path(out) / file,
                                 std::filesystem::copy_options::overwrite_existing);
  }
}

/// Loads the PEFT adapter in `adapter_dir` and attaches it to `model` as adapter `name`. Every error
/// (a folder that is not an adapter, modules the model lacks, shapes or ranks that disagree) is a
/// lora::error naming the adapter folder.
inline lora::io::peft_adapter attach_adapter(lm& model, const std::string& adapter_dir,
                                             const std::string& name = "default") {
  lora::io::peft_adapter adapter;
  try {
    adapter = lora::io::peft_adapter::load(adapter_dir);
    lora::io::attach(adapter, model.named_layers(), name);
  } catch (const lora::error& e) {
    throw lora::format_error(cat("cannot use the adapter in '", adapter_dir, "' with this model: ", e.what()));
  }
  return adapter;
}

/// Reads a text file to be tokenized. Any bytes will do: the byte tokenizer takes them as they are, and
/// GPT-2's BPE is byte-level too, so bytes that are not UTF-8 still encode (each becomes a piece of its
/// own, docs/CONVENTIONS.md §tokenizers). `tok` is unused and kept for the call sites' symmetry.
inline std::string read_model_text(const std::string& path, const lora::models::tokenizer& tok) {
  (void)tok;
  return read_text_file(path);
}

// ---------------------------------------------------------------------------------------------------
// Evaluation

/// The figures of the definition at the top of this file.
struct eval_result {
  std::int64_t tokens = 0;     ///< n
  std::int64_t predicted = 0;  ///< P
  std::int64_t bytes = 0;      ///< B
  double nats = 0;             ///< Σ −ln p over the predicted positions
  double loss() const { return predicted > 0 ? nats / static_cast<double>(predicted) : 0.0; }
  double bits_per_byte() const { return bytes > 0 ? nats / std::log(2.0) / static_cast<double>(bytes) : 0.0; }
};

/// [start, end) of every window of `n` tokens, as defined above.
inline std::vector<std::pair<std::size_t, std::size_t>> eval_windows(std::size_t n, std::size_t width,
                                                                     std::size_t max_windows = 0) {
  std::vector<std::pair<std::size_t, std::size_t>> out;
  for (std::size_t s = 0; s + 2 <= n; s += width) {
    out.emplace_back(s, std::min(n, s + width));
    if (max_windows > 0 && out.size() >= max_windows) break;
  }
  return out;
}

/// Evaluates `ids` (the whole text) as defined above; max_windows > 0 stops after that many windows.
inline eval_result evaluate(const lm& model, const lora::models::tokenizer& tok, const token_list& ids,
                            std::size_t max_windows = 0) {
  eval_result r;
  r.tokens = static_cast<std::int64_t>(ids.size());
  auto cache = model.make_cache();
  const auto width = static_cast<std::size_t>(model.config().n_positions);
  for (const auto& [s, e] : eval_windows(ids.size(), width, max_windows)) {
    const token_list window(ids.begin() + static_cast<std::ptrdiff_t>(s), ids.begin() + static_cast<std::ptrdiff_t>(e));
    r.nats += model.nll(window, cache);
    r.predicted += static_cast<std::int64_t>(window.size() - 1);
    for (std::size_t i = 1; i < window.size(); ++i)
      r.bytes += static_cast<std::int64_t>(tok.token_bytes(window[i]).size());
  }
  return r;
}

/// The logits (V x m) of the first window of `ids`.
inline lora::matrix<float> first_window_logits(const lm& model, const token_list& ids) {
  auto cache = model.make_cache();
  const auto m = std::min<std::size_t>(ids.size(), static_cast<std::size_t>(model.config().n_positions));
  lora::matrix<float> logits;
  model.infer(token_list(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(m)), cache, &logits);
  return logits;
}

// ---------------------------------------------------------------------------------------------------
// Generation

struct generate_options {
  std::size_t length = 200;  ///< tokens to generate
  double temperature = 0;    ///< 0: greedy (argmax); > 0: sample from softmax(logits / temperature)
  std::size_t top_k = 0;     ///< > 0: sample among the k most likely tokens only
  std::uint64_t seed = 0;
  bool stop_at_eot = true;  ///< stop at <|endoftext|>
};

/// The next token from a column of logits.
inline std::int32_t pick_token(const Eigen::Ref<const lora::vector<float>>& all_logits, const generate_options& o,
                               lora::rng& gen, lora::index vocab) {
  // Only ids the tokenizer can decode: a model's vocabulary may be padded past the tokenizer's.
  const auto logits = all_logits.head(std::min(vocab, all_logits.size()));
  const lora::index v = logits.size();
  if (o.temperature <= 0) {
    lora::index best = 0;
    logits.maxCoeff(&best);
    return static_cast<std::int32_t>(best);
  }
  std::vector<std::pair<double, std::int32_t>> cand;
  cand.reserve(static_cast<std::size_t>(v));
  for (lora::index i = 0; i < v; ++i) cand.emplace_back(logits(i) / o.temperature, static_cast<std::int32_t>(i));
  if (o.top_k > 0 && o.top_k < cand.size()) {
    std::partial_sort(cand.begin(), cand.begin() + static_cast<std::ptrdiff_t>(o.top_k), cand.end(),
                      [](const auto& a, const auto& b) { return a.first > b.first; });
    cand.resize(o.top_k);
  }
  double top = cand[0].first;
  for (const auto& c : cand) top = std::max(top, c.first);
  double sum = 0;
  for (auto& c : cand) sum += (c.first = std::exp(c.first - top));
  double u = gen.uniform() * sum;
  for (const auto& c : cand) {
    if ((u -= c.first) <= 0) return c.second;
  }
  return cand.back().second;
}

/// Continues `prompt` (at least one token) by up to o.length tokens drawn from the tokenizer's `tok`
/// ids. When the context is full, the cache restarts from the last half-context of tokens (a sliding window).
inline token_list generate(const lm& model, const token_list& prompt, const generate_options& o,
                           const lora::models::tokenizer& tok) {
  const std::int32_t eot_id = tok.eot_id();
  const auto ctx = static_cast<std::size_t>(model.config().n_positions);
  token_list all = prompt;
  if (all.empty()) all.push_back(eot_id);  // an empty prompt starts from <|endoftext|>, as GPT-2 does
  auto cache = model.make_cache();
  lora::rng gen(o.seed);
  lora::matrix<float> logits;
  const std::size_t keep = std::max<std::size_t>(1, ctx / 2);
  token_list feed(all.end() - static_cast<std::ptrdiff_t>(std::min(all.size(), ctx)), all.end());
  token_list out;
  for (std::size_t k = 0; k < o.length; ++k) {
    if (static_cast<std::size_t>(cache.length) + feed.size() > ctx) {
      cache.clear();
      feed.assign(all.end() - static_cast<std::ptrdiff_t>(std::min(all.size(), keep)), all.end());
    }
    model.infer(feed, cache, &logits);
    const std::int32_t next = pick_token(logits.col(logits.cols() - 1), o, gen, tok.vocab_size());
    if (o.stop_at_eot && next == eot_id) break;
    all.push_back(next);
    out.push_back(next);
    feed.assign(1, next);
  }
  return out;
}

/// Text for a terminal and for JSON: control characters other than newline and tab become '?', and
/// every byte that is not part of well-formed UTF-8 becomes U+FFFD (a byte-level model can stop in the
/// middle of a character, or sample any byte).
inline std::string printable(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  std::size_t i = 0;
  while (i < s.size()) {
    const std::size_t bad = first_invalid_utf8(s.substr(i, std::min<std::size_t>(4, s.size() - i)));
    const auto c = static_cast<unsigned char>(s[i]);
    if (bad == 0) {
      out += "\xEF\xBF\xBD";
      ++i;
      continue;
    }
    const std::size_t len = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    if (c < 0x20 && c != '\n' && c != '\t')
      out += '?';
    else
      out.append(s, i, len);
    i += len;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Training

enum class schedule_kind { constant, linear, cosine };

inline const char* to_string(schedule_kind k) {
  return k == schedule_kind::constant ? "constant" : k == schedule_kind::linear ? "linear" : "cosine";
}

struct train_setup {
  std::int64_t steps = 100;   ///< optimizer steps
  lora::index batch = 8;      ///< sequences per micro-batch
  lora::index context = 128;  ///< tokens per sequence (<= n_positions)
  std::int64_t accum = 1;     ///< micro-batches per optimizer step (gradient accumulation)
  double lr = 1e-3;           ///< peak learning rate (AdamW)
  schedule_kind schedule = schedule_kind::cosine;
  std::int64_t warmup = 10;       ///< warm-up steps
  double min_lr_ratio = 0.1;      ///< cosine floor, as a fraction of lr
  double weight_decay = 0.0;      ///< AdamW's decoupled weight decay
  double clip = 1.0;              ///< global gradient-norm clip (0: none)
  std::uint64_t seed = 0;         ///< the data order (window starts)
  std::int64_t curve_every = 10;  ///< a point of the training curve every this many steps
  std::string label;
  bool quiet = false;
  std::string checkpoint;  ///< save optimizer + parameters + data RNG here (empty: never)
  std::int64_t checkpoint_every = 0;
  std::string resume;           ///< continue from this checkpoint (empty: from scratch)
  std::string run_key;          ///< must match the resumed checkpoint's
  std::int64_t stop_after = 0;  ///< > 0: stop after this step (an interrupted run; the schedule is unchanged)
};

/// What a run cost and how its loss went.
struct train_outcome {
  std::vector<std::pair<std::int64_t, double>> curve;  ///< (step, mean training loss over the last steps)
  std::int64_t tokens = 0;                             ///< tokens trained on (all ranks together)
  double seconds = 0;
  double cpu_seconds = 0;  ///< process CPU time (all threads) while training: steadier on a shared machine
  std::int64_t trainable_params = 0;
  std::int64_t train_state_bytes = 0;  ///< trainable values + their gradients + AdamW's two moments
  std::int64_t start_step = 0;         ///< > 0 when resumed
  comm_report comm;                    ///< the gradient reduction's cost (data parallel over MPI only)
  double tokens_per_second() const { return seconds > 0 ? static_cast<double>(tokens) / seconds : 0.0; }
};

/// `batch` random windows of `context` + 1 tokens of `data`: inputs and next-token targets.
inline void sample_batch(const token_list& data, lora::index batch, lora::index context, lora::rng& gen,
                         token_list& tokens, token_list& targets) {
  const auto t = static_cast<std::size_t>(context);
  tokens.resize(static_cast<std::size_t>(batch) * t);
  targets.resize(tokens.size());
  for (lora::index b = 0; b < batch; ++b) {
    const std::size_t start = gen.below(data.size() - t);
    for (std::size_t i = 0; i < t; ++i) {
      tokens[static_cast<std::size_t>(b) * t + i] = data[start + i];
      targets[static_cast<std::size_t>(b) * t + i] = data[start + i + 1];
    }
  }
}

inline lora::optim::lr_schedule make_schedule(const train_setup& s) {
  switch (s.schedule) {
    case schedule_kind::constant:
      return lora::optim::lr_schedule::constant(s.lr, s.warmup);
    case schedule_kind::linear:
      return lora::optim::lr_schedule::linear(s.lr, s.warmup, s.steps);
    default:
      return lora::optim::lr_schedule::cosine(s.lr, s.warmup, s.steps, s.min_lr_ratio);
  }
}

/// Restores a checkpoint into `opt` (parameters and optimizer state) and `gen`; config_error naming
/// the file when it was written by another run.
inline std::int64_t resume_from(const std::string& path, const std::string& run_key, lora::optim::optimizer<float>& opt,
                                lora::rng& gen) {
  // load_checkpoint checks names, shapes and the optimizer kind before it writes anything; the run key
  // is checked after, and a mismatch ends the program with the model unused. Over MPI every rank loads
  // the file and the ranks agree on what they loaded.
#ifdef LORA_WITH_MPI
  const lora::io::checkpoint_info info = dist_context() != nullptr
                                             ? lora::dist::load_checkpoint(*dist_context(), path, opt)
                                             : lora::io::load_checkpoint(path, opt);
#else
  const lora::io::checkpoint_info info = lora::io::load_checkpoint(path, opt);
#endif
  const auto key = info.metadata.find("run");
  if (key == info.metadata.end() || key->second != run_key)
    throw lora::config_error(cat("checkpoint '", path, "' was written by another run: expected run '", run_key,
                                 "', found '", key == info.metadata.end() ? std::string("(none)") : key->second, "'"));
  const auto data = info.rngs.find("data");
  if (data == info.rngs.end()) throw lora::format_error(cat("checkpoint '", path, "' has no 'data' RNG state"));
  gen.set_state(data->second);
  return info.step;
}

/// One optimizer step's gradient: s.accum micro-batches of s.batch random windows, each drawn whole from
/// `gen`. In a single process the gradients of loss / accum add up and the guard steps; with `dp` (data
/// parallel over MPI) every rank draws the same windows and computes its shard of them (loss scale 1 on
/// its own rows), and dp weighs, reduces and steps. Returns the step's mean loss over all its windows.
class lm_stepper {
 public:
  lm_stepper(lm& model, lora::optim::step_guard<float>& guard, const train_setup& s);
  ~lm_stepper() { m_model.set_backward_hook({}); }
  lm_stepper(const lm_stepper&) = delete;
  lm_stepper& operator=(const lm_stepper&) = delete;

  double step(const token_list& data, lora::rng& gen);
  /// What the reduction cost so far (ranks 1 in a single process).
  comm_report comm(double train_seconds) const;

 private:
  lm& m_model;
  lora::optim::step_guard<float>& m_guard;
  const train_setup& m_setup;
  token_list m_tokens, m_targets;
#ifdef LORA_WITH_MPI
  std::unique_ptr<lora::dist::data_parallel<float>> m_dp;
  std::vector<lora::parameter_list<float>> m_block_params;  ///< per block: its layers' trainable parameters
  void dist_micro_batch();
#endif
};

inline lm_stepper::lm_stepper(lm& model, lora::optim::step_guard<float>& guard, const train_setup& s)
    : m_model(model), m_guard(guard), m_setup(s) {
#ifdef LORA_WITH_MPI
  if (dist_context() == nullptr) return;
  lora::dist::data_parallel_options o;
  o.micro_batches = s.accum;
  // About one block's adapters per bucket (64 KiB to 1 MiB): the last blocks' buckets are summed while the
  // first blocks still run backward, instead of one bucket that starts when backward is nearly done.
  std::size_t bytes = 0;
  for (const auto& p : guard.wrapped().parameters()) bytes += static_cast<std::size_t>(p.size()) * sizeof(float);
  o.bucket_bytes = std::clamp<std::size_t>(bytes / static_cast<std::size_t>(model.config().n_layer),
                                           std::size_t{64} << 10, lora::dist::default_bucket_bytes);
  m_dp = std::make_unique<lora::dist::data_parallel<float>>(*dist_context(), guard, o);
  // Block l's adapter parameters are final once its backward is done: mark them ready from the model's
  // hook, so that their buckets are reduced while the earlier blocks still run backward.
  std::vector<const float*> trained;
  for (const auto& p : guard.wrapped().parameters()) trained.push_back(p.grad_data);
  for (lora::index l = 0; l < model.config().n_layer; ++l) {
    lora::parameter_list<float> block;
    for (int m = 0; m < lora::models::gpt2_module_count; ++m)
      for (const auto& p : model.layer(l, static_cast<lora::models::gpt2_module>(m)).parameters())
        if (std::find(trained.begin(), trained.end(), p.grad_data) != trained.end()) block.push_back(p);
    m_block_params.push_back(std::move(block));
  }
  model.set_backward_hook([this](lora::index l) { m_dp->mark_ready(m_block_params[static_cast<std::size_t>(l)]); });
#endif
}

#ifdef LORA_WITH_MPI
/// One micro-batch of a data-parallel step: this rank's rows of the global batch in m_tokens / m_targets.
/// On the step's last micro-batch dp reduces and steps.
inline void lm_stepper::dist_micro_batch() {
  const lora::dist::mpi_context& ctx = *dist_context();
  const auto local = lora::dist::shard(static_cast<std::size_t>(m_setup.batch), ctx.rank(), ctx.size());
  m_dp->begin_micro_batch(local);
  double loss = 0;
  if (!local.empty()) {  // an empty shard still makes every call, with weight 0
    const auto t = static_cast<std::ptrdiff_t>(m_setup.context);
    const auto first = static_cast<std::ptrdiff_t>(local.begin) * t, last = static_cast<std::ptrdiff_t>(local.end) * t;
    const token_list tokens(m_tokens.begin() + first, m_tokens.begin() + last);
    const token_list targets(m_targets.begin() + first, m_targets.begin() + last);
    loss = m_model.forward_backward(tokens, targets, static_cast<lora::index>(local.size()), m_setup.context, 1.0);
  }
  m_dp->accumulate(loss);
}
#endif

inline double lm_stepper::step(const token_list& data, lora::rng& gen) {
  const train_setup& s = m_setup;
  double loss = 0;
  for (std::int64_t k = 0; k < s.accum; ++k) {
    sample_batch(data, s.batch, s.context, gen, m_tokens, m_targets);  // the global batch, on every rank
#ifdef LORA_WITH_MPI
    if (m_dp) {
      dist_micro_batch();
      continue;
    }
#endif
    loss += m_model.forward_backward(m_tokens, m_targets, s.batch, s.context, 1.0 / static_cast<double>(s.accum));
  }
#ifdef LORA_WITH_MPI
  if (m_dp) return m_dp->last_loss();  // the global mean, the same on every rank
#endif
  loss /= static_cast<double>(s.accum);
  m_guard.step(loss);
  m_model.zero_grad();
  return loss;
}

inline comm_report lm_stepper::comm(double train_seconds) const {
#ifdef LORA_WITH_MPI
  if (m_dp) return report_of(*m_dp, train_seconds);
#endif
  comm_report c;
  c.train_seconds = train_seconds;
  return c;
}

/// Writes a checkpoint (rank 0 alone over MPI, every rank waiting for the file).
inline void save_train_checkpoint(const std::string& path, const lora::optim::optimizer<float>& opt,
                                  const lora::io::checkpoint_info& info) {
#ifdef LORA_WITH_MPI
  if (dist_context() != nullptr) return lora::dist::save_checkpoint(*dist_context(), path, opt, info);
#endif
  lora::io::save_checkpoint(path, opt, info);
}

/// AdamW on the model's trainable parameters, next-token cross-entropy on random windows of `data`.
/// Over MPI (dist_context()), data parallel: the same global batches as one process, each rank computing
/// its shard of the sequences, one gradient reduction per optimizer step; rank 0 alone shows progress.
inline train_outcome train_lm(lm& model, const token_list& data, const train_setup& s) {
  if (data.size() <= static_cast<std::size_t>(s.context) + 1)
    throw lora::config_error(cat("training text of ", data.size(), " tokens is too short for context ", s.context));
  const lora::parameter_list<float> params = model.parameters();
  lora::optim::adamw_options o;
  o.lr = s.lr;
  o.weight_decay = s.weight_decay;
  lora::optim::adamw<float> opt(params, o);
  lora::optim::guard_options g;
  g.max_grad_norm = s.clip;
  lora::optim::step_guard<float> guard(opt, g);
  const auto schedule = make_schedule(s);
  lora::rng gen(s.seed);
  train_outcome out;
  model.train(true);
  model.zero_grad();
  lm_stepper stepper(model, guard, s);  // over MPI: broadcasts rank 0's parameters
  if (!s.resume.empty()) out.start_step = resume_from(s.resume, s.run_key, opt, gen);
  const auto save = [&](std::int64_t step) {
    lora::io::checkpoint_info info;
    info.step = step;
    info.rngs["data"] = gen.state();
    info.metadata["run"] = s.run_key;
    save_train_checkpoint(s.checkpoint, opt, info);
  };
  for (const auto& p : params) out.trainable_params += p.size();
  out.train_state_bytes = 2 * out.trainable_params * static_cast<std::int64_t>(sizeof(float)) +
                          static_cast<std::int64_t>(opt.state_bytes());
  progress_bar bar(s.quiet || !is_root());
  bar.begin(s.label,
            std::max<std::int64_t>(0, (s.stop_after > 0 ? std::min(s.stop_after, s.steps) : s.steps) - out.start_step));
  double window_loss = 0;
  std::int64_t window_steps = 0;
  const auto start = std::chrono::steady_clock::now();
  const std::clock_t cpu_start = std::clock();
  const std::int64_t last = s.stop_after > 0 ? std::min(s.stop_after, s.steps) : s.steps;
  for (std::int64_t step = out.start_step; step < last; ++step) {
    schedule.apply(opt);
    const double loss = stepper.step(data, gen);
    out.tokens += s.accum * s.batch * s.context;
    bar.step(s.accum * s.batch * s.context, loss);
    window_loss += loss;
    if (++window_steps == s.curve_every || step + 1 == last) {
      out.curve.emplace_back(step + 1, window_loss / static_cast<double>(window_steps));
      window_loss = 0;
      window_steps = 0;
    }
    if (!s.checkpoint.empty() && s.checkpoint_every > 0 && (step + 1) % s.checkpoint_every == 0) save(step + 1);
  }
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  out.cpu_seconds = static_cast<double>(std::clock() - cpu_start) / CLOCKS_PER_SEC;
  out.comm = stepper.comm(out.seconds);
  bar.finish();
  if (!s.checkpoint.empty()) save(last);
  model.train(false);
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Memory

/// Bytes of the model's frozen weights: the float tensors it holds (embeddings, norms, biases, and the
/// projections unless released) plus each quantized projection's codes and scales.
inline std::int64_t weight_bytes(const lm& model) {
  std::int64_t bytes = 0;
  const auto& w = model.weights();
  for (lora::index id = 0; id < w.num_tensors(); ++id)
    if (w.has(id)) bytes += w.spec(id).size() * static_cast<std::int64_t>(sizeof(float));
  for (lora::index l = 0; l < model.config().n_layer; ++l) {
    for (int m = 0; m < lora::models::gpt2_module_count; ++m) {
      const auto& layer = model.layer(l, static_cast<lora::models::gpt2_module>(m));
      if (layer.is_quantized())
        bytes += static_cast<std::int64_t>(layer.quantized_weight().storage_bytes());
      else if (!layer.is_view())  // a plain layer owning deq(W) after a round trip through a quantized format
        bytes += layer.in_features() * layer.out_features() * static_cast<std::int64_t>(sizeof(float));
    }
  }
  return bytes;
}

/// Resets the peak resident set size (VmHWM) to the current one (Linux: "5" to /proc/self/clear_refs);
/// false where that is not possible.
inline bool reset_peak_rss() {
  std::ofstream f("/proc/self/clear_refs");
  if (!f) return false;
  f << "5";
  return static_cast<bool>(f.flush());
}

}  // namespace ex
