// Tests for examples/common/idx.hpp: IDX files written here, gzip-compressed and plain, read back;
// every malformed file raises the right lora error with a message naming the file and the rule.
#include <unistd.h>
#include <zlib.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "common/idx.hpp"
#include "support.hpp"

namespace {

namespace fs = std::filesystem;
using ex::idx_images_magic;
using ex::idx_labels_magic;
using ex::load_fashion_mnist;
using ex::read_idx;
using ex::read_idx_images;
using ex::read_idx_labels;
using lora_test::expect_error;
using bytes = std::vector<std::uint8_t>;

void put_be32(bytes& out, std::uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<std::uint8_t>(v >> shift));
}

/// An IDX file: magic, dims, then the payload as given (which may disagree with dims on purpose).
bytes idx_file(std::uint32_t magic, const std::vector<std::uint32_t>& dims, const bytes& payload) {
  bytes out;
  put_be32(out, magic);
  for (std::uint32_t d : dims) put_be32(out, d);
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

/// n images of h x w whose pixel k of image i is (7 i + k) mod 256.
bytes image_payload(std::uint32_t n, std::uint32_t h, std::uint32_t w) {
  bytes out(static_cast<std::size_t>(n) * h * w);
  for (std::size_t k = 0; k < out.size(); ++k) {
    out[k] = static_cast<std::uint8_t>((7 * (k / (h * w)) + k % (h * w)) % 256);
  }
  return out;
}

class idx_test : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    m_dir = fs::temp_directory_path() /
            ("lora_test_idx_" + std::to_string(::getpid()) + "_" + info->test_suite_name() + "_" + info->name());
    fs::remove_all(m_dir);
    fs::create_directories(m_dir);
  }
  void TearDown() override { fs::remove_all(m_dir); }

  /// Writes `data` to dir/name, gzip-compressed when name ends in ".gz"; returns the path.
  std::string write(const std::string& name, const bytes& data) const {
    const std::string path = (m_dir / name).string();
    if (name.size() > 3 && name.compare(name.size() - 3, 3, ".gz") == 0) {
      gzFile f = gzopen(path.c_str(), "wb");
      EXPECT_NE(f, nullptr);
      if (!data.empty()) {
        EXPECT_EQ(gzwrite(f, data.data(), static_cast<unsigned>(data.size())), int(data.size()));
      }
      EXPECT_EQ(gzclose(f), Z_OK);
    } else {
      std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(data.data()), data.size());
    }
    return path;
  }

  /// The raw bytes of a file.
  static bytes slurp(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }

  /// Writes a small Fashion-MNIST-shaped set (n_train + n_test images of 28x28) as .gz files.
  void write_dataset(std::uint32_t n_train, std::uint32_t n_test, std::uint32_t n_test_labels) const {
    write("train-images-idx3-ubyte.gz", idx_file(idx_images_magic, {n_train, 28, 28}, image_payload(n_train, 28, 28)));
    write("train-labels-idx1-ubyte.gz", idx_file(idx_labels_magic, {n_train}, bytes(n_train, 3)));
    write("t10k-images-idx3-ubyte.gz", idx_file(idx_images_magic, {n_test, 28, 28}, image_payload(n_test, 28, 28)));
    write("t10k-labels-idx1-ubyte.gz", idx_file(idx_labels_magic, {n_test_labels}, bytes(n_test_labels, 9)));
  }

  fs::path m_dir;
};

/// Checks x against image_payload(n, 28, 28): one image per row, pixel k in column k, scaled by 1/255.
void expect_images(const lora::matrix<float>& x, std::uint32_t n) {
  ASSERT_EQ(x.rows(), n);
  ASSERT_EQ(x.cols(), 784);
  const bytes payload = image_payload(n, 28, 28);
  for (lora::index i = 0; i < x.rows(); ++i) {
    for (lora::index k = 0; k < 784; ++k) {
      ASSERT_EQ(x(i, k), static_cast<float>(payload[i * 784 + k]) / 255.0f) << "image " << i << " pixel " << k;
    }
  }
}

