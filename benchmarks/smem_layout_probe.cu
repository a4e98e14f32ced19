// Streaming probe for the decode kernel's shared-memory stage layout.
//
// Each CTA streams K and V 4 KiB chunks (one 16-token block of one head at head
// size 128, bf16) into a per-warp 3-stage cp.async ring exactly as
// cuda/decode_tc.cuh does, with no math, so the time is the load path alone.
// Variants: chunks in order or through a shuffled table (paging), stage rows
// padded by 16 bytes (the old layout) or unpadded and XOR-swizzled (the current
// one), the stages on a 128-byte boundary or 16 bytes off it, and the copies made
// by TMA bulk copies instead of cp.async. Shapes: the bytes
// of the 32 x 1024, 64 x 2048, 128 x 4096 and 16 x 16384 decodes (Llama-3-8B
// heads). docs/kernels.md has the results.
//
//   nvcc -arch=sm_90 -O3 -o /tmp/smem_layout_probe benchmarks/smem_layout_probe.cu
//   /tmp/smem_layout_probe
//   PROBE_ONCE=1 ncu --clock-control none --metrics gpu__time_duration.sum,\
//     lts__t_sectors_srcunit_tex_op_read.sum /tmp/smem_layout_probe
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

__device__ int sink;

enum Layout { PADDED, SWIZZLED };

template <bool TABLE, Layout L, bool OFF16>
__global__ void __launch_bounds__(128) probe(const uint4 *K, const uint4 *V, const int *table, int chunks) {
  extern __shared__ uint4 smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  constexpr int ROW = L == PADDED ? 17 : 16;  // uint4 per 256-byte row (+1 when padded)
  constexpr int STAGE = 2 * 16 * ROW;         // 16 K rows, 16 V rows
  const unsigned base = (unsigned)__cvta_generic_to_shared(smem) + (OFF16 ? 16 : 0);
  const unsigned ring = base + warp * 3 * STAGE * 16;
  const int *ids = table + (size_t)blockIdx.x * chunks;
  auto chunk = [&](int t) { return TABLE ? ids[t] : (int)blockIdx.x * chunks + t; };
  int next = warp < chunks ? chunk(warp) : 0;  // looked up one tile ahead, as the kernel does
  auto issue = [&](int t, int stage) {
    if (t < chunks) {
      const uint4 *k = K + (size_t)next * 256, *v = V + (size_t)next * 256;
      if (t + 4 < chunks) next = chunk(t + 4);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int i = j * 32 + lane, r = i >> 4, c = i & 15;
        const int pos = L == PADDED ? r * ROW + c : r * ROW + (c ^ (r & 7));
        const unsigned dk = ring + (stage * STAGE + pos) * 16, dv = dk + 16 * ROW * 16;
        asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(dk), "l"(k + i));
        asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(dv), "l"(v + i));
      }
    }
    asm volatile("cp.async.commit_group;");
  };
  int acc = 0;
  issue(warp, 0);
  issue(warp + 4, 1);
  for (int t = warp, it = 0; t < chunks; t += 4, ++it) {
    asm volatile("cp.async.wait_group 1;");
    __syncwarp();
    issue(t + 8, (it + 2) % 3);
    int x;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(x) : "r"(ring + (it % 3) * STAGE * 16 + lane * 4));
    acc += x;
  }
  asm volatile("cp.async.wait_group 0;");
  if (acc == 0x12345678) sink = acc;  // keeps the reads
}


// The same ring filled by 1-D TMA bulk copies (sm_90) completing on one mbarrier per
// stage per warp, instead of 16-byte cp.async: MODE 1, each lane copies one 256-byte
// row (K rows by lanes 0-15, V rows by 16-31) into rows padded by 16 bytes, as the
// kernel's ldmatrix reads would need; MODE 2, lanes 0 and 1 copy the whole 4 KiB K and
// V chunks (unpadded). Whether the copy engine reads a scattered pattern faster than
// the SM's own loads do.
template <bool TABLE, int MODE>
__global__ void __launch_bounds__(128) probe_bulk(const uint4 *K, const uint4 *V, const int *table, int chunks) {
  extern __shared__ uint4 smem[];
  __shared__ __align__(8) unsigned long long bar[4][3];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  constexpr int ROW = MODE == 1 ? 17 : 16;
  constexpr int STAGE = 2 * 16 * ROW;
  const unsigned base = (unsigned)__cvta_generic_to_shared(smem);
  const unsigned ring = base + warp * 3 * STAGE * 16;
  const unsigned b0 = (unsigned)__cvta_generic_to_shared(&bar[warp][0]);
  if (lane < 3) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(b0 + lane * 8));
  asm volatile("fence.mbarrier_init.release.cluster;");
  __syncwarp();
  const int *ids = table + (size_t)blockIdx.x * chunks;
  auto chunk = [&](int t) { return TABLE ? ids[t] : (int)blockIdx.x * chunks + t; };
  int next = warp < chunks ? chunk(warp) : 0;
  auto issue = [&](int t, int stage) {
    if (t >= chunks) return;
    const uint4 *k = K + (size_t)next * 256, *v = V + (size_t)next * 256;
    if (t + 4 < chunks) next = chunk(t + 4);
    const unsigned bar_s = b0 + stage * 8;
    if (lane == 0) asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar_s), "r"(8192));
    asm volatile("fence.proxy.async.shared::cta;");
    __syncwarp();
    if (MODE == 1) {
      const int r = lane & 15;
      const uint4 *src = (lane < 16 ? k : v) + r * 16;
      const unsigned dst = ring + (stage * STAGE + (lane >> 4) * 16 * ROW + r * ROW) * 16;
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], 256, [%2];"
                   ::"r"(dst), "l"(src), "r"(bar_s) : "memory");
    } else if (lane < 2) {
      const uint4 *src = lane == 0 ? k : v;
      const unsigned dst = ring + (stage * STAGE + lane * 16 * ROW) * 16;
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], 4096, [%2];"
                   ::"r"(dst), "l"(src), "r"(bar_s) : "memory");
    }
  };
  int acc = 0;
  issue(warp, 0);
  issue(warp + 4, 1);
  for (int t = warp, it = 0; t < chunks; t += 4, ++it) {
    const int stage = it % 3;
    const unsigned phase = (it / 3) & 1;
    asm volatile("{ .reg .pred p; W%=: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1; @!p bra W%=; }"
                 ::"r"(b0 + stage * 8), "r"(phase) : "memory");
    int x;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(x) : "r"(ring + stage * STAGE * 16 + lane * 4));
    acc += x;
    __syncwarp();
    issue(t + 8, (it + 2) % 3);
  }
  if (acc == 0x12345678) sink = acc;
}

