// Checkpoints: CRC-32, round trips, bit-identical resumption of a training run, refusal of truncated,
// corrupted and mismatched files (all or nothing), and atomic writes that keep the old file on failure.
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <lora/io/checkpoint.hpp>
#include <lora/optim.hpp>

#if !defined(_WIN32)
#include <sys/resource.h>

#include <csignal>
#endif

#include "file_support.hpp"
#include "support.hpp"

namespace {

namespace fs = std::filesystem;
using lora::index;
using lora::param_role;

using lora_test::read_file;
using scratch_dir = lora_test::temp_dir;

void write_bytes(const std::string& path, const std::vector<unsigned char>& bytes, std::size_t n) {
  fs::remove(path);  // a new file rather than a truncated one, which ext4 would flush to disk (auto_da_alloc)
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(n));
}

/// Stores v little-endian at bytes[at..at+n) and recomputes the trailing CRC, as a forger would.
void patch_and_reseal(std::vector<unsigned char>& bytes, std::size_t at, std::uint64_t v, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) bytes[at + i] = static_cast<unsigned char>(v >> (8 * i));
  const std::size_t body = bytes.size() - 4;
  const std::uint32_t crc = lora::io::detail::crc32(bytes.data(), body);
  for (std::size_t i = 0; i < 4; ++i) bytes[body + i] = static_cast<unsigned char>(crc >> (8 * i));
}

template <typename Scalar>
bool bit_identical(const Eigen::MatrixBase<Scalar>& a, const Eigen::MatrixBase<Scalar>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.derived().data(), b.derived().data(), sizeof(typename Scalar::Scalar) * a.size()) == 0;
}

/// Named tensors owned by a test, exposed as parameters.
template <typename Scalar>
struct tensors {
  std::vector<std::string> names;
  std::vector<lora::matrix<Scalar>> values, grads;

  void add(std::string name, index rows, index cols, double first) {
    names.push_back(std::move(name));
    lora::matrix<Scalar> v(rows, cols);
    for (index k = 0; k < v.size(); ++k) v.data()[k] = static_cast<Scalar>(first + 0.25 * static_cast<double>(k));
    values.push_back(v);
    grads.push_back(lora::matrix<Scalar>::Constant(rows, cols, Scalar(0.5)));
  }
  lora::parameter_list<Scalar> params() {
    lora::parameter_list<Scalar> out;
    for (std::size_t i = 0; i < names.size(); ++i) {
      out.push_back(
          {names[i], param_role::dense, values[i].data(), grads[i].data(), values[i].rows(), values[i].cols()});
    }
    return out;
  }
};

/// Two LoRA factors and a bias, as a small adapter would have them.
template <typename Scalar>
tensors<Scalar> small_adapter(double first = 1.0) {
  tensors<Scalar> t;
  t.add("fc.lora_A", 2, 3, first);
  t.add("fc.lora_B", 4, 2, first + 10);
  t.add("fc.bias", 4, 1, first + 20);
  return t;
}

lora::io::checkpoint_info sample_info() {
  lora::io::checkpoint_info info;
  info.step = 1234567890123LL;
  info.rngs["data"] = lora::rng(1).state();
  info.rngs["dropout"] = lora::rng(2).state();
  info.metadata["run"] = "unit test";
  info.metadata["empty"] = "";
  info.metadata["binary"] = std::string("a\0b\xff", 4);
  return info;
}

void expect_same_info(const lora::io::checkpoint_info& a, const lora::io::checkpoint_info& b) {
  EXPECT_EQ(a.step, b.step);
  EXPECT_EQ(a.rngs, b.rngs);
  EXPECT_EQ(a.metadata, b.metadata);
}

// ---------------------------------------------------------------------------------------------------
// CRC-32

