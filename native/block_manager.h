// Paged KV-cache block manager: the paper's block-level memory management.
//
// Two pools of fixed-size physical blocks (GPU and CPU). Each sequence maps its
// logical blocks to physical ones through a block table; a block is taken only when
// a token needs it. Blocks are reference counted: fork() shares a parent's blocks,
// and appending into a shared, partly filled block is copy-on-write (the caller gets
// the (src, dst) pair to copy). Full GPU blocks are named by a chained prefix hash so
// later prompts with the same prefix reuse their KV (automatic prefix caching).
//
// Running out of blocks is a normal answer (the can_* queries say False); misuse
// (unknown sequence, double free, forking onto a live id, bad token id) throws
// std::invalid_argument with a message naming the problem.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "free_block_queue.h"

namespace pagedserve {

using SeqId = int64_t;
using BlockId = int32_t;
using TokenId = int32_t;
using BlockPair = std::pair<BlockId, BlockId>;

// A broken internal invariant: a bug in the manager, never the caller's fault.
struct InvariantViolation : std::logic_error {
  using std::logic_error::logic_error;
};

enum class Device : uint8_t { kGpu = 0, kCpu = 1 };

// How error messages name a sequence.
inline std::string seq_name(SeqId seq) { return "sequence " + std::to_string(seq); }

// Plain per-block metadata. Tokens are kept so a prefix hit can be verified
// token by token: a hash collision must never serve another prompt's KV.
//
// content_id names what a full block holds (its tokens AND everything before them):
// it is fresh each time a block fills, travels with the KV when it is swapped, and a
// child block records its parent's. A prefix hit must match the tokens, the salt and
// the parent's content_id, so a hash collision, or a parent block that was evicted and
// refilled since, can never make the cache serve KV computed for another prefix.
struct Block {
  int32_t ref_count = 0;
  int32_t num_tokens = 0;          // filled slots
  bool cached = false;             // registered in the prefix cache (GPU pool only)
  uint64_t hash = 0;               // chained: parent hash + salt + tokens (full blocks)
  uint64_t content_id = 0;         // nonzero once full
  uint64_t parent_content_id = 0;  // 0 for the first block of a sequence
  uint64_t salt = 0;
  std::vector<TokenId> tokens;     // the block's token ids (num_tokens of them)
};

struct Sequence {
  Device device = Device::kGpu;
  std::vector<BlockId> table;
  int64_t num_tokens = 0;    // tokens with a slot
  size_t num_sealed = 0;     // leading blocks that are full and computed
  uint64_t salt = 0;
};

struct BlockManagerStats {
  int64_t prefix_cache_queries = 0;  // prompt tokens looked up
  int64_t prefix_cache_hits = 0;     // prompt tokens served from the cache
};

class BlockManager {
 public:
  BlockManager(int32_t num_gpu_blocks, int32_t num_cpu_blocks, int32_t block_size,
               bool enable_prefix_caching = true, double watermark = 0.01,
               int64_t vocab_size = -1, int hash_bits = 64);

  // --- admission -------------------------------------------------------------
  bool can_allocate(const std::vector<TokenId>& token_ids, uint64_t salt = 0) const;
  // Maps the prompt onto GPU blocks; returns how many tokens came from the prefix cache.
  int64_t allocate(SeqId seq, const std::vector<TokenId>& token_ids, uint64_t salt = 0);

  // --- decode ----------------------------------------------------------------
  bool can_append(SeqId seq) const;
  // Reserves the slot for one new token; returns the copy-on-write pair if any.
  std::optional<BlockPair> append_slot(SeqId seq, TokenId token);
  // One decode step for many sequences; all-or-nothing when blocks run short.
  std::vector<BlockPair> append_slots(const std::vector<SeqId>& seqs,
                                      const std::vector<TokenId>& tokens);
  // One decode step for groups of sequences, in order: seqs holds group_sizes[0]
  // sequences of the first group, then the second's, and so on. Each group gets all its
  // slots or none; the first group that does not fit ends the call, and the groups
  // after it are not looked at. Running short is an answer, not an error: the caller
  // frees blocks (preempts) and calls again from the group that did not fit.
  struct Reservation {
    size_t num_groups = 0;          // leading groups whose slots are reserved
    std::vector<BlockPair> copies;  // copy-on-write pairs, in the order they happened
  };
  Reservation reserve_slots(const std::vector<SeqId>& seqs, const std::vector<TokenId>& tokens,
                            const std::vector<int64_t>& group_sizes);

  // Replaces the token of each sequence's last reserved slot. The engine reserves the
  // slot of a token it has not read back yet (it schedules the next decode while the
  // GPU samples that token) with a placeholder, and names the token here once known,
  // before mark_computed can seal its block into the prefix cache. Throws if that
  // block is sealed or shared: its tokens are then no longer the sequence's alone.
  void set_last_tokens(const std::vector<SeqId>& seqs, const std::vector<TokenId>& tokens);

