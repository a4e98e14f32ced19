// The GPU pool's free blocks, ordered for eviction.
//
// Allocation takes from the front. The order is what makes prefix caching pay off:
//   * blocks that hold no reusable KV (never filled, or partly filled) are pushed to
//     the FRONT, so they are reused before any cached block is evicted;
//   * a freed block that still names cached KV (it has a prefix hash) is pushed to the
//     BACK, so cached blocks leave in least-recently-freed order;
//   * a sequence frees its blocks tail first, so within one chain the tail sits
//     nearer the front than the head and is evicted before it (a head is shared by
//     more future prompts than its tail).
// A cached block that gets a prefix hit while free is unlinked from the middle, so
// every operation is O(1): an intrusive doubly linked list over block ids.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <vector>

namespace pagedserve {

class FreeBlockQueue {
 public:
  explicit FreeBlockQueue(int32_t num_blocks)
      : prev_(num_blocks, kNone), next_(num_blocks, kNone), linked_(num_blocks, false) {
    for (int32_t id = 0; id < num_blocks; ++id) push_back(id);
  }

  int32_t size() const { return size_; }
  bool contains(int32_t id) const { return linked_[id]; }
  int32_t front() const { return head_; }

  void push_back(int32_t id) {
    link(id, tail_, kNone);
  }

  void push_front(int32_t id) {
    link(id, kNone, head_);
  }

  int32_t pop_front() {
    if (head_ == kNone) throw std::logic_error("pop_front on an empty free block queue");
    int32_t id = head_;
    remove(id);
    return id;
  }

  void remove(int32_t id) {
    if (!linked_[id]) throw std::logic_error("block is not in the free queue");
    int32_t p = prev_[id], n = next_[id];
    (p == kNone ? head_ : next_[p]) = n;
    (n == kNone ? tail_ : prev_[n]) = p;
    prev_[id] = next_[id] = kNone;
    linked_[id] = false;
    --size_;
  }

  // Front-to-back order, for tests and invariant checks.
  std::vector<int32_t> order() const {
    std::vector<int32_t> out;
    out.reserve(size_);
    for (int32_t id = head_; id != kNone; id = next_[id]) out.push_back(id);
    return out;
  }

 private:
  static constexpr int32_t kNone = -1;

  void link(int32_t id, int32_t p, int32_t n) {
    if (linked_[id]) throw std::logic_error("block is already in the free queue");
    prev_[id] = p;
    next_[id] = n;
    (p == kNone ? head_ : next_[p]) = id;
    (n == kNone ? tail_ : prev_[n]) = id;
    linked_[id] = true;
    ++size_;
  }

  std::vector<int32_t> prev_, next_;
  std::vector<bool> linked_;
  int32_t head_ = kNone, tail_ = kNone, size_ = 0;
};

}  // namespace pagedserve
