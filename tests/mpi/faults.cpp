// A rank that dies, throws or stops calling the collectives mid-training: the job must end with a
// non-zero exit code and a message within a bounded time, never hang. Usage under mpirun:
//   lora_mpi_faults kill|throw|stall
// Rank 1 misbehaves in window 2 (after two good steps); the others go on training, so they sit in the
// gradient reduction when it happens. tests/mpi/expect_abort.sh checks exit code, time and message.
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>

#include "mpi_support.hpp"

namespace {

using namespace mpi_test;
namespace dist = lora::dist;

void misbehave(const std::string& mode, int rank) {
  std::printf("rank %d: injecting '%s'\n", rank, mode.c_str());
  std::fflush(stdout);
  if (mode == "kill") std::raise(SIGKILL);
  if (mode == "throw") throw std::runtime_error("injected failure on rank 1");
  if (mode == "stall") std::this_thread::sleep_for(std::chrono::seconds(120));  // the others time out first
}

int train(const dist::mpi_context& ctx, const std::string& mode) {
  const dataset<double> d;
  const run_config c;
  model<double> net(100);
  auto opt = make_optimizer<double>(c.kind, net.params());
  lora::optim::step_guard<double> guard(*opt, {lora::optim::nonfinite_policy::skip, c.max_grad_norm});
  dist::data_parallel<double> dp(ctx, guard, {c.micro_batches, lora::optim::reduction::mean, c.bucket_bytes, true});
  for (std::int64_t w = 0; w < 6; ++w) {
    for (std::int64_t j = 0; j < c.micro_batches; ++j) {
      if (w == 2 && j == 1 && ctx.rank() == 1) misbehave(mode, ctx.rank());
      const lora::index m = w * c.micro_batches + j;
      const dist::shard_range s = dist::shard(static_cast<std::size_t>(micro_size(m)), ctx.rank(), ctx.size());
      dp.begin_micro_batch(s);
      const double loss =
          net.step(d, micro_first(m) + static_cast<lora::index>(s.begin), static_cast<lora::index>(s.size()), false,
                   [&](const auto& ps) { dp.mark_ready(ps); });
      dp.accumulate(loss);
    }
  }
  std::printf("rank %d: training finished, which it must not have (mode %s)\n", ctx.rank(), mode.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  dist::mpi_context ctx(&argc, &argv, {2.0});  // a 2 s bound on every wait
  return dist::run_or_abort(ctx, [&] {
    if (argc != 2) throw lora::config_error("usage: lora_mpi_faults kill|throw|stall");
    const std::string mode = argv[1];
    if (mode != "kill" && mode != "throw" && mode != "stall") throw lora::config_error("unknown mode " + mode);
    return train(ctx, mode);
  });
}
