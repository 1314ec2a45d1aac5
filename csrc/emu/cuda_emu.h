// CPU emulation of the CUDA subset csrc/lstm_persistent.cu uses, so that g++ (C++20) compiles
// and runs the real kernels and their host launcher without a CUDA toolkit or a GPU.
//
// Not part of the CUDA build (csrc/emu/ is not shipped with the package and nvcc never sees
// it). Build: g++ -std=c++20 -pthread -Icsrc/emu/include -Icsrc -include cuda_emu.h -x c++
// csrc/lstm_persistent.cu <driver>.cpp. The stub headers in csrc/emu/include/ (cuda_runtime.h,
// cooperative_groups.h, cuda_bf16.h, ..., c10/util/Exception.h) all resolve to this file.
//
// Execution model
//   * One std::thread per CUDA thread: grid x block threads run at once (tiny sizes only).
//   * __syncthreads(): a std::barrier per block. cooperative_groups grid.sync(): one
//     std::barrier over every thread of the grid (what the hardware barrier guarantees: every
//     thread's earlier writes happen before every thread's later reads).
//   * The kernel's step hand-off (st.relaxed.gpu / ld.relaxed.gpu of 32-bit words behind the
//     hooks at the end of this file): std::atomic_ref relaxed stores and loads, the same
//     guarantees in the C++ memory model; a polling thread sleeps 50 us between polls.
//     clock64() is the steady clock scaled to CUDA_EMU_CLOCK_GHZ, so the bounded waits time
//     out.
//   * Warp-collective mma.sync: a std::barrier per warp and per-warp scratch (below).
//   * Thread block clusters (cudaLaunchKernelEx with the cluster dimension): consecutive
//     blocks form a cluster; barrier.cluster.arrive / wait are a split std::barrier over the
//     cluster's threads, mapa maps a shared-memory address to the same offset in another
//     block's shared memory (distributed shared memory reads are plain loads, ordered by the
//     cluster barrier). Clusters of a cooperative launch must be co-resident: per GPC of
//     CUDA_EMU_GPC_SMS SMs (default 16), floor(SMs x blocks per SM / cluster) clusters.
//   * Watchdog: a launch that does not finish within CUDA_EMU_WATCHDOG_S seconds (default 120)
//     prints where it hung and ends the process with status 124, so a missing barrier arrival
//     (a hang on a GPU) is a test failure, never a stuck CI job.
//   * Dynamic shared memory is filled with 0xFF bytes before the launch (NaN in fp32, fp16 and
//     bf16), so reading shared memory the kernel never wrote poisons the result.
//   * Global memory is host memory; __ldcg is a plain load (ordering comes from the barriers;
//     ThreadSanitizer sees every happens-before edge through std::barrier).
//
// Emulated runtime (the launch preconditions a GPU enforces; violating one returns an error
// that the launcher's SHA_RNN_CUDA_CHECK turns into an exception):
//   * block size <= 1024 threads, grid >= 1 block;
//   * dynamic shared memory > 48 KiB needs cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
//     on that kernel first, and at most the device's opt-in maximum;
//   * a cooperative grid must be co-resident: blocks <= occupancy per SM x SM count, occupancy
//     limited by threads (2048 per SM), shared memory per SM (plus 1 KiB reserved per block)
//     and registers: CUDA_EMU_BLOCKS_PER_SM_BY_REGS, default 1 (the kernels declare
//     __launch_bounds__(256, 1), which lets the compiler use up to 255 registers a thread:
//     one block of 256 threads fills the 65,536 registers of an SM).
//   Device (env, defaults an H100): CUDA_EMU_SM_COUNT=132, CUDA_EMU_SMEM_OPTIN=232448,
//   CUDA_EMU_SMEM_PER_SM=233472, CUDA_EMU_CC_MAJOR=9 (8: no clusters), CUDA_EMU_GPC_SMS=16,
//   CUDA_EMU_CLOCK_GHZ=0.01 (clock64; see there).
//
// Planted bugs (env CUDA_EMU_PLANT, for the tests that show the emulation catches them):
//   skip_syncthreads:N  every thread of every block skips its N-th __syncthreads() (N >= 1)
//   skip_grid_sync:N    every thread skips its N-th grid.sync()
//   swap_mma_a:         mma.sync gets A registers a1 and a2 swapped
//   no_smem_optin:      cudaFuncSetAttribute is accepted but has no effect
//   skip_poll:          readers take every hand-off word as published (stores held back)
//   plain_poll:         the hand-off polls are plain loads (a race ThreadSanitizer reports)
//   skip_cluster_sync:N every thread skips its N-th cluster barrier arrive and the wait after it
//   no_cooperative_clusters: cudaLaunchKernelEx refuses cooperative launches with clusters
//   lose_store:N        block CUDA_EMU_LOSE_BLOCK (default the last) publishes no step >= N
//                       (its words are lost): the other blocks' bounded waits must give up
//                       and set the error word
//
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 fragment table (PTX ISA,
// "Matrix Fragments for mma.m16n8k16 with floating point type"): groupID = lane >> 2,
// threadID_in_group = lane % 4; each .b32 register holds two 16-bit elements, the lower
// column/row index in the low half.
//   A (16 x 16, row-major), registers a0..a3 = elements a0..a7:
//     row = groupID       for a0, a1, a4, a5;   groupID + 8 for a2, a3, a6, a7
//     col = threadID_in_group * 2 + (i & 1)      for a0..a3
//           threadID_in_group * 2 + (i & 1) + 8  for a4..a7
//     i.e. reg0: (g, 2q..2q+1)  reg1: (g+8, 2q..2q+1)  reg2: (g, 2q+8..2q+9)  reg3: (g+8, 2q+8..)
//   B (16 x 8, col-major), registers b0, b1 = elements b0..b3:
//     row (k) = threadID_in_group * 2 + (i & 1)      for b0, b1
//               threadID_in_group * 2 + (i & 1) + 8  for b2, b3
//     col (n) = groupID
//   C, D (16 x 8, f32), c0..c3:
//     row = groupID for c0, c1; groupID + 8 for c2, c3;  col = threadID_in_group * 2 + (i & 1)
// The emulation: every lane writes its fragments to the warp's scratch, the warp meets at a
// barrier, every lane computes its own four D elements from the whole A, B and C (products
// exact in fp32, summed in fp32 in k order), the warp meets again (scratch reusable).
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- keywords ---------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// The kernel declares its dynamic shared memory through this hook (see lstm_persistent.cu).
#define SHA_RNN_EXTERN_SMEM(name) unsigned char* const name = ::cuda_emu::dynamic_smem()

// ---- vector types -----------------------------------------------------------------------------
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// ---- 16-bit floating point types (bit-exact round-to-nearest-even conversions) ---------------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline uint32_t cuda_emu_f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float cuda_emu_bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __bfloat162float(__nv_bfloat16 v) { return cuda_emu_bits_f32(uint32_t(v.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u = cuda_emu_f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}
inline float __half2float(__half v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  uint32_t exp = (v.bits >> 10) & 0x1fu, man = v.bits & 0x3ffu;
  if (exp == 0x1f) return cuda_emu_bits_f32(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return cuda_emu_bits_f32(sign);
    const float mag = std::ldexp(float(man), -24);  // subnormal: man * 2^-24, exact
    return sign ? -mag : mag;
  }
  return cuda_emu_bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}
inline __half __float2half_rn(float f) {
  const uint32_t u = cuda_emu_f32_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return {uint16_t(sign | 0x7e00u)};
  if (a >= 65520.0f) return {uint16_t(sign | 0x7c00u)};  // rounds to infinity
  if (a < std::ldexp(1.0f, -14)) {
    // Subnormal (or zero): units of 2^-24, rint rounds half to even.
    return {uint16_t(sign | uint16_t(std::nearbyint(std::ldexp(a, 24))))};
  }
  const uint32_t ua = u & 0x7fffffffu;
  uint32_t r = ua + 0xfffu + ((ua >> 13) & 1u);  // round the 13 dropped bits to nearest even
  r >>= 13;
  return {uint16_t(sign | uint16_t(r - (112u << 10)))};
}

// ---- errors, runtime types --------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorCooperativeLaunchTooLarge = 720,
  cudaErrorNotSupported = 801,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrCooperativeLaunch = 95,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrComputeCapabilityMajor = 75,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;
// cudaLaunchKernelEx's configuration: the two attributes the kernels use.
enum cudaLaunchAttributeID {
  cudaLaunchAttributeCooperative = 2,
  cudaLaunchAttributeClusterDimension = 4,
};
union cudaLaunchAttributeValue {
  char pad[64];
  int cooperative;
  struct {
    unsigned x, y, z;
  } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes = 0;
  cudaStream_t stream = nullptr;
  cudaLaunchAttribute* attrs = nullptr;
  unsigned numAttrs = 0;
};

namespace cuda_emu {

inline int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}
inline int sm_count() { return env_int("CUDA_EMU_SM_COUNT", 132); }
inline int smem_optin() { return env_int("CUDA_EMU_SMEM_OPTIN", 232448); }
inline int smem_per_sm() { return env_int("CUDA_EMU_SMEM_PER_SM", 233472); }
inline int blocks_per_sm_by_regs() { return env_int("CUDA_EMU_BLOCKS_PER_SM_BY_REGS", 1); }
inline int cc_major() { return env_int("CUDA_EMU_CC_MAJOR", 9); }
// SMs per GPC: a cluster's blocks share one GPC (H100: 132 SMs in 8 GPCs of 16-18, so 16
// clusters of 8 at one block per SM).
inline int gpc_sms() { return std::min(env_int("CUDA_EMU_GPC_SMS", 16), sm_count()); }
constexpr int kDefaultSmem = 48 * 1024;
constexpr int kMaxThreadsPerSm = 2048;
constexpr int kReservedSmemPerBlock = 1024;

// CUDA_EMU_PLANT parsed once: which planted bug, and its N.
struct Plant {
  std::string what;
  long n = 0;
};
inline const Plant& plant() {
  static const Plant p = [] {
    Plant r;
    const char* v = std::getenv("CUDA_EMU_PLANT");
    if (v == nullptr) return r;
    std::string s(v);
    const auto colon = s.find(':');
    r.what = s.substr(0, colon);
    if (colon != std::string::npos) r.n = std::atol(s.c_str() + colon + 1);
    return r;
  }();
  return p;
}

inline thread_local std::string last_error_text;
inline cudaError_t fail(cudaError_t code, const std::string& why) {
  last_error_text = why;
  return code;
}

// Per-kernel attribute: the dynamic shared memory a launch may use (48 KiB until opted in).
inline std::mutex& attr_mutex() {
  static std::mutex m;
  return m;
}
inline std::map<const void*, int>& smem_attr() {
  static std::map<const void*, int> m;
  return m;
}

struct Warp {
  std::barrier<> sync{32};
  uint32_t a[32][4];
  uint32_t b[32][2];
  float c[32][4];
};

struct Block {
  explicit Block(size_t smem_bytes, int threads)
      : smem(smem_bytes + 16, 0xff), sync(threads), warps((threads + 31) / 32) {}
  std::vector<unsigned char> smem;
  std::barrier<> sync;
  std::vector<Warp> warps;
};

struct Launch {
  dim3 grid, block;
  unsigned cluster = 1;  // blocks per cluster (consecutive blockIdx.x)
  std::unique_ptr<std::barrier<>> grid_sync;
  std::vector<std::unique_ptr<Block>> blocks;
  std::vector<std::unique_ptr<std::barrier<>>> cluster_sync;  // one per cluster
  // skip_poll: the published words, held back until every thread of the launch has ended.
  std::mutex held_mutex;
  std::vector<std::pair<unsigned*, unsigned>> held;
};

struct ThreadState {
  Launch* launch = nullptr;
  Block* block = nullptr;
  unsigned linear_thread = 0;
  long syncthreads_calls = 0;
  long grid_sync_calls = 0;
  unsigned block_index = 0;
  long cluster_arrive_calls = 0;
  bool skip_cluster_wait = false;
  std::optional<std::barrier<>::arrival_token> cluster_token;  // of the last arrive
};
inline thread_local ThreadState tls;

inline unsigned char* dynamic_smem() {
  // 16-byte aligned start, as __align__(16) extern __shared__ guarantees.
  auto addr = reinterpret_cast<uintptr_t>(tls.block->smem.data());
  return reinterpret_cast<unsigned char*>((addr + 15) & ~uintptr_t(15));
}

// barrier.cluster.arrive.release / wait.acquire: std::barrier over every thread of the cluster
// (arrive and wait split, as in PTX). skip_cluster_sync:N: every thread skips its N-th arrive
// and the wait that follows it (the barrier's phases stay aligned: a missing barrier, no hang).
inline void cluster_arrive() {
  const long call = ++tls.cluster_arrive_calls;
  if (plant().what == "skip_cluster_sync" && call == plant().n) {
    tls.skip_cluster_wait = true;
    return;
  }
  tls.cluster_token.emplace(
      tls.launch->cluster_sync[tls.block_index / tls.launch->cluster]->arrive());
}
inline void cluster_wait() {
  if (tls.skip_cluster_wait) {
    tls.skip_cluster_wait = false;
    return;
  }
  tls.launch->cluster_sync[tls.block_index / tls.launch->cluster]->wait(
      std::move(*tls.cluster_token));
  tls.cluster_token.reset();
}
// mapa: the same offset in the dynamic shared memory of block `rank` of this cluster.
template <typename T>
inline const T* cluster_map(const T* ptr, unsigned rank) {
  const auto offset = reinterpret_cast<const unsigned char*>(ptr) - dynamic_smem();
  const unsigned cluster = tls.launch->cluster;
  Block* target = tls.launch->blocks[tls.block_index / cluster * cluster + rank].get();
  auto addr = reinterpret_cast<uintptr_t>(target->smem.data());
  return reinterpret_cast<const T*>(((addr + 15) & ~uintptr_t(15)) + offset);
}

}  // namespace cuda_emu

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

