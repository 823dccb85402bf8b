// tests/test_safetensors.cpp: the safetensors reader and writer. Round trips in float and double, a
// file assembled byte by byte from the format description, byte-exact agreement with the reference
// writer's own test vectors, one malformed file per loader rule, truncation and mutation sweeps, the
// stream writer, and the atomicity of writes (the atomic-write protocol itself: test_atomic_file.cpp;
// the number formats: test_dtype_codec.cpp).
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cfloat>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <lora/io/safetensors.hpp>
#include <string>
#include <vector>

#include "file_support.hpp"
#include "support.hpp"

namespace {

namespace io = lora::io;
namespace detail = lora::io::detail;
using bytes = std::vector<unsigned char>;
using lora_test::expect_error;
using lora_test::read_file;
using lora_test::temp_dir;
using lora_test::write_file;

// --- helpers ---------------------------------------------------------------------------------------

/// 8-byte little-endian length, then the header as given, then the data.
bytes file_image(const std::string& header, const bytes& data = {}) {
  // Sized once and filled with memcpy: GCC 12 at -O3 misreports vector::insert here (-Warray-bounds).
  bytes out(8 + header.size() + data.size());
  detail::store_le<std::uint64_t>(header.size(), out.data());
  if (!header.empty()) std::memcpy(out.data() + 8, header.data(), header.size());
  if (!data.empty()) std::memcpy(out.data() + 8 + header.size(), data.data(), data.size());
  return out;
}

/// Expects the image to be refused with format_error, whose message names the file and contains each
/// fragment, through every way in: mmap, pread and from_bytes.
void expect_rejected(const bytes& image, const std::vector<std::string>& fragments) {
  temp_dir dir;
  const std::string path = dir.file("bad.safetensors");
  write_file(path, image);
  const auto check = [&](const std::function<void()>& open) {
    try {
      open();
      ADD_FAILURE() << "expected format_error, the file was accepted";
    } catch (const lora::format_error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("bad.safetensors"), std::string::npos) << what;
      for (const auto& f : fragments)
        EXPECT_NE(what.find(f), std::string::npos) << "'" << what << "' lacks '" << f << "'";
    }
  };
  check([&] { io::safetensors_file::open(path); });
  check([&] { io::safetensors_file::open(path, io::read_mode::pread); });
  check([&] { io::safetensors_file::from_bytes(image, "bad.safetensors"); });
}

/// A header entry.
std::string entry(const std::string& name, const std::string& dtype, const std::string& shape, std::uint64_t begin,
                  std::uint64_t end) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
         std::to_string(begin) + "," + std::to_string(end) + "]}";
}

double pow2(int e) { return std::ldexp(1.0, e); }

/// Equal as values, with NaN equal to NaN and -0 distinct from +0.
template <typename Scalar>
bool same(Scalar a, Scalar b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return a == b && std::signbit(a) == std::signbit(b);
}

template <typename A, typename B>
void expect_same(const A& actual, const B& expected) {
  ASSERT_EQ(actual.rows(), expected.rows());
  ASSERT_EQ(actual.cols(), expected.cols());
  for (lora::index j = 0; j < actual.cols(); ++j) {
    for (lora::index i = 0; i < actual.rows(); ++i) {
      EXPECT_TRUE(same(actual(i, j), expected(i, j)))
          << "(" << i << "," << j << "): " << actual(i, j) << " vs " << expected(i, j);
    }
  }
}

/// What storing x as `type` and reading it back as Scalar must give.
template <typename Scalar>
Scalar stored(Scalar x, io::dtype type) {
  switch (type) {
    case io::dtype::f64:
      return x;
    case io::dtype::f32:
      return static_cast<Scalar>(detail::narrow_to_float(static_cast<double>(x)));
    case io::dtype::f16:
      return static_cast<Scalar>(detail::from_half_bits(detail::to_half_bits(x)));
    case io::dtype::bf16:
      return static_cast<Scalar>(detail::from_bfloat16_bits(detail::to_bfloat16_bits(x)));
    default:
      ADD_FAILURE() << "not a writable dtype";
      return x;
  }
}

/// A valid file with three tensors of different dtypes, as the sweeps below mutate it.
bytes sample_file() {
  lora::matrix<float> w(2, 3);
  w << 1, 2, 3, 4, 5, 6;
  lora::vector<double> b(2);
  b << -1.5, 0.25;
  io::safetensors_writer writer;
  writer.add("w", w, io::dtype::f32).add("b", b, io::dtype::bf16).add("h", w.row(1), io::dtype::f16);
  writer.set_metadata({{"format", "pt"}});
  return writer.to_bytes();
}

/// Reads every tensor as float where it can; a stand-in for what a user does with an opened file.
void read_everything(const io::safetensors_file& file) {
  for (const auto& t : file.tensors()) {
    try {
      (void)file.read_vector<float>(t.name);
      if (t.rank() == 1 || t.rank() == 2) (void)file.read_matrix<double>(t.name);
      (void)file.raw(t.name);
    } catch (const lora::dtype_error&) {
    }
  }
}

constexpr io::dtype writable_dtypes[] = {io::dtype::f64, io::dtype::f32, io::dtype::f16, io::dtype::bf16};

// --- round trips, in float and double --------------------------------------------------------------------------

template <typename Scalar>
class SafetensorsRoundTrip : public ::testing::Test {
 protected:
  /// Random values plus the awkward ones: signed zeros, Inf, NaN, values that overflow or underflow
  /// binary16, exact ties.
  static lora::matrix<Scalar> values() {
    lora::matrix<Scalar> m = lora::matrix<Scalar>::Random(7, 5) * Scalar(100);
    const Scalar inf = std::numeric_limits<Scalar>::infinity();
    const Scalar specials[] = {Scalar(0),
                               Scalar(-0.0),
                               inf,
                               -inf,
                               std::numeric_limits<Scalar>::quiet_NaN(),
                               Scalar(65504),
                               Scalar(1e-8),
                               Scalar(1e30),
                               Scalar(-1e-30),
                               Scalar(1 + pow2(-11)),
                               Scalar(1 + pow2(-8)),
                               Scalar(0.1)};
    for (std::size_t k = 0; k < std::size(specials); ++k)
      m(static_cast<lora::index>(k) % 7, static_cast<lora::index>(k) / 7) = specials[k];
    return m;
  }
};
/// Names the typed instances "float" and "double" (and gives the macro its third argument, which
/// clang's -Wpedantic otherwise reports as missing).
struct scalar_name {
  template <typename T>
  static std::string GetName(int /*index*/) {
    return std::is_same_v<T, float> ? "float" : "double";
  }
};
TYPED_TEST_SUITE(SafetensorsRoundTrip, lora_test::scalar_types, scalar_name);

TYPED_TEST(SafetensorsRoundTrip, EveryWritableDtype) {
  using Scalar = TypeParam;
  const lora::matrix<Scalar> m = this->values();
  temp_dir dir;
  for (io::dtype type : writable_dtypes) {
    SCOPED_TRACE(io::dtype_name(type));
    io::safetensors_writer writer;
    writer.add("m", m, type);
    const std::string path = dir.file(std::string(io::dtype_name(type)) + ".safetensors");
    writer.write(path);
    lora::matrix<Scalar> expected = m;
    for (lora::index k = 0; k < m.size(); ++k) expected(k) = stored(m(k), type);
    for (io::read_mode mode : {io::read_mode::map, io::read_mode::pread}) {
      const auto file = io::safetensors_file::open(path, mode);
      EXPECT_EQ(file.info("m").type, type);
      EXPECT_EQ(file.info("m").shape, (std::vector<std::int64_t>{7, 5}));
      expect_same(file.read_matrix<Scalar>("m"), expected);
    }
    expect_same(io::safetensors_file::from_bytes(writer.to_bytes()).read_matrix<Scalar>("m"), expected);
    EXPECT_EQ(read_file(path), writer.to_bytes());
  }
}

