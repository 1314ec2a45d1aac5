// Persistent LSTM (torch.nn.LSTM semantics, one layer, time-major) for sm_80 and newer.
//
// One cooperative launch runs the whole time loop (cooperative for its guarantee that all G
// blocks are resident at once, which the per-step flags below rely on: a block spinning on a
// flag never waits for a block that has not started). The grid has G = ceil(H / units) blocks
// (at most one per SM); block g owns the hidden units j in [g*units, (g+1)*units) and keeps
// the rows of W_hh those units need in shared memory for the whole sequence, so the recurrent
// weights are read from HBM once per launch instead of once per step.
//
// Forward, step t (one grid-wide synchronisation per step: per-block flags, see grid_signal):
//   1. MMA: the block computes its B x 4*units slice of h_{t-1} W_hh^T with mma.sync
//      m16n8k16 (fp16/bf16 in, fp32 accumulate), one 16-row batch tile after another (B <= 64:
//      up to 4 tiles; a partial tile clamps its row index). h_{t-1} comes straight from
//      global memory/L2 (out[t-1], or h0) with ld.global.cg, the W_hh slice from shared
//      memory. The 8 warps split K (= H) in 32-wide chunks and their partial tiles are summed
//      in shared memory.
//   2. Gates and cell update for the block's units, fused: pre = partial + xproj[t] (xproj =
//      x W_ih^T + b_ih + b_hh, a GEMM done before the loop); c stays in fp32 shared memory for
//      the whole sequence; h_t is written to out[t] (global, so L2), which is where every
//      block reads it at step t + 1.
//   3. The block publishes step t (grid_signal), issues the loads of xproj[t + 1], and waits
//      until every block has published step t (grid_wait): out[t] is then visible.
// Saved for backward (only when a gradient is needed): the activated gates i, f, g, o and
// c_t in fp32; tanh(c_t) is recomputed.
//
// Backward, step t from T-1 down to 0 (one grid-wide synchronisation per step):
//   1. Elementwise for the block's units: dh = d_out[t] + dh_rec (dh_rec: the block's
//      columns of dgates_{t+1} W_hh, or d_hn at t = T-1), dc = dc_next + dh o (1 - tanh^2 c),
//      dgates_t = [dc g i(1-i), dc c_{t-1} f(1-f), dc i (1-g^2), dh tanh(c) o(1-o)] written to
//      global (also the input of the weight-gradient GEMMs), dc_next = dc f.
//   2. The block publishes dgates_t, issues the loads of step t-1's gates, cells and d_out,
//      and waits for every block's dgates_t.
//   3. MMA: the block computes its B x units slice of dh_{t-1} = dgates_t W_hh: the block
//      owns the columns of W_hh of its units (4H x units, resident in shared memory), reads
//      all of dgates_t (B x 4H) from L2, one 16-row tile after another. On sm_90 the
//      backward runs in thread block clusters instead (lstm_bwd_cluster_kernel): the blocks
//      of a cluster split K and each reads 1/C of dgates_t.
// dW_ih = dgates^T x, dW_hh = dgates^T h_{t-1}, db = sum dgates, dx = dgates W_ih are large
// GEMMs done after the loop (sha_rnn_kernels/_cuda.py).
//
// Shared memory (H = 1024, units = 8, bf16): forward 32 x 1056 x 2 + 4 x 16 x 40 x 4 + 64 x 8
// x 4 = 79,872 bytes; backward 8 x 4128 x 2 + 4 x 16 x 16 x 4 + 2 x 64 x 8 x 4 = 74,240 bytes
// (formulas in lstm_persistent.h). 128 blocks fit the 132 SMs of an H100 at one block per SM.
//
// Per-step budget (bytes per block and grid from L2 and shared memory, FLOPs, flag traffic,
// the latency chain, H100 and A100): docs/design/lstm.md. In short (estimated, H100, bf16,
// H = 1024, B = 16): the backward's 16.8 MB per step of dgates reads (every block read all of
// dgates_t) dominated the old kernel; the sm_90 backward runs in clusters that split K, 2.1 MB
// per step at clusters of 8; the waits poll a lane's flags at once. ~1.3-2.3 us forward +
// ~1.2-2.3 us backward per step, 3.3-5.4 ms per layer with the four GEMMs around it.
// Not done: saving gates/cells in the model dtype (it would halve their memory, but their
// stores are off the critical path: no latency gain, and bf16 gates add error to every
// gradient).
//
// Sync points: __syncthreads after the weight slice load; per step and batch tile,
// __syncthreads between the two halves of the split-K partial sums and before the
// elementwise phase, one more before a later tile rewrites the partials, then grid_signal /
// grid_wait (each starts with or ends in a block barrier, so the partial buffer can be
// rewritten by the next step's MMA). The fp32 state in shared memory is private to its thread (see
// owned_per_thread). All of this runs on the CPU under csrc/emu/cuda_emu.h
// (tests/test_lstm_emulation.py), including a ThreadSanitizer build.
//
#include "lstm_persistent.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <c10/util/Exception.h>

#include <cstdint>
#include <mutex>
#include <set>
#include <utility>