inline void __syncthreads() {
  const long call = ++cuda_emu::tls.syncthreads_calls;
  if (cuda_emu::plant().what == "skip_syncthreads" && call == cuda_emu::plant().n) return;
  cuda_emu::tls.block->sync.arrive_and_wait();
}

namespace cooperative_groups {
struct grid_group {
  void sync() const {
    const long call = ++cuda_emu::tls.grid_sync_calls;
    if (cuda_emu::plant().what == "skip_grid_sync" && call == cuda_emu::plant().n) return;
    cuda_emu::tls.launch->grid_sync->arrive_and_wait();
  }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

namespace cuda_emu {

inline float bf16_lo(uint32_t r) { return __bfloat162float({uint16_t(r & 0xffffu)}); }
inline float bf16_hi(uint32_t r) { return __bfloat162float({uint16_t(r >> 16)}); }
inline float f16_lo(uint32_t r) { return __half2float({uint16_t(r & 0xffffu)}); }
inline float f16_hi(uint32_t r) { return __half2float({uint16_t(r >> 16)}); }

// Warp-collective d = A * B + d, fragments as in the table at the top of this file.
inline void mma_m16n8k16(const char* type, float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                         uint32_t a3, uint32_t b0, uint32_t b1) {
  const bool bf16 = std::strcmp(type, "bf16") == 0;
  Warp& warp = tls.block->warps[tls.linear_thread / 32];
  const int lane = int(tls.linear_thread % 32);
  const bool swap = plant().what == "swap_mma_a";
  const uint32_t regs_a[4] = {a0, swap ? a2 : a1, swap ? a1 : a2, a3};
  for (int i = 0; i < 4; ++i) warp.a[lane][i] = regs_a[i];
  warp.b[lane][0] = b0;
  warp.b[lane][1] = b1;
  for (int i = 0; i < 4; ++i) warp.c[lane][i] = d[i];
  warp.sync.arrive_and_wait();

  float A[16][16], B[16][8], C[16][8];
  auto lo = [bf16](uint32_t r) { return bf16 ? bf16_lo(r) : f16_lo(r); };
  auto hi = [bf16](uint32_t r) { return bf16 ? bf16_hi(r) : f16_hi(r); };
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, q = l & 3;
    // A: reg0 (g, 2q), reg1 (g+8, 2q), reg2 (g, 2q+8), reg3 (g+8, 2q+8); +1 in the high half.
    const int a_row[4] = {g, g + 8, g, g + 8};
    const int a_col[4] = {2 * q, 2 * q, 2 * q + 8, 2 * q + 8};
    for (int i = 0; i < 4; ++i) {
      A[a_row[i]][a_col[i]] = lo(warp.a[l][i]);
      A[a_row[i]][a_col[i] + 1] = hi(warp.a[l][i]);
    }
    // B: reg0 (k = 2q, n = g), reg1 (k = 2q + 8, n = g); k + 1 in the high half.
    B[2 * q][g] = lo(warp.b[l][0]);
    B[2 * q + 1][g] = hi(warp.b[l][0]);
    B[2 * q + 8][g] = lo(warp.b[l][1]);
    B[2 * q + 9][g] = hi(warp.b[l][1]);
    // C: c0, c1 (g, 2q..2q+1), c2, c3 (g+8, 2q..2q+1).
    C[g][2 * q] = warp.c[l][0];
    C[g][2 * q + 1] = warp.c[l][1];
    C[g + 8][2 * q] = warp.c[l][2];
    C[g + 8][2 * q + 1] = warp.c[l][3];
  }
  const int g = lane >> 2, q = lane & 3;
  const int rows[4] = {g, g, g + 8, g + 8};
  const int cols[4] = {2 * q, 2 * q + 1, 2 * q, 2 * q + 1};
  for (int i = 0; i < 4; ++i) {
    float s = C[rows[i]][cols[i]];
    for (int k = 0; k < 16; ++k) s += A[rows[i]][k] * B[k][cols[i]];
    d[i] = s;
  }
  warp.sync.arrive_and_wait();
}

// Run `body` on grid x block emulated threads; a watchdog ends the process on a hang.
template <typename Body>
void run_grid(dim3 grid, dim3 block, size_t smem, Body body, unsigned cluster = 1) {
  const unsigned blocks = grid.x * grid.y * grid.z, threads = block.x * block.y * block.z;
  Launch launch;
  launch.grid = grid;
  launch.block = block;
  launch.cluster = cluster;
  launch.grid_sync = std::make_unique<std::barrier<>>(std::ptrdiff_t(blocks) * threads);
  for (unsigned b = 0; b < blocks; ++b)
    launch.blocks.push_back(std::make_unique<Block>(smem, int(threads)));
  for (unsigned c = 0; c < blocks / cluster; ++c)
    launch.cluster_sync.push_back(
        std::make_unique<std::barrier<>>(std::ptrdiff_t(cluster) * threads));

  std::mutex done_mutex;
  std::condition_variable done_cv;
  bool done = false;
  const int watchdog_s = env_int("CUDA_EMU_WATCHDOG_S", 120);
  std::thread watchdog([&] {
    std::unique_lock<std::mutex> lock(done_mutex);
    if (!done_cv.wait_for(lock, std::chrono::seconds(watchdog_s), [&] { return done; })) {
      std::fprintf(stderr,
                   "cuda_emu watchdog: kernel of %u blocks x %u threads did not finish in %d s "
                   "(a barrier some thread never reaches: deadlock on a GPU)\n",
                   blocks, threads, watchdog_s);
      std::fflush(stderr);
      std::_Exit(124);
    }
  });

  std::vector<std::thread> pool;
  pool.reserve(size_t(blocks) * threads);
  for (unsigned b = 0; b < blocks; ++b) {
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, b, t] {
        tls.launch = &launch;
        tls.block = launch.blocks[b].get();
        tls.linear_thread = t;
        tls.block_index = b;
        blockIdx = dim3(b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y));
        threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        blockDim = block;
        gridDim = grid;
        body();
      });
    }
  }
  for (auto& th : pool) th.join();
  for (const auto& [ptr, value] : launch.held) *ptr = value;
  {
    std::lock_guard<std::mutex> lock(done_mutex);
    done = true;
  }
  done_cv.notify_all();
  watchdog.join();
}

}  // namespace cuda_emu

