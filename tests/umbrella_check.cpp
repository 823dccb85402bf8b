// Compiled (not run) with -Wall -Wextra -Wpedantic -Werror and only Eigen: <lora/lora.hpp> must
// need nothing else and must compile cleanly.
#include <lora/lora.hpp>

double lora_umbrella_check() {
  lora::linear<double> layer(lora::matrix<double>::Ones(3, 2));
  layer.add_adapter("default", lora::adapter_config{});
  return layer.forward(lora::matrix<double>::Ones(4, 2)).sum();
}
