// tests/test_gguf.cpp: the GGUF reader and writer. A file assembled byte by byte from the format
// description against the writer's output, round trips of every metadata type and of every tensor type
// this library converts, one malformed file per reader rule, truncation and mutation sweeps, files on
// disk through both read modes (the row codecs themselves: test_ggml_types.cpp).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <lora/io/gguf.hpp>
#include <random>
#include <string>
#include <vector>

#include "file_support.hpp"
#include "support.hpp"

namespace {

namespace io = lora::io;
using bytes = std::vector<unsigned char>;
using lora_test::expect_error;
using lora_test::temp_dir;

// --- helpers ---------------------------------------------------------------------------------------

/// Builds GGUF images by hand, field by field, from the format description (not with the writer).
struct image {
  bytes b;
  image& u32(std::uint32_t v) { return put(&v, 4); }
  image& u64(std::uint64_t v) { return put(&v, 8); }
  image& i64(std::int64_t v) { return put(&v, 8); }
  image& f32(float v) { return put(&v, 4); }
  image& u8(std::uint8_t v) { return put(&v, 1); }
  image& str(const std::string& s) {
    u64(s.size());
    return put(s.data(), s.size());
  }
  image& preamble(std::uint64_t tensors, std::uint64_t kvs, std::uint32_t version = 3) {
    b.insert(b.end(), {'G', 'G', 'U', 'F'});
    return u32(version).u64(tensors).u64(kvs);
  }
  /// A tensor info record.
  image& tensor(const std::string& name, std::vector<std::int64_t> ne, std::uint32_t type, std::uint64_t offset) {
    str(name).u32(static_cast<std::uint32_t>(ne.size()));
    for (auto d : ne) i64(d);
    return u32(type).u64(offset);
  }
  image& pad(std::size_t align = 32) {
    while (b.size() % align != 0) b.push_back(0);
    return *this;
  }
  image& put(const void* p, std::size_t n) {
    const auto* c = static_cast<const unsigned char*>(p);
    b.insert(b.end(), c, c + n);
    return *this;
  }
};

io::gguf_file parse(const bytes& b) { return io::gguf_file::from_bytes(b, "test.gguf"); }

/// Expects format_error from parsing `b`, its message containing `fragment` and the file's label.
void expect_rejected(const bytes& b, const std::string& fragment) {
  expect_error<lora::format_error>([&] { parse(b); }, {"test.gguf", fragment});
}

/// A valid file with two metadata values and one 2x2 F32 tensor, written by hand.
bytes small_file() {
  image f;
  f.preamble(1, 2).str("general.architecture").u32(8).str("gpt2").str("n").u32(4).u32(7);
  f.tensor("w", {2, 2}, 0, 0).pad().f32(1).f32(2).f32(3).f32(4).pad();
  return f.b;
}

/// Reads every tensor of a file the way an application would; conversions a type lacks may fail.
void read_everything(const io::gguf_file& f) {
  for (const auto& t : f.tensors()) {
    try {
      (void)f.read_vector<float>(t.name);
    } catch (const lora::dtype_error&) {
      EXPECT_FALSE(io::ggml_is_convertible(t.type));
    }
    EXPECT_EQ(f.raw(t.name).size(), t.byte_size);
  }
}

// --- the layout ------------------------------------------------------------------------------------

TEST(Gguf, WriterProducesTheLayoutOfTheFormatDescription) {
  io::gguf_writer w;
  w.set("general.architecture", io::gguf_value::of("gpt2"));
  w.set("n", io::gguf_value::of(std::uint32_t{7}));
  lora::matrix<float> m(2, 2);
  m << 1, 2, 3, 4;  // row-major in the file: ne = [2 cols, 2 rows]
  w.add("w", m, io::ggml_type::f32);
  EXPECT_EQ(w.to_bytes(), small_file());
}

TEST(Gguf, ReadsTheHandMadeFile) {
  const io::gguf_file f = parse(small_file());
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  EXPECT_EQ(f.data_offset() % 32, 0u);
  EXPECT_EQ(f.get_string("general.architecture"), "gpt2");
  EXPECT_EQ(f.get<std::uint32_t>("n"), 7u);
  ASSERT_EQ(f.tensors().size(), 1u);
  EXPECT_EQ(f.info("w").shape(), (std::vector<std::int64_t>{2, 2}));
  const auto m = f.read_matrix<double>("w");
  EXPECT_EQ(m(0, 1), 2.0);  // element (row 0, col 1) is the second stored value
  EXPECT_EQ(m(1, 0), 3.0);
}

TEST(Gguf, MetadataOfEveryTypeRoundTripsInOrder) {
  io::gguf_writer w;
  w.set("u8", io::gguf_value::of(std::uint8_t{200}));
  w.set("i8", io::gguf_value::of(std::int8_t{-100}));
  w.set("u16", io::gguf_value::of(std::uint16_t{60000}));
  w.set("i16", io::gguf_value::of(std::int16_t{-30000}));
  w.set("u32", io::gguf_value::of(std::uint32_t{4000000000u}));
  w.set("i32", io::gguf_value::of(std::int32_t{-2000000000}));
  w.set("f32", io::gguf_value::of(1.5f));
  w.set("bool", io::gguf_value::of(true));
  w.set("string", io::gguf_value::of(std::string("h\xc3\xa9llo\0x", 8)));
  w.set("u64", io::gguf_value::of(std::uint64_t{1} << 60));
  w.set("i64", io::gguf_value::of(-(std::int64_t{1} << 60)));
  w.set("f64", io::gguf_value::of(0.1));
  w.set("ints", io::gguf_value::array(std::vector<std::int32_t>{1, -2, 3}));
  w.set("floats", io::gguf_value::array(std::vector<float>{0.5f, -0.25f}));
  w.set("bools", io::gguf_value::array(std::vector<bool>{true, false, true}));
  w.set("strings", io::gguf_value::array(std::vector<std::string>{"a b", "", "\xc4\xa0the"}));
  w.set("empty", io::gguf_value::array(std::vector<std::string>{}));
  w.set("u8", io::gguf_value::of(std::uint8_t{201}));  // replaced in place, keeps its position
  const io::gguf_file f = parse(w.to_bytes());
  ASSERT_EQ(f.metadata().size(), 17u);
  EXPECT_EQ(f.metadata()[0].first, "u8");
  EXPECT_EQ(f.get<std::uint8_t>("u8"), 201);
  EXPECT_EQ(f.get<std::int8_t>("i8"), -100);
  EXPECT_EQ(f.get<std::uint16_t>("u16"), 60000);
  EXPECT_EQ(f.get<std::int16_t>("i16"), -30000);
  EXPECT_EQ(f.get<std::uint32_t>("u32"), 4000000000u);
  EXPECT_EQ(f.get<std::int32_t>("i32"), -2000000000);
  EXPECT_EQ(f.get<float>("f32"), 1.5f);
  EXPECT_TRUE(f.get<bool>("bool"));
  EXPECT_EQ(f.get_string("string"), std::string("h\xc3\xa9llo\0x", 8));
  EXPECT_EQ(f.get<std::uint64_t>("u64"), std::uint64_t{1} << 60);
  EXPECT_EQ(f.get<std::int64_t>("i64"), -(std::int64_t{1} << 60));
  EXPECT_EQ(f.get<double>("f64"), 0.1);
  EXPECT_EQ(f.value("ints").array_of<std::int32_t>(), (std::vector<std::int32_t>{1, -2, 3}));
  EXPECT_EQ(f.value("floats").array_of<float>(), (std::vector<float>{0.5f, -0.25f}));
  EXPECT_EQ(f.value("bools").array_of<bool>(), (std::vector<bool>{true, false, true}));
  EXPECT_EQ(f.value("strings").strings(), (std::vector<std::string>{"a b", "", "\xc4\xa0the"}));
  EXPECT_EQ(f.value("empty").size(), 0u);
  EXPECT_EQ(f.value("empty").element_type(), io::gguf_type::string);
  for (const auto& [key, value] : f.metadata()) EXPECT_EQ(*w.find(key), value) << key;
}

TEST(Gguf, TypedAccessNamesTheKeyAndBothTypes) {
  const io::gguf_file f = parse(small_file());
  expect_error<lora::format_error>([&] { f.get<std::int32_t>("n"); }, {"test.gguf", "'n'", "UINT32", "INT32"});
  expect_error<lora::format_error>([&] { f.get<std::uint32_t>("general.architecture"); }, {"STRING", "UINT32"});
  expect_error<lora::format_error>([&] { f.get<std::uint32_t>("missing"); }, {"'missing'", "missing"});
  expect_error<lora::name_error>([&] { f.info("nope"); }, {"test.gguf", "'nope'", "w"});
  expect_error<lora::dtype_error>([&] { f.value("n").array_of<std::uint32_t>(); }, {"ARRAY of UINT32", "UINT32"});
  EXPECT_EQ(f.value("n").to_display_string(), "7");
  EXPECT_EQ(f.value("general.architecture").to_display_string(), "\"gpt2\"");
}

// --- tensors ---------------------------------------------------------------------------------------

TEST(Gguf, EveryConvertibleTypeRoundTripsThroughTheRowCodecs) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  lora::matrix<float> m(3, 64);
  for (auto& x : m.reshaped()) x = normal(rng);
  io::gguf_writer w;
  const io::ggml_type types[] = {io::ggml_type::f32, io::ggml_type::f16, io::ggml_type::bf16, io::ggml_type::q8_0,
                                 io::ggml_type::q4_0};
  for (auto t : types) w.add(io::ggml_type_name(t), m, t);
  lora::vector<double> v = lora::vector<double>::LinSpaced(32, -1, 1);
  w.add_vector("v", v, io::ggml_type::f32);
  const io::gguf_file f = parse(w.to_bytes());
  for (auto t : types) {
    const auto& info = f.info(io::ggml_type_name(t));
    EXPECT_EQ(info.type, t);
    EXPECT_EQ(info.ne, (std::vector<std::uint64_t>{64, 3}));
    EXPECT_EQ(info.offset % 32, 0u);
    // What the file holds is exactly the codec's encoding of each row, decoded.
    const auto got = f.read_matrix<float>(info.name);
    ASSERT_EQ(got.rows(), 3);
    for (lora::index i = 0; i < 3; ++i) {
      Eigen::Matrix<float, 1, Eigen::Dynamic> row = m.row(i);
      bytes enc(io::ggml_row_bytes(t, 64));
      io::ggml_quantize_row(t, row.data(), 64, enc.data());
      std::vector<float> dec(64);
      io::ggml_dequantize_row(t, enc.data(), 64, dec.data());
      for (int j = 0; j < 64; ++j) EXPECT_EQ(got(i, j), dec[j]) << info.name << " " << i << "," << j;
    }
    EXPECT_LT((got - m).cwiseAbs().maxCoeff(), t == io::ggml_type::q4_0 ? 0.5f : 0.05f) << info.name;
  }
  EXPECT_EQ(f.info("v").ne, (std::vector<std::uint64_t>{32}));
  EXPECT_EQ(f.read_matrix<double>("v"), v.cast<float>().cast<double>().eval());             // stored as F32
  EXPECT_EQ(f.read_vector<double>("F32"), m.transpose().reshaped().cast<double>().eval());  // ne[0] fastest
}

