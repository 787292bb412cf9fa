// Kernel of the chunked scan's output stage; see lightning_chunk_scan.h for the math.
//
// One block per (segment, head) walks its segment in chunks of 64 tokens (packed batches: one block per
// (range, head) walks the range's chunks of the chunk table) with one warpgroup (4 warps) per 64 state
// columns; a warpgroup keeps its [D, 64] slice of the fp32 state in registers as wgmma accumulators.
// The warpgroups share the a, b, c tiles in shared memory (each chunk's a and b are read from memory
// once per head). Per chunk and warpgroup:
//   scores = a b^T (fp32), times the decayed causal mask, rounded to bf16;
//   acc    = diag(state weights) (a S_bf16) + scores c;
//   S      = gamma^L S + b^T (diag(decays) c)_bf16.
// The operands are rounded exactly where the Triton kernel rounds them, so both backends agree to
// within fp32 summation order. Tensor-core work is Hopper's asynchronous warpgroup MMA (wgmma
// m64n64k16, bf16 in, fp32 accumulate): 28 instructions per chunk at D = 128, operands read from
// shared tiles in the 128-byte-swizzled layout wgmma expects, except the masked scores, which stay in
// registers. The state update needs nothing from the scores, so it is issued with them and a S; while
// scores c runs, the CUDA cores write what the next chunk's MMAs read (its bf16 state and decayed c).
// Tiles arrive by cp.async up to two chunks ahead (three stages), rows past the sequence's end
// zero-filled; output rows go out through shared memory as whole 16-byte groups.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/params.h"
#include "lightning_chunk_scan.h"