  // The forward has written the KV of each sequence's first `num_computed` tokens.
  // Only now do its full blocks join the prefix cache: a slot is reserved before its
  // KV exists (a prompt chunk or a sampled token runs in a later step), and a hit must
  // never point at KV nobody has written yet.
  void mark_computed(const std::vector<SeqId>& seqs, const std::vector<int64_t>& num_computed);

  // --- sharing and release -----------------------------------------------------
  void fork(SeqId parent, SeqId child);
  void free(SeqId seq);

  // --- swap --------------------------------------------------------------------
  bool can_swap_out(const std::vector<SeqId>& seqs) const;
  std::vector<BlockPair> swap_out(const std::vector<SeqId>& seqs);  // (gpu, cpu)
  bool can_swap_in(const std::vector<SeqId>& seqs) const;
  std::vector<BlockPair> swap_in(const std::vector<SeqId>& seqs);   // (cpu, gpu)

  // --- inspection ------------------------------------------------------------
  const std::vector<BlockId>& block_table(SeqId seq) const;
  // The tables of many sequences in one call (a step's, when the runner's inputs are built).
  std::vector<std::vector<BlockId>> block_tables(const std::vector<SeqId>& seqs) const;
  int64_t num_tokens(SeqId seq) const;
  Device device_of(SeqId seq) const;
  bool has_seq(SeqId seq) const { return seqs_.count(seq) != 0; }
  std::vector<SeqId> seq_ids() const;
  int32_t ref_count(BlockId block, Device device) const;
  std::vector<BlockId> free_queue_order() const { return gpu_free_.order(); }

  int32_t block_size() const { return block_size_; }
  int32_t num_gpu_blocks() const { return static_cast<int32_t>(gpu_.size()); }
  int32_t num_cpu_blocks() const { return static_cast<int32_t>(cpu_.size()); }
  int32_t num_free_gpu_blocks() const { return gpu_free_.size(); }
  int32_t num_free_cpu_blocks() const { return static_cast<int32_t>(cpu_free_.size()); }
  int32_t num_cached_blocks() const { return static_cast<int32_t>(cache_.size()); }
  int32_t watermark_blocks() const { return watermark_blocks_; }
  bool prefix_caching_enabled() const { return enable_prefix_caching_; }
  double usage() const;        // used GPU blocks / GPU pool
  double utilization() const;  // real tokens / token slots of used GPU blocks
  const BlockManagerStats& stats() const { return stats_; }

  // Recomputes every invariant from scratch; throws InvariantViolation on a violation.
  void check_invariants() const;

 private:
  Sequence& seq_or_throw(SeqId seq);
  const Sequence& seq_or_throw(SeqId seq) const;
  void check_tokens(const std::vector<TokenId>& token_ids) const;
  // One slot for a sequence already checked (on the GPU, token in range): the multi-
  // sequence calls check their whole input once, then append through this.
  std::optional<BlockPair> append_checked(Sequence& s, TokenId token);
  uint64_t chain_hash(uint64_t parent_hash, uint64_t salt, const TokenId* tokens) const;

  // Prefix-cache lookup without side effects: the cached blocks that serve a prefix.
  std::vector<BlockId> match_prefix(const std::vector<TokenId>& token_ids, uint64_t salt) const;
  int32_t blocks_needed(const std::vector<TokenId>& token_ids, uint64_t salt) const;

  BlockId take_gpu_block();            // pops the eviction queue, evicting cached KV
  void acquire_gpu(BlockId id);        // ref += 1 (leaving the free queue at 0 -> 1)
  void release_gpu(BlockId id);        // ref -= 1 (entering the free queue at 1 -> 0)
  BlockId take_cpu_block();
  void release_cpu(BlockId id);
  void append_token(Block& block, TokenId token);
  void seal(const Sequence& s, size_t index);  // name a full computed block, cache it
  const Block* previous_block(const Sequence& s, size_t index) const;
  std::optional<BlockId> find_cached(uint64_t hash, const Block& like) const;
  void uncache(BlockId id);
  // Blocks that appending one slot to each of these sequences takes (copies included).
  int64_t blocks_for_append(const SeqId* seqs, size_t count) const;
  void check_appendable(const std::vector<SeqId>& seqs) const;
  std::vector<BlockId> distinct_blocks(const std::vector<SeqId>& seqs, Device device) const;

  int32_t block_size_;
  bool enable_prefix_caching_;
  int32_t watermark_blocks_;
  int64_t vocab_size_;
  uint64_t hash_mask_;
  uint64_t next_content_id_ = 1;

  std::vector<Block> gpu_, cpu_;
  FreeBlockQueue gpu_free_;
  std::vector<BlockId> cpu_free_;                 // a stack: CPU blocks hold no cache
  std::unordered_multimap<uint64_t, BlockId> cache_;  // hash -> GPU block (collisions kept)
  std::unordered_map<SeqId, Sequence> seqs_;
  BlockManagerStats stats_;
};

}  // namespace pagedserve