namespace sha_rnn {
namespace {


constexpr int kThreads = kLstmWarps * 32;

#define SHA_RNN_CUDA_CHECK(expr)                                                   \
  do {                                                                             \
    cudaError_t err_ = (expr);                                                     \
    TORCH_CHECK(err_ == cudaSuccess, "sha_rnn_kernels LSTM: ", #expr, " failed: ", \
                cudaGetErrorString(err_));                                         \
  } while (0)

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

// d = a (16x16, row) * b (16x8, col) + d with fp32 accumulators (PTX fragment layout).
// The inline PTX sits behind SHA_RNN_MMA_M16N8K16 (and dynamic shared memory behind
// SHA_RNN_EXTERN_SMEM) so that the CPU emulation (csrc/emu/cuda_emu.h) can replace exactly
// these two hardware-specific pieces and run the rest of this file unchanged.
#ifndef SHA_RNN_MMA_M16N8K16
#define SHA_RNN_MMA_M16N8K16(type, d, a0, a1, a2, a3, b0, b1)                                 \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." type "." type ".f32 "                 \
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"            \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                               \
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1))
#endif
#ifndef SHA_RNN_EXTERN_SMEM
#define SHA_RNN_EXTERN_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif
// The per-step flags: a release store at GPU scope (PTX ISA memory consistency model), and a
// short back-off while polling.
#ifndef SHA_RNN_STORE_RELEASE_GPU
#define SHA_RNN_STORE_RELEASE_GPU(ptr, value) \
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory")
#endif
#ifndef SHA_RNN_SPIN_PAUSE
#define SHA_RNN_SPIN_PAUSE() __nanosleep(20)
#endif
// The waits poll every flag with relaxed loads (all of a lane's loads in flight at once) and
// acquire what they saw with one fence: PTX's acquire pattern (ld.relaxed; fence.acq_rel).
#ifndef SHA_RNN_LOAD_RELAXED_GPU
#define SHA_RNN_LOAD_RELAXED_GPU(ptr, out) \
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(out) : "l"(ptr) : "memory")
#endif
#ifndef SHA_RNN_FENCE_ACQUIRE_GPU
#define SHA_RNN_FENCE_ACQUIRE_GPU() asm volatile("fence.acq_rel.gpu;" ::: "memory")
#endif
// The error word: read relaxed, recorded with atomicMin (the earliest step wins).
#ifndef SHA_RNN_LOAD_RELAXED_GPU_U64
#define SHA_RNN_LOAD_RELAXED_GPU_U64(ptr, out) \
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(out) : "l"(ptr) : "memory")
#endif
#ifndef SHA_RNN_CLOCK64
#define SHA_RNN_CLOCK64() clock64()
#endif
// Thread block clusters (sm_90): split arrive / wait of the cluster barrier (release /
// acquire: orders the shared-memory writes before it for the other blocks' reads after it),
// and the address of the same shared variable in block `rank` of the cluster (mapa, generic
// addresses). Compiled for sm_80 too, where the cluster kernel is never launched.
#ifndef SHA_RNN_CLUSTER_ARRIVE
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define SHA_RNN_CLUSTER_ARRIVE() asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory")
#define SHA_RNN_CLUSTER_WAIT() asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory")
#else
#define SHA_RNN_CLUSTER_ARRIVE() __trap()
#define SHA_RNN_CLUSTER_WAIT() __trap()
#endif
#endif
#ifndef SHA_RNN_CLUSTER_MAP
#define SHA_RNN_CLUSTER_MAP(ptr, rank) cluster_map(ptr, rank)
__device__ __forceinline__ const float* cluster_map(const float* ptr, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned long long out;
  asm volatile("mapa.u64 %0, %1, %2;" : "=l"(out) : "l"(ptr), "r"(rank));
  return reinterpret_cast<const float*>(out);
#else
  __trap();
  return ptr;
#endif
}
#endif

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                          uint32_t a3, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], uint32_t a0, uint32_t a1,
                                                  uint32_t a2, uint32_t a3, uint32_t b0,
                                                  uint32_t b1) {
  SHA_RNN_MMA_M16N8K16("f16", d, a0, a1, a2, a3, b0, b1);
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1,
                                                         uint32_t a2, uint32_t a3, uint32_t b0,
                                                         uint32_t b1) {
  SHA_RNN_MMA_M16N8K16("bf16", d, a0, a1, a2, a3, b0, b1);
}

// One warp's share of C[16 x 8*NT] = A[16 x K] * W^T, where W is [8*NT x K] in shared memory
// (row stride ldw) and A is in global memory (row stride lda, `rows` valid rows; rows beyond
// are read as a copy of the last valid row, which only feeds output rows nobody stores).
//
// K runs in 32-wide chunks, chunk c going to warp c % kLstmWarps. Within a chunk, lane
// (g = lane / 4, q = lane % 4) loads 8 consecutive elements [8q, 8q + 8) of A rows g and g + 8
// and of W row g of each n-tile with one 16-byte load each. The MMA's K order inside a chunk
// is permuted the same way for A and W (logical k {2q, 2q+1, 2q+8, 2q+9} of the first MMA is
// physical {8q .. 8q+3}, of the second MMA {8q+4 .. 8q+7}), which leaves the dot products
// unchanged and makes every load a full 16-byte vector. K must be a multiple of 8, so a lane's
// 8 elements are either all inside K or all outside (then zeros, for A and W alike).
//
// Latency: the A loads of kBatch chunks are all issued before the first MMA, so a warp waits
// for one L2 round trip per kBatch chunks instead of one per chunk; chunk i accumulates into
// set i % kSets, so a long K (the backward's 4H) runs kSets independent MMA chains. The caller
// adds the sets. Chunks wholly past K (warp-uniform) issue no MMA.
template <typename T, int NT, int kBatch, int kSets>
__device__ __forceinline__ void warp_gemm(const T* __restrict__ a, int lda, int rows, int k_total,
                                          const T* __restrict__ w_s, int ldw, int warp, int lane,
                                          float (&acc)[kSets][NT][4]) {
  constexpr int kStep = kLstmWarps * 32;
  const int g = lane >> 2;
  const int q = lane & 3;
  const T* a_lo = a + static_cast<size_t>(min(g, rows - 1)) * lda + 8 * q;
  const T* a_hi = a + static_cast<size_t>(min(g + 8, rows - 1)) * lda + 8 * q;
  const T* w_row = w_s + g * ldw + 8 * q;
  for (int k_base = warp * 32; k_base < k_total; k_base += kBatch * kStep) {
    uint4 lo[kBatch], hi[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int k0 = k_base + i * kStep;
      lo[i] = make_uint4(0u, 0u, 0u, 0u);
      hi[i] = lo[i];
      if (k0 + 8 * q < k_total) {
        // .cg: served by L2, never by a possibly stale L1 line (other blocks wrote A).
        lo[i] = __ldcg(reinterpret_cast<const uint4*>(a_lo + k0));
        hi[i] = __ldcg(reinterpret_cast<const uint4*>(a_hi + k0));
      }
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int k0 = k_base + i * kStep;
      if (k0 >= k_total) break;  // warp-uniform
      const bool inside = k0 + 8 * q < k_total;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        uint4 b = make_uint4(0u, 0u, 0u, 0u);
        if (inside) b = *reinterpret_cast<const uint4*>(w_row + n * 8 * ldw + k0);
        mma_16816<T>(acc[i % kSets][n], lo[i].x, hi[i].x, lo[i].y, hi[i].y, b.x, b.y);
        mma_16816<T>(acc[i % kSets][n], lo[i].z, hi[i].z, lo[i].w, hi[i].w, b.z, b.w);
      }
    }
  }
}

template <int kSets, int NT>
__device__ __forceinline__ void zero(float (&acc)[kSets][NT][4]) {
#pragma unroll
  for (int s = 0; s < kSets; ++s)
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[s][n][0] = acc[s][n][1] = acc[s][n][2] = acc[s][n][3] = 0.0f;
}

