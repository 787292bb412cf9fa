// POD parameter structs passed by value to the CUDA kernels.
// Kept free of torch headers so kernel files compile with nvcc alone. Strides are in elements
// and int64 so that views of tensors larger than 2^31 elements index correctly.
#pragma once

#include <cstdint>

namespace hypenet {

// One decode step of constant-decay linear attention (see csrc/lightning/lightning_attn_step.h).
// q, k [B, T, H, K]; v, o [B, T, H, V]; log_decay [H] fp32; state [N, H, K, V] fp32 with a
// unit stride along V and 16-byte aligned rows; state_indices [B] int32 or int64.
struct LightningStepParams {
  const void* __restrict__ q;
  const void* __restrict__ k;
  const void* __restrict__ v;
  const float* __restrict__ log_decay;
  float* __restrict__ state;
  const void* __restrict__ state_indices;
  void* __restrict__ o;

  int64_t q_batch_stride, q_time_stride, q_head_stride, q_dim_stride;
  int64_t k_batch_stride, k_time_stride, k_head_stride, k_dim_stride;
  int64_t v_batch_stride, v_time_stride, v_head_stride, v_dim_stride;
  int64_t o_batch_stride, o_time_stride, o_head_stride;  // o has a unit stride along V
  int64_t state_slot_stride, state_head_stride, state_row_stride;
  int64_t state_indices_stride;

  int batch;      // B
  int seqlen;     // T (new tokens per row)
  int heads;      // H
  int num_slots;  // N (rows of the state pool)

  float scale;
  bool indices_are_int64;
};

// An fp32 state tensor [rows, H, DA, DC] by its data pointer (null: absent) and strides.
struct StateView {
  float* data;
  int64_t stride_n, stride_h, stride_a, stride_c;
};

// The output stage of the chunked scan (csrc/lightning/lightning_chunk_scan.h). a, b [B, T, H, DA]; c, out
// [B, T, H, DC], contiguous; log_decay [H] fp32; every state fp32, given by strides, may be null.
// Equal-length batches (chunk_table null): start_state holds S at the start of every segment
// ([N * num_segs, H, DA, DC]) or of every sequence ([N, H, DA, DC]).
// Packed batches (B == 1): N sequences cut into 64-token chunks, laid end to end in chunk_table and cut into
// ranges by range_table (triton_ops/lightning/chunk.py builds both on the device); one block per (range,
// head). start_state [ranges + 1, H, DA, DC] holds S where each range begins (backwards: entry r + 1 where
// range r ends), read where that is inside a sequence; initial_state [N, H, DA, DC] is S where a sequence
// opens (null: zeros).
// Both: final_state [N, H, DA, DC] receives the state after each sequence's end (its start, backwards).
struct LightningScanParams {
  const void* __restrict__ a;
  const void* __restrict__ b;
  const void* __restrict__ c;
  void* __restrict__ out;
  const float* __restrict__ log_decay;
  StateView start_state;
  StateView final_state;
  StateView initial_state;  // packed batches only
  const int* __restrict__ chunk_table;  // [chunks, 4] (first token, rows, sequence, flags: 1 first, 2 last chunk)
  const int* __restrict__ range_table;  // [ranges + 1] first chunk of every range, then the chunk count

  int seqlen;    // T
  int heads;     // H
  int seg_len;   // tokens per segment, a multiple of the chunk (equal-length batches)
  int num_segs;  // segments per sequence (equal-length batches)
  int64_t num_programs;  // thread blocks: N * num_segs * H, or ranges * H

  float scale;            // of the intra-chunk scores
  float state_in_scale;   // of b^T c as it enters the state
  float state_out_scale;  // of a S as it enters the output
  bool start_per_segment;
};

}  // namespace hypenet
