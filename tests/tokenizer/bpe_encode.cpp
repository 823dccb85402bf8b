// tests/tokenizer/bpe_encode.cpp: encodes text files with lora::models::bpe_tokenizer, for
// check_gpt2_bpe.js to compare with the JS reference id for id.
//
//   lora_bpe_encode VOCAB_JSON MERGES_TXT FILE...
//
// Each FILE holds records separated by NUL bytes; every record is encoded as plain text (special
// tokens as text). Prints one JSON array holding, for every record of every file in order, the array
// of its ids. Exits 1 (naming the record) when decoding a record's ids does not give its bytes back,
// 2 on a usage, file or tokenizer error.
#include <cstdint>
#include <fstream>
#include <iostream>
#include <iterator>
#include <lora/models/bpe_tokenizer.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace {

/// Prints `ids` as a JSON array.
void print_ids(const std::vector<std::int32_t>& ids) {
  std::cout << '[';
  for (std::size_t i = 0; i < ids.size(); ++i) std::cout << (i == 0 ? "" : ",") << ids[i];
  std::cout << ']';
}

/// Encodes the records of one file; false when one does not round-trip.
bool encode_file(const lora::models::bpe_tokenizer& t, const std::string& path, bool& first) {
  const std::string text = lora::models::detail::read_text_file(path);
  std::size_t record = 0;
  for (std::size_t start = 0; start <= text.size(); ++record) {
    const std::size_t end = std::min(text.find('\0', start), text.size());
    const std::string_view r(text.data() + start, end - start);
    start = end + 1;
    const std::vector<std::int32_t> ids = t.encode(r);
    if (t.decode(ids) != r) {
      std::cerr << path << ": record " << record << " does not round-trip\n";
      return false;
    }
    std::cout << (first ? "" : ",\n");
    first = false;
    print_ids(ids);
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " VOCAB_JSON MERGES_TXT FILE...\n";
    return 2;
  }
  try {
    const auto t = lora::models::bpe_tokenizer::load(argv[1], argv[2]);
    bool first = true;
    std::cout << '[';
    for (int i = 3; i < argc; ++i) {
      if (!encode_file(t, argv[i], first)) return 1;
    }
    std::cout << "]\n";
  } catch (const lora::error& e) {
    std::cerr << e.what() << '\n';
    return 2;
  }
  return 0;
}