// ---- device intrinsics of the bounded waits -------------------------------------------------
namespace cuda_emu {
// The SM's cycle counter: nanoseconds since the process started times CUDA_EMU_CLOCK_GHZ.
// Default 0.01: the kernels' 2^33-cycle wait limit is then ~14 minutes, beyond the watchdog,
// because an emulated block's legal wait (thousands of threads on a few loaded cores, slower
// still under ThreadSanitizer) can take seconds; tests of the limit set a short one
// (CUDA_EMU_WAIT_LIMIT_CYCLES in lstm_emu_driver.cpp).
inline long long clock64() {
  static const auto origin = std::chrono::steady_clock::now();
  static const double ghz = [] {
    const char* v = std::getenv("CUDA_EMU_CLOCK_GHZ");
    return v != nullptr && *v != '\0' ? std::atof(v) : 0.01;
  }();
  const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                      std::chrono::steady_clock::now() - origin).count();
  return static_cast<long long>(double(ns) * ghz);
}
}  // namespace cuda_emu
inline unsigned long long atomicMin(unsigned long long* address, unsigned long long value) {
  std::atomic_ref<unsigned long long> ref(*address);
  unsigned long long old = ref.load(std::memory_order_relaxed);
  while (value < old && !ref.compare_exchange_weak(old, value, std::memory_order_relaxed)) {
  }
  return old;
}
inline int __ffs(unsigned x) { return x == 0 ? 0 : __builtin_ctz(x) + 1; }