TEST_F(idx_test, reads_plain_and_gzip_images_one_per_row_in_unit_range) {
  const bytes file = idx_file(idx_images_magic, {5, 28, 28}, image_payload(5, 28, 28));
  for (const char* name : {"images", "images.gz"}) {
    SCOPED_TRACE(name);
    const lora::matrix<float> x = read_idx_images(write(name, file));
    expect_images(x, 5);
    EXPECT_EQ(x.minCoeff(), 0.0f);
    EXPECT_EQ(x.maxCoeff(), 1.0f);  // byte 255 maps to exactly 1
  }
}

TEST_F(idx_test, reads_plain_and_gzip_labels) {
  const bytes file = idx_file(idx_labels_magic, {6}, {0, 9, 3, 3, 7, 1});
  for (const char* name : {"labels", "labels.gz"}) {
    SCOPED_TRACE(name);
    EXPECT_EQ(read_idx_labels(write(name, file)), (std::vector<int>{0, 9, 3, 3, 7, 1}));
  }
}

TEST_F(idx_test, read_idx_returns_dims_and_payload) {
  const ex::idx_array a =
      read_idx(write("a.gz", idx_file(idx_images_magic, {2, 3, 4}, image_payload(2, 3, 4))), idx_images_magic);
  EXPECT_EQ(a.dims, (std::vector<std::uint32_t>{2, 3, 4}));
  EXPECT_EQ(a.data, image_payload(2, 3, 4));
}

TEST_F(idx_test, zero_images_give_an_empty_matrix) {
  const lora::matrix<float> x = read_idx_images(write("empty.gz", idx_file(idx_images_magic, {0, 28, 28}, {})));
  EXPECT_EQ(x.rows(), 0);
  EXPECT_EQ(x.cols(), 784);
}

TEST_F(idx_test, wrong_magic_is_a_format_error) {
  // A label file read as images, and a file with a non-byte element type (0x0D = float).
  const std::string labels = write("labels.gz", idx_file(idx_labels_magic, {2}, {1, 2}));
  expect_error<lora::format_error>([&] { read_idx_images(labels); },
                                   {labels, "magic number 0x00000801", "expected 0x00000803"});
  const std::string floats = write("floats", idx_file(0x00000D01, {1}, {0, 0, 0, 0}));
  expect_error<lora::format_error>([&] { read_idx_labels(floats); }, {floats, "0x00000d01", "expected 0x00000801"});
  const std::string text = write("text", bytes{'h', 'e', 'l', 'l', 'o', '\n'});
  expect_error<lora::format_error>([&] { read_idx_labels(text); }, {text, "magic"});
}

TEST_F(idx_test, truncated_header_is_a_format_error) {
  const std::string empty = write("empty", {});
  expect_error<lora::format_error>([&] { read_idx_labels(empty); }, {empty, "truncated", "magic"});
  bytes cut = idx_file(idx_images_magic, {1, 28, 28}, {});
  cut.resize(9);  // magic, the first dimension and one byte of the second
  for (const char* name : {"cut", "cut.gz"}) {
    const std::string path = write(name, cut);
    expect_error<lora::format_error>([&] { read_idx_images(path); }, {path, "truncated", "dimension 2 of 3"});
  }
}

TEST_F(idx_test, truncated_payload_is_a_format_error) {
  // The header claims 3 images, the file holds 2 and a half.
  bytes file = idx_file(idx_images_magic, {3, 28, 28}, image_payload(3, 28, 28));
  file.resize(file.size() - 392);
  for (const char* name : {"short", "short.gz"}) {
    const std::string path = write(name, file);
    expect_error<lora::format_error>([&] { read_idx_images(path); }, {path, "truncated", "2352", "1960"});
  }
}

