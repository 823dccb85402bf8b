// lora/random.hpp: a small, portable, serialisable random number generator.
//
// std::mt19937 plus std::uniform_real_distribution give different streams on different standard
// libraries; checkpoints must resume bit-identically everywhere, so the library draws from its own
// xoshiro256** generator (Blackman & Vigna) seeded through splitmix64, with its own distributions.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>

namespace lora {

/// xoshiro256** with splitmix64 seeding. The whole state is four 64-bit words (see state()).
class rng {
 public:
  using state_type = std::array<std::uint64_t, 4>;

  explicit rng(std::uint64_t seed = 0x10a7u) { reseed(seed); }

  /// Restarts the stream from a seed.
  void reseed(std::uint64_t seed);
  /// Next raw 64-bit value.
  std::uint64_t next_u64();
  /// Uniform in [0, 1), 53 random bits.
  double uniform();
  /// Uniform in [lo, hi).
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  /// Standard normal N(0, 1) by Box-Muller (no cached second value, so the state is the whole story).
  double normal();
  /// Uniform integer in [0, n), n > 0, without modulo bias.
  std::uint64_t below(std::uint64_t n);

  const state_type& state() const noexcept { return m_s; }
  void set_state(const state_type& s) noexcept { m_s = s; }

 private:
  static std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  state_type m_s{};
};

// ---------------------------------------------------------------------------------------------------

inline void rng::reseed(std::uint64_t seed) {
  for (auto& word : m_s) {  // splitmix64
    seed += 0x9e3779b97f4a7c15ull;
    std::uint64_t z = seed;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    word = z ^ (z >> 31);
  }
}

inline std::uint64_t rng::next_u64() {
  const std::uint64_t result = rotl(m_s[1] * 5, 7) * 9;
  const std::uint64_t t = m_s[1] << 17;
  m_s[2] ^= m_s[0];
  m_s[3] ^= m_s[1];
  m_s[1] ^= m_s[2];
  m_s[0] ^= m_s[3];
  m_s[2] ^= t;
  m_s[3] = rotl(m_s[3], 45);
  return result;
}

inline double rng::uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

inline double rng::normal() {
  // u1 in (0, 1] so that log(u1) is finite.
  const double u1 = 1.0 - uniform();
  const double u2 = uniform();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925 * u2);
}

inline std::uint64_t rng::below(std::uint64_t n) {
  const std::uint64_t limit = ~std::uint64_t{0} - (~std::uint64_t{0} % n);
  std::uint64_t x = next_u64();
  while (x >= limit) x = next_u64();
  return x % n;
}

}  // namespace lora
