// Kernel of the Lightning Attention decode step; see lightning_attn_step.h for the math.
//
// The op is memory bound: per (row, head) it must read and write the fp32 state once
// (K * V * 8 bytes) while q, k, v, o are a few hundred bytes. So the design is about bandwidth:
//  - each block owns a [K, kBlockV] column slice of one (row, head) state, so B * H * V / kBlockV
//    blocks fill the GPU even at small batch (B=8, H=16, V=128: 512 blocks of 128 threads);
//  - every thread holds kRowsPerThread 16-byte vectors of the slice in registers, all loaded
//    before the first use (many independent loads in flight), coalesced: the kThreadsPerRow
//    threads of one row read 128 contiguous bytes;
//  - the T new tokens are applied to the register copy and the slice is stored once, right after
//    the last token's update;
//  - o_t = q_t S needs a sum over K, which is spread over the threads of the block: warp
//    shuffles between threads of the same columns, then one small shared-memory pass over warps.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/params.h"
#include "lightning_attn_step.h"

namespace hypenet {
namespace lightning_step {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Elem>
__device__ __forceinline__ Elem from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <int kHeadDim>
struct Config {
  static constexpr int kHeadDimK = kHeadDim;
  static constexpr int kHeadDimV = kHeadDim;
  static constexpr int kVec = 4;                              // floats per 16-byte access
  static constexpr int kBlockV = 32;                          // state columns per block
  static constexpr int kThreadsPerRow = kBlockV / kVec;       // 8 threads cover 128 bytes
  static constexpr int kNumThreads = 128;
  static constexpr int kNumWarps = kNumThreads / 32;
  static constexpr int kRowsPerPass = kNumThreads / kThreadsPerRow;  // 16
  static constexpr int kRowsPerThread = kHeadDimK / kRowsPerPass;    // 8 (K=128) or 4 (K=64)
  static constexpr int kSplitsV = kHeadDimV / kBlockV;               // blocks per (row, head)
  // Occupancy floor: 5 blocks of 128 threads per SM (96 registers, no spills; 6 blocks' 80 would
  // spill). 5 x 16 KB of state loads in flight per SM is still ~3x what Little's law asks at 3 TB/s.
  static constexpr int kMinBlocksPerSM = 5;