TYPED_TEST(SafetensorsRoundTrip, ExactlyRepresentableValuesComeBackUnchanged) {
  using Scalar = TypeParam;
  lora::matrix<Scalar> m(2, 4);
  m << 1, -2, 0.5, 256, -0.125, 3, 0, 96;  // exact in every writable dtype
  for (io::dtype type : writable_dtypes) {
    io::safetensors_writer writer;
    writer.add("m", m, type);
    expect_same(io::safetensors_file::from_bytes(writer.to_bytes()).read_matrix<Scalar>("m"), m);
  }
}

TYPED_TEST(SafetensorsRoundTrip, RowMajorOnDiskAndAnyEigenExpression) {
  using Scalar = TypeParam;
  lora::matrix<Scalar> m(2, 3);
  m << 1, 2, 3, 4, 5, 6;
  io::safetensors_writer writer;
  writer.add("m", m, io::dtype::f32);
  const auto file = io::safetensors_file::from_bytes(writer.to_bytes());
  // On disk: 1 2 3 4 5 6, row after row.
  const io::tensor_bytes raw = file.raw("m");
  ASSERT_EQ(raw.size(), 24u);
  for (std::size_t k = 0; k < 6; ++k) {
    const std::uint32_t bits = detail::load_le<std::uint32_t>(raw.data() + 4 * k);
    float value;
    std::memcpy(&value, &bits, sizeof value);
    EXPECT_EQ(value, static_cast<float>(k + 1));
  }
  EXPECT_EQ(file.read_matrix<Scalar>("m"), m);

  // Row-major storage, transposes, blocks, maps and lazy expressions all write their (i, j) entries.
  using row_major = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const row_major r = m;
  const lora::matrix<Scalar> a = lora::matrix<Scalar>::Random(3, 4);
  const lora::matrix<Scalar> b = lora::matrix<Scalar>::Random(4, 2);
  const lora::matrix<Scalar> big = lora::matrix<Scalar>::Random(6, 7);
  Scalar raw_data[6] = {1, 2, 3, 4, 5, 6};
  const Eigen::Map<const row_major> mapped(raw_data, 3, 2);
  io::safetensors_writer w;
  w.add("row_major", r)
      .add("transpose", m.transpose())
      .add("block", big.block(1, 2, 3, 4))
      .add("strided", big.template topRows<4>().transpose())
      .add("product", a * b)
      .add("expression", (a.array().square() + Scalar(1)).matrix())
      .add("map", mapped);
  const auto f = io::safetensors_file::from_bytes(w.to_bytes());
  EXPECT_EQ(f.read_matrix<Scalar>("row_major"), m);
  EXPECT_EQ(f.read_matrix<Scalar>("transpose"), m.transpose());
  EXPECT_EQ(f.read_matrix<Scalar>("block"), big.block(1, 2, 3, 4));
  EXPECT_EQ(f.read_matrix<Scalar>("strided"), big.topRows(4).transpose());
  EXPECT_EQ(f.read_matrix<Scalar>("product"), (a * b).eval());
  EXPECT_EQ(f.read_matrix<Scalar>("expression"), (a.array().square() + Scalar(1)).matrix().eval());
  EXPECT_EQ(f.read_matrix<Scalar>("map"), mapped);
}

TYPED_TEST(SafetensorsRoundTrip, VectorsScalarsAndHigherRanks) {
  using Scalar = TypeParam;
  lora::vector<Scalar> v(3);
  v << 1, 2, 3;
  const Eigen::Matrix<Scalar, 1, Eigen::Dynamic> row = v.transpose();
  lora::matrix<Scalar> cube(2, 6);  // rows of a [2, 2, 3] tensor, flattened row-major per row
  cube << 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11;
  lora::matrix<Scalar> one(1, 1);
  one << 42;
  io::safetensors_writer w;
  w.add("v", v)
      .add("row", row)
      .add("cube", cube, io::dtype_of<Scalar>(), {2, 2, 3})
      .add("scalar", one, io::dtype::f32, {});
  w.add("column_as_2d", lora::matrix<Scalar>(v));
  const auto f = io::safetensors_file::from_bytes(w.to_bytes());
  EXPECT_EQ(f.info("v").shape, (std::vector<std::int64_t>{3}));
  EXPECT_EQ(f.info("row").shape, (std::vector<std::int64_t>{3}));
  EXPECT_EQ(f.info("column_as_2d").shape, (std::vector<std::int64_t>{3, 1}));
  EXPECT_EQ(f.info("scalar").shape, (std::vector<std::int64_t>{}));
  EXPECT_EQ(f.info("cube").numel(), 12);
  EXPECT_EQ(f.read_matrix<Scalar>("v"), lora::matrix<Scalar>(v));  // 1-D reads as n x 1
  EXPECT_EQ(f.read_vector<Scalar>("row"), v);
  lora::vector<Scalar> flat(12);
  for (int k = 0; k < 12; ++k) flat(k) = Scalar(k);
  EXPECT_EQ(f.read_vector<Scalar>("cube"), flat);
  EXPECT_EQ(f.read_vector<Scalar>("scalar"), lora::vector<Scalar>::Constant(1, 42));
  expect_error<lora::shape_error>([&] { (void)f.read_matrix<Scalar>("cube"); }, {"'cube'", "[2, 2, 3]", "rank 3"});
  expect_error<lora::shape_error>([&] { (void)f.read_matrix<Scalar>("scalar"); }, {"'scalar'", "rank 0"});
}

TYPED_TEST(SafetensorsRoundTrip, ExplicitShapeMustFitTheValues) {
  using Scalar = TypeParam;
  const lora::matrix<Scalar> m = lora::matrix<Scalar>::Ones(2, 3);
  io::safetensors_writer w;
  expect_error<lora::shape_error>([&] { w.add("a", m, io::dtype::f32, {3, 2}); }, {"'a'", "[3, 2]", "2x3"});
  expect_error<lora::shape_error>([&] { w.add("b", m, io::dtype::f32, {6}); }, {"'b'", "[6]"});
  expect_error<lora::shape_error>([&] { w.add("c", m, io::dtype::f32, {7, 1, 1}); }, {"'c'"});
  expect_error<lora::shape_error>([&] { w.add("d", m, io::dtype::f32, {-2, -3}); }, {"'d'"});
  w.add("e", m, io::dtype::f32, {3, 1, 2});
  EXPECT_EQ(w.size(), 1u);
}

