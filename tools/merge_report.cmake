# lora-merge --report (ctest tools.lora_merge.report, and the GGUF merges of gguf_roundtrip.cmake): the JSON
# report is written, parses, lists every merged tensor, and its figures have the size the storage gives:
# relative RMS output change below 1e-7 for F32 (float rounding of a double), 2^-11 for F16, 2^-8 for BF16,
# 2e-2 for Q8_0, and larger for Q4_0 than for Q8_0; the pooled figure is never above the worst tensor's.
#   cmake -DMERGE=lora-merge -DBASE=model -DADAPTER=dir -DWORK=dir -DTENSORS=n -DDTYPES=f32,bf16
#         -P merge_report.cmake
# Included by another script, it only defines check_merge_reports().
cmake_policy(VERSION 3.16)
if(CMAKE_VERSION VERSION_LESS 3.19)
  message(FATAL_ERROR "merge_report.cmake reads JSON with string(JSON), which needs CMake 3.19")
endif()

# check_merge_reports(MERGE BASE ADAPTER WORK TENSORS dtype...): one merge per dtype, each report checked.
function(check_merge_reports merge base adapter work tensors)
  set(bounds_f32 1e-7)
  set(bounds_f16 0.00048828125)
  set(bounds_bf16 0.00390625)
  set(bounds_q8_0 0.02)
  set(bounds_q4_0 0.3)
  set(q8_0_pooled "")
  foreach(dtype IN LISTS ARGN)
    get_filename_component(ext "${base}" LAST_EXT)
    set(report "${work}/report_${dtype}.json")
    execute_process(COMMAND "${merge}" --base "${base}" --adapter "${adapter}" --out "${work}/merged_${dtype}${ext}"
                            --dtype ${dtype} --report "${report}" --quiet
                    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
    if(NOT rc EQUAL 0 OR NOT out MATCHES "worst tensor" OR NOT EXISTS "${report}")
      message(FATAL_ERROR "lora-merge --dtype ${dtype} --report exited ${rc}:\n${out}\n${err}")
    endif()
    file(READ "${report}" json)
    string(JSON mode GET "${json}" mode)
    string(JSON count LENGTH "${json}" tensors)
    string(JSON pooled GET "${json}" overall pooled rel_rms_output)
    string(JSON worst GET "${json}" overall worst rel_rms_output)
    string(JSON max_weight GET "${json}" overall pooled max_weight)
    string(JSON rms_weight GET "${json}" overall pooled rms_weight)
    string(JSON worst_tensor GET "${json}" overall worst_tensor)
    message(STATUS "${dtype}: ${mode}: max |dW| ${max_weight}, RMS dW ${rms_weight}, relative RMS output change "
                   "${pooled} (worst tensor ${worst_tensor}: ${worst})")
    if(NOT count EQUAL tensors)
      message(FATAL_ERROR "${report} lists ${count} tensors, expected ${tensors}")
    endif()
    string(TOUPPER "${dtype}" type)
    math(EXPR last "${count} - 1")
    foreach(k RANGE ${last})
      string(JSON stored GET "${json}" tensors ${k} stored_as)
      string(JSON rel GET "${json}" tensors ${k} rel_rms_output)
      if(NOT stored STREQUAL type OR rel GREATER worst)
        message(FATAL_ERROR "${report}: tensor ${k} is ${stored} (expected ${type}) with ${rel} (worst ${worst})")
      endif()
    endforeach()
    set(expected_mode "merge and re-quantize")
    if(dtype MATCHES "^(f32|f16|bf16)$")
      set(expected_mode "merge into a dequantized copy")
    endif()
    if(NOT mode MATCHES "^${expected_mode}" OR NOT pooled GREATER 0 OR NOT pooled LESS bounds_${dtype}
       OR worst LESS pooled)
      message(FATAL_ERROR "${report}: mode '${mode}', relative RMS output change ${pooled} (worst ${worst}); "
                          "expected '${expected_mode}' and 0 < pooled <= worst, pooled < ${bounds_${dtype}}")
    endif()
    if(dtype STREQUAL "q8_0")
      set(q8_0_pooled ${pooled})
    elseif(dtype STREQUAL "q4_0" AND NOT q8_0_pooled STREQUAL "" AND NOT pooled GREATER q8_0_pooled)
      message(FATAL_ERROR "Q4_0 lost no more than Q8_0: ${pooled} <= ${q8_0_pooled}")
    endif()
  endforeach()
endfunction()

if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  file(REMOVE_RECURSE "${WORK}")
  file(MAKE_DIRECTORY "${WORK}")
  string(REPLACE "," ";" dtypes "${DTYPES}")
  check_merge_reports("${MERGE}" "${BASE}" "${ADAPTER}" "${WORK}" ${TENSORS} ${dtypes})
endif()
