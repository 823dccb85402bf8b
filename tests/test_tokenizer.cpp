// tests/test_tokenizer.cpp: the GPT-2 language model's tokenizers (models/tokenizer.hpp). The byte
// tokenizer round-trips every byte and ill-formed UTF-8; GPT-2's pre-tokenisation regex splits tricky
// text (contractions, numbers, runs of spaces, newlines, non-Latin letters, emoji, ill-formed UTF-8) as
// Python's `regex` does; byte-level BPE on a hand-made vocabulary gives hand-worked ids; every broken
// vocab.json / merges.txt raises the right error naming the file and the key or line; `tokenizer`
// picks BPE or bytes for a model folder. (Real GPT-2 ids: tests/tokenizer/.)
#include <cstdint>
#include <lora/models/tokenizer.hpp>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "file_support.hpp"
#include "support.hpp"

namespace {

namespace models = lora::models;
using lora_test::expect_error;
using lora_test::temp_dir;
using lora_test::write_file;
using ids = std::vector<std::int32_t>;

// --- byte tokenizer --------------------------------------------------------------------------------

TEST(ByteTokenizer, EveryByteIsItsOwnIdAndRoundTrips) {
  const models::byte_tokenizer t;
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  const ids got = t.encode(all);
  ASSERT_EQ(got.size(), 256u);
  for (int b = 0; b < 256; ++b) {
    EXPECT_EQ(got[b], b);
    EXPECT_EQ(t.token_bytes(b), std::string(1, static_cast<char>(b)));
  }
  EXPECT_EQ(t.decode(got), all);
  EXPECT_EQ(t.vocab_size(), 257);
  EXPECT_EQ(t.eot_id(), 256);
  EXPECT_EQ(t.token_bytes(256), "<|endoftext|>");
}

TEST(ByteTokenizer, IllFormedUtf8RoundTrips) {
  const models::byte_tokenizer t;
  const std::string bad =
      "a\xff\xfe\xc3(\xed\xa0\x80\xf4\x90\x80\x80\xe2\x82";  // stray, truncated, surrogate, >U+10FFFF
  EXPECT_EQ(t.encode(bad), (ids{97, 255, 254, 195, 40, 237, 160, 128, 244, 144, 128, 128, 226, 130}));
  EXPECT_EQ(t.decode(t.encode(bad)), bad);
  EXPECT_TRUE(t.encode("").empty());
}

TEST(ByteTokenizer, EndOfTextIsPlainTextUnlessAllowed) {
  const models::byte_tokenizer t;
  const std::string text = "a<|endoftext|>b";
  EXPECT_EQ(t.encode(text).size(), text.size());
  EXPECT_EQ(t.encode(text, models::special_tokens::allowed), (ids{97, 256, 98}));
  EXPECT_EQ(t.decode(t.encode(text, models::special_tokens::allowed)), text);
  EXPECT_EQ(t.encode("<|endoftext|><|endoftext|>", models::special_tokens::allowed), (ids{256, 256}));
}

TEST(ByteTokenizer, UnknownIdsAreNameErrors) {
  const models::byte_tokenizer t;
  expect_error<lora::name_error>([&] { t.decode({1, 257}); }, {"257", "[0, 257)"});
  expect_error<lora::name_error>([&] { t.token_bytes(-1); }, {"-1"});
}

// --- GPT-2's pre-tokenisation ---------------------------------------------------------------------

using pieces = std::vector<std::string>;

pieces split(std::string_view text) {
  pieces out;
  for (const std::string_view p : models::detail::gpt2_pretokenize(text)) out.emplace_back(p);
  return out;
}

TEST(Gpt2Pretokenize, Contractions) {
  EXPECT_EQ(split("I'm don't we'll they're I've he'd it's"),
            (pieces{"I", "'m", " don", "'t", " we", "'ll", " they", "'re", " I", "'ve", " he", "'d", " it", "'s"}));
  EXPECT_EQ(split("DON'T"), (pieces{"DON", "'", "T"}));  // case-sensitive, as in GPT-2
  EXPECT_EQ(split("''s 'x"), (pieces{"''", "s", " '", "x"}));
  EXPECT_EQ(split("'"), (pieces{"'"}));
}

TEST(Gpt2Pretokenize, NumbersAndPunctuation) {
  EXPECT_EQ(split("abc123 4567 x1.5"), (pieces{"abc", "123", " 4567", " x", "1", ".", "5"}));
  EXPECT_EQ(split("Hello, world!!"), (pieces{"Hello", ",", " world", "!!"}));
  EXPECT_EQ(split("x\xc2\xb2 \xe2\x85\xab"), (pieces{"x", "\xc2\xb2", " \xe2\x85\xab"}));  // x² Ⅻ: No and Nl
  EXPECT_EQ(split("(a) ..."), (pieces{"(", "a", ")", " ..."}));
}

TEST(Gpt2Pretokenize, RunsOfSpacesLeaveTheLastOneToTheNextWord) {
  EXPECT_EQ(split("a  b"), (pieces{"a", " ", " b"}));
  EXPECT_EQ(split("a   "), (pieces{"a", "   "}));
  EXPECT_EQ(split("  a"), (pieces{" ", " a"}));
  EXPECT_EQ(split("a \n b"), (pieces{"a", " \n", " b"}));
  EXPECT_EQ(split("\tx"), (pieces{"\t", "x"}));
  EXPECT_EQ(split(" "), (pieces{" "}));
}

TEST(Gpt2Pretokenize, Newlines) {
  EXPECT_EQ(split("\n\nHello"), (pieces{"\n", "\n", "Hello"}));
  EXPECT_EQ(split("Hello\n\n"), (pieces{"Hello", "\n\n"}));
  EXPECT_EQ(split("x\n\n y"), (pieces{"x", "\n\n", " y"}));
  EXPECT_EQ(split("a\r\nb"), (pieces{"a", "\r", "\n", "b"}));  // \s+(?!\S) backs off one
}

TEST(Gpt2Pretokenize, UnicodeLettersAndEmoji) {
  EXPECT_EQ(split("na\xc3\xafve caf\xc3\xa9 \xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82 \xe6\x97\xa5\xe6\x9c\xac"),
            (pieces{"na\xc3\xafve", " caf\xc3\xa9", " \xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82",
                    " \xe6\x97\xa5\xe6\x9c\xac"}));  // naïve café Привет 日本
  // 👋🏽 (So, Sk) are neither letters nor numbers: they join the punctuation after them.
  EXPECT_EQ(split("hi \xf0\x9f\x91\x8b\xf0\x9f\x8f\xbd!"), (pieces{"hi", " \xf0\x9f\x91\x8b\xf0\x9f\x8f\xbd!"}));
  EXPECT_EQ(split("e\xcc\x81t\xc3\xa9"), (pieces{"e", "\xcc\x81", "t\xc3\xa9"}));  // a combining mark (Mn) splits
}

TEST(Gpt2Pretokenize, WhiteSpaceIsTheUnicodeProperty) {
  EXPECT_EQ(split("a\xc2\xa0"
                  "b"),
            (pieces{"a", "\xc2\xa0", "b"}));  // U+00A0
  EXPECT_EQ(split("a\xc2\x85\xc2\x85"
                  "b"),
            (pieces{"a", "\xc2\x85", "\xc2\x85", "b"}));  // U+0085 (not in JS's \s)
  EXPECT_EQ(split("a\xef\xbb\xbf"
                  "b"),
            (pieces{"a", "\xef\xbb\xbf", "b"}));  // U+FEFF is not (it is in JS's)
  EXPECT_EQ(split("a\xe3\x80\x80\xe3\x80\x80"), (pieces{"a", "\xe3\x80\x80\xe3\x80\x80"}));  // U+3000
}

template <std::size_t N>
void expect_table_edges(const models::detail::code_point_range (&table)[N]) {
  for (std::size_t i = 0; i < N; ++i) {
    EXPECT_LE(table[i].lo, table[i].hi);
    if (i > 0) {
      EXPECT_GT(table[i].lo, table[i - 1].hi + 1) << "ranges must be sorted, disjoint and maximal";
    }
    EXPECT_TRUE(models::detail::in_table(table, table[i].lo));
    EXPECT_TRUE(models::detail::in_table(table, table[i].hi));
    EXPECT_FALSE(models::detail::in_table(table, table[i].hi + 1)) << std::hex << table[i].hi + 1;
    EXPECT_FALSE(models::detail::in_table(table, table[i].lo - 1)) << std::hex << table[i].lo - 1;
  }
}

TEST(Gpt2Pretokenize, UnicodeTables) {
  expect_table_edges(models::detail::letter_ranges);
  expect_table_edges(models::detail::number_ranges);
  expect_table_edges(models::detail::white_space_ranges);
  using models::detail::char_class;
  using models::detail::classify;
  EXPECT_EQ(classify(U'\u0416'), char_class::letter);      // Ж
  EXPECT_EQ(classify(U'\u65E5'), char_class::letter);      // 日
  EXPECT_EQ(classify(U'\U00020000'), char_class::letter);  // CJK Extension B
  EXPECT_EQ(classify(U'\u0663'), char_class::number);      // Arabic-Indic three
  EXPECT_EQ(classify(U'\u00BD'), char_class::number);      // ½
  EXPECT_EQ(classify(U'\u2028'), char_class::space);
  EXPECT_EQ(classify(U'\u0301'), char_class::other);      // a combining mark
  EXPECT_EQ(classify(U'\U0001F44B'), char_class::other);  // 👋
  EXPECT_EQ(classify(0x10FFFF), char_class::other);
}

TEST(Gpt2Pretokenize, IllFormedUtf8BytesAreOtherSymbols) {
  EXPECT_EQ(split("a\xff\xfe"
                  "b"),
            (pieces{"a", "\xff\xfe", "b"}));
  EXPECT_EQ(split(" \xff!"), (pieces{" \xff!"}));
  EXPECT_EQ(split("\xc3x"), (pieces{"\xc3", "x"}));  // truncated é
  EXPECT_EQ(split("\xc0\xa9"
                  "a"),
            (pieces{"\xc0\xa9", "a"}));  // overlong
  EXPECT_EQ(split("\xed\xa0\x80"
                  "1"),
            (pieces{"\xed\xa0\x80", "1"}));  // a surrogate
}

TEST(Gpt2Pretokenize, PiecesTileAnyBytes) {
  std::mt19937 rng(7);
  const std::string alphabet = std::string("a Z9'\n\t.\xc3\xa9\xff\x80\xe6\x97\xa5", 16);
  for (int round = 0; round < 500; ++round) {
    std::string text;
    const int n = static_cast<int>(rng() % 40);
    for (int i = 0; i < n; ++i)
      text.push_back(rng() % 4 == 0 ? static_cast<char>(rng()) : alphabet[rng() % alphabet.size()]);
    std::string joined;
    for (const auto& p : split(text)) {
      EXPECT_FALSE(p.empty());
      joined += p;
    }
    EXPECT_EQ(joined, text);
  }
}

// --- byte-level BPE on a hand-made vocabulary ------------------------------------------------------

/// GPT-2's alphabet for one byte, as a vocab.json key ("Ġ" for the space).
std::string key_of(unsigned char b) { return models::detail::gpt2_bytes_to_text(std::string(1, static_cast<char>(b))); }

/// The bytes (ids 0..255, id = byte), these merges and their results (ids 256.., in this order), then
/// <|endoftext|>. Hand-worked below.
const std::vector<std::pair<std::string, std::string>> toy_merges = {
    {"h", "e"}, {"l", "l"},          {"he", "ll"}, {"hell", "o"},         {"\xc4\xa0", "w"},  // Ġ w
    {"o", "r"}, {"\xc4\xa0w", "or"}, {"l", "d"},   {"\xc4\xa0wor", "ld"}, {"a", "a"}};
constexpr std::int32_t he = 256, ll = 257, hello = 259, space_world = 264, aa = 265, toy_eot = 266;

std::string toy_vocab_json() {
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) vocab[key_of(static_cast<unsigned char>(b))] = b;
  for (std::size_t i = 0; i < toy_merges.size(); ++i) vocab[toy_merges[i].first + toy_merges[i].second] = 256 + i;
  vocab["<|endoftext|>"] = toy_eot;
  return vocab.dump();
}