// Sum the warps' accumulators into part_s [16 x 8*NT] (fp32, row stride
// lstm_partial_stride(8*NT)): warps w and w + 4 share slot w % 4; the first half stores, the
// second half adds, so the result is deterministic. Leaves a block barrier behind: part_s[slot]
// is complete for every slot on return.
template <int NT>
__device__ __forceinline__ void reduce_partials(float* part_s, const float (&acc)[NT][4],
                                                int warp, int lane) {
  static_assert(kLstmWarps == 2 * kLstmPartialSlots, "two warps per partial slot");
  constexpr int kStride = lstm_partial_stride(8 * NT);
  const int g = lane >> 2;
  const int q = lane & 3;
  float* slot = part_s + (warp % kLstmPartialSlots) * 16 * kStride;
  if (warp < kLstmPartialSlots) {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int col = n * 8 + 2 * q;
      *reinterpret_cast<float2*>(slot + g * kStride + col) = make_float2(acc[n][0], acc[n][1]);
      *reinterpret_cast<float2*>(slot + (g + 8) * kStride + col) =
          make_float2(acc[n][2], acc[n][3]);
    }
  }
  __syncthreads();
  if (warp >= kLstmPartialSlots) {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int col = n * 8 + 2 * q;
      float2* lo = reinterpret_cast<float2*>(slot + g * kStride + col);
      float2* hi = reinterpret_cast<float2*>(slot + (g + 8) * kStride + col);
      lo->x += acc[n][0];
      lo->y += acc[n][1];
      hi->x += acc[n][2];
      hi->y += acc[n][3];
    }
  }
  __syncthreads();
}

// Sum over the partial slots of element (row, col) of a [16 x cols] tile.
__device__ __forceinline__ float partial_sum(const float* part_s, int cols, int row, int col) {
  const int stride = lstm_partial_stride(cols);
  float s = 0.0f;
#pragma unroll
  for (int slot = 0; slot < kLstmPartialSlots; ++slot) s += part_s[(slot * 16 + row) * stride + col];
  return s;
}

// Per-step flags instead of a grid-wide barrier. flags[g] counts the steps block g has
// published. grid_signal: every thread of the block has stored its part of the step (block
// barrier), then one thread publishes `epoch` with a release store (cumulative over the
// block's stores, which the barrier ordered before it). grid_wait: lane l of warp 0 watches
// blocks l, l + 32, ... (at most kLstmMaxFlagsPerLane): it issues the loads of up to four
// unpublished flags at once (one L2 round trip per poll, not one per block), repeats until
// each reached `epoch`, then a fence turns the relaxed loads into acquires and a block barrier
// hands the guarantee to the whole block. Unlike cooperative_groups' grid.sync there is no
// atomic on one shared counter (128 serialised read-modify-writes) and no second fence. The
// data a step publishes (out[t], dgates_t) is written once and never overwritten, and a block
// cannot run ahead of a step whose inputs are missing, so read after write is the only hazard
// the flags must order.
//
// Bounded: a lane that has polled for more than `limit` cycles records the error word
// (atomicMin of (epoch << 32) | (late block << 16) | this block) and stops waiting; a lane
// that finds the error word set stops too. From then on no wait of any block waits, so every
// block runs its remaining steps on stale data and the launch ends; the host reads the error
// word and raises (the outputs are garbage, never returned). Nothing else in the kernels waits
// on another block.
__device__ __forceinline__ void grid_signal(unsigned* step_buffer, unsigned epoch) {
  __syncthreads();
  if (threadIdx.x == 0)
    SHA_RNN_STORE_RELEASE_GPU(step_buffer + kLstmStatusWords + blockIdx.x, epoch);
}

__device__ __forceinline__ void grid_wait(unsigned* step_buffer, unsigned epoch,
                                          long long limit) {
  // Flags a lane polls at once: 4 (one L2 round trip per poll for grids up to 128 blocks; a
  // second group for larger grids). 8 would keep 4 more registers live across the wait, which
  // the 32-unit backward (255 registers) cannot spare.
  constexpr int kGroup = 4;
  static_assert(kLstmMaxFlagsPerLane % kGroup == 0, "whole groups");
  if (threadIdx.x < 32) {
    unsigned long long* error = reinterpret_cast<unsigned long long*>(step_buffer);
    const unsigned* flags = step_buffer + kLstmStatusWords;
    const int lane = threadIdx.x;
    const long long start = SHA_RNN_CLOCK64();
    bool give_up = false;
    for (int first = lane; first < int(gridDim.x) && !give_up; first += 32 * kGroup) {
      unsigned pending = 0;  // bit i: block first + 32 i has not published `epoch` yet
#pragma unroll
      for (int i = 0; i < kGroup; ++i)
        if (first + 32 * i < int(gridDim.x)) pending |= 1u << i;
      while (true) {
        unsigned seen[kGroup];
#pragma unroll
        for (int i = 0; i < kGroup; ++i)
          if (pending & (1u << i)) SHA_RNN_LOAD_RELAXED_GPU(flags + first + 32 * i, seen[i]);
#pragma unroll
        for (int i = 0; i < kGroup; ++i)
          if ((pending & (1u << i)) && seen[i] >= epoch) pending &= ~(1u << i);
        if (pending == 0) break;
        unsigned long long recorded = 0;
        SHA_RNN_LOAD_RELAXED_GPU_U64(error, recorded);
        give_up = recorded != kLstmNoError;  // another wait gave up: the launch is void
        if (!give_up && SHA_RNN_CLOCK64() - start > limit) {
          const unsigned late = first + 32 * (__ffs(pending) - 1);
          atomicMin(error, (static_cast<unsigned long long>(epoch) << 32) |
                               (static_cast<unsigned long long>(late) << 16) | blockIdx.x);
          give_up = true;
        }
        if (give_up) break;
        SHA_RNN_SPIN_PAUSE();
      }
    }
    SHA_RNN_FENCE_ACQUIRE_GPU();
  }
  __syncthreads();
}

// The block's elementwise work is the [B x kUnits] grid of (batch row b, unit u); element
// e = b * kUnits + u belongs to thread e % kThreads at every phase and step, so the fp32 state
// kept in shared memory (c, dh, dc) is private to its thread and needs no barrier. A thread
// owns at most kOwned elements (at B = kLstmMaxBatch); its i-th is e = threadIdx.x + i*kThreads.
template <int kUnits>
__host__ __device__ constexpr int owned_per_thread() {
  return (kLstmMaxBatch * kUnits + kThreads - 1) / kThreads;
}

