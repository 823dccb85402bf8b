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
#   q8_0     base exported as Q8_0: against ours on the F32 base with Q8_TOL, and against ours on the
#            weights dequantized from the same file (lora_llama_reference --model MODEL.gguf) with
#            DEQUANTIZED_TOL; greedy reported only
#   q4_0     base exported as Q4_0: against ours on the dequantized weights with DEQUANTIZED_TOL (that
#            llama.cpp reads the blocks as we write them; how much 4 bits lose is not this test's
#            business); greedy reported only
cmake_policy(VERSION 3.16)  # quoted arguments of if() are strings (CMP0054)
if(NOT MODE MATCHES "^(model|adapter|two|to_peft|q8_0|q4_0)$")
  message(FATAL_ERROR "llama_check.cmake: unknown MODE '${MODE}' (model, adapter, two, to_peft, q8_0, q4_0)")
endif()
file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")
set(prompt --tokens-from "${TEXT}" --count 32 --greedy 32)
set(tol 1e-3)
# Quantized exports. llama.cpp's CPU matmuls with Q8_0 or Q4_0 weights also round the activations they
# multiply to Q8_0 blocks, which ours never does, so even the same (dequantized) weights do not give the
# same log-probabilities. Measured on the fixture's base, max |delta log p| over the prompt and the
# greedy steps: Q8_0 3.8e-3 against ours in F32, 2.4e-3 against ours on the dequantized Q8_0 weights,
# Q4_0 2.0e-3 against ours on the dequantized Q4_0 weights (4.6e-2 against F32). The tolerances leave
# 2.5x room and stay far below what a wrong layout gives (measured with a deliberately broken writer:
# Q4_0 nibbles swapped 0.79, Q8_0 scales 25% off 0.20).
set(Q8_TOL 1e-2)
set(DEQUANTIZED_TOL 5e-3)

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
if(MODE STREQUAL "q8_0" OR MODE STREQUAL "q4_0")
  run(export "${GGUF}" model "${base_dir}" --out "${model_gguf}" --type ${MODE})
  run(ours_dequantized "${REFERENCE}" --model "${model_gguf}" ${prompt} --out "${WORK}/ours_dequantized.json")
  check(--ours "${WORK}/ours_dequantized.json" --model "${model_gguf}" --tol ${DEQUANTIZED_TOL})
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
