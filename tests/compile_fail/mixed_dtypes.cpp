// Must NOT compile: a float layer fed a double matrix. The build test expects the static_assert's
// message "mismatched dtypes" in the compiler's output.
#include <lora/lora.hpp>

int main() {
  lora::linear<float> layer(lora::matrix<float>::Ones(2, 2));
  layer.add_adapter("default");
  return static_cast<int>(layer.forward(lora::matrix<double>::Ones(1, 2)).sum());
}
