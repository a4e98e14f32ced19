#include "block_manager.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <unordered_set>

namespace pagedserve {
namespace {

constexpr uint64_t kRootHash = 0x9e3779b97f4a7c15ULL;

uint64_t mix(uint64_t x) {  // splitmix64 finalizer: cheap, well distributed
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

BlockManager::BlockManager(int32_t num_gpu_blocks, int32_t num_cpu_blocks, int32_t block_size,
                           bool enable_prefix_caching, double watermark, int64_t vocab_size,
                           int hash_bits)
    : block_size_(block_size),
      enable_prefix_caching_(enable_prefix_caching),
      vocab_size_(vocab_size),
      gpu_free_(std::max(num_gpu_blocks, 0)) {
  if (num_gpu_blocks <= 0) throw std::invalid_argument("num_gpu_blocks must be > 0");
  if (num_cpu_blocks < 0) throw std::invalid_argument("num_cpu_blocks must be >= 0");
  if (block_size <= 0) throw std::invalid_argument("block_size must be > 0");
  if (!(watermark >= 0.0 && watermark < 1.0))
    throw std::invalid_argument("watermark must be in [0, 1)");
  if (hash_bits < 1 || hash_bits > 64) throw std::invalid_argument("hash_bits must be in [1, 64]");
  watermark_blocks_ = static_cast<int32_t>(std::floor(watermark * num_gpu_blocks));
  hash_mask_ = hash_bits == 64 ? ~0ULL : ((1ULL << hash_bits) - 1);
  gpu_.resize(num_gpu_blocks);
  cpu_.resize(num_cpu_blocks);
  // Popped from the back: block 0 is handed out first, which keeps ids predictable.
  for (BlockId id = num_cpu_blocks - 1; id >= 0; --id) cpu_free_.push_back(id);
}

// ---------------------------------------------------------------- helpers ----

Sequence& BlockManager::seq_or_throw(SeqId seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) throw std::invalid_argument("unknown " + seq_name(seq));
  return it->second;
}

const Sequence& BlockManager::seq_or_throw(SeqId seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) throw std::invalid_argument("unknown " + seq_name(seq));
  return it->second;
}

void BlockManager::check_tokens(const std::vector<TokenId>& token_ids) const {
  for (size_t i = 0; i < token_ids.size(); ++i) {
    TokenId t = token_ids[i];
    if (t < 0 || (vocab_size_ > 0 && t >= vocab_size_))
      throw std::invalid_argument("token id " + std::to_string(t) + " at position " +
                                  std::to_string(i) + " is out of range [0, " +
                                  std::to_string(vocab_size_ > 0 ? vocab_size_ : INT32_MAX) + ")");
  }
}

uint64_t BlockManager::chain_hash(uint64_t parent_hash, uint64_t salt, const TokenId* tokens) const {
  uint64_t h = mix(parent_hash ^ mix(salt));
  for (int32_t i = 0; i < block_size_; ++i) h = mix(h ^ static_cast<uint32_t>(tokens[i]));
  return h & hash_mask_;
}

const Block* BlockManager::previous_block(const Sequence& s, size_t index) const {
  if (index == 0) return nullptr;
  const auto& pool = s.device == Device::kGpu ? gpu_ : cpu_;
  return &pool[s.table[index - 1]];
}

std::optional<BlockId> BlockManager::find_cached(uint64_t hash, const Block& like) const {
  auto range = cache_.equal_range(hash);
  for (auto it = range.first; it != range.second; ++it) {
    const Block& b = gpu_[it->second];
    if (b.salt == like.salt && b.parent_content_id == like.parent_content_id &&
        b.tokens == like.tokens)
      return it->second;
  }
  return std::nullopt;
}

std::vector<BlockId> BlockManager::match_prefix(const std::vector<TokenId>& token_ids,
                                                uint64_t salt) const {
  std::vector<BlockId> hits;
  if (!enable_prefix_caching_) return hits;
  // At least one prompt token is always computed: the model needs its logits.
  size_t max_hits = token_ids.empty() ? 0 : (token_ids.size() - 1) / block_size_;
  Block probe;
  probe.salt = salt;
  uint64_t parent_hash = kRootHash;
  for (size_t i = 0; i < max_hits; ++i) {
    const TokenId* first = token_ids.data() + i * block_size_;
    probe.tokens.assign(first, first + block_size_);
    uint64_t h = chain_hash(parent_hash, salt, first);
    auto hit = find_cached(h, probe);
    if (!hit) break;
    hits.push_back(*hit);
    parent_hash = h;
    probe.parent_content_id = gpu_[*hit].content_id;
  }
  return hits;
}

int32_t BlockManager::blocks_needed(const std::vector<TokenId>& token_ids, uint64_t salt) const {
  int64_t total = (static_cast<int64_t>(token_ids.size()) + block_size_ - 1) / block_size_;
  int64_t needed = total;
  for (BlockId id : match_prefix(token_ids, salt))
    if (gpu_[id].ref_count > 0) --needed;  // shared with a live sequence: costs nothing
  return static_cast<int32_t>(std::min<int64_t>(needed, INT32_MAX));
}

BlockId BlockManager::take_gpu_block() {
  if (gpu_free_.size() == 0) throw std::runtime_error("out of GPU blocks (check can_* first)");
  BlockId id = gpu_free_.pop_front();
  if (gpu_[id].cached) uncache(id);  // evict: its KV is about to be overwritten
  gpu_[id] = Block{};
  gpu_[id].ref_count = 1;
  return id;
}

void BlockManager::acquire_gpu(BlockId id) {
  if (gpu_[id].ref_count++ == 0) gpu_free_.remove(id);
}

void BlockManager::release_gpu(BlockId id) {
  Block& b = gpu_[id];
  if (--b.ref_count > 0) return;
  if (b.cached) {
    gpu_free_.push_back(id);  // still names reusable KV: evict it last
  } else {
    gpu_free_.push_front(id);
  }
}

BlockId BlockManager::take_cpu_block() {
  if (cpu_free_.empty()) throw std::runtime_error("out of CPU blocks (check can_swap_out first)");
  BlockId id = cpu_free_.back();
  cpu_free_.pop_back();
  cpu_[id] = Block{};
  cpu_[id].ref_count = 1;
  return id;
}

void BlockManager::release_cpu(BlockId id) {
  if (--cpu_[id].ref_count == 0) {
    cpu_[id] = Block{};
    cpu_free_.push_back(id);
  }
}

void BlockManager::uncache(BlockId id) {
  auto range = cache_.equal_range(gpu_[id].hash);
  for (auto it = range.first; it != range.second; ++it) {
    if (it->second == id) {
      cache_.erase(it);
      break;
    }
  }
  gpu_[id].cached = false;
}

void BlockManager::append_token(Block& block, TokenId token) {
  block.tokens.push_back(token);
  ++block.num_tokens;
}

void BlockManager::seal(const Sequence& s, size_t index) {
  auto& pool = s.device == Device::kGpu ? gpu_ : cpu_;
  Block& b = pool[s.table[index]];
  if (b.content_id != 0) return;  // shared and already sealed by another holder
  const Block* parent = previous_block(s, index);
  b.salt = s.salt;
  b.parent_content_id = parent ? parent->content_id : 0;
  if (!enable_prefix_caching_ || s.device != Device::kGpu) {
    b.content_id = next_content_id_++;
    return;
  }
  b.hash = chain_hash(parent ? parent->hash : kRootHash, s.salt, b.tokens.data());
  // Two sequences may compute the same block before either is cached: keep the first
  // in the cache, and let the twin take its name, so blocks that follow either one
  // chain onto the cached entry.
  if (auto twin = find_cached(b.hash, b)) {
    b.content_id = gpu_[*twin].content_id;
  } else {
    b.content_id = next_content_id_++;
    cache_.emplace(b.hash, s.table[index]);
    b.cached = true;
  }
}

// -------------------------------------------------------------- admission ----

bool BlockManager::can_allocate(const std::vector<TokenId>& token_ids, uint64_t salt) const {
  return num_free_gpu_blocks() - blocks_needed(token_ids, salt) >= watermark_blocks_;
}

int64_t BlockManager::allocate(SeqId seq, const std::vector<TokenId>& token_ids, uint64_t salt) {
  if (seqs_.count(seq)) throw std::invalid_argument(seq_name(seq) + " is already allocated");
  if (token_ids.empty()) throw std::invalid_argument("token_ids must not be empty");
  check_tokens(token_ids);
  if (blocks_needed(token_ids, salt) > num_free_gpu_blocks())
    throw std::runtime_error("out of GPU blocks for " + seq_name(seq) + " (check can_allocate first)");

  std::vector<BlockId> hits = match_prefix(token_ids, salt);
  Sequence s;
  s.salt = salt;
  for (BlockId id : hits) {
    acquire_gpu(id);  // before taking new blocks, so they cannot evict a hit
    s.table.push_back(id);
  }
  s.num_tokens = static_cast<int64_t>(hits.size()) * block_size_;
  s.num_sealed = hits.size();
  for (size_t pos = s.num_tokens; pos < token_ids.size(); ++pos) {
    if (pos % block_size_ == 0) s.table.push_back(take_gpu_block());
    append_token(gpu_[s.table.back()], token_ids[pos]);
    ++s.num_tokens;
  }
  int64_t cached_tokens = static_cast<int64_t>(hits.size()) * block_size_;
  stats_.prefix_cache_queries += static_cast<int64_t>(token_ids.size());
  stats_.prefix_cache_hits += cached_tokens;
  seqs_.emplace(seq, std::move(s));
#ifdef PAGEDSERVE_CHECK_INVARIANTS
  check_invariants();
#endif
  return cached_tokens;
}

// ----------------------------------------------------------------- decode ----

bool BlockManager::can_append(SeqId seq) const {
  const Sequence& s = seq_or_throw(seq);
  if (s.device != Device::kGpu) return false;
  bool needs_block = s.num_tokens % block_size_ == 0 || gpu_[s.table.back()].ref_count > 1;
  return !needs_block || num_free_gpu_blocks() > 0;
}

std::optional<BlockPair> BlockManager::append_slot(SeqId seq, TokenId token) {
  Sequence& s = seq_or_throw(seq);
  if (s.device != Device::kGpu)
    throw std::invalid_argument(seq_name(seq) + " is swapped out; swap it in before appending");
  check_tokens({token});
  return append_checked(s, token);
}

std::optional<BlockPair> BlockManager::append_checked(Sequence& s, TokenId token) {
  std::optional<BlockPair> copy;
  if (s.num_tokens % block_size_ == 0) {
    s.table.push_back(take_gpu_block());
  } else if (gpu_[s.table.back()].ref_count > 1) {
    // Copy-on-write: the partly filled last block is shared (a fork); writing into it
    // would change what the other holders see.
    BlockId src = s.table.back();
    BlockId dst = take_gpu_block();
    gpu_[dst].tokens = gpu_[src].tokens;
    gpu_[dst].num_tokens = gpu_[src].num_tokens;
    release_gpu(src);
    s.table.back() = dst;
    copy = BlockPair{src, dst};
  }
  append_token(gpu_[s.table.back()], token);
  ++s.num_tokens;
#ifdef PAGEDSERVE_CHECK_INVARIANTS
  check_invariants();
#endif
  return copy;
}

// Counts exactly the blocks one slot for each of these sequences takes, so a step either
// fits whole or changes nothing. k holders of one shared partial block that all append
// need k-1 copies when they are all of its holders (the last one writes in place), k
// otherwise.
int64_t BlockManager::blocks_for_append(const SeqId* seqs, size_t count) const {
  std::unordered_map<BlockId, int32_t> appenders_of_shared;
  int64_t needed = 0;
  for (size_t i = 0; i < count; ++i) {
    const Sequence& s = seqs_.at(seqs[i]);  // checked by check_appendable
    if (s.num_tokens % block_size_ == 0) {
      ++needed;
    } else if (gpu_[s.table.back()].ref_count > 1) {
      ++appenders_of_shared[s.table.back()];
    }
  }
  for (const auto& [block, k] : appenders_of_shared)
    needed += (k == gpu_[block].ref_count) ? k - 1 : k;
  return needed;
}

// Misuse checks of one multi-sequence append, made once for the whole call.
void BlockManager::check_appendable(const std::vector<SeqId>& seqs) const {
  std::unordered_set<SeqId> seen;
  for (SeqId id : seqs) {
    const Sequence& s = seq_or_throw(id);
    if (!seen.insert(id).second)
      throw std::invalid_argument(seq_name(id) + " appears twice in one append call");
    if (s.device != Device::kGpu)
      throw std::invalid_argument(seq_name(id) + " is swapped out; swap it in before appending");
  }
}

std::vector<BlockPair> BlockManager::append_slots(const std::vector<SeqId>& seqs,
                                                  const std::vector<TokenId>& tokens) {
  if (seqs.size() != tokens.size())
    throw std::invalid_argument("seq_ids and token_ids must have the same length");
  check_appendable(seqs);
  if (blocks_for_append(seqs.data(), seqs.size()) > num_free_gpu_blocks())
    throw std::runtime_error("out of GPU blocks for this decode step (check can_append first)");
  check_tokens(tokens);

  std::vector<BlockPair> copies;
  for (size_t i = 0; i < seqs.size(); ++i)
    if (auto c = append_checked(seqs_.at(seqs[i]), tokens[i])) copies.push_back(*c);
  return copies;
}

BlockManager::Reservation BlockManager::reserve_slots(const std::vector<SeqId>& seqs,
                                                      const std::vector<TokenId>& tokens,
                                                      const std::vector<int64_t>& group_sizes) {
  if (seqs.size() != tokens.size())
    throw std::invalid_argument("seq_ids and token_ids must have the same length");
  int64_t total = 0;
  for (int64_t size : group_sizes) {
    if (size < 0) throw std::invalid_argument("group sizes must not be negative");
    total += size;
  }
  if (total != static_cast<int64_t>(seqs.size()))
    throw std::invalid_argument("group_sizes add up to " + std::to_string(total) + ", not to the " +
                                std::to_string(seqs.size()) + " seq_ids");
  check_appendable(seqs);
  check_tokens(tokens);
  Reservation out;
  size_t first = 0;
  for (int64_t size : group_sizes) {
    // Groups are counted one at a time, after the ones before them took their blocks:
    // a copy-on-write in one group changes the ref counts the next one sees.
    if (blocks_for_append(seqs.data() + first, static_cast<size_t>(size)) > num_free_gpu_blocks())
      break;
    for (size_t i = first; i < first + static_cast<size_t>(size); ++i)
      if (auto c = append_checked(seqs_.at(seqs[i]), tokens[i])) out.copies.push_back(*c);
    first += static_cast<size_t>(size);
    ++out.num_groups;
  }
  return out;
}

void BlockManager::set_last_tokens(const std::vector<SeqId>& seqs, const std::vector<TokenId>& tokens) {
  if (seqs.size() != tokens.size())
    throw std::invalid_argument("seq_ids and token_ids must have the same length");
  check_tokens(tokens);
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Sequence& s = seq_or_throw(seqs[i]);
    if (s.device != Device::kGpu || s.num_tokens == 0)
      throw std::invalid_argument(seq_name(seqs[i]) + " has no reserved slot on the GPU");
    const size_t index = static_cast<size_t>((s.num_tokens - 1) / block_size_);
    Block& b = gpu_[s.table[index]];
    if (index < s.num_sealed || b.content_id != 0 || b.ref_count > 1)
      throw std::invalid_argument("the last slot of " + seq_name(seqs[i]) +
                                  " is in a sealed or shared block; its token cannot change");
    b.tokens[static_cast<size_t>((s.num_tokens - 1) % block_size_)] = tokens[i];
  }
}