TYPED_TEST(SafetensorsRoundTrip, IntegerBooleanAndFloat8DtypesRead) {
  using Scalar = TypeParam;
  io::safetensors_writer w;
  w.add_raw("bool", io::dtype::boolean, {4}, bytes{0, 1, 2, 255});
  w.add_raw("u8", io::dtype::u8, {2}, bytes{0, 255});
  w.add_raw("i8", io::dtype::i8, {2}, bytes{0x80, 0x7F});
  w.add_raw("i16", io::dtype::i16, {2}, bytes{0x00, 0x80, 0xFF, 0x7F});
  w.add_raw("u16", io::dtype::u16, {1}, bytes{0xFF, 0xFF});
  w.add_raw("i32", io::dtype::i32, {2}, bytes{0xFE, 0xFF, 0xFF, 0xFF, 0x00, 0x01, 0x00, 0x00});
  w.add_raw("u32", io::dtype::u32, {1}, bytes{0x01, 0x00, 0x00, 0x80});
  w.add_raw("i64", io::dtype::i64, {1}, bytes{0xFD, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF});
  w.add_raw("u64", io::dtype::u64, {1}, bytes{0, 0, 0, 0, 0, 0, 0, 0x80});
  w.add_raw("e4m3", io::dtype::f8_e4m3, {3}, bytes{0x38, 0xFE, 0x7F});
  w.add_raw("e5m2", io::dtype::f8_e5m2, {2}, bytes{0x3C, 0xFC});
  w.add_raw("e8m0", io::dtype::f8_e8m0, {2}, bytes{127, 130});
  const auto f = io::safetensors_file::from_bytes(w.to_bytes());
  const auto vec = [](std::initializer_list<double> xs) {
    lora::vector<Scalar> v(static_cast<lora::index>(xs.size()));
    lora::index k = 0;
    for (double x : xs) v(k++) = static_cast<Scalar>(x);
    return v;
  };
  EXPECT_EQ(f.read_vector<Scalar>("bool"), vec({0, 1, 1, 1}));
  EXPECT_EQ(f.read_vector<Scalar>("u8"), vec({0, 255}));
  EXPECT_EQ(f.read_vector<Scalar>("i8"), vec({-128, 127}));
  EXPECT_EQ(f.read_vector<Scalar>("i16"), vec({-32768, 32767}));
  EXPECT_EQ(f.read_vector<Scalar>("u16"), vec({65535}));
  EXPECT_EQ(f.read_vector<Scalar>("i32"), vec({-2, 256}));
  EXPECT_EQ(f.read_vector<Scalar>("u32"), vec({2147483649.0}));
  EXPECT_EQ(f.read_vector<Scalar>("i64"), vec({-3}));
  EXPECT_EQ(f.read_vector<Scalar>("u64"), vec({9223372036854775808.0}));
  const lora::vector<Scalar> e4m3 = f.read_vector<Scalar>("e4m3");
  EXPECT_EQ(e4m3(0), Scalar(1));
  EXPECT_EQ(e4m3(1), Scalar(-448));
  EXPECT_TRUE(std::isnan(e4m3(2)));
  EXPECT_EQ(f.read_vector<Scalar>("e5m2"), vec({1, -std::numeric_limits<double>::infinity()}));
  EXPECT_EQ(f.read_vector<Scalar>("e8m0"), vec({1, 8}));
}

TYPED_TEST(SafetensorsRoundTrip, UnsupportedConversionsAreDtypeErrors) {
  using Scalar = TypeParam;
  const lora::matrix<Scalar> m = lora::matrix<Scalar>::Ones(2, 2);
  io::safetensors_writer w;
  for (const auto& [type, name, size] : io::detail::dtype_table) {
    if (io::is_writable_from_real(type)) continue;
    expect_error<lora::dtype_error>([&] { w.add(std::string("x_") + io::dtype_name(type), m, type); },
                                    {io::dtype_name(type), "add_raw"});
  }
  EXPECT_EQ(w.size(), 0u);
  w.add_raw("complex", io::dtype::c64, {2}, bytes(16, 0));
  const auto f = io::safetensors_file::from_bytes(w.to_bytes());
  expect_error<lora::dtype_error>([&] { (void)f.read_vector<Scalar>("complex"); }, {"'complex'", "C64"});
  expect_error<lora::dtype_error>([&] { (void)f.read_matrix<Scalar>("complex"); }, {"'complex'", "C64"});
  EXPECT_EQ(f.raw("complex").size(), 16u);
}

TYPED_TEST(SafetensorsRoundTrip, LargeTensorsCrossChunkBoundariesInEveryMode) {
  using Scalar = TypeParam;
  // 700 x 500 elements: 1.4 MB in F32, 2.8 MB in F64, several 1 MiB chunks either way.
  const lora::matrix<Scalar> m = lora::matrix<Scalar>::Random(700, 500);
  const lora::vector<Scalar> v = lora::vector<Scalar>::Random(300001);
  temp_dir dir;
  const std::string path = dir.file("large.safetensors");
  io::safetensors_writer w;
  w.add("m", m).add("v", v).add("m16", m, io::dtype::f16);
  w.write(path);
  lora::matrix<Scalar> m16 = m;
  for (lora::index k = 0; k < m.size(); ++k) m16(k) = stored(m(k), io::dtype::f16);
  const auto mapped = io::safetensors_file::open(path);
  const auto unmapped = io::safetensors_file::open(path, io::read_mode::pread);
  EXPECT_TRUE(mapped.is_memory_resident());
  EXPECT_FALSE(unmapped.is_memory_resident());
  for (const io::safetensors_file* f : {&mapped, &unmapped}) {
    EXPECT_EQ(f->read_matrix<Scalar>("m"), m);
    EXPECT_EQ(f->read_vector<Scalar>("v"), v);
    EXPECT_EQ(f->read_matrix<Scalar>("m16"), m16);
  }
  const io::tensor_bytes a = mapped.raw("m");
  const io::tensor_bytes b = unmapped.raw("m");
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size()), 0);
}

// --- fixtures built by hand from the format description ----------------------------------------------------

