"""The native block manager as Python sees it: exact answers and clear errors."""

import pytest

from pagedserve._native import BlockManager
from kv_shadow import KvShadow


def test_allocate_maps_a_prompt_onto_just_enough_blocks():
    bm = BlockManager(num_gpu_blocks=8, num_cpu_blocks=0, block_size=4, enable_prefix_caching=False, watermark=0)
    assert bm.allocate(1, list(range(5))) == 0
    assert bm.block_table(1) == [0, 1]
    assert bm.num_tokens(1) == 5
    assert bm.num_free_gpu_blocks == 6
    assert bm.usage == pytest.approx(2 / 8)
    assert bm.utilization == pytest.approx(5 / 8)


def test_append_returns_none_or_the_copy_on_write_pair():
    bm = BlockManager(8, 0, 4, enable_prefix_caching=False, watermark=0)
    kv = KvShadow(bm)
    kv.allocate(1, [1, 2, 3, 4, 5, 6])
    assert bm.append_slot(1, 7) is None
    kv.tokens[1].append(7)
    kv._write(1, 6, 7)
    kv.fork(1, 2)
    assert [bm.ref_count(b) for b in range(2)] == [2, 2]
    assert kv.append_many([2], [9]) == [(1, 2)]
    assert bm.block_table(2) == [0, 2]
    assert bm.ref_count(1) == 1
    kv.verify()


def test_n_samples_share_the_prompt_blocks():
    bm = BlockManager(64, 0, 16, watermark=0)
    bm.allocate(0, list(range(100)))  # 7 blocks, the last holds 4 tokens
    for child in range(1, 4):
        bm.fork(0, child)
    assert bm.num_free_gpu_blocks == 64 - 7
    copies = bm.append_slots([0, 1, 2, 3], [5, 6, 7, 8])
    # Four holders of the partial block: three copies, the last writes in place.
    assert copies == [(6, 7), (6, 8), (6, 9)]
    assert bm.num_free_gpu_blocks == 64 - 10
    assert [bm.ref_count(b) for b in range(6)] == [4] * 6
    for seq in range(4):
        bm.free(seq)
    assert bm.num_free_gpu_blocks == 64
    assert all(bm.ref_count(b) == 0 for b in range(64))


def test_prefix_cache_hits_verify_tokens_under_forced_collisions():
    bm = BlockManager(64, 0, 2, watermark=0, hash_bits=1)
    kv = KvShadow(bm)
    prompts = [[a, a + 1, 0] for a in range(0, 20, 2)]  # ten distinct first blocks, two hash values
    for i, p in enumerate(prompts):
        assert kv.allocate(i, p) == 0
    assert bm.num_cached_blocks == 10
    for i, p in enumerate(prompts):
        assert kv.allocate(100 + i, p) == 2
        assert bm.block_table(100 + i)[0] == bm.block_table(i)[0]
    assert bm.prefix_cache_queries == 60
    assert bm.prefix_cache_hits == 20
    kv.verify()


def test_a_block_is_served_from_the_cache_only_after_its_kv_was_computed():
    bm = BlockManager(16, 0, 4, watermark=0)
    bm.allocate(1, list(range(9)))
    assert bm.allocate(2, list(range(9))) == 0  # the first prefill has not run yet
    bm.mark_computed([1, 2], [4, 9])  # seq 1 ran one chunk, seq 2 its whole prompt
    assert bm.num_cached_blocks == 2  # block 0 twice is kept once; seq 2's block 1
    assert bm.allocate(3, list(range(9))) == 8
    with pytest.raises(ValueError, match="num_computed 10 of sequence 1 is outside"):
        bm.mark_computed([1], [10])


def test_tenants_with_different_salts_never_share():
    bm = BlockManager(16, 0, 4, watermark=0)
    prompt = list(range(9))
    assert bm.allocate(1, prompt, salt=11) == 0
    assert bm.allocate(2, prompt, salt=22) == 0
    bm.mark_computed([1, 2], [9, 9])
    assert bm.allocate(3, prompt, salt=11) == 8
    assert bm.block_table(3)[:2] == bm.block_table(1)[:2]
    assert set(bm.block_table(2)).isdisjoint(bm.block_table(1))


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(16, 0, 4, enable_prefix_caching=False, watermark=0)
    bm.allocate(1, list(range(9)))
    bm.mark_computed([1], [9])
    assert bm.allocate(2, list(range(9))) == 0
    assert bm.num_cached_blocks == 0


def test_swap_round_trip_keeps_sharing_and_returns_mappings():
    bm = BlockManager(8, 8, 4, enable_prefix_caching=False, watermark=0)
    kv = KvShadow(bm)
    kv.allocate(1, list(range(6)))
    kv.fork(1, 2)
    assert bm.can_swap_out([1, 2])
    assert kv.swap_out([1, 2]) == [(0, 0), (1, 1)]
    assert bm.device_of(1) == "cpu"
    assert bm.ref_count(0, "cpu") == 2
    assert bm.num_free_gpu_blocks == 8
    assert not bm.can_append(1)
    assert bm.can_swap_in([1, 2])
    assert kv.swap_in([1, 2]) == [(0, 0), (1, 1)]
    assert bm.device_of(2) == "gpu"
    assert bm.num_free_cpu_blocks == 8
    kv.verify()


