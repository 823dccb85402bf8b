# Finds Eigen without a version argument, then checks it is at least 3.4.
#
# A version range cannot be used: Eigen 3.4's version file rejects ranges that cross 3.x, and Eigen
# 5's rejects a plain "3.4". So we ask for any Eigen3 and check the version it reports ourselves.
macro(lora_find_eigen)
  if(NOT TARGET Eigen3::Eigen)
    find_package(Eigen3 REQUIRED NO_MODULE)
  endif()
  if(DEFINED Eigen3_VERSION AND NOT "${Eigen3_VERSION}" STREQUAL "")
    set(_lora_eigen_version "${Eigen3_VERSION}")
  elseif(DEFINED EIGEN3_VERSION_STRING)
    set(_lora_eigen_version "${EIGEN3_VERSION_STRING}")
  else()
    set(_lora_eigen_version "")
  endif()
  if(_lora_eigen_version AND _lora_eigen_version VERSION_LESS 3.4)
    message(FATAL_ERROR "lora needs Eigen >= 3.4, found ${_lora_eigen_version}")
  endif()
endmacro()