  static_assert(kHeadDimK % kRowsPerPass == 0, "K must be a multiple of the rows per pass");
  static_assert(kHeadDimV % kBlockV == 0, "V must be a multiple of the block's columns");
  static_assert(32 % kThreadsPerRow == 0, "a warp must hold whole rows");
};

__device__ __forceinline__ int64_t load_slot(const LightningStepParams& p, int row) {
  const int64_t offset = row * p.state_indices_stride;
  return p.indices_are_int64 ? static_cast<const int64_t*>(p.state_indices)[offset]
                             : static_cast<int64_t>(static_cast<const int32_t*>(p.state_indices)[offset]);
}

__device__ __forceinline__ float4 load_state(const float* ptr) { return *reinterpret_cast<const float4*>(ptr); }
__device__ __forceinline__ void store_state(float* ptr, float4 value) { *reinterpret_cast<float4*>(ptr) = value; }

// One new token as a thread needs it: k and q on its kRowsPerThread rows, v on its kVec columns.
template <int kHeadDim>
struct TokenSlice {
  float k[Config<kHeadDim>::kRowsPerThread];
  float q[Config<kHeadDim>::kRowsPerThread];
  float v[Config<kHeadDim>::kVec];
};

template <typename Elem, int kHeadDim>
__device__ __forceinline__ TokenSlice<kHeadDim> load_token(const LightningStepParams& p, const Elem* q,
                                                           const Elem* k, const Elem* v, int t, int first_k,
                                                           int col0) {
  using Cfg = Config<kHeadDim>;
  TokenSlice<kHeadDim> token;
  const Elem* q_t = q + t * p.q_time_stride;
  const Elem* k_t = k + t * p.k_time_stride;
  const Elem* v_t = v + t * p.v_time_stride;
#pragma unroll
  for (int i = 0; i < Cfg::kRowsPerThread; ++i) {
    const int64_t kk = first_k + i * Cfg::kRowsPerPass;
    token.k[i] = to_float(k_t[kk * p.k_dim_stride]);
    token.q[i] = to_float(q_t[kk * p.q_dim_stride]);
  }
#pragma unroll
  for (int j = 0; j < Cfg::kVec; ++j) token.v[j] = to_float(v_t[(col0 + j) * p.v_dim_stride]);
  return token;
}

// Grid: one block per (row b, head h, column slice), flattened into blockIdx.x with the slice
// fastest so that the blocks of one state run side by side. Block: Config::kNumThreads threads.
//
// Latency matters at small batch (one wave of blocks): the loads that do not depend on the
// row's slot (token 0, the decay) are issued before the slot arrives, the next token's loads
// before the current token's reduction, and the state is stored before the last reduction.
template <typename Elem, int kHeadDim>
__global__ void __launch_bounds__(Config<kHeadDim>::kNumThreads, Config<kHeadDim>::kMinBlocksPerSM)
    lightning_attn_step_fwd_kernel_decode(const __grid_constant__ LightningStepParams p) {
  using Cfg = Config<kHeadDim>;
  const int split = blockIdx.x % Cfg::kSplitsV;
  const int head = (blockIdx.x / Cfg::kSplitsV) % p.heads;
  const int row = blockIdx.x / (Cfg::kSplitsV * p.heads);

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int col_group = tid % Cfg::kThreadsPerRow;
  const int first_k = tid / Cfg::kThreadsPerRow;                 // rows first_k + i * kRowsPerPass
  const int block_col0 = split * Cfg::kBlockV;
  const int col0 = block_col0 + col_group * Cfg::kVec;           // this thread's 4 columns

  const Elem* q = static_cast<const Elem*>(p.q) + row * p.q_batch_stride + head * p.q_head_stride;
  const Elem* k = static_cast<const Elem*>(p.k) + row * p.k_batch_stride + head * p.k_head_stride;
  const Elem* v = static_cast<const Elem*>(p.v) + row * p.v_batch_stride + head * p.v_head_stride;
  Elem* o = static_cast<Elem*>(p.o) + row * p.o_batch_stride + head * p.o_head_stride;

  const int64_t slot = load_slot(p, row);
  const float log_decay = p.log_decay[head];
  TokenSlice<kHeadDim> token = load_token<Elem, kHeadDim>(p, q, k, v, 0, first_k, col0);
  if (slot < 0 || slot >= p.num_slots) {
    // A bad slot must neither fault nor touch another row's state: flag the row with NaN.
    for (int i = tid; i < p.seqlen * Cfg::kBlockV; i += Cfg::kNumThreads) {
      o[(i / Cfg::kBlockV) * p.o_time_stride + block_col0 + i % Cfg::kBlockV] = from_float<Elem>(nanf(""));
    }
    return;
  }

  float* state = p.state + slot * p.state_slot_stride + head * p.state_head_stride + col0;
  float4 s[Cfg::kRowsPerThread];
#pragma unroll
  for (int i = 0; i < Cfg::kRowsPerThread; ++i) {
    s[i] = load_state(state + (first_k + i * Cfg::kRowsPerPass) * p.state_row_stride);
  }
  const float decay = expf(log_decay);

  // Double-buffered by token parity so one barrier per token suffices: a warp can only rewrite
  // buffer t % 2 at token t + 2 after every thread has passed the barrier of token t + 1, that
  // is after the reads of token t.
  __shared__ float partial_o[2][Cfg::kNumWarps][Cfg::kBlockV];

  for (int t = 0; t < p.seqlen; ++t) {
    float o_cols[Cfg::kVec] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < Cfg::kRowsPerThread; ++i) {
      const float k_i = token.k[i];
      const float q_i = token.q[i];
      s[i].x = fmaf(decay, s[i].x, k_i * token.v[0]);
      s[i].y = fmaf(decay, s[i].y, k_i * token.v[1]);
      s[i].z = fmaf(decay, s[i].z, k_i * token.v[2]);
      s[i].w = fmaf(decay, s[i].w, k_i * token.v[3]);
      o_cols[0] = fmaf(q_i, s[i].x, o_cols[0]);
      o_cols[1] = fmaf(q_i, s[i].y, o_cols[1]);
      o_cols[2] = fmaf(q_i, s[i].z, o_cols[2]);
      o_cols[3] = fmaf(q_i, s[i].w, o_cols[3]);
    }
    if (t + 1 < p.seqlen) {
      token = load_token<Elem, kHeadDim>(p, q, k, v, t + 1, first_k, col0);
    } else {
#pragma unroll
      for (int i = 0; i < Cfg::kRowsPerThread; ++i) {
        store_state(state + (first_k + i * Cfg::kRowsPerPass) * p.state_row_stride, s[i]);
      }
    }

    // Lanes l, l ^ 8, l ^ 16, l ^ 24 of a warp hold the same columns on different rows.
#pragma unroll
    for (int offset = Cfg::kThreadsPerRow; offset < 32; offset *= 2) {
#pragma unroll
      for (int j = 0; j < Cfg::kVec; ++j) o_cols[j] += __shfl_xor_sync(0xffffffffu, o_cols[j], offset);
    }
    if (lane < Cfg::kThreadsPerRow) {
      *reinterpret_cast<float4*>(&partial_o[t % 2][warp][lane * Cfg::kVec]) =
          make_float4(o_cols[0], o_cols[1], o_cols[2], o_cols[3]);
    }
    __syncthreads();
    if (tid < Cfg::kBlockV) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < Cfg::kNumWarps; ++w) sum += partial_o[t % 2][w][tid];
      o[t * p.o_time_stride + block_col0 + tid] = from_float<Elem>(p.scale * sum);
    }
  }
}

}  // namespace lightning_step

template <typename Elem, int kHeadDim>
void run_lightning_attn_step(const LightningStepParams& params, cudaStream_t stream) {
  using Cfg = lightning_step::Config<kHeadDim>;
  const int64_t num_blocks = static_cast<int64_t>(params.batch) * params.heads * Cfg::kSplitsV;
  if (num_blocks == 0 || params.seqlen == 0) return;
  lightning_step::lightning_attn_step_fwd_kernel_decode<Elem, kHeadDim>
      <<<static_cast<unsigned>(num_blocks), Cfg::kNumThreads, 0, stream>>>(params);
}

}  // namespace hypenet
