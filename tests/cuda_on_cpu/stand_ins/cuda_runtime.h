// Stand-in for <cuda_runtime.h> (CUDA-on-CPU tests): the CUDA keywords and builtins come from the
// emulator runtime; no runtime API call is emulated beyond what cudaemu.h declares.
#pragma once
#include "cudaemu.h"
#ifndef CUDART_VERSION
#define CUDART_VERSION 0
#endif
