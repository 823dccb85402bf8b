# The GGUF path end to end without llama.cpp (ctest tools.lora_gguf.roundtrip): the byte-level base and a
# LoRA adapter of the fixture gpt2_smoke go through lora-gguf and lora-merge, and gpt2_finetune's eval
# must give the same bits per byte at every step; the adapter converted back from GGUF trains further.
# Merging re-encoded as F32, BF16, Q8_0 and Q4_0 writes --report files checked by merge_report.cmake.
#   cmake -DGGUF=lora-gguf -DMERGE=lora-merge -DPROGRAM=gpt2_finetune -DSMOKE=dir -DTEXT=file -DWORK=dir
#         -P gguf_roundtrip.cmake
cmake_policy(VERSION 3.16)
file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")

function(run name)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${name}: '${ARGN}' exited ${rc}\n${out}\n${err}")
  endif()
  set(${name}_out "${out}" PARENT_SCOPE)
endfunction()

# bpb(NAME DIGITS args...): gpt2_finetune eval --json; sets NAME to bits_per_byte cut to DIGITS decimals.
function(bpb name digits)
  run(eval "${PROGRAM}" eval ${ARGN} --text "${TEXT}" --json)
  string(REGEX MATCH "\"bits_per_byte\":([0-9]+\\.[0-9]+)" m "${eval_out}")
  if(m STREQUAL "")
    message(FATAL_ERROR "${name}: eval printed ${eval_out}")
  endif()
  string(SUBSTRING "${CMAKE_MATCH_1}" 0 ${digits} v)
  message(STATUS "${name}: ${CMAKE_MATCH_1}")
  set(${name} "${v}" PARENT_SCOPE)
endfunction()

function(expect_equal what a b)
  if(NOT a STREQUAL b)
    message(FATAL_ERROR "${what}: ${a} != ${b}")
  endif()
endfunction()

# expect_close(WHAT A B TOL): |A - B| <= TOL · 1e-10 for decimal numbers A, B (compared as integers in
# units of 1e-10: CMake has no floating-point arithmetic). Cutting both to N decimals and comparing the
# strings fails whenever the two values straddle a multiple of 10^-N, however close they are.
function(to_units out v)
  string(REGEX MATCH "^([0-9]+)\\.([0-9]*)$" m "${v}")
  if(m STREQUAL "")
    message(FATAL_ERROR "expect_close: '${v}' is not a decimal number")
  endif()
  set(whole "${CMAKE_MATCH_1}")
  set(frac "${CMAKE_MATCH_2}0000000000")
  string(SUBSTRING "${frac}" 0 10 frac)
  string(REGEX REPLACE "^0+([0-9])" "\\1" frac "${frac}")
  math(EXPR units "${whole} * 10000000000 + ${frac}")
  set(${out} ${units} PARENT_SCOPE)
endfunction()

function(expect_close what a b tol)
  to_units(ua "${a}")
  to_units(ub "${b}")
  math(EXPR d "${ua} - ${ub}")
  if(d LESS 0)
    math(EXPR d "0 - ${d}")
  endif()
  if(d GREATER tol)
    message(FATAL_ERROR "${what}: ${a} and ${b} differ by ${d}e-10 (at most ${tol}e-10)")
  endif()
endfunction()

set(base "${SMOKE}/base")
set(lora "${SMOKE}/lora")
run(model "${GGUF}" model "${base}" --out "${WORK}/model.gguf")
run(adapter "${GGUF}" adapter "${lora}" --base "${base}" --out "${WORK}/lora.gguf")
run(to_peft "${GGUF}" to-peft "${WORK}/lora.gguf" --base "${WORK}/model.gguf" --out "${WORK}/peft")
run(info "${GGUF}" info "${WORK}/lora.gguf")
if(NOT info_out MATCHES "adapter.lora.alpha")
  message(FATAL_ERROR "lora-gguf info printed:\n${info_out}")
endif()

bpb(with_lora 8 --model "${base}" --adapter "${lora}")
bpb(back 8 --model "${base}" --adapter "${WORK}/peft")
expect_equal("PEFT -> GGUF -> PEFT changed the adapter" "${with_lora}" "${back}")

# An adapter that came from llama.cpp's format trains further here: gpt2_finetune finetune --adapter. On the
# text it trains on, it must do better than where it started.
run(further "${PROGRAM}" finetune --model "${base}" --adapter "${WORK}/peft" --train "${TEXT}" --out "${WORK}/further"
    --steps 10 --batch 4 --context 32 --lr 1e-2 --warmup 0 --quiet)
bpb(trained_further 8 --model "${base}" --adapter "${WORK}/further")
if(NOT trained_further LESS back)
  message(FATAL_ERROR "training the converted adapter further did not lower bits per byte: ${back} -> ${trained_further}")
endif()
file(READ "${WORK}/further/adapter_config.json" further_config)
if(NOT further_config MATCHES "\"r\": 4,")
  message(FATAL_ERROR "the adapter trained further changed its rank:\n${further_config}")
endif()

# The base through GGUF and back (F32): the same model.
run(to_hf "${GGUF}" to-hf "${WORK}/model.gguf" --out "${WORK}/base_hf")
bpb(base_only 8 --model "${base}")
bpb(base_back 8 --model "${WORK}/base_hf")
expect_equal("HF -> GGUF -> HF changed the base" "${base_only}" "${base_back}")

if(base_only STREQUAL with_lora)
  message(FATAL_ERROR "the adapter does not change the model: the checks below could not see a lost adapter")
endif()

# Merged in GGUF (with the GGUF adapter, and with the PEFT folder), back to HF: merged = unmerged, to the
# float rounding of the merge: within 1e-7 bits per byte (the adapter itself moves the 3rd decimal).
bpb(with_lora5 18 --model "${base}" --adapter "${lora}")
foreach(adapter IN ITEMS "${WORK}/lora.gguf" "${lora}")
  run(merge "${MERGE}" --base "${WORK}/model.gguf" --adapter "${adapter}" --out "${WORK}/merged.gguf" --quiet)
  if(NOT merge_out MATCHES "merged 8 LoRA modules into 8 tensors, copied 20 unchanged")
    message(FATAL_ERROR "lora-merge printed: ${merge_out}")
  endif()
  run(merged_hf "${GGUF}" to-hf "${WORK}/merged.gguf" --out "${WORK}/merged_hf")
  bpb(merged 18 --model "${WORK}/merged_hf")
  expect_close("merged in GGUF (${adapter}) vs unmerged" "${with_lora5}" "${merged}" 1000)
endforeach()

# Merged and re-encoded: every merged tensor's error reported, of the size its type gives.
if(NOT CMAKE_VERSION VERSION_LESS 3.19)
  include("${CMAKE_CURRENT_LIST_DIR}/merge_report.cmake")
  check_merge_reports("${MERGE}" "${WORK}/model.gguf" "${WORK}/lora.gguf" "${WORK}" 8 f32 bf16 q8_0 q4_0)
endif()
