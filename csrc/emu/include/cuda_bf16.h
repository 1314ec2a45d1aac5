// CPU emulation stand-in for the CUDA header of this name (see csrc/emu/cuda_emu.h).
#pragma once
#include "../cuda_emu.h"