TEST(Crc32, MatchesTheStandardCheckValues) {
  EXPECT_EQ(lora::io::detail::crc32("", 0), 0u);
  EXPECT_EQ(lora::io::detail::crc32("123456789", 9), 0xCBF43926u);  // the CRC-32/ISO-HDLC check value
  EXPECT_EQ(lora::io::detail::crc32("The quick brown fox jumps over the lazy dog", 43), 0x414FA339u);
  // Chaining: the CRC of a concatenation from the CRC of its first part.
  EXPECT_EQ(lora::io::detail::crc32("56789", 5, lora::io::detail::crc32("1234", 4)), 0xCBF43926u);
}

// ---------------------------------------------------------------------------------------------------
// Round trips

template <typename Scalar>
class CheckpointTest : public ::testing::Test {};
TYPED_TEST_SUITE(CheckpointTest, lora_test::scalar_types);

TYPED_TEST(CheckpointTest, ParametersAndInfoRoundTrip) {
  using Scalar = TypeParam;
  scratch_dir dir;
  auto saved = small_adapter<Scalar>();
  saved.values[0](1, 2) = -Scalar(0);  // the sign of zero survives
  saved.values[1](0, 0) = std::numeric_limits<Scalar>::denorm_min();
  lora::io::save_checkpoint(dir.file("a.ckpt"), saved.params(), sample_info());

  // Loaded into tensors listed in another order, with other values: matched by name.
  tensors<Scalar> loaded;
  loaded.add("fc.bias", 4, 1, -5);
  loaded.add("fc.lora_A", 2, 3, -5);
  loaded.add("fc.lora_B", 4, 2, -5);
  const auto info = lora::io::load_checkpoint(dir.file("a.ckpt"), loaded.params());
  expect_same_info(info, sample_info());
  EXPECT_TRUE(bit_identical(loaded.values[0], saved.values[2]));
  EXPECT_TRUE(bit_identical(loaded.values[1], saved.values[0]));
  EXPECT_TRUE(bit_identical(loaded.values[2], saved.values[1]));
  EXPECT_EQ(dir.list(), std::vector<std::string>{"a.ckpt"});  // no temporary file left
}

TYPED_TEST(CheckpointTest, OptimizerStateRoundTrips) {
  using Scalar = TypeParam;
  scratch_dir dir;
  auto saved = small_adapter<Scalar>();
  lora::optim::adamw_options o;
  o.amsgrad = true;
  lora::optim::adamw<Scalar> opt(saved.params(), o);
  opt.set_lr(3e-4);
  opt.step();
  opt.step();
  lora::io::save_checkpoint(dir.file("b.ckpt"), opt, sample_info());

  auto loaded = small_adapter<Scalar>(-3.0);
  lora::optim::adamw<Scalar> other(loaded.params(), o);
  const auto info = lora::io::load_checkpoint(dir.file("b.ckpt"), other);
  expect_same_info(info, sample_info());
  EXPECT_EQ(other.step_count(), 2);
  EXPECT_EQ(other.lr(), 3e-4);
  ASSERT_EQ(other.state_tensor_count(), 9u);
  for (std::size_t i = 0; i < other.state_tensor_count(); ++i) {
    EXPECT_TRUE(bit_identical(other.state_tensor_data(i), opt.state_tensor_data(i))) << other.state_tensor_name(i);
  }
  for (std::size_t i = 0; i < 3; ++i) EXPECT_TRUE(bit_identical(loaded.values[i], saved.values[i]));

  // Loading the parameters alone ignores the optimizer state in the file.
  auto plain = small_adapter<Scalar>(7.0);
  lora::io::load_checkpoint(dir.file("b.ckpt"), plain.params());
  EXPECT_TRUE(bit_identical(plain.values[1], saved.values[1]));
}

TYPED_TEST(CheckpointTest, SavingAgainReplacesTheFile) {
  using Scalar = TypeParam;
  scratch_dir dir;
  auto t = small_adapter<Scalar>();
  lora::io::checkpoint_info info;
  info.step = 1;
  lora::io::save_checkpoint(dir.file("c.ckpt"), t.params(), info);
  t.values[0].setConstant(Scalar(9));
  info.step = 2;
  lora::io::save_checkpoint(dir.file("c.ckpt"), t.params(), info);
  auto back = small_adapter<Scalar>(0.0);
  EXPECT_EQ(lora::io::load_checkpoint(dir.file("c.ckpt"), back.params()).step, 2);
  EXPECT_EQ(back.values[0](1, 1), Scalar(9));
  EXPECT_EQ(dir.list(), std::vector<std::string>{"c.ckpt"});
}

