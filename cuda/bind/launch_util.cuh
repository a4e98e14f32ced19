// Helpers shared by the launcher translation units (nvcc only).
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "launch.h"

namespace pscuda {

inline void check_launch(const char *what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

inline int log2_exact(int v, const char *name) {
  int l = 0;
  while ((1 << l) < v) ++l;
  if (v <= 0 || (1 << l) != v)
    throw std::invalid_argument(std::string(name) + " must be a power of 2, got " + std::to_string(v));
  return l;
}

[[noreturn]] inline void unsupported(const char *what, int v) {
  throw std::invalid_argument(std::string(what) + " " + std::to_string(v) + " is not supported");
}

// Calls f(std::integral_constant<int, D>) for a supported head size.
template <typename F>
void with_head_size(int d, F &&f) {
  switch (d) {
    case 64: f(std::integral_constant<int, 64>()); break;
    case 80: f(std::integral_constant<int, 80>()); break;
    case 96: f(std::integral_constant<int, 96>()); break;
    case 128: f(std::integral_constant<int, 128>()); break;
    case 256: f(std::integral_constant<int, 256>()); break;
    default: unsupported("head_size", d);
  }
}

}  // namespace pscuda
