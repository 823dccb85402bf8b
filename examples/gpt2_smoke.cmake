# The smoke test of gpt2_finetune (ctest example.gpt2_finetune.smoke): every verb at a tiny size on
# the repository's own text, and the bad inputs that must fail with a message naming the file.
#   cmake -DPROGRAM=path/to/gpt2_finetune [-DGGUF=path/to/lora-gguf] -DWORK=dir -DTRAIN=file -DVAL=file
#         -P gpt2_smoke.cmake
# With GGUF (the tools are built): LoRA over a Q8_0 GGUF base as llama.cpp stores it (--base-dtype keep).
file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")

# run(NAME args...): runs the program, fails unless it exits 0; the output is in ${NAME}_out.
function(run name)
  execute_process(COMMAND "${PROGRAM}" ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${name}: gpt2_finetune ${ARGN} exited ${rc}\n${out}\n${err}")
  endif()
  set(${name}_out "${out}" PARENT_SCOPE)
endfunction()

# must_fail(NAME REGEX args...): the program must exit non-zero with REGEX in its message.
function(must_fail name regex)
  execute_process(COMMAND "${PROGRAM}" ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(rc EQUAL 0)
    message(FATAL_ERROR "${name}: expected gpt2_finetune ${ARGN} to fail\n${out}")
  endif()
  if(NOT err MATCHES "${regex}")
    message(FATAL_ERROR "${name}: expected an error matching '${regex}', got:\n${err}")
  endif()
endfunction()

set(tiny --steps 12 --batch 4 --context 32 --warmup 2 --quiet)
run(pretrain pretrain --out "${WORK}/base" --text "${TRAIN}" --val-text "${VAL}" --layers 2 --heads 2 --embd 32
    --positions 64 ${tiny} --force)
foreach(f config.json model.safetensors pretrain.json)
  if(NOT EXISTS "${WORK}/base/${f}")
    message(FATAL_ERROR "pretrain wrote no ${f}")
  endif()
endforeach()

# LoRA, uninterrupted, then interrupted after 6 steps and resumed: the same adapter.
set(ft finetune --model "${WORK}/base" --train "${TRAIN}" --rank 4 --lr 1e-2 ${tiny})
run(lora ${ft} --val "${VAL}" --out "${WORK}/lora" --json)
run(half ${ft} --out "${WORK}/half" --checkpoint "${WORK}/ck.bin" --stop-after 6)
run(resumed ${ft} --out "${WORK}/resumed" --resume "${WORK}/ck.bin")
run(eval_lora eval --model "${WORK}/base" --adapter "${WORK}/lora" --text "${VAL}" --json)
file(WRITE "${WORK}/eval_lora.json" "${eval_lora_out}")  # for example.gpt2_finetune.eval_vs_pytorch
run(eval_resumed eval --model "${WORK}/base" --adapter "${WORK}/resumed" --text "${VAL}" --json)
if(NOT eval_lora_out MATCHES "^{\"tokens\":[0-9]+,\"predicted\":[0-9]+,\"loss_nats_per_token\":[0-9.e+-]+,\"bits_per_byte\":[0-9.e+-]+}")
  message(FATAL_ERROR "eval --json printed: ${eval_lora_out}")
endif()
# The resumed run agrees to 6 significant digits (not bit for bit: buffers are allocated differently in
# the second process, and Eigen's kernels may round differently at other alignments).
string(REGEX MATCH "\"bits_per_byte\":[0-9]\\.[0-9][0-9][0-9][0-9][0-9]" a "${eval_lora_out}")
string(REGEX MATCH "\"bits_per_byte\":[0-9]\\.[0-9][0-9][0-9][0-9][0-9]" b "${eval_resumed_out}")
if(a STREQUAL "" OR NOT a STREQUAL b)
  message(FATAL_ERROR "resumed run differs:\n${eval_lora_out}\n${eval_resumed_out}")
endif()
file(READ "${WORK}/lora/adapter_config.json" cfg)
foreach(key "\"fan_in_fan_out\": true" "\"task_type\": \"CAUSAL_LM\"" "\"base_model_name_or_path\"" "\"c_attn\"")
  if(NOT cfg MATCHES "${key}")
    message(FATAL_ERROR "adapter_config.json lacks ${key}:\n${cfg}")
  endif()
endforeach()
run(merged eval --model "${WORK}/base" --adapter "${WORK}/lora" --merge --text "${VAL}" --json)

run(full finetune --model "${WORK}/base" --train "${TRAIN}" --method full --out "${WORK}/full" ${tiny})
run(eval_full eval --model "${WORK}/full" --text "${VAL}")
run(generate generate --model "${WORK}/base" --adapter "${WORK}/lora" --prompt "The " --length 20 --temperature 0.8
    --seed 3)

# Bad input: a checkpoint of another run, an adapter of another rank, a folder that is no adapter, a
# config that disagrees with the tensors, a text file that is missing.
must_fail(other_run "ck.bin" ${ft} --rank 2 --out "${WORK}/x" --resume "${WORK}/ck.bin")
# --adapter continues an adapter whose folder sets rank, alpha and targets: a flag that would change them is refused.
must_fail(adapter_rank "--rank cannot be combined with --adapter" finetune --model "${WORK}/base" --train "${TRAIN}"
          --adapter "${WORK}/lora" --rank 2 --out "${WORK}/x")
must_fail(adapter_missing "no_such_adapter" finetune --model "${WORK}/base" --train "${TRAIN}"
          --adapter "${WORK}/no_such_adapter" --out "${WORK}/x" ${tiny})
file(COPY "${WORK}/lora/" DESTINATION "${WORK}/bad_rank")
file(READ "${WORK}/bad_rank/adapter_config.json" cfg)
string(REPLACE "\"r\": 4" "\"r\": 2" cfg "${cfg}")
file(WRITE "${WORK}/bad_rank/adapter_config.json" "${cfg}")
must_fail(bad_rank "bad_rank" eval --model "${WORK}/base" --adapter "${WORK}/bad_rank" --text "${VAL}")
must_fail(no_adapter "no adapter_model.safetensors" eval --model "${WORK}/base" --adapter "${WORK}/base" --text "${VAL}")
file(COPY "${WORK}/base/" DESTINATION "${WORK}/bad_config")
file(READ "${WORK}/bad_config/config.json" cfg)
string(REPLACE "\"n_embd\": 32" "\"n_embd\": 64" cfg "${cfg}")
file(WRITE "${WORK}/bad_config/config.json" "${cfg}")
must_fail(bad_config "bad_config" eval --model "${WORK}/bad_config" --text "${VAL}")
must_fail(no_text "no_such_file" eval --model "${WORK}/base" --text "${WORK}/no_such_file")
# A tokenizer file that does not parse: a folder with vocab.json and merges.txt uses GPT-2's BPE.
file(COPY "${WORK}/base/" DESTINATION "${WORK}/bad_tokenizer")
file(WRITE "${WORK}/bad_tokenizer/vocab.json" "{\"a\": 0, \"b\": ")
file(WRITE "${WORK}/bad_tokenizer/merges.txt" "#version: 0.2\na b\n")
must_fail(bad_tokenizer "vocab.json" eval --model "${WORK}/bad_tokenizer" --text "${VAL}")
# Bytes that are not UTF-8 are fine for the byte tokenizer.
run(binary_text eval --model "${WORK}/base" --text "${WORK}/base/model.safetensors" --json)

# A Q8_0 GGUF base (lora-gguf model) trained over as it is stored: --base-dtype keep keeps the projections in
# the file's blocks (no float copy), so the frozen weights take about 8.5 / 32 of their float bytes; the
# same file dequantized (the default) must evaluate alike, to float rounding.
if(DEFINED GGUF AND NOT GGUF STREQUAL "")
  execute_process(COMMAND "${GGUF}" model "${WORK}/base" --out "${WORK}/base_q8.gguf" --type q8_0
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "lora-gguf model --type q8_0 exited ${rc}\n${out}\n${err}")
  endif()
  set(q8 --model "${WORK}/base_q8.gguf")
  run(q8_lora finetune ${q8} --base-dtype keep --train "${TRAIN}" --rank 4 --lr 1e-2 ${tiny} --out "${WORK}/lora_q8"
      --json)
  if(NOT q8_lora_out MATCHES "\"base_dtype\": \"q8_0\"")
    message(FATAL_ERROR "finetune --base-dtype keep over a Q8_0 GGUF did not keep Q8_0:\n${q8_lora_out}")
  endif()
  string(REGEX MATCH "\"weight_bytes\": ([0-9]+)" m "${q8_lora_out}")
  set(q8_bytes "${CMAKE_MATCH_1}")
  string(REGEX MATCH "\"weight_bytes\": ([0-9]+)" m "${lora_out}")
  if(q8_bytes STREQUAL "" OR NOT q8_bytes LESS CMAKE_MATCH_1)
    message(FATAL_ERROR "the Q8_0 base holds ${q8_bytes} weight bytes, the float one ${CMAKE_MATCH_1}")
  endif()
  run(q8_keep eval ${q8} --base-dtype keep --adapter "${WORK}/lora_q8" --text "${VAL}" --json)
  run(q8_float eval ${q8} --adapter "${WORK}/lora_q8" --text "${VAL}" --json)
  string(REGEX MATCH "\"bits_per_byte\":[0-9]\\.[0-9][0-9][0-9][0-9][0-9]" a "${q8_keep_out}")
  string(REGEX MATCH "\"bits_per_byte\":[0-9]\\.[0-9][0-9][0-9][0-9][0-9]" b "${q8_float_out}")
  if(a STREQUAL "" OR NOT a STREQUAL b)
    message(FATAL_ERROR "the Q8_0 base kept and dequantized differ:\n${q8_keep_out}\n${q8_float_out}")
  endif()
  run(q8_generate generate ${q8} --base-dtype keep --adapter "${WORK}/lora_q8" --prompt "The " --length 8)
  must_fail(q8_keep_full "needs --method lora" finetune ${q8} --base-dtype keep --method full --train "${TRAIN}"
            --out "${WORK}/x" ${tiny})
  must_fail(q8_bad_dtype "or keep" finetune ${q8} --base-dtype q5_k --train "${TRAIN}" --out "${WORK}/x" ${tiny})
endif()