// ---------------------------------------------------------------------------------------------------
// Bit-identical resumption

/// A linear layer with a frozen weight W0 (out x in) and trainable LoRA factors A (r x in), B (out x r)
/// and bias (out). On a minibatch X (m x in) with targets T (m x out):
///   Y = X (W0 + B A)ᵀ + 1 biasᵀ,  L = 1/(2m) ||Y - T||²,  dY = (Y - T) / m,
///   H = X Aᵀ (m x r),  dB = dYᵀ H,  dA = (dY B)ᵀ X,  dbias = dYᵀ 1.
template <typename Scalar>
struct toy_layer {
  lora::matrix<Scalar> w0, a, b, bias, da, db, dbias;

  toy_layer(index in, index out, index r, std::uint64_t init_seed) {
    lora::rng frozen(1234), init(init_seed);
    const auto draw = [](lora::rng& g, index rows, index cols, double scale) {
      lora::matrix<Scalar> m(rows, cols);
      for (index k = 0; k < m.size(); ++k) m.data()[k] = static_cast<Scalar>(scale * g.normal());
      return m;
    };
    w0 = draw(frozen, out, in, 0.5);
    a = draw(init, r, in, 0.3);
    b = lora::matrix<Scalar>::Zero(out, r);  // PEFT's init: the adapted layer starts as the base layer
    bias = lora::matrix<Scalar>::Zero(out, 1);
    da = lora::matrix<Scalar>::Zero(r, in);
    db = lora::matrix<Scalar>::Zero(out, r);
    dbias = lora::matrix<Scalar>::Zero(out, 1);
  }

  lora::parameter_list<Scalar> params() {
    return {{"layer.lora_A", param_role::lora_a, a.data(), da.data(), a.rows(), a.cols()},
            {"layer.lora_B", param_role::lora_b, b.data(), db.data(), b.rows(), b.cols()},
            {"layer.bias", param_role::vector, bias.data(), dbias.data(), bias.rows(), 1}};
  }

  double forward_backward(const lora::matrix<Scalar>& x, const lora::matrix<Scalar>& t) {
    const lora::matrix<Scalar> h = x * a.transpose();
    const lora::matrix<Scalar> y = (x * w0.transpose() + h * b.transpose()).rowwise() + bias.col(0).transpose();
    const lora::matrix<Scalar> dy = (y - t) / static_cast<Scalar>(x.rows());
    db = dy.transpose() * h;
    da = (dy * b).transpose() * x;
    dbias = dy.colwise().sum().transpose();
    return 0.5 * static_cast<double>((y - t).squaredNorm()) / static_cast<double>(x.rows());
  }
};

/// A whole training run: AdamW with LoRA+, a warm-up cosine schedule, clipping, accumulation over two
/// micro-batches, minibatches drawn by one RNG and target noise drawn by another.
template <typename Scalar>
struct training_run {
  static constexpr index n = 64, in = 6, out = 4, r = 2, batch = 4;
  lora::matrix<Scalar> data_x, data_t;
  toy_layer<Scalar> layer;
  lora::optim::adamw<Scalar> opt;
  lora::optim::step_guard<Scalar> guard;
  lora::optim::grad_accumulator<Scalar> acc;
  lora::optim::lr_schedule schedule = lora::optim::lr_schedule::cosine(0.05, 3, 20, 0.1);
  lora::rng sampler, noise;
  std::int64_t step = 0;

  static lora::optim::adamw_options options() {
    lora::optim::adamw_options o;
    o.weight_decay = 0.01;
    return o;
  }
  static lora::optim::guard_options guarded() {
    lora::optim::guard_options o;
    o.max_grad_norm = 1.0;
    return o;
  }