TEST(Gguf, RawTensorsOfTypesWithoutACodecCopyThroughButDoNotConvert) {
  bytes q4k(2 * 144, 0x5a);  // two Q4_K blocks of 256
  io::gguf_writer w;
  w.add_raw("k", io::ggml_type::q4_k, {512}, q4k.data(), q4k.size());
  w.add_raw("cube", io::ggml_type::f32, {2, 2, 2}, bytes(32, 0).data(), 32);
  expect_error<lora::format_error>([&] { w.add_raw("bad", io::ggml_type::q4_k, {256}, q4k.data(), q4k.size()); },
                                   {"'bad'", "288 bytes given", "144"});
  const io::gguf_file f = parse(w.to_bytes());
  const auto raw = f.raw("k");
  EXPECT_EQ(bytes(raw.begin(), raw.end()), q4k);
  expect_error<lora::dtype_error>([&] { f.read_matrix<float>("k"); }, {"'k'", "Q4_K"});
  expect_error<lora::shape_error>([&] { f.read_matrix<float>("cube"); }, {"'cube'", "3 dimensions"});
  EXPECT_EQ(f.read_vector<float>("cube").size(), 8);
}

TEST(Gguf, WriterRefusesWhatCannotBeStored) {
  io::gguf_writer w;
  lora::matrix<float> m = lora::matrix<float>::Ones(2, 48);
  expect_error<lora::shape_error>([&] { w.add("q", m, io::ggml_type::q8_0); }, {"'q'", "48", "multiple of 32"});
  expect_error<lora::dtype_error>([&] { w.add("k", m, io::ggml_type::q4_k); }, {"'k'", "Q4_K"});
  w.add("ok", m, io::ggml_type::f16);
  expect_error<lora::name_error>([&] { w.add("ok", m, io::ggml_type::f16); }, {"'ok'", "already"});
  expect_error<lora::name_error>([&] { w.add(std::string(64, 'x'), m, io::ggml_type::f16); }, {"64"});
  expect_error<lora::name_error>([&] { w.add("", m, io::ggml_type::f16); }, {"1 to 63"});
  expect_error<lora::format_error>([&] { w.set("general.alignment", io::gguf_value::of(std::uint32_t{24})); },
                                   {"24", "power of two"});
  expect_error<lora::format_error>([&] { w.set("general.alignment", io::gguf_value::of(std::uint64_t{64})); },
                                   {"UINT32", "UINT64"});
  EXPECT_EQ(w.tensor_count(), 1u);
}

