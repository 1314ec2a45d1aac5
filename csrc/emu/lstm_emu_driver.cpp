// Test driver of the CPU emulation: runs the real host launchers of csrc/lstm_persistent.cu
// (sha_rnn::lstm_forward_launch / lstm_backward_launch, which size the grid and the shared
// memory, opt in to it and launch cooperatively) on buffers read from files.
//
// Usage: lstm_emu_driver DIR DTYPE T B H UNITS MODE
//   DTYPE f16 | bf16; MODE train (forward saving gates and cells, then backward) or infer
//   (forward only, nothing saved).
// Reads DIR/{xproj,w_hh,h0,c0,d_out,d_hn,d_cn}.bin (raw 16-bit values; d_* only for train),
// writes DIR/{out,c_n}.bin and for train DIR/{gates,cells}.bin (fp32) and
// DIR/{d_gates,d_h0,d_c0}.bin. Every output buffer is NaN before the kernels run.
// Exit status: 0 ok, 2 the launcher refused (message on stderr), 4 a step wait gave up
// ("lstm step error: PASS WORD" on stderr, WORD the kernel's error word), 124 watchdog (hang).
// Env CUDA_EMU_WAIT_LIMIT_CYCLES: the kernels' wait limit (default kLstmWaitLimitCycles);
// SHA_RNN_KERNELS_LSTM_RESERVE_SMS: SMs the launches leave free (default 0). Prints the
// backward's cluster size ("backward cluster size: C") before launching it and after.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "lstm_persistent.h"

namespace {

std::vector<unsigned char> read_file(const std::string& path, size_t bytes) {
  std::ifstream in(path, std::ios::binary);
  std::vector<unsigned char> data((std::istreambuf_iterator<char>(in)), {});
  if (data.size() != bytes) {
    std::fprintf(stderr, "driver: %s has %zu bytes, expected %zu\n", path.c_str(), data.size(),
                 bytes);
    std::exit(3);
  }
  return data;
}

void write_file(const std::string& path, const void* data, size_t bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(static_cast<const char*>(data), std::streamsize(bytes));
}

// Every 16-bit half 0x7FC1: NaN in fp16 and bf16, and 0x7FC17FC1 is NaN in fp32. Not the
// kernels' unpublished word (0xFFFFFFFF): the launcher must fill what the kernels poll, or
// the polls take this poison for published data and the parity tests fail.
std::vector<unsigned char> nan_buffer(size_t bytes) {
  std::vector<unsigned char> buffer(bytes);
  for (size_t i = 0; i < bytes; ++i) buffer[i] = i % 2 == 0 ? 0xC1 : 0x7F;
  return buffer;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 8) {
    std::fprintf(stderr, "usage: %s DIR f16|bf16 T B H UNITS train|infer\n", argv[0]);
    return 3;
  }
  const std::string dir = argv[1];
  const std::string dtype_name = argv[2];
  const int T = std::atoi(argv[3]), B = std::atoi(argv[4]), H = std::atoi(argv[5]);
  const int units = std::atoi(argv[6]);
  const bool train = std::strcmp(argv[7], "train") == 0;
  const sha_rnn::LstmDtype dtype =
      dtype_name == "bf16" ? sha_rnn::LstmDtype::kBFloat16 : sha_rnn::LstmDtype::kFloat16;
  const size_t e = 2, tb = size_t(T) * B;

