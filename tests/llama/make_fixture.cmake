# The model the llama.* tests check (ctest llama.fixture): gpt2_finetune pretrains a small byte-level GPT-2
# (2 layers, d 64, 128 positions, 600 steps on README.md: ~4 s) and fine-tunes two LoRA adapters on other
# text (lora: r 4 on C++ sources; half: r 8 with rsLoRA on docs/CONVENTIONS.md), so that the predictions
# llama.cpp must reproduce are far from uniform and the greedy continuation is not a run of one byte.
#   cmake -DPROGRAM=gpt2_finetune -DSOURCE=<repository> -DWORK=dir -P make_fixture.cmake
cmake_policy(VERSION 3.16)
file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")

function(run)
  execute_process(COMMAND "${PROGRAM}" ${ARGN} --quiet RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "gpt2_finetune ${ARGN} exited ${rc}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()

set(shape --batch 8 --context 64)
run(pretrain --out "${WORK}/base" --text "${SOURCE}/README.md" --val-text "${SOURCE}/docs/CONVENTIONS.md" --layers 2
    --heads 2 --embd 64 --positions 128 --steps 600 --warmup 20 ${shape} --force)
run(finetune --model "${WORK}/base" --train "${SOURCE}/examples/quickstart.cpp,${SOURCE}/examples/gpt2_finetune.cpp"
    --out "${WORK}/lora" --rank 4 --lr 1e-2 --steps 100 ${shape})
run(finetune --model "${WORK}/base" --train "${SOURCE}/docs/CONVENTIONS.md" --out "${WORK}/half" --rank 8 --rslora
    --lr 1e-2 --steps 100 ${shape})