// xproj[t] of the thread's elements (0 past B or H), all four gates: registers, loaded ahead.
template <typename T, int kUnits, int kOwned>
__device__ __forceinline__ void load_xproj(float (&xq)[kOwned][4], const T* xproj, int t, int B,
                                           int H, int unit0) {
  const T* xp = xproj + size_t(t) * B * 4 * H;
#pragma unroll
  for (int i = 0; i < kOwned; ++i) {
    const int e = threadIdx.x + i * kThreads;
    const int b = e / kUnits, j = unit0 + e % kUnits;
    const bool live = b < B && j < H;
#pragma unroll
    for (int gate = 0; gate < 4; ++gate)
      xq[i][gate] = live ? to_float(xp[size_t(b) * 4 * H + gate * H + j]) : 0.0f;
  }
}

// Forward. Grid: ceil(H / kUnits) blocks, kThreads threads, cooperative launch.
// Block g owns hidden units [g*kUnits, (g+1)*kUnits) (all four gates of them): shared memory
// row r = gate*kUnits + u holds W_hh[gate*H + g*kUnits + u, :] (zero past H). The batch runs
// in tiles of 16 rows (one m16 MMA tile each) that share the weight slice.
template <typename T, int U>
__global__ void __launch_bounds__(kThreads, 1) lstm_fwd_kernel(const LstmFwdParams p) {
  constexpr int kUnits = 8 * U;
  constexpr int kRows = 4 * kUnits;
  constexpr int kTiles = 4 * U;  // n-tiles of 8 gate rows
  constexpr int kOwned = owned_per_thread<kUnits>();
  SHA_RNN_EXTERN_SMEM(smem_raw);

  const int T_len = p.seq_len, B = p.batch, H = p.hidden;
  const long long limit = p.wait_limit > 0 ? p.wait_limit : kLstmWaitLimitCycles;
  const int ldw = lstm_smem_row_stride(H);
  T* w_s = reinterpret_cast<T*>(smem_raw);
  float* part_s = reinterpret_cast<float*>(smem_raw + size_t(kRows) * ldw * sizeof(T));
  float* c_s = part_s + kLstmPartialSlots * 16 * lstm_partial_stride(kRows);  // [B][kUnits]

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int unit0 = blockIdx.x * kUnits;
  const T* w_hh = static_cast<const T*>(p.w_hh);
  const T* xproj = static_cast<const T*>(p.xproj);
  const T* h0 = static_cast<const T*>(p.h0);
  const T* c0 = static_cast<const T*>(p.c0);
  T* out = static_cast<T*>(p.out);

  // Weight slice: 16-byte vectors, H % 8 == 0.
  const int vecs_per_row = H / 8;
  for (int idx = threadIdx.x; idx < kRows * vecs_per_row; idx += kThreads) {
    const int row = idx / vecs_per_row, vec = idx % vecs_per_row;
    const int gate = row / kUnits, j = unit0 + row % kUnits;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (j < H) v = *reinterpret_cast<const uint4*>(w_hh + (size_t(gate) * H + j) * H + vec * 8);
    *reinterpret_cast<uint4*>(w_s + row * ldw + vec * 8) = v;
  }
#pragma unroll
  for (int i = 0; i < kOwned; ++i) {
    const int e = threadIdx.x + i * kThreads;
    const int b = e / kUnits, j = unit0 + e % kUnits;
    if (b < B) c_s[e] = j < H ? to_float(c0[b * H + j]) : 0.0f;
  }
  float xq[kOwned][4];
  load_xproj<T, kUnits>(xq, xproj, 0, B, H, unit0);
  __syncthreads();

  for (int t = 0; t < T_len; ++t) {
    const T* h_prev = t == 0 ? h0 : out + size_t(t - 1) * B * H;
    for (int row0 = 0; row0 < B; row0 += 16) {
      const int rows = min(16, B - row0);
      float acc[1][kTiles][4];
      zero(acc);
      warp_gemm<T, kTiles, kLstmFwdLoadBatch, 1>(h_prev + size_t(row0) * H, H, rows, H, w_s,
                                                 ldw, warp, lane, acc);
      if (row0 > 0) __syncthreads();  // the previous tile's gate phase has read part_s
      reduce_partials<kTiles>(part_s, acc[0], warp, lane);

#pragma unroll
      for (int i = 0; i < kOwned; ++i) {
        const int e = threadIdx.x + i * kThreads;
        const int b = e / kUnits, u = e % kUnits, j = unit0 + u;
        if (b < row0 || b >= row0 + rows || j >= H) continue;
        float pre[4];
#pragma unroll
        for (int gate = 0; gate < 4; ++gate)
          pre[gate] = partial_sum(part_s, kRows, b - row0, gate * kUnits + u) + xq[i][gate];
        const float ig = sigmoid(pre[0]), fg = sigmoid(pre[1]);
        const float gg = tanhf(pre[2]), og = sigmoid(pre[3]);
        const float c = fg * c_s[e] + ig * gg;
        c_s[e] = c;
        const float h = og * tanhf(c);
        out[(size_t(t) * B + b) * H + j] = from_float<T>(h);
        if (p.gates != nullptr) {
          float* gt = p.gates + (size_t(t) * B + b) * 4 * H + j;
          gt[0] = ig;
          gt[H] = fg;
          gt[2 * H] = gg;
          gt[3 * H] = og;
        }
        if (p.cells != nullptr) p.cells[(size_t(t) * B + b) * H + j] = c;
        if (t == T_len - 1) static_cast<T*>(p.c_n)[b * H + j] = from_float<T>(c);
      }
    }
    if (t + 1 < T_len) {
      grid_signal(p.flags, t + 1);  // out[t] of this block published
      // xproj[t + 1] does not depend on the recurrence: its loads fly during the wait (issued
      // after the signal, so that the publishing thread's release never waits for them).
      load_xproj<T, kUnits>(xq, xproj, t + 1, B, H, unit0);
      grid_wait(p.flags, t + 1, limit);  // out[t] of every block visible before step t + 1
    }
  }
}