TEST(SafetensorsFixture, ReadsAFileAssembledByteByByte) {
  // Four tensors; offsets need not be aligned (F16 at 24, BF16 at 30, I32 at 34).
  const std::string header =
      "{\"__metadata__\":{\"format\":\"pt\"},"
      "\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
      "\"h\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[24,30]},"
      "\"b\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[30,34]},"
      "\"i\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[34,38]}}";
  const bytes data = {
      0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x40, 0x40,  // w row 0: 1 2 3 (F32 LE)
      0x00, 0x00, 0x80, 0x40, 0x00, 0x00, 0xA0, 0x40, 0x00, 0x00, 0xC0, 0x40,  // w row 1: 4 5 6
      0x00, 0x3C, 0x00, 0xC0, 0x00, 0x38,                                      // h: 1 -2 0.5 (F16 LE)
      0x80, 0x3F, 0x00, 0xBF,                                                  // b: 1 -0.5 (BF16 LE)
      0xFE, 0xFF, 0xFF, 0xFF,                                                  // i: -2 (I32 LE)
  };
  bytes image = {static_cast<unsigned char>(header.size()), 0, 0, 0, 0, 0, 0, 0};
  ASSERT_LT(header.size(), 256u);
  image.insert(image.end(), header.begin(), header.end());
  image.insert(image.end(), data.begin(), data.end());

  temp_dir dir;
  write_file(dir.file("fixture.safetensors"), image);
  for (io::read_mode mode : {io::read_mode::map, io::read_mode::pread}) {
    const auto f = io::safetensors_file::open(dir.file("fixture.safetensors"), mode);
    EXPECT_EQ(f.data_offset(), 8 + header.size());
    ASSERT_EQ(f.tensors().size(), 4u);
    const char* order[] = {"w", "h", "b", "i"};  // file order = data order
    for (int k = 0; k < 4; ++k) EXPECT_EQ(f.tensors()[static_cast<std::size_t>(k)].name, order[k]);
    EXPECT_EQ(f.metadata(), (std::map<std::string, std::string>{{"format", "pt"}}));
    const lora::matrix<double> w = f.read_matrix<double>("w");
    ASSERT_EQ(w.rows(), 2);
    ASSERT_EQ(w.cols(), 3);
    EXPECT_EQ(w(0, 0), 1);
    EXPECT_EQ(w(0, 2), 3);
    EXPECT_EQ(w(1, 0), 4);
    EXPECT_EQ(w(1, 2), 6);
    EXPECT_EQ(f.read_vector<float>("h"), (lora::vector<float>(3) << 1, -2, 0.5).finished());
    EXPECT_EQ(f.read_vector<double>("b"), (lora::vector<double>(2) << 1, -0.5).finished());
    EXPECT_EQ(f.read_vector<double>("i"), lora::vector<double>::Constant(1, -2));
    EXPECT_EQ(f.info("h").begin, 24u);
    EXPECT_EQ(f.info("h").end, 30u);
    EXPECT_EQ(f.info("b").type, io::dtype::bf16);
    const io::tensor_bytes raw = f.raw("h");
    EXPECT_EQ(bytes(raw.begin(), raw.end()), bytes(data.begin() + 24, data.begin() + 30));
  }

  // The writer produces the same bytes for each tensor.
  io::safetensors_writer w;
  w.add("w", (lora::matrix<double>(2, 3) << 1, 2, 3, 4, 5, 6).finished(), io::dtype::f32)
      .add("h", (lora::vector<double>(3) << 1, -2, 0.5).finished(), io::dtype::f16)
      .add("b", (lora::vector<float>(2) << 1, -0.5).finished(), io::dtype::bf16);
  const auto again = io::safetensors_file::from_bytes(w.to_bytes());
  const auto original = io::safetensors_file::from_bytes(image);
  for (const char* name : {"w", "h", "b"}) {
    const auto& t = again.info(name);
    const auto& expected = original.info(name);
    const io::tensor_bytes raw = again.raw(name);
    EXPECT_EQ(bytes(raw.begin(), raw.end()), bytes(data.begin() + static_cast<std::ptrdiff_t>(expected.begin),
                                                   data.begin() + static_cast<std::ptrdiff_t>(expected.end)))
        << name;
    EXPECT_EQ(t.shape, expected.shape);
  }
}

TEST(SafetensorsFixture, WriterMatchesTheReferenceWritersBytes) {
  // The expected images are the reference implementation's own serialization tests.
  io::safetensors_writer one;
  one.add("attn.0", (lora::matrix<float>(2, 3) << 0, 1, 2, 3, 4, 5).finished(), io::dtype::f32, {1, 2, 3});
  const std::string header1 = R"({"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}})";
  ASSERT_EQ(header1.size(), 64u);  // already a multiple of 8: no padding
  bytes expected1 = file_image(header1);
  for (float x : {0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f}) {
    std::uint32_t b;
    std::memcpy(&b, &x, 4);
    for (int k = 0; k < 4; ++k) expected1.push_back(static_cast<unsigned char>(b >> (8 * k)));
  }
  EXPECT_EQ(one.to_bytes(), expected1);

  io::safetensors_writer aligned;
  aligned.add("attn0", (lora::matrix<float>(2, 3) << 0, 1, 2, 3, 4, 5).finished(), io::dtype::f32, {1, 1, 2, 3});
  const bytes image = aligned.to_bytes();
  EXPECT_EQ(detail::load_le<std::uint64_t>(image.data()), 72u);  // 65 bytes of JSON + 7 spaces
  EXPECT_EQ(std::string(image.begin() + 8, image.begin() + 80),
            std::string(R"({"attn0":{"dtype":"F32","shape":[1,1,2,3],"data_offsets":[0,24]}})") + "       ");

  EXPECT_EQ(io::safetensors_writer().to_bytes(), file_image("{}      "));
  io::safetensors_writer meta;
  meta.set_metadata({{"framework", "pt"}});
  EXPECT_EQ(meta.to_bytes(), file_image(R"({"__metadata__":{"framework":"pt"}})" + std::string(5, ' ')));
}

TEST(SafetensorsFixture, PaddedHeadersAreReadAndWritten) {
  const std::string json = "{" + entry("t", "U8", "[3]", 0, 3) + "}";
  for (const std::string& pad : {std::string(""), std::string(" "), std::string(7, ' '), std::string("\n\t \r")}) {
    const auto f = io::safetensors_file::from_bytes(file_image(json + pad, {1, 2, 3}));
    EXPECT_EQ(f.read_vector<double>("t"), (lora::vector<double>(3) << 1, 2, 3).finished());
    EXPECT_EQ(f.data_offset(), 8 + json.size() + pad.size());
  }
  for (std::size_t len = 1; len <= 17; ++len) {  // every header length modulo 8
    io::safetensors_writer w;
    w.add("n" + std::string(len, 'x'), lora::matrix<double>::Ones(1, 1));
    const bytes image = w.to_bytes();
    const std::uint64_t n = detail::load_le<std::uint64_t>(image.data());
    EXPECT_EQ(n % 8, 0u);
    EXPECT_EQ(image[8 + n - 1] == ' ' || image[8 + n - 1] == '}', true);
    EXPECT_EQ(io::safetensors_file::from_bytes(image).data_offset() % 8, 0u);
  }
}

TEST(SafetensorsFixture, MetadataRoundTrip) {
  const std::map<std::string, std::string> metadata = {{"format", "pt"},
                                                       {"quote\"back\\slash", "line\nbreak\ttab"},
                                                       {"unicode", "\xC3\xA9t\xC3\xA9 \xF0\x9F\x98\x80"},
                                                       {"empty", ""}};
  io::safetensors_writer w;
  w.set_metadata(metadata).add("x", lora::matrix<float>::Zero(1, 2));
  temp_dir dir;
  w.write(dir.file("m.safetensors"));
  EXPECT_EQ(io::safetensors_file::open(dir.file("m.safetensors")).metadata(), metadata);
  EXPECT_TRUE(io::safetensors_file::from_bytes(io::safetensors_writer().to_bytes()).metadata().empty());
  expect_error<lora::format_error>([&] { w.set_metadata({{"bad", "\xFF"}}); }, {"'bad'", "UTF-8"});
}

TEST(SafetensorsFixture, WriterOrdersLikeTheReference) {
  io::safetensors_writer w;
  w.add("a", lora::matrix<float>::Ones(1, 3), io::dtype::f16)
      .add("z", lora::matrix<float>::Ones(1, 1), io::dtype::f64)
      .add("m", lora::matrix<float>::Ones(1, 1), io::dtype::f32)
      .add("b", lora::matrix<float>::Ones(1, 1), io::dtype::f32)
      .add_raw("c", io::dtype::u8, {1}, bytes{7})
      .add_raw("d", io::dtype::i64, {1}, bytes(8, 0));
  const auto f = io::safetensors_file::from_bytes(w.to_bytes());
  std::vector<std::string> names;
  for (const auto& t : f.tensors()) names.push_back(t.name);
  // dtype descending in the reference's enum order (I64 > F64 > F32 > F16 > U8), then name.
  EXPECT_EQ(names, (std::vector<std::string>{"d", "z", "b", "m", "a", "c"}));
  for (const auto& t : f.tensors()) EXPECT_EQ((f.data_offset() + t.begin) % io::dtype_size(t.type), 0u) << t.name;

  std::vector<io::tensor_spec> specs = {
      {"a", io::dtype::f16, {3}}, {"z", io::dtype::f64, {1}}, {"b", io::dtype::f16, {1}}};
  io::sort_like_reference(specs);
  EXPECT_EQ(specs[0].name, "z");
  EXPECT_EQ(specs[1].name, "a");
  EXPECT_EQ(specs[2].name, "b");
}