// ---- runtime API ------------------------------------------------------------------------------
inline const char* cudaGetErrorString(cudaError_t err) {
  if (err == cudaSuccess) return "no error";
  return cuda_emu::last_error_text.empty() ? "cuda_emu error" : cuda_emu::last_error_text.c_str();
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }  // launches fail synchronously
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cuda_emu::fail(cudaErrorInvalidValue, "cuda_emu: no such device");
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = cuda_emu::sm_count(); break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = cuda_emu::smem_optin(); break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = cuda_emu::smem_per_sm(); break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = cuda_emu::kDefaultSmem; break;
    case cudaDevAttrCooperativeLaunch: *value = 1; break;
    case cudaDevAttrComputeCapabilityMajor: *value = cuda_emu::cc_major(); break;
    default: return cuda_emu::fail(cudaErrorInvalidValue, "cuda_emu: attribute not emulated");
  }
  return cudaSuccess;
}

// The runtime's typed overloads (cuda_runtime.h has them as templates too): the emulation
// needs the kernel's parameter types to call it.
template <typename... Args>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Args...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize)
    return cuda_emu::fail(cudaErrorInvalidValue, "cuda_emu: function attribute not emulated");
  if (value < 0 || value > cuda_emu::smem_optin())
    return cuda_emu::fail(cudaErrorInvalidValue,
                          "cuda_emu: MaxDynamicSharedMemorySize " + std::to_string(value) +
                              " exceeds the opt-in maximum " +
                              std::to_string(cuda_emu::smem_optin()));
  if (cuda_emu::plant().what == "no_smem_optin") return cudaSuccess;
  std::lock_guard<std::mutex> lock(cuda_emu::attr_mutex());
  cuda_emu::smem_attr()[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

namespace cuda_emu {
template <typename... Args>
int allowed_dynamic_smem(void (*kernel)(Args...)) {
  std::lock_guard<std::mutex> lock(attr_mutex());
  auto it = smem_attr().find(reinterpret_cast<const void*>(kernel));
  return it == smem_attr().end() ? kDefaultSmem : it->second;
}
}  // namespace cuda_emu

template <typename... Args>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void (*kernel)(Args...),
                                                          int block_size, size_t smem) {
  if (block_size < 1 || block_size > 1024)
    return cuda_emu::fail(cudaErrorInvalidValue, "cuda_emu: block size out of range");
  int by_threads = cuda_emu::kMaxThreadsPerSm / block_size;
  int by_smem = int(cuda_emu::smem_per_sm() / (smem + cuda_emu::kReservedSmemPerBlock));
  if (smem > size_t(cuda_emu::allowed_dynamic_smem(kernel))) by_smem = 0;
  *blocks = std::min({by_threads, by_smem, cuda_emu::blocks_per_sm_by_regs()});
  return cudaSuccess;
}