// What the backward's elementwise phase of step t reads from global memory for the thread's
// elements: gates i, f, g, o, c_t, c_{t-1} (c0 at t = 0) and d_out[t]. Loaded one step ahead.
template <typename T, int kUnits, int kOwned>
__device__ __forceinline__ void load_bwd_inputs(float (&in)[kOwned][7], const LstmBwdParams& p,
                                                int t, int unit0) {
  const int B = p.batch, H = p.hidden;
  const T* c0 = static_cast<const T*>(p.c0);
  const T* d_out = static_cast<const T*>(p.d_out);
#pragma unroll
  for (int i = 0; i < kOwned; ++i) {
    const int e = threadIdx.x + i * kThreads;
    const int b = e / kUnits, j = unit0 + e % kUnits;
    if (b >= B || j >= H) continue;
    const float* gt = p.gates + (size_t(t) * B + b) * 4 * H + j;
    in[i][0] = gt[0];
    in[i][1] = gt[H];
    in[i][2] = gt[2 * H];
    in[i][3] = gt[3 * H];
    in[i][4] = p.cells[(size_t(t) * B + b) * H + j];
    in[i][5] = t > 0 ? p.cells[(size_t(t - 1) * B + b) * H + j] : to_float(c0[b * H + j]);
    in[i][6] = to_float(d_out[(size_t(t) * B + b) * H + j]);
  }
}

// The backward's carried gradients for the thread's elements at the sequence end: dh_s = d_hn,
// dc_s = d_cn (zero for the padded units past H).
template <typename T, int kUnits, int kOwned>
__device__ __forceinline__ void init_bwd_state(float* dh_s, float* dc_s, const LstmBwdParams& p,
                                               int unit0) {
  const int B = p.batch, H = p.hidden;
  const T* d_hn = static_cast<const T*>(p.d_hn);
  const T* d_cn = static_cast<const T*>(p.d_cn);
#pragma unroll
  for (int i = 0; i < kOwned; ++i) {
    const int e = threadIdx.x + i * kThreads;
    const int b = e / kUnits, j = unit0 + e % kUnits;
    if (b >= B) continue;
    dh_s[e] = j < H ? to_float(d_hn[b * H + j]) : 0.0f;
    dc_s[e] = j < H ? to_float(d_cn[b * H + j]) : 0.0f;
  }
}

// Step t's elementwise backward for the thread's elements (both backward kernels): from
// dh = d_out[t] + dh_s and the carried dc, the four gate gradients into dgates_t (model dtype);
// dc_s becomes dc * f, which at t = 0 is d_c0.
template <typename T, int kUnits, int kOwned>
__device__ __forceinline__ void bwd_elementwise(const float (&in)[kOwned][7], const float* dh_s,
                                                float* dc_s, T* dg_t, const LstmBwdParams& p,
                                                int unit0, int t) {
  const int B = p.batch, H = p.hidden, G4 = 4 * H;
#pragma unroll
  for (int i = 0; i < kOwned; ++i) {
    const int e = threadIdx.x + i * kThreads;
    const int b = e / kUnits, j = unit0 + e % kUnits;
    if (b >= B || j >= H) continue;
    const float ig = in[i][0], fg = in[i][1], gg = in[i][2], og = in[i][3];
    const float c = in[i][4], c_prev = in[i][5];
    const float tc = tanhf(c);
    const float dh = in[i][6] + dh_s[e];
    const float dc = dc_s[e] + dh * og * (1.0f - tc * tc);
    T* dg = dg_t + size_t(b) * G4 + j;
    dg[0] = from_float<T>(dc * gg * ig * (1.0f - ig));
    dg[H] = from_float<T>(dc * c_prev * fg * (1.0f - fg));
    dg[2 * H] = from_float<T>(dc * ig * (1.0f - gg * gg));
    dg[3 * H] = from_float<T>(dh * tc * og * (1.0f - og));
    dc_s[e] = dc * fg;
    if (t == 0) static_cast<T*>(p.d_c0)[b * H + j] = from_float<T>(dc * fg);
  }
}

// Backward. Grid and ownership as the forward; shared memory row u holds column
// g*kUnits + u of W_hh (all 4H gate rows of it, zero past H), i.e. W_hh^T restricted to the
// block's units, so the block produces dh_{t-1} for exactly the units whose gates it owns.
template <typename T, int U>
__global__ void __launch_bounds__(kThreads, 1) lstm_bwd_kernel(const LstmBwdParams p) {
  constexpr int kUnits = 8 * U;
  constexpr int kTiles = U;
  constexpr int kOwned = owned_per_thread<kUnits>();
  // 8 units (one n-tile): registers for all 16 chunks of K = 4096 (one L2 round trip); wider
  // blocks keep 8 chunks in flight (their accumulators need the registers), 32-unit blocks 4
  // (with 8, ptxas spills on sm_90a: 255 registers).
  constexpr int kBwdLoadBatch = U == 1   ? 2 * kLstmBwdLoadBatch
                                : U >= 4 ? (kLstmBwdLoadBatch + 1) / 2
                                         : kLstmBwdLoadBatch;
  SHA_RNN_EXTERN_SMEM(smem_raw);

  const int T_len = p.seq_len, B = p.batch, H = p.hidden;
  const long long limit = p.wait_limit > 0 ? p.wait_limit : kLstmWaitLimitCycles;
  const int G4 = 4 * H;
  const int ldw = lstm_smem_row_stride(G4);
  T* w_s = reinterpret_cast<T*>(smem_raw);
  float* part_s = reinterpret_cast<float*>(smem_raw + size_t(kUnits) * ldw * sizeof(T));
  float* dh_s = part_s + kLstmPartialSlots * 16 * lstm_partial_stride(kUnits);  // [B][kUnits]
  float* dc_s = dh_s + kLstmMaxBatch * kUnits;                                  // [B][kUnits]

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int unit0 = blockIdx.x * kUnits;
  const T* w_hh = static_cast<const T*>(p.w_hh);
  T* d_gates = static_cast<T*>(p.d_gates);

  // Transposed gather, once per launch: consecutive threads read consecutive units of a row.
  for (int idx = threadIdx.x; idx < kUnits * G4; idx += kThreads) {
    const int r = idx / kUnits, u = idx % kUnits, j = unit0 + u;
    w_s[u * ldw + r] = j < H ? w_hh[size_t(r) * H + j] : from_float<T>(0.0f);
  }
  init_bwd_state<T, kUnits, kOwned>(dh_s, dc_s, p, unit0);
  float in[kOwned][7];
  load_bwd_inputs<T, kUnits>(in, p, T_len - 1, unit0);
  __syncthreads();

  for (int t = T_len - 1; t >= 0; --t) {
    T* dg_t = d_gates + size_t(t) * B * G4;
    bwd_elementwise<T, kUnits, kOwned>(in, dh_s, dc_s, dg_t, p, unit0, t);
    const unsigned epoch = T_len - t;
    grid_signal(p.flags, epoch);  // dgates_t of this block's units published
    // Step t - 1's saved activations and d_out do not depend on the recurrence: their loads
    // fly during the wait and the MMA.
    if (t > 0) load_bwd_inputs<T, kUnits>(in, p, t - 1, unit0);
    grid_wait(p.flags, epoch, limit);  // dgates_t of every unit visible

    for (int row0 = 0; row0 < B; row0 += 16) {
      const int rows = min(16, B - row0);
      float acc[2][kTiles][4];
      zero(acc);
      warp_gemm<T, kTiles, kBwdLoadBatch, 2>(dg_t + size_t(row0) * G4, G4, rows, G4, w_s,
                                                 ldw, warp, lane, acc);
#pragma unroll
      for (int n = 0; n < kTiles; ++n)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[0][n][r] += acc[1][n][r];
      if (row0 > 0) __syncthreads();  // the previous tile's dh phase has read part_s
      reduce_partials<kTiles>(part_s, acc[0], warp, lane);

#pragma unroll
      for (int i = 0; i < kOwned; ++i) {
        const int e = threadIdx.x + i * kThreads;
        const int b = e / kUnits, u = e % kUnits, j = unit0 + u;
        if (b < row0 || b >= row0 + rows) continue;
        const float dh_prev = partial_sum(part_s, kUnits, b - row0, u);
        dh_s[e] = dh_prev;
        if (t == 0 && j < H) static_cast<T*>(p.d_h0)[b * H + j] = from_float<T>(dh_prev);
      }
    }
    // part_s is rewritten only after the next grid_signal's block barrier, dh_s/dc_s are
    // private to their thread: no block barrier needed here.
  }
}