namespace hypenet {
namespace lightning_scan {

constexpr int kChunk = 64;     // tokens per chunk: the M of one wgmma
constexpr int kBlockV = 64;    // state columns per warpgroup: the N of every wgmma here
constexpr int kWarpgroupThreads = 128;
static_assert(kWarpgroupThreads == 2 * kChunk, "one thread of a warpgroup per entry of the mask table");
constexpr int kSwizzleRowBytes = 128;              // a row of a 64-column bf16 block
constexpr int kBlockBytes = kChunk * kSwizzleRowBytes;  // one [64, 64] bf16 block: 8 KB
constexpr int kKStepBytesMN = 16 * kSwizzleRowBytes;    // 16 rows of an operand whose K runs down the rows
constexpr int kStages = 3;  // chunks whose tiles are in shared memory or on their way
// Packed batches: chunk-table entries travel kEntriesAhead chunks ahead of the walk (two more than the
// tiles, so that an entry has landed and passed a barrier before its chunk's tiles are requested) into a
// ring of kEntryRing 16-byte slots.
constexpr int kEntriesAhead = (kStages - 1) + 2;
constexpr int kEntryRing = 8;
static_assert(kEntryRing > kEntriesAhead && (kEntryRing & (kEntryRing - 1)) == 0, "a power-of-two ring");
constexpr float kLog2e = 1.4426950408889634f;

template <int kHeadDim>
struct Config {
  static constexpr int kBlocksD = kHeadDim / 64;   // 64-column blocks of an a or b tile
  static constexpr int kStateMTiles = kHeadDim / 64;  // 64-row wgmma tiles of the state
  static constexpr int kFeatureSteps = kHeadDim / 16;  // k-steps over a/b features
  static constexpr int kWarpgroups = kHeadDim / kBlockV;
  static constexpr int kThreads = kWarpgroups * kWarpgroupThreads;
  // Shared memory, in bytes from a 1024-aligned base (the swizzle repeats every 1024 bytes): kStages
  // stages of (a, b, c) [64, D] tiles, the decayed c [64, D], one bf16 state [D, 64] per warpgroup,
  // the output rows on their way to global memory ([16, 64] bf16 per warp), the decay tables, then the
  // ring of chunk-table entries (packed batches).
  static constexpr int kTile = kBlocksD * kBlockBytes;
  static constexpr int kStage = 3 * kTile;
  static constexpr int kDecayedC = kStages * kStage;
  static constexpr int kStateTiles = kDecayedC + kTile;
  static constexpr int kStateTileBytes = kHeadDim * kSwizzleRowBytes;
  static constexpr int kOutRows = kStateTiles + kWarpgroups * kStateTileBytes;
  static constexpr int kOutRowsBytes = 16 * kSwizzleRowBytes;  // per warp
  static constexpr int kTables = kOutRows + kThreads / 32 * kOutRowsBytes;
  static constexpr int kEntries = kTables + ((kChunk + 1 + 2 * kChunk) * 4 + 15) / 16 * 16;
  static constexpr int kSmemBytes = kEntries + kEntryRing * 16 + 1024;  // + alignment slack
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dims 64 and 128");
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than one Hopper block may have");
};

// Offset (elements) of (row, col) in a bf16 tile of kRows rows stored as blocks of 64 columns, each a
// run of 128-byte rows whose 16-byte groups are XOR-swizzled by row % 8: wgmma's 128-byte swizzle
// (the blocks start 1024-byte aligned).
template <int kRows>
__device__ __forceinline__ int tile_offset(int row, int col) {
  return (col >> 6) * (kRows * 64) + row * 64 + ((((col >> 3) & 7) ^ (row & 7)) << 3) + (col & 7);
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

// Copies the [kChunk, kCols] tile whose rows start token_stride elements apart at src into a shared
// tile laid out by tile_offset; rows from `rows` on are zero-filled.
template <int kCols, int kThreads>
__device__ __forceinline__ void copy_tile_async(__nv_bfloat16* tile, const __nv_bfloat16* src, int64_t token_stride,
                                                int rows, int tid) {
  constexpr int kGroups = kCols / 8;  // 16-byte groups per row
#pragma unroll
  for (int r = 0; r < kChunk * kGroups / kThreads; ++r) {
    const int idx = tid + r * kThreads;
    const int row = idx / kGroups;
    const int col = (idx % kGroups) * 8;
    const bool valid = row < rows;
    copy_async16(shared_address(tile + tile_offset<kChunk>(row, col)), src + (valid ? row : 0) * token_stride + col,
                 valid);
  }
}

// Shared-memory writes of this thread (st.shared, cp.async) become visible to wgmma's reads.
__device__ __forceinline__ void fence_shared_for_wgmma() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// wgmma descriptor of a 128-byte-swizzled operand at ptr: 8-row groups 1024 bytes apart (the
// leading-dimension offset is unused by this layout).
__device__ __forceinline__ uint64_t operand_descriptor(const void* ptr) {
  const uint64_t address = shared_address(ptr);
  return ((address & 0x3FFFF) >> 4) | (1ull << 16) | (uint64_t{1024 >> 4} << 32) | (1ull << 62);
}

// The descriptor moved by `bytes` (a multiple of 16).
__device__ __forceinline__ uint64_t advanced(uint64_t descriptor, int bytes) { return descriptor + (bytes >> 4); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving accesses of accumulator registers across the asynchronous MMAs.
template <int kN>
__device__ __forceinline__ void fence_registers(float (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define HYPENET_WGMMA_ACCUMULATORS \
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])

// d (+)= A B, m64n64k16, A and B from shared memory. kTransposeA / kTransposeB: 0 when the operand's
// K runs along its 128-byte rows, 1 when K runs down the rows.
template <int kTransposeA, int kTransposeB>
__device__ __forceinline__ void wgmma_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
      : HYPENET_WGMMA_ACCUMULATORS
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)), "n"(kTransposeA), "n"(kTransposeB));
}

// d += A B, m64n64k16, A (bf16 pairs in the accumulator layout of a 64-row tile) from registers.
template <int kTransposeB>
__device__ __forceinline__ void wgmma_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
      : HYPENET_WGMMA_ACCUMULATORS
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1), "n"(kTransposeB));
}

#undef HYPENET_WGMMA_ACCUMULATORS

// Two floats rounded to bf16 in one register (lo in the low half, as the MMA operands expect).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t scale_bf16_pair(uint32_t pair, float scale) {
  const float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&pair));
  return pack_bf16(v.x * scale, v.y * scale);
}

// gamma^n for integer n >= 0, exactly 1 at n == 0.
__device__ __forceinline__ float decay_pow(float log2_decay, int n) {
  return n == 0 ? 1.f : exp2f(log2_decay * static_cast<float>(n));
}