  training_run(std::uint64_t init_seed, std::uint64_t rng_seed)
      : layer(in, out, r, init_seed),
        opt(layer.params(), options()),
        guard(opt, guarded()),
        acc(guard, 2),
        sampler(rng_seed),
        noise(rng_seed + 1) {
    lora::rng data(99);  // the data set is part of the problem, not of the run
    data_x.resize(n, in);
    data_t.resize(n, out);
    for (index k = 0; k < data_x.size(); ++k) data_x.data()[k] = static_cast<Scalar>(data.normal());
    for (index k = 0; k < data_t.size(); ++k) data_t.data()[k] = static_cast<Scalar>(data.normal());
    lora::optim::apply_lora_plus(opt);
  }

  void train_until(std::int64_t last) {
    lora::matrix<Scalar> x(batch, in), t(batch, out);
    while (step < last) {
      schedule.apply(opt);
      for (int micro = 0; micro < 2; ++micro) {
        for (index i = 0; i < batch; ++i) {
          const auto row = static_cast<index>(sampler.below(n));
          x.row(i) = data_x.row(row);
          for (index j = 0; j < out; ++j) t(i, j) = data_t(row, j) + static_cast<Scalar>(0.01 * noise.normal());
        }
        acc.accumulate(layer.forward_backward(x, t));
      }
      ++step;
    }
  }

  lora::io::checkpoint_info info() const {
    lora::io::checkpoint_info i;
    i.step = step;
    i.rngs = {{"sampler", sampler.state()}, {"noise", noise.state()}};
    i.metadata = {{"problem", "toy lora regression"}};
    return i;
  }
  void resume(const lora::io::checkpoint_info& i) {
    step = i.step;
    sampler.set_state(i.rngs.at("sampler"));
    noise.set_state(i.rngs.at("noise"));
  }
  bool same_as(const training_run& o) const {
    bool same = bit_identical(layer.a, o.layer.a) && bit_identical(layer.b, o.layer.b) &&
                bit_identical(layer.bias, o.layer.bias) && opt.step_count() == o.opt.step_count();
    for (std::size_t i = 0; i < opt.state_tensor_count(); ++i) {
      same = same && bit_identical(opt.state_tensor_data(i), o.opt.state_tensor_data(i));
    }
    return same;
  }
};

TYPED_TEST(CheckpointTest, ResumingMidTrainingIsBitIdentical) {
  using Scalar = TypeParam;
  scratch_dir dir;
  training_run<Scalar> straight(1, 2);
  straight.train_until(20);
  ASSERT_FALSE(straight.layer.b.isZero(0));  // it did train

  training_run<Scalar> first(1, 2);
  first.train_until(8);
  lora::io::save_checkpoint(dir.file("mid.ckpt"), first.opt, first.info());

  // Another process: other initial values and other RNG seeds, all overwritten by the checkpoint.
  training_run<Scalar> second(77, 78);
  second.resume(lora::io::load_checkpoint(dir.file("mid.ckpt"), second.opt));
  EXPECT_EQ(second.step, 8);
  second.train_until(20);
  EXPECT_TRUE(second.same_as(straight));

  // The comparison has teeth: restoring everything but the RNG states gives another run.
  training_run<Scalar> forgetful(77, 78);
  const auto info = lora::io::load_checkpoint(dir.file("mid.ckpt"), forgetful.opt);
  forgetful.step = info.step;
  forgetful.train_until(20);
  EXPECT_FALSE(forgetful.same_as(straight));
}

// ---------------------------------------------------------------------------------------------------
// Damaged files

/// A checkpoint with parameters and optimizer state, its bytes, and tensors to load it into.
struct damaged_file_test : ::testing::Test {
  scratch_dir dir;
  tensors<double> model = small_adapter<double>();
  std::vector<unsigned char> bytes;

  void SetUp() override {
    lora::optim::sgd_options o;
    o.momentum = 0.9;
    lora::optim::sgd<double> opt(model.params(), o);
    opt.step();
    lora::io::save_checkpoint(dir.file("good.ckpt"), opt, sample_info());
    bytes = read_file(dir.file("good.ckpt"));
    ASSERT_GT(bytes.size(), 100u);
  }

