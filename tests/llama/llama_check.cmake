# One llama.cpp check of a GGUF export (ctest llama.*, registered by tests/llama/CMakeLists.txt):
#   cmake -DMODE=<mode> -DGGUF=lora-gguf -DREFERENCE=lora_llama_reference -DNODE=node -DCHECK=check.mjs
#         -DPACKAGE=node_modules/node-llama-cpp -DSMOKE=<examples' gpt2_smoke folder> -DTEXT=file -DWORK=dir
#         -P llama_check.cmake
# SMOKE holds the fixture gpt2_smoke: a byte-level base (base/) and PEFT adapters (lora/, half/). The first
# 32 bytes of TEXT are the prompt; 32 greedy tokens follow (32 + 31 positions fit the base's 64).
# Modes:
#   model    base exported as F32: max |delta log p| <= 1e-3 and the greedy tokens all agree
#   adapter  one adapter (lora, scale 1): the same; and llama.cpp without the adapter must fail the
#            check (the adapter changes the predictions by more than the tolerance, so a wrongly
#            exported adapter can be seen)
#   two      two adapters at once (lora 0.5 + half 1.0): the same; and the scales swapped must fail
#   to_peft  the adapter's GGUF converted back to a PEFT folder (lora-gguf to-peft): ours with that
#            folder against llama.cpp with the GGUF
#   q8_0     base exported as Q8_0: a looser tolerance (Q8_TOL below), greedy reported only
cmake_policy(VERSION 3.16)  # quoted arguments of if() are strings (CMP0054)
if(NOT MODE MATCHES "^(model|adapter|two|to_peft|q8_0)$")
  message(FATAL_ERROR "llama_check.cmake: unknown MODE '${MODE}' (model, adapter, two, to_peft, q8_0)")
endif()
file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")
set(prompt --tokens-from "${TEXT}" --count 32 --greedy 32)
set(tol 1e-3)
# Q8_0 rounds every weight matrix (and, in llama.cpp's CPU matmuls, the activations multiplied by them) to
# 8 bits per 32-element block: measured max |delta log p| 3.8e-3 on the fixture's base (a throwaway
# writer quantizing as ggml's reference quantize_row_q8_0 does), so 2e-2 leaves 5x room yet stays far
# below what a misplaced block, scale or tensor gives (0.1 and more).
set(Q8_TOL 2e-2)

# run(NAME program args...): fails unless the program exits 0.
function(run name)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${name}: '${ARGN}' exited ${rc}\n${out}\n${err}")
  endif()
endfunction()

# check(args...): check.mjs must pass; its summary line is printed.
function(check)
  execute_process(COMMAND "${NODE}" "${CHECK}" --node-llama-cpp "${PACKAGE}" ${ARGN} RESULT_VARIABLE rc
                  OUTPUT_VARIABLE out ERROR_VARIABLE err)
  message(STATUS "${out}${err}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "llama.cpp disagrees with ours (check.mjs exited ${rc})")
  endif()
endfunction()

# check_fails(WHY args...): check.mjs must report a disagreement (its FAIL summary line, exit 1).
function(check_fails why)
  execute_process(COMMAND "${NODE}" "${CHECK}" --node-llama-cpp "${PACKAGE}" ${ARGN} RESULT_VARIABLE rc
                  OUTPUT_VARIABLE out ERROR_VARIABLE err)
  message(STATUS "expected to fail (${why}): ${out}${err}")
  if(NOT rc EQUAL 1 OR NOT out MATCHES "^check.mjs: FAIL: .* max \\|delta log p\\|")
    message(FATAL_ERROR "check.mjs was expected to find a disagreement (${why}) but exited ${rc}")
  endif()
endfunction()

set(base_dir "${SMOKE}/base")
set(model_gguf "${WORK}/model.gguf")
if(MODE STREQUAL "q8_0")
  run(export "${GGUF}" model "${base_dir}" --out "${model_gguf}" --type q8_0)
else()
  run(export "${GGUF}" model "${base_dir}" --out "${model_gguf}" --type f32)
endif()

if(MODE STREQUAL "model")
  run(ours "${REFERENCE}" --model "${base_dir}" ${prompt} --out "${WORK}/ours.json")
  check(--ours "${WORK}/ours.json" --model "${model_gguf}" --tol ${tol} --greedy-must-match)
elseif(MODE STREQUAL "q8_0")
  run(ours "${REFERENCE}" --model "${base_dir}" ${prompt} --out "${WORK}/ours.json")
  check(--ours "${WORK}/ours.json" --model "${model_gguf}" --tol ${Q8_TOL})
elseif(MODE STREQUAL "adapter" OR MODE STREQUAL "to_peft")
  run(export_adapter "${GGUF}" adapter "${SMOKE}/lora" --base "${base_dir}" --out "${WORK}/lora.gguf" --type f32)
  set(adapter_dir "${SMOKE}/lora")
  if(MODE STREQUAL "to_peft")
    run(to_peft "${GGUF}" to-peft "${WORK}/lora.gguf" --base "${model_gguf}" --out "${WORK}/peft")
    set(adapter_dir "${WORK}/peft")
  endif()
  run(ours "${REFERENCE}" --model "${base_dir}" --adapter "${adapter_dir}" --scale 1 ${prompt} --out "${WORK}/ours.json")
  check(--ours "${WORK}/ours.json" --model "${model_gguf}" --lora "${WORK}/lora.gguf:1" --tol ${tol} --greedy-must-match)
  if(MODE STREQUAL "adapter")
    check_fails("the adapter left out" --ours "${WORK}/ours.json" --model "${model_gguf}" --tol ${tol})
  endif()
elseif(MODE STREQUAL "two")
  foreach(a lora half)
    run(export_${a} "${GGUF}" adapter "${SMOKE}/${a}" --base "${base_dir}" --out "${WORK}/${a}.gguf" --type f32)
  endforeach()
  run(ours "${REFERENCE}" --model "${base_dir}" --adapter "${SMOKE}/lora" --scale 0.5 --adapter "${SMOKE}/half" --scale 1
      ${prompt} --out "${WORK}/ours.json")
  check(--ours "${WORK}/ours.json" --model "${model_gguf}" --lora "${WORK}/lora.gguf:0.5" --lora "${WORK}/half.gguf:1"
        --tol ${tol} --greedy-must-match)
  check_fails("the scales swapped" --ours "${WORK}/ours.json" --model "${model_gguf}" --lora "${WORK}/lora.gguf:1" --lora
              "${WORK}/half.gguf:0.5" --tol ${tol})
endif()
