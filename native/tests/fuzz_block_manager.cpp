// Random-operation fuzzer for the block manager, meant for the sanitizer build:
// allocate / append / fork / free / swap out / swap in with prefix caching on and off,
// small pools (so blocks run out and get evicted) and a tiny vocabulary (so prompts
// share prefixes and a 2-bit hash collides all the time). After every operation the
// manager's invariants are recomputed and every sequence is read back through a
// shadow KV pool; in half the episodes KV is computed only steps after its slots are
// reserved, as in the engine. Usage: fuzz_block_manager [seconds] [seed]; PAGEDSERVE_FUZZ_SECONDS
// overrides the duration.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>

#include "kv_shadow.h"

using namespace pagedserve;
using pagedserve::testing::KvShadow;

namespace {

struct Config {
  int32_t gpu_blocks, cpu_blocks, block_size;
  bool prefix_caching;
  int hash_bits;
};

int64_t run_episode(std::mt19937_64& rng, const Config& cfg, int ops) {
  BlockManager bm(cfg.gpu_blocks, cfg.cpu_blocks, cfg.block_size, cfg.prefix_caching, 0.0, 8,
                  cfg.hash_bits);
  KvShadow kv(bm, /*eager*/ rng() % 2 == 0);
  auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<uint64_t>(n)); };
  SeqId next_id = 0;
  int64_t done = 0;
  for (int i = 0; i < ops; ++i) {
    const auto& seqs = kv.sequences();
    std::vector<SeqId> gpu_seqs, cpu_seqs;
    for (const auto& [id, t] : seqs) (bm.device_of(id) == Device::kGpu ? gpu_seqs : cpu_seqs).push_back(id);
    switch (pick(9)) {
      case 0:
      case 1: {  // allocate a prompt drawn from a tiny vocabulary: prefixes repeat
        std::vector<TokenId> prompt(1 + pick(4 * cfg.block_size));
        int vocab = 1 + pick(3);
        for (auto& t : prompt) t = pick(vocab);
        uint64_t salt = pick(2);
        if (bm.can_allocate(prompt, salt)) kv.allocate(next_id++, prompt, salt);
        break;
      }
      case 2: {  // one token for one sequence
        if (gpu_seqs.empty()) break;
        SeqId s = gpu_seqs[pick(gpu_seqs.size())];
        if (bm.can_append(s)) kv.append(s, pick(8));
        break;
      }
      case 3: {  // one decode step for a random subset: all or nothing
        std::vector<SeqId> step;
        std::vector<TokenId> tokens;
        for (SeqId s : gpu_seqs)
          if (pick(2)) step.push_back(s), tokens.push_back(pick(8));
        try {
          kv.append_many(step, tokens);
        } catch (const std::runtime_error&) {
          // out of blocks: append_many checks below that nothing changed
        }
        break;
      }
      case 4:
        if (!gpu_seqs.empty()) kv.fork(gpu_seqs[pick(gpu_seqs.size())], next_id++);
        break;
      case 5:
        if (!seqs.empty()) {
          auto it = seqs.begin();
          std::advance(it, pick(seqs.size()));
          kv.free(it->first);
        }
        break;
      case 6: {
        if (gpu_seqs.empty()) break;
        std::vector<SeqId> group{gpu_seqs[pick(gpu_seqs.size())]};
        if (gpu_seqs.size() > 1 && pick(2)) {
          SeqId other = gpu_seqs[pick(gpu_seqs.size())];
          if (other != group[0]) group.push_back(other);
        }
        if (bm.can_swap_out(group)) kv.swap_out(group);
        break;
      }
      case 8:  // a forward over one running sequence's pending tokens
        if (!gpu_seqs.empty()) kv.compute(gpu_seqs[pick(gpu_seqs.size())]);
        break;
      case 7:
        if (!cpu_seqs.empty()) {
          std::vector<SeqId> group{cpu_seqs[pick(cpu_seqs.size())]};
          SeqId other = cpu_seqs[pick(cpu_seqs.size())];
          if (other != group[0] && pick(2)) group.push_back(other);
          if (bm.can_swap_in(group)) kv.swap_in(group);
        }
        break;
    }
    bm.check_invariants();
    kv.verify();
    ++done;
  }
  // Releasing everything must give every block back.
  std::vector<SeqId> all;
  for (const auto& [id, t] : kv.sequences()) all.push_back(id);
  for (SeqId s : all) kv.free(s);
  bm.check_invariants();
  if (bm.num_free_gpu_blocks() != bm.num_gpu_blocks() || bm.num_free_cpu_blocks() != bm.num_cpu_blocks()) {
    std::fprintf(stderr, "blocks leaked after freeing every sequence\n");
    std::exit(1);
  }
  return done;
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = argc > 1 ? std::atof(argv[1]) : 5.0;
  if (const char* env = std::getenv("PAGEDSERVE_FUZZ_SECONDS")) seconds = std::atof(env);
  uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : std::random_device{}();
  std::mt19937_64 rng(seed);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  int64_t ops = 0, episodes = 0;
  try {
    while (std::chrono::steady_clock::now() < deadline) {
      Config cfg{static_cast<int32_t>(2 + rng() % 24), static_cast<int32_t>(rng() % 24),
                 static_cast<int32_t>(1 + rng() % 8), rng() % 4 != 0, rng() % 2 ? 2 : 64};
      ops += run_episode(rng, cfg, 200 + static_cast<int>(rng() % 800));
      ++episodes;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAILED (seed %llu, episode %lld): %s\n", static_cast<unsigned long long>(seed),
                 static_cast<long long>(episodes), e.what());
    return 1;
  }
  std::printf("fuzz: %lld operations in %lld episodes, seed %llu, no violation\n", static_cast<long long>(ops),
              static_cast<long long>(episodes), static_cast<unsigned long long>(seed));
  return 0;
}
