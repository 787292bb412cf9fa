// Decode step of constant-decay linear attention (Lightning Attention), CUDA.
//
// For each row b (state slot s = state_indices[b]), head h and new token t = 0..T-1:
//   S = exp(log_decay[h]) * S + k_t^T v_t        (S = state[s, h], [K, V] fp32, updated in place)
//   o_t = scale * q_t S
// Row b whose slot is outside [0, N) leaves every state slot untouched and gets NaN outputs.
// Slots picked by two rows race (undefined result): callers pass distinct indices.
#pragma once

#include <cuda_runtime.h>

#include "../common/params.h"

namespace hypenet {

// Launches the step kernel for element type Elem (of q, k, v, o) and head dims K = V = kHeadDim on
// `stream`. One explicit instantiation per (Elem, kHeadDim) lives in its own .cu file.
template <typename Elem, int kHeadDim>
void run_lightning_attn_step(const LightningStepParams& params, cudaStream_t stream);

}  // namespace hypenet
