// lora/quant/nf4.hpp: NormalFloat4 (NF4), the 4-bit data type of QLoRA, exactly as bitsandbytes stores it
// (docs/CONVENTIONS.md §quant), and its double quantization.
//
//   - 16 codes (nf4_code below), sorted; a value x of a block with absmax m is stored as the index of the
//     code nearest to x / m (a value exactly between two codes takes the lower index);
//   - blocks of `block` consecutive elements of the row-major flattened tensor (64 by default; a block may
//     span rows, the last block may be short), each with its absmax as a float32;
//   - two codes per byte: element 2j in the HIGH nibble, element 2j + 1 in the low one (an odd count is
//     padded with one zero element);
//   - dequantization: code[q] · absmax (float32).
// Double quantization (QLoRA's "DQ") stores the absmax values themselves in 8 bits: their mean is
// subtracted, the remainders are quantized in blocks of 256 with bitsandbytes' signed dynamic map
// (nf4_dynamic_map) against one float32 absmax per block, and absmax = map[q] · absmax2 + mean.
// Bits per weight with blocks of 64: 4 + 32/64 = 4.5; with double quantization 4 + 8/64 + 32/(64·256)
// ≈ 4.127 (plus one float32 mean per tensor).
//
// Eigen-free; the layer-level types are in quant/quantized_matrix.hpp.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../error.hpp"

