# A compile-fail case: SOURCE must fail to compile with CXX, and the compiler's first error
# must be the sentence MESSAGE (a regular expression), not a template error before it.
execute_process(COMMAND ${CXX} -std=c++17 -fsyntax-only -I${INCLUDE} -I${EIGEN} ${SOURCE}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0)
  message(FATAL_ERROR "${SOURCE} compiled; it must not")
endif()
string(REGEX MATCH "[^\n]*error:[^\n]*" first "${err}")
if(NOT first MATCHES "${MESSAGE}")
  message(FATAL_ERROR "the first error is not the expected sentence (${MESSAGE}):\n${first}\n\n${err}")
endif()