TEST_F(idx_test, cut_gzip_stream_is_a_format_error) {
  // A valid .gz file cut in the middle of its compressed stream.
  const std::string whole = write("whole.gz", idx_file(idx_images_magic, {20, 28, 28}, image_payload(20, 28, 28)));
  bytes gz = slurp(whole);
  gz.resize(gz.size() / 2);
  const std::string path = write("cut_stream", gz);  // no .gz suffix: written raw
  expect_error<lora::format_error>([&] { read_idx_images(path); }, {path, "truncated"});
}

TEST_F(idx_test, corrupt_gzip_stream_is_a_format_error) {
  const std::string whole = write("whole.gz", idx_file(idx_labels_magic, {4000}, bytes(4000, 5)));
  bytes gz = slurp(whole);
  for (std::size_t k = 12; k < gz.size() - 8; ++k) gz[k] = static_cast<std::uint8_t>(gz[k] ^ 0x5a);
  const std::string path = write("corrupt", gz);
  expect_error<lora::format_error>([&] { read_idx_labels(path); }, {path});
}

TEST_F(idx_test, trailing_bytes_are_a_format_error) {
  bytes file = idx_file(idx_labels_magic, {3}, {1, 2, 3});
  file.push_back(0);
  for (const char* name : {"long", "long.gz"}) {
    const std::string path = write(name, file);
    expect_error<lora::format_error>([&] { read_idx_labels(path); }, {path, "trailing", "3 bytes"});
  }
}

TEST_F(idx_test, image_size_other_than_expected_is_a_format_error) {
  const std::string path = write("small.gz", idx_file(idx_images_magic, {2, 27, 29}, image_payload(2, 27, 29)));
  expect_error<lora::format_error>([&] { read_idx_images(path); }, {path, "27x29", "expected 28x28"});
  EXPECT_EQ(read_idx_images(path, 27, 29).cols(), 27 * 29);
}

TEST_F(idx_test, huge_dimensions_are_refused_before_reading) {
  // 2^32-1 cubed overflows 64 bits; 100000 x 100000 x 1000 does not but exceeds the cap. Neither may
  // allocate (a bad_alloc or an ASan abort would fail the test), both name the limit.
  const std::string overflow =
      write("overflow.gz", idx_file(idx_images_magic, {0xffffffffu, 0xffffffffu, 0xffffffffu}, {}));
  expect_error<lora::format_error>([&] { read_idx_images(overflow); }, {overflow, "4294967295", "limit"});
  const std::string big = write("big", idx_file(idx_images_magic, {100000, 100000, 1000}, image_payload(1, 4, 4)));
  expect_error<lora::format_error>([&] { read_idx(big, idx_images_magic); }, {big, "100000 x 100000 x ...", "limit"});
  // A claim under the cap that the file does not back: truncated, after reading only what is there.
  const std::string claim = write("claim.gz", idx_file(idx_labels_magic, {1u << 29}, bytes(10, 1)));
  expect_error<lora::format_error>([&] { read_idx_labels(claim); }, {claim, "truncated", "536870912", "holds 10"});
  // A caller's own cap.
  const std::string ok = write("ok", idx_file(idx_labels_magic, {100}, bytes(100, 1)));
  expect_error<lora::format_error>([&] { read_idx(ok, idx_labels_magic, 99); }, {ok, "limit of 99 bytes"});
}

TEST_F(idx_test, labels_out_of_range_are_a_format_error) {
  const std::string path = write("labels", idx_file(idx_labels_magic, {3}, {1, 10, 2}));
  expect_error<lora::format_error>([&] { read_idx_labels(path); }, {path, "label 10 at index 1", "[0, 10)"});
  EXPECT_EQ(read_idx_labels(path, 11), (std::vector<int>{1, 10, 2}));
}