template <typename KF>
void time_probe(KF kernel, const char *name, const uint4 *K, const uint4 *V, const int *table, int ctas, int chunks) {
  const int smem = 106 * 1024;  // the decode kernel's: two CTAs per SM
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  cudaStream_t s;
  cudaStreamCreate(&s);
  auto launch = [&]() { kernel<<<ctas, 128, smem, s>>>(K, V, table, chunks); };
  const double bytes = 2.0 * ctas * chunks * 4096;
  if (getenv("PROBE_ONCE")) {  // one launch per variant, for ncu
    launch();
    cudaStreamSynchronize(s);
    printf("%s, %.0f MB\n", name, bytes / 1e6);
    return;
  }
  for (int i = 0; i < 3; ++i) launch();
  // 10 launches per CUDA graph replay, as benchmarks/kernel_bench.py times the decode
  cudaGraph_t g;
  cudaGraphExec_t ge;
  cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
  for (int i = 0; i < 10; ++i) launch();
  cudaStreamEndCapture(s, &g);
  cudaGraphInstantiate(&ge, g, 0);
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::vector<float> ms;
  for (int i = 0; i < 15; ++i) {
    cudaEventRecord(a, s);
    cudaGraphLaunch(ge, s);
    cudaEventRecord(b, s);
    cudaEventSynchronize(b);
    float t;
    cudaEventElapsedTime(&t, a, b);
    ms.push_back(t / 10);
  }
  std::sort(ms.begin(), ms.end());
  const double us = ms[ms.size() / 2] * 1e3;
  printf("%-34s %5.0f MB %8.1f us %6.2f TB/s\n", name, bytes / 1e6, us, bytes / us / 1e6);
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);
  cudaStreamDestroy(s);
}

template <bool TABLE, Layout L, bool OFF16>
void run(const char *name, const uint4 *K, const uint4 *V, const int *table, int ctas, int chunks) {
  time_probe(probe<TABLE, L, OFF16>, name, K, V, table, ctas, chunks);
}

int main() {
  const size_t max_chunks = 1024 * 256;  // 128 x 4096: 1 GiB each of K and V
  uint4 *K, *V;
  int *table;
  cudaMalloc(&K, max_chunks * 4096);
  cudaMalloc(&V, max_chunks * 4096);
  cudaMemset(K, 1, max_chunks * 4096);
  cudaMemset(V, 1, max_chunks * 4096);
  cudaMalloc(&table, max_chunks * sizeof(int));
  // CTAs (batch x 8 heads), chunks per CTA
  const int shapes[4][2] = {{256, 64}, {512, 128}, {1024, 256}, {128, 1024}};
  for (const auto &sh : shapes) {
    const int ctas = sh[0], chunks = sh[1];
    std::vector<int> perm(ctas * chunks);
    for (size_t i = 0; i < perm.size(); ++i) perm[i] = (int)i;
    std::mt19937 rng(1);
    std::shuffle(perm.begin(), perm.end(), rng);
    cudaMemcpy(table, perm.data(), perm.size() * sizeof(int), cudaMemcpyHostToDevice);
    run<false, SWIZZLED, false>("in order, swizzled", K, V, table, ctas, chunks);
    run<true, SWIZZLED, false>("table, swizzled (current)", K, V, table, ctas, chunks);
    run<true, PADDED, false>("table, padded rows", K, V, table, ctas, chunks);
    run<true, SWIZZLED, true>("table, swizzled, 16 B off", K, V, table, ctas, chunks);
    run<true, PADDED, true>("table, padded, 16 B off (previous)", K, V, table, ctas, chunks);
    time_probe(probe_bulk<false, 1>, "bulk rows, in order", K, V, table, ctas, chunks);
    time_probe(probe_bulk<true, 1>, "bulk rows, table", K, V, table, ctas, chunks);
    time_probe(probe_bulk<false, 2>, "bulk 4 KiB, in order", K, V, table, ctas, chunks);
    time_probe(probe_bulk<true, 2>, "bulk 4 KiB, table", K, V, table, ctas, chunks);
  }
  const cudaError_t err = cudaGetLastError();
  printf("%s\n", cudaGetErrorString(err));
  return err == cudaSuccess ? 0 : 1;
}
