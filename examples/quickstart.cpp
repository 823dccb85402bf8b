// quickstart: the smallest complete use of lora. Wrap a frozen weight, add an adapter, train it with
// plain SGD on a toy regression whose target is the base plus a rank-2 change, then merge.
#include <cstdio>
#include <cstring>
#include <lora/lora.hpp>

int main(int argc, char** argv) {
  if (argc > 1 && (!std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h"))) {
    std::puts("usage: quickstart\nTrains a rank-4 LoRA adapter on a toy regression and merges it. No options.");
    return 0;
  }
  using mat = lora::matrix<float>;
  const lora::index in = 64, out = 32, n = 256;
  lora::rng gen(1);
  auto random = [&](lora::index r, lora::index c, double scale) {
    mat m(r, c);
    for (lora::index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(scale * gen.normal());
    return m;
  };

  // 1. Data: the "new task" is the frozen weight W plus a hidden rank-2 change U V.
  const mat w = random(out, in, 0.1);
  const mat target_w = w + random(out, 2, 0.3) * random(2, in, 0.3);
  const mat x = random(n, in, 1.0);
  const mat y = x * target_w.transpose();

  // 2. Model: the layer views W without copying it; the adapter starts with B = 0 (output = base).
  mat base = w;
  lora::linear<float> layer(lora::view, base, "proj");
  layer.add_adapter("default", {/*rank=*/4, /*alpha=*/8.0});
  std::printf("%s\n", layer.report().to_string().c_str());

  // 3. Train: mean squared error, plain SGD on A and B only.
  const float lr = 0.05f;
  for (int step = 0; step <= 300; ++step) {
    const mat err = layer.forward(x) - y;  // n x out
    const float loss = err.squaredNorm() / static_cast<float>(n);
    layer.zero_grad();
    layer.backward_params_only(err * (2.0f / static_cast<float>(n)));  // dL/dY; dX not needed
    for (auto& p : layer.parameters()) p.value() -= lr * p.grad();
    if (step % 50 == 0) std::printf("step %3d  loss %.6f\n", step, static_cast<double>(loss));
  }

  // 4. Merge for serving: W <- W + s B A; outputs agree; unmerge restores W bit for bit.
  const mat before = layer.infer(x);
  layer.merge();
  const float diff = (layer.infer(x) - before).cwiseAbs().maxCoeff();
  layer.unmerge();
  const bool exact = std::memcmp(base.data(), w.data(), sizeof(float) * w.size()) == 0;
  std::printf("merged vs unmerged max |diff| = %.2e; unmerge exact: %s\n", static_cast<double>(diff),
              exact ? "yes" : "no");
  return exact ? 0 : 1;
}
