// Every kernel header. The run-time loader compiles these headers inlined in order
// (ops/loaders.py: kernel_source, KERNEL_HEADERS) as one NVRTC source and instantiates
// templates by name expression (e.g. "ps::paged_decode_kernel<2,128,4>").
#pragma once
#include "cache_ops.cuh"
#include "decode.cuh"
#include "decode_tc.cuh"
#include "prefill.cuh"
#include "prefill_tc.cuh"
#include "layer_ops.cuh"
#include "gemv.cuh"
#include "launch_table.cuh"
