# ctest driver: install kattn into a scratch prefix, build and run the consumer against it
# (header-only, and linked to kattn::kattn_compiled), then build and run the consumer with
# add_subdirectory. Arguments: -DKATTN_SOURCE_DIR=...
# -DWORK_DIR=... -DCXX=...
foreach(var KATTN_SOURCE_DIR WORK_DIR CXX)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run.cmake needs -D${var}=...")
  endif()
endforeach()
file(REMOVE_RECURSE "${WORK_DIR}")

function(step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}")
  endif()
endfunction()

set(common -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_BUILD_TYPE=Release)
step(${CMAKE_COMMAND} -S ${KATTN_SOURCE_DIR} -B ${WORK_DIR}/kattn-build ${common}
     -DKATTN_BUILD_TESTS=OFF -DKATTN_BUILD_BENCHMARKS=OFF -DKATTN_BUILD_EXAMPLES=OFF
     -DKATTN_INSTALL=ON -DCMAKE_INSTALL_PREFIX=${WORK_DIR}/prefix)
# Builds kattn_compiled (the only part of the package that compiles).
step(${CMAKE_COMMAND} --build ${WORK_DIR}/kattn-build -j 2)
step(${CMAKE_COMMAND} --install ${WORK_DIR}/kattn-build)
step(${CMAKE_COMMAND} -S ${KATTN_SOURCE_DIR}/tests/package -B ${WORK_DIR}/find ${common}
     -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
step(${CMAKE_COMMAND} --build ${WORK_DIR}/find)
step(${WORK_DIR}/find/consumer)
step(${WORK_DIR}/find/consumer_compiled)
step(${CMAKE_COMMAND} -S ${KATTN_SOURCE_DIR}/tests/package -B ${WORK_DIR}/subdir ${common}
     -DKATTN_CONSUME=add_subdirectory -DKATTN_SOURCE_DIR=${KATTN_SOURCE_DIR})
step(${CMAKE_COMMAND} --build ${WORK_DIR}/subdir)
step(${WORK_DIR}/subdir/consumer)
