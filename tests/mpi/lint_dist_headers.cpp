// Every header under include/lora/dist/ (they need MPI's headers), in one translation unit, for
// scripts/lint.sh's second clang-tidy pass (with mpicxx's flags). Not part of any build target;
// scripts/lint.sh fails when a header under include/ is in neither this list nor tests/lint_all_headers.cpp.
#include <lora/dist/checkpoint.hpp>
#include <lora/dist/collectives.hpp>
#include <lora/dist/context.hpp>
#include <lora/dist/data_parallel.hpp>
#include <lora/dist/mpi.hpp>
#include <lora/dist/reducer.hpp>
#include <lora/dist/shard.hpp>
