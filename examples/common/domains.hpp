// examples/common/domains.hpp: the shifted target domains the fine-tuning examples adapt to, built
// deterministically from the source images (n x 784, one 28 x 28 image per row, pixel (r, c) in column
// 28 r + c, values in [0, 1]).
//
//   mild     a 12 degree rotation plus a 2-pixel shift to the right, resampled bilinearly: the same
//            garments, slightly moved. A frozen MLP loses much of its accuracy (an MLP has no
//            translation invariance; 88% -> 48% for fashion_mnist.cpp's base) and recovers most of it
//            cheaply.
//   extreme  a fixed random permutation P of the pixels: no spatial structure survives, so a frozen base
//            is at chance and its head alone recovers only part (about 68% for the same MLP). It is
//            learnable exactly, since the first layer W1' = W1 Pᵀ undoes it, but that change ΔW1 = W1 (Pᵀ - I) is
//            of full rank, which is what makes the LoRA rank matter. Optionally also inverted
//            (x -> 1 - x, undone by W1' = -W1 Pᵀ, b1' = b1 + W1 1); off by default, because it mostly
//            slowed optimisation (full fine-tuning 77% instead of 84% after two epochs) and needs a
//            bias change LoRA does not make, without separating the methods any better.
//
// Both are pixel_maps: each output pixel a fixed weighted sum of at most four input pixels, applied to
// a whole batch at once. Because the batch is column-major with one pixel per column, every tap is one
// contiguous column axpy.
#pragma once

#include <Eigen/Core>
#include <array>
#include <cmath>
#include <cstdint>
#include <lora/config.hpp>
#include <lora/error.hpp>
#include <lora/random.hpp>
#include <string>
#include <utility>
#include <vector>

#include "strings.hpp"

namespace ex {

/// Side of the square images the domains are defined on, and their pixel count.
inline constexpr lora::index image_side = 28;
inline constexpr lora::index image_pixels = image_side * image_side;

/// The two target domains.
enum class domain { mild, extreme };

/// "mild" or "extreme".
inline const char* to_string(domain d);
/// The domain named "mild" or "extreme"; lora::config_error otherwise.
inline domain parse_domain(const std::string& name);

/// A fixed linear map between images of `pixels()` pixels: out(:, p) = Σ_k weight[p][k] · in(:, source[p][k]),
/// over the taps k < 4 whose source is not -1.
struct pixel_map {
  static constexpr int taps = 4;
  std::vector<std::array<lora::index, taps>> source;  ///< Input pixel of each tap, -1 when unused.
  std::vector<std::array<float, taps>> weight;        ///< Weight of each tap.

  lora::index pixels() const noexcept { return static_cast<lora::index>(source.size()); }

