// Kernel of the chunked scan's output stage; see lightning_chunk_scan.h for the math.
//
// One block of 4 warps per (segment, head, 64 state columns) walks its segment in chunks of 64
// tokens, keeping its [D, 64] slice of the fp32 state in registers (warp w owns rows
// w * D / 4 ...). Per chunk, with the a, b, c tiles in shared memory:
//   scores = a b^T (fp32), times the decayed causal mask, rounded to bf16;
//   acc    = diag(state weights) (a S_bf16) + scores c            (each warp: 16 output rows);
//   S      = gamma^L S + b^T (diag(decays) c)_bf16.
// The operands are rounded exactly where the Triton kernel rounds them, so both backends agree to
// within fp32 summation order. Tensor-core work is mma.sync m16n8k16 (bf16 in, fp32 accumulate) on
// fragments that ldmatrix reads from XOR-swizzled tiles (conflict-free: 8 rows of one 16-byte
// column land in 8 different bank groups). Tiles arrive by cp.async, two chunks in flight, rows
// past the sequence's end zero-filled. The causal structure skips work: output rows 16r.. only
// need scores against tokens up to 16r + 15 (from 16r on, backwards).
// On Hopper this takes ~1.4x the time of the Triton kernel, which issues wgmma (benches/NOTES.md says
// where the time goes); lightning_attn therefore runs it only when asked for (backend="cuda").
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/params.h"
#include "lightning_chunk_scan.h"

