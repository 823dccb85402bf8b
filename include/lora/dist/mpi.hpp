// lora/dist/mpi.hpp: data-parallel adapter training over MPI (opt-in: needs <mpi.h> and linking MPI;
// <lora/lora.hpp> stays Eigen-only). Conventions: docs/CONVENTIONS.md §dist.
//
//   mpi_context            the communicator (a duplicate, MPI_ERRORS_RETURN), bounded waits, abort
//   run_or_abort           an exception on one rank aborts the whole job instead of hanging the others
//   shard                  rank r's contiguous block of a global batch; weight() = n_r / N
//   broadcast_parameters   rank 0's initial adapters to every rank
//   gradient_reducer       weighted gradient sums over ranks, bucketed, overlapped with backward
//   data_parallel          accumulation + one reduction per step + step_guard (clipping, non-finite skip)
//   save_checkpoint        rank 0 writes atomically; load_checkpoint on every rank, any number of ranks
#pragma once

#include "checkpoint.hpp"
#include "collectives.hpp"
#include "context.hpp"
#include "data_parallel.hpp"
#include "reducer.hpp"
#include "shard.hpp"