  auto xproj = read_file(dir + "/xproj.bin", tb * 4 * H * e);
  auto w_hh = read_file(dir + "/w_hh.bin", size_t(4) * H * H * e);
  auto h0 = read_file(dir + "/h0.bin", size_t(B) * H * e);
  auto c0 = read_file(dir + "/c0.bin", size_t(B) * H * e);
  auto out = nan_buffer(tb * H * e);
  auto c_n = nan_buffer(size_t(B) * H * e);
  // The error word, garbage until the launcher sets it.
  static_assert(sha_rnn::kLstmStatusWords == 2, "one uint64");
  std::vector<unsigned long long> step_buffer(1);
  const long long wait_limit = std::atoll(
      std::getenv("CUDA_EMU_WAIT_LIMIT_CYCLES") ? std::getenv("CUDA_EMU_WAIT_LIMIT_CYCLES") : "0");
  // A wait that gave up: print the error word for the test to decode, exit 4.
  auto check_status = [&](const char* pass) {
    const unsigned long long error = step_buffer[0];
    if (error == sha_rnn::kLstmNoError) return;
    std::fprintf(stderr, "lstm step error: %s %llu\n", pass, error);
    std::exit(4);
  };
  const char* reserve_env = std::getenv("SHA_RNN_KERNELS_LSTM_RESERVE_SMS");
  const int reserve_sms = reserve_env != nullptr ? std::atoi(reserve_env) : 0;
  auto poison_step_buffer = [&] {
    std::fill(step_buffer.begin(), step_buffer.end(), 0x5a5a5a5a5a5a5a5aULL);
  };
  auto gates = nan_buffer(train ? tb * 4 * H * 4 : 0);
  auto cells = nan_buffer(train ? tb * H * 4 : 0);

  try {
    sha_rnn::LstmFwdParams fp{};
    fp.xproj = xproj.data();
    fp.w_hh = w_hh.data();
    fp.h0 = h0.data();
    fp.c0 = c0.data();
    fp.out = out.data();
    fp.c_n = c_n.data();
    fp.gates = train ? reinterpret_cast<float*>(gates.data()) : nullptr;
    fp.cells = train ? reinterpret_cast<float*>(cells.data()) : nullptr;
    poison_step_buffer();
    fp.status = step_buffer.data();
    fp.wait_limit = wait_limit;
    fp.reserve_sms = reserve_sms;
    fp.seq_len = T;
    fp.batch = B;
    fp.hidden = H;
    fp.units = units;
    sha_rnn::lstm_forward_launch(dtype, fp, nullptr);
    check_status("forward");
    write_file(dir + "/out.bin", out.data(), out.size());
    write_file(dir + "/c_n.bin", c_n.data(), c_n.size());
    if (!train) return 0;
    write_file(dir + "/gates.bin", gates.data(), gates.size());
    write_file(dir + "/cells.bin", cells.data(), cells.size());

    auto d_out = read_file(dir + "/d_out.bin", tb * H * e);
    auto d_hn = read_file(dir + "/d_hn.bin", size_t(B) * H * e);
    auto d_cn = read_file(dir + "/d_cn.bin", size_t(B) * H * e);
    auto d_gates = nan_buffer(tb * 4 * H * e);
    auto d_h0 = nan_buffer(size_t(B) * H * e);
    auto d_c0 = nan_buffer(size_t(B) * H * e);
    sha_rnn::LstmBwdParams bp{};
    bp.w_hh = w_hh.data();
    bp.gates = reinterpret_cast<const float*>(gates.data());
    bp.cells = reinterpret_cast<const float*>(cells.data());
    bp.c0 = c0.data();
    bp.d_out = d_out.data();
    bp.d_hn = d_hn.data();
    bp.d_cn = d_cn.data();
    bp.d_gates = d_gates.data();
    bp.d_h0 = d_h0.data();
    bp.d_c0 = d_c0.data();
    poison_step_buffer();
    bp.status = step_buffer.data();
    bp.wait_limit = wait_limit;
    bp.reserve_sms = reserve_sms;
    bp.seq_len = T;
    bp.batch = B;
    bp.hidden = H;
    bp.units = units;
    std::printf("backward cluster size: %d\n", sha_rnn::lstm_backward_cluster_size(bp));
    std::fflush(stdout);  // before a sanitizer or the watchdog ends the process
    sha_rnn::lstm_backward_launch(dtype, bp, nullptr);
    check_status("backward");
    std::printf("backward cluster size after the launch: %d\n",
                sha_rnn::lstm_backward_cluster_size(bp));
    write_file(dir + "/d_gates.bin", d_gates.data(), d_gates.size());
    write_file(dir + "/d_h0.bin", d_h0.data(), d_h0.size());
    write_file(dir + "/d_c0.bin", d_c0.data(), d_c0.size());
  } catch (const std::exception& err) {
    std::fprintf(stderr, "launcher refused: %s\n", err.what());
    return 2;
  }
  return 0;
}
