"""The KV oracle of the Python tests: shadow block pools that hold token ids.

Whoever plays the model runner writes each token id into the slot it was given,
performs the copy-on-write and swap copies it was told to, and reads every sequence
back through its block table: a wrong prefix hit, a lost copy or a bad swap mapping
shows up as a sequence that reads back tokens that are not its own. ``KvShadow``
drives the native block manager directly (block-manager tests); ``OracleRunner``
executes the scheduler's batches (scheduler and beam-search tests). The C++ tests
keep their own (native/tests/kv_shadow.h), run by ctest without Python.
"""

from __future__ import annotations

from pagedserve._native import BlockManager
from pagedserve.engine.batch import SampleResult, ScheduledBatch


class KvPools:
    """A GPU and a CPU pool of blocks of token ids (-1: never written)."""

    def __init__(self, num_gpu_blocks: int, num_cpu_blocks: int, block_size: int):
        self.block_size = block_size
        self.pools = {"gpu": [[-1] * block_size for _ in range(num_gpu_blocks)],
                      "cpu": [[-1] * block_size for _ in range(num_cpu_blocks)]}

    @classmethod
    def like(cls, bm: BlockManager) -> KvPools:
        return cls(bm.num_gpu_blocks, bm.num_cpu_blocks, bm.block_size)

    def write(self, table, pos: int, token: int) -> None:
        """The token at position `pos` of a sequence with this GPU block table."""
        self.pools["gpu"][table[pos // self.block_size]][pos % self.block_size] = token

    def copy(self, src_pool: str, dst_pool: str, pairs) -> None:
        """Whole blocks, (src, dst) pair after pair."""
        for src, dst in pairs:
            self.pools[dst_pool][dst] = list(self.pools[src_pool][src])

    def read(self, table, length: int, pool: str = "gpu") -> list[int]:
        """The first `length` tokens of a sequence through its block table."""
        bs = self.block_size
        return [self.pools[pool][table[p // bs]][p % bs] for p in range(length)]


class KvShadow:
    """Plays the model runner against a BlockManager: every reserved slot is computed at once."""

    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.kv = KvPools.like(bm)
        self.tokens: dict[int, list[int]] = {}

    def _write(self, seq: int, pos: int, token: int) -> None:
        self.kv.write(self.bm.block_table(seq), pos, token)

    def allocate(self, seq: int, tokens: list[int], salt: int = 0) -> int:
        cached = self.bm.allocate(seq, tokens, salt)
        self.tokens[seq] = list(tokens)
        for pos in range(cached, len(tokens)):
            self._write(seq, pos, tokens[pos])
        self.bm.mark_computed([seq], [len(tokens)])
        return cached

    def append_many(self, seqs: list[int], tokens: list[int]) -> list[tuple[int, int]]:
        copies = self.bm.append_slots(seqs, tokens)
        self.kv.copy("gpu", "gpu", copies)  # copy-on-write happens before the step writes
        for seq, token in zip(seqs, tokens):
            self.tokens[seq].append(token)
            self._write(seq, len(self.tokens[seq]) - 1, token)
        self.bm.mark_computed(seqs, [len(self.tokens[s]) for s in seqs])
        return copies

    def fork(self, parent: int, child: int) -> None:
        self.bm.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    def free(self, seq: int) -> None:
        self.bm.free(seq)
        del self.tokens[seq]

    def swap_out(self, seqs: list[int]):
        mapping = self.bm.swap_out(seqs)
        self.kv.copy("gpu", "cpu", mapping)
        return mapping

    def swap_in(self, seqs: list[int]):
        mapping = self.bm.swap_in(seqs)
        self.kv.copy("cpu", "gpu", mapping)
        return mapping

    def verify(self) -> None:
        for seq, toks in self.tokens.items():
            read = self.kv.read(self.bm.block_table(seq), len(toks), self.bm.device_of(seq))
            assert read == toks, f"sequence {seq} reads back {read}, expected {toks}"


class OracleRunner:
    """Plays the model for the scheduler: applies each batch's cache ops in the runner's
    order (swap-out, swap-in, copy-on-write), writes every fed token id into its slot,
    then reads every sequence's whole context back through its block table. Its "model"
    picks the next token as a pure function of the context (and the seed), so any
    preemption or batching must leave every output unchanged."""

    def __init__(self, bm: BlockManager):
        self.kv = KvPools.like(bm)

    @staticmethod
    def next_token(context: list[int], seed: int | None) -> int:
        return (sum(context) * 31 + len(context) * 7 + (seed or 0) * 13) % 97 + 3

    def execute(self, batch: ScheduledBatch) -> list[SampleResult | None]:
        self.kv.copy("gpu", "cpu", batch.swap_out)  # (gpu, cpu) pairs
        self.kv.copy("cpu", "gpu", batch.swap_in)   # (cpu, gpu) pairs
        self.kv.copy("gpu", "gpu", batch.copies)
        seen = set()
        for w in batch.work:
            assert w.seq_id not in seen, "a sequence scheduled twice in one step"
            seen.add(w.seq_id)
            for i, t in enumerate(w.token_ids):
                self.kv.write(w.block_table, w.start_pos + i, t)
        results = []
        for w in batch.work:
            history = w.prompt_token_ids + w.output_token_ids
            end = w.start_pos + len(w.token_ids)
            assert history[w.start_pos:end] == w.token_ids
            assert w.sample == (end == len(history))
            assert w.sample_index == len(w.output_token_ids)
            read = self.kv.read(w.block_table, end)
            assert read == history[:end], f"seq {w.seq_id} reads {read}, owns {history[:end]}"
            results.append(SampleResult(self.next_token(history, w.params.seed), -1.0)
                           if w.sample else None)
        return results