TEST(Gguf, AnotherAlignmentIsHonouredByWriterAndReader) {
  io::gguf_writer w;
  w.set("general.alignment", io::gguf_value::of(std::uint32_t{64}));
  w.add_vector("a", lora::vector<float>::Ones(3), io::ggml_type::f32);
  w.add_vector("b", lora::vector<float>::Ones(5), io::ggml_type::f32);
  const io::gguf_file f = parse(w.to_bytes());
  EXPECT_EQ(f.alignment(), 64u);
  EXPECT_EQ(f.data_offset() % 64, 0u);
  EXPECT_EQ(f.info("b").offset, 64u);
  EXPECT_EQ(f.read_vector<float>("b"), lora::vector<float>::Ones(5));
}

TEST(Gguf, FilesOnDiskReadTheSameMappedAndThroughPread) {
  temp_dir dir;
  io::gguf_writer w;
  lora::matrix<float> m = lora::matrix<float>::Random(4, 32);
  w.add("m", m, io::ggml_type::q8_0);
  w.set("s", io::gguf_value::array(std::vector<std::string>{"x", "y"}));
  w.write(dir.file("a.gguf"));
  const auto mapped = io::gguf_file::open(dir.file("a.gguf"));
  const auto pread = io::gguf_file::open(dir.file("a.gguf"), io::read_mode::pread);
  EXPECT_EQ(mapped.read_matrix<float>("m"), pread.read_matrix<float>("m"));
  EXPECT_EQ(pread.value("s").strings().size(), 2u);
  EXPECT_EQ(dir.list(), (std::vector<std::string>{"a.gguf"}));  // no temporary left behind
  expect_error<lora::io_error>([&] { io::gguf_file::open(dir.file("none.gguf")); }, {"GGUF", "none.gguf"});
}