// Two 4-warp blocks per SM at D = 64; one 8-warp block at D = 128 (the register file holds 8 warps).
// kPacked: the block walks one range of a packed batch's chunk list (see LightningScanParams).
template <int kHeadDim, bool kReverse, bool kPacked>
__global__ void __launch_bounds__(Config<kHeadDim>::kThreads, 2 / Config<kHeadDim>::kWarpgroups)
    lightning_attn_fwd_kernel_output(const __grid_constant__ LightningScanParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = Config<kHeadDim>;
  constexpr int kD = kHeadDim;
  // Chunk-table flags of a sequence's first and last chunk; the walk opens a sequence at its first chunk
  // (its last, backwards) and closes it at the other end.
  constexpr int kOpensFlag = kReverse ? 2 : 1;
  constexpr int kClosesFlag = kReverse ? 1 : 2;
  const int64_t block = blockIdx.x;
  const int head = static_cast<int>(block % p.heads);
  const int64_t work = block / p.heads;  // the segment, or the range of a packed batch
  const int64_t sequence = kPacked ? 0 : work / p.num_segs;
  const int seg_index = kPacked ? 0 : static_cast<int>(work % p.num_segs);

  const int tid = threadIdx.x;
  const int warpgroup = tid / kWarpgroupThreads;
  const int wg_tid = tid % kWarpgroupThreads;
  const int lane = tid % 32;
  const int warp = wg_tid / 32;  // within the warpgroup
  const float log2_decay = p.log_decay[head] * kLog2e;

  const __nv_bfloat16* a = static_cast<const __nv_bfloat16*>(p.a);
  const __nv_bfloat16* b = static_cast<const __nv_bfloat16*>(p.b);
  const __nv_bfloat16* c = static_cast<const __nv_bfloat16*>(p.c);
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
  const int64_t token_stride = static_cast<int64_t>(p.heads) * kD;  // a, b, c, out rows
  const int col0 = warpgroup * kBlockV;  // this warpgroup's state columns

  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - shared_address(smem_raw) % 1024) % 1024);
  auto stage_tile = [&](int stage, int which) {  // which: 0 = a, 1 = b, 2 = c
    return reinterpret_cast<__nv_bfloat16*>(smem + stage * Cfg::kStage + which * Cfg::kTile);
  };
  // The warpgroup's 64 columns of the decayed c, and its bf16 S for a S.
  __nv_bfloat16* decayed_c = reinterpret_cast<__nv_bfloat16*>(smem + Cfg::kDecayedC + warpgroup * kBlockBytes);
  __nv_bfloat16* state_tile =
      reinterpret_cast<__nv_bfloat16*>(smem + Cfg::kStateTiles + warpgroup * Cfg::kStateTileBytes);
  __nv_bfloat16* out_rows = reinterpret_cast<__nv_bfloat16*>(smem + Cfg::kOutRows + tid / 32 * Cfg::kOutRowsBytes);
  float* powers = reinterpret_cast<float*>(smem + Cfg::kTables);
  float* mask_by_distance = powers + kChunk + 1;
  int4* entries = reinterpret_cast<int4*>(smem + Cfg::kEntries);

  // The chunks this block walks: equal-length batches the chunks of one segment; packed batches the
  // chunk-table entries range_table[range] .. range_table[range + 1] - 1 (backwards: last to first).
  const int seg_start = seg_index * p.seg_len;
  int n_chunks;
  int first_entry = 0;
  if constexpr (kPacked) {
    const int begin = p.range_table[work];
    const int end = p.range_table[work + 1];
    n_chunks = max(end - begin, 0);
    first_entry = kReverse ? end - 1 : begin;
  } else {
    const int seg_tokens = min(p.seg_len, p.seqlen - seg_start);
    n_chunks = seg_tokens > 0 ? (seg_tokens + kChunk - 1) / kChunk : 0;
  }
  auto entry_address = [&](int i) {
    return p.chunk_table + 4 * static_cast<int64_t>(kReverse ? first_entry - i : first_entry + i);
  };
  auto entry = [&](int i) -> const int4& { return entries[i & (kEntryRing - 1)]; };
  auto chunk_start = [&](int i) { return seg_start + (kReverse ? n_chunks - 1 - i : i) * kChunk; };
  // Chunk i's first token (a row of a, b, c and out) and its rows (64 but at a sequence's end).
  auto chunk_token = [&](int i) -> int64_t {
    if constexpr (kPacked) return entry(i).x;
    return sequence * p.seqlen + chunk_start(i);
  };
  auto chunk_rows = [&](int i) {
    if constexpr (kPacked) return entry(i).y;
    return min(kChunk, p.seqlen - chunk_start(i));
  };
  auto chunk_sequence = [&](int i) -> int64_t {
    if constexpr (kPacked) return entry(i).z;
    return sequence;
  };

  auto load_chunk = [&](int i, int stage) {
    const int rows = chunk_rows(i);
    // A packed empty sequence's chunk has no rows (and its first token may be one past the batch's end).
    const int64_t first = (rows > 0 ? chunk_token(i) * token_stride : 0) + head * kD;
    copy_tile_async<kD, Cfg::kThreads>(stage_tile(stage, 0), a + first, token_stride, rows, tid);
    copy_tile_async<kD, Cfg::kThreads>(stage_tile(stage, 1), b + first, token_stride, rows, tid);
    copy_tile_async<kD, Cfg::kThreads>(stage_tile(stage, 2), c + first, token_stride, rows, tid);
  };

  if constexpr (kPacked) {
    if (tid < min(n_chunks, kEntriesAhead)) entries[tid] = *reinterpret_cast<const int4*>(entry_address(tid));
    __syncthreads();
  }
  if (n_chunks > 0) load_chunk(0, 0);
  copy_async_commit();

  // Accumulator layout of a 64-row wgmma tile: element 4n + e of a thread is row 16 * warp + lane / 4
  // (+ 8 for e >= 2), column 8n + 2 * (lane % 4) (+ 1 for odd e).
  auto acc_row = [&](int e) { return 16 * warp + lane / 4 + (e >= 2 ? 8 : 0); };
  auto acc_col = [&](int n, int e) { return 8 * n + 2 * (lane % 4) + (e & 1); };

  // Every decay factor a chunk needs is gamma^n for n in [0, 64]: tables built once per block replace
  // the exponentials (and their branches) in the loop. The decayed causal mask scale * gamma^(t - s)
  // depends on t - s only: entry t - s + 64, zero for the masked side.
  if (tid <= kChunk) powers[tid] = decay_pow(log2_decay, tid);
  if (tid < 2 * kChunk) {
    const int dist = tid - kChunk;
    mask_by_distance[tid] = dist >= 0 ? p.scale * decay_pow(log2_decay, dist) : 0.f;
  }
  auto masked = [&](float score, int n, int e) {
    const int d = kReverse ? acc_col(n, e) - acc_row(e) : acc_row(e) - acc_col(n, e);
    return score * mask_by_distance[d + kChunk];
  };

  // Calls f(element, offset) for every state element this thread holds (M-tile m covers state rows
  // 64m ..), offset = its place in a [D, D] state of strides (stride_a, stride_c) from column col0 on.
  float state[Cfg::kStateMTiles][32];
  auto for_each_state_element = [&](int64_t stride_a, int64_t stride_c, auto&& f) {
#pragma unroll
    for (int m = 0; m < Cfg::kStateMTiles; ++m) {
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        f(state[m][i], (64 * m + acc_row(i % 4)) * stride_a + (col0 + acc_col(i / 4, i % 4)) * stride_c);
      }
    }
  };
  auto load_state = [&](const StateView& from, int64_t slot) {
    const float* base = from.data + slot * from.stride_n + head * from.stride_h;
    for_each_state_element(from.stride_a, from.stride_c, [&](float& x, int64_t offset) { x = base[offset]; });
  };
  auto store_final_state = [&](int64_t seq) {
    float* base = p.final_state.data + seq * p.final_state.stride_n + head * p.final_state.stride_h;
    for_each_state_element(p.final_state.stride_a, p.final_state.stride_c,
                           [&](float& x, int64_t offset) { base[offset] = x; });
  };
  auto zero_state = [&] { for_each_state_element(0, 0, [](float& x, int64_t) { x = 0.f; }); };
  // Packed batches: the state where a sequence opens.
  auto open_sequence = [&](int64_t seq) {
    if (p.initial_state.data != nullptr) {
      load_state(p.initial_state, seq);
    } else {
      zero_state();
    }
  };
  const bool starts_from_state = kPacked ? n_chunks > 0 && (entry(0).w & kOpensFlag) == 0 : true;
  if (kPacked && n_chunks > 0 && !starts_from_state) {
    open_sequence(chunk_sequence(0));
  } else if (p.start_state.data != nullptr && starts_from_state) {
    // Range r's start state is entry r forwards (where it begins) and r + 1 backwards (where it ends).
    load_state(p.start_state, kPacked ? work + (kReverse ? 1 : 0) : (p.start_per_segment ? work : sequence));
  } else {
    zero_state();
  }

  const uint64_t state_desc = operand_descriptor(state_tile);
  const uint64_t decayed_c_desc = operand_descriptor(decayed_c);

  // What chunk i's MMAs read besides its tiles, written once its c tile is in (every thread's copies)
  // and the MMAs of chunk i - 1 that read the same buffers are complete: the bf16 state at the chunk's
  // start for a S, then the state's own decay over the chunk, and the decayed c of the state update,
  // state_in_scale * gamma^(steps) c_s rounded to bf16 (16-byte groups; the swizzled offset is the
  // same in both tiles).
  auto prepare_chunk = [&](int i) {
    const int rows = chunk_rows(i);
#pragma unroll
    for (int m = 0; m < Cfg::kStateMTiles; ++m) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        const int col = acc_col(n, 0);
        *reinterpret_cast<uint32_t*>(state_tile + tile_offset<kD>(64 * m + acc_row(0), col)) =
            pack_bf16(state[m][4 * n], state[m][4 * n + 1]);
        *reinterpret_cast<uint32_t*>(state_tile + tile_offset<kD>(64 * m + acc_row(2), col)) =
            pack_bf16(state[m][4 * n + 2], state[m][4 * n + 3]);
      }
    }
    const float chunk_decay = powers[rows];