  /// Loads `path` into fresh tensors and an optimizer, expecting E whose message has `fragment`; the
  /// tensors and the optimizer must come out untouched.
  template <typename E>
  void expect_refused(const std::string& path, const std::string& fragment) {
    auto target = small_adapter<double>(-1.0);
    const auto before = target.values;
    lora::optim::sgd_options o;
    o.momentum = 0.9;
    lora::optim::sgd<double> opt(target.params(), o);
    lora_test::expect_error<E>([&] { lora::io::load_checkpoint(path, opt); }, {fragment});
    for (std::size_t i = 0; i < before.size(); ++i) EXPECT_TRUE(target.values[i] == before[i]);
    EXPECT_EQ(opt.step_count(), 0);
    EXPECT_TRUE(opt.state_tensor_data(0).isZero(0));
  }
};

TEST_F(damaged_file_test, EveryTruncationIsAFormatError) {
  const std::string path = dir.file("cut.ckpt");
  for (std::size_t cut = 0; cut < bytes.size(); ++cut) {
    SCOPED_TRACE(::testing::Message() << "cut at " << cut << " of " << bytes.size());
    write_bytes(path, bytes, cut);
    expect_refused<lora::format_error>(path, "cut.ckpt' is truncated");
    if (::testing::Test::HasFailure()) break;
  }
}

TEST_F(damaged_file_test, EveryFlippedByteIsAFormatError) {
  const std::string path = dir.file("flip.ckpt");
  for (unsigned char mask : {0xFFu, 0x01u, 0x80u}) {
    for (std::size_t at = 0; at < bytes.size(); ++at) {
      SCOPED_TRACE(::testing::Message() << "byte " << at << " xor " << int{mask});
      auto damaged = bytes;
      damaged[at] ^= mask;
      write_bytes(path, damaged, damaged.size());
      expect_refused<lora::format_error>(path, "flip.ckpt");
      if (::testing::Test::HasFailure()) return;
    }
  }
}

TEST_F(damaged_file_test, MessagesSayWhatIsWrong) {
  const std::string path = dir.file("bad.ckpt");
  write_bytes(path, bytes, bytes.size() - 1);
  expect_refused<lora::format_error>(path, "truncated");
  auto damaged = bytes;
  damaged[100] ^= 1;
  write_bytes(path, damaged, damaged.size());
  expect_refused<lora::format_error>(path, "CRC-32 mismatch");
  damaged = bytes;
  damaged[0] = 'X';
  write_bytes(path, damaged, damaged.size());
  expect_refused<lora::format_error>(path, "not a lora checkpoint");
  damaged = bytes;
  patch_and_reseal(damaged, 8, 2, 4);
  write_bytes(path, damaged, damaged.size());
  expect_refused<lora::format_error>(path, "version 2");
  damaged = bytes;
  damaged.insert(damaged.end() - 4, {0, 0, 0});  // bytes after the metadata, sealed with a right size
  patch_and_reseal(damaged, 16, damaged.size(), 8);
  write_bytes(path, damaged, damaged.size());
  expect_refused<lora::format_error>(path, "3 unexpected bytes");
}

