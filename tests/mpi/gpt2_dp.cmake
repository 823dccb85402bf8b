# ctest mpi.gpt2_finetune: `gpt2_finetune finetune` under mpirun trains the adapter of one process
# (docs/CONVENTIONS.md §dist). At the smoke test's tiny size (a 2-layer base pretrained here on TRAIN):
#   - np 2, 5 sequences per batch (shards of 3 and 2) against a plain run;
#   - np 3, 2 sequences per micro-batch and 2 micro-batches per step (rank 2's shard is empty) against a plain run;
#   - np 2 stopped after 6 steps with a checkpoint, resumed on 3 ranks, against the plain uninterrupted run;
# every comparison by COMPARE (lora_mpi_compare_adapters) within RTOL of each tensor's largest magnitude; the
# data-parallel run must report its communication.
#   cmake -DPROGRAM=gpt2_finetune -DCOMPARE=lora_mpi_compare_adapters -DMPIEXEC=mpirun -DNPFLAG=-np
#         -DMPIFLAGS=a,b -DWORK=dir -DTRAIN=file -DRTOL=x -P gpt2_dp.cmake
file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")
string(REPLACE "," ";" mpiflags "${MPIFLAGS}")

# run(NAME NP args...): the program on NP ranks (NP 0: a plain run, no mpirun); fails unless it exits 0.
function(run name np)
  if(np EQUAL 0)
    set(launch "${PROGRAM}")
  else()
    set(launch "${MPIEXEC}" ${NPFLAG} ${np} ${mpiflags} "${PROGRAM}")
  endif()
  execute_process(COMMAND ${launch} ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${name}: ${launch} ${ARGN} exited ${rc}\n${out}\n${err}")
  endif()
  set(${name}_out "${out}" PARENT_SCOPE)
  set(${name}_err "${err}" PARENT_SCOPE)
endfunction()

# same(A B): the adapters in WORK/A and WORK/B agree within RTOL (and trained).
function(same a b)
  execute_process(COMMAND "${COMPARE}" "${WORK}/${a}" "${WORK}/${b}" ${RTOL} RESULT_VARIABLE rc OUTPUT_VARIABLE out)
  message(STATUS "${a} vs ${b}:\n${out}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "the adapters ${a} and ${b} differ:\n${out}")
  endif()
endfunction()

run(pretrain 0 pretrain --out "${WORK}/base" --text "${TRAIN}" --layers 2 --heads 2 --embd 32 --positions 64 --steps 12
    --batch 4 --context 32 --warmup 2 --quiet --force)
set(ft finetune --model "${WORK}/base" --train "${TRAIN}" --rank 4 --lr 1e-2 --steps 12 --context 32 --warmup 2 --quiet)

run(one 0 ${ft} --batch 5 --out "${WORK}/one")
run(two 2 ${ft} --batch 5 --out "${WORK}/two" --json)
same(one two)
if(NOT two_out MATCHES "\"data_parallel\": {\n *\"ranks\": 2,\n *\"steps\": 12,\n *\"bytes_per_step\": [1-9]")
  message(FATAL_ERROR "--json under mpirun -np 2 lacks its data_parallel report:\n${two_out}")
endif()
if(NOT two_err MATCHES "data parallel over 2 ranks: [0-9]+ bytes reduced per optimizer step")
  message(FATAL_ERROR "no communication report on stderr:\n${two_err}")
endif()
string(REGEX MATCHALL "saved the LoRA adapter" saved "${two_err}")
list(LENGTH saved n_saved)
if(NOT n_saved EQUAL 1)
  message(FATAL_ERROR "expected rank 0 alone to save and say so, got ${n_saved} notes:\n${two_err}")
endif()

run(accum1 0 ${ft} --batch 2 --accum 2 --out "${WORK}/accum1")
run(accum3 3 ${ft} --batch 2 --accum 2 --out "${WORK}/accum3")
same(accum1 accum3)

run(half 2 ${ft} --batch 5 --out "${WORK}/half" --checkpoint "${WORK}/ck.bin" --stop-after 6)
run(resumed 3 ${ft} --batch 5 --out "${WORK}/resumed" --resume "${WORK}/ck.bin")
same(one resumed)
