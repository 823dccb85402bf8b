// tests/requant_support.hpp: the re-quantization error (quant/requant_error.hpp) computed by hand, element
// by element in double, for the tests of the merges that report it (GGUF and safetensors).
#pragma once

#include <algorithm>
#include <cmath>
#include <lora/quant/requant_error.hpp>

namespace lora_test {

struct hand_error {
  double max_weight = 0, rms_weight = 0, rel_rms_weight = 0, rel_rms_output = 0;
  double sum_e2 = 0, sum_w2 = 0, count = 0;
};

/// E = stored - exact and X Eᵀ on the p-row probe batch, by plain loops.
inline hand_error by_hand(const lora::matrix<double>& exact, const lora::matrix<double>& stored, lora::index p) {
  hand_error h;
  for (lora::index i = 0; i < exact.rows(); ++i) {
    for (lora::index j = 0; j < exact.cols(); ++j) {
      const double e = stored(i, j) - exact(i, j);
      h.max_weight = std::max(h.max_weight, std::abs(e));
      h.sum_e2 += e * e;
      h.sum_w2 += exact(i, j) * exact(i, j);
    }
  }
  h.count = static_cast<double>(exact.size());
  h.rms_weight = std::sqrt(h.sum_e2 / h.count);
  h.rel_rms_weight = std::sqrt(h.sum_e2 / h.sum_w2);
  const lora::matrix<double> x = lora::quant::probe_batch(p, exact.cols());
  double out2 = 0, ref2 = 0;
  for (lora::index n = 0; n < p; ++n) {
    for (lora::index i = 0; i < exact.rows(); ++i) {
      double y = 0, ref = 0;
      for (lora::index j = 0; j < exact.cols(); ++j) {
        y += x(n, j) * (stored(i, j) - exact(i, j));
        ref += x(n, j) * exact(i, j);
      }
      out2 += y * y;
      ref2 += ref * ref;
    }
  }
  h.rel_rms_output = p > 0 ? std::sqrt(out2 / ref2) : 0.0;
  return h;
}

}  // namespace lora_test
