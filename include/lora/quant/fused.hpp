// lora/quant/fused.hpp: products of a few input rows with a quantized weight that decode the codes in
// registers and never write a dequantized row (docs/CONVENTIONS.md §quant): y_j[r] = Σ_c deq(W)[r, c] x_j[c]
// for j < n ≤ 4. This is the token-by-token (decoding) case, where the panel products of
// quant/quantized_matrix.hpp spend their time writing and re-reading the panel.
//
// AVX2 + FMA (x86-64; compiled in when the compiler targets them, e.g. -march=native; f16 also needs F16C);
// elsewhere the caller uses the panel products. Each block's codes are multiplied with x in float32 and the
// block sum is scaled once: Σ_blocks scale_b · Σ_{c in b} code_c x_c — the same value as the dense product
// of the dequantized weight up to the order of float32 additions.
//
// A format (nf4_format, ... below) decodes one block of one row into `vectors` registers of 8 floats, in
// whatever order its decoding yields cheapest: elem(k, t) is the element of the block in slot t of register
// k, and x is permuted once per call to match (permute_x), so the inner loop is decodes, loads and FMAs.
// NF4 looks its codes up in a 16-entry float table by byte shuffles (lut16); Q4_0 converts its nibbles
// (q - 8 is an integer). Rows are processed several at a time (independent accumulators), and split across
// threads (lora/detail/parallel.hpp) when a call has enough work to pay for starting them.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../config.hpp"
#include "../detail/parallel.hpp"
#include "../io/ggml_types.hpp"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LORA_QUANT_FUSED 1
#else
#define LORA_QUANT_FUSED 0
#endif

namespace lora::quant::detail {

/// Inputs (rows of X) a call of the kernels takes.
inline constexpr int fused_max_inputs = 4;

/// Weight elements (rows · cols · n) below which a call stays on one thread: a thread costs tens of
/// microseconds to start, the kernels do about a weight element a nanosecond.
inline constexpr index fused_min_work_per_thread = index{1} << 21;

/// The fewest rows of W a thread takes for n inputs of cols values (at least one interleaved group).
inline index fused_min_rows(index cols, int n) noexcept {
  return std::max<index>(4, fused_min_work_per_thread / std::max<index>(1, cols * n));
}

#if LORA_QUANT_FUSED

/// Unrolls the next loop completely (its trip count is a compile-time constant): the registers of a block
/// (w[], the accumulators) then stay in registers instead of the stack.
#define LORA_QUANT_UNROLL _Pragma("GCC unroll 16")

/// The horizontal sum of 8 floats.
inline float hsum(__m256 v) noexcept {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/// 8 signed bytes as floats.
inline __m256 i8_decode8(const std::uint8_t* p) noexcept {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

/// An IEEE half (ggml's block scales) as a float.
inline float half_to_float(const std::uint8_t* p) noexcept {
  std::uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
#else
  return io::detail::ggml_fp16_to_fp32(h);
#endif
}

/// A 16-entry float table as 4 byte planes (plane i: byte i of every entry, repeated in both lanes), for
/// vpshufb look-ups.
struct lut16 {
  __m256i plane[4];
};

inline lut16 make_lut16(const float* table) noexcept {
  alignas(32) std::uint8_t bytes[4][32];
  for (int e = 0; e < 16; ++e) {
    std::uint32_t u;
    std::memcpy(&u, &table[e], 4);
    for (int i = 0; i < 4; ++i) bytes[i][e] = bytes[i][e + 16] = static_cast<std::uint8_t>(u >> (8 * i));
  }
  lut16 t{};
  for (int i = 0; i < 4; ++i) t.plane[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes[i]));
  return t;
}

/// Position (0..31, byte of the code vector) of slot t of output register k of lut16_decode32: the
/// in-lane unpacks leave codes 4k..4k+3 in the low lane and 16+4k..16+4k+3 in the high one.
constexpr int lut16_pos(int k, int t) noexcept { return t < 4 ? 4 * k + t : 16 + 4 * k + (t - 4); }

/// table[codes[p]] for the 32 codes (bytes, each < 16) of `codes`, as 4 registers in lut16_pos order:
/// 4 byte look-ups, then bytes interleaved into 16-bit halves and halves into floats.
inline void lut16_decode32(const lut16& t, __m256i codes, __m256* out) noexcept {
  const __m256i b0 = _mm256_shuffle_epi8(t.plane[0], codes), b1 = _mm256_shuffle_epi8(t.plane[1], codes);
  const __m256i b2 = _mm256_shuffle_epi8(t.plane[2], codes), b3 = _mm256_shuffle_epi8(t.plane[3], codes);
  const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
  out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
  out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
  out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
  out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
}

/// Formats: block elements a scale, `vectors` = block / 8 registers; decode(r, b, w) fills w with block b
/// of row r (element elem(k, t) of the block in slot t of w[k]); scale(r, b) its scale; at(r, b) the
/// block's first byte (for prefetching).

/// NF4, blocks of 64 (32 bytes, element 2j in the high nibble of byte j) with float32 absmax.
struct nf4_format {
  static constexpr int block = 64, vectors = 8;
  const std::uint8_t* packed;
  const float* absmax;
  index blocks_per_row;
  lut16 lut;
  static constexpr int elem(int k, int t) noexcept { return 2 * lut16_pos(k % 4, t) + (k >= 4 ? 1 : 0); }
  void decode(index r, index b, __m256* w) const noexcept {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + (r * blocks_per_row + b) * 32));
    const __m256i m = _mm256_set1_epi8(15);
    lut16_decode32(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), m), w);  // even elements
    lut16_decode32(lut, _mm256_and_si256(v, m), w + 4);                    // odd elements
  }
  float scale(index r, index b) const noexcept { return absmax[r * blocks_per_row + b]; }
  const void* at(index r, index b) const noexcept { return packed + (r * blocks_per_row + b) * 32; }
};