#pragma unroll
    for (int m = 0; m < Cfg::kStateMTiles; ++m) {
#pragma unroll
      for (int j = 0; j < 32; ++j) state[m][j] *= chunk_decay;
    }
    const __nv_bfloat16* tile_c = stage_tile(i % kStages, 2) + warpgroup * (kBlockBytes / 2);
#pragma unroll
    for (int r = 0; r < kChunk * 8 / kWarpgroupThreads; ++r) {
      const int idx = wg_tid + r * kWarpgroupThreads;
      const int token = idx / 8;
      const int offset = tile_offset<kChunk>(token, (idx % 8) * 8);
      const int steps = kReverse ? token + 1 : rows - 1 - token;
      const float weight = token < rows ? p.state_in_scale * powers[max(steps, 0)] : 0.f;
      uint4 v = *reinterpret_cast<const uint4*>(tile_c + offset);
      v.x = scale_bf16_pair(v.x, weight);
      v.y = scale_bf16_pair(v.y, weight);
      v.z = scale_bf16_pair(v.z, weight);
      v.w = scale_bf16_pair(v.w, weight);
      *reinterpret_cast<uint4*>(decayed_c + offset) = v;
    }
    fence_shared_for_wgmma();
  };

  // Chunk i + 2 is loaded while chunk i runs, into the stage of chunk i - 1, whose MMAs are complete.
  if (n_chunks > 1) load_chunk(1, 1);
  copy_async_commit();
  if (n_chunks > 0) {
    copy_async_wait<1>();
    __syncthreads();
    prepare_chunk(0);
  }

  for (int i = 0; i < n_chunks; ++i) {
    const int stage = i % kStages;
    const int rows = chunk_rows(i);
    // Chunk i's tiles, bf16 state and decayed c are in place and visible to wgmma; chunk i - 1's stage is free.
    __syncthreads();
    if (i + 2 < n_chunks) load_chunk(i + 2, (i + 2) % kStages);
    // The entry of chunk i + kEntriesAhead joins this commit group; it is waited for, with chunk i + 2's
    // tiles, before chunk i + 2 is prepared, one iteration before its own tiles are requested.
    if (kPacked && tid == 0 && i + kEntriesAhead < n_chunks) {
      copy_async16(shared_address(&entry(i + kEntriesAhead)), entry_address(i + kEntriesAhead), true);
    }
    copy_async_commit();
    const uint64_t a_desc = operand_descriptor(stage_tile(stage, 0));
    const uint64_t b_desc = operand_descriptor(stage_tile(stage, 1));
    const uint64_t c_desc = operand_descriptor(stage_tile(stage, 2) + warpgroup * (kBlockBytes / 2));

    // Three groups in flight: scores = a b^T, acc = a S (the state at the chunk's start, bf16), and the
    // state update S += b^T (decayed c) on the already decayed state. The k-steps of a and b walk along
    // their 128-byte rows (32 bytes each), then to the next column block; those of b^T, c and the bf16
    // state walk down 16 rows.
    float scores[32];
    float acc[32];
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < Cfg::kFeatureSteps; ++ks) {
      const int offset = (ks / 4) * kBlockBytes + (ks % 4) * 32;
      wgmma_ss<0, 0>(scores, advanced(a_desc, offset), advanced(b_desc, offset), ks > 0);
    }
    wgmma_commit();