TEST_F(idx_test, missing_file_or_directory_is_an_io_error_with_the_install_hint) {
  const std::string missing = (m_dir / "no-such-file.gz").string();
  expect_error<lora::io_error>([&] { read_idx_images(missing); },
                               {missing, "No such file", "apt-get install dataset-fashion-mnist"});
  expect_error<lora::io_error>([&] { read_idx_labels(m_dir.string()); }, {m_dir.string(), "directory"});
}

TEST_F(idx_test, load_fashion_mnist_reads_the_four_files) {
  write_dataset(4, 3, 3);
  const ex::image_dataset d = load_fashion_mnist(m_dir.string());
  expect_images(d.train_x, 4);
  expect_images(d.test_x, 3);
  EXPECT_EQ(d.train_y, std::vector<int>(4, 3));
  EXPECT_EQ(d.test_y, std::vector<int>(3, 9));
}

TEST_F(idx_test, load_fashion_mnist_falls_back_to_uncompressed_files) {
  write_dataset(2, 2, 2);
  for (const char* stem : {"train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}) {
    const std::string gz = (m_dir / (std::string(stem) + ".gz")).string();
    gzFile f = gzopen(gz.c_str(), "rb");
    ASSERT_NE(f, nullptr);
    bytes plain(1 << 16);
    const int n = gzread(f, plain.data(), static_cast<unsigned>(plain.size()));
    gzclose(f);
    plain.resize(static_cast<std::size_t>(n));
    fs::remove(gz);
    write(stem, plain);
  }
  const ex::image_dataset d = load_fashion_mnist(m_dir.string() + "/");
  expect_images(d.train_x, 2);
  EXPECT_EQ(d.test_y, std::vector<int>(2, 9));
}

TEST_F(idx_test, load_fashion_mnist_checks_that_counts_agree) {
  write_dataset(4, 3, 2);
  expect_error<lora::format_error>([&] { load_fashion_mnist(m_dir.string()); },
                                   {"t10k-images-idx3-ubyte.gz", "3 images", "t10k-labels-idx1-ubyte.gz", "2 labels"});
}

TEST_F(idx_test, load_fashion_mnist_without_the_files_is_an_io_error_with_the_install_hint) {
  expect_error<lora::io_error>([&] { load_fashion_mnist((m_dir / "nowhere").string()); },
                               {"nowhere/train-images-idx3-ubyte.gz", "apt-get install dataset-fashion-mnist"});
}

// The real data, when the Debian package is installed: the labels (fast to read) have the published
// counts, 6000 and 1000 per class; the test images have the published shape.
TEST(idx_real, fashion_mnist_files_have_the_published_counts) {
  const std::string dir = ex::fashion_mnist_default_dir;
  if (!fs::exists(dir + "/t10k-labels-idx1-ubyte.gz")) GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  const std::vector<int> train_y = read_idx_labels(dir + "/train-labels-idx1-ubyte.gz");
  const std::vector<int> test_y = read_idx_labels(dir + "/t10k-labels-idx1-ubyte.gz");
  ASSERT_EQ(train_y.size(), 60000u);
  ASSERT_EQ(test_y.size(), 10000u);
  std::vector<int> train_counts(10), test_counts(10);
  for (int y : train_y) ++train_counts[y];
  for (int y : test_y) ++test_counts[y];
  EXPECT_EQ(train_counts, std::vector<int>(10, 6000));
  EXPECT_EQ(test_counts, std::vector<int>(10, 1000));
  const lora::matrix<float> test_x = read_idx_images(dir + "/t10k-images-idx3-ubyte.gz");
  EXPECT_EQ(test_x.rows(), 10000);
  EXPECT_EQ(test_x.cols(), 784);
  EXPECT_GE(test_x.minCoeff(), 0.0f);
  EXPECT_LE(test_x.maxCoeff(), 1.0f);
  EXPECT_NEAR(test_x.mean(), 0.286, 0.01);  // Fashion-MNIST's mean pixel
}

}  // namespace