template <typename... Args>
cudaError_t cudaLaunchCooperativeKernel(void (*kernel)(Args...), dim3 grid, dim3 block,
                                        void** args, size_t smem, cudaStream_t /*stream*/) {
  const unsigned threads = block.x * block.y * block.z;
  const unsigned blocks = grid.x * grid.y * grid.z;
  if (threads < 1 || threads > 1024 || blocks < 1)
    return cuda_emu::fail(cudaErrorInvalidConfiguration,
                          "cuda_emu: invalid configuration: " + std::to_string(blocks) +
                              " blocks of " + std::to_string(threads) + " threads");
  const int allowed = cuda_emu::allowed_dynamic_smem(kernel);
  if (smem > size_t(allowed))
    return cuda_emu::fail(cudaErrorInvalidValue,
                          "cuda_emu: " + std::to_string(smem) +
                              " bytes of dynamic shared memory, the kernel allows " +
                              std::to_string(allowed) +
                              " (cudaFuncSetAttribute MaxDynamicSharedMemorySize missing)");
  int per_sm = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, int(threads), smem);
  if (int(blocks) > per_sm * cuda_emu::sm_count())
    return cuda_emu::fail(cudaErrorCooperativeLaunchTooLarge,
                          "cuda_emu: cooperative launch too large: " + std::to_string(blocks) +
                              " blocks, " + std::to_string(per_sm) + " per SM x " +
                              std::to_string(cuda_emu::sm_count()) + " SMs co-resident");
  // Copy the arguments as a launch does, then run every thread of the grid.
  auto call = [&]<size_t... I>(std::index_sequence<I...>) {
    std::tuple<std::decay_t<Args>...> values{*static_cast<std::decay_t<Args>*>(args[I])...};
    cuda_emu::run_grid(grid, block, smem, [&] { kernel(std::get<I>(values)...); });
  };
  call(std::index_sequence_for<Args...>{});
  return cudaSuccess;
}