#pragma unroll
    for (int ks = 0; ks < Cfg::kFeatureSteps; ++ks) {
      wgmma_ss<0, 1>(acc, advanced(a_desc, (ks / 4) * kBlockBytes + (ks % 4) * 32),
                     advanced(state_desc, ks * kKStepBytesMN), ks > 0);
    }
    wgmma_commit();
#pragma unroll
    for (int m = 0; m < Cfg::kStateMTiles; ++m) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        wgmma_ss<1, 1>(state[m], advanced(b_desc, m * kBlockBytes + k * kKStepBytesMN),
                       advanced(decayed_c_desc, k * kKStepBytesMN), true);
      }
    }
    wgmma_commit();

    // Masked scores as the bf16 A operand of scores c: columns 16k .. 16k + 15 form token step k.
    wgmma_wait<2>();
    fence_registers(scores);
    uint32_t p_frag[4][4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int n = 2 * k + half;
        p_frag[k][2 * half] = pack_bf16(masked(scores[4 * n], n, 0), masked(scores[4 * n + 1], n, 1));
        p_frag[k][2 * half + 1] = pack_bf16(masked(scores[4 * n + 2], n, 2), masked(scores[4 * n + 3], n, 3));
      }
    }
    wgmma_wait<1>();
    fence_registers(acc);
    float state_weight[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = acc_row(2 * half);
      const int steps = kReverse ? rows - 1 - row : row + 1;
      state_weight[half] = row < rows ? p.state_out_scale * powers[max(steps, 0)] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < 32; ++j) acc[j] *= state_weight[(j % 4) / 2];

    // acc += scores c, while the next chunk is prepared.
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < 4; ++k) wgmma_rs<1>(acc, p_frag[k], advanced(c_desc, k * kKStepBytesMN));
    wgmma_commit();
    wgmma_wait<1>();