/// NF4 with double quantization: absmax of block i = map[codes[i]] · absmax2[i / 256] + offset.
struct nf4_dq_format : nf4_format {
  const std::uint8_t* codes;
  const float* absmax2;
  const float* map;
  float offset;
  float scale(index r, index b) const noexcept {
    const index i = r * blocks_per_row + b;
    return map[codes[i]] * absmax2[i / 256] + offset;
  }
};

/// ggml's Q8_0 (34-byte blocks of 32: f16 scale, 32 int8) and int8 (one scale a row, read as blocks of 32).
struct q8_0_format {
  static constexpr int block = 32, vectors = 4;
  const std::uint8_t* bytes;
  index row_bytes;
  static constexpr int elem(int k, int t) noexcept { return 8 * k + t; }
  void decode(index r, index b, __m256* w) const noexcept {
    const std::uint8_t* p = bytes + r * row_bytes + b * 34 + 2;
    LORA_QUANT_UNROLL
    for (int k = 0; k < 4; ++k) w[k] = i8_decode8(p + 8 * k);
  }
  float scale(index r, index b) const noexcept { return half_to_float(bytes + r * row_bytes + b * 34); }
  const void* at(index r, index b) const noexcept { return bytes + r * row_bytes + b * 34; }
};

struct int8_format {
  static constexpr int block = 32, vectors = 4;
  const std::uint8_t* bytes;
  const float* row_scale;
  index cols;
  static constexpr int elem(int k, int t) noexcept { return 8 * k + t; }
  void decode(index r, index b, __m256* w) const noexcept {
    LORA_QUANT_UNROLL
    for (int k = 0; k < 4; ++k) w[k] = i8_decode8(bytes + r * cols + b * 32 + 8 * k);
  }
  float scale(index r, index) const noexcept { return row_scale[r]; }
  const void* at(index r, index b) const noexcept { return bytes + r * cols + b * 32; }
};

/// ggml's Q4_0: 18-byte blocks of 32 (f16 scale d; element i < 16 in the low nibble of byte i, element
/// 16 + i in its high nibble; value d · (q - 8)).
struct q4_0_format {
  static constexpr int block = 32, vectors = 4;
  const std::uint8_t* bytes;
  index row_bytes;
  /// Register 2g + h holds bytes 8g..8g+7, low nibbles (h = 0: elements 8g + t) or high (16 + 8g + t).
  static constexpr int elem(int k, int t) noexcept { return 16 * (k % 2) + 8 * (k / 2) + t; }
  void decode(index r, index b, __m256* w) const noexcept {
    const std::uint8_t* p = bytes + r * row_bytes + b * 18 + 2;
    const __m256i eight = _mm256_set1_epi32(8), m = _mm256_set1_epi32(15);
    LORA_QUANT_UNROLL
    for (int g = 0; g < 2; ++g) {
      const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * g)));
      w[2 * g] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v, m), eight));
      w[2 * g + 1] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v, 4), eight));
    }
  }
  float scale(index r, index b) const noexcept { return half_to_float(bytes + r * row_bytes + b * 18); }
  const void* at(index r, index b) const noexcept { return bytes + r * row_bytes + b * 18; }
};

