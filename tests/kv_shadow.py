"""A shadow KV pool that plays the model runner for block-manager tests.

It writes each token id into the slot the manager assigned, performs the copy-on-write
and swap copies the manager returns, and reads every sequence back through its block
table: a wrong prefix hit, a lost copy or a bad swap mapping shows up as a sequence
that reads back tokens that are not its own.
"""

from __future__ import annotations

from pagedserve._native import BlockManager


class KvShadow:
    def __init__(self, bm: BlockManager):
        self.bm = bm
        bs = bm.block_size
        self.pools = {"gpu": [[-1] * bs for _ in range(bm.num_gpu_blocks)],
                      "cpu": [[-1] * bs for _ in range(bm.num_cpu_blocks)]}
        self.tokens: dict[int, list[int]] = {}

    def _write(self, seq: int, pos: int, token: int) -> None:
        bs = self.bm.block_size
        self.pools["gpu"][self.bm.block_table(seq)[pos // bs]][pos % bs] = token

    def _copy(self, src_pool: str, dst_pool: str, pairs) -> None:
        for src, dst in pairs:
            self.pools[dst_pool][dst] = list(self.pools[src_pool][src])

    def allocate(self, seq: int, tokens: list[int], salt: int = 0) -> int:
        cached = self.bm.allocate(seq, tokens, salt)
        self.tokens[seq] = list(tokens)
        for pos in range(cached, len(tokens)):
            self._write(seq, pos, tokens[pos])
        self.bm.mark_computed([seq], [len(tokens)])
        return cached

    def append_many(self, seqs: list[int], tokens: list[int]) -> list[tuple[int, int]]:
        copies = self.bm.append_slots(seqs, tokens)
        self._copy("gpu", "gpu", copies)  # copy-on-write happens before the step writes
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
        self._copy("gpu", "cpu", mapping)
        return mapping

    def swap_in(self, seqs: list[int]):
        mapping = self.bm.swap_in(seqs)
        self._copy("cpu", "gpu", mapping)
        return mapping

    def verify(self) -> None:
        bs = self.bm.block_size
        for seq, toks in self.tokens.items():
            table = self.bm.block_table(seq)
            pool = self.pools[self.bm.device_of(seq)]
            read = [pool[table[p // bs]][p % bs] for p in range(len(toks))]
            assert read == toks, f"sequence {seq} reads back {read}, expected {toks}"
