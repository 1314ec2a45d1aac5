// Persistent LSTM (torch.nn.LSTM semantics, one layer, time-major) for sm_80 and newer.
//
// One cooperative launch runs the whole time loop (cooperative for its guarantee that all G
// blocks are resident at once, which the step hand-off below relies on: a block polling for
// another block's words never waits for a block that has not started). The grid has
// G = ceil(H / units) blocks (at most one per SM); block g owns the hidden units j in
// [g*units, (g+1)*units) and keeps the rows of W_hh those units need in shared memory for the
// whole sequence, so the recurrent weights are read from HBM once per launch instead of once
// per step.
//
// Step hand-off (no flags, no fences): the launcher fills the buffer a launch publishes into
// (out, d_gates) with kLstmUnpublished words; a block publishes its values two at a time with
// 32-bit relaxed stores (pack2 never produces the unpublished word), and a block that needs
// them polls them with relaxed 16-byte loads until no word reads unpublished (warp_gemm,
// wait_published). The first poll is the load of the data: a hand-off costs the store's trip
// to L2 and one poll, not a fence, a flag store, a flag poll and then the data load.
//
// Forward, step t:
//   1. MMA: the block computes its B x 4*units slice of h_{t-1} W_hh^T with mma.sync
//      m16n8k16 (fp16/bf16 in, fp32 accumulate), one 16-row batch tile after another (B <= 64:
//      up to 4 tiles; a partial tile clamps its row index). h_{t-1} is polled from out[t-1]
//      (h0 at t = 0, a plain load), the W_hh slice read from shared memory. The 8 warps split
//      K (= H) in 32-wide chunks and their partial tiles are summed in shared memory.
//   2. Gates and cell update for the block's units, fused: pre = partial + xproj[t] (xproj =
//      x W_ih^T + b_ih + b_hh, a GEMM done before the loop); c stays in fp32 shared memory for
//      the whole sequence; h_t is published to out[t], where every block polls it at step t+1.
//   3. The loads of xproj[t + 1] are issued; they fly during the next step's polls.
// Saved for backward (only when a gradient is needed): the activated gates i, f, g, o and
// c_t in fp32; tanh(c_t) is recomputed.
//
// Backward, step t from T-1 down to 0:
//   1. Elementwise for the block's units: dh = d_out[t] + dh_rec (dh_rec: the block's
//      columns of dgates_{t+1} W_hh, or d_hn at t = T-1), dc = dc_next + dh o (1 - tanh^2 c),
//      dgates_t = [dc g i(1-i), dc c_{t-1} f(1-f), dc i (1-g^2), dh tanh(c) o(1-o)] published
//      to d_gates[t] (also the input of the weight-gradient GEMMs), dc_next = dc f.
//   2. The loads of step t-1's gates, cells and d_out are issued (they fly during the polls).
//   3. MMA: the block computes its B x units slice of dh_{t-1} = dgates_t W_hh: the block
//      owns the columns of W_hh of its units (4H x units, resident in shared memory), polls
//      all of dgates_t (B x 4H), one 16-row tile after another. On sm_90 the backward runs in
//      thread block clusters instead (lstm_bwd_cluster_kernel): the blocks of a cluster split
//      K and each polls 1/C of dgates_t.
// dW_ih = dgates^T x, dW_hh = dgates^T h_{t-1}, db = sum dgates, dx = dgates W_ih are large
// GEMMs done after the loop (sha_rnn_kernels/_cuda.py).
//
// Shared memory (H = 1024, units = 8, bf16): forward 32 x 1056 x 2 + 4 x 16 x 40 x 4 + 64 x 8
// x 4 = 79,872 bytes; backward 8 x 4128 x 2 + 4 x 16 x 16 x 4 + 2 x 64 x 8 x 4 = 74,240 bytes
// (formulas in lstm_persistent.h). 128 blocks fit the 132 SMs of an H100 at one block per SM.
//
// Per-step budget (bytes per block and grid from L2 and shared memory, FLOPs, the hand-off,
// the latency chain, H100 and A100): docs/design/lstm.md. In short (estimated, H100, bf16,
// H = 1024, B = 16): the hand-off through published words costs ~1.5 L2 round trips where
// flags cost ~3.5 (fence, flag, poll, data load); the sm_90 backward's clusters cut its L2
// reads from 16.8 MB to 2.1 MB per step.
// Not done: saving gates/cells in the model dtype (it would halve their memory, but their
// stores are off the critical path: no latency gain, and bf16 gates add error to every
// gradient).
//
// Sync points: __syncthreads after the weight slice load; once per step between the block's
// publishing stores and its polls (so that no warp polls before its own block has published:
// warps without elementwise work would otherwise poll early and miss; it also orders the
// elementwise phase's reads of the split-K partials before the next writes); per batch tile
// after the first, __syncthreads before the partials are written; between the two halves of
// the split-K sum and before the elementwise phase. The fp32 state in shared memory is private
// to its thread (see owned_per_thread). All of this runs on the CPU under csrc/emu/cuda_emu.h
// (tests/test_lstm_emulation.py), including a ThreadSanitizer build.
//
#include "lstm_persistent.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
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