namespace hypenet {
namespace lightning_scan {

constexpr int kChunk = 64;     // tokens per chunk
constexpr int kBlockV = 64;    // state columns per block
constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
static_assert(kThreads == 2 * kChunk, "one thread per entry of the mask table");
constexpr float kLog2e = 1.4426950408889634f;

template <int kHeadDim>
struct Config {
  static constexpr int kTileAB = kChunk * kHeadDim;  // bf16 elements of an a or b tile
  static constexpr int kTileC = kChunk * kBlockV;
  static constexpr int kStage = 2 * kTileAB + kTileC;
  static constexpr int kTileState = kHeadDim * kBlockV;
  static constexpr int kSmemBytes = (2 * kStage + kTileState) * 2;
  static constexpr int kStateRows = kHeadDim / kWarps;  // state rows per warp
  static constexpr int kStateMTiles = kStateRows / 16;
  static constexpr int kFeatureSteps = kHeadDim / 16;  // k-steps over a/b features
  static constexpr int kSplitsV = kHeadDim / kBlockV;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dims 64 and 128");
};

// Offset (elements) of (row, col) in a bf16 tile of kRow-element rows whose 16-byte column groups
// are XOR-swizzled by row % 8.
template <int kRow>
__device__ __forceinline__ int swizzled(int row, int col) {
  return row * kRow + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

__device__ __forceinline__ uint32_t shared_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16 bytes global -> shared; valid == false writes zeros (nothing is read).
__device__ __forceinline__ void copy_async16(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void load_matrix_x4(uint32_t address, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

__device__ __forceinline__ void load_matrix_x4_transposed(uint32_t address, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// Copies the [kChunk, kCols] tile whose rows start token_stride elements apart at src into a swizzled
// shared tile; rows from `rows` on are zero-filled.
template <int kCols>
__device__ __forceinline__ void copy_tile_async(__nv_bfloat16* tile, const __nv_bfloat16* src, int64_t token_stride,
                                                int rows, int tid) {
  constexpr int kGroups = kCols / 8;  // 16-byte groups per row
#pragma unroll
  for (int r = 0; r < kChunk * kGroups / kThreads; ++r) {
    const int idx = tid + r * kThreads;
    const int row = idx / kGroups;
    const int col = (idx % kGroups) * 8;
    const bool valid = row < rows;
    copy_async16(shared_address(tile + swizzled<kCols>(row, col)), src + (valid ? row : 0) * token_stride + col, valid);
  }
}

// d += a b for one m16n8k16 tile (bf16 operands, fp32 accumulators).
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to bf16 in one register (lo in the low half, as the mma fragments expect).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t scale_bf16_pair(uint32_t pair, float lo, float hi) {
  const float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&pair));
  return pack_bf16(v.x * lo, v.y * hi);
}

// gamma^n for integer n >= 0, exactly 1 at n == 0.
__device__ __forceinline__ float decay_pow(float log2_decay, int n) {
  return n == 0 ? 1.f : exp2f(log2_decay * static_cast<float>(n));
}

template <int kHeadDim, bool kReverse>
__global__ void __launch_bounds__(kThreads, 2)
    lightning_attn_fwd_kernel_output(const __grid_constant__ LightningScanParams p) {
  using Cfg = Config<kHeadDim>;
  constexpr int kD = kHeadDim;
  const int64_t block = blockIdx.x;
  const int split = static_cast<int>(block % Cfg::kSplitsV);
  const int head = static_cast<int>((block / Cfg::kSplitsV) % p.heads);
  const int64_t segment = block / (Cfg::kSplitsV * p.heads);
  const int64_t sequence = segment / p.num_segs;
  const int seg_index = static_cast<int>(segment % p.num_segs);

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const float log2_decay = p.log_decay[head] * kLog2e;

  const __nv_bfloat16* a = static_cast<const __nv_bfloat16*>(p.a);
  const __nv_bfloat16* b = static_cast<const __nv_bfloat16*>(p.b);
  const __nv_bfloat16* c = static_cast<const __nv_bfloat16*>(p.c);
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
  const int64_t token_stride = static_cast<int64_t>(p.heads) * kD;  // a, b, c, out rows
  const int64_t first_token = sequence * p.seqlen;
  const int col0 = split * kBlockV;

  extern __shared__ __align__(128) unsigned char smem_bytes[];
  __nv_bfloat16* smem = reinterpret_cast<__nv_bfloat16*>(smem_bytes);
  __nv_bfloat16* state_tile = smem + 2 * Cfg::kStage;  // the bf16 state of the a S term

  const int seg_start = seg_index * p.seg_len;
  const int seg_tokens = min(p.seg_len, p.seqlen - seg_start);
  const int n_chunks = seg_tokens > 0 ? (seg_tokens + kChunk - 1) / kChunk : 0;
  auto chunk_start = [&](int i) { return seg_start + (kReverse ? n_chunks - 1 - i : i) * kChunk; };

  auto load_chunk = [&](int i, int stage) {
    const int t0 = chunk_start(i);
    const int rows = min(kChunk, p.seqlen - t0);
    const int64_t first = (first_token + t0) * token_stride + head * kD;
    __nv_bfloat16* tile_a = smem + stage * Cfg::kStage;
    copy_tile_async<kD>(tile_a, a + first, token_stride, rows, tid);
    copy_tile_async<kD>(tile_a + Cfg::kTileAB, b + first, token_stride, rows, tid);
    copy_tile_async<kBlockV>(tile_a + 2 * Cfg::kTileAB, c + first + col0, token_stride, rows, tid);
  };

  if (n_chunks > 0) load_chunk(0, 0);
  copy_async_commit();

  // The output rows of warp w are 16 * row_block ..: under the causal mask block r needs scores
  // against r + 1 of the 4 token blocks, so the warps' work differs. Warp w of every resident block runs
  // on the same scheduler (w % 4); the two blocks an SM holds are most often blockIdx i and
  // i + #SMs, so alternate runs of #SMs blocks take the row blocks in opposite orders and a scheduler gets a heavy
  // and a light warp.
  const int row_block = (blockIdx.x / p.sm_count) % 2 ? kWarps - 1 - warp : warp;

  // Fragment coordinates of a lane. Scores and outputs: rows 16 * row_block + lane / 4 (+ 8), columns
  // 8 * n + 2 * (lane % 4) (+ 1) of n-tile n. State: rows warp * kStateRows + 16 * m + lane / 4 (+ 8),
  // the same columns.
  auto out_row = [&](int ln, int e) { return 16 * row_block + ln / 4 + (e >= 2 ? 8 : 0); };
  auto state_row = [&](int ln, int m, int e) { return warp * Cfg::kStateRows + 16 * m + ln / 4 + (e >= 2 ? 8 : 0); };
  auto frag_col = [&](int ln, int n, int e) { return 8 * n + 2 * (ln % 4) + (e & 1); };

  // Every decay factor a chunk needs is gamma^n for n in [0, 64]: tables built once per block replace
  // the exponentials (and their branches) in the loop. The decayed causal mask scale * gamma^(t - s)
  // depends on t - s only: entry t - s + 64, zero for the masked side.
  __shared__ float powers[kChunk + 1];
  __shared__ float mask_by_distance[2 * kChunk];
  if (tid <= kChunk) powers[tid] = decay_pow(log2_decay, tid);
  const int dist = tid - kChunk;
  mask_by_distance[tid] = dist >= 0 ? p.scale * decay_pow(log2_decay, dist) : 0.f;
  auto masked = [&](float score, int ln, int n, int e) {
    const int d = kReverse ? frag_col(ln, n, e) - out_row(ln, e) : out_row(ln, e) - frag_col(ln, n, e);
    return score * mask_by_distance[d + kChunk];
  };

  // Calls f(element, offset) for every state element this lane holds, offset = its place in a
  // [D, D] state of strides (stride_a, stride_c) from column col0 on.
  float state[Cfg::kStateMTiles][8][4];
  auto for_each_state_element = [&](int64_t stride_a, int64_t stride_c, auto&& f) {
#pragma unroll
    for (int m = 0; m < Cfg::kStateMTiles; ++m) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          f(state[m][n][e], state_row(lane, m, e) * stride_a + (col0 + frag_col(lane, n, e)) * stride_c);
        }
      }
    }
  };
  if (p.start_state != nullptr) {
    const float* start = p.start_state + (p.start_per_segment ? segment : sequence) * p.start_stride_n +
                         head * p.start_stride_h;
    for_each_state_element(p.start_stride_a, p.start_stride_c, [&](float& x, int64_t offset) { x = start[offset]; });
  } else {
    for_each_state_element(0, 0, [](float& x, int64_t) { x = 0.f; });
  }

