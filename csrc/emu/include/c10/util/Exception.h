// CPU emulation stand-in for c10/util/Exception.h: TORCH_CHECK (see csrc/emu/cuda_emu.h).
#pragma once
#include "../../../cuda_emu.h"