def test_can_queries_have_no_side_effects():
    bm = BlockManager(4, 1, 4, watermark=0)
    bm.allocate(1, list(range(8)))
    before = (bm.num_free_gpu_blocks, bm.num_free_cpu_blocks, bm.free_queue_order(), bm.block_table(1))
    assert bm.can_allocate(list(range(8)))
    assert not bm.can_swap_out([1])  # two blocks, one CPU block
    assert bm.can_append(1)
    assert (bm.num_free_gpu_blocks, bm.num_free_cpu_blocks, bm.free_queue_order(), bm.block_table(1)) == before


@pytest.mark.parametrize(
    "call, exc, message",
    [
        (lambda bm: bm.free(42), ValueError, "cannot free unknown sequence 42"),
        (lambda bm: bm.block_table(42), ValueError, "unknown sequence 42"),
        (lambda bm: bm.fork(1, 1), ValueError, "cannot fork onto sequence 1: it already exists"),
        (lambda bm: bm.allocate(1, [1]), ValueError, "sequence 1 is already allocated"),
        (lambda bm: bm.allocate(2, [3, 1000]), ValueError, "token id 1000 at position 1 is out of range"),
        (lambda bm: bm.allocate(2, [2**40]), ValueError, "out of range"),
        (lambda bm: bm.append_slot(1, -5), ValueError, "token id -5"),
        (lambda bm: bm.append_slots([1, 1], [2, 3]), ValueError, "appears twice"),
        (lambda bm: bm.swap_in([1]), ValueError, "sequence 1 is not swapped out"),
        (lambda bm: bm.ref_count(0, "tpu"), ValueError, "device must be 'gpu' or 'cpu'"),
    ],
)
def test_misuse_raises_a_clear_python_exception(call, exc, message):
    bm = BlockManager(4, 2, 4, vocab_size=1000)
    bm.allocate(1, [1, 2, 3])
    with pytest.raises(exc, match=message):
        call(bm)
    bm.check_invariants()


def test_double_free_is_an_error_not_a_crash():
    bm = BlockManager(4, 0, 4)
    bm.allocate(1, [1, 2])
    bm.free(1)
    with pytest.raises(ValueError, match="double free"):
        bm.free(1)
    assert bm.num_free_gpu_blocks == 4


def test_running_out_is_a_normal_answer_and_misuse_past_it_raises():
    bm = BlockManager(2, 0, 2, watermark=0)
    bm.allocate(1, [1, 2, 3, 4])
    assert not bm.can_allocate([5])
    assert not bm.can_append(1)
    with pytest.raises(RuntimeError, match="out of GPU blocks"):
        bm.append_slot(1, 5)
    assert bm.num_tokens(1) == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_gpu_blocks=0, num_cpu_blocks=0, block_size=16), "num_gpu_blocks must be > 0"),
    (dict(num_gpu_blocks=4, num_cpu_blocks=-1, block_size=16), "num_cpu_blocks must be >= 0"),
    (dict(num_gpu_blocks=4, num_cpu_blocks=0, block_size=0), "block_size must be > 0"),
    (dict(num_gpu_blocks=4, num_cpu_blocks=0, block_size=16, watermark=1.5), "watermark"),
])
def test_bad_construction_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockManager(**kwargs)


def test_reserve_slots_answers_how_many_groups_fit_and_changes_no_other():
    """The scheduler's decode call: groups in order, each all or nothing, stopping at the
    first that does not fit (the caller preempts and calls again from it)."""
    bm = BlockManager(5, 0, 2, watermark=0, enable_prefix_caching=False)
    bm.allocate(1, [0, 1])  # full: its next slot takes block 4
    bm.allocate(2, [0, 1, 2])  # last block partly filled ...
    bm.fork(2, 3)  # ... and shared: the first of the two to append copies it
    bm.allocate(4, [0, 1])
    assert bm.num_free_gpu_blocks == 1
    done, copies = bm.reserve_slots([1, 2, 3, 4], [9, 9, 9, 9], [1, 2, 1])
    assert (done, copies) == (1, [])
    assert [bm.num_tokens(s) for s in (1, 2, 3, 4)] == [3, 3, 3, 2]
    bm.free(4)
    assert bm.reserve_slots([2, 3], [9, 9], [2]) == (1, [(2, 3)])
    assert bm.block_tables([2, 3]) == [[1, 3], [1, 2]] == [bm.block_table(2), bm.block_table(3)]
    flat, offsets = bm.block_tables_array([3, 1, 2])
    assert (flat.dtype.name, flat.tolist(), offsets.tolist()) == ("int32", [1, 2, 0, 4, 1, 3], [0, 2, 4, 6])
    with pytest.raises(ValueError, match="group_sizes add up to 2"):
        bm.reserve_slots([1], [9], [2])
    bm.check_invariants()