namespace lora::quant {

namespace detail {
using lora::detail::cat;
using lora::detail::shape_str;
}  // namespace detail

/// The 16 NF4 values (bitsandbytes' get_4bit_type("nf4")), each exactly a float32, ascending.
inline constexpr std::array<float, 16> nf4_code = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

/// The index of the NF4 code nearest to x (x in [-1, 1]; ties between two codes take the lower index).
std::uint8_t nf4_index(float x) noexcept;

/// NF4 blocks of a flattened tensor: absmax per block and the packed codes.
struct nf4_blocks {
  std::size_t size = 0;              ///< elements
  std::size_t block = 64;            ///< elements per block
  std::vector<float> absmax;         ///< one per block (float32, as bitsandbytes)
  std::vector<std::uint8_t> packed;  ///< (size + 1) / 2 bytes, element 2j in the high nibble
};

/// Quantizes n values in blocks of `block` (a power of two in [32, 4096]; config_error otherwise).
nf4_blocks nf4_quantize(const float* x, std::size_t n, std::size_t block = 64);
/// Writes elements [begin, end) of the tensor to out[0 .. end - begin), as float32 code · absmax.
void nf4_dequantize(const nf4_blocks& q, std::size_t begin, std::size_t end, float* out) noexcept;

/// bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): 256 values, sorted.
const std::array<float, 256>& nf4_dynamic_map();

/// The absmax values of NF4 blocks, double-quantized.
struct nf4_double_quant {
  float offset = 0;                 ///< mean of the absmax values
  std::size_t block = 256;          ///< absmax values per second-level block
  std::vector<float> absmax2;       ///< one float32 per second-level block
  std::vector<std::uint8_t> codes;  ///< one index into nf4_dynamic_map per absmax value
  /// absmax of first-level block b: map[codes[b]] · absmax2[b / 256] + offset.
  float absmax(std::size_t b) const noexcept;
};
/// Double-quantizes absmax values (offset = their mean; nearest map value of (a - offset) / absmax2).
nf4_double_quant nf4_double_quantize(const std::vector<float>& absmax);

/// Storage bits per weight of n elements in blocks of `block`, with or without double quantization
/// (codes, absmax values, second-level absmax values and the offset, all counted).
double nf4_bits_per_weight(std::size_t n, std::size_t block = 64, bool double_quant = false) noexcept;

// ================================================================================================
// Implementation
// ================================================================================================

inline std::uint8_t nf4_index(float x) noexcept {
  // The 15 midpoints between neighbouring codes, rounded once to float32 (bitsandbytes' pivots, e.g.
  // 0.03979014977812767 and 0.8614784181118011).
  static const std::array<float, 15> mid = [] {
    std::array<float, 15> m{};
    for (std::size_t k = 0; k < 15; ++k)
      m[k] = static_cast<float>(0.5 * (static_cast<double>(nf4_code[k]) + static_cast<double>(nf4_code[k + 1])));
    return m;
  }();
  std::uint8_t k = 0;
  while (k < 15 && x > mid[k]) ++k;
  return k;
}

inline nf4_blocks nf4_quantize(const float* x, std::size_t n, std::size_t block) {
  if (block < 32 || block > 4096 || (block & (block - 1)) != 0)
    throw config_error(detail::cat("NF4 block size must be a power of two in [32, 4096], got ", block));
  nf4_blocks q;
  q.size = n;
  q.block = block;
  q.absmax.resize((n + block - 1) / block);
  q.packed.assign((n + 1) / 2, 0);
  for (std::size_t b = 0; b < q.absmax.size(); ++b) {
    const std::size_t begin = b * block, end = std::min(n, begin + block);
    float m = 0;
    for (std::size_t i = begin; i < end; ++i) m = std::max(m, std::abs(x[i]));
    q.absmax[b] = m;
    const float inv = 1.0f / std::max(m, 1e-38f);  // bitsandbytes' CPU path divides by max(absmax, 1e-38)
    for (std::size_t i = begin; i < end; ++i) {
      const std::uint8_t code = nf4_index(std::clamp(x[i] * inv, -1.0f, 1.0f));
      q.packed[i / 2] |= static_cast<std::uint8_t>(i % 2 == 0 ? code << 4 : code);
    }
  }
  return q;
}

namespace detail {

/// Both codes of every byte (high nibble first), so that a byte decodes with one table load.
inline const std::array<std::array<float, 2>, 256>& nf4_pair_table() noexcept {
  static const std::array<std::array<float, 2>, 256> table = [] {
    std::array<std::array<float, 2>, 256> t{};
    for (std::size_t b = 0; b < 256; ++b) t[b] = {nf4_code[b >> 4], nf4_code[b & 15]};
    return t;
  }();
  return table;
}

/// Elements [begin, end) of packed codes, element i scaled by absmax_of(block of i), into out.
template <typename AbsmaxOf>
void nf4_decode(const std::uint8_t* packed, std::size_t block, std::size_t begin, std::size_t end, float* out,
                AbsmaxOf&& absmax_of) noexcept {
  const auto& pairs = nf4_pair_table();
  std::size_t i = begin;
  while (i < end) {
    const std::size_t b = i / block, stop = std::min(end, (b + 1) * block);
    const float a = absmax_of(b);
    if (i % 2 == 1) {  // an odd start: the low nibble of a byte
      out[i - begin] = nf4_code[packed[i / 2] & 15] * a;
      ++i;
    }
    for (; i + 1 < stop; i += 2) {
      const auto& p = pairs[packed[i / 2]];
      out[i - begin] = p[0] * a;
      out[i + 1 - begin] = p[1] * a;
    }
    if (i < stop) {  // an odd end: the high nibble of a byte
      out[i - begin] = nf4_code[packed[i / 2] >> 4] * a;
      ++i;
    }
  }
}

}  // namespace detail

inline void nf4_dequantize(const nf4_blocks& q, std::size_t begin, std::size_t end, float* out) noexcept {
  detail::nf4_decode(q.packed.data(), q.block, begin, end, out, [&](std::size_t b) { return q.absmax[b]; });
}

namespace detail {

/// torch.linspace(start, end, steps) in float32, as torch computes it on the CPU: the first half from
/// start upwards, the second half from end downwards, with step = (end - start) / (steps - 1).
inline std::vector<float> linspace_f32(float start, float end, int steps) {
  std::vector<float> v(static_cast<std::size_t>(steps));
  const float step = (end - start) / static_cast<float>(steps - 1);
  const int half = steps / 2;
  for (int i = 0; i < steps; ++i)
    v[static_cast<std::size_t>(i)] =
        i < half ? start + step * static_cast<float>(i) : end - step * static_cast<float>(steps - 1 - i);
  return v;
}

}  // namespace detail

inline const std::array<float, 256>& nf4_dynamic_map() {
  static const std::array<float, 256> map = [] {
    std::vector<double> data;
    for (int i = 0; i < 7; ++i) {  // exponent 10^(i - 6), 2^i fraction values per sign
      const std::vector<float> b = detail::linspace_f32(0.1f, 1.0f, (1 << i) + 1);
      for (std::size_t k = 0; k + 1 < b.size(); ++k) {
        const float mean = (b[k] + b[k + 1]) / 2.0f;
        const double scale = std::pow(10.0, i - 6);
        data.push_back(scale * static_cast<double>(mean));
        data.push_back(-scale * static_cast<double>(mean));
      }
    }
    data.push_back(0.0);
    data.push_back(1.0);
    std::array<float, 256> out{};
    for (std::size_t k = 0; k < out.size(); ++k) out[k] = static_cast<float>(data[k]);
    std::sort(out.begin(), out.end());
    return out;
  }();
  return map;
}

inline float nf4_double_quant::absmax(std::size_t b) const noexcept {
  return nf4_dynamic_map()[codes[b]] * absmax2[b / block] + offset;
}

inline nf4_double_quant nf4_double_quantize(const std::vector<float>& absmax) {
  nf4_double_quant dq;
  double sum = 0;
  for (float a : absmax) sum += a;
  dq.offset = absmax.empty() ? 0.0f : static_cast<float>(sum / static_cast<double>(absmax.size()));
  const auto& map = nf4_dynamic_map();
  dq.absmax2.resize((absmax.size() + dq.block - 1) / dq.block);
  dq.codes.resize(absmax.size());
  for (std::size_t b = 0; b < dq.absmax2.size(); ++b) {
    const std::size_t begin = b * dq.block, end = std::min(absmax.size(), begin + dq.block);
    float m = 0;
    for (std::size_t i = begin; i < end; ++i) m = std::max(m, std::abs(absmax[i] - dq.offset));
    dq.absmax2[b] = m;
    const float inv = m > 0 ? 1.0f / m : 0.0f;
    for (std::size_t i = begin; i < end; ++i) {
      const float v = (absmax[i] - dq.offset) * inv;
      const auto it = std::lower_bound(map.begin(), map.end(), v);  // nearest of *it and its left neighbour
      std::size_t k = static_cast<std::size_t>(it - map.begin());
      if (k == map.size() || (k > 0 && v - map[k - 1] <= map[k] - v)) --k;
      dq.codes[i] = static_cast<std::uint8_t>(k);
    }
  }
  return dq;
}

inline double nf4_bits_per_weight(std::size_t n, std::size_t block, bool double_quant) noexcept {
  if (n == 0) return 0.0;
  const double blocks = std::ceil(static_cast<double>(n) / static_cast<double>(block));
  const double codes = 8.0 * std::ceil(static_cast<double>(n) / 2.0);
  const double scales = double_quant ? 8.0 * blocks + 32.0 * std::ceil(blocks / 256.0) + 32.0 : 32.0 * blocks;
  return (codes + scales) / static_cast<double>(n);
}

}  // namespace lora::quant