// --- malformed files: one per rule -----------------------------------------------------------------

TEST(GgufMalformed, PreambleRules) {
  bytes b = small_file();
  b[0] = 'X';
  expect_rejected(b, "not a GGUF file");
  expect_rejected(image().preamble(0, 0, 1).b, "version 1");
  expect_rejected(image().preamble(0, 0, 4).b, "version 4");
  expect_rejected(image().preamble(0, 0, 0x03000000).b, "big-endian");
  expect_rejected(image().preamble(std::uint64_t{1} << 62, 0).b, "tensor count");
  expect_rejected(image().preamble(0, 1000).b, "metadata key count");
  EXPECT_NO_THROW(parse(image().preamble(0, 0, 2).b));  // version 2 has the same layout
  EXPECT_NO_THROW(parse(image().preamble(0, 0).b));     // an empty file of no tensors is valid
}

TEST(GgufMalformed, MetadataRules) {
  expect_rejected(image().preamble(0, 1).str("").u32(4).u32(1).b, "empty");
  expect_rejected(image().preamble(0, 2).str("k").u32(4).u32(1).str("k").u32(4).u32(1).b, "'k' appears twice");
  expect_rejected(image().preamble(0, 1).str("k").u32(13).u32(1).b, "unknown value type 13");
  expect_rejected(image().preamble(0, 1).str("k").u32(9).u32(9).u64(0).b, "arrays of arrays");
  expect_rejected(image().preamble(0, 1).str("k").u32(9).u32(77).u64(0).b, "array of unknown value type 77");
  expect_rejected(image().preamble(0, 1).str("k").u32(7).u8(2).b, "boolean byte 2");
  expect_rejected(image().preamble(0, 1).str("k").u32(8).u64(std::uint64_t{1} << 40).b, "limit of 2^30");
  expect_rejected(image().preamble(0, 1).str("k").u32(8).u64(100).put("abc", 3).b, "needs 100 bytes");
  // An array whose count cannot fit in the bytes left: refused before anything is allocated.
  expect_rejected(image().preamble(0, 1).str("k").u32(9).u32(8).u64(1000000).u64(0).b, "array length");
  expect_rejected(image().preamble(0, 1).str("k").u32(9).u32(12).u64(std::uint64_t{1} << 29).b, "array length");
  expect_rejected(image().preamble(0, 1).str("general.alignment").u32(4).u32(48).b, "48 is not a power of two");
  expect_rejected(image().preamble(0, 1).str("general.alignment").u32(5).u32(64).b, "INT32, expected UINT32");
}