void BlockManager::mark_computed(const std::vector<SeqId>& seqs, const std::vector<int64_t>& num_computed) {
  if (seqs.size() != num_computed.size())
    throw std::invalid_argument("seq_ids and num_computed must have the same length");
  for (size_t i = 0; i < seqs.size(); ++i) {
    Sequence& s = seq_or_throw(seqs[i]);
    if (num_computed[i] < 0 || num_computed[i] > s.num_tokens)
      throw std::invalid_argument("num_computed " + std::to_string(num_computed[i]) + " of " +
                                  seq_name(seqs[i]) + " is outside [0, " + std::to_string(s.num_tokens) + "]");
    size_t full = static_cast<size_t>(num_computed[i] / block_size_);
    for (; s.num_sealed < full; ++s.num_sealed) seal(s, s.num_sealed);
  }
#ifdef PAGEDSERVE_CHECK_INVARIANTS
  check_invariants();
#endif
}

// ---------------------------------------------------- sharing and release ----

void BlockManager::fork(SeqId parent, SeqId child) {
  const Sequence& p = seq_or_throw(parent);
  if (seqs_.count(child)) throw std::invalid_argument("cannot fork onto " + seq_name(child) + ": it already exists");
  Sequence c = p;
  for (BlockId id : c.table) {
    if (c.device == Device::kGpu) {
      acquire_gpu(id);
    } else {
      ++cpu_[id].ref_count;
    }
  }
  seqs_.emplace(child, std::move(c));
#ifdef PAGEDSERVE_CHECK_INVARIANTS
  check_invariants();
#endif
}

void BlockManager::free(SeqId seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end())
    throw std::invalid_argument("cannot free unknown " + seq_name(seq) + " (double free?)");
  const Sequence& s = it->second;
  // Tail first: within a chain the tail then sits nearer the front of the eviction queue.
  for (auto b = s.table.rbegin(); b != s.table.rend(); ++b) {
    if (s.device == Device::kGpu) {
      release_gpu(*b);
    } else {
      release_cpu(*b);
    }
  }
  seqs_.erase(it);
#ifdef PAGEDSERVE_CHECK_INVARIANTS
  check_invariants();
#endif
}

}  // namespace pagedserve