// Backward in clusters of C blocks (sm_90). The grid is ceil(H / 8) blocks rounded up to a
// multiple of C; block g still owns units [8g, 8g + 8) for the elementwise phase (dgates, dc,
// dh), but the recurrent product dh_{t-1} = dgates_t W_hh is split by K inside the cluster:
// rank r of cluster c keeps W_hh^T for the cluster's 8C units and K range [r kr, (r + 1) kr)
// (kr = lstm_cluster_k_range) and reads only that range of dgates_t from L2 (1/C of the bytes
// of lstm_bwd_kernel), producing a [16 x 8C] fp32 partial. Per 16-row tile: split-K reduce in
// the block, the block sums its slots into sum_s, cluster barrier, each block gathers the
// columns of its own 8 units from the C blocks' sum_s (distributed shared memory), then
// arrives at the cluster barrier whose wait comes just before sum_s is written again (or
// before the block exits: no block leaves while another may still read its shared memory).
// Between steps the step flags already order a gather before the next write of sum_s (a block
// publishes step t - 1 after its gather of step t); the deferred wait is what orders the row
// tiles of one step (B > 16), and it costs nothing where the flags have already waited.
template <typename T, int C>
__global__ void __launch_bounds__(kThreads, 1) lstm_bwd_cluster_kernel(const LstmBwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // clusters need sm_90; the launcher never picks this kernel below it
#else
  constexpr int kUnits = 8;            // units of the elementwise phase
  constexpr int kClusterUnits = 8 * C;  // columns of the block's MMA
  constexpr int kOwned = owned_per_thread<kUnits>();
  // K per warp is short (4H / C / 8 warps): one accumulator set, load batches of 4 chunks.
  constexpr int kBatch = C >= 4 ? 4 : kLstmBwdLoadBatch;
  constexpr int kSets = C >= 4 ? 1 : 2;
  SHA_RNN_EXTERN_SMEM(smem_raw);

  const int T_len = p.seq_len, B = p.batch, H = p.hidden;
  const long long limit = p.wait_limit > 0 ? p.wait_limit : kLstmWaitLimitCycles;
  const int G4 = 4 * H;
  const int kr = lstm_cluster_k_range(H, C);
  const int ldw = lstm_smem_row_stride(kr);
  const unsigned rank = blockIdx.x % C;
  const int k_begin = int(rank) * kr;
  const int k_len = max(0, min(kr, G4 - k_begin));
  T* w_s = reinterpret_cast<T*>(smem_raw);
  float* part_s = reinterpret_cast<float*>(smem_raw + size_t(kClusterUnits) * ldw * sizeof(T));
  float* sum_s = part_s + kLstmPartialSlots * 16 * lstm_partial_stride(kClusterUnits);
  float* dh_s = sum_s + 16 * kClusterUnits;  // [B][kUnits]
  float* dc_s = dh_s + kLstmMaxBatch * kUnits;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int unit0 = blockIdx.x * kUnits;
  const int cluster_unit0 = (blockIdx.x / C) * kClusterUnits;
  const T* w_hh = static_cast<const T*>(p.w_hh);
  T* d_gates = static_cast<T*>(p.d_gates);

  // w_s[u][k] = W_hh[k_begin + k, cluster_unit0 + u]: consecutive threads read consecutive
  // units of a row of W_hh.
  for (int idx = threadIdx.x; idx < kClusterUnits * k_len; idx += kThreads) {
    const int k = idx / kClusterUnits, u = idx % kClusterUnits, j = cluster_unit0 + u;
    w_s[u * ldw + k] = j < H ? w_hh[size_t(k_begin + k) * H + j] : from_float<T>(0.0f);
  }
  init_bwd_state<T, kUnits, kOwned>(dh_s, dc_s, p, unit0);
  float in[kOwned][7];
  load_bwd_inputs<T, kUnits>(in, p, T_len - 1, unit0);
  __syncthreads();

  bool arrived = false;  // an arrive at the cluster barrier whose wait is still due
  for (int t = T_len - 1; t >= 0; --t) {
    T* dg_t = d_gates + size_t(t) * B * G4;
    bwd_elementwise<T, kUnits, kOwned>(in, dh_s, dc_s, dg_t, p, unit0, t);
    const unsigned epoch = T_len - t;
    grid_signal(p.flags, epoch);
    if (t > 0) load_bwd_inputs<T, kUnits>(in, p, t - 1, unit0);
    grid_wait(p.flags, epoch, limit);

    for (int row0 = 0; row0 < B; row0 += 16) {
      const int rows = min(16, B - row0);
      float acc[kSets][C][4];
      zero(acc);
      warp_gemm<T, C, kBatch, kSets>(dg_t + size_t(row0) * G4 + k_begin, G4, rows, k_len, w_s,
                                     ldw, warp, lane, acc);
      if constexpr (kSets == 2) {
#pragma unroll
        for (int n = 0; n < C; ++n)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[0][n][r] += acc[1][n][r];
      }
      reduce_partials<C>(part_s, acc[0], warp, lane);
      if (arrived) SHA_RNN_CLUSTER_WAIT();  // every block has read the previous sum_s
      for (int idx = threadIdx.x; idx < 16 * kClusterUnits; idx += kThreads)
        sum_s[idx] = partial_sum(part_s, kClusterUnits, idx / kClusterUnits, idx % kClusterUnits);
      SHA_RNN_CLUSTER_ARRIVE();  // sum_s of every block of the cluster complete and visible
      SHA_RNN_CLUSTER_WAIT();

#pragma unroll
      for (int i = 0; i < kOwned; ++i) {
        const int e = threadIdx.x + i * kThreads;
        const int b = e / kUnits, u = e % kUnits, j = unit0 + u;
        if (b < row0 || b >= row0 + rows) continue;
        const int col = int(rank) * kUnits + u, row = b - row0;
        float dh_prev = 0.0f;
#pragma unroll
        for (int q = 0; q < C; ++q)
          dh_prev += SHA_RNN_CLUSTER_MAP(sum_s, unsigned(q))[row * kClusterUnits + col];
        dh_s[e] = dh_prev;
        if (t == 0 && j < H) static_cast<T*>(p.d_h0)[b * H + j] = from_float<T>(dh_prev);
      }
      SHA_RNN_CLUSTER_ARRIVE();  // this block has read the others' sum_s
      arrived = true;
    }
  }
  if (arrived) SHA_RNN_CLUSTER_WAIT();
#endif
}