TEST(SafetensorsFixture, EmptyFilesAndZeroSizedTensors) {
  const auto empty = io::safetensors_file::from_bytes(file_image("{}"));
  EXPECT_TRUE(empty.tensors().empty());
  io::safetensors_writer w;
  w.add("rows0", lora::matrix<double>(0, 3)).add("cols0", lora::matrix<double>(2, 0), io::dtype::f16);
  w.add_raw("dims0", io::dtype::f32, {4, 0, 1 << 20}, bytes{}).add("one", lora::matrix<double>::Ones(1, 1));
  temp_dir dir;
  w.write(dir.file("z.safetensors"));
  const auto f = io::safetensors_file::open(dir.file("z.safetensors"));
  EXPECT_EQ(f.read_matrix<double>("rows0").rows(), 0);
  EXPECT_EQ(f.read_matrix<double>("rows0").cols(), 3);
  EXPECT_EQ(f.read_matrix<float>("cols0").rows(), 2);
  EXPECT_EQ(f.read_vector<float>("dims0").size(), 0);
  EXPECT_EQ(f.raw("dims0").size(), 0u);
  EXPECT_EQ(f.read_vector<double>("one")(0), 1.0);
  // Several zero-byte tensors may share an offset, also at the very end of the data area.
  const std::string json = "{" + entry("x", "F32", "[1]", 0, 4) + "," + entry("e1", "F64", "[0]", 4, 4) + "," +
                           entry("e0", "I8", "[0, 5]", 4, 4) + "}";
  const auto g = io::safetensors_file::from_bytes(file_image(json, {0, 0, 0x80, 0x3F}));
  ASSERT_EQ(g.tensors().size(), 3u);
  EXPECT_EQ(g.tensors()[1].name, "e0");
  EXPECT_EQ(g.read_vector<float>("x")(0), 1.0f);
}

TEST(SafetensorsFixture, ExtraEntryFieldsAreIgnoredLikeTheReference) {
  const std::string json =
      R"({"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"comment":[1,{"x":null}],"dtype_note":"x"}})";
  EXPECT_EQ(io::safetensors_file::from_bytes(file_image(json, {9})).read_vector<double>("t")(0), 9.0);
  // "-0" is an integer zero, as serde reads it.
  const std::string minus_zero = R"({"t":{"dtype":"U8","shape":[1],"data_offsets":[-0,1]}})";
  EXPECT_EQ(io::safetensors_file::from_bytes(file_image(minus_zero, {9})).info("t").begin, 0u);
}

TEST(SafetensorsFixture, LookupOfAMissingTensorNamesWhatIsThere) {
  const auto f = io::safetensors_file::from_bytes(sample_file(), "sample.safetensors");
  EXPECT_TRUE(f.contains("w"));
  EXPECT_FALSE(f.contains("nope"));
  expect_error<lora::name_error>([&] { f.info("nope"); }, {"'nope'", "sample.safetensors", "'w'", "'b'", "'h'"});
  expect_error<lora::name_error>([&] { (void)f.read_matrix<float>("nope"); }, {"'nope'"});
  io::safetensors_writer many;
  for (int k = 0; k < 9; ++k) many.add_raw("t" + std::to_string(k), io::dtype::u8, {1}, bytes{1});
  const auto g = io::safetensors_file::from_bytes(many.to_bytes());
  expect_error<lora::name_error>([&] { g.info("x"); }, {"9 tensors", "(4 more)"});
}

TEST(SafetensorsFixture, WriterRejectsBadNamesAndShapes) {
  io::safetensors_writer w;
  w.add("a", lora::matrix<float>::Ones(1, 1));
  expect_error<lora::name_error>([&] { w.add("a", lora::matrix<float>::Ones(1, 1)); }, {"duplicate", "'a'"});
  expect_error<lora::name_error>([&] { w.add_raw("a", io::dtype::u8, {1}, bytes{1}); }, {"duplicate"});
  expect_error<lora::name_error>([&] { w.add("__metadata__", lora::matrix<float>::Ones(1, 1)); }, {"reserved"});
  expect_error<lora::name_error>([&] { w.add("bad\xC0\xAF", lora::matrix<float>::Ones(1, 1)); }, {"UTF-8"});
  expect_error<lora::shape_error>([&] { w.add_raw("r", io::dtype::f32, {2}, bytes(7, 0)); }, {"'r'", "8 bytes", "7"});
  expect_error<lora::shape_error>([&] { w.add_raw("n", io::dtype::f32, {-1}, bytes{}); }, {"'n'", "[-1]"});
  expect_error<lora::shape_error>(
      [&] {
        w.add_raw("o", io::dtype::f64, {std::int64_t{1} << 40, std::int64_t{1} << 40}, bytes{});
      },
      {"'o'"});
  EXPECT_EQ(w.size(), 1u);
  EXPECT_TRUE(io::safetensors_file::from_bytes(w.to_bytes()).contains("a"));
}

TEST(SafetensorsFixture, OpenReportsIoErrors) {
  temp_dir dir;
  expect_error<lora::io_error>([&] { io::safetensors_file::open(dir.file("missing.safetensors")); },
                               {"missing.safetensors", "No such file"});
  expect_error<lora::io_error>([&] { io::safetensors_file::open(dir.path()); }, {"not a regular file"});
  const std::string fifo = dir.file("fifo");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  expect_error<lora::io_error>([&] { io::safetensors_file::open(fifo); }, {"not a regular file"});  // no hang
}

TEST(SafetensorsFixture, OneTensorFromAHugeSparseFileWithoutReadingTheRest) {
  // 5 GiB declared (past 32-bit offsets) but a sparse file: opening and reading the small tensor
  // must touch neither the data nor the disk blocks of the large one.
  const std::uint64_t big = std::uint64_t{5} << 30;
  const std::string json = "{" + entry("small", "F32", "[2]", 0, 8) + "," +
                           entry("big", "U8", "[" + std::to_string(big) + "]", 8, 8 + big) + "}";
  bytes head = file_image(json);
  for (float x : {1.5f, -2.5f}) {
    std::uint32_t b;
    std::memcpy(&b, &x, 4);
    for (int k = 0; k < 4; ++k) head.push_back(static_cast<unsigned char>(b >> (8 * k)));
  }
  temp_dir dir;
  const std::string path = dir.file("huge.safetensors");
  write_file(path, head);
  ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(head.size() + big)), 0);
  for (io::read_mode mode : {io::read_mode::map, io::read_mode::pread}) {
    const auto f = io::safetensors_file::open(path, mode);
    EXPECT_EQ(f.info("big").end, 8 + big);
    EXPECT_EQ(f.read_vector<float>("small"), (lora::vector<float>(2) << 1.5f, -2.5f).finished());
  }
  const auto mapped = io::safetensors_file::open(path);
  EXPECT_EQ(mapped.raw("big").size(), big);  // a view into the mapping, not a copy
  EXPECT_EQ(mapped.raw("big").data()[big - 1], 0);
}

