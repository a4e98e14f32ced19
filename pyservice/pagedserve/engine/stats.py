"""The engine's counters and gauges as typed snapshots: a misspelt name is an
AttributeError where it is read, not a metric that silently reads 0."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class EngineStats:
    """LLMEngine.stats(): one snapshot, taken on the engine's thread, safe to hand to
    any other (counters are totals since the engine started)."""

    num_running: int = 0
    num_waiting: int = 0  # includes the requests whose constraint is compiling
    num_compiling: int = 0  # structured output: constraints still compiling
    num_swapped: int = 0
    gpu_kv_usage: float = 0.0  # fraction of GPU KV blocks in use
    cpu_kv_usage: float = 0.0  # fraction of CPU swap blocks in use
    num_free_gpu_blocks: int = 0
    num_total_gpu_blocks: int = 0
    num_free_cpu_blocks: int = 0
    num_total_cpu_blocks: int = 0
    num_cached_blocks: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # prompt tokens found computed
    preemptions_by_mode: Mapping[str, int] = field(default_factory=dict)
    num_preemptions: int = 0
    blocks_swapped_out: int = 0
    blocks_swapped_in: int = 0
    prompt_tokens: int = 0  # run through prefill forwards
    generation_tokens: int = 0
    num_steps: int = 0
    num_steps_scheduled_ahead: int = 0

    @classmethod
    def of(cls, scheduler: Any, block_manager: Any, num_compiling: int = 0) -> EngineStats:
        s, bm = scheduler, block_manager
        return cls(
            num_running=len(s.running),
            num_waiting=len(s.waiting) + num_compiling,
            num_compiling=num_compiling,
            num_swapped=len(s.swapped),
            gpu_kv_usage=bm.usage,
            cpu_kv_usage=1.0 - bm.num_free_cpu_blocks / max(bm.num_cpu_blocks, 1),
            num_total_gpu_blocks=bm.num_gpu_blocks,
            num_total_cpu_blocks=bm.num_cpu_blocks,
            preemptions_by_mode=dict(s.num_preemptions),
            num_preemptions=sum(s.num_preemptions.values()),
            blocks_swapped_out=s.num_blocks_swapped_out,
            blocks_swapped_in=s.num_blocks_swapped_in,
            prompt_tokens=s.num_prompt_tokens,
            generation_tokens=s.num_generation_tokens,
            num_steps_scheduled_ahead=s.num_steps_ahead,
            **{name: getattr(bm, name) for name in _SAME_NAME_ON_BLOCK_MANAGER},
            **{name: getattr(s, name) for name in _SAME_NAME_ON_SCHEDULER},
        )


# Fields read under their own name.
_SAME_NAME_ON_BLOCK_MANAGER = ("num_free_gpu_blocks", "num_free_cpu_blocks", "num_cached_blocks")
_SAME_NAME_ON_SCHEDULER = ("prefix_cache_queries", "prefix_cache_hits", "num_steps")


@dataclass(frozen=True, slots=True)
class ServingStats(EngineStats):
    """AsyncEngine.stats(): the engine's last snapshot plus the server's own queue."""

    num_in_flight: int = 0  # requests with a stream open (queued or running)
    num_queued: int = 0  # accepted, not yet producing output

    @classmethod
    def of_engine(cls, stats: EngineStats, num_in_flight: int, num_queued: int
                  ) -> ServingStats:
        values = {f.name: getattr(stats, f.name) for f in fields(EngineStats)}
        return cls(**values, num_in_flight=num_in_flight, num_queued=num_queued)
