# CPU ISA levels. The whole core assumes AVX2 + FMA + F16C (every x86-64 server of the last
# decade); kernels are additionally compiled for AVX-512, AVX512-BF16 and AMX (the levels of
# runtime/cpu_features.h) and the best one is chosen at run time. Never
# -march=native: the wheel must run on other machines than the one that built it.
if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
  set(FLASHPAGE_X86 ON)
  set(FLASHPAGE_BASELINE_FLAGS -mavx2 -mfma -mf16c)
  set(FLASHPAGE_ISA_LEVELS avx2 avx512 avx512_bf16 amx)
  set(FLASHPAGE_ISA_FLAGS_avx2 -mavx2 -mfma -mf16c)
  set(FLASHPAGE_ISA_FLAGS_avx512 -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512dq -mavx512vl
    -Wno-maybe-uninitialized)  # GCC 12 false positive in _mm512_reduce_add_ps
  # bf16 dot products (vdpbf16ps) and the int8 ones the quantized kernels use.
  set(FLASHPAGE_ISA_FLAGS_avx512_bf16 ${FLASHPAGE_ISA_FLAGS_avx512} -mavx512bf16 -mavx512vnni)
  # The tile unit (Sapphire Rapids and later); the vector code is the avx512_bf16 level's.
  set(FLASHPAGE_ISA_FLAGS_amx ${FLASHPAGE_ISA_FLAGS_avx512_bf16} -mamx-tile -mamx-bf16 -mamx-int8)
  # Builds of single kernels that a level picks at run time, not levels (compiled only where a
  # source names them): the int8 Linear for AVX-512 CPUs with VNNI but no BF16 (Ice Lake,
  # Cooper Lake's avx512 level), and the AVX2 one with AVX-VNNI's 256-bit VPDPBUSD for CPUs
  # without AVX-512 (Alder Lake and later clients, Sierra Forest).
  set(FLASHPAGE_ISA_VARIANTS avx512_vnni avx_vnni)
  set(FLASHPAGE_ISA_FLAGS_avx512_vnni ${FLASHPAGE_ISA_FLAGS_avx512} -mavx512vnni)
  set(FLASHPAGE_ISA_FLAGS_avx_vnni ${FLASHPAGE_ISA_FLAGS_avx2} -mavxvnni)
else()
  set(FLASHPAGE_X86 OFF)
  set(FLASHPAGE_BASELINE_FLAGS "")
  set(FLASHPAGE_ISA_LEVELS generic)
  set(FLASHPAGE_ISA_FLAGS_generic "")
  set(FLASHPAGE_ISA_VARIANTS "")
endif()

# Compiles each source once per ISA level into `target`, with FLASHPAGE_ISA set to the level's
# name so the source defines its entry points in namespace flashpage::cpu::<level>. With
# `LEVELS a b ...`, only for those of the build's levels (and variants, which only LEVELS names).
function(flashpage_add_isa_kernels target)
  cmake_parse_arguments(ARG "" "" "LEVELS" ${ARGN})
  foreach(level IN LISTS FLASHPAGE_ISA_LEVELS FLASHPAGE_ISA_VARIANTS)
    if(ARG_LEVELS AND NOT level IN_LIST ARG_LEVELS)
      continue()
    endif()
    if(NOT ARG_LEVELS AND level IN_LIST FLASHPAGE_ISA_VARIANTS)
      continue()
    endif()
    set(objlib ${target}_isa_${level})
    if(NOT TARGET ${objlib})
      add_library(${objlib} OBJECT)
      target_include_directories(${objlib} PRIVATE
        ${PROJECT_SOURCE_DIR}/cpp/include ${PROJECT_SOURCE_DIR}/cpp/src)
      target_compile_definitions(${objlib} PRIVATE FLASHPAGE_ISA=${level})
      target_compile_options(${objlib} PRIVATE -Wall -Wextra ${FLASHPAGE_ISA_FLAGS_${level}})
      target_sources(${target} PRIVATE $<TARGET_OBJECTS:${objlib}>)
      target_compile_definitions(${target} PRIVATE FLASHPAGE_HAS_ISA_${level}=1)
    endif()
    target_sources(${objlib} PRIVATE ${ARG_UNPARSED_ARGUMENTS})
  endforeach()
endfunction()
