// Inspection, statistics and the invariant check.
#include <algorithm>
#include <string>

#include "block_manager.h"

namespace pagedserve {

// ------------------------------------------------------------- inspection ----

const std::vector<BlockId>& BlockManager::block_table(SeqId seq) const { return seq_or_throw(seq).table; }

std::vector<std::vector<BlockId>> BlockManager::block_tables(const std::vector<SeqId>& seqs) const {
  std::vector<std::vector<BlockId>> out;
  out.reserve(seqs.size());
  for (SeqId id : seqs) out.push_back(seq_or_throw(id).table);
  return out;
}
int64_t BlockManager::num_tokens(SeqId seq) const { return seq_or_throw(seq).num_tokens; }
Device BlockManager::device_of(SeqId seq) const { return seq_or_throw(seq).device; }

std::vector<SeqId> BlockManager::seq_ids() const {
  std::vector<SeqId> ids;
  ids.reserve(seqs_.size());
  for (const auto& kv : seqs_) ids.push_back(kv.first);
  std::sort(ids.begin(), ids.end());
  return ids;
}

int32_t BlockManager::ref_count(BlockId block, Device device) const {
  const auto& pool = device == Device::kGpu ? gpu_ : cpu_;
  if (block < 0 || block >= static_cast<BlockId>(pool.size()))
    throw std::invalid_argument("block id " + std::to_string(block) + " is out of range");
  return pool[block].ref_count;
}

double BlockManager::usage() const {
  return 1.0 - static_cast<double>(num_free_gpu_blocks()) / num_gpu_blocks();
}

double BlockManager::utilization() const {
  int64_t used = 0, filled = 0;
  for (const Block& b : gpu_) {
    if (b.ref_count == 0) continue;
    ++used;
    filled += b.num_tokens;
  }
  return used ? static_cast<double>(filled) / (static_cast<double>(used) * block_size_) : 0.0;
}

void BlockManager::check_invariants() const {
  auto fail = [](const std::string& what) { throw InvariantViolation("block manager invariant: " + what); };
  std::vector<int32_t> gpu_refs(gpu_.size(), 0), cpu_refs(cpu_.size(), 0);
  for (const auto& [id, s] : seqs_) {
    auto& refs = s.device == Device::kGpu ? gpu_refs : cpu_refs;
    const auto& pool = s.device == Device::kGpu ? gpu_ : cpu_;
    int64_t want_blocks = (s.num_tokens + block_size_ - 1) / block_size_;
    if (static_cast<int64_t>(s.table.size()) != want_blocks) fail(seq_name(id) + " has a table of the wrong length");
    if (s.num_sealed > s.table.size()) fail(seq_name(id) + " has more sealed blocks than blocks");
    for (size_t i = 0; i < s.table.size(); ++i) {
      BlockId b = s.table[i];
      if (b < 0 || b >= static_cast<BlockId>(pool.size())) fail(seq_name(id) + " holds an out-of-range block");
      if (i < s.num_sealed && (pool[b].content_id == 0 || pool[b].num_tokens != block_size_))
        fail(seq_name(id) + " has a sealed block that is not full and named");
      ++refs[b];
      int64_t want = std::min<int64_t>(block_size_, s.num_tokens - static_cast<int64_t>(i) * block_size_);
      if (pool[b].num_tokens != want || static_cast<int64_t>(pool[b].tokens.size()) != want)
        fail("block " + std::to_string(b) + " of " + seq_name(id) + " has the wrong token count");
    }
  }
  for (size_t b = 0; b < gpu_.size(); ++b) {
    if (gpu_[b].ref_count != gpu_refs[b]) fail("GPU block " + std::to_string(b) + " ref count != table references");
    if ((gpu_[b].ref_count == 0) != gpu_free_.contains(static_cast<BlockId>(b)))
      fail("GPU block " + std::to_string(b) + " is neither free nor referenced (or both)");
  }
  for (size_t b = 0; b < cpu_.size(); ++b)
    if (cpu_[b].ref_count != cpu_refs[b]) fail("CPU block " + std::to_string(b) + " ref count != table references");
  int64_t cpu_free = std::count_if(cpu_.begin(), cpu_.end(), [](const Block& b) { return b.ref_count == 0; });
  if (cpu_free != static_cast<int64_t>(cpu_free_.size())) fail("CPU free list size != unreferenced CPU blocks");
  size_t cached = 0;
  for (size_t b = 0; b < gpu_.size(); ++b) {
    if (!gpu_[b].cached) continue;
    ++cached;
    if (gpu_[b].num_tokens != block_size_) fail("a cached block is not full");
  }
  if (cached != cache_.size()) fail("prefix cache entries != blocks marked cached");
  for (const auto& [h, b] : cache_)
    if (!gpu_[b].cached || gpu_[b].hash != h) fail("prefix cache entry points at the wrong block");
}

}  // namespace pagedserve
