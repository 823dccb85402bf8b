# lora_target_warnings(target): strict warnings (and -Werror with LORA_WERROR) for our own programs.
# They are never put on the lora interface target, so consumers keep their own flags.
function(lora_target_warnings target)
  if(MSVC)
    target_compile_options(${target} PRIVATE /W4 $<$<BOOL:${LORA_WERROR}>:/WX>)
  else()
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic $<$<BOOL:${LORA_WERROR}>:-Werror>)
  endif()
endfunction()
