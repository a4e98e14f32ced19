"""The offline API: LLM(**engine settings).generate(prompts, params) -> outputs in
prompt order, all requests batched by the continuous-batching engine."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from pagedserve.config import EngineConfig
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.outputs import RequestFailedError, RequestOutput, RequestOutputKind
from pagedserve.sampling_params import SamplingParams

Prompt = str | list[int] | list[dict]


class LLM:
    """`LLM()` loads the embedded SmolLM2; keyword arguments are EngineConfig fields."""

    def __init__(self, model: str | None = None, **engine_kwargs: Any):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "LLM":
        """The offline API over an engine built elsewhere (e.g. over a shared runner)."""
        llm = cls.__new__(cls)
        llm.engine = engine
        llm._ids = itertools.count()
        return llm

    def shutdown(self) -> None:
        """Stops what the engine started (tensor-parallel workers); also on `with` exit."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None
                 ) -> list[RequestOutput]:
        """One prompt (a string, a list of token ids, or a list of chat messages) or a
        list of them; one SamplingParams for all or one per prompt."""
        prompts = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params has {len(params)} entries for "
                                 f"{len(prompts)} prompts")
        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"priority has {len(priorities)} entries for {len(prompts)} prompts")
        request_ids = []
        try:
            for prompt, p, prio in zip(prompts, params, priorities):
                request_id = f"llm-{next(self._ids)}"
                # Only the final results are read: no per-step outputs to build.
                self.engine.add_request(request_id, prompt, p, priority=prio,
                                        output_kind=RequestOutputKind.FINAL_ONLY)
                request_ids.append(request_id)
        except Exception:
            for request_id in request_ids:  # all or nothing
                self.engine.abort_request(request_id)
            raise
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: list[dict] | Sequence[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """One conversation or a list of them, through the model's chat template."""
        if messages and isinstance(messages[0], dict):
            messages = [messages]
        return self.generate([list(m) for m in messages], sampling_params, use_tqdm=use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        wanted = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(request_ids), desc="Generating", unit="req")
        try:
            while len(finished) < len(request_ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        if isinstance(out.error, ValueError):  # e.g. a bad constraint
                            raise out.error
                        if out.error is not None:
                            raise RequestFailedError(
                                f"request {out.request_id} failed: {out.error}") from out.error
                        finished[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
                if not self.engine.has_unfinished_requests() and len(finished) < len(request_ids):
                    raise RuntimeError("the engine stopped with requests unfinished")
        except BaseException:
            for request_id in request_ids:  # e.g. KeyboardInterrupt: leave the engine clean
                if request_id not in finished:
                    self.engine.abort_request(request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[r] for r in request_ids]


def _as_prompt_list(prompts: Any) -> list[Prompt]:
    """A single prompt is a string, a list of ints, or a list of message dicts."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts:
        first = prompts[0]
        if isinstance(first, int) and not isinstance(first, bool):
            return [list(prompts)]
        if isinstance(first, dict):
            return [list(prompts)]
        return list(prompts)
    raise ValueError("prompts must be a string, a list of token ids, a list of chat "
                     "messages, or a non-empty list of those")