  /// x: n x pixels() -> n x pixels().
  template <typename Derived>
  lora::matrix<typename Derived::Scalar> apply(const Eigen::MatrixBase<Derived>& x) const;
};

/// Rotation by `degrees` about the image centre ((side - 1) / 2, (side - 1) / 2), then translation by
/// (shift_x, shift_y) pixels (right, down), resampled bilinearly; pixels from outside the image are 0
/// (background). Positive angles turn the image clockwise as displayed (rows grow downwards). The
/// weights are non-negative and sum to at most 1, so [0, 1] maps into [0, 1] up to float rounding.
pixel_map rotate_translate_map(lora::index side, double degrees, double shift_x, double shift_y);
/// out(:, p) = in(:, perm[p]).
pixel_map permutation_map(const std::vector<lora::index>& perm);

/// A uniformly random permutation of [0, pixels), Fisher-Yates from lora::rng(seed): the same on every
/// platform.
std::vector<lora::index> pixel_permutation(lora::index pixels, std::uint64_t seed);
/// inv with inv[perm[p]] = p, so that permuting by perm then by inv is the identity.
std::vector<lora::index> inverse_permutation(const std::vector<lora::index>& perm);

/// The mild shift's parameters.
struct mild_shift_options {
  double degrees = 12.0;
  double shift_x = 2.0;
  double shift_y = 0.0;
};
/// The extreme shift's parameters.
struct extreme_shift_options {
  std::uint64_t seed = 0x5eedf00du;
  bool invert = false;  ///< Also map x -> 1 - x after permuting.
};

/// The mild domain of a batch x: n x 784 -> n x 784.
template <typename Derived>
lora::matrix<typename Derived::Scalar> mild_shift(const Eigen::MatrixBase<Derived>& x,
                                                  const mild_shift_options& options = {});
/// The extreme domain of a batch x: n x 784 -> n x 784.
template <typename Derived>
lora::matrix<typename Derived::Scalar> extreme_shift(const Eigen::MatrixBase<Derived>& x,
                                                     const extreme_shift_options& options = {});
/// mild_shift or extreme_shift with default options.
template <typename Derived>
lora::matrix<typename Derived::Scalar> shift_domain(const Eigen::MatrixBase<Derived>& x, domain d);

// ---------------------------------------------------------------------------------------------------

inline const char* to_string(domain d) {
  switch (d) {
    case domain::mild:
      return "mild";
    case domain::extreme:
      return "extreme";
  }
  return "unknown";
}

inline domain parse_domain(const std::string& name) {
  if (name == "mild") return domain::mild;
  if (name == "extreme") return domain::extreme;
  throw lora::config_error(cat("unknown domain '", name, "'; expected 'mild' or 'extreme'"));
}

template <typename Derived>
lora::matrix<typename Derived::Scalar> pixel_map::apply(const Eigen::MatrixBase<Derived>& x) const {
  using Scalar = typename Derived::Scalar;
  if (x.cols() != pixels()) {
    throw lora::shape_error(cat("pixel_map: input is ", shape_str(x.rows(), x.cols()), ", expected n x ", pixels()));
  }
  lora::matrix<Scalar> out = lora::matrix<Scalar>::Zero(x.rows(), pixels());
  for (lora::index p = 0; p < pixels(); ++p) {
    for (int k = 0; k < taps; ++k) {
      if (source[p][k] >= 0) out.col(p) += static_cast<Scalar>(weight[p][k]) * x.col(source[p][k]);
    }
  }
  return out;
}

inline pixel_map rotate_translate_map(lora::index side, double degrees, double shift_x, double shift_y) {
  // Output pixel q = (x, y) = (column, row) samples the input at T⁻¹(q), where T(p) = R (p - c) + c + t:
  //   T⁻¹(q) = Rᵀ (q - c - t) + c,  R = [cos θ  -sin θ; sin θ  cos θ],  c = ((side-1)/2, (side-1)/2).
  const double theta = degrees * 3.14159265358979323846 / 180.0;
  const double cos_t = std::cos(theta), sin_t = std::sin(theta);
  const double centre = 0.5 * static_cast<double>(side - 1);
  pixel_map map;
  map.source.assign(side * side, {-1, -1, -1, -1});
  map.weight.assign(side * side, {0.f, 0.f, 0.f, 0.f});
  for (lora::index row = 0; row < side; ++row) {
    for (lora::index col = 0; col < side; ++col) {
      const double dx = static_cast<double>(col) - centre - shift_x;
      const double dy = static_cast<double>(row) - centre - shift_y;
      const double sx = cos_t * dx + sin_t * dy + centre;
      const double sy = -sin_t * dx + cos_t * dy + centre;
      const double x0 = std::floor(sx), y0 = std::floor(sy);
      const double fx = sx - x0, fy = sy - y0;
      // Bilinear: the four neighbours, weights (1-fx)(1-fy), fx(1-fy), (1-fx)fy, fx fy (sum 1).
      const double w[4] = {(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy};
      const lora::index p = row * side + col;
      for (int k = 0; k < pixel_map::taps; ++k) {
        const lora::index sc = static_cast<lora::index>(x0) + (k & 1);
        const lora::index sr = static_cast<lora::index>(y0) + (k >> 1);
        if (w[k] > 0 && sc >= 0 && sc < side && sr >= 0 && sr < side) {
          map.source[p][k] = sr * side + sc;
          map.weight[p][k] = static_cast<float>(w[k]);
        }
      }
    }
  }
  return map;
}

inline pixel_map permutation_map(const std::vector<lora::index>& perm) {
  pixel_map map;
  map.source.assign(perm.size(), {-1, -1, -1, -1});
  map.weight.assign(perm.size(), {0.f, 0.f, 0.f, 0.f});
  for (std::size_t p = 0; p < perm.size(); ++p) {
    map.source[p][0] = perm[p];
    map.weight[p][0] = 1.f;
  }
  return map;
}

inline std::vector<lora::index> pixel_permutation(lora::index pixels, std::uint64_t seed) {
  std::vector<lora::index> perm(static_cast<std::size_t>(pixels));
  for (lora::index p = 0; p < pixels; ++p) perm[p] = p;
  lora::rng gen(seed);
  for (lora::index i = pixels - 1; i > 0; --i) std::swap(perm[i], perm[gen.below(static_cast<std::uint64_t>(i) + 1)]);
  return perm;
}

inline std::vector<lora::index> inverse_permutation(const std::vector<lora::index>& perm) {
  std::vector<lora::index> inv(perm.size(), -1);
  for (std::size_t p = 0; p < perm.size(); ++p) {
    const lora::index q = perm[p];
    if (q < 0 || q >= static_cast<lora::index>(perm.size()) || inv[q] != -1) {
      throw lora::config_error(cat("inverse_permutation: entry ", p, " = ", q,
                                   " is out of range or repeated; not a permutation of [0, ", perm.size(), ")"));
    }
    inv[q] = static_cast<lora::index>(p);
  }
  return inv;
}

template <typename Derived>
lora::matrix<typename Derived::Scalar> mild_shift(const Eigen::MatrixBase<Derived>& x,
                                                  const mild_shift_options& options) {
  return rotate_translate_map(image_side, options.degrees, options.shift_x, options.shift_y).apply(x);
}

template <typename Derived>
lora::matrix<typename Derived::Scalar> extreme_shift(const Eigen::MatrixBase<Derived>& x,
                                                     const extreme_shift_options& options) {
  using Scalar = typename Derived::Scalar;
  lora::matrix<Scalar> out = permutation_map(pixel_permutation(image_pixels, options.seed)).apply(x);
  if (options.invert) out = (Scalar(1) - out.array()).matrix();
  return out;
}

template <typename Derived>
lora::matrix<typename Derived::Scalar> shift_domain(const Eigen::MatrixBase<Derived>& x, domain d) {
  return d == domain::mild ? mild_shift(x) : extreme_shift(x);
}

}  // namespace ex
