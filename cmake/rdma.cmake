# rdma-core (libibverbs, librdmacm) as PAGEWIRE_RDMA asks: ON needs it, OFF
# leaves it out, AUTO takes it when found. Sets PAGEWIRE_HAVE_RDMA, and the
# imported targets PkgConfig::IBVERBS and PkgConfig::RDMACM when it is on.
string(TOUPPER "${PAGEWIRE_RDMA}" _rdma)
if(NOT _rdma MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "PAGEWIRE_RDMA is '${PAGEWIRE_RDMA}'; it must be AUTO, ON or OFF")
endif()

set(PAGEWIRE_HAVE_RDMA OFF)
if(NOT _rdma STREQUAL "OFF")
  pkg_check_modules(IBVERBS QUIET IMPORTED_TARGET libibverbs)
  pkg_check_modules(RDMACM QUIET IMPORTED_TARGET librdmacm)
  if(IBVERBS_FOUND AND RDMACM_FOUND)
    set(PAGEWIRE_HAVE_RDMA ON)
  elseif(_rdma STREQUAL "ON")
    set(_missing "")
    if(NOT IBVERBS_FOUND)
      list(APPEND _missing libibverbs)
    endif()
    if(NOT RDMACM_FOUND)
      list(APPEND _missing librdmacm)
    endif()
    list(JOIN _missing " and " _missing)
    message(FATAL_ERROR "PAGEWIRE_RDMA=ON but pkg-config finds no ${_missing}. Install rdma-core's development "
                        "files (Debian: apt-get install libibverbs-dev librdmacm-dev), or configure with "
                        "-DPAGEWIRE_RDMA=OFF (or AUTO) for a TCP-only pagewire.")
  endif()
endif()

if(PAGEWIRE_HAVE_RDMA)
  message(STATUS "pagewire: RDMA on (libibverbs ${IBVERBS_VERSION}, librdmacm ${RDMACM_VERSION}; PAGEWIRE_RDMA=${_rdma})")
elseif(_rdma STREQUAL "OFF")
  message(STATUS "pagewire: RDMA off (PAGEWIRE_RDMA=OFF): TCP only, rdma:// and --rdma on refused")
else()
  message(STATUS "pagewire: RDMA off (PAGEWIRE_RDMA=AUTO found no libibverbs/librdmacm): TCP only, "
                 "rdma:// and --rdma on refused")
endif()
