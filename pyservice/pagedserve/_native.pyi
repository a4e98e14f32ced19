"""Paged KV-cache block manager (C++; see native/block_manager.h)."""

from typing import Final

import numpy

class InvariantViolation(AssertionError): ...

class BlockManager:
    def __init__(
        self,
        num_gpu_blocks: int,
        num_cpu_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        watermark: float = 0.01,
        vocab_size: int = -1,
        hash_bits: int = 64,
    ) -> None:
        """`vocab_size` > 0 range-checks token ids; `hash_bits` < 64 truncates prefix
        hashes (tests use it to force collisions)."""
    def can_allocate(self, token_ids: list[int], salt: int = 0) -> bool: ...
    def allocate(self, seq_id: int, token_ids: list[int], salt: int = 0) -> int:
        """Maps a prompt onto GPU blocks; returns the tokens served from the prefix cache."""
    def can_append(self, seq_id: int) -> bool: ...
    def append_slot(self, seq_id: int, token_id: int) -> tuple[int, int] | None:
        """Reserves the slot of one new token; returns a (src, dst) copy-on-write pair."""
    def append_slots(self, seq_ids: list[int], token_ids: list[int]) -> list[tuple[int, int]]:
        """One decode step for many sequences, all or nothing; the copy-on-write pairs."""
    def reserve_slots(self, seq_ids: list[int], token_ids: list[int],
                      group_sizes: list[int]) -> tuple[int, list[tuple[int, int]]]:
        """One decode step for groups of sequences (seq_ids holds each group's in turn),
        in order, each group all or nothing; stops at the first group that does not fit.
        Returns how many groups got their slots and the copy-on-write pairs made."""
    def set_last_tokens(self, seq_ids: list[int], token_ids: list[int]) -> None:
        """Names the token of each sequence's last reserved slot (reserved with a
        placeholder before the token was sampled); its block must be unsealed, unshared."""
    def mark_computed(self, seq_ids: list[int], num_computed: list[int]) -> None:
        """The forward wrote the KV of each sequence's first num_computed tokens; their
        full blocks join the prefix cache only now."""
    def fork(self, parent_seq_id: int, child_seq_id: int) -> None: ...
    def free(self, seq_id: int) -> None: ...
    def can_swap_out(self, seq_ids: list[int]) -> bool: ...
    def swap_out(self, seq_ids: list[int]) -> list[tuple[int, int]]:
        """Moves the sequences to the CPU pool; (gpu_block, cpu_block) copies to perform."""
    def can_swap_in(self, seq_ids: list[int]) -> bool: ...
    def swap_in(self, seq_ids: list[int]) -> list[tuple[int, int]]:
        """Brings them back; (cpu_block, gpu_block) copies to perform."""
    def block_table(self, seq_id: int) -> list[int]: ...
    def block_tables(self, seq_ids: list[int]) -> list[list[int]]:
        """The tables of many sequences in one call."""
    def block_tables_array(self, seq_ids: list[int]) -> tuple[numpy.ndarray, numpy.ndarray]:
        """One step's tables in one call: int32 block ids of every table end to end, and
        int64 offsets (len(seq_ids) + 1): table i is flat[offsets[i]:offsets[i + 1]]."""
    def num_tokens(self, seq_id: int) -> int: ...
    def device_of(self, seq_id: int) -> str: ...
    def has_seq(self, seq_id: int) -> bool: ...
    def seq_ids(self) -> list[int]: ...
    def ref_count(self, block_id: int, device: str = "gpu") -> int: ...
    def free_queue_order(self) -> list[int]:
        """Free GPU blocks in eviction order (the front is taken first)."""
    def check_invariants(self) -> None: ...
    block_size: Final[int]
    num_gpu_blocks: Final[int]
    num_cpu_blocks: Final[int]
    num_free_gpu_blocks: Final[int]
    num_free_cpu_blocks: Final[int]
    num_cached_blocks: Final[int]
    watermark_blocks: Final[int]
    enable_prefix_caching: Final[bool]
    usage: Final[float]
    @property
    def utilization(self) -> float:
        """Token slots holding real tokens / slots in used GPU blocks (the paper's figure)."""
    prefix_cache_queries: Final[int]
    prefix_cache_hits: Final[int]