// --- one malformed file per rule of the loader --------------------------------------------------------------

const std::string valid_entry = entry("t", "F32", "[2]", 0, 8);
const bytes eight_bytes(8, 0);

TEST(SafetensorsLoaderRules, FileShorterThan8Bytes) {
  for (std::size_t n = 0; n < 8; ++n) expect_rejected(bytes(n, 0), {"shorter than the 8-byte header length"});
}

TEST(SafetensorsLoaderRules, HeaderLengthOver100MB) {
  bytes image = file_image("{}");
  detail::store_le<std::uint64_t>(100'000'001, image.data());
  expect_rejected(image, {"header length 100000001", "exceeds the limit of 100000000"});
  detail::store_le<std::uint64_t>(std::numeric_limits<std::uint64_t>::max(), image.data());
  expect_rejected(image, {"exceeds the limit"});
}

TEST(SafetensorsLoaderRules, HeaderRunsPastEndOfFile) {
  bytes image = file_image("{}");
  detail::store_le<std::uint64_t>(3, image.data());  // 8 + 3 > 10
  expect_rejected(image, {"runs past the end of the file"});
  detail::store_le<std::uint64_t>(100'000'000, image.data());
  expect_rejected(image, {"runs past the end of the file"});
}

TEST(SafetensorsLoaderRules, HeaderNotUtf8) {
  for (const std::string& bad : {std::string("\xFF"), std::string("\xC0\xAF"), std::string("\xED\xA0\x80"),
                                 std::string("\xF4\x90\x80\x80"), std::string("\x80"), std::string("\xE2\x82")}) {
    expect_rejected(file_image("{\"__metadata__\":{\"k\":\"" + bad + "\"}}"), {"not valid UTF-8"});
  }
  expect_rejected(file_image("{}\xE2\x82"), {"not valid UTF-8", "byte 10"});  // a cut sequence at the very end
}

TEST(SafetensorsLoaderRules, HeaderNotJson) {
  for (const std::string& bad :
       {std::string("{\"a\":"), std::string("{'a':1}"), std::string("{} x"), std::string("{} // comment"),
        std::string("{\"a\":1,}"), std::string(""), std::string("   "), std::string("{\"\\ud800\":1}")}) {
    expect_rejected(file_image(bad), {"not valid JSON"});
  }
}

TEST(SafetensorsLoaderRules, HeaderWithNulByte) {
  // Regression: nlohmann/json treats NUL as the end of input, so "{}\0<anything>" would parse as {}.
  expect_rejected(file_image(std::string("{}\0garbage", 10)), {"not valid JSON", "NUL byte at byte 10"});
  expect_rejected(file_image(std::string("{}\0\0\0\0\0\0", 8)), {"NUL byte"});
}

TEST(SafetensorsLoaderRules, HeaderNotAnObject) {
  for (const std::string bad : {"[]", "\"str\"", "1", "null", "true"})
    expect_rejected(file_image(bad), {"not a JSON object"});
}

TEST(SafetensorsLoaderRules, EntryNotAnObject) {
  expect_rejected(file_image("{\"t\":[1,2]}"), {"tensor 't'", "not a JSON object"});
  expect_rejected(file_image("{\"t\":\"F32\"}"), {"tensor 't'", "not a JSON object"});
}

TEST(SafetensorsLoaderRules, EntryMissingAField) {
  expect_rejected(file_image(R"({"t":{"shape":[2],"data_offsets":[0,8]}})", eight_bytes),
                  {"tensor 't'", "missing field 'dtype'"});
  expect_rejected(file_image(R"({"t":{"dtype":"F32","data_offsets":[0,8]}})", eight_bytes),
                  {"tensor 't'", "missing field 'shape'"});
  expect_rejected(file_image(R"({"t":{"dtype":"F32","shape":[2]}})", eight_bytes),
                  {"tensor 't'", "missing field 'data_offsets'"});
}

TEST(SafetensorsLoaderRules, EntryFieldOfTheWrongJsonType) {
  const auto with = [](const std::string& dtype, const std::string& shape, const std::string& offsets) {
    return file_image("{\"t\":{\"dtype\":" + dtype + ",\"shape\":" + shape + ",\"data_offsets\":" + offsets + "}}",
                      eight_bytes);
  };
  expect_rejected(with("5", "[2]", "[0,8]"), {"tensor 't'", "'dtype' is not a string"});
  expect_rejected(with("null", "[2]", "[0,8]"), {"'dtype' is not a string"});
  expect_rejected(with("\"F32\"", "2", "[0,8]"), {"tensor 't'", "'shape' is not an array"});
  expect_rejected(with("\"F32\"", "{\"0\":2}", "[0,8]"), {"'shape' is not an array"});
  expect_rejected(with("\"F32\"", "[2.0]", "[0,8]"), {"tensor 't'", "non-integer"});
  expect_rejected(with("\"F32\"", "[true]", "[0,8]"), {"non-integer"});
  expect_rejected(with("\"F32\"", "[\"2\"]", "[0,8]"), {"non-integer"});
  expect_rejected(with("\"F32\"", "[18446744073709551616]", "[0,8]"), {"non-integer"});  // beyond u64: a float
  expect_rejected(with("\"F32\"", "[9223372036854775808]", "[0,8]"), {"larger than 2^63 - 1"});
  for (const std::string offsets : {"[0]", "[0,8,8]", "[0,\"8\"]", "[0,8.0]", "{\"begin\":0}", "8", "[-1,8]", "[]"}) {
    expect_rejected(with("\"F32\"", "[2]", offsets), {"tensor 't'", "'data_offsets' is not an array [begin, end]"});
  }
}

TEST(SafetensorsLoaderRules, UnknownDtype) {
  for (const std::string name : {"F17", "f32", "F4", "", "INT8"}) {
    expect_rejected(file_image("{" + entry("t", name, "[2]", 0, 8) + "}", eight_bytes),
                    {"tensor 't'", "unknown dtype '" + name + "'"});
  }
}

TEST(SafetensorsLoaderRules, NegativeDimension) {
  expect_rejected(file_image("{" + entry("t", "F32", "[-1,-8]", 0, 8) + "}", eight_bytes),
                  {"tensor 't'", "negative dimension -1"});
  expect_rejected(file_image("{" + entry("t", "U8", "[2,-9223372036854775808]", 0, 8) + "}", eight_bytes),
                  {"negative dimension"});
}

TEST(SafetensorsLoaderRules, ElementCountTimesSizeOverflows) {
  expect_rejected(file_image("{" + entry("t", "F32", "[4294967296,4294967296]", 0, 8) + "}", eight_bytes),
                  {"tensor 't'", "overflows 64 bits"});
  // The count fits but times 8 bytes does not.
  expect_rejected(file_image("{" + entry("t", "F64", "[2305843009213693952]", 0, 8) + "}", eight_bytes),
                  {"overflows 64 bits"});
  // Folded left to right like the reference: the product overflows before the trailing 0.
  expect_rejected(file_image("{" + entry("t", "U8", "[4294967296,4294967296,0]", 0, 0) + "}"), {"overflows 64 bits"});
  // ... whereas a leading 0 keeps every partial product at 0.
  EXPECT_EQ(
      io::safetensors_file::from_bytes(file_image("{" + entry("t", "U8", "[0,4294967296,4294967296]", 0, 0) + "}"))
          .info("t")
          .numel(),
      0);
}