/// f32, bf16 (the high half of a float32) and f16 (F16C) rows, read as blocks of 32 with scale 1.
struct row_format {
  static constexpr int block = 32, vectors = 4;
  const std::uint8_t* bytes;
  index cols;
  static constexpr int elem(int k, int t) noexcept { return 8 * k + t; }
  float scale(index, index) const noexcept { return 1.0f; }
};

struct f32_format : row_format {
  const void* at(index r, index b) const noexcept { return bytes + 4 * (r * cols + b * 32); }
  void decode(index r, index b, __m256* w) const noexcept {
    const float* p = reinterpret_cast<const float*>(bytes) + r * cols + b * 32;
    LORA_QUANT_UNROLL
    for (int k = 0; k < 4; ++k) w[k] = _mm256_loadu_ps(p + 8 * k);
  }
};

struct bf16_format : row_format {
  const void* at(index r, index b) const noexcept { return bytes + 2 * (r * cols + b * 32); }
  void decode(index r, index b, __m256* w) const noexcept {
    const std::uint8_t* p = bytes + 2 * (r * cols + b * 32);
    LORA_QUANT_UNROLL
    for (int k = 0; k < 4; ++k) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * k));
      w[k] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
};

#if defined(__F16C__)
struct f16_format : row_format {
  const void* at(index r, index b) const noexcept { return bytes + 2 * (r * cols + b * 32); }
  void decode(index r, index b, __m256* w) const noexcept {
    const std::uint8_t* p = bytes + 2 * (r * cols + b * 32);
    LORA_QUANT_UNROLL
    for (int k = 0; k < 4; ++k) w[k] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * k)));
  }
};
#endif

// ------------------------------------------------------------------------------------------------

/// Rows [r0, r0 + R) of the product for N inputs (xp: permuted per block, see permute_x). While it reads
/// block b of its rows it prefetches block b of the next R rows (clamped to `last`, the range's last row):
/// one pass over a stored row is too short for the hardware's stream prefetchers to ramp up (at d 1024,
/// 512 bytes of NF4), and decoding from memory without this ran at half the speed of decoding from cache.
template <int N, int R, typename Format>
void fused_group(const Format& f, index r0, index last, index blocks, const float* const* xp,
                 float* const* y) noexcept {
  constexpr int V = Format::vectors;
  __m256 tot[R][N];
  LORA_QUANT_UNROLL
  for (int i = 0; i < R; ++i) LORA_QUANT_UNROLL
  for (int j = 0; j < N; ++j) tot[i][j] = _mm256_setzero_ps();
  for (index b = 0; b < blocks; ++b) {
    const index c = b * Format::block;
    LORA_QUANT_UNROLL
    for (int i = 0; i < R; ++i)
      _mm_prefetch(static_cast<const char*>(f.at(std::min(r0 + R + i, last), b)), _MM_HINT_T0);
    LORA_QUANT_UNROLL
    for (int i = 0; i < R; ++i) {
      __m256 w[V];
      f.decode(r0 + i, b, w);
      const __m256 s = _mm256_set1_ps(f.scale(r0 + i, b));
      LORA_QUANT_UNROLL
      for (int j = 0; j < N; ++j) {
        __m256 a0 = _mm256_mul_ps(w[0], _mm256_loadu_ps(xp[j] + c));
        __m256 a1 = _mm256_mul_ps(w[1], _mm256_loadu_ps(xp[j] + c + 8));
        LORA_QUANT_UNROLL
        for (int k = 2; k < V; k += 2) {
          a0 = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(xp[j] + c + 8 * k), a0);
          a1 = _mm256_fmadd_ps(w[k + 1], _mm256_loadu_ps(xp[j] + c + 8 * k + 8), a1);
        }
        tot[i][j] = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), s, tot[i][j]);
      }
    }
  }
  LORA_QUANT_UNROLL
  for (int i = 0; i < R; ++i) LORA_QUANT_UNROLL
  for (int j = 0; j < N; ++j) y[j][r0 + i] = hsum(tot[i][j]);
}

/// Rows [r0, r1) for N inputs: groups of interleave(N) rows, then one at a time.
template <int N, typename Format>
void fused_range(const Format& f, index r0, index r1, index blocks, const float* const* xp, float* const* y) noexcept {
  constexpr int R = N == 1 ? 4 : N == 2 ? 2 : 1;  // R · N independent accumulators, within 16 registers
  index r = r0;
  for (; r + R <= r1; r += R) fused_group<N, R>(f, r, r1 - 1, blocks, xp, y);
  for (; r < r1; ++r) fused_group<N, 1>(f, r, r1 - 1, blocks, xp, y);
}

