// The pieces of <lora/dist/mpi.hpp> one by one: the sharding rule, the weighted bucket sums (exact
// values, uneven weights, an empty shard holding NaN, accumulation over micro-batches, mark_ready in any
// order), misuse errors, MPI errors as comm_error, and ranks that disagree. Usage: mpirun lora_mpi_units.
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "mpi_support.hpp"

namespace {

using mpi_test::checks;
namespace dist = lora::dist;

void shard_rule(checks& ck) {
  bool ok = true;
  for (int size = 1; size <= 5; ++size) {
    for (std::size_t n = 0; n <= 12; ++n) {
      std::vector<std::size_t> global(n), joined;
      for (std::size_t i = 0; i < n; ++i) global[i] = 100 + i;
      std::size_t smallest = n, largest = 0;
      double weights = 0.0;
      for (int r = 0; r < size; ++r) {
        const auto part = dist::shard(global, r, size);
        joined.insert(joined.end(), part.begin(), part.end());
        const dist::shard_range s = dist::shard(n, r, size);
        ok = ok && s.size() == part.size() && s.global == n;
        smallest = std::min(smallest, s.size());
        largest = std::max(largest, s.size());
        weights += s.weight();
      }
      ok = ok && joined == global && largest - smallest <= (size > 1 ? 1u : 0u);
      ok = ok && (n == 0 ? weights == 0.0 : std::fabs(weights - 1.0) < 1e-15);
    }
  }
  ck.expect(ok, "shard: blocks of ranks 0..S-1 concatenate to the global batch, sizes differ by at most 1");
  ck.expect(dist::shard(7, 0, 3).size() == 3 && dist::shard(7, 2, 3).begin == 5, "shard: 7 over 3 ranks is 3, 2, 2");
  bool threw = false;
  try {
    dist::shard(4, 3, 3);
  } catch (const lora::config_error&) {
    threw = true;
  }
  ck.expect(threw, "shard: rank >= size is a config_error");
}

/// Two parameters, values unused; gradients set per rank and micro-batch.
struct tiny {
  std::vector<double> v0 = std::vector<double>(3), g0 = std::vector<double>(3);
  std::vector<double> v1 = std::vector<double>(2), g1 = std::vector<double>(2);
  lora::parameter_list<double> params() {
    return {{"p0", lora::param_role::lora_a, v0.data(), g0.data(), 1, 3},
            {"p1", lora::param_role::lora_b, v1.data(), g1.data(), 2, 1}};
  }
  void set(double scale) {
    for (std::size_t i = 0; i < 3; ++i) g0[i] = scale * static_cast<double>(i + 1);
    for (std::size_t i = 0; i < 2; ++i) g1[i] = -scale * static_cast<double>(i + 4);
  }
};

void weighted_sums(const dist::mpi_context& ctx, checks& ck) {
  const int size = ctx.size(), rank = ctx.rank();
  tiny t;
  dist::gradient_reducer<double> red(ctx, t.params(), 24);  // 24 bytes: p1 (16 B) and p0 (24 B) in two buckets
  ck.expect(red.bucket_count() == 2 && red.bucket_parameters(0).at(0) == 1 && red.bytes_per_step() == 40,
            "reducer: buckets follow reverse parameter order");
  // Micro-batch 1 (weight w1 = (r+1)/T, gradient scale r+1), micro-batch 2 (weight 1/S, scale 10): the
  // sum is sum_r (r+1)^2/T + 10 per unit gradient. The last rank holds an empty shard (weight 0, NaN).
  double expected = 0.0, total = 0.0;
  for (int r = 0; r < size; ++r) total += r + 1;
  for (int r = 0; r < size; ++r) expected += (r + 1.0) * (r + 1.0) / total;
  const bool empty = size > 1 && rank == size - 1;
  red.begin((rank + 1.0) / total, false);
  t.set(rank + 1.0);
  red.finish();
  ck.expect(t.g0[0] == 0.0 && t.g1[1] == 0.0, "reducer: an accumulating micro-batch leaves the gradients at zero");
  red.begin(empty ? 0.0 : 1.0 / (size - (size > 1 ? 1 : 0)), true);
  if (empty) {
    t.set(std::numeric_limits<double>::quiet_NaN());
  } else {
    t.set(10.0);
  }
  red.mark_ready(t.params()[0]);  // p0 first: bucket 1 waits for bucket 0, which is launched at finish()
  red.finish();
  expected += 10.0;
  const double err = std::fabs(t.g0[2] - 3.0 * expected) + std::fabs(t.g1[0] + 4.0 * expected);
  ck.expect(err < 1e-12,
            "reducer: grad = sum over ranks and micro-batches of weight * gradient (err " + std::to_string(err) + ")");
  ck.expect(red.stats().windows == 1 && red.stats().allreduces == 2, "reducer: one reduction per window, per bucket");
}

template <typename Error, typename Fn>
bool throws(Fn&& fn) {
  try {
    fn();
  } catch (const Error&) {
    return true;
  } catch (...) {
  }
  return false;
}

void misuse(const dist::mpi_context& ctx, checks& ck) {
  tiny t, other;
  dist::gradient_reducer<double> red(ctx, t.params());
  ck.expect(throws<lora::state_error>([&] { red.mark_ready(0); }), "reducer: mark_ready before begin is a state_error");
  red.begin(1.0, false);
  red.mark_ready(1);
  ck.expect(throws<lora::state_error>([&] { red.mark_ready(1); }), "reducer: marking twice is a state_error");
  ck.expect(throws<lora::name_error>([&] { red.mark_ready(other.params()[0]); }),
            "reducer: a foreign parameter is a name_error");
  ck.expect(throws<lora::state_error>([&] { red.begin(1.0); }), "reducer: begin inside a micro-batch is a state_error");
  ck.expect(throws<lora::config_error>([&] { red.mark_ready(7); }), "reducer: an index out of range is a config_error");
  red.finish();
  ck.expect(throws<lora::config_error>([&] { red.begin(-1.0); }), "reducer: a negative weight is a config_error");
}

/// Ranks that disagree about the parameters fail together, each with comm_error (needs 2 ranks or more).
void disagreement(const dist::mpi_context& ctx, checks& ck) {
  tiny t;
  auto ps = t.params();
  if (ctx.rank() == ctx.size() - 1) ps[1].name = "renamed";
  ck.expect(throws<dist::comm_error>([&] { dist::broadcast_parameters(ctx, ps); }),
            "broadcast_parameters: different parameter names are a comm_error on every rank");
  const std::size_t bucket = 8 + static_cast<std::size_t>(ctx.rank());
  ck.expect(throws<dist::comm_error>([&] { dist::gradient_reducer<double> r(ctx, t.params(), bucket); }),
            "reducer: different bucket sizes are a comm_error on every rank");
}

void mpi_errors(const dist::mpi_context& ctx, checks& ck) {
  int value = 0;
  MPI_Request req = MPI_REQUEST_NULL;
  std::string what;
  try {
    ctx.check(MPI_Ibcast(&value, 1, MPI_INT, ctx.size() + 5, ctx.comm(), &req), "MPI_Ibcast with a bad root");
  } catch (const dist::comm_error& e) {
    what = e.what();
  }
  ck.expect(what.find("[lora.comm_error] rank " + std::to_string(ctx.rank())) == 0 &&
                what.find("MPI_Ibcast with a bad root failed") != std::string::npos,
            "context: an MPI error code becomes comm_error naming rank and call: " + what);
  tiny t;
  if (ctx.size() > 1) disagreement(ctx, ck);

  // any_nonfinite sees one rank's NaN everywhere.
  t.set(ctx.rank() == 0 ? std::numeric_limits<double>::infinity() : 1.0);
  ck.expect(dist::any_nonfinite(ctx, t.params()), "any_nonfinite: rank 0's infinity is seen by every rank");
  t.set(1.0);
  ck.expect(!dist::any_nonfinite(ctx, t.params()), "any_nonfinite: false when every rank is finite");
}

}  // namespace

int main(int argc, char** argv) {
  dist::mpi_context ctx(&argc, &argv, {30.0});  // generous: ctest may run other jobs beside it
  return dist::run_or_abort(ctx, [&] {
    checks ck;
    ck.rank = ctx.rank();
    shard_rule(ck);
    weighted_sums(ctx, ck);
    misuse(ctx, ck);
    mpi_errors(ctx, ck);
    const double failed = dist::allreduce_sum(ctx, ck.failed, "the count of failed checks");
    if (ctx.rank() == 0) {
      std::printf("%s: %d checks on rank 0, %.0f failed on all ranks\n", failed == 0 ? "PASSED" : "FAILED", ck.passed,
                  failed);
    }
    return failed == 0 ? 0 : 1;
  });
}
