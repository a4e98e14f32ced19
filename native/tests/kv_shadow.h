// A shadow KV pool for tests: it plays the model runner (writes each token into the
// slot the manager gave it, performs the copy-on-write and swap copies the manager
// asks for) and then reads every sequence back through its block table. If the
// manager ever served a wrong prefix-cache hit, lost a copy or mis-mapped a swap, a
// sequence would read back tokens that are not its own.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "block_manager.h"

namespace pagedserve::testing {

class KvShadow {
 public:
  // eager: every reserved slot is computed at once. Otherwise slots wait for compute(),
  // as in the engine, where a prompt chunk or a sampled token runs in a later step.
  explicit KvShadow(BlockManager& bm, bool eager = true)
      : bm_(bm),
        eager_(eager),
        gpu_(static_cast<size_t>(bm.num_gpu_blocks()) * bm.block_size(), -1),
        cpu_(static_cast<size_t>(bm.num_cpu_blocks()) * bm.block_size(), -1) {}

  int64_t allocate(SeqId seq, const std::vector<TokenId>& tokens, uint64_t salt = 0) {
    int64_t cached = bm_.allocate(seq, tokens, salt);
    tokens_[seq] = tokens;
    computed_[seq] = cached;
    if (eager_) compute(seq);
    return cached;
  }

  // The forward: writes the sequence's pending tokens and tells the manager.
  void compute(SeqId seq) {
    const auto& toks = tokens_.at(seq);
    for (size_t p = computed_[seq]; p < toks.size(); ++p) write(seq, p, toks[p]);
    computed_[seq] = toks.size();
    bm_.mark_computed({seq}, {static_cast<int64_t>(toks.size())});
  }

  std::optional<BlockPair> append(SeqId seq, TokenId token) {
    auto copy = bm_.append_slot(seq, token);
    if (copy) copy_block(gpu_, gpu_, copy->first, copy->second);
    tokens_[seq].push_back(token);
    if (eager_) compute(seq);
    return copy;
  }

  // One decode step; when it throws (out of blocks) no table may have changed.
  std::vector<BlockPair> append_many(const std::vector<SeqId>& seqs, const std::vector<TokenId>& tokens) {
    std::vector<std::vector<BlockId>> before;
    for (SeqId s : seqs) before.push_back(bm_.block_table(s));
    std::vector<BlockPair> copies;
    try {
      copies = bm_.append_slots(seqs, tokens);
    } catch (const std::runtime_error&) {
      for (size_t i = 0; i < seqs.size(); ++i)
        if (bm_.block_table(seqs[i]) != before[i]) throw std::logic_error("a failed append_slots changed a table");
      throw;
    }
    for (auto [src, dst] : copies) copy_block(gpu_, gpu_, src, dst);
    for (size_t i = 0; i < seqs.size(); ++i) {
      tokens_[seqs[i]].push_back(tokens[i]);
      if (eager_) compute(seqs[i]);
    }
    return copies;
  }

  void fork(SeqId parent, SeqId child) {
    bm_.fork(parent, child);
    tokens_[child] = tokens_[parent];
    computed_[child] = computed_[parent];
  }

  void free(SeqId seq) {
    bm_.free(seq);
    tokens_.erase(seq);
    computed_.erase(seq);
  }

  std::vector<BlockPair> swap_out(const std::vector<SeqId>& seqs) {
    auto mapping = bm_.swap_out(seqs);
    for (auto [g, c] : mapping) copy_block(gpu_, cpu_, g, c);
    return mapping;
  }

  std::vector<BlockPair> swap_in(const std::vector<SeqId>& seqs) {
    auto mapping = bm_.swap_in(seqs);
    for (auto [c, g] : mapping) copy_block(cpu_, gpu_, c, g);
    return mapping;
  }

  // Throws if any sequence reads back anything but its own tokens (computed ones).
  void verify() const {
    const int32_t bs = bm_.block_size();
    for (const auto& [seq, toks] : tokens_) {
      const auto& table = bm_.block_table(seq);
      const auto& pool = bm_.device_of(seq) == Device::kGpu ? gpu_ : cpu_;
      if (bm_.num_tokens(seq) != static_cast<int64_t>(toks.size()))
        throw std::runtime_error("sequence " + std::to_string(seq) + " has the wrong token count");
      for (size_t p = 0; p < computed_.at(seq); ++p) {
        if (pool[static_cast<size_t>(table[p / bs]) * bs + p % bs] != toks[p])
          throw std::runtime_error("sequence " + std::to_string(seq) + " reads a wrong token at position " +
                                   std::to_string(p));
      }
    }
  }

  const std::map<SeqId, std::vector<TokenId>>& sequences() const { return tokens_; }

 private:
  void write(SeqId seq, size_t pos, TokenId token) {
    const int32_t bs = bm_.block_size();
    BlockId b = bm_.block_table(seq)[pos / bs];
    gpu_[static_cast<size_t>(b) * bs + pos % bs] = token;
  }

  void copy_block(const std::vector<int32_t>& from, std::vector<int32_t>& to, BlockId src, BlockId dst) {
    const int32_t bs = bm_.block_size();
    for (int32_t i = 0; i < bs; ++i)
      to[static_cast<size_t>(dst) * bs + i] = from[static_cast<size_t>(src) * bs + i];
  }

  BlockManager& bm_;
  bool eager_;
  std::map<SeqId, size_t> computed_;
  std::vector<int32_t> gpu_, cpu_;
  std::map<SeqId, std::vector<TokenId>> tokens_;
};

}  // namespace pagedserve::testing