TEST(SafetensorsLoaderRules, EndBeforeBegin) {
  expect_rejected(file_image("{" + entry("t", "F32", "[2]", 8, 0) + "}", eight_bytes),
                  {"tensor 't'", "end 0 is before begin 8"});
}

TEST(SafetensorsLoaderRules, ByteRangeDisagreesWithShapeAndDtype) {
  expect_rejected(file_image("{" + entry("t", "F32", "[3]", 0, 8) + "}", eight_bytes),
                  {"tensor 't'", "span 8 bytes", "needs 12 bytes"});
  expect_rejected(file_image("{" + entry("t", "F16", "[2]", 0, 8) + "}", eight_bytes), {"needs 4 bytes"});
}

TEST(SafetensorsLoaderRules, FirstTensorNotAtOffsetZero) {
  expect_rejected(file_image("{" + entry("t", "F32", "[1]", 4, 8) + "}", eight_bytes),
                  {"tensor 't'", "first tensor must begin at 0"});
}

TEST(SafetensorsLoaderRules, HoleBetweenTensors) {
  expect_rejected(
      file_image("{" + entry("a", "F32", "[1]", 0, 4) + "," + entry("b", "F32", "[1]", 8, 12) + "}", bytes(12, 0)),
      {"tensor 'b'", "previous tensor 'a' ends at 4", "a hole of 4 bytes"});
}

TEST(SafetensorsLoaderRules, OverlappingTensors) {
  expect_rejected(
      file_image("{" + entry("a", "F32", "[2]", 0, 8) + "," + entry("b", "F32", "[1]", 4, 8) + "}", eight_bytes),
      {"tensor 'b'", "overlap the previous tensor 'a'"});
  // The same range twice.
  expect_rejected(
      file_image("{" + entry("a", "F32", "[2]", 0, 8) + "," + entry("b", "F32", "[2]", 0, 8) + "}", eight_bytes),
      {"overlap"});
}

TEST(SafetensorsLoaderRules, DataAreaNotEndingAtEndOfFile) {
  const std::string json = "{" + valid_entry + "}";
  expect_rejected(file_image(json, bytes(9, 0)),
                  {"data area holds 9 bytes", "must end exactly at the end of the file"});
  expect_rejected(file_image(json, bytes(7, 0)), {"tensors end at byte 8", "holds 7 bytes"});
  expect_rejected(file_image("{}", bytes(1, 0)), {"must end exactly at the end of the file"});
}

TEST(SafetensorsLoaderRules, DuplicateTensorNames) {
  expect_rejected(
      file_image("{" + entry("a", "F32", "[1]", 0, 4) + "," + entry("a", "F32", "[1]", 4, 8) + "}", eight_bytes),
      {"duplicate tensor name 'a'"});
  expect_rejected(file_image(R"({"__metadata__":{},"__metadata__":{}})"), {"duplicate tensor name '__metadata__'"});
  // Inside an entry (serde would reject a repeated field too).
  expect_rejected(file_image(R"({"t":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})", eight_bytes),
                  {"tensor 't'", "duplicate key 'dtype'"});
  expect_rejected(file_image(R"({"__metadata__":{"k":"1","k":"2"}})"), {"duplicate key 'k'"});
}

TEST(SafetensorsLoaderRules, MetadataNotAStringToStringMap) {
  expect_rejected(file_image(R"({"__metadata__":["a"]})"), {"__metadata__ is not a JSON object"});
  expect_rejected(file_image(R"({"__metadata__":null})"), {"__metadata__ is not a JSON object"});
  expect_rejected(file_image(R"({"__metadata__":{"k":1}})"), {"__metadata__", "the value of 'k' is a number"});
  expect_rejected(file_image(R"({"__metadata__":{"k":{"x":"y"}}})"), {"the value of 'k' is a object"});
}

TEST(SafetensorsLoaderRules, HeaderNestedTooDeeply) {
  const std::string deep = std::string(200, '[') + std::string(200, ']');
  expect_rejected(file_image(R"({"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":)" + deep + "}}", {1}),
                  {"nests deeper than 128 levels"});
  const std::string fine = std::string(100, '[') + std::string(100, ']');
  EXPECT_NO_THROW(io::safetensors_file::from_bytes(
      file_image(R"({"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":)" + fine + "}}", {1})));
}

// --- sweeps over damaged files -----------------------------------------------------------------------------------

TEST(SafetensorsDamage, EveryTruncationIsAFormatError) {
  const bytes image = sample_file();
  ASSERT_NO_THROW(io::safetensors_file::from_bytes(image));
  temp_dir dir;
  const std::string path = dir.file("cut.safetensors");
  for (std::size_t cut = 0; cut < image.size(); ++cut) {
    SCOPED_TRACE(cut);
    const bytes part(image.begin(), image.begin() + static_cast<std::ptrdiff_t>(cut));
    EXPECT_THROW(io::safetensors_file::from_bytes(part), lora::format_error);
    write_file(path, part);
    EXPECT_THROW(io::safetensors_file::open(path), lora::format_error);
    EXPECT_THROW(io::safetensors_file::open(path, io::read_mode::pread), lora::format_error);
  }
  bytes longer = image;
  longer.push_back(0);
  EXPECT_THROW(io::safetensors_file::from_bytes(longer), lora::format_error);
}

TEST(SafetensorsDamage, EverySingleByteMutationIsAcceptedOrAFormatError) {
  const bytes image = sample_file();
  std::size_t accepted = 0;
  for (std::size_t pos = 0; pos < image.size(); ++pos) {
    for (unsigned char value : {0x00, 0xFF, 0x20, 0x7B, 0x5D, 0x2D, 0x30, 0x39}) {
      bytes mutated = image;
      mutated[pos] = static_cast<unsigned char>(value);
      try {
        const auto f = io::safetensors_file::from_bytes(mutated);
        read_everything(f);
        ++accepted;
      } catch (const lora::format_error&) {
      }
    }
  }
  EXPECT_GT(accepted, 0u);  // data bytes and some header bytes may change freely
}

// --- atomic writes ------------------------------------------------------------------------------------------------

TEST(SafetensorsAtomicWrite, MissingDirectoryIsAnIoError) {
  temp_dir dir;
  io::safetensors_writer w;
  w.add("x", lora::matrix<float>::Ones(2, 2));
  expect_error<lora::io_error>([&] { w.write(dir.file("no/such/dir/x.safetensors")); },
                               {"x.safetensors", "No such file or directory"});
  EXPECT_TRUE(dir.list().empty());
  expect_error<lora::io_error>([&] { w.write(dir.path() + "/"); }, {"not a file path"});
}

