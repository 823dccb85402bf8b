// Data-parallel training over MPI gives the adapters of single-process training on the same global
// batches: AdamW and SGD with momentum, clipping (on the reduced gradients), 2 micro-batches per step,
// uneven shards, several buckets; a NaN on one rank skips the step on every rank; a checkpoint saved by
// rank 0 resumes on another number of ranks. Usage: lora_mpi_train CHECKPOINT_PATH (under mpirun).
#include <cstdio>
#include <memory>
#include <string>

#include "mpi_support.hpp"

namespace {

using namespace mpi_test;
namespace dist = lora::dist;

template <typename Scalar>
constexpr double tolerance() {
  return sizeof(Scalar) == 8 ? 1e-10 : 1e-6;  // float: see docs/CONVENTIONS.md §dist
}

template <typename Scalar>
const char* type_name() {
  return sizeof(Scalar) == 8 ? "double" : "float";
}

/// One rank's share of data-parallel training.
template <typename Scalar>
struct worker {
  model<Scalar> net;
  std::unique_ptr<lora::optim::optimizer<Scalar>> opt;
  lora::optim::step_guard<Scalar> guard;
  dist::data_parallel<Scalar> dp;

  worker(const dist::mpi_context& ctx, const run_config& c, std::uint64_t adapter_seed)
      : net(adapter_seed),
        opt(make_optimizer<Scalar>(c.kind, net.params())),
        guard(*opt, {lora::optim::nonfinite_policy::skip, c.max_grad_norm}),
        dp(ctx, guard, {c.micro_batches, lora::optim::reduction::mean, c.bucket_bytes, true}) {}