TEST_F(damaged_file_test, ForgedLengthsAreCheckedBeforeAllocating) {
  // Payload offsets: step at 24, parameter count at 32, first name length at 36, name "fc.lora_A"
  // (9 bytes) at 40, its rows at 49 and cols at 57. Each forgery carries a valid CRC.
  const std::string path = dir.file("forged.ckpt");
  const auto forge = [&](std::size_t at, std::uint64_t v, std::size_t n) {
    auto damaged = bytes;
    patch_and_reseal(damaged, at, v, n);
    write_bytes(path, damaged, damaged.size());
  };
  forge(32, 0xFFFFFFFFu, 4);
  expect_refused<lora::format_error>(path, "4294967295 parameters cannot fit");
  forge(36, 0xFFFFFFF0u, 4);
  expect_refused<lora::format_error>(path, "a parameter name needs 4294967280 bytes");
  forge(49, std::uint64_t{1} << 62, 8);
  expect_refused<lora::format_error>(path, "claims");
  // rows * cols overflowing 64 bits:
  {
    auto damaged = bytes;
    patch_and_reseal(damaged, 49, std::uint64_t{1} << 40, 8);
    patch_and_reseal(damaged, 57, std::uint64_t{1} << 40, 8);
    write_bytes(path, damaged, damaged.size());
  }
  expect_refused<lora::format_error>(path, "impossible shape");
  forge(12, 2, 4);
  expect_refused<lora::format_error>(path, "scalar size 2");
}

TEST_F(damaged_file_test, FilesThatCannotBeReadAreIoErrors) {
  expect_refused<lora::io_error>(dir.file("missing.ckpt"), "missing.ckpt");
  expect_refused<lora::io_error>(dir.path(), "directory");
}

// ---------------------------------------------------------------------------------------------------
// Mismatches: all or nothing

TEST(CheckpointMismatch, NamesShapesTypesAndOptimizersMustAgree) {
  scratch_dir dir;
  auto saved = small_adapter<double>();
  lora::optim::adamw<double> adamw(saved.params());
  adamw.step();
  lora::io::save_checkpoint(dir.file("m.ckpt"), adamw, {});
  lora::io::save_checkpoint(dir.file("plain.ckpt"), saved.params(), {});
  using lora_test::expect_error;

  tensors<double> fewer;  // the file holds fc.bias, which the model lacks
  fewer.add("fc.lora_A", 2, 3, 0);
  fewer.add("fc.lora_B", 4, 2, 0);
  expect_error<lora::name_error>([&] { lora::io::load_checkpoint(dir.file("m.ckpt"), fewer.params()); },
                                 {"holds parameter 'fc.bias'", "not among the 2"});
  auto more = small_adapter<double>(0.0);
  more.add("fc.extra", 1, 1, 0);
  expect_error<lora::name_error>([&] { lora::io::load_checkpoint(dir.file("m.ckpt"), more.params()); },
                                 {"m.ckpt", "no parameter 'fc.extra'"});
  tensors<double> reshaped;
  reshaped.add("fc.lora_A", 3, 2, 0);
  reshaped.add("fc.lora_B", 4, 2, 0);
  reshaped.add("fc.bias", 4, 1, 0);
  expect_error<lora::shape_error>([&] { lora::io::load_checkpoint(dir.file("m.ckpt"), reshaped.params()); },
                                  {"'fc.lora_A'", "2x3 in the file", "3x2 in the model"});
  auto as_float = small_adapter<float>();
  expect_error<lora::dtype_error>([&] { lora::io::load_checkpoint(dir.file("m.ckpt"), as_float.params()); },
                                  {"64-bit", "32-bit"});

  // Parameters that match but an optimizer that does not: nothing is written, not even the parameters.
  auto target = small_adapter<double>(-7.0);
  const auto before = target.values;
  lora::optim::sgd_options so;
  so.momentum = 0.5;
  lora::optim::sgd<double> sgd(target.params(), so);
  expect_error<lora::name_error>([&] { lora::io::load_checkpoint(dir.file("m.ckpt"), sgd); }, {"'adamw'"});
  lora::optim::adamw<double> fresh(target.params());
  expect_error<lora::name_error>([&] { lora::io::load_checkpoint(dir.file("plain.ckpt"), fresh); },
                                 {"no optimizer state", "'adamw'"});
  lora::optim::adamw_options ams;
  ams.amsgrad = true;  // one more state tensor per parameter than the file has
  lora::optim::adamw<double> amsgrad(target.params(), ams);
  expect_error<lora::name_error>([&] { lora::io::load_checkpoint(dir.file("m.ckpt"), amsgrad); }, {"max_exp_avg_sq"});
  for (std::size_t i = 0; i < before.size(); ++i) EXPECT_TRUE(target.values[i] == before[i]);
  EXPECT_EQ(fresh.step_count(), 0);
  EXPECT_EQ(amsgrad.step_count(), 0);
}