  for (int i = 0; i < n_chunks; ++i) {
    const int stage = i & 1;
    // The ln's fragment addresses are recomputed in every chunk (a few integer ops): hoisted out of
    // the loop they would hold dozens of registers that the state needs.
    int ln = lane;
    asm volatile("" : "+r"(ln));
    // Every warp is past the previous chunk: its stage buffers and the bf16 state are free.
    __syncthreads();
#pragma unroll
    for (int m = 0; m < Cfg::kStateMTiles; ++m) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        const int col = frag_col(ln, n, 0);
        *reinterpret_cast<uint32_t*>(state_tile + swizzled<kBlockV>(state_row(ln, m, 0), col)) =
            pack_bf16(state[m][n][0], state[m][n][1]);
        *reinterpret_cast<uint32_t*>(state_tile + swizzled<kBlockV>(state_row(ln, m, 2), col)) =
            pack_bf16(state[m][n][2], state[m][n][3]);
      }
    }
    if (i + 1 < n_chunks) load_chunk(i + 1, stage ^ 1);
    copy_async_commit();
    copy_async_wait<1>();
    __syncthreads();

    const int t0 = chunk_start(i);
    const int rows = min(kChunk, p.seqlen - t0);
    const __nv_bfloat16* tile_a = smem + stage * Cfg::kStage;
    const __nv_bfloat16* tile_b = tile_a + Cfg::kTileAB;
    const __nv_bfloat16* tile_c = tile_b + Cfg::kTileAB;

    // scores = a b^T and acc = a S (the state at the chunk's start, bf16), sharing the a fragments: two
    // independent accumulator chains, each step's fragment loads issued before its mma's.
    float scores[8][4];
    float acc[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        scores[n][e] = 0.f;
        acc[n][e] = 0.f;
      }
    }
#pragma unroll 1
    for (int ks = 0; ks < Cfg::kFeatureSteps; ++ks) {
      uint32_t a_frag[4];
      uint32_t b_frag[4][4];
      uint32_t s_frag[4][4];
      load_matrix_x4(shared_address(tile_a + swizzled<kD>(16 * row_block + (ln & 7) + ((ln >> 3) & 1) * 8,
                                                          16 * ks + (ln >> 4) * 8)),
                     a_frag);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (kReverse ? j >= row_block : j <= row_block) {
          load_matrix_x4(shared_address(tile_b + swizzled<kD>(16 * j + (ln & 7) + (ln >> 4) * 8,
                                                              16 * ks + ((ln >> 3) & 1) * 8)),
                         b_frag[j]);
        }
        load_matrix_x4_transposed(
            shared_address(state_tile + swizzled<kBlockV>(16 * ks + (ln & 7) + ((ln >> 3) & 1) * 8,
                                                          16 * j + (ln >> 4) * 8)),
            s_frag[j]);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (kReverse ? j >= row_block : j <= row_block) {
          mma_bf16(scores[2 * j], a_frag, b_frag[j][0], b_frag[j][1]);
          mma_bf16(scores[2 * j + 1], a_frag, b_frag[j][2], b_frag[j][3]);
        }
        mma_bf16(acc[2 * j], a_frag, s_frag[j][0], s_frag[j][1]);
        mma_bf16(acc[2 * j + 1], a_frag, s_frag[j][2], s_frag[j][3]);
      }
    }
    // Masked scores as the bf16 A operand of scores c: n-tiles 2k and 2k + 1 form token step k.
    uint32_t p_frag[4][4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int n = 2 * k + half;
        p_frag[k][2 * half] = pack_bf16(masked(scores[n][0], ln, n, 0), masked(scores[n][1], ln, n, 1));
        p_frag[k][2 * half + 1] = pack_bf16(masked(scores[n][2], ln, n, 2), masked(scores[n][3], ln, n, 3));
      }
    }
    float state_weight[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = out_row(ln, 2 * half);
      const int steps = kReverse ? rows - 1 - row : row + 1;
      state_weight[half] = row < rows ? p.state_out_scale * powers[max(steps, 0)] : 0.f;
    }
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      acc[n][0] *= state_weight[0];
      acc[n][1] *= state_weight[0];
      acc[n][2] *= state_weight[1];
      acc[n][3] *= state_weight[1];
    }

    const float chunk_decay = powers[rows];