std::string toy_merges_txt() {
  std::string text = "#version: 0.2\n";
  for (const auto& [a, b] : toy_merges) text += a + " " + b + "\n";
  return text;
}

struct toy_files {
  temp_dir dir;
  toy_files(const std::string& vocab = toy_vocab_json(), const std::string& merges = toy_merges_txt()) {
    write_file(dir.file("vocab.json"), vocab);
    write_file(dir.file("merges.txt"), merges);
  }
};

TEST(BpeTokenizer, HandWorkedIds) {
  const toy_files files;
  const auto t = models::bpe_tokenizer::load(files.dir.path());
  EXPECT_EQ(t.vocab_size(), 267);
  EXPECT_EQ(t.eot_id(), toy_eot);
  // "hello": (h,e) rank 0, then (l,l) 1, (he,ll) 2, (hell,o) 3. " world": (Ġ,w) 4, (o,r) 5, (Ġw,or) 6,
  // (l,d) 7, (Ġwor,ld) 8.
  EXPECT_EQ(t.encode("hello world"), (ids{hello, space_world}));
  EXPECT_EQ(t.encode("aaaaa"), (ids{aa, aa, 'a'}));  // left to right, without overlaps
  EXPECT_EQ(t.encode("hex"), (ids{he, 'x'}));
  EXPECT_EQ(t.encode("ello"), (ids{'e', ll, 'o'}));
  EXPECT_EQ(t.encode("Hello"), (ids{'H', 'e', ll, 'o'}));
  EXPECT_EQ(t.encode("hello world!"), (ids{hello, space_world, '!'}));
  EXPECT_EQ(t.encode("hello  world"), (ids{hello, ' ', space_world}));  // the run of spaces leaves its last one
  EXPECT_EQ(t.merge_rank(he, ll), 2);
  EXPECT_EQ(t.merge_rank(ll, he), -1);
  EXPECT_EQ(t.token_bytes(space_world), " world");
  EXPECT_EQ(t.decode({hello, space_world, toy_eot}), "hello world<|endoftext|>");
  EXPECT_EQ(t.encode("hello world"), (ids{hello, space_world}));  // again, from the cache
}