// Two adjacent model-dtype values as one 32-bit word (the lower index in the low half), and
// back. pack2 never returns kLstmUnpublished: a pair of 0xFFFF NaNs becomes 0xFFFF7FFF.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T a = from_float<T>(lo), b = from_float<T>(hi);
  uint16_t la, lb;
  memcpy(&la, &a, 2);
  memcpy(&lb, &b, 2);
  const uint32_t word = uint32_t(la) | (uint32_t(lb) << 16);
  return word == kLstmUnpublished ? 0xFFFF7FFFu : word;
}
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t word) {
  const uint16_t la = uint16_t(word & 0xFFFFu), lb = uint16_t(word >> 16);
  T a, b;
  memcpy(&a, &la, 2);
  memcpy(&b, &lb, 2);
  return make_float2(to_float(a), to_float(b));
}
// The pair of model-dtype values at `ptr` (4-byte aligned), as floats, and its plain store (an
// output nobody polls during the launch; published words go through SHA_RNN_PUBLISH_U32).
template <typename T>
__device__ __forceinline__ float2 load2(const T* ptr) {
  return unpack2<T>(*reinterpret_cast<const uint32_t*>(ptr));
}
template <typename T>
__device__ __forceinline__ void store2(T* ptr, float lo, float hi) {
  *reinterpret_cast<uint32_t*>(ptr) = pack2<T>(lo, hi);
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
// The step hand-off (lstm_persistent.h, kLstmUnpublished): a block publishes a pair of
// model-dtype values with a 32-bit relaxed store at GPU scope and reads its inputs with relaxed
// 16-byte vector loads (four 32-bit words, each of which is one publishing store: PTX models a
// vector access as independent scalar accesses, so every word is seen whole, published or not).
// `step` is the epoch being published (the CPU emulation's planted faults use it). A short
// back-off between polls.
#ifndef SHA_RNN_PUBLISH_U32
#define SHA_RNN_PUBLISH_U32(ptr, value, step) \
  asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory")
#endif
#ifndef SHA_RNN_POLL_V4
#define SHA_RNN_POLL_V4(ptr, out)                                                  \
  asm volatile("ld.relaxed.gpu.global.v4.u32 {%0, %1, %2, %3}, [%4];"               \
               : "=r"((out).x), "=r"((out).y), "=r"((out).z), "=r"((out).w) : "l"(ptr))
#endif
#ifndef SHA_RNN_UNPUBLISHED
#define SHA_RNN_UNPUBLISHED(word) ((word) == kLstmUnpublished)
#endif
#ifndef SHA_RNN_SPIN_PAUSE
#define SHA_RNN_SPIN_PAUSE() __nanosleep(20)
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

// Where a warp_gemm's A operand comes from. error == nullptr: an input of the launch (h0),
// read with plain L2 loads. Otherwise words another block publishes during the launch (h_t,
// dgates_t): polled until published (see wait_published), for at most `limit` cycles.
// Column k of A (counted from col0, where the caller's A starts) belongs to block
// ((col0 + k) % col_period) / cols_per_block, whom the error word names.
struct PollPlan {
  unsigned long long* error;
  long long limit;
  unsigned epoch;
  int col0, col_period, cols_per_block;
};

__device__ __forceinline__ bool unpublished(const uint4& v) {
  return SHA_RNN_UNPUBLISHED(v.x) || SHA_RNN_UNPUBLISHED(v.y) || SHA_RNN_UNPUBLISHED(v.z) ||
         SHA_RNN_UNPUBLISHED(v.w);
}

// Re-poll a lane's A vectors lo[i] / hi[i] (loaded from a_lo + k0_i / a_hi + k0_i) until none
// holds an unpublished word. The loads were issued once already; a lane whose words were all
// published (the common case once blocks run in step) leaves at once. Bounded: past
// plan.limit cycles the lane records the error word (atomicMin of (epoch << 32) | (late block
// << 16) | this block) and returns; a lane that finds the error word set returns too, so from
// then on no wait of any block waits and the launch ends on stale data (the host raises).
template <typename T, int kBatch>
__device__ __forceinline__ void wait_published(uint4 (&lo)[kBatch], uint4 (&hi)[kBatch],
                                               const T* a_lo, const T* a_hi, int k_base,
                                               int k_total, int q, const PollPlan& plan) {
  constexpr int kStep = kLstmWarps * 32;
  static_assert(2 * kBatch <= 32, "one pending bit per vector");
  unsigned pending = 0;  // bit 2i: lo[i], bit 2i + 1: hi[i]; first every vector inside K
#pragma unroll
  for (int i = 0; i < kBatch; ++i)
    if (k_base + i * kStep + 8 * q < k_total) pending |= 3u << (2 * i);
  unsigned long long recorded = kLstmNoError;
  long long start = 0;
  for (bool first = true;; first = false) {
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      if ((pending & (1u << (2 * i))) && !unpublished(lo[i])) pending &= ~(1u << (2 * i));
      if ((pending & (2u << (2 * i))) && !unpublished(hi[i])) pending &= ~(2u << (2 * i));
    }
    if (pending == 0) return;
    if (recorded != kLstmNoError) return;  // another wait gave up: the launch is void
    const long long now = SHA_RNN_CLOCK64();
    if (first) {
      start = now;
    } else if (now - start > plan.limit) {
      const int first_pending = __ffs(pending) - 1;
      const int k = plan.col0 + k_base + (first_pending >> 1) * kStep + 8 * q;
      const unsigned late = unsigned(k % plan.col_period) / unsigned(plan.cols_per_block);
      atomicMin(plan.error, (static_cast<unsigned long long>(plan.epoch) << 32) |
                                (static_cast<unsigned long long>(late) << 16) | blockIdx.x);
      return;
    }
    SHA_RNN_SPIN_PAUSE();
    // The re-polls and the error word's load are in flight together: one round trip a round.
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int k0 = k_base + i * kStep;
      if (pending & (1u << (2 * i))) SHA_RNN_POLL_V4(a_lo + k0, lo[i]);
      if (pending & (2u << (2 * i))) SHA_RNN_POLL_V4(a_hi + k0, hi[i]);
    }
    SHA_RNN_LOAD_RELAXED_GPU_U64(plan.error, recorded);
  }
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
// for one L2 round trip per kBatch chunks instead of one per chunk (polled A: the first poll
// is that load; only unpublished vectors are loaded again); chunk i accumulates into set
// i % kSets, so a long K (the backward's 4H) runs kSets independent MMA chains. The caller
// adds the sets. Chunks wholly past K (warp-uniform) issue no MMA.
template <typename T, int NT, int kBatch, int kSets>
__device__ __forceinline__ void warp_gemm(const T* __restrict__ a, int lda, int rows, int k_total,
                                          const T* __restrict__ w_s, int ldw, int warp, int lane,
                                          const PollPlan& plan, float (&acc)[kSets][NT][4]) {
  constexpr int kStep = kLstmWarps * 32;
  const int g = lane >> 2;
  const int q = lane & 3;
  const T* a_lo = a + static_cast<size_t>(min(g, rows - 1)) * lda + 8 * q;
  const T* a_hi = a + static_cast<size_t>(min(g + 8, rows - 1)) * lda + 8 * q;
  const T* w_row = w_s + g * ldw + 8 * q;
  const bool poll = plan.error != nullptr;
  for (int k_base = warp * 32; k_base < k_total; k_base += kBatch * kStep) {
    uint4 lo[kBatch], hi[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int k0 = k_base + i * kStep;
      lo[i] = make_uint4(0u, 0u, 0u, 0u);
      hi[i] = lo[i];
      if (k0 + 8 * q < k_total) {
        if (poll) {
          SHA_RNN_POLL_V4(a_lo + k0, lo[i]);
          SHA_RNN_POLL_V4(a_hi + k0, hi[i]);
        } else {
          // .cg: served by L2, never by a possibly stale L1 line.
          lo[i] = __ldcg(reinterpret_cast<const uint4*>(a_lo + k0));
          hi[i] = __ldcg(reinterpret_cast<const uint4*>(a_hi + k0));
        }
      }
    }
    if (poll) wait_published<T, kBatch>(lo, hi, a_lo, a_hi, k_base, k_total, q, plan);
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

// The block's elementwise work is the [B x kUnits / 2] grid of (batch row b, unit pair p: units
// 2p and 2p + 1, whose values one 32-bit word publishes); pair e = b * kUnits / 2 + p belongs
// to thread e % kThreads at every phase and step, so the fp32 state kept in shared memory (c,
// dh, dc) is private to its thread and needs no barrier. A thread owns at most kOwned pairs (at
// B = kLstmMaxBatch); its i-th is e = threadIdx.x + i * kThreads.
template <int kUnits>
__host__ __device__ constexpr int owned_per_thread() {
  return (kLstmMaxBatch * (kUnits / 2) + kThreads - 1) / kThreads;
}

// Batch row and first unit (within the block) of the thread's i-th pair.
template <int kUnits>
__device__ __forceinline__ void owned_pair(int i, int& b, int& u) {
  const int e = threadIdx.x + i * kThreads;
  b = e / (kUnits / 2);
  u = 2 * (e % (kUnits / 2));
}

// xproj[t] of the thread's pairs (0 past B or H), all four gates: registers, loaded ahead.
template <typename T, int kUnits, int kOwned>
__device__ __forceinline__ void load_xproj(float (&xq)[kOwned][4][2], const T* xproj, int t,
                                           int B, int H, int unit0) {
  const T* xp = xproj + size_t(t) * B * 4 * H;
#pragma unroll
  for (int i = 0; i < kOwned; ++i) {
    int b, u;
    owned_pair<kUnits>(i, b, u);
    const int j = unit0 + u;
    const bool live = b < B && j < H;  // H % 8 == 0: j + 1 < H too
#pragma unroll
    for (int gate = 0; gate < 4; ++gate) {
      const float2 v = live ? load2(xp + size_t(b) * 4 * H + gate * H + j) : make_float2(0.f, 0.f);
      xq[i][gate][0] = v.x;
      xq[i][gate][1] = v.y;
    }
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
    int b, u;
    owned_pair<kUnits>(i, b, u);
    const int j = unit0 + u;
    if (b >= B) continue;
    const float2 c = j < H ? load2(c0 + b * H + j) : make_float2(0.f, 0.f);
    c_s[b * kUnits + u] = c.x;
    c_s[b * kUnits + u + 1] = c.y;
  }
  float xq[kOwned][4][2];
  load_xproj<T, kUnits>(xq, xproj, 0, B, H, unit0);
  __syncthreads();

  for (int t = 0; t < T_len; ++t) {
    // h_{t-1}: h0 (an input) or out[t-1], which every block publishes during step t-1 (epoch t).
    const T* h_prev = t == 0 ? h0 : out + size_t(t - 1) * B * H;
    const PollPlan plan{t == 0 ? nullptr : p.status, limit, unsigned(t), 0, H, kUnits};
    for (int row0 = 0; row0 < B; row0 += 16) {
      const int rows = min(16, B - row0);
      float acc[1][kTiles][4];
      zero(acc);
      warp_gemm<T, kTiles, kLstmFwdLoadBatch, 1>(h_prev + size_t(row0) * H, H, rows, H, w_s,
                                                 ldw, warp, lane, plan, acc);
      if (row0 > 0) __syncthreads();  // the previous tile's gate phase has read part_s
      reduce_partials<kTiles>(part_s, acc[0], warp, lane);

#pragma unroll
      for (int i = 0; i < kOwned; ++i) {
        int b, u;
        owned_pair<kUnits>(i, b, u);
        const int j = unit0 + u;
        if (b < row0 || b >= row0 + rows || j >= H) continue;
        float h2[2], c2[2], act[2][4];
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          float pre[4];
#pragma unroll
          for (int gate = 0; gate < 4; ++gate)
            pre[gate] =
                partial_sum(part_s, kRows, b - row0, gate * kUnits + u + s) + xq[i][gate][s];
          act[s][0] = sigmoid(pre[0]);
          act[s][1] = sigmoid(pre[1]);
          act[s][2] = tanhf(pre[2]);
          act[s][3] = sigmoid(pre[3]);
          c2[s] = act[s][1] * c_s[b * kUnits + u + s] + act[s][0] * act[s][2];
          c_s[b * kUnits + u + s] = c2[s];
          h2[s] = act[s][3] * tanhf(c2[s]);
        }
        const size_t row = size_t(t) * B + b;
        SHA_RNN_PUBLISH_U32(out + row * H + j, pack2<T>(h2[0], h2[1]), unsigned(t + 1));
        if (p.gates != nullptr) {
#pragma unroll
          for (int gate = 0; gate < 4; ++gate)
            *reinterpret_cast<float2*>(p.gates + row * 4 * H + gate * H + j) =
                make_float2(act[0][gate], act[1][gate]);
        }
        if (p.cells != nullptr)
          *reinterpret_cast<float2*>(p.cells + row * H + j) = make_float2(c2[0], c2[1]);
        if (t == T_len - 1) store2(static_cast<T*>(p.c_n) + b * H + j, c2[0], c2[1]);
      }
    }
    // xproj[t + 1] does not depend on the recurrence: its loads fly during the next step's
    // polls of h_t.
    if (t + 1 < T_len) load_xproj<T, kUnits>(xq, xproj, t + 1, B, H, unit0);
    // No warp polls h_t before this block has published its part (warps without gate work
    // would poll early and miss), and the gate phase has read part_s before the next step's
    // partials are written.
    __syncthreads();
  }
}

// What the backward's elementwise phase of step t reads from global memory for the thread's
// pairs: gates i, f, g, o, c_t, c_{t-1} (c0 at t = 0) and d_out[t]. Loaded one step ahead.
template <typename T, int kUnits, int kOwned>
__device__ __forceinline__ void load_bwd_inputs(float (&in)[kOwned][7][2], const LstmBwdParams& p,
                                                int t, int unit0) {
  const int B = p.batch, H = p.hidden;
  const T* c0 = static_cast<const T*>(p.c0);
  const T* d_out = static_cast<const T*>(p.d_out);
#pragma unroll
  for (int i = 0; i < kOwned; ++i) {
    int b, u;
    owned_pair<kUnits>(i, b, u);
    const int j = unit0 + u;
    if (b >= B || j >= H) continue;
    const size_t row = size_t(t) * B + b;
    float2 v[7];
#pragma unroll
    for (int gate = 0; gate < 4; ++gate)
      v[gate] = *reinterpret_cast<const float2*>(p.gates + row * 4 * H + gate * H + j);
    v[4] = *reinterpret_cast<const float2*>(p.cells + row * H + j);
    v[5] = t > 0 ? *reinterpret_cast<const float2*>(p.cells + (row - B) * H + j)
                 : load2(c0 + b * H + j);
    v[6] = load2(d_out + row * H + j);
#pragma unroll
    for (int k = 0; k < 7; ++k) {
      in[i][k][0] = v[k].x;
      in[i][k][1] = v[k].y;
    }
  }
}

// The backward's carried gradients for the thread's pairs at the sequence end: dh_s = d_hn,
// dc_s = d_cn (zero for the padded units past H).
template <typename T, int kUnits, int kOwned>
__device__ __forceinline__ void init_bwd_state(float* dh_s, float* dc_s, const LstmBwdParams& p,
                                               int unit0) {
  const int B = p.batch, H = p.hidden;
  const T* d_hn = static_cast<const T*>(p.d_hn);
  const T* d_cn = static_cast<const T*>(p.d_cn);
#pragma unroll
  for (int i = 0; i < kOwned; ++i) {
    int b, u;
    owned_pair<kUnits>(i, b, u);
    const int j = unit0 + u;
    if (b >= B) continue;
    const float2 dh = j < H ? load2(d_hn + b * H + j) : make_float2(0.f, 0.f);
    const float2 dc = j < H ? load2(d_cn + b * H + j) : make_float2(0.f, 0.f);
    dh_s[b * kUnits + u] = dh.x;
    dh_s[b * kUnits + u + 1] = dh.y;
    dc_s[b * kUnits + u] = dc.x;
    dc_s[b * kUnits + u + 1] = dc.y;
  }
}

// Step t's elementwise backward for the thread's pairs (both backward kernels): from
// dh = d_out[t] + dh_s and the carried dc, the four gate gradients, published into dgates_t
// (model dtype, epoch T - t); dc_s becomes dc * f, which at t = 0 is d_c0.
template <typename T, int kUnits, int kOwned>
__device__ __forceinline__ void bwd_elementwise(const float (&in)[kOwned][7][2], const float* dh_s,
                                                float* dc_s, T* dg_t, const LstmBwdParams& p,
                                                int unit0, int t) {
  const int B = p.batch, H = p.hidden, G4 = 4 * H;
  const unsigned epoch = unsigned(p.seq_len - t);
#pragma unroll
  for (int i = 0; i < kOwned; ++i) {
    int b, u;
    owned_pair<kUnits>(i, b, u);
    const int j = unit0 + u;
    if (b >= B || j >= H) continue;
    float dg[4][2], dc_prev[2];
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const float ig = in[i][0][s], fg = in[i][1][s], gg = in[i][2][s], og = in[i][3][s];
      const float c = in[i][4][s], c_prev = in[i][5][s];
      const float tc = tanhf(c);
      const float dh = in[i][6][s] + dh_s[b * kUnits + u + s];
      const float dc = dc_s[b * kUnits + u + s] + dh * og * (1.0f - tc * tc);
      dg[0][s] = dc * gg * ig * (1.0f - ig);
      dg[1][s] = dc * c_prev * fg * (1.0f - fg);
      dg[2][s] = dc * ig * (1.0f - gg * gg);
      dg[3][s] = dh * tc * og * (1.0f - og);
      dc_prev[s] = dc * fg;
      dc_s[b * kUnits + u + s] = dc_prev[s];
    }
    T* row = dg_t + size_t(b) * G4 + j;
#pragma unroll
    for (int gate = 0; gate < 4; ++gate)
      SHA_RNN_PUBLISH_U32(row + gate * H, pack2<T>(dg[gate][0], dg[gate][1]), epoch);
    if (t == 0) store2(static_cast<T*>(p.d_c0) + b * H + j, dc_prev[0], dc_prev[1]);
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
  float in[kOwned][7][2];
  load_bwd_inputs<T, kUnits>(in, p, T_len - 1, unit0);
  __syncthreads();

  for (int t = T_len - 1; t >= 0; --t) {
    T* dg_t = d_gates + size_t(t) * B * G4;
    bwd_elementwise<T, kUnits, kOwned>(in, dh_s, dc_s, dg_t, p, unit0, t);
    // Step t - 1's saved activations and d_out do not depend on the recurrence: their loads
    // fly during the polls and the MMA.
    if (t > 0) load_bwd_inputs<T, kUnits>(in, p, t - 1, unit0);
    // No warp polls dgates_t before this block has published its part, and the previous
    // step's dh phase has read part_s before this step's partials are written.
    __syncthreads();
    // dgates_t column k is unit k % H's gradient, published by block (k % H) / kUnits.
    const PollPlan plan{p.status, limit, unsigned(T_len - t), 0, H, kUnits};

    for (int row0 = 0; row0 < B; row0 += 16) {
      const int rows = min(16, B - row0);
      float acc[2][kTiles][4];
      zero(acc);
      warp_gemm<T, kTiles, kBwdLoadBatch, 2>(dg_t + size_t(row0) * G4, G4, rows, G4, w_s,
                                                 ldw, warp, lane, plan, acc);
#pragma unroll
      for (int n = 0; n < kTiles; ++n)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[0][n][r] += acc[1][n][r];
      if (row0 > 0) __syncthreads();  // the previous tile's dh phase has read part_s
      reduce_partials<kTiles>(part_s, acc[0], warp, lane);

#pragma unroll
      for (int i = 0; i < kOwned; ++i) {
        int b, u;
        owned_pair<kUnits>(i, b, u);
        const int j = unit0 + u;
        if (b < row0 || b >= row0 + rows) continue;
        const float d0 = partial_sum(part_s, kUnits, b - row0, u);
        const float d1 = partial_sum(part_s, kUnits, b - row0, u + 1);
        dh_s[b * kUnits + u] = d0;
        dh_s[b * kUnits + u + 1] = d1;
        if (t == 0 && j < H)
          store2(static_cast<T*>(p.d_h0) + b * H + j, d0, d1);
      }
    }
  }
}

// Backward in clusters of C blocks (sm_90). The grid is ceil(H / 8) blocks rounded up to a
// multiple of C; block g still owns units [8g, 8g + 8) for the elementwise phase (dgates, dc,
// dh), but the recurrent product dh_{t-1} = dgates_t W_hh is split by K inside the cluster:
// rank r of cluster c keeps W_hh^T for the cluster's 8C units and K range [r kr, (r + 1) kr)
// (kr = lstm_cluster_k_range) and polls only that range of dgates_t from L2 (1/C of the bytes
// of lstm_bwd_kernel), producing a [16 x 8C] fp32 partial. Per 16-row tile: split-K reduce in
// the block, the block sums its slots into sum_s, cluster barrier, each block gathers the
// columns of its own 8 units from the C blocks' sum_s (distributed shared memory), then
// arrives at the cluster barrier whose wait comes just before sum_s is written again (or
// before the block exits: no block leaves while another may still read its shared memory).
// That wait orders every gather before the next write of the sum_s it read; by then the
// others' gathers are long done (a step's elementwise phase, polls and MMA lie between), so
// it costs a barrier's latency, not a wait.
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
  float in[kOwned][7][2];
  load_bwd_inputs<T, kUnits>(in, p, T_len - 1, unit0);
  __syncthreads();

  bool arrived = false;  // an arrive at the cluster barrier whose wait is still due
  for (int t = T_len - 1; t >= 0; --t) {
    T* dg_t = d_gates + size_t(t) * B * G4;
    bwd_elementwise<T, kUnits, kOwned>(in, dh_s, dc_s, dg_t, p, unit0, t);
    if (t > 0) load_bwd_inputs<T, kUnits>(in, p, t - 1, unit0);
    __syncthreads();  // no warp polls dgates_t before this block has published its part
    const PollPlan plan{p.status, limit, unsigned(T_len - t), k_begin, H, kUnits};

    for (int row0 = 0; row0 < B; row0 += 16) {
      const int rows = min(16, B - row0);
      float acc[kSets][C][4];
      zero(acc);
      warp_gemm<T, C, kBatch, kSets>(dg_t + size_t(row0) * G4 + k_begin, G4, rows, k_len, w_s,
                                     ldw, warp, lane, plan, acc);
      if constexpr (kSets == 2) {
#pragma unroll
        for (int n = 0; n < C; ++n)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[0][n][r] += acc[1][n][r];
      }
      // part_s: every thread of the block read the previous tile's partials (the slot sums)
      // before the cluster barrier that follows them, which all of them have passed.
      reduce_partials<C>(part_s, acc[0], warp, lane);
      if (arrived) SHA_RNN_CLUSTER_WAIT();  // every block has read the previous sum_s
      for (int idx = threadIdx.x; idx < 16 * kClusterUnits; idx += kThreads)
        sum_s[idx] = partial_sum(part_s, kClusterUnits, idx / kClusterUnits, idx % kClusterUnits);
      SHA_RNN_CLUSTER_ARRIVE();  // sum_s of every block of the cluster complete and visible
      SHA_RNN_CLUSTER_WAIT();

#pragma unroll
      for (int i = 0; i < kOwned; ++i) {
        int b, u;
        owned_pair<kUnits>(i, b, u);
        const int j = unit0 + u;
        if (b < row0 || b >= row0 + rows) continue;
        const int col = int(rank) * kUnits + u, row = b - row0;
        float d0 = 0.0f, d1 = 0.0f;
#pragma unroll
        for (int q = 0; q < C; ++q) {
          const float2 v = *reinterpret_cast<const float2*>(
              SHA_RNN_CLUSTER_MAP(sum_s, unsigned(q)) + row * kClusterUnits + col);
          d0 += v.x;
          d1 += v.y;
        }
        dh_s[b * kUnits + u] = d0;
        dh_s[b * kUnits + u + 1] = d1;
        if (t == 0 && j < H)
          store2(static_cast<T*>(p.d_h0) + b * H + j, d0, d1);
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

// Before a launch, on its stream: the error word all ones (no error), and the words the kernel
// publishes during the launch all kLstmUnpublished (`bytes` from `handoff`).
template <typename Params>
void prepare_launch(const Params& params, void* handoff, size_t bytes, cudaStream_t stream,
                    const char* what) {
  TORCH_CHECK(params.status != nullptr, "sha_rnn_kernels LSTM ", what, ": no status buffer");
  TORCH_CHECK(reinterpret_cast<std::uintptr_t>(params.status) % 8 == 0, "sha_rnn_kernels LSTM ",
              what, ": the status buffer must be 8-byte aligned (its error word is a uint64)");
  TORCH_CHECK(reinterpret_cast<std::uintptr_t>(handoff) % 16 == 0, "sha_rnn_kernels LSTM ",
              what, ": the output buffers must be 16-byte aligned");
  static_assert(kLstmUnpublished == 0xFFFFFFFFu, "filled with 0xFF bytes");
  SHA_RNN_CUDA_CHECK(cudaMemsetAsync(params.status, 0xff, sizeof(unsigned long long), stream));
  if (bytes > 0) SHA_RNN_CUDA_CHECK(cudaMemsetAsync(handoff, 0xff, bytes, stream));
}

// Bytes the forward publishes and reads back during the launch: out[0 .. T-2] (out[T-1] is
// read by nobody). The backward: all of d_gates.
size_t forward_handoff_bytes(const LstmFwdParams& p) {
  return size_t(p.seq_len - 1) * p.batch * p.hidden * 2;
}
size_t backward_handoff_bytes(const LstmBwdParams& p) {
  return size_t(p.seq_len) * p.batch * 4 * p.hidden * 2;
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
  // Called after prepare_launch (on the same stream).
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
  prepare_launch(p, p.out, forward_handoff_bytes(p), stream, "forward");
  cooperative_launch(kernel, grid, smem, p, stream, "forward");
}

using BwdKernel = void (*)(LstmBwdParams);

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
    if (grid > sms || smem > static_cast<size_t>(d.smem_optin)) continue;
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
  prepare_launch(p, p.d_gates, backward_handoff_bytes(p), stream, "backward");
  if (cluster > 1) {
    const int grid = cluster_grid(p.hidden, cluster);
    const size_t smem = lstm_bwd_cluster_smem_bytes(p.hidden, cluster);
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
