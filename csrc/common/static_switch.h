// Compile-time switches that turn run-time dtype / head-dim values into template arguments.
// The caller validates the value first (the binding's TORCH_CHECKs): the last branch of each
// switch is taken for any value the earlier branches did not match.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace hypenet {

enum class ElemType { kBFloat16, kFloat16, kFloat32 };

}  // namespace hypenet

// Runs the lambda body with `elem_t` bound to the C++ type of ELEM (a hypenet::ElemType).
#define HYPENET_ELEM_TYPE_SWITCH(ELEM, ...)            \
  [&] {                                                \
    if ((ELEM) == ::hypenet::ElemType::kBFloat16) {    \
      using elem_t = __nv_bfloat16;                    \
      return __VA_ARGS__();                            \
    } else if ((ELEM) == ::hypenet::ElemType::kFloat16) { \
      using elem_t = __half;                           \
      return __VA_ARGS__();                            \
    } else {                                           \
      using elem_t = float;                            \
      return __VA_ARGS__();                            \
    }                                                  \
  }()

// Runs the lambda body with `constexpr int kHeadDim` equal to HEADDIM (64 or 128).
#define HYPENET_HEADDIM_SWITCH(HEADDIM, ...)           \
  [&] {                                                \
    if ((HEADDIM) == 64) {                             \
      constexpr static int kHeadDim = 64;              \
      return __VA_ARGS__();                            \
    } else {                                           \
      constexpr static int kHeadDim = 128;             \
      return __VA_ARGS__();                            \
    }                                                  \
  }()