TEST(BpeTokenizer, EndOfTextIsPlainTextUnlessAllowed) {
  const toy_files files;
  const auto t = models::bpe_tokenizer::load(files.dir.file("vocab.json"), files.dir.file("merges.txt"));
  const ids plain = t.encode("hello<|endoftext|>");
  EXPECT_EQ(plain.size(), 1u + 2u + 9u + 2u);  // hello, "<|", the letters of endoftext, "|>"
  EXPECT_EQ(plain[0], hello);
  EXPECT_EQ(t.encode("hello<|endoftext|>", models::special_tokens::allowed), (ids{hello, toy_eot}));
  EXPECT_EQ(t.encode("<|endoftext|> world", models::special_tokens::allowed), (ids{toy_eot, space_world}));
}

TEST(BpeTokenizer, AnyBytesRoundTrip) {
  const toy_files files;
  const auto t = models::bpe_tokenizer::load(files.dir.path());
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  EXPECT_EQ(t.decode(t.encode(all)), all);
  const std::string bad = "hello \xff\xfeworld\xc3 \xed\xa0\x80 na\xc3\xafve <|endoftext|>";
  EXPECT_EQ(t.decode(t.encode(bad)), bad);
  EXPECT_EQ(t.decode(t.encode(bad, models::special_tokens::allowed)), bad);
  expect_error<lora::name_error>([&] { t.decode({267}); }, {"267", "[0, 267)"});
}