TEST(GgufMalformed, TensorInfoRules) {
  auto one = [](const std::string& name, std::vector<std::int64_t> ne, std::uint32_t type, std::uint64_t offset) {
    image f;
    f.preamble(1, 0).tensor(name, std::move(ne), type, offset).pad();
    f.b.resize(f.b.size() + 64, 0);
    return f.b;
  };
  expect_rejected(one(std::string(64, 'n'), {4}, 0, 0), "ggml allows at most 63");
  expect_rejected(one("", {4}, 0, 0), "empty name");
  expect_rejected(one("t", {1, 1, 1, 1, 1}, 0, 0), "5 dimensions");
  expect_rejected(one("t", {4, -1}, 0, 0), "negative extent ne[1] = -1");
  expect_rejected(one("t", {4}, 99, 0), "unknown ggml type 99");
  expect_rejected(one("t", {48}, 8, 0), "not a multiple of Q8_0's block size 32");
  expect_rejected(one("t", {1 << 30, 1 << 30, 1 << 30}, 0, 0), "overflows");
  expect_rejected(one("t", {4}, 0, 32), "offset 32, expected 0");
  expect_rejected(one("t", {1000}, 0, 0), "does not fit in the file");
  expect_rejected(one("t", {32, std::int64_t{1} << 40}, 2, 0), "does not fit");
  image two;
  two.preamble(2, 0).tensor("a", {4}, 0, 0).tensor("a", {4}, 0, 32).pad();
  two.b.resize(two.b.size() + 64, 0);
  expect_rejected(two.b, "'a' appears twice");
  image overlap;
  overlap.preamble(2, 0).tensor("a", {4}, 0, 0).tensor("b", {4}, 0, 8).pad();
  overlap.b.resize(overlap.b.size() + 64, 0);
  expect_rejected(overlap.b, "'b' has offset 8, expected 32");
  // A tensor of no elements takes no bytes and allocates nothing, however large its other extents.
  const auto empty = parse(one("t", {std::int64_t{1} << 40, 0}, 0, 0));
  EXPECT_EQ(empty.read_vector<float>("t").size(), 0);
}

TEST(GgufMalformed, TheDataSectionMustStartInsideTheFile) {
  // A zero-byte tensor whose data would start past the end of the file (the header is not padded).
  image f;
  f.preamble(1, 0).tensor("w", {0}, 0, 0);
  expect_rejected(f.b, "data section starts at byte 64");
  // An alignment of 2^30: the data section would start at 1 GiB.
  image g;
  g.preamble(1, 1).str("general.alignment").u32(4).u32(1u << 30).tensor("w", {0}, 0, 0);
  expect_rejected(g.b, "data section starts at byte 1073741824");
  // Without tensors there is no data section: the file opens, and is written back without padding.
  image h;
  h.preamble(0, 1).str("general.alignment").u32(4).u32(1u << 30);
  const io::gguf_file no_tensors = parse(h.b);
  io::gguf_writer w;
  for (const auto& [key, value] : no_tensors.metadata()) w.set(key, value);
  EXPECT_EQ(w.to_bytes(), h.b);
}