bool valid_units(int units) {
  for (int choice : kLstmUnitChoices)
    if (units == choice) return true;
  return false;
}

// The dynamic shared memory limit of `kernel` on `device` is raised to the device's opt-in
// maximum once, under a lock: launches of different sizes from several host threads never
// race on the attribute (a smaller size set by one thread between another thread's set and
// its launch would make that launch fail). The limit is a cap, not a reservation: occupancy
// follows the bytes each launch asks for.
template <typename Params>
void raise_smem_limit_once(void (*kernel)(Params), int device, int smem_optin) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> done;
  const std::lock_guard<std::mutex> lock(mutex);
  if (done.insert({reinterpret_cast<const void*>(kernel), device}).second) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin);
    if (err != cudaSuccess) done.erase({reinterpret_cast<const void*>(kernel), device});
    SHA_RNN_CUDA_CHECK(err);
  }
}

struct DeviceInfo {
  int device = 0, sm_count = 0, smem_optin = 0, cc_major = 0;
};

DeviceInfo device_info() {
  DeviceInfo d;
  int cooperative = 0;
  SHA_RNN_CUDA_CHECK(cudaGetDevice(&d.device));
  SHA_RNN_CUDA_CHECK(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, d.device));
  SHA_RNN_CUDA_CHECK(
      cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, d.device));
  SHA_RNN_CUDA_CHECK(
      cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, d.device));
  SHA_RNN_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, d.device));
  TORCH_CHECK(cooperative, "sha_rnn_kernels LSTM: the device does not support cooperative launch");
  return d;
}

// The step buffer: error word all ones (no error), flags 0 (no step published).
template <typename Params>
void reset_step_buffer(const Params& params, int grid, cudaStream_t stream, const char* what) {
  TORCH_CHECK(grid <= kLstmMaxBlocks, "sha_rnn_kernels LSTM ", what, ": ", grid,
              " blocks, the step waits watch at most ", kLstmMaxBlocks);
  TORCH_CHECK(params.flags != nullptr, "sha_rnn_kernels LSTM ", what, ": no step buffer");
  TORCH_CHECK(reinterpret_cast<std::uintptr_t>(params.flags) % 8 == 0, "sha_rnn_kernels LSTM ",
              what, ": the step buffer must be 8-byte aligned (its error word is a uint64)");
  SHA_RNN_CUDA_CHECK(
      cudaMemsetAsync(params.flags, 0xff, sizeof(unsigned) * kLstmStatusWords, stream));
  SHA_RNN_CUDA_CHECK(cudaMemsetAsync(params.flags + kLstmStatusWords, 0,
                                     sizeof(unsigned) * grid, stream));
}

// SMs the launch may fill: the device's minus the caller's reserve (never all of them).
template <typename Params>
int usable_sms(const DeviceInfo& d, const Params& params, const char* what) {
  TORCH_CHECK(params.reserve_sms >= 0 && params.reserve_sms < d.sm_count, "sha_rnn_kernels LSTM ",
              what, ": reserve_sms must be in [0, ", d.sm_count, "), got ", params.reserve_sms);
  return d.sm_count - params.reserve_sms;
}

// Check that `grid` blocks of `kernel` with `smem` bytes can all be resident at once on the
// usable SMs (the cooperative-launch requirement), then launch.
template <typename Params>
void cooperative_launch(void (*kernel)(Params), int grid, size_t smem, const Params& params,
                        cudaStream_t stream, const char* what) {
  const DeviceInfo d = device_info();
  TORCH_CHECK(smem <= static_cast<size_t>(d.smem_optin), "sha_rnn_kernels LSTM ", what,
              ": needs ", smem, " bytes of shared memory per block, the device allows ",
              d.smem_optin);
  raise_smem_limit_once(kernel, d.device, d.smem_optin);
  const int sms = usable_sms(d, params, what);
  int per_sm = 0;
  SHA_RNN_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  TORCH_CHECK(grid <= per_sm * sms, "sha_rnn_kernels LSTM ", what, ": ", grid,
              " blocks cannot be co-resident (", per_sm, " per SM x ", sms, " SMs: ", d.sm_count,
              " on the device, ", params.reserve_sms, " reserved)");
  reset_step_buffer(params, grid, stream, what);
  void* args[] = {const_cast<Params*>(&params)};
  SHA_RNN_CUDA_CHECK(
      cudaLaunchCooperativeKernel(kernel, dim3(grid), dim3(kThreads), args, smem, stream));
}

template <typename T>
void forward_typed(const LstmFwdParams& p, cudaStream_t stream) {
  const int grid = (p.hidden + p.units - 1) / p.units;
  const size_t smem = lstm_fwd_smem_bytes(p.hidden, p.units);
  void (*kernel)(LstmFwdParams) = nullptr;
  switch (p.units) {
    case 8: kernel = &lstm_fwd_kernel<T, 1>; break;
    case 16: kernel = &lstm_fwd_kernel<T, 2>; break;
    case 24: kernel = &lstm_fwd_kernel<T, 3>; break;
    default: kernel = &lstm_fwd_kernel<T, 4>; break;
  }
  cooperative_launch(kernel, grid, smem, p, stream, "forward");
}