// --- broken files: each error names the file and the key or line ------------------------------------

void expect_load_error_vocab(const std::string& vocab, std::initializer_list<std::string> fragments) {
  const toy_files files(vocab);
  std::vector<std::string> all(fragments);
  all.push_back(files.dir.file("vocab.json"));
  try {
    models::bpe_tokenizer::load(files.dir.path());
    ADD_FAILURE() << "expected format_error for " << vocab.substr(0, 80);
  } catch (const lora::format_error& e) {
    for (const auto& f : all) EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << e.what() << " lacks " << f;
  }
}

void expect_load_error_merges(const std::string& merges, std::initializer_list<std::string> fragments) {
  const toy_files files(toy_vocab_json(), merges);
  std::vector<std::string> all(fragments);
  try {
    models::bpe_tokenizer::load(files.dir.path());
    ADD_FAILURE() << "expected format_error for " << merges.substr(0, 80);
  } catch (const lora::format_error& e) {
    for (const auto& f : all) {
      const std::string want = f[0] == ':' ? files.dir.file("merges.txt") + f : f;
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what() << " lacks " << want;
    }
  }
}

/// The toy vocab.json with `edit` applied.
template <typename Edit>
std::string edited_vocab(Edit edit) {
  nlohmann::json v = nlohmann::json::parse(toy_vocab_json());
  edit(v);
  return v.dump();
}

TEST(BpeTokenizerFiles, BrokenVocabJson) {
  expect_load_error_vocab("{\"a\": 1,", {"not valid JSON", "line 1"});
  expect_load_error_vocab("[1, 2]", {"JSON object", "array"});
  expect_load_error_vocab(edited_vocab([](auto& v) { v["hello"] = "259"; }), {"key \"hello\"", "integer id"});
  expect_load_error_vocab(edited_vocab([](auto& v) { v["hello"] = 300; }), {"key \"hello\"", "300", "0..266"});
  expect_load_error_vocab(edited_vocab([](auto& v) { v["hello"] = -1; }), {"key \"hello\"", "-1"});
  expect_load_error_vocab(edited_vocab([](auto& v) { v["aa"] = 1; }), {"\"aa\"", "\"\xc4\x81\"", "both have id 1"});
  expect_load_error_vocab(edited_vocab([](auto& v) { v.erase("<|endoftext|>"); }), {"<|endoftext|>"});
  expect_load_error_vocab(edited_vocab([](auto& v) {  // byte 'q' missing: its id goes to a new token
                            v.erase("q");
                            v["qq"] = 'q';
                          }),
                          {"no key \"q\"", "byte 113"});
  expect_load_error_vocab(edited_vocab([](auto& v) {
                            v.erase("aa");
                            v["\xe2\x82\xac"] = aa;  // € is outside GPT-2's alphabet
                          }),
                          {"key \"\xe2\x82\xac\"", "alphabet"});
}

