// Swap: moving sequences between the GPU and CPU pools (preemption by swapping).
#include <stdexcept>
#include <unordered_map>
#include <unordered_set>

#include "block_manager.h"

namespace pagedserve {

// ------------------------------------------------------------------- swap ----

std::vector<BlockId> BlockManager::distinct_blocks(const std::vector<SeqId>& seqs, Device device) const {
  std::vector<BlockId> out;
  std::unordered_set<BlockId> seen;
  std::unordered_set<SeqId> seen_seqs;
  for (SeqId seq : seqs) {
    const Sequence& s = seq_or_throw(seq);
    if (!seen_seqs.insert(seq).second)
      throw std::invalid_argument(seq_name(seq) + " is listed twice");
    if (s.device != device)
      throw std::invalid_argument(seq_name(seq) + (device == Device::kGpu ? " is not on the GPU" : " is not swapped out"));
    for (BlockId id : s.table)
      if (seen.insert(id).second) out.push_back(id);
  }
  return out;
}

bool BlockManager::can_swap_out(const std::vector<SeqId>& seqs) const {
  return static_cast<int64_t>(distinct_blocks(seqs, Device::kGpu).size()) <= num_free_cpu_blocks();
}

std::vector<BlockPair> BlockManager::swap_out(const std::vector<SeqId>& seqs) {
  std::vector<BlockId> blocks = distinct_blocks(seqs, Device::kGpu);
  if (static_cast<int64_t>(blocks.size()) > num_free_cpu_blocks())
    throw std::runtime_error("out of CPU blocks for swap_out (check can_swap_out first)");
  // A block shared by several of these sequences moves once and stays shared.
  std::unordered_map<BlockId, BlockId> to_cpu;
  std::vector<BlockPair> mapping;
  for (BlockId g : blocks) {
    BlockId c = take_cpu_block();
    Block moved = gpu_[g];
    moved.cached = false;
    moved.ref_count = 0;
    cpu_[c] = std::move(moved);
    to_cpu[g] = c;
    mapping.emplace_back(g, c);
  }
  for (SeqId seq : seqs) {
    Sequence& s = seqs_.at(seq);
    for (auto b = s.table.rbegin(); b != s.table.rend(); ++b) {
      BlockId g = *b;
      *b = to_cpu[g];
      ++cpu_[*b].ref_count;
      release_gpu(g);  // a cached GPU copy stays reusable until evicted
    }
    s.device = Device::kCpu;
  }
#ifdef PAGEDSERVE_CHECK_INVARIANTS
  check_invariants();
#endif
  return mapping;
}

bool BlockManager::can_swap_in(const std::vector<SeqId>& seqs) const {
  std::unordered_set<BlockId> revived;
  int64_t needed = 0;
  for (BlockId c : distinct_blocks(seqs, Device::kCpu)) {
    const Block& b = cpu_[c];
    auto hit = b.content_id && enable_prefix_caching_ ? find_cached(b.hash, b) : std::nullopt;
    if (!hit) {
      ++needed;
    } else if (gpu_[*hit].ref_count == 0 && revived.insert(*hit).second) {
      ++needed;  // a free cached block leaves the free queue
    }
  }
  return num_free_gpu_blocks() - needed >= watermark_blocks_;
}

std::vector<BlockPair> BlockManager::swap_in(const std::vector<SeqId>& seqs) {
  std::vector<BlockId> blocks = distinct_blocks(seqs, Device::kCpu);
  // The GPU may still hold some of this very content, cached: reuse it instead of copying.
  // Two CPU blocks may hold the same content and so hit the same GPU block.
  std::unordered_map<BlockId, BlockId> to_gpu;
  std::unordered_set<BlockId> holds_first_ref;
  int64_t needed = 0;
  for (BlockId c : blocks) {
    const Block& b = cpu_[c];
    auto hit = b.content_id && enable_prefix_caching_ ? find_cached(b.hash, b) : std::nullopt;
    if (!hit) {
      ++needed;
      continue;
    }
    to_gpu[c] = *hit;
    if (holds_first_ref.insert(*hit).second && gpu_[*hit].ref_count == 0) ++needed;
  }
  if (needed > num_free_gpu_blocks())
    throw std::runtime_error("out of GPU blocks for swap_in (check can_swap_in first)");
  for (BlockId g : holds_first_ref) acquire_gpu(g);  // pin hits before taking fresh blocks
  std::vector<BlockPair> mapping;
  for (BlockId c : blocks) {
    if (to_gpu.count(c)) continue;
    BlockId g = take_gpu_block();
    gpu_[g] = cpu_[c];
    gpu_[g].ref_count = 1;
    to_gpu[c] = g;
    mapping.emplace_back(c, g);
  }
  // Each block above already counts one holder; the other holders acquire it here.
  for (const auto& [c, g] : mapping) holds_first_ref.insert(g);
  for (SeqId seq : seqs) {
    Sequence& s = seqs_.at(seq);
    for (BlockId& b : s.table) {
      BlockId c = b;
      b = to_gpu[c];
      if (holds_first_ref.erase(b) == 0) acquire_gpu(b);
      release_cpu(c);
    }
    s.device = Device::kGpu;
  }
  // Copied-in full blocks become prefix-cache entries again.
  if (enable_prefix_caching_) {
    for (const auto& [c, g] : mapping) {
      Block& b = gpu_[g];
      if (b.content_id && !find_cached(b.hash, b)) {
        cache_.emplace(b.hash, g);
        b.cached = true;
      }
    }
  }
#ifdef PAGEDSERVE_CHECK_INVARIANTS
  check_invariants();
#endif
  return mapping;
}

}  // namespace pagedserve