/// x (cols floats) into out with each block permuted as the format's registers hold it.
template <typename Format>
void permute_x(const float* x, index cols, float* out) noexcept {
  for (index c0 = 0; c0 < cols; c0 += Format::block)
    for (int k = 0; k < Format::vectors; ++k)
      for (int t = 0; t < 8; ++t) out[c0 + 8 * k + t] = x[c0 + Format::elem(k, t)];
}

/// y_j = deq(W) x_j for j < n ≤ 4 (rows x cols weight of whole blocks), split by rows across threads.
template <typename Format>
void fused_forward_rows(const Format& f, int n, index rows, index cols, const float* const* x, float* const* y) {
  static thread_local std::vector<float> scratch;  // the permuted inputs; grows once, then reused
  const float* xp[4];
  bool identity = true;
  for (int k = 0; k < Format::vectors; ++k)
    for (int t = 0; t < 8; ++t) identity = identity && Format::elem(k, t) == 8 * k + t;
  if (!identity && scratch.size() < static_cast<std::size_t>(n * cols))
    scratch.resize(static_cast<std::size_t>(n * cols));
  for (int j = 0; j < n; ++j) {
    if (!identity) permute_x<Format>(x[j], cols, scratch.data() + j * cols);
    xp[j] = identity ? x[j] : scratch.data() + j * cols;
  }
  const index blocks = cols / Format::block;
  lora::detail::parallel_for(rows, fused_min_rows(cols, n), [&](index r0, index r1, index) {
    switch (n) {
      case 1:
        return fused_range<1>(f, r0, r1, blocks, xp, y);
      case 2:
        return fused_range<2>(f, r0, r1, blocks, xp, y);
      case 3:
        return fused_range<3>(f, r0, r1, blocks, xp, y);
      default:
        return fused_range<4>(f, r0, r1, blocks, xp, y);
    }
  });
}

/// Rows [r0, r1) of deq(W) in their natural column order into out (row-major, blocks · block values a
/// row): each block decoded in registers, scaled, and stored (NF4's even and odd elements interleaved back
/// by unpacks; the other formats' registers each hold 8 consecutive elements). The products of the panels
/// (quant/quantized_matrix.hpp) read these rows; the values equal the scalar decoders' exactly (one float32
/// product code · scale each).
template <typename Format>
void decode_rows(const Format& f, index r0, index r1, index blocks, float* out) noexcept {
  constexpr int V = Format::vectors, B = Format::block;
  for (index r = r0; r < r1; ++r) {
    float* row = out + (r - r0) * blocks * B;
    for (index b = 0; b < blocks; ++b) {
      __m256 w[V];
      f.decode(r, b, w);
      const __m256 s = _mm256_set1_ps(f.scale(r, b));
      float* o = row + b * B;
      if constexpr (std::is_base_of_v<nf4_format, Format>) {
        // w[k] holds elements 2·lut16_pos(k, t) and w[k + 4] the odd ones after them: interleaving them
        // gives elements 8k..8k+7 (low lanes) and 32+8k..32+8k+7 (high lanes).
        LORA_QUANT_UNROLL
        for (int k = 0; k < 4; ++k) {
          const __m256 e = _mm256_mul_ps(w[k], s), od = _mm256_mul_ps(w[k + 4], s);
          const __m256 lo = _mm256_unpacklo_ps(e, od), hi = _mm256_unpackhi_ps(e, od);
          _mm256_storeu_ps(o + 8 * k, _mm256_permute2f128_ps(lo, hi, 0x20));
          _mm256_storeu_ps(o + 32 + 8 * k, _mm256_permute2f128_ps(lo, hi, 0x31));
        }
      } else {
        LORA_QUANT_UNROLL
        for (int k = 0; k < V; ++k) _mm256_storeu_ps(o + Format::elem(k, 0), _mm256_mul_ps(w[k], s));
      }
    }
  }
}

// Each register of the formats other than NF4 holds 8 consecutive elements (decode_rows relies on it).
static_assert(q4_0_format::elem(1, 7) == q4_0_format::elem(1, 0) + 7 && q4_0_format::elem(2, 3) == 8 + 3);
static_assert(nf4_format::elem(0, 1) == 2 && nf4_format::elem(4, 0) == 1 && nf4_format::elem(1, 4) == 40);

#endif

}  // namespace lora::quant::detail