TEST(SafetensorsAtomicWrite, OverwritingLeavesTheCompleteNewFile) {
  temp_dir dir;
  const std::string path = dir.file("model.safetensors");
  io::safetensors_writer first;
  first.add("old", lora::matrix<double>::Constant(50, 50, 1.0));
  first.write(path);
  io::safetensors_writer second;
  second.add("new", lora::matrix<float>::Constant(3, 4, 2.0f)).set_metadata({{"v", "2"}});
  second.write(path);
  EXPECT_EQ(read_file(path), second.to_bytes());
  const auto f = io::safetensors_file::open(path);
  EXPECT_FALSE(f.contains("old"));
  EXPECT_EQ(f.read_matrix<float>("new"), lora::matrix<float>::Constant(3, 4, 2.0f));
  EXPECT_EQ(dir.list(), std::vector<std::string>{"model.safetensors"});  // no temporary left behind
  // A file opened (mapped) before an overwrite keeps reading the old contents.
  const auto before = io::safetensors_file::open(path);
  first.write(path);
  EXPECT_EQ(before.read_matrix<float>("new"), lora::matrix<float>::Constant(3, 4, 2.0f));
  EXPECT_TRUE(io::safetensors_file::open(path).contains("old"));
}

TEST(SafetensorsAtomicWrite, FailedRenameRemovesTheTemporary) {
  temp_dir dir;
  // The target is a non-empty directory, so the final rename fails after all data was written.
  const std::string target = dir.file("occupied");
  ASSERT_EQ(::mkdir(target.c_str(), 0700), 0);
  write_file(target + "/keep", bytes{1, 2, 3});
  io::safetensors_writer w;
  w.add("x", lora::matrix<float>::Ones(16, 16));
  expect_error<lora::io_error>([&] { w.write(target); }, {"occupied", "rename", "temporary file was removed"});
  EXPECT_EQ(dir.list(), std::vector<std::string>{"occupied"});
  EXPECT_EQ(read_file(target + "/keep"), (bytes{1, 2, 3}));
}

TEST(SafetensorsAtomicWrite, DiskFullLeavesTheOldFileIntact) {
  temp_dir dir;
  const std::string path = dir.file("model.safetensors");
  io::safetensors_writer small;
  small.add("small", lora::matrix<float>::Ones(2, 2));
  small.write(path);
  const bytes old_bytes = read_file(path);
  io::safetensors_writer large;
  large.add("large", lora::matrix<double>::Ones(100, 100));  // 80 KB
  // Simulate a full disk: files may not grow past 4 KiB, and the signal that would kill us is ignored
  // so that write() fails with EFBIG instead. Nothing else writes files in between.
  rlimit saved{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &saved), 0);
  const auto saved_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit limited = saved;
  limited.rlim_cur = 4096;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &limited), 0);
  std::string message;
  bool threw = false;
  try {
    large.write(path);
  } catch (const lora::io_error& e) {
    threw = true;
    message = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &saved);
  std::signal(SIGXFSZ, saved_handler);
  EXPECT_TRUE(threw);
  EXPECT_NE(message.find("temporary file was removed"), std::string::npos) << message;
  EXPECT_EQ(read_file(path), old_bytes);
  EXPECT_EQ(dir.list(), std::vector<std::string>{"model.safetensors"});
}

TEST(SafetensorsAtomicWrite, AbandonedStreamWriterLeavesNothing) {
  temp_dir dir;
  const std::string path = dir.file("s.safetensors");
  write_file(path, bytes{42});
  {
    io::safetensors_stream_writer out(path, {{"a", io::dtype::f32, {2}}, {"b", io::dtype::f32, {2}}});
    out.write("a", lora::vector<float>::Ones(2));
    EXPECT_EQ(dir.list().size(), 2u);  // the target and the temporary
    expect_error<lora::state_error>([&] { out.commit(); }, {"1 tensor(s) not written", "'b'"});
  }
  EXPECT_EQ(dir.list(), std::vector<std::string>{"s.safetensors"});
  EXPECT_EQ(read_file(path), bytes{42});
}

TEST(SafetensorsStreamWriter, TensorsInAnyOrderGiveTheSameFileAsTheInMemoryWriter) {
  const lora::matrix<double> a = lora::matrix<double>::Random(2, 3);
  const lora::vector<float> b = lora::vector<float>::Random(4);
  const lora::matrix<float> c = lora::matrix<float>::Random(2, 2);
  io::safetensors_writer reference;
  reference.add("a", a, io::dtype::f32).add("b", b, io::dtype::f16).add("c", c, io::dtype::bf16);
  reference.add_raw("empty", io::dtype::f64, {0}, bytes{}).set_metadata({{"format", "pt"}});

  std::vector<io::tensor_spec> layout = {{"a", io::dtype::f32, {2, 3}},
                                         {"b", io::dtype::f16, {4}},
                                         {"c", io::dtype::bf16, {2, 2}},
                                         {"empty", io::dtype::f64, {0}}};
  io::sort_like_reference(layout);
  temp_dir dir;
  const std::string path = dir.file("s.safetensors");
  io::safetensors_stream_writer out(path, layout, {{"format", "pt"}});
  EXPECT_EQ(out.remaining(), 3u);  // the empty tensor needs no data
  out.write("c", c);
  out.write("a", a);
  const io::tensor_bytes b_bytes = io::safetensors_file::from_bytes(reference.to_bytes()).raw("b");
  out.write_raw("b", b_bytes.data(), b_bytes.size());
  EXPECT_EQ(out.remaining(), 0u);
  out.commit();
  EXPECT_EQ(read_file(path), reference.to_bytes());
  EXPECT_EQ(dir.list(), std::vector<std::string>{"s.safetensors"});
  expect_error<lora::state_error>([&] { out.commit(); }, {"already committed"});
}

TEST(SafetensorsStreamWriter, RejectsMisuse) {
  temp_dir dir;
  const std::string path = dir.file("s.safetensors");
  expect_error<lora::name_error>(
      [&] {
        io::safetensors_stream_writer(path, {{"a", io::dtype::f32, {1}}, {"a", io::dtype::f32, {1}}});
      },
      {"duplicate tensor name 'a'"});
  expect_error<lora::name_error>(
      [&] {
        io::safetensors_stream_writer(path, {{"__metadata__", io::dtype::f32, {1}}});
      },
      {"reserved"});
  expect_error<lora::shape_error>(
      [&] {
        io::safetensors_stream_writer(path, {{"n", io::dtype::f32, {2, -1}}});
      },
      {"'n'", "negative dimension"});
  EXPECT_TRUE(dir.list().empty());

  io::safetensors_stream_writer out(path, {{"m", io::dtype::f32, {2, 3}}, {"i", io::dtype::i32, {2}}});
  expect_error<lora::name_error>([&] { out.write("nope", lora::matrix<float>::Ones(2, 3)); }, {"'nope'"});
  expect_error<lora::shape_error>([&] { out.write("m", lora::matrix<float>::Ones(3, 2)); }, {"'m'", "[2, 3]", "3x2"});
  expect_error<lora::shape_error>([&] { out.write_raw("m", bytes(23, 0).data(), 23); }, {"24 bytes", "got 23"});
  expect_error<lora::dtype_error>([&] { out.write("i", lora::vector<float>::Ones(2)); }, {"I32"});
  out.write("m", lora::matrix<double>::Ones(2, 3));
  expect_error<lora::state_error>([&] { out.write("m", lora::matrix<float>::Ones(2, 3)); }, {"already written"});
  const bytes ints = {1, 0, 0, 0, 2, 0, 0, 0};
  out.write_raw("i", ints.data(), ints.size());
  out.commit();
  EXPECT_EQ(io::safetensors_file::open(path).read_vector<double>("i"), (lora::vector<double>(2) << 1, 2).finished());
}

}  // namespace
