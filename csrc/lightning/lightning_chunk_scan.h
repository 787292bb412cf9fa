// Output stage of chunked Lightning Attention (constant per-head decay), CUDA.
//
// The decayed causal scan of three operands (a, b, c) over a batch, per head h with
// gamma = exp(log_decay[h]) and a fp32 state S [D, D] (rows: a/b features, columns: c features):
//   out_t = scale * sum_{s <= t} gamma^(t-s) (a_t . b_s) c_s + state_out_scale * gamma^(t+1) a_t S_start
//   S    <- gamma^L S + state_in_scale * sum_s gamma^(L-1-s) b_s^T c_s           (per chunk of L tokens)
// or the same backwards in time (kReverse: s >= t, exponents mirrored). With (a, b, c) = (q, k, v) it is
// the forward of the op; the backward runs it three times (see triton_ops/lightning/chunk.py, whose
// segment stages compute the start states this stage reads). Equal-length batches: every sequence is
// cut into num_segs segments of seg_len tokens; each starts from start_state (or zeros) and the segment
// at the sequence's end (its start, backwards) writes final_state. Packed batches (params.chunk_table
// set): one block per range of the plan's chunk list (see LightningScanParams).
#pragma once

#include <cuda_runtime.h>

#include "../common/params.h"

namespace hypenet {

// Launches the scan for bf16 a, b, c, out with K = V = kHeadDim (64 or 128). One instantiation per
// (kHeadDim, kReverse) lives in its own .cu file.
template <int kHeadDim, bool kReverse>
void run_lightning_chunk_scan(const LightningScanParams& params, cudaStream_t stream);

}  // namespace hypenet