#pragma unroll
    for (int m = 0; m < Cfg::kStateMTiles; ++m) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) state[m][n][e] *= chunk_decay;
      }
    }

    // acc += scores c and S += b^T (decays c), sharing the c fragments (token step k).
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float token_weight[4];  // tokens 16k + 2 * (lane % 4) + {0, 1, 8, 9}
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int token = 16 * k + 2 * (ln % 4) + (e & 1) + (e >> 1) * 8;
        const int steps = kReverse ? token + 1 : rows - 1 - token;
        token_weight[e] = token < rows ? p.state_in_scale * powers[max(steps, 0)] : 0.f;
      }
      uint32_t bt_frag[Cfg::kStateMTiles][4];
#pragma unroll
      for (int m = 0; m < Cfg::kStateMTiles; ++m) {
        load_matrix_x4_transposed(
            shared_address(tile_b + swizzled<kD>(16 * k + (ln & 7) + (ln >> 4) * 8,
                                                 warp * Cfg::kStateRows + 16 * m + ((ln >> 3) & 1) * 8)),
            bt_frag[m]);
      }
      uint32_t c_frag[4][4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        load_matrix_x4_transposed(
            shared_address(tile_c + swizzled<kBlockV>(16 * k + (ln & 7) + ((ln >> 3) & 1) * 8,
                                                      16 * j + (ln >> 4) * 8)),
            c_frag[j]);
      }
      if (kReverse ? k >= row_block : k <= row_block) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          mma_bf16(acc[2 * j], p_frag[k], c_frag[j][0], c_frag[j][1]);
          mma_bf16(acc[2 * j + 1], p_frag[k], c_frag[j][2], c_frag[j][3]);
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t d0 = scale_bf16_pair(c_frag[j][0], token_weight[0], token_weight[1]);
        const uint32_t d1 = scale_bf16_pair(c_frag[j][1], token_weight[2], token_weight[3]);
        const uint32_t d2 = scale_bf16_pair(c_frag[j][2], token_weight[0], token_weight[1]);
        const uint32_t d3 = scale_bf16_pair(c_frag[j][3], token_weight[2], token_weight[3]);
#pragma unroll
        for (int m = 0; m < Cfg::kStateMTiles; ++m) {
          mma_bf16(state[m][2 * j], bt_frag[m], d0, d1);
          mma_bf16(state[m][2 * j + 1], bt_frag[m], d2, d3);
        }
      }
    }

#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = out_row(ln, 2 * half);
      if (row < rows) {
        __nv_bfloat16* dst = out + (first_token + t0 + row) * token_stride + head * kD + col0;
#pragma unroll
        for (int n = 0; n < 8; ++n) {
          *reinterpret_cast<uint32_t*>(dst + frag_col(ln, n, 0)) = pack_bf16(acc[n][2 * half], acc[n][2 * half + 1]);
        }
      }
    }
  }
  copy_async_wait<0>();

  const bool at_end = kReverse ? seg_index == 0 : seg_index == p.num_segs - 1;
  if (p.final_state != nullptr && at_end) {
    float* final_state = p.final_state + sequence * p.final_stride_n + head * p.final_stride_h;
    for_each_state_element(p.final_stride_a, p.final_stride_c,
                           [&](float& x, int64_t offset) { final_state[offset] = x; });
  }
}

}  // namespace lightning_scan

template <int kHeadDim, bool kReverse>
void run_lightning_chunk_scan(const LightningScanParams& params, cudaStream_t stream) {
  if (params.num_programs == 0) return;
  constexpr int kSmemBytes = lightning_scan::Config<kHeadDim>::kSmemBytes;
  auto kernel = lightning_scan::lightning_attn_fwd_kernel_output<kHeadDim, kReverse>;
  // More than 48 KB of dynamic shared memory needs an explicit opt-in per kernel.
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  kernel<<<static_cast<unsigned>(params.num_programs), lightning_scan::kThreads, kSmemBytes, stream>>>(params);
}

}  // namespace hypenet
