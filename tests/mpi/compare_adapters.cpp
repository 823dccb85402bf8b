// Compares two PEFT adapter folders (their adapter_model.safetensors) written by the example programs,
// e.g. one trained by a single process and one by `mpirun -np 2`: the same tensor names and shapes, and
// every element within RTOL of the largest magnitude of its tensor. The run must have trained: some
// lora_B tensor (zero at initialisation) must be non-zero, so that two untrained adapters do not pass.
// Usage: lora_mpi_compare_adapters DIR_A DIR_B RTOL. Prints PASS or FAIL lines; exits 1 on a failure.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <lora/io/safetensors.hpp>
#include <string>

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: lora_mpi_compare_adapters DIR_A DIR_B RTOL\n");
    return 2;
  }
  const double rtol = std::atof(argv[3]);
  try {
    const auto a = lora::io::safetensors_file::open(std::string(argv[1]) + "/adapter_model.safetensors");
    const auto b = lora::io::safetensors_file::open(std::string(argv[2]) + "/adapter_model.safetensors");
    if (a.tensors().size() != b.tensors().size() || a.tensors().empty()) {
      std::printf("FAIL: %zu tensors against %zu\n", a.tensors().size(), b.tensors().size());
      return 1;
    }
    double worst = 0, largest_b = 0;
    std::string worst_name;
    for (const auto& t : a.tensors()) {
      if (!b.contains(t.name) || b.info(t.name).shape != t.shape) {
        std::printf("FAIL: tensor %s is missing from %s or has another shape\n", t.name.c_str(), argv[2]);
        return 1;
      }
      const lora::matrix<double> x = a.read_matrix<double>(t.name), y = b.read_matrix<double>(t.name);
      const double scale = std::max(x.cwiseAbs().maxCoeff(), 1e-30);
      const double rel = (x - y).cwiseAbs().maxCoeff() / scale;
      if (rel > worst || worst_name.empty()) {
        worst = rel;
        worst_name = t.name;
      }
      if (t.name.find("lora_B") != std::string::npos) largest_b = std::max(largest_b, x.cwiseAbs().maxCoeff());
    }
    std::printf("%s: %zu tensors; largest difference %.3g of its tensor's largest magnitude (%s), tolerance %.3g\n",
                worst <= rtol ? "PASS" : "FAIL", a.tensors().size(), worst, worst_name.c_str(), rtol);
    std::printf("%s: the adapter trained (largest |lora_B| %.3g)\n", largest_b > 0 ? "PASS" : "FAIL", largest_b);
    return worst <= rtol && largest_b > 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::printf("FAIL: %s\n", e.what());
    return 1;
  }
}
