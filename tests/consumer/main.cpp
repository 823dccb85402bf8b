// A consumer of the installed (or vendored) library: includes the umbrella header, trains one step,
// merges, and exits 0 only if unmerge restored the weight exactly.
#include <cstdio>
#include <lora/lora.hpp>

int main() {
  lora::matrix<float> w = lora::matrix<float>::Identity(4, 4);
  const lora::matrix<float> original = w;
  lora::linear<float> layer(lora::view, w, "consumer");
  lora::adapter_config cfg;
  cfg.rank = 2;
  cfg.init = lora::init_method::random_ab;
  layer.add_adapter("default", cfg);
  const lora::matrix<float> x = lora::matrix<float>::Ones(3, 4);
  layer.forward(x);
  layer.backward(lora::matrix<float>::Ones(3, 4));
  layer.merge();
  layer.unmerge();
  const bool ok = (w.array() == original.array()).all();
  std::printf("consumer: %s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
