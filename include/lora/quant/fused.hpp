// lora/quant/fused.hpp: products of a few input rows with a quantized weight that decode the codes in
// registers and never write a dequantized row (docs/CONVENTIONS.md §quant): y_j[r] = Σ_c deq(W)[r, c] x_j[c]
// for j < n ≤ 4. This is the token-by-token (decoding) case, where the panel products of
// quant/quantized_matrix.hpp spend their time writing and re-reading the panel.
//
// AVX2 + FMA (x86-64; compiled in when the compiler targets them, e.g. -march=native); elsewhere the
// caller uses the panel products. Each block's codes are multiplied with x in float32 and the block sum
// is scaled once: Σ_blocks scale_b · Σ_{c in b} code_c x_c — the same value as the dense product of the
// dequantized weight up to the order of float32 additions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../config.hpp"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LORA_QUANT_FUSED 1
#else
#define LORA_QUANT_FUSED 0
#endif

namespace lora::quant::detail {

#if LORA_QUANT_FUSED

/// The horizontal sum of 8 floats.
inline float hsum(__m256 v) noexcept {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/// 8 NF4 codes as floats from 4 packed bytes (element 2j in the high nibble of byte j).
inline __m256 nf4_decode8(const std::uint8_t* p, __m256 lo, __m256 hi) noexcept {
  std::uint32_t word;
  std::memcpy(&word, p, 4);
  const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
  const __m256i idx =
      _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts), _mm256_set1_epi32(15));
  // codes 0..7 from `lo`, 8..15 from `hi`: bit 3 of the index, moved to the sign bit, picks.
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

/// 8 signed bytes as floats.
inline __m256 i8_decode8(const std::uint8_t* p) noexcept {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

/// 8 Q4_0 values q - 8 as floats, from the low (high = false) or high nibbles of 8 bytes.
inline __m256 q4_decode8(const std::uint8_t* p, bool high) noexcept {
  __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  v = high ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, _mm256_set1_epi32(15));
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(v, _mm256_set1_epi32(8)));
}

/// y_j[r] for rows [0, rows) and N inputs: `block` elements per scale; decode(r, b, k) gives the codes of
/// elements [b·block + 8k, b·block + 8k + 8) of row r; scale(r, b) the scale of that block.
template <int N, typename Decode, typename Scale>
void fused_rows(index rows, index cols, index block, const float* const* x, float* const* y, Decode&& decode,
                Scale&& scale) noexcept {
  for (index r = 0; r < rows; ++r) {
    __m256 tot[N];
    for (int j = 0; j < N; ++j) tot[j] = _mm256_setzero_ps();
    for (index b = 0; b < cols / block; ++b) {
      __m256 acc[N];
      for (int j = 0; j < N; ++j) acc[j] = _mm256_setzero_ps();
      for (index k = 0; k < block / 8; ++k) {
        const __m256 codes = decode(r, b, k);
        const index c = b * block + 8 * k;
        for (int j = 0; j < N; ++j) acc[j] = _mm256_fmadd_ps(codes, _mm256_loadu_ps(x[j] + c), acc[j]);
      }
      const __m256 s = _mm256_set1_ps(scale(r, b));
      for (int j = 0; j < N; ++j) tot[j] = _mm256_fmadd_ps(acc[j], s, tot[j]);
    }
    for (int j = 0; j < N; ++j) y[j][r] = hsum(tot[j]);
  }
}

/// fused_rows for n in 1..4 inputs.
template <typename Decode, typename Scale>
void fused_rows_n(int n, index rows, index cols, index block, const float* const* x, float* const* y, Decode&& decode,
                  Scale&& scale) noexcept {
  switch (n) {
    case 1:
      return fused_rows<1>(rows, cols, block, x, y, decode, scale);
    case 2:
      return fused_rows<2>(rows, cols, block, x, y, decode, scale);
    case 3:
      return fused_rows<3>(rows, cols, block, x, y, decode, scale);
    default:
      return fused_rows<4>(rows, cols, block, x, y, decode, scale);
  }
}

#endif

}  // namespace lora::quant::detail
