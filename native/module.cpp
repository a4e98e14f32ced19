// pagedserve._native: registers the block manager with Python. Nothing else lives here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <limits>

#include "block_manager.h"

namespace py = pybind11;
using namespace pagedserve;

namespace {

// Python ints of any size arrive here, so an out-of-range id gets the manager's clear
// ValueError instead of pybind11's generic "incompatible function arguments".
std::vector<TokenId> to_token_ids(const std::vector<int64_t>& ids) {
  std::vector<TokenId> out(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] > std::numeric_limits<TokenId>::max())
      throw std::invalid_argument("token id " + std::to_string(ids[i]) + " at position " +
                                  std::to_string(i) + " is out of range");
    out[i] = static_cast<TokenId>(ids[i]);
  }
  return out;
}

Device to_device(const std::string& name) {
  if (name == "gpu") return Device::kGpu;
  if (name == "cpu") return Device::kCpu;
  throw std::invalid_argument("device must be 'gpu' or 'cpu', got '" + name + "'");
}

// A step's block tables as one int32 array and where each table starts in it: filled by
// memcpy, where lists of Python ints would cost one object per block of every sequence,
// every step (O(context length) per sequence).
py::tuple tables_array(const BlockManager& bm, const std::vector<SeqId>& seqs) {
  std::vector<const std::vector<BlockId>*> tables;
  tables.reserve(seqs.size());
  py::array_t<int64_t> offsets(static_cast<py::ssize_t>(seqs.size() + 1));
  auto off = offsets.mutable_unchecked<1>();
  off(0) = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    tables.push_back(&bm.block_table(seqs[i]));
    off(i + 1) = off(i) + static_cast<int64_t>(tables.back()->size());
  }
  py::array_t<BlockId> flat(static_cast<py::ssize_t>(off(seqs.size())));
  BlockId* out = flat.mutable_data();
  for (const auto* t : tables) out = std::copy(t->begin(), t->end(), out);
  return py::make_tuple(flat, offsets);
}

py::object pair_or_none(const std::optional<BlockPair>& p) {
  if (!p) return py::none();
  return py::make_tuple(p->first, p->second);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "Paged KV-cache block manager (reference counts, copy-on-write, prefix caching, swap)";
  py::register_exception<InvariantViolation>(m, "InvariantViolation", PyExc_AssertionError);

  py::class_<BlockManager>(m, "BlockManager")
      .def(py::init<int32_t, int32_t, int32_t, bool, double, int64_t, int>(),
           py::arg("num_gpu_blocks"), py::arg("num_cpu_blocks"), py::arg("block_size"),
           py::arg("enable_prefix_caching") = true, py::arg("watermark") = 0.01,
           py::arg("vocab_size") = -1, py::arg("hash_bits") = 64)
      .def("can_allocate",
           [](const BlockManager& bm, const std::vector<int64_t>& ids, uint64_t salt) {
             return bm.can_allocate(to_token_ids(ids), salt);
           },
           py::arg("token_ids"), py::arg("salt") = 0)
      .def("allocate",
           [](BlockManager& bm, SeqId seq, const std::vector<int64_t>& ids, uint64_t salt) {
             return bm.allocate(seq, to_token_ids(ids), salt);
           },
           py::arg("seq_id"), py::arg("token_ids"), py::arg("salt") = 0)
      .def("can_append", &BlockManager::can_append, py::arg("seq_id"))
      .def("append_slot",
           [](BlockManager& bm, SeqId seq, int64_t token) {
             return pair_or_none(bm.append_slot(seq, to_token_ids({token})[0]));
           },
           py::arg("seq_id"), py::arg("token_id"))
      .def("append_slots",
           [](BlockManager& bm, const std::vector<SeqId>& seqs, const std::vector<int64_t>& ids) {
             return bm.append_slots(seqs, to_token_ids(ids));
           },
           py::arg("seq_ids"), py::arg("token_ids"))
      .def("reserve_slots",
           [](BlockManager& bm, const std::vector<SeqId>& seqs, const std::vector<int64_t>& ids,
              const std::vector<int64_t>& group_sizes) {
             auto r = bm.reserve_slots(seqs, to_token_ids(ids), group_sizes);
             return py::make_tuple(r.num_groups, r.copies);
           },
           py::arg("seq_ids"), py::arg("token_ids"), py::arg("group_sizes"))
      .def("set_last_tokens",
           [](BlockManager& bm, const std::vector<SeqId>& seqs, const std::vector<int64_t>& ids) {
             bm.set_last_tokens(seqs, to_token_ids(ids));
           },
           py::arg("seq_ids"), py::arg("token_ids"))
      .def("mark_computed", &BlockManager::mark_computed, py::arg("seq_ids"), py::arg("num_computed"))
      .def("fork", &BlockManager::fork, py::arg("parent_seq_id"), py::arg("child_seq_id"))
      .def("free", &BlockManager::free, py::arg("seq_id"))
      .def("can_swap_out", &BlockManager::can_swap_out, py::arg("seq_ids"))
      .def("swap_out", &BlockManager::swap_out, py::arg("seq_ids"))
      .def("can_swap_in", &BlockManager::can_swap_in, py::arg("seq_ids"))
      .def("swap_in", &BlockManager::swap_in, py::arg("seq_ids"))
      .def("block_table", &BlockManager::block_table, py::arg("seq_id"))
      .def("block_tables", &BlockManager::block_tables, py::arg("seq_ids"))
      .def("block_tables_array", &tables_array, py::arg("seq_ids"))
      .def("num_tokens", &BlockManager::num_tokens, py::arg("seq_id"))
      .def("device_of",
           [](const BlockManager& bm, SeqId seq) {
             return bm.device_of(seq) == Device::kGpu ? "gpu" : "cpu";
           },
           py::arg("seq_id"))
      .def("has_seq", &BlockManager::has_seq, py::arg("seq_id"))
      .def("seq_ids", &BlockManager::seq_ids)
      .def("ref_count",
           [](const BlockManager& bm, BlockId block, const std::string& device) {
             return bm.ref_count(block, to_device(device));
           },
           py::arg("block_id"), py::arg("device") = "gpu")
      .def("free_queue_order", &BlockManager::free_queue_order)
      .def("check_invariants", &BlockManager::check_invariants)
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("num_gpu_blocks", &BlockManager::num_gpu_blocks)
      .def_property_readonly("num_cpu_blocks", &BlockManager::num_cpu_blocks)
      .def_property_readonly("num_free_gpu_blocks", &BlockManager::num_free_gpu_blocks)
      .def_property_readonly("num_free_cpu_blocks", &BlockManager::num_free_cpu_blocks)
      .def_property_readonly("num_cached_blocks", &BlockManager::num_cached_blocks)
      .def_property_readonly("watermark_blocks", &BlockManager::watermark_blocks)
      .def_property_readonly("enable_prefix_caching", &BlockManager::prefix_caching_enabled)
      .def_property_readonly("usage", &BlockManager::usage)
      .def_property_readonly("utilization", &BlockManager::utilization)
      .def_property_readonly("prefix_cache_queries",
                             [](const BlockManager& bm) { return bm.stats().prefix_cache_queries; })
      .def_property_readonly("prefix_cache_hits",
                             [](const BlockManager& bm) { return bm.stats().prefix_cache_hits; });
}