using BwdKernel = void (*)(LstmBwdParams);
static_assert(kLstmClusterChoices[0] == 8, "lstm_step_buffer_words pads the grid to 8 blocks");

template <typename T>
BwdKernel cluster_kernel(int cluster) {
  switch (cluster) {
    case 8: return &lstm_bwd_cluster_kernel<T, 8>;
    case 4: return &lstm_bwd_cluster_kernel<T, 4>;
    default: return &lstm_bwd_cluster_kernel<T, 2>;
  }
}

int cluster_grid(int hidden, int cluster) {
  const int blocks = lstm_grid_blocks(hidden, 8);
  return (blocks + cluster - 1) / cluster * cluster;
}

cudaLaunchConfig_t cluster_config(int grid, int cluster, size_t smem, cudaStream_t stream,
                                  cudaLaunchAttribute (&attrs)[2]) {
  attrs[0].id = cudaLaunchAttributeClusterDimension;
  attrs[0].val.clusterDim.x = cluster;
  attrs[0].val.clusterDim.y = 1;
  attrs[0].val.clusterDim.z = 1;
  attrs[1].id = cudaLaunchAttributeCooperative;
  attrs[1].val.cooperative = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attrs;
  config.numAttrs = 2;
  return config;
}

// Devices on which a cooperative cluster launch was refused: the backward runs without
// clusters there from then on (same results, the old L2 traffic). Under a lock: launches from
// several host threads.
std::mutex& no_cluster_mutex() {
  static std::mutex mutex;
  return mutex;
}
std::set<int>& no_cluster_devices() {
  static std::set<int> devices;
  return devices;
}
bool clusters_refused(int device) {
  const std::lock_guard<std::mutex> lock(no_cluster_mutex());
  return no_cluster_devices().count(device) != 0;
}
void refuse_clusters(int device) {
  cudaGetLastError();  // the refusal is not a sticky error: clear it for the next launch
  const std::lock_guard<std::mutex> lock(no_cluster_mutex());
  no_cluster_devices().insert(device);
}

// The largest cluster size whose grid the device can co-schedule on the usable SMs (sm_90+,
// 8 units per block, which is the plan whenever the grid fits one block per SM), else 1. A
// runtime that refuses the occupancy query for a cooperative cluster launch means no clusters.
template <typename T>
int pick_cluster(const LstmBwdParams& p, const DeviceInfo& d) {
  if (d.cc_major < 9 || p.units != 8 || clusters_refused(d.device)) return 1;
  const int sms = usable_sms(d, p, "backward");
  for (int cluster : kLstmClusterChoices) {
    const int grid = cluster_grid(p.hidden, cluster);
    const size_t smem = lstm_bwd_cluster_smem_bytes(p.hidden, cluster);
    if (grid > sms || grid > kLstmMaxBlocks || smem > static_cast<size_t>(d.smem_optin)) continue;
    const BwdKernel kernel = cluster_kernel<T>(cluster);
    raise_smem_limit_once(kernel, d.device, d.smem_optin);
    cudaLaunchAttribute attrs[2];
    const cudaLaunchConfig_t config = cluster_config(grid, cluster, smem, nullptr, attrs);
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
      refuse_clusters(d.device);
      return 1;
    }
    if (clusters * cluster >= grid) return cluster;
  }
  return 1;
}

template <typename T>
int backward_cluster_typed(const LstmBwdParams& p) {
  return pick_cluster<T>(p, device_info());
}

template <typename T>
void backward_typed(const LstmBwdParams& p, cudaStream_t stream) {
  const DeviceInfo d = device_info();
  const int cluster = pick_cluster<T>(p, d);
  if (cluster > 1) {
    const int grid = cluster_grid(p.hidden, cluster);
    const size_t smem = lstm_bwd_cluster_smem_bytes(p.hidden, cluster);
    reset_step_buffer(p, grid, stream, "backward");
    cudaLaunchAttribute attrs[2];
    const cudaLaunchConfig_t config = cluster_config(grid, cluster, smem, stream, attrs);
    // A launch error is synchronous (nothing ran): a runtime or driver that does not take the
    // cooperative and cluster attributes together gets the kernel without clusters.
    if (cudaLaunchKernelEx(&config, cluster_kernel<T>(cluster), p) == cudaSuccess) return;
    refuse_clusters(d.device);
  }
  const int grid = (p.hidden + p.units - 1) / p.units;
  const size_t smem = lstm_bwd_smem_bytes(p.hidden, p.units);
  void (*kernel)(LstmBwdParams) = nullptr;
  switch (p.units) {
    case 8: kernel = &lstm_bwd_kernel<T, 1>; break;
    case 16: kernel = &lstm_bwd_kernel<T, 2>; break;
    case 24: kernel = &lstm_bwd_kernel<T, 3>; break;
    default: kernel = &lstm_bwd_kernel<T, 4>; break;
  }
  cooperative_launch(kernel, grid, smem, p, stream, "backward");
}

void check_shape(int seq_len, int batch, int hidden, int units) {
  TORCH_CHECK(seq_len >= 1, "sha_rnn_kernels LSTM: seq_len must be >= 1, got ", seq_len);
  TORCH_CHECK(batch >= 1 && batch <= kLstmMaxBatch, "sha_rnn_kernels LSTM: batch must be in [1, ",
              kLstmMaxBatch, "], got ", batch);
  TORCH_CHECK(hidden >= 8 && hidden % 8 == 0,
              "sha_rnn_kernels LSTM: hidden size must be a positive multiple of 8, got ", hidden);
  TORCH_CHECK(valid_units(units), "sha_rnn_kernels LSTM: units per block must be 8, 16, 24 or 32, got ",
              units);
}

}  // namespace

void lstm_forward_launch(LstmDtype dtype, const LstmFwdParams& params, cudaStream_t stream) {
  check_shape(params.seq_len, params.batch, params.hidden, params.units);
  if (dtype == LstmDtype::kFloat16)
    forward_typed<__half>(params, stream);
  else
    forward_typed<__nv_bfloat16>(params, stream);
}

void lstm_backward_launch(LstmDtype dtype, const LstmBwdParams& params, cudaStream_t stream) {
  check_shape(params.seq_len, params.batch, params.hidden, params.units);
  if (dtype == LstmDtype::kFloat16)
    backward_typed<__half>(params, stream);
  else
    backward_typed<__nv_bfloat16>(params, stream);
}

int lstm_backward_cluster_size(const LstmBwdParams& params) {
  check_shape(params.seq_len, params.batch, params.hidden, params.units);
  return backward_cluster_typed<__half>(params);
}

}  // namespace sha_rnn
