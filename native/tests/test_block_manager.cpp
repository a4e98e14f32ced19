// Unit tests of the block manager: exact block ids, reference counts, copy-on-write
// pairs, eviction order, swap mappings and prefix hits.
#include <cstdio>
#include <functional>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "kv_shadow.h"

using namespace pagedserve;
using pagedserve::testing::KvShadow;
using Ids = std::vector<int32_t>;

namespace {

int failures = 0;

template <typename A, typename B>
void expect_eq(const A& got, const B& want, const char* expr, int line) {
  if (got == want) return;
  ++failures;
  std::fprintf(stderr, "line %d: %s was not what the test expects\n", line, expr);
}

template <typename Fn>
void expect_throw(Fn fn, const std::string& fragment, int line) {
  try {
    fn();
  } catch (const std::invalid_argument& e) {
    if (std::string(e.what()).find(fragment) != std::string::npos) return;
    ++failures;
    std::fprintf(stderr, "line %d: message '%s' lacks '%s'\n", line, e.what(), fragment.c_str());
    return;
  }
  ++failures;
  std::fprintf(stderr, "line %d: expected std::invalid_argument\n", line);
}

#define EXPECT_EQ(got, want) expect_eq((got), (want), #got, __LINE__)
#define EXPECT_THROW(stmt, fragment) expect_throw([&] { stmt; }, fragment, __LINE__)

std::vector<TokenId> range(int from, int to) {
  std::vector<TokenId> v(to - from);
  std::iota(v.begin(), v.end(), from);
  return v;
}

void blocks_are_taken_only_when_needed() {
  BlockManager bm(8, 4, 4, /*prefix caching*/ false, 0.0);
  EXPECT_EQ(bm.allocate(1, range(0, 5)), 0);
  EXPECT_EQ(bm.block_table(1), (Ids{0, 1}));
  EXPECT_EQ(bm.num_free_gpu_blocks(), 6);
  for (int t = 5; t < 8; ++t) EXPECT_EQ(bm.append_slot(1, t).has_value(), false);
  EXPECT_EQ(bm.block_table(1), (Ids{0, 1}));  // block 1 filled in place
  bm.append_slot(1, 8);
  EXPECT_EQ(bm.block_table(1), (Ids{0, 1, 2}));  // the 9th token needs block 2
  EXPECT_EQ(bm.utilization(), 9.0 / 12.0);
  bm.free(1);
  EXPECT_EQ(bm.num_free_gpu_blocks(), 8);
}

void fork_shares_and_copy_on_write_returns_the_pair() {
  BlockManager bm(8, 0, 4, false, 0.0);
  KvShadow kv(bm);
  kv.allocate(1, range(0, 6));  // blocks 0 (full), 1 (2 of 4)
  kv.fork(1, 2);
  EXPECT_EQ(bm.ref_count(0, Device::kGpu), 2);
  EXPECT_EQ(bm.ref_count(1, Device::kGpu), 2);
  auto copy = kv.append(2, 100);  // writes into the shared partial block 1
  EXPECT_EQ(copy.has_value(), true);
  EXPECT_EQ(copy->first, 1);
  EXPECT_EQ(copy->second, 2);
  EXPECT_EQ(bm.block_table(2), (Ids{0, 2}));
  EXPECT_EQ(bm.ref_count(1, Device::kGpu), 1);
  EXPECT_EQ(kv.append(1, 200).has_value(), false);  // sole holder now: in place
  EXPECT_EQ(bm.block_table(1), (Ids{0, 1}));
  EXPECT_EQ(bm.ref_count(0, Device::kGpu), 2);  // the full block stays shared
  kv.verify();
  // Three holders of one partial block appending in one step: two copies, one in place.
  kv.fork(1, 3);
  kv.fork(1, 4);
  auto copies = bm.append_slots({1, 3, 4}, {7, 8, 9});
  EXPECT_EQ(copies, (std::vector<BlockPair>{{1, 3}, {1, 4}}));
  EXPECT_EQ(bm.block_table(4), (Ids{0, 1}));
}

void append_slots_is_all_or_nothing() {
  BlockManager bm(3, 0, 2, false, 0.0);
  bm.allocate(1, range(0, 2));
  bm.allocate(2, range(0, 2));
  bm.allocate(3, range(0, 2));  // pool full; each sequence needs a new block next
  bool threw = false;
  try {
    bm.append_slots({1, 2}, {5, 6});
  } catch (const std::runtime_error&) {
    threw = true;
  }
  EXPECT_EQ(threw, true);
  EXPECT_EQ(bm.num_tokens(1), 2);  // nothing changed
  EXPECT_EQ(bm.can_append(1), false);
}

void reserve_slots_stops_at_the_first_group_that_does_not_fit() {
  BlockManager bm(5, 0, 2, false, 0.0);
  bm.allocate(1, range(0, 2));  // full: its next slot takes a new block
  bm.allocate(2, range(0, 3));  // a free slot in its last block
  bm.fork(2, 3);                // 2 and 3 share that partial block
  bm.allocate(4, range(0, 2));
  // Free: 5 - 1 - 2 - 1 = 1 block. Group {1} takes it; group {2, 3} then needs one copy
  // (the last holder writes in place) and does not fit; group {4} is not looked at.
  auto r = bm.reserve_slots({1, 2, 3, 4}, {9, 9, 9, 9}, {1, 2, 1});
  EXPECT_EQ(r.num_groups, size_t{1});
  EXPECT_EQ(r.copies.empty(), true);
  EXPECT_EQ(bm.num_tokens(1), 3);
  EXPECT_EQ(bm.num_tokens(2), 3);  // the group that did not fit is untouched
  EXPECT_EQ(bm.num_tokens(4), 2);
  bm.free(4);  // frees one block (2 and 3 share the others)
  r = bm.reserve_slots({2, 3}, {9, 9}, {2});
  EXPECT_EQ(r.num_groups, size_t{1});
  EXPECT_EQ(r.copies, (std::vector<BlockPair>{{bm.block_table(3)[1], bm.block_table(2)[1]}}));
  EXPECT_EQ(bm.block_tables({2, 3}), (std::vector<std::vector<BlockId>>{bm.block_table(2), bm.block_table(3)}));
  EXPECT_EQ(bm.reserve_slots({}, {}, {0, 0}).num_groups, size_t{2});  // empty groups always fit
  EXPECT_THROW(bm.reserve_slots({1}, {9}, {2}), "group_sizes add up to 2");
  EXPECT_THROW(bm.reserve_slots({1, 1}, {9, 9}, {1, 1}), "appears twice");
  bm.check_invariants();
}

void prefix_hits_are_counted_and_shared() {
  BlockManager bm(8, 0, 4, true, 0.0);
  KvShadow kv(bm);
  EXPECT_EQ(kv.allocate(1, range(0, 10)), 0);  // blocks 0, 1 full and cached; 2 partial
  EXPECT_EQ(bm.num_cached_blocks(), 2);
  auto prompt = range(0, 8);
  prompt.push_back(99);
  EXPECT_EQ(kv.allocate(2, prompt), 8);  // both full blocks served from the cache
  EXPECT_EQ(bm.block_table(2), (Ids{0, 1, 3}));
  EXPECT_EQ(bm.ref_count(0, Device::kGpu), 2);
  // A prompt that is exactly the cached blocks still computes its last token.
  EXPECT_EQ(kv.allocate(3, range(0, 8)), 4);
  EXPECT_EQ(bm.block_table(3), (Ids{0, 4}));
  EXPECT_EQ(bm.stats().prefix_cache_queries, 10 + 9 + 8);
  EXPECT_EQ(bm.stats().prefix_cache_hits, 8 + 4);
  // Another tenant's salt never shares.
  EXPECT_EQ(kv.allocate(4, range(0, 10), /*salt*/ 7), 0);
  kv.verify();
}

void freed_cached_blocks_are_evicted_lru_tail_first() {
  BlockManager bm(8, 0, 2, true, 0.0);
  bm.allocate(1, range(0, 5));    // 0:[0,1] 1:[2,3] full, 2:[4] partial
  bm.allocate(2, range(10, 14));  // 3, 4 full
  bm.mark_computed({1, 2}, {5, 4});  // the prefill ran: the full blocks join the cache
  EXPECT_EQ(bm.free_queue_order(), (Ids{5, 6, 7}));
  bm.free(1);  // partial block 2 to the front; cached 1 then 0 to the back
  EXPECT_EQ(bm.free_queue_order(), (Ids{2, 5, 6, 7, 1, 0}));
  bm.free(2);
  EXPECT_EQ(bm.free_queue_order(), (Ids{2, 5, 6, 7, 1, 0, 4, 3}));
  EXPECT_EQ(bm.num_cached_blocks(), 4);
  bm.allocate(3, range(100, 110));  // five new blocks: 2, 5, 6, 7, then evicts 1
  bm.mark_computed({3}, {10});
  EXPECT_EQ(bm.block_table(3), (Ids{2, 5, 6, 7, 1}));
  EXPECT_EQ(bm.free_queue_order(), (Ids{0, 4, 3}));
  // Sequence 1's head block survived its tail: its prompt gets one block from the cache.
  EXPECT_EQ(bm.allocate(4, range(0, 5)), 2);
  EXPECT_EQ(bm.block_table(4)[0], 0);
}

void blocks_join_the_cache_only_once_computed() {
  BlockManager bm(16, 0, 4, true, 0.0);
  bm.allocate(1, range(0, 9));  // slots reserved, KV not written yet
  EXPECT_EQ(bm.num_cached_blocks(), 0);
  EXPECT_EQ(bm.allocate(2, range(0, 9)), 0);  // so nothing can be served from them
  bm.mark_computed({1}, {6});  // a first prefill chunk covers block 0 only
  EXPECT_EQ(bm.num_cached_blocks(), 1);
  EXPECT_EQ(bm.allocate(3, range(0, 9)), 4);
  bm.mark_computed({1}, {9});
  EXPECT_EQ(bm.num_cached_blocks(), 2);
  EXPECT_EQ(bm.allocate(4, range(0, 9)), 8);
  EXPECT_EQ(bm.block_table(4)[1], bm.block_table(1)[1]);
  // A decode token's block is computed a step after its slot was reserved.
  for (int t = 9; t < 12; ++t) bm.append_slot(1, t);
  EXPECT_EQ(bm.num_cached_blocks(), 2);
  bm.mark_computed({1}, {12});
  EXPECT_EQ(bm.num_cached_blocks(), 3);
}

void a_hash_collision_is_never_served() {
  // One hash bit: among three distinct blocks, two share a hash by pigeonhole.
  BlockManager bm(32, 0, 2, true, 0.0, -1, /*hash_bits*/ 1);
  KvShadow kv(bm);
  const std::vector<std::vector<TokenId>> prompts = {{1, 2, 9}, {3, 4, 9}, {5, 6, 9}};
  std::vector<BlockId> first_block;
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(kv.allocate(static_cast<SeqId>(i), prompts[i]), 0);  // a new prompt never hits
    first_block.push_back(bm.block_table(static_cast<SeqId>(i))[0]);
  }
  EXPECT_EQ(bm.num_cached_blocks(), 3);  // colliding blocks coexist in the cache
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(kv.allocate(static_cast<SeqId>(10 + i), prompts[i]), 2);  // each hits its own block
    EXPECT_EQ(bm.block_table(static_cast<SeqId>(10 + i))[0], first_block[i]);
  }
  kv.verify();
}

