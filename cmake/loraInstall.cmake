# Install rules: headers, the exported targets and a relocatable, arch-independent package config.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(LORA_CMAKE_DIR "${CMAKE_INSTALL_DATADIR}/cmake/lora")

install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/lora" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
set(_lora_targets lora)
if(TARGET lora_io)
  list(APPEND _lora_targets lora_io)
endif()
install(TARGETS ${_lora_targets} EXPORT loraTargets)
install(EXPORT loraTargets NAMESPACE lora:: DESTINATION "${LORA_CMAKE_DIR}")

configure_package_config_file("${PROJECT_SOURCE_DIR}/cmake/loraConfig.cmake.in"
                              "${PROJECT_BINARY_DIR}/loraConfig.cmake" INSTALL_DESTINATION "${LORA_CMAKE_DIR}")
write_basic_package_version_file("${PROJECT_BINARY_DIR}/loraConfigVersion.cmake" COMPATIBILITY SameMinorVersion
                                 ARCH_INDEPENDENT)
install(FILES "${PROJECT_BINARY_DIR}/loraConfig.cmake" "${PROJECT_BINARY_DIR}/loraConfigVersion.cmake"
              "${PROJECT_SOURCE_DIR}/cmake/loraFindEigen.cmake" DESTINATION "${LORA_CMAKE_DIR}")
