// lora/config.hpp: version, index type and the debug-only LORA_ASSERT.
#pragma once

#include <Eigen/Core>
#include <cstdio>
#include <cstdlib>

#if !EIGEN_VERSION_AT_LEAST(3, 4, 0)
#error "lora needs Eigen 3.4 or newer"
#endif

#define LORA_VERSION_MAJOR 0
#define LORA_VERSION_MINOR 1
#define LORA_VERSION_PATCH 0

// LORA_ASSERT checks internal invariants on hot paths. It is compiled out unless LORA_ENABLE_ASSERTS
// is defined or NDEBUG is not; users may define their own LORA_ASSERT before including any lora header.
#ifndef LORA_ASSERT
#if defined(LORA_ENABLE_ASSERTS) || !defined(NDEBUG)
#define LORA_ASSERT(cond)                                                                 \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      std::fprintf(stderr, "%s:%d: LORA_ASSERT(%s) failed\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                       \
    }                                                                                     \
  } while (false)
#else
#define LORA_ASSERT(cond) ((void)0)
#endif
#endif

namespace lora {

/// Signed index type used for every dimension, as in Eigen.
using index = Eigen::Index;

/// Column-major dynamic matrix, the layout every lora type stores its own data in.
template <typename Scalar>
using matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

/// Dynamic column vector.
template <typename Scalar>
using vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

}  // namespace lora