// Clusters of a cooperative cluster launch are co-resident within GPCs: per GPC,
// floor(gpc_sms x blocks per SM / cluster) clusters.
template <typename... Args>
cudaError_t cudaOccupancyMaxActiveClusters(int* clusters, void (*kernel)(Args...),
                                           const cudaLaunchConfig_t* config) {
  unsigned cluster = 1;
  for (unsigned i = 0; i < config->numAttrs; ++i)
    if (config->attrs[i].id == cudaLaunchAttributeClusterDimension)
      cluster = config->attrs[i].val.clusterDim.x;
  if (cluster < 1 || cluster > 8)
    return cuda_emu::fail(cudaErrorInvalidValue, "cuda_emu: cluster size out of range");
  const dim3 b = config->blockDim;
  int per_sm = 0;
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, kernel, int(b.x * b.y * b.z), config->dynamicSmemBytes);
  if (err != cudaSuccess) return err;
  const int gpcs = cuda_emu::sm_count() / cuda_emu::gpc_sms();
  *clusters = gpcs * (cuda_emu::gpc_sms() * per_sm / int(cluster));
  return cudaSuccess;
}

// cudaLaunchKernelEx with the cluster and cooperative attributes: checks what a GPU checks
// (cluster size divides the grid, dynamic shared memory opted in, a cooperative grid's
// clusters co-resident), then runs the grid with its clusters.
template <typename... Exp, typename... Act>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Exp...),
                               Act&&... args) {
  unsigned cluster = 1;
  bool cooperative = false;
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    if (config->attrs[i].id == cudaLaunchAttributeClusterDimension)
      cluster = config->attrs[i].val.clusterDim.x;
    if (config->attrs[i].id == cudaLaunchAttributeCooperative)
      cooperative = config->attrs[i].val.cooperative != 0;
  }
  if (cooperative && cluster > 1 && cuda_emu::plant().what == "no_cooperative_clusters")
    return cuda_emu::fail(cudaErrorNotSupported,
                          "cuda_emu: cooperative launch with clusters not supported (planted)");
  const dim3 grid = config->gridDim, block = config->blockDim;
  const unsigned threads = block.x * block.y * block.z, blocks = grid.x * grid.y * grid.z;
  if (threads < 1 || threads > 1024 || blocks < 1 || cluster < 1 || grid.x % cluster != 0)
    return cuda_emu::fail(cudaErrorInvalidConfiguration,
                          "cuda_emu: invalid configuration: " + std::to_string(blocks) +
                              " blocks of " + std::to_string(threads) + " threads, clusters of " +
                              std::to_string(cluster));
  const int allowed = cuda_emu::allowed_dynamic_smem(kernel);
  if (config->dynamicSmemBytes > size_t(allowed))
    return cuda_emu::fail(cudaErrorInvalidValue,
                          "cuda_emu: " + std::to_string(config->dynamicSmemBytes) +
                              " bytes of dynamic shared memory, the kernel allows " +
                              std::to_string(allowed));
  if (cooperative) {
    int clusters = 0;
    const cudaError_t err = cudaOccupancyMaxActiveClusters(&clusters, kernel, config);
    if (err != cudaSuccess) return err;
    if (int(blocks / cluster) > clusters)
      return cuda_emu::fail(cudaErrorCooperativeLaunchTooLarge,
                            "cuda_emu: cooperative launch too large: " +
                                std::to_string(blocks / cluster) + " clusters of " +
                                std::to_string(cluster) + ", " + std::to_string(clusters) +
                                " co-resident");
  }
  std::tuple<std::decay_t<Exp>...> values{std::forward<Act>(args)...};
  cuda_emu::run_grid(
      grid, block, config->dynamicSmemBytes,
      [&] { std::apply([&](auto&... v) { kernel(v...); }, values); }, cluster);
  return cudaSuccess;
}

inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t /*stream*/) {
  std::memset(ptr, value, bytes);  // launches run synchronously here: stream order holds
  return cudaSuccess;
}

// ---- the PTX hooks of lstm_persistent.cu ------------------------------------------------------
#define SHA_RNN_MMA_M16N8K16(type, d, a0, a1, a2, a3, b0, b1) \
  ::cuda_emu::mma_m16n8k16(type, d, a0, a1, a2, a3, b0, b1)
// The step hand-off: st.relaxed.gpu / ld.relaxed.gpu become C++ relaxed atomics on each
// 32-bit word (a 16-byte poll is four of them, as PTX models it), which ThreadSanitizer sees
// as race-free; nothing else orders them, as on the GPU. Planted faults:
//   lose_store:N  block CUDA_EMU_LOSE_BLOCK (default: the grid's last) never publishes an
//                 epoch >= N (a block that stops: the other blocks' bounded waits must give
//                 up);
//   skip_poll     readers take every word as published, and every publishing store is held
//                 back until the launch ends, so a reader that does not poll reads the
//                 launcher's fill, deterministically;
//   plain_poll    the polls are plain (non-atomic) loads: a data race ThreadSanitizer reports.
namespace cuda_emu {
inline void publish_u32(void* ptr, unsigned value, unsigned step) {
  unsigned* word = static_cast<unsigned*>(ptr);
  if (plant().what == "lose_store" && step >= unsigned(plant().n) &&
      int(blockIdx.x) == env_int("CUDA_EMU_LOSE_BLOCK", int(gridDim.x) - 1))
    return;
  if (plant().what == "skip_poll") {
    const std::lock_guard<std::mutex> lock(tls.launch->held_mutex);
    tls.launch->held.emplace_back(word, value);
    return;
  }
  std::atomic_ref<unsigned>(*word).store(value, std::memory_order_relaxed);
}
inline uint4 poll_v4(const void* ptr) {
  unsigned* w = static_cast<unsigned*>(const_cast<void*>(ptr));
  if (plant().what == "plain_poll") return make_uint4(w[0], w[1], w[2], w[3]);
  uint4 v;
  v.x = std::atomic_ref<unsigned>(w[0]).load(std::memory_order_relaxed);
  v.y = std::atomic_ref<unsigned>(w[1]).load(std::memory_order_relaxed);
  v.z = std::atomic_ref<unsigned>(w[2]).load(std::memory_order_relaxed);
  v.w = std::atomic_ref<unsigned>(w[3]).load(std::memory_order_relaxed);
  return v;
}
inline bool unpublished(unsigned word) {
  return plant().what != "skip_poll" && word == 0xFFFFFFFFu;
}
}  // namespace cuda_emu
#define SHA_RNN_PUBLISH_U32(ptr, value, step) ::cuda_emu::publish_u32(ptr, value, step)
#define SHA_RNN_POLL_V4(ptr, out) ((out) = ::cuda_emu::poll_v4(ptr))
#define SHA_RNN_UNPUBLISHED(word) ::cuda_emu::unpublished(word)
#define SHA_RNN_LOAD_RELAXED_GPU_U64(ptr, out) \
  ((out) = std::atomic_ref<unsigned long long>(*(ptr)).load(std::memory_order_relaxed))
#define SHA_RNN_CLOCK64() ::cuda_emu::clock64()
#define SHA_RNN_CLUSTER_ARRIVE() ::cuda_emu::cluster_arrive()
#define SHA_RNN_CLUSTER_WAIT() ::cuda_emu::cluster_wait()
#define SHA_RNN_CLUSTER_MAP(ptr, rank) ::cuda_emu::cluster_map(ptr, rank)
#define SHA_RNN_SPIN_PAUSE() std::this_thread::sleep_for(std::chrono::microseconds(50))

// ---- c10 TORCH_CHECK subset -------------------------------------------------------------------
namespace c10 {
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
}  // namespace c10
namespace cuda_emu {
template <typename... Args>
[[noreturn]] void throw_check(const char* cond, const Args&... args) {
  std::ostringstream os;
  if constexpr (sizeof...(Args) == 0)
    os << "Expected " << cond << " to be true";
  else
    (os << ... << args);
  throw c10::Error(os.str());
}
}  // namespace cuda_emu
#define TORCH_CHECK(cond, ...)                                        \
  do {                                                                \
    if (!(cond)) ::cuda_emu::throw_check(#cond __VA_OPT__(, ) __VA_ARGS__); \
  } while (0)