void swap_moves_shared_blocks_once() {
  BlockManager bm(8, 8, 4, false, 0.0);
  KvShadow kv(bm);
  kv.allocate(1, range(0, 6));  // 0, 1
  kv.fork(1, 2);
  kv.append(2, 50);  // CoW: 2's table is {0, 2}
  auto out = kv.swap_out({1, 2});
  EXPECT_EQ(out, (std::vector<BlockPair>{{0, 0}, {1, 1}, {2, 2}}));
  EXPECT_EQ(bm.block_table(1), (Ids{0, 1}));
  EXPECT_EQ(bm.block_table(2), (Ids{0, 2}));
  EXPECT_EQ(bm.ref_count(0, Device::kCpu), 2);  // still shared, on the CPU
  EXPECT_EQ(bm.num_free_gpu_blocks(), 8);
  EXPECT_EQ(bm.num_free_cpu_blocks(), 5);
  kv.allocate(3, range(100, 104));  // takes a GPU block while they are away
  auto in = kv.swap_in({1, 2});
  EXPECT_EQ(in.size(), 3u);
  EXPECT_EQ(bm.ref_count(bm.block_table(1)[0], Device::kGpu), 2);
  EXPECT_EQ(bm.block_table(1)[0], bm.block_table(2)[0]);
  EXPECT_EQ(bm.num_free_cpu_blocks(), 8);
  kv.verify();
}