TEST(GgufMalformed, TooManyMetadataKeysAreRefusedBeforeReading) {
  image f;
  f.preamble(0, 65537);
  f.b.resize(f.b.size() + 65537 * 14, 0);
  expect_rejected(f.b, "metadata key count is 65537, more than the limit of 65536");
}

TEST(Gguf, TwoDimensionalTensorsReadAsMatricesEvenWithAnExtentOfOne) {
  io::gguf_writer w;
  lora::matrix<float> row(1, 32), col(32, 1);
  row.setRandom();
  col.setRandom();
  w.add("row", row, io::ggml_type::f32);  // ne [32, 1]
  w.add("col", col, io::ggml_type::f32);  // ne [1, 32]
  w.add_raw("padded", io::ggml_type::f32, {4, 1, 1}, bytes(16, 0).data(), 16);
  const io::gguf_file f = parse(w.to_bytes());
  EXPECT_EQ(f.read_matrix<float>("row"), row);
  EXPECT_EQ(f.read_matrix<float>("col"), col);
  EXPECT_EQ(f.info("padded").effective_ne(), (std::vector<std::uint64_t>{4, 1}));
  EXPECT_EQ(f.read_matrix<float>("padded").rows(), 1);
}

TEST(Gguf, StringArraysAreReadByKeyWithTheTypeChecked) {
  io::gguf_writer w;
  w.set("tokens", io::gguf_value::array(std::vector<std::int32_t>{1, 2}));
  w.set("names", io::gguf_value::array(std::vector<std::string>{"a"}));
  const io::gguf_file f = parse(w.to_bytes());
  EXPECT_EQ(f.get_strings("names"), (std::vector<std::string>{"a"}));
  expect_error<lora::format_error>([&] { f.get_strings("tokens"); },
                                   {"test.gguf", "'tokens'", "ARRAY of INT32", "expected ARRAY of STRING"});
}

TEST(GgufMalformed, EveryTruncationIsRejected) {
  io::gguf_writer w;
  w.set("tokens", io::gguf_value::array(std::vector<std::string>{"a", "bb", "ccc"}));
  w.set("x", io::gguf_value::of(2.5));
  w.add("m", lora::matrix<float>::Ones(2, 32), io::ggml_type::q4_0);
  w.add("n", lora::matrix<float>::Ones(1, 3), io::ggml_type::f32);
  const bytes full = w.to_bytes();
  const std::size_t needed = full.size() - 20;  // the padding after the last tensor is not required
  for (std::size_t n = 0; n < needed; ++n) {
    EXPECT_THROW(parse(bytes(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(n))), lora::format_error) << n;
  }
  EXPECT_NO_THROW(read_everything(parse(bytes(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(needed)))));
}

TEST(GgufMalformed, MutatedFilesOpenOrRaiseFormatError) {
  io::gguf_writer w;
  w.set("general.alignment", io::gguf_value::of(std::uint32_t{32}));
  w.set("tokens", io::gguf_value::array(std::vector<std::string>{"a", "bb"}));
  w.set("ids", io::gguf_value::array(std::vector<std::int32_t>{1, 2}));
  w.add("m", lora::matrix<float>::Ones(2, 32), io::ggml_type::q8_0);
  w.add("v", lora::matrix<float>::Ones(1, 4), io::ggml_type::bf16);
  const bytes full = w.to_bytes();
  std::mt19937 rng(3);
  int opened = 0;
  for (int trial = 0; trial < 4000; ++trial) {
    bytes b = full;
    const int flips = 1 + trial % 3;
    for (int k = 0; k < flips; ++k) {
      const std::size_t at = rng() % b.size();
      b[at] = trial % 2 ? static_cast<unsigned char>(rng()) : static_cast<unsigned char>(b[at] ^ (1u << (rng() % 8)));
    }
    try {
      read_everything(parse(b));
      ++opened;
    } catch (const lora::format_error&) {
    }
  }
  EXPECT_GT(opened, 100);  // data bytes mutate freely; the sweep reaches the readers
}

}  // namespace
