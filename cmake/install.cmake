# cmake --install: the public headers, the library, the pagewire command, a
# CMake package (find_package(pagewire) -> pagewire::pagewire) and a
# pkg-config file (pkg-config --cflags --libs pagewire).
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

get_target_property(_pagewire_type pagewire TYPE)
if(_pagewire_type STREQUAL "SHARED_LIBRARY")
  # 0.x makes no ABI promise between minor versions: the soname carries both.
  set_target_properties(pagewire PROPERTIES VERSION ${PROJECT_VERSION}
                                            SOVERSION ${PROJECT_VERSION_MAJOR}.${PROJECT_VERSION_MINOR})
  set_target_properties(pagewire_cli PROPERTIES INSTALL_RPATH "$ORIGIN/../${CMAKE_INSTALL_LIBDIR}")
endif()

target_include_directories(pagewire INTERFACE $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
install(TARGETS pagewire EXPORT pagewireTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(TARGETS pagewire_cli RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(DIRECTORY include/pagewire DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} FILES_MATCHING PATTERN "*.h")

set(_cmake_dir ${CMAKE_INSTALL_LIBDIR}/cmake/pagewire)
if(_pagewire_type STREQUAL "STATIC_LIBRARY")
  set(_pagewire_static ON)
else()
  set(_pagewire_static OFF)
endif()
install(EXPORT pagewireTargets NAMESPACE pagewire:: DESTINATION ${_cmake_dir})
configure_package_config_file(cmake/pagewireConfig.cmake.in ${PROJECT_BINARY_DIR}/pagewireConfig.cmake
                              INSTALL_DESTINATION ${_cmake_dir})
# 0.x: another minor version is another interface.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/pagewireConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/pagewireConfig.cmake ${PROJECT_BINARY_DIR}/pagewireConfigVersion.cmake
        DESTINATION ${_cmake_dir})

# pkg-config. A static library needs its dependencies on every link, and
# `pkg-config --libs` without --static reads only Requires and Libs: they go
# there. A shared one has them recorded in itself: they go in the private
# fields, which only a --static link reads.
set(_pc_requires "spdlog liburing libcrypto")
if(PAGEWIRE_HAVE_RDMA)
  string(APPEND _pc_requires " libibverbs librdmacm")
endif()
if(NOT _pagewire_static)
  set(PAGEWIRE_PC_REQUIRES "")
  set(PAGEWIRE_PC_REQUIRES_PRIVATE "${_pc_requires}")
  set(PAGEWIRE_PC_LIBS "-lpagewire")
  set(PAGEWIRE_PC_LIBS_PRIVATE "-pthread")
else()
  set(PAGEWIRE_PC_REQUIRES "${_pc_requires}")
  set(PAGEWIRE_PC_REQUIRES_PRIVATE "")
  # A C program (pagewire/pagewire_c.h) links with gcc: the C++ runtime
  # the static library needs comes from this line too.
  set(PAGEWIRE_PC_LIBS "-lpagewire -pthread -lstdc++ -lm")
  set(PAGEWIRE_PC_LIBS_PRIVATE "")
endif()
if(PAGEWIRE_SANITIZE)
  string(APPEND PAGEWIRE_PC_LIBS " -fsanitize=address,undefined")
endif()
if(PAGEWIRE_HAVE_RDMA)
  set(PAGEWIRE_PC_RDMA 1)
else()
  set(PAGEWIRE_PC_RDMA 0)
endif()
# The prefix is known only when installing (cmake --install --prefix P):
# the file is made in two steps, the second one then.
set(PAGEWIRE_PC_PREFIX "@PAGEWIRE_PC_PREFIX@")
configure_file(cmake/pagewire.pc.in ${PROJECT_BINARY_DIR}/pagewire.pc.in @ONLY)
install(CODE "set(PAGEWIRE_PC_PREFIX \"\${CMAKE_INSTALL_PREFIX}\")
  configure_file(\"${PROJECT_BINARY_DIR}/pagewire.pc.in\" \"${PROJECT_BINARY_DIR}/pagewire.pc\" @ONLY)")
install(FILES ${PROJECT_BINARY_DIR}/pagewire.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