TEST(BpeTokenizerFiles, BrokenMergesTxt) {
  const std::string head = "#version: 0.2\nh e\n";
  expect_load_error_merges(head + "l\n", {":3:", "two tokens"});
  expect_load_error_merges(head + "l l x\n", {":3:", "two tokens"});
  expect_load_error_merges(head + "l  l\n", {":3:", "two tokens"});
  expect_load_error_merges(head + "\nz q\n", {":4:", "token \"zq\" is not in the vocabulary"});  // blank line counted
  expect_load_error_merges(head + "hello \xc4\xa0world\n", {":3:", "token \"hello\xc4\xa0world\""});
  expect_load_error_merges(head + "h e\n", {":3:", "duplicate merge", "line 2"});
  expect_load_error_merges(head + "h \xe2\x82\xac\n", {":3:", "alphabet"});
  expect_load_error_merges("h e\r\nl \r\n", {":2:", "two tokens"});  // no #version line, CRLF
}

TEST(BpeTokenizerFiles, UnreadableFilesAreIoErrors) {
  const temp_dir dir;
  expect_error<lora::io_error>([&] { models::bpe_tokenizer::load(dir.path()); }, {dir.file("vocab.json")});
  write_file(dir.file("vocab.json"), toy_vocab_json());
  expect_error<lora::io_error>([&] { models::bpe_tokenizer::load(dir.path()); }, {dir.file("merges.txt")});
}

TEST(BpeTokenizerFiles, AcceptsMergesWithoutVersionLineOrFinalNewline) {
  std::string merges = toy_merges_txt().substr(std::string("#version: 0.2\n").size());
  merges.pop_back();
  const toy_files files(toy_vocab_json(), merges);
  EXPECT_EQ(models::bpe_tokenizer::load(files.dir.path()).encode("hello world"), (ids{hello, space_world}));
}

// --- the tokenizer of a model folder ----------------------------------------------------------------

TEST(Tokenizer, FromFolderPicksBpeWhenTheFilesAreThere) {
  const toy_files files;
  const auto t = models::tokenizer::from_folder(files.dir.path(), 267);
  EXPECT_TRUE(t.is_bpe());
  EXPECT_EQ(t.kind(), "gpt2_bpe");
  EXPECT_EQ(t.encode("hello world"), (ids{hello, space_world}));
  EXPECT_EQ(t.vocab_size(), 267);
  EXPECT_EQ(t.eot_id(), toy_eot);
  EXPECT_EQ(t.token_bytes(hello), "hello");
  EXPECT_EQ(t.decode({hello}), "hello");
  EXPECT_EQ(models::tokenizer::from_folder(files.dir.path(), 320).vocab_size(), 267);  // a padded embedding
  expect_error<lora::config_error>([&] { models::tokenizer::from_folder(files.dir.path(), 266); },
                                   {"vocab_size 266", "267"});
}

TEST(Tokenizer, FromFolderFallsBackToBytesOnlyForVocab257) {
  const temp_dir dir;
  const auto t = models::tokenizer::from_folder(dir.path(), 257);
  EXPECT_FALSE(t.is_bpe());
  EXPECT_EQ(t.kind(), "byte");
  EXPECT_EQ(t.encode("hi", models::special_tokens::allowed), (ids{'h', 'i'}));
  EXPECT_EQ(t.eot_id(), 256);
  expect_error<lora::state_error>([&] { t.bpe(); }, {"byte tokenizer"});
  expect_error<lora::config_error>([&] { models::tokenizer::from_folder(dir.path(), 50257); },
                                   {dir.path(), "vocab_size 50257", "257"});
  write_file(dir.file("vocab.json"), toy_vocab_json());
  expect_error<lora::config_error>([&] { models::tokenizer::from_folder(dir.path(), 257); }, {"no merges.txt"});
}

}  // namespace