#pragma unroll
    for (int m = 0; m < Cfg::kStateMTiles; ++m) fence_registers(state[m]);
    if constexpr (kPacked) {
      // The state after chunk i: the final state where the chunk closes its sequence; where chunk i + 1
      // opens a sequence, that sequence's initial state (or zeros) replaces it.
      if (p.final_state.data != nullptr && (entry(i).w & kClosesFlag) != 0) store_final_state(chunk_sequence(i));
      if (i + 1 < n_chunks && (entry(i + 1).w & kOpensFlag) != 0) open_sequence(chunk_sequence(i + 1));
    }
    if (i + 1 < n_chunks) {
      copy_async_wait<1>();
      // Every warp's state update and a S are complete and chunk i + 1's tiles are in.
      __syncthreads();
      prepare_chunk(i + 1);
    }
    wgmma_wait<0>();
    fence_registers(acc);

    // The warp's 16 output rows go through shared memory so that global stores are whole 16-byte
    // groups (8 lanes write one row's 128 contiguous bytes) instead of 4-byte pieces.
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = lane / 4 + 8 * half;
        *reinterpret_cast<uint32_t*>(out_rows + tile_offset<16>(row, acc_col(n, 0))) =
            pack_bf16(acc[4 * n + 2 * half], acc[4 * n + 2 * half + 1]);
      }
    }
    __syncwarp();
    const int64_t t0 = chunk_token(i);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int row = (lane + 32 * j) / 8;
      const int col = (lane % 8) * 8;
      if (16 * warp + row < rows) {
        *reinterpret_cast<uint4*>(out + (t0 + 16 * warp + row) * token_stride + head * kD + col0 + col) =
            *reinterpret_cast<const uint4*>(out_rows + tile_offset<16>(row, col));
      }
    }
  }
  copy_async_wait<0>();
  // Equal-length batches: the segment at the sequence's end (its start, backwards) holds its final state.
  if (!kPacked && p.final_state.data != nullptr && seg_index == (kReverse ? 0 : p.num_segs - 1)) {
    store_final_state(sequence);
  }
#else
  // wgmma exists on sm_90a only: machine code for other targets stops here (the binding refuses other GPUs
  // before launching).
  __trap();
#endif
}

}  // namespace lightning_scan

template <int kHeadDim, bool kReverse>
void run_lightning_chunk_scan(const LightningScanParams& params, cudaStream_t stream) {
  if (params.num_programs == 0) return;
  using Cfg = lightning_scan::Config<kHeadDim>;
  using lightning_scan::lightning_attn_fwd_kernel_output;
  auto kernel = params.chunk_table != nullptr ? lightning_attn_fwd_kernel_output<kHeadDim, kReverse, true>
                                              : lightning_attn_fwd_kernel_output<kHeadDim, kReverse, false>;
  // More than 48 KB of dynamic shared memory needs an explicit opt-in per kernel.
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  kernel<<<static_cast<unsigned>(params.num_programs), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(params);
}

}  // namespace hypenet