void swap_in_reuses_content_still_cached_on_the_gpu() {
  BlockManager bm(8, 8, 2, true, 0.0);
  KvShadow kv(bm);
  kv.allocate(1, range(0, 5));  // 0, 1 full; 2 partial
  auto out = kv.swap_out({1});
  EXPECT_EQ(out, (std::vector<BlockPair>{{0, 0}, {1, 1}, {2, 2}}));
  auto in = kv.swap_in({1});
  // Blocks 0 and 1 were never evicted: only the partial block is copied back.
  EXPECT_EQ(in.size(), 1u);
  EXPECT_EQ(bm.block_table(1)[0], 0);
  EXPECT_EQ(bm.block_table(1)[1], 1);
  kv.verify();
}

void misuse_raises_clear_errors() {
  BlockManager bm(4, 2, 4, true, 0.0, /*vocab*/ 100);
  bm.allocate(1, {1, 2, 3});
  EXPECT_THROW(bm.allocate(1, {1}), "already allocated");
  EXPECT_THROW(bm.free(9), "unknown sequence 9");
  EXPECT_THROW(bm.fork(1, 1), "already exists");
  EXPECT_THROW(bm.allocate(2, {5, 100}), "token id 100 at position 1 is out of range");
  EXPECT_THROW(bm.append_slot(1, -1), "out of range");
  EXPECT_THROW(bm.allocate(3, {}), "must not be empty");
  bm.free(1);
  EXPECT_THROW(bm.free(1), "double free");
  bm.allocate(4, {1});
  bm.swap_out({4});
  EXPECT_THROW(bm.append_slot(4, 1), "swapped out");
  EXPECT_THROW(bm.swap_out({4}), "not on the GPU");
}

