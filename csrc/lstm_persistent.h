// Persistent LSTM: host-side interface of csrc/lstm_persistent.cu.
//
// This header is plain C++ (no torch, no CUDA types beyond cudaStream_t) so that the binding
// (lstm_binding.cpp) and the kernels compile separately: the .cu never parses torch/extension.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#if defined(__CUDACC__)
#define SHA_RNN_HOST_DEVICE __host__ __device__
#else
#define SHA_RNN_HOST_DEVICE
#endif

namespace sha_rnn {

// Element type of every tensor the kernels read or write in the model's precision.
enum class LstmDtype : int { kFloat16 = 0, kBFloat16 = 1 };

// Fixed launch shape, shared with sha_rnn_kernels/_cuda.py (which repeats these numbers to
// decide, before anything is built, whether a shape fits on the device).
constexpr int kLstmWarps = 8;              // warps per block (256 threads)
constexpr int kLstmPartialSlots = 4;       // split-K partial tiles in shared memory
constexpr int kLstmMaxBatch = 64;          // batch rows: up to 4 m16 MMA tiles, looped
constexpr int kLstmUnitChoices[] = {8, 16, 24, 32};  // hidden units a block may own
// K chunks (32 wide) whose A loads a warp issues before its MMAs: forward (K = H: 4 chunks a
// warp at H = 1024, so one L2 round trip) and backward (K = 4H: 16 chunks, two round trips).
// Overridable only so that the CPU emulation reaches the multi-batch path at tiny sizes.
#ifndef SHA_RNN_LSTM_FWD_LOAD_BATCH
#define SHA_RNN_LSTM_FWD_LOAD_BATCH 4
#endif
#ifndef SHA_RNN_LSTM_BWD_LOAD_BATCH
#define SHA_RNN_LSTM_BWD_LOAD_BATCH 8
#endif
constexpr int kLstmFwdLoadBatch = SHA_RNN_LSTM_FWD_LOAD_BATCH;
constexpr int kLstmBwdLoadBatch = SHA_RNN_LSTM_BWD_LOAD_BATCH;

// Row stride (in elements) of a weight slice with `k` columns in shared memory: the smallest
// value >= k that is 32 modulo 64. A warp's 16-byte loads then touch rows g and g + 1 in
// different halves of the 32 banks, so the 8 lanes of each load phase never conflict.
SHA_RNN_HOST_DEVICE constexpr int lstm_smem_row_stride(int k) { return ((k + 31) / 64) * 64 + 32; }

// Row stride (in floats) of a split-K partial tile with `cols` columns (a multiple of 8): 8
// floats of padding put the rows g = 0..3 that a half-warp's 8-byte stores touch in different
// banks (cols is a multiple of 32 for the forward, where an unpadded stride is a 4-way
// conflict).
SHA_RNN_HOST_DEVICE constexpr int lstm_partial_stride(int cols) { return cols + 8; }

// Dynamic shared memory of the forward kernel for `units` hidden units per block:
//   W_hh slice   4*units rows x stride(H) x 2 bytes
//   partials     kLstmPartialSlots x 16 x partial_stride(4*units) x 4 bytes (split-K, fp32)
//   cell state   kLstmMaxBatch x units x 4 bytes (fp32, carried across the whole sequence)
constexpr size_t lstm_fwd_smem_bytes(int hidden, int units) {
  return size_t(4 * units) * lstm_smem_row_stride(hidden) * 2 +
         size_t(kLstmPartialSlots) * 16 * lstm_partial_stride(4 * units) * 4 +
         size_t(kLstmMaxBatch) * units * 4;
}

// Dynamic shared memory of the backward kernel:
//   W_hh^T slice units rows x stride(4H) x 2 bytes (the block's columns of W_hh)
//   partials     kLstmPartialSlots x 16 x partial_stride(units) x 4 bytes
//   dh, dc       2 x kLstmMaxBatch x units x 4 bytes
constexpr size_t lstm_bwd_smem_bytes(int hidden, int units) {
  return size_t(units) * lstm_smem_row_stride(4 * hidden) * 2 +
         size_t(kLstmPartialSlots) * 16 * lstm_partial_stride(units) * 4 +
         size_t(2) * kLstmMaxBatch * units * 4;
}

// The sm_90 backward in thread block clusters of C blocks (lstm_persistent.cu:
// lstm_bwd_cluster_kernel): the cluster owns 8 C units, block rank r multiplies the K range
// [r kr, (r + 1) kr) of dgates_t (kr = lstm_cluster_k_range) by W_hh^T for those 8 C units, and
// the partials meet through distributed shared memory. Tried largest first.
constexpr int kLstmClusterChoices[] = {8, 4, 2};
SHA_RNN_HOST_DEVICE constexpr int lstm_cluster_k_range(int hidden, int cluster) {
  return ((4 * hidden + cluster - 1) / cluster + 7) / 8 * 8;
}
// Dynamic shared memory of the cluster backward:
//   W_hh^T slice 8C rows x stride(kr) x 2 bytes
//   partials     kLstmPartialSlots x 16 x partial_stride(8C) x 4 bytes
//   slot sum     16 x 8C x 4 bytes (what the cluster's blocks read from each other)
//   dh, dc       2 x kLstmMaxBatch x 8 x 4 bytes
constexpr size_t lstm_bwd_cluster_smem_bytes(int hidden, int cluster) {
  return size_t(8 * cluster) * lstm_smem_row_stride(lstm_cluster_k_range(hidden, cluster)) * 2 +
         size_t(kLstmPartialSlots) * 16 * lstm_partial_stride(8 * cluster) * 4 +
         size_t(16) * 8 * cluster * 4 + size_t(2) * kLstmMaxBatch * 8 * 4;
}

struct LstmFwdParams {
  const void* xproj;  // [T, B, 4H] model dtype: x W_ih^T + b_ih + b_hh (a GEMM before the loop)
  const void* w_hh;   // [4H, H]    model dtype, contiguous, 16-byte aligned
  const void* h0;     // [B, H]     model dtype, contiguous, 16-byte aligned
  const void* c0;     // [B, H]     model dtype
  void* out;          // [T, B, H]  model dtype: h_t for every t (also the next step's input)
  void* c_n;          // [B, H]     model dtype
  float* gates;       // [T, B, 4H] fp32 activated gates i, f, g, o; nullptr: not saved
  float* cells;       // [T, B, H]  fp32 cell states c_t;            nullptr: not saved
  unsigned long long* status;  // the error word (the launcher initialises it; see
                               // kLstmWaitLimitCycles), 8-byte aligned
  int seq_len, batch, hidden, units;
  long long wait_limit;  // cycles; 0: kLstmWaitLimitCycles
  int reserve_sms;       // SMs the launch must leave free (e.g. for NCCL); >= 0
};

struct LstmBwdParams {
  const void* w_hh;   // [4H, H]    model dtype, contiguous
  const float* gates; // [T, B, 4H] fp32, saved by the forward
  const float* cells; // [T, B, H]  fp32, saved by the forward
  const void* c0;     // [B, H]     model dtype
  const void* d_out;  // [T, B, H]  model dtype: gradient of out
  const void* d_hn;   // [B, H]     model dtype
  const void* d_cn;   // [B, H]     model dtype
  void* d_gates;      // [T, B, 4H] model dtype: gradient of the gate pre-activations
  void* d_h0;         // [B, H]     model dtype
  void* d_c0;         // [B, H]     model dtype
  unsigned long long* status;  // as LstmFwdParams::status
  int seq_len, batch, hidden, units;
  long long wait_limit;  // cycles; 0: kLstmWaitLimitCycles
  int reserve_sms;       // SMs the launch must leave free; >= 0
};

// Number of blocks of a launch (without clusters).
constexpr int lstm_grid_blocks(int hidden, int units) { return (hidden + units - 1) / units; }

// Step hand-off. A block publishes its share of step t (h_t in the forward, dgates_t in the
// backward) with 32-bit relaxed stores of two model-dtype values each, into a buffer the
// launcher filled with kLstmUnpublished beforehand; a block that needs them polls those words
// with relaxed loads until none reads kLstmUnpublished. A stored pair never equals it (a pair
// of 0xFFFF NaNs is stored as 0xFFFF7FFF, still NaN). No flags, no fences: each word carries
// its own "published" state.
constexpr unsigned kLstmUnpublished = 0xFFFFFFFFu;

// Bounded waits. A thread that polls a word for longer than kLstmWaitLimitCycles (clock64
// cycles of its SM: ~4.9 s at an H100's 1.755 GHz, ~6.1 s at an A100's 1.41 GHz; a legal wait
// is a few microseconds) gives up: it records the error word and every later wait of every
// block returns at once, so the launch ends instead of hanging. The status buffer the
// launcher passes the kernels is kLstmStatusWords 32-bit words holding the error word (uint64,
// all ones = no error, else (step << 32) | (late block << 16) | waiting block, the smallest
// step winning; step counts as the epochs of sha_rnn_kernels/_cuda.py: status_error, which
// decodes it and raises naming the pass, step and blocks).
constexpr long long kLstmWaitLimitCycles = 1LL << 33;
constexpr int kLstmStatusWords = 2;
constexpr unsigned long long kLstmNoError = ~0ULL;

// Launch the cooperative kernels on `stream`. Both check the launch against the device
// (shared memory, co-resident blocks) and throw c10::Error with the reason when it cannot run.
void lstm_forward_launch(LstmDtype dtype, const LstmFwdParams& params, cudaStream_t stream);
void lstm_backward_launch(LstmDtype dtype, const LstmBwdParams& params, cudaStream_t stream);
// The cluster size the backward launch uses on the current device (1: no clusters).
int lstm_backward_cluster_size(const LstmBwdParams& params);

}  // namespace sha_rnn
