// Every kernel, for the run-time loader: NVRTC compiles this one file and
// instantiates templates by name expression (e.g. "ps::paged_decode_kernel<2,128,4>").
#pragma once
#include "cache_ops.cuh"
#include "decode.cuh"
#include "decode_tc.cuh"
#include "prefill.cuh"
#include "prefill_tc.cuh"
#include "layer_ops.cuh"
#include "gemv.cuh"