void watermark_keeps_headroom_for_running_sequences() {
  BlockManager bm(100, 0, 4, false, 0.05);  // 5 blocks held back from admission
  EXPECT_EQ(bm.watermark_blocks(), 5);
  EXPECT_EQ(bm.can_allocate(range(0, 95 * 4)), true);
  EXPECT_EQ(bm.can_allocate(range(0, 95 * 4 + 1)), false);
  bm.allocate(1, range(0, 95 * 4));
  EXPECT_EQ(bm.can_append(1), true);  // growth may use the headroom
}

}  // namespace

void a_placeholder_token_is_named_before_its_block_is_cached() {
  // Block size 2, prefix caching on: seq 1 holds [10, 11] [12, ?] after reserving the
  // slot of a token not sampled yet (placeholder 0), which turns out to be 13.
  BlockManager bm(8, 0, 2, true, 0.0);
  bm.allocate(1, {10, 11, 12});
  bm.append_slots({1}, {0});
  bm.set_last_tokens({1}, {13});
  bm.mark_computed({1}, {4});  // the block [12, 13] is sealed with the real token
  EXPECT_EQ(bm.allocate(2, {10, 11, 12, 13, 14}), 4);  // both blocks served
  EXPECT_EQ(bm.allocate(3, {10, 11, 12, 0, 14}), 2);   // the placeholder never was cached
  bool threw = false;
  try {
    bm.set_last_tokens({1}, {14});  // sealed now: the cached content must not change
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  EXPECT_EQ(threw, true);
}

int main() {
  const std::vector<std::pair<const char*, std::function<void()>>> tests = {
      {"blocks_are_taken_only_when_needed", blocks_are_taken_only_when_needed},
      {"fork_shares_and_copy_on_write_returns_the_pair", fork_shares_and_copy_on_write_returns_the_pair},
      {"append_slots_is_all_or_nothing", append_slots_is_all_or_nothing},
      {"reserve_slots_stops_at_the_first_group_that_does_not_fit",
       reserve_slots_stops_at_the_first_group_that_does_not_fit},
      {"prefix_hits_are_counted_and_shared", prefix_hits_are_counted_and_shared},
      {"freed_cached_blocks_are_evicted_lru_tail_first", freed_cached_blocks_are_evicted_lru_tail_first},
      {"blocks_join_the_cache_only_once_computed", blocks_join_the_cache_only_once_computed},
      {"a_hash_collision_is_never_served", a_hash_collision_is_never_served},
      {"swap_moves_shared_blocks_once", swap_moves_shared_blocks_once},
      {"swap_in_reuses_content_still_cached_on_the_gpu", swap_in_reuses_content_still_cached_on_the_gpu},
      {"misuse_raises_clear_errors", misuse_raises_clear_errors},
      {"a_placeholder_token_is_named_before_its_block_is_cached",
       a_placeholder_token_is_named_before_its_block_is_cached},
      {"watermark_keeps_headroom_for_running_sequences", watermark_keeps_headroom_for_running_sequences},
  };
  int passed = 0, failed = 0;
  for (const auto& [name, fn] : tests) {
    int before = failures;
    try {
      fn();
    } catch (const std::exception& e) {
      ++failures;
      std::fprintf(stderr, "%s threw: %s\n", name, e.what());
    }
    bool ok = failures == before;
    std::printf("%s %s\n", ok ? "PASS" : "FAIL", name);
    (ok ? passed : failed)++;
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