  void train(const dist::mpi_context& ctx, const dataset<Scalar>& d, const run_config& c, std::int64_t first,
             std::int64_t last) {
    for (std::int64_t w = first; w < last; ++w) {
      for (std::int64_t j = 0; j < c.micro_batches; ++j) {
        const lora::index m = w * c.micro_batches + j;
        const dist::shard_range s = dist::shard(static_cast<std::size_t>(micro_size(m)), ctx.rank(), ctx.size());
        dp.begin_micro_batch(s);
        const bool poison = w == c.poison_window && j == 0 && ctx.rank() == ctx.size() - 1;
        const double loss =
            net.step(d, micro_first(m) + static_cast<lora::index>(s.begin), static_cast<lora::index>(s.size()), poison,
                     [&](const auto& ps) { dp.mark_ready(ps); });
        dp.accumulate(loss);
      }
    }
  }
};

/// True when every rank holds bit-identical values.
template <typename Scalar>
bool same_on_all_ranks(const dist::mpi_context& ctx, const lora::parameter_list<Scalar>& ps) {
  std::uint64_t h = dist::detail::layout_fingerprint(ps);
  for (const auto& p : ps)
    h = dist::detail::fnv1a(p.value_data, static_cast<std::size_t>(p.size()) * sizeof(Scalar), h);
  try {
    dist::detail::require_same(ctx, h, "the trained adapters");
    return true;
  } catch (const dist::comm_error&) {
    return false;
  }
}

template <typename Scalar>
void compare(checks& ck, const std::string& label, worker<Scalar>& mine, reference<Scalar>& ref) {
  const double diff = max_abs_diff(flat_values(mine.net.params()), flat_values(ref.net.params()));
  char line[256];
  std::snprintf(line, sizeof line, "%s: adapters vs one process: max |diff| %.3g <= %.0e", label.c_str(), diff,
                tolerance<Scalar>());
  ck.expect(diff <= tolerance<Scalar>(), line);
  const double dl = std::fabs(mine.dp.last_loss() - ref.acc.last_loss());
  std::snprintf(line, sizeof line, "%s: last loss %.12g vs %.12g", label.c_str(), mine.dp.last_loss(),
                ref.acc.last_loss());
  ck.expect(dl <= tolerance<Scalar>() * (1.0 + std::fabs(ref.acc.last_loss())), line);
  ck.expect(mine.opt->step_count() == ref.opt->step_count() && mine.guard.skipped_steps() == ref.guard.skipped_steps(),
            label + ": steps taken and skipped as in one process");
}

template <typename Scalar>
void scenario_train(const dist::mpi_context& ctx, checks& ck, const run_config& c, const std::string& name) {
  const std::string label = std::string(type_name<Scalar>()) + " " + name + " np" + std::to_string(ctx.size());
  const dataset<Scalar> d;
  constexpr std::int64_t windows = 4;
  worker<Scalar> mine(ctx, c, 100 + 17 * static_cast<std::uint64_t>(ctx.rank()));  // broadcast makes rank 0's win
  mine.train(ctx, d, c, 0, windows);
  reference<Scalar> ref(c, 100);
  ref.train(d, c, 0, windows);
  compare(ck, label, mine, ref);
  ck.expect(same_on_all_ranks(ctx, mine.net.params()), label + ": adapters bit-identical on every rank");
  ck.expect(mine.guard.last_grad_norm() > c.max_grad_norm, label + ": clipping acted on the reduced gradients (norm " +
                                                               std::to_string(mine.guard.last_grad_norm()) + ")");
  if (c.poison_window >= 0) {
    ck.expect(mine.guard.skipped_steps() == 1 && mine.opt->step_count() == windows - 1,
              label + ": the NaN on one rank skipped exactly one step on this rank");
  }
  const auto& st = mine.dp.reducer().stats();
  if (ctx.rank() == 0) {
    std::printf(
        "INFO %s: %zu buckets, %zu bytes reduced per step, %lld allreduces, %.1f us blocked and %.1f us "
        "from first launch to done per step\n",
        label.c_str(), mine.dp.reducer().bucket_count(), mine.dp.reducer().bytes_per_step(),
        static_cast<long long>(st.allreduces), 1e6 * st.wait_seconds / static_cast<double>(st.windows),
        1e6 * st.reduce_seconds / static_cast<double>(st.windows));
  }
}

/// Runs fn on the ranks below `count` over a sub-communicator of them; the others skip it.
template <typename Fn>
void on_first_ranks(const dist::mpi_context& world, int count, Fn&& fn) {
  MPI_Comm sub = MPI_COMM_NULL;
  world.check(MPI_Comm_split(world.comm(), world.rank() < count ? 0 : MPI_UNDEFINED, world.rank(), &sub),
              "MPI_Comm_split");
  if (sub != MPI_COMM_NULL) {
    {
      dist::mpi_context ctx(sub, {world.timeout()});
      fn(ctx);
    }
    MPI_Comm_free(&sub);
  }
  world.barrier("the end of a phase");
}

/// Trains windows [0, 2) on `p1` ranks, saves (rank 0), resumes from the file on `p2` ranks for
/// windows [2, 4); the result must equal 4 uninterrupted windows in one process.
template <typename Scalar>
void scenario_resume(const dist::mpi_context& world, checks& ck, const std::string& path, int p1, int p2) {
  const std::string label =
      std::string(type_name<Scalar>()) + " resume np" + std::to_string(p1) + "->np" + std::to_string(p2);
  const run_config c;
  const dataset<Scalar> d;
  if (world.is_root()) std::remove(path.c_str());
  world.barrier("the removal of an old checkpoint");
  on_first_ranks(world, p1, [&](const dist::mpi_context& ctx) {
    worker<Scalar> mine(ctx, c, 100);
    mine.train(ctx, d, c, 0, 2);
    lora::io::checkpoint_info info;
    info.step = 2;
    info.metadata["ranks"] = std::to_string(ctx.size());
    dist::save_checkpoint(ctx, path, *mine.opt, info);
  });
  on_first_ranks(world, p2, [&](const dist::mpi_context& ctx) {
    worker<Scalar> mine(ctx, c, 555);  // other adapters: the checkpoint must replace them
    const lora::io::checkpoint_info info = dist::load_checkpoint(ctx, path, *mine.opt);
    ck.expect(info.step == 2 && info.metadata.at("ranks") == std::to_string(p1), label + ": checkpoint info read back");
    mine.train(ctx, d, c, info.step, 4);
    reference<Scalar> ref(c, 100);
    ref.train(d, c, 0, 4);
    compare(ck, label, mine, ref);
  });
}

template <typename Scalar>
void run_all(const dist::mpi_context& ctx, checks& ck, const std::string& path) {
  run_config adamw;
  scenario_train<Scalar>(ctx, ck, adamw, "adamw+clip+accum");
  run_config sgd;
  sgd.kind = opt_kind::sgd;
  sgd.micro_batches = 3;
  sgd.bucket_bytes = std::size_t{1} << 20;  // one bucket
  scenario_train<Scalar>(ctx, ck, sgd, "sgd+momentum+clip+accum3");
  run_config guard = adamw;
  guard.poison_window = 1;
  scenario_train<Scalar>(ctx, ck, guard, "step-guard");
  const int p1 = 2, p2 = ctx.size() == 2 ? 1 : ctx.size();  // np2: 2 -> 1 ranks; np3: 2 -> 3
  scenario_resume<Scalar>(ctx, ck, path + "." + type_name<Scalar>(), p1, p2);
}

}  // namespace

int main(int argc, char** argv) {
  dist::mpi_context ctx(&argc, &argv, {30.0});  // generous: ctest may run other jobs beside it
  return dist::run_or_abort(ctx, [&] {
    if (argc != 2) throw lora::config_error("usage: lora_mpi_train CHECKPOINT_PATH");
    checks ck;
    ck.rank = ctx.rank();
    run_all<double>(ctx, ck, argv[1]);
    run_all<float>(ctx, ck, argv[1]);
    const double failed = dist::allreduce_sum(ctx, ck.failed, "the count of failed checks");
    if (ctx.rank() == 0) {
      std::printf("%s: %d checks on rank 0, %.0f failed on all ranks\n", failed == 0 ? "PASSED" : "FAILED", ck.passed,
                  failed);
    }
    return failed == 0 ? 0 : 1;
  });
}
