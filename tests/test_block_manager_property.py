"""A randomized property test of the block manager: 100k operations.

After every operation it checks, from the outside: each block is free or referenced;
a block's reference count equals the number of block tables holding it; no table mixes
pools; free + used equals the pool size; and every sequence reads back its own tokens
through a shadow KV pool (kv_shadow.py). At the end, freeing everything frees every
block (cached blocks count as free: they are reclaimable).
"""

import random
from collections import Counter

import pytest

from pagedserve._native import BlockManager
from kv_shadow import KvShadow


def check(bm: BlockManager, kv: KvShadow) -> None:
    refs = {"gpu": Counter(), "cpu": Counter()}
    for seq in kv.tokens:
        refs[bm.device_of(seq)].update(bm.block_table(seq))
    for device, size in (("gpu", bm.num_gpu_blocks), ("cpu", bm.num_cpu_blocks)):
        counts = [bm.ref_count(b, device) for b in range(size)]
        assert counts == [refs[device][b] for b in range(size)], f"{device} ref counts drifted"
        free = bm.num_free_gpu_blocks if device == "gpu" else bm.num_free_cpu_blocks
        assert free + sum(1 for c in counts if c > 0) == size
    assert set(bm.free_queue_order()) == {b for b in range(bm.num_gpu_blocks) if bm.ref_count(b) == 0}
    kv.verify()


def run(seed: int, ops: int, prefix_caching: bool) -> Counter:
    rng = random.Random(seed)
    done = Counter()
    bm = None
    for op in range(ops):
        if op % 2000 == 0:  # a fresh manager of a new shape every 2000 operations
            if bm is not None:
                for seq in list(kv.tokens):
                    kv.free(seq)
                assert bm.num_free_gpu_blocks == bm.num_gpu_blocks
                assert bm.num_free_cpu_blocks == bm.num_cpu_blocks
            bm = BlockManager(rng.randint(4, 40), rng.randint(0, 24), rng.choice([1, 2, 4, 16]),
                              enable_prefix_caching=prefix_caching, watermark=0.0,
                              hash_bits=rng.choice([2, 64]))
            kv = KvShadow(bm)
            next_id = 0
        gpu = [s for s in kv.tokens if bm.device_of(s) == "gpu"]
        cpu = [s for s in kv.tokens if bm.device_of(s) == "cpu"]
        kind = rng.choices(["allocate", "append", "fork", "free", "swap_out", "swap_in"],
                           weights=[4, 6, 1, 3, 1, 2])[0]
        if kind == "allocate":
            vocab = rng.randint(1, 3)  # tiny vocabularies make prefixes repeat
            prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 4 * bm.block_size))]
            salt = rng.randrange(2)
            if bm.can_allocate(prompt, salt):
                kv.allocate(next_id, prompt, salt)
                next_id += 1
                done[kind] += 1
        elif kind == "append" and gpu:
            seqs = rng.sample(gpu, rng.randint(1, len(gpu)))
            tables = [bm.block_table(s) for s in seqs]
            try:
                kv.append_many(seqs, [rng.randrange(8) for _ in seqs])
                done[kind] += 1
            except RuntimeError:  # out of blocks: the step must have changed nothing
                assert [bm.block_table(s) for s in seqs] == tables
        elif kind == "fork" and gpu:
            kv.fork(rng.choice(gpu), next_id)
            next_id += 1
            done[kind] += 1
        elif kind == "free" and kv.tokens:
            kv.free(rng.choice(list(kv.tokens)))
            done[kind] += 1
        elif kind == "swap_out" and gpu:
            group = rng.sample(gpu, min(len(gpu), rng.randint(1, 3)))
            if bm.can_swap_out(group):
                kv.swap_out(group)
                done[kind] += 1
        elif kind == "swap_in" and cpu:
            group = rng.sample(cpu, min(len(cpu), rng.randint(1, 2)))
            if bm.can_swap_in(group):
                kv.swap_in(group)
                done[kind] += 1
        check(bm, kv)
    return done


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_100k_random_operations_keep_every_invariant(prefix_caching):
    done = run(seed=1234 + prefix_caching, ops=50_000, prefix_caching=prefix_caching)
    # Every kind of operation really happened, many times.
    for kind in ("allocate", "append", "fork", "free", "swap_out", "swap_in"):
        assert done[kind] > 500, (kind, done)