TEST(CheckpointMismatch, InvalidParameterListsAreRefusedBeforeWriting) {
  scratch_dir dir;
  tensors<double> twice;
  twice.add("w", 1, 1, 0);
  twice.add("w", 1, 1, 0);
  lora_test::expect_error<lora::name_error>([&] { lora::io::save_checkpoint(dir.file("d.ckpt"), twice.params(), {}); },
                                            {"duplicate", "'w'"});
  EXPECT_TRUE(dir.list().empty());
}

// ---------------------------------------------------------------------------------------------------
// Atomic writes

TEST(CheckpointAtomicWrite, PathThatIsADirectoryIsRefused) {
  scratch_dir dir;
  fs::create_directory(fs::path(dir.path()) / "taken");
  auto t = small_adapter<double>();
  lora_test::expect_error<lora::io_error>([&] { lora::io::save_checkpoint(dir.file("taken"), t.params(), {}); },
                                          {"taken"});
  EXPECT_TRUE(fs::is_directory(fs::path(dir.path()) / "taken"));
  EXPECT_EQ(dir.list(), std::vector<std::string>{"taken"});  // the temporary file is gone
  lora_test::expect_error<lora::io_error>(
      [&] { lora::io::save_checkpoint((fs::path(dir.path()) / "no" / "such" / "dir.ckpt").string(), t.params(), {}); },
      {"temporary file"});
}

TEST(CheckpointAtomicWrite, FailingWriterLeavesTheOldFile) {
  scratch_dir dir;
  auto t = small_adapter<double>();
  lora::io::checkpoint_info info;
  info.step = 1;
  lora::io::save_checkpoint(dir.file("keep.ckpt"), t.params(), info);
  const auto old_bytes = read_file(dir.file("keep.ckpt"));
  // A writer that dies halfway, as a serialiser would on a bad_alloc.
  EXPECT_THROW(lora::io::write_file_atomically(dir.file("keep.ckpt"),
                                               [](lora::io::file_sink& f) {
                                                 f.write("half a checkpoint");
                                                 f.flush();
                                                 throw std::runtime_error("writer failed");
                                               }),
               std::runtime_error);
  EXPECT_EQ(read_file(dir.file("keep.ckpt")), old_bytes);
  EXPECT_EQ(dir.list(), std::vector<std::string>{"keep.ckpt"});
}

#if !defined(_WIN32)
TEST(CheckpointAtomicWrite, FullDiskLeavesTheOldFile) {
  // RLIMIT_FSIZE makes writes past a size fail with EFBIG, as a full disk would, even for root.
  scratch_dir dir;
  auto t = small_adapter<double>();
  lora::io::checkpoint_info info;
  info.step = 1;
  lora::io::save_checkpoint(dir.file("keep.ckpt"), t.params(), info);
  const auto old_bytes = read_file(dir.file("keep.ckpt"));

  t.values[0].setConstant(42.0);
  info.step = 2;
  info.metadata["padding"] = std::string(4096, 'x');
  rlimit saved{};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &saved), 0);
  const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit small = saved;
  small.rlim_cur = 256;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  bool threw_io_error = false;
  try {
    lora::io::save_checkpoint(dir.file("keep.ckpt"), t.params(), info);
  } catch (const lora::io_error&) {
    threw_io_error = true;
  }
  setrlimit(RLIMIT_FSIZE, &saved);
  std::signal(SIGXFSZ, old_handler);

  EXPECT_TRUE(threw_io_error);
  EXPECT_EQ(read_file(dir.file("keep.ckpt")), old_bytes);
  EXPECT_EQ(dir.list(), std::vector<std::string>{"keep.ckpt"});
  auto back = small_adapter<double>(0.0);
  EXPECT_EQ(lora::io::load_checkpoint(dir.file("keep.ckpt"), back.params()).step, 1);
}
#endif

}  // namespace
