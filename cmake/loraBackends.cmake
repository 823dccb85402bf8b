# Optional back ends for our own programs: BLAS for Eigen's GEMMs, OpenMP threads, -march=native.
# None of them touches the lora interface target: consumers choose their own.
# lora_target_backends(target) applies whichever is enabled.
if(LORA_USE_BLAS)
  set(BLA_VENDOR OpenBLAS)
  find_package(BLAS REQUIRED)
endif()
if(LORA_USE_OPENMP)
  find_package(OpenMP REQUIRED)
endif()

function(lora_target_backends target)
  if(LORA_NATIVE AND NOT MSVC)
    target_compile_options(${target} PRIVATE -march=native)
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
      # GCC 12 reports false (maybe-)uninitialized values inside its own AVX-512 intrinsics that Eigen uses.
      target_compile_options(${target} PRIVATE -Wno-maybe-uninitialized -Wno-uninitialized)
    endif()
  endif()
  if(LORA_USE_BLAS)
    target_compile_definitions(${target} PRIVATE EIGEN_USE_BLAS)
    target_link_libraries(${target} PRIVATE BLAS::BLAS)
  endif()
  if(LORA_USE_OPENMP)
    target_link_libraries(${target} PRIVATE OpenMP::OpenMP_CXX)
  endif()
endfunction()
